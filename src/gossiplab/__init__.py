"""gossiplab: decentralized (gossip, peer-to-peer) deep learning with all sites in one [N, P] tensor."""

from gossiplab.algorithms import Algorithm
from gossiplab.api import Result, load_runs, run
from gossiplab.assembly import Experiment, build_experiment
from gossiplab.callbacks import Callback
from gossiplab.config import Config, ConfigError, build_config, load_preset
from gossiplab.evaluation import evaluate
from gossiplab.population import Population
from gossiplab.registry import ALGORITHMS, LOSSES, MIXING_RULES, MODELS, TOPOLOGIES
from gossiplab.runner import Runner

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
