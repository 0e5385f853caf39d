"""gossiplab: decentralized (gossip, peer-to-peer) deep learning with all sites in one [N, P] tensor."""

from gossiplab.api import Result, run
from gossiplab.config import Config, ConfigError, build_config, load_preset
from gossiplab.population import Population
from gossiplab.runner import Experiment, Runner, build_experiment, evaluate

__all__ = [
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
    "run",
]
__version__ = "0.1.0"
