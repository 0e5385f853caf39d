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


@ALGORITHMS.register("sgp")
class SGP(Algorithm):
    """Stochastic gradient push (Assran et al. 2019): push-sum gossip for directed graphs."""

    def init(self) -> dict[str, Any]:
        theta = self.experiment.population.theta
        return {"push_sum_weights": torch.ones(len(theta), device=theta.device)}

    def adjust_gradients(self, x: torch.Tensor, y: torch.Tensor, state: dict[str, Any]) -> None:
        self.experiment.population.grad.div_(state["push_sum_weights"][:, None])

    @torch.no_grad()
    def communicate(self, weights: torch.Tensor, state: dict[str, Any], comm: Communicator) -> Sent:
        """Each message carries the sender's scaled row and its push-sum weight (P + 1 numbers)."""
        theta, push_sum_weights = self.experiment.population.theta, state["push_sum_weights"]
        links = weights.to(theta.device) != 0
        links.diagonal().fill_(True)
        column_stochastic = links.float() / links.sum(0, keepdim=True)
        mass = push_sum_weights[:, None] * theta
        push_sum_weights.copy_(column_stochastic @ push_sum_weights)
        theta.copy_(column_stochastic @ mass / push_sum_weights[:, None])
        return Sent.vectors(weights, theta.shape[1] + 1)
