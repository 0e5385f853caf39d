"""SGP, stochastic gradient push (Assran et al. 2019), push-sum gossip (Kempe et al. 2003) for
directed graphs.

Each sender j splits its mass equally among itself and its out-neighbours (P_ij = 1 / (outdeg_j +
1), column stochastic) and a push-sum weight w travels with it: x <- P x, w <- P w; sites evaluate
and differentiate the de-biased z = x / w. theta holds z, so the gradient is divided by w for x to
take the SGD step. On regular graphs w stays 1 and SGP is DSGD.
"""

from __future__ import annotations

from typing import Any

import torch

from gossiplab.algorithms.base import Algorithm, Sent
from gossiplab.communicator import Communicator
from gossiplab.registry import ALGORITHMS
from gossiplab.sparse import dense


@ALGORITHMS.register("sgp")
class SGP(Algorithm):
    """Stochastic gradient push (Assran et al. 2019): push-sum gossip for directed graphs."""

    stochastic = "columns"

    def init(self) -> dict[str, Any]:
        theta = self.experiment.population.theta
        return {"push_sum_weights": torch.ones(len(theta), device=theta.device)}

    def adjust_gradients(self, x: torch.Tensor, y: torch.Tensor, state: dict[str, Any]) -> None:
        self.experiment.population.grad.div_(state["push_sum_weights"][:, None])

    def mixing(self, round_index: int, adjacency: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """P on the links of the mixing rule's W."""
        return push_sum_matrix(super().mixing(round_index, adjacency, state))

    @torch.no_grad()
    def communicate(self, weights: torch.Tensor, state: dict[str, Any], comm: Communicator) -> Sent:
        """x <- P x, w <- P w. Each message carries the sender's scaled row and its push-sum
        weight (P + 1 numbers)."""
        theta, push_sum_weights = self.experiment.population.theta, state["push_sum_weights"]
        column_stochastic = dense(weights).to(theta.device)
        mass = push_sum_weights[:, None] * theta
        push_sum_weights.copy_(column_stochastic @ push_sum_weights)
        theta.copy_(column_stochastic @ mass / push_sum_weights[:, None])
        return Sent.vectors(weights, theta.shape[1] + 1)


def push_sum_matrix(weights: torch.Tensor) -> torch.Tensor:
    """P, column stochastic: each sender j splits its mass equally among itself and the sites W
    links it to (P_ij = 1 / (outdeg_j + 1) where W_ij != 0)."""
    links = dense(weights) != 0
    links.diagonal().fill_(True)
    return links.float() / links.sum(0, keepdim=True)
