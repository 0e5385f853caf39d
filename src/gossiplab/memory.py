"""How much memory this machine has for a run, and the refusal when a run would not fit.

Checked before the allocation it guards, so a run (or a --dry-run) that cannot fit says so with
its estimate instead of dying in the allocator.
"""

from __future__ import annotations

import os
from pathlib import Path


class ResourceError(MemoryError):
    """The run would not fit in this machine's memory; refused before allocating it."""


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
