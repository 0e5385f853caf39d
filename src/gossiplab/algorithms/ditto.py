"""Ditto (Li et al. 2021), personalised federated learning; with the complete graph and uniform
weights its global track is FedAvg.

Two models per site: the population's rows are the personal models v_i (what is evaluated), and
a global track w_i is kept beside them. Every local step, on the same batch:
    w_i <- w_i - lr grad F_i(w_i)                                  (FedAvg's local update)
    v_i <- v_i - lr (grad F_i(v_i) + lambda (v_i - w^t))           (Ditto's personal objective)
with w^t the global model received at the last round. A communication round mixes the global
track only, w <- W w (complete graph, uniform weights: FedAvg's server average; any other graph:
a decentralized Ditto), and w^t <- w. Personal models are never averaged.
"""

from __future__ import annotations

from typing import Any

import torch

from gossiplab.algorithms.base import Algorithm, Sent
from gossiplab.communicator import Communicator
from gossiplab.config import DittoConfig
from gossiplab.optim import build_optimizer
from gossiplab.population import Population
from gossiplab.registry import ALGORITHMS


@ALGORITHMS.register("ditto")
class Ditto(Algorithm):
    """Ditto (Li et al. 2021): personal models pulled towards a FedAvg-style global track."""

    def init(self) -> dict[str, Any]:
        population, config = self.experiment.population, self.experiment.config
        self.global_track = Population(population.module, population.num_sites, seed=0, strategy=population.strategy,
                                       class_mask=population.class_mask, loss=population.loss,
                                       device=population.device)  # fmt: skip
        self.global_track.theta.copy_(population.theta)
        return {
            "global": self.global_track.theta,
            "received": population.theta.clone(),  # w^t of every site
            "optimizer": build_optimizer(config.train, population.parameters.shape, population.theta.device),
        }

    def adjust_gradients(self, x: torch.Tensor, y: torch.Tensor, state: dict[str, Any]) -> None:
        """The proximal gradient on the personal models; one step of the global track."""
        population, optimizer = self.experiment.population, state["optimizer"]
        received = state["received"][:, : population.num_parameters]
        strength = self.experiment.config.section(DittoConfig).strength
        population.grad.add_(population.parameters - received, alpha=strength)
        self.global_track.compute_gradients(x, y)
        optimizer.lr = self.experiment.optimizer.lr
        optimizer.step(self.global_track.parameters, self.global_track.grad)

    @torch.no_grad()
    def communicate(self, weights: torch.Tensor, state: dict[str, Any], comm: Communicator) -> Sent:
        """Only the global track is gossiped; the personal models stay home."""
        comm.mix(state["global"], weights, self.averager(state["global"]))
        state["received"].copy_(state["global"])
        return Sent.vectors(weights, state["global"].shape[1])
