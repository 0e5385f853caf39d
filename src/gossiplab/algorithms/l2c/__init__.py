"""L2C and meta-L2C (Li et al. 2022): mixing weights learned from each site's validation loss,
then pruned to the strongest neighbours; the learned aggregation itself is in `learned.py` here.

The candidates are the neighbours of the configured topology's first graph; the weights start
uniform over them (`gossip.mixing` must stay "uniform": the learned weights replace it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gossiplab.algorithms.base import Algorithm, Sent
from gossiplab.algorithms.l2c.learned import LearnedMixing, MetaLearnedMixing
from gossiplab.communicator import Communicator
from gossiplab.config import Config, L2CConfig
from gossiplab.registry import ALGORITHMS


@ALGORITHMS.register("l2c")
class L2C(Algorithm):
    """L2C (Li et al. 2022): mixing weights learned from each site's validation loss, then pruned."""

    learned_mixing = LearnedMixing

    @staticmethod
    def problems(config: Config) -> list[str]:
        name, errors = config.gossip.algorithm, []
        if config.gossip.mixing != "uniform":
            errors.append(f"field 'gossip.mixing' = {config.gossip.mixing!r}: must be 'uniform' with gossip.algorithm "
                          f"= '{name}' (the learned weights start uniform and replace the rule)")  # fmt: skip
        if config.data.val_fraction <= 0:
            errors.append(f"field 'data.val_fraction' = {config.data.val_fraction}: must be > 0 with gossip.algorithm "
                          f"= '{name}' (the mixing weights minimise each site's validation loss)")  # fmt: skip
        return errors

    def init(self) -> dict[str, Any]:
        experiment = self.experiment
        config, options = experiment.config, experiment.config.section(L2CConfig)
        meta = {"encoder_path": options.meta_encoder} if self.learned_mixing is MetaLearnedMixing else {}
        learned = self.learned_mixing(
            experiment.population,
            experiment.federation,
            experiment.topology(0),
            lr=options.lr,
            weight_decay=options.weight_decay,
            prune_round=options.prune_round,
            keep=options.keep_neighbours,
            val_batch=options.val_batch,
            seed=config.seed,
            **meta,
        )
        return {"learned": learned}

    def mixing(self, round_index: int, adjacency: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """The current learned W, so that communication is counted on the learned (pruned) graph."""
        with torch.no_grad():
            return state["learned"].weights()

    def communicate(self, weights: torch.Tensor, state: dict[str, Any], comm: Communicator) -> Sent:
        """Aggregate the neighbours' updates with the learned W, then one step on the weights."""
        state["learned"](self.experiment.population.theta, weights)
        return Sent.vectors(weights, self.experiment.population.theta.shape[1])

    def summary(self, state: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        return state["learned"].summarize(run_dir)


@ALGORITHMS.register("meta-l2c")
class MetaL2C(L2C):
    """meta-L2C (Li et al. 2022, section 3.3): weights from an attention encoder shared by all sites."""

    learned_mixing = MetaLearnedMixing
