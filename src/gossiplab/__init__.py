"""gossiplab: decentralized (gossip, peer-to-peer) deep learning with all sites in one [N, P] tensor.

The public names are imported on first use (PEP 562): `import gossiplab` and `gossiplab --help` do not
pay for PyTorch's import (seconds) until something that needs it is touched.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# PyTorch's CPU threads run on GNU OpenMP, whose threads spin for GOMP_SPINCOUNT iterations
# (300,000 when unset) before they sleep. With another process on one of 2 cores, a thread done
# with its share spins against the one waiting for the busy core: the default's step ran 1.6x
# slower. 1,000 spins cost nothing on an idle machine (`gossiplab bench --busy` measures both).
# libgomp reads it when PyTorch loads: this works when gossiplab is imported first (the command
# line, `python -m gossiplab`, torchrun's workers), and never overrides a user's setting.
OPENMP_SPIN_COUNT = "1000"
os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)

if TYPE_CHECKING:
    from gossiplab.algorithms import Algorithm
    from gossiplab.api import Result, load_runs, run
    from gossiplab.assembly import Experiment, build_experiment
    from gossiplab.callbacks import Callback
    from gossiplab.catalogue import build_config
    from gossiplab.config import Config, ConfigError, load_preset
    from gossiplab.evaluation import evaluate
    from gossiplab.population import Population
    from gossiplab.registry import ALGORITHMS, LOSSES, MIXING_RULES, MODELS, TOPOLOGIES
    from gossiplab.runner import Runner

_HOMES = {
    "Algorithm": "gossiplab.algorithms",
    "Result": "gossiplab.api",
    "load_runs": "gossiplab.api",
    "run": "gossiplab.api",
    "Experiment": "gossiplab.assembly",
    "build_experiment": "gossiplab.assembly",
    "Callback": "gossiplab.callbacks",
    "Config": "gossiplab.config",
    "ConfigError": "gossiplab.config",
    "build_config": "gossiplab.catalogue",
    "load_preset": "gossiplab.config",
    "evaluate": "gossiplab.evaluation",
    "Population": "gossiplab.population",
    "ALGORITHMS": "gossiplab.registry",
    "LOSSES": "gossiplab.registry",
    "MIXING_RULES": "gossiplab.registry",
    "MODELS": "gossiplab.registry",
    "TOPOLOGIES": "gossiplab.registry",
    "Runner": "gossiplab.runner",
}
__all__ = [
    "ALGORITHMS",
    "LOSSES",
    "MIXING_RULES",
    "MODELS",
    "TOPOLOGIES",
    "Algorithm",
    "Callback",
    "Config",
    "ConfigError",
    "Experiment",
    "Population",
    "Result",
    "Runner",
    "build_config",
    "build_experiment",
    "evaluate",
    "load_preset",
    "load_runs",
    "run",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'gossiplab' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
