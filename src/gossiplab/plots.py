"""matplotlib's pyplot, imported on first use with the file-only Agg backend.

Importing pyplot costs about 0.3 s, a fifth of gossiplab's start-up; commands that draw nothing
(a dry run, a refusal, every process of a distributed run but rank 0) never pay it. Every figure
is saved with a tight bounding box: a long title, label or annotation grows the image instead of
being cut at its edge.
"""

from __future__ import annotations

import importlib
from typing import Any


class _Pyplot:
    def __getattr__(self, name: str) -> Any:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        matplotlib.rcParams["savefig.bbox"] = "tight"
        return getattr(importlib.import_module("matplotlib.pyplot"), name)


plt: Any = _Pyplot()
