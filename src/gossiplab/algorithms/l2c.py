"""L2C and meta-L2C (Li et al. 2022): mixing weights learned from each site's validation loss,
then pruned to the strongest neighbours (gossiplab.l2c holds the learned aggregation).

The candidates are the neighbours of the configured topology's first graph; the weights start
uniform over them (`gossip.mixing` must stay "uniform": the learned weights replace it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gossiplab.algorithms.base import Algorithm, Sent
from gossiplab.config import Config, documented, register_section
from gossiplab.l2c import LearnedMixing, MetaLearnedMixing
from gossiplab.registry import ALGORITHMS


@dataclass
class L2CConfig:
    """[l2c]"""

    lr: float = documented(0.1, "Adam's step on the mixing logits (0: the weights stay uniform)")
    weight_decay: float = documented(0.01, "Adam's weight decay on the logits")
    val_batch: int = documented(32, "validation images per site per round")
    prune_round: int = documented(0, "the round T0 after which only the largest weights stay (0: never)")
    keep_neighbours: int = documented(10, "K0, the neighbours each site keeps at pruning")
    meta_encoder: str = documented("", "a trained meta-L2C encoder (learned_encoder.pt) to start from")

    def problems(self, config: Config) -> list[str]:
        checks = [
            (self.lr >= 0, "lr", "must be >= 0 (0: the weights stay uniform)"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.val_batch >= 1, "val_batch", "must be >= 1"),
            (self.prune_round >= 0, "prune_round", "must be >= 0 (0: never prune)"),
            (self.keep_neighbours >= 1, "keep_neighbours", "must be >= 1"),
            (not self.meta_encoder or config.gossip.algorithm == "meta-l2c", "meta_encoder",
             "is a trained meta-L2C encoder: set gossip.algorithm = 'meta-l2c' to use it"),
            (not self.meta_encoder or Path(self.meta_encoder).is_file(), "meta_encoder",
             f"'{self.meta_encoder}' is not a file (a learned_encoder.pt from a meta-l2c run)"),
        ]  # fmt: skip
        return [f"field 'l2c.{key}' = {getattr(self, key)!r}: {allowed}" for ok, key, allowed in checks if not ok]


register_section("l2c", L2CConfig)


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
        config, options = experiment.config, experiment.config.l2c
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

    def communicate(self, weights: torch.Tensor, state: dict[str, Any], comm: Any) -> Sent:
        """Aggregate the neighbours' updates with the learned W, then one step on the weights."""
        state["learned"](self.experiment.population.theta, weights)
        return Sent.vectors(weights, self.experiment.population.theta.shape[1])

    def summary(self, state: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        return state["learned"].summarize(run_dir)


@ALGORITHMS.register("meta-l2c")
class MetaL2C(L2C):
    """meta-L2C (Li et al. 2022, section 3.3): weights from an attention encoder shared by all sites."""

    learned_mixing = MetaLearnedMixing
