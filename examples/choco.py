"""(f) Compressed gossip: CHOCO-SGD (Koloskova, Stich & Jaggi 2019, Algorithm 1) with top-k.

Every site keeps a public copy x_hat_i of its model that its neighbours also hold. A round sends
only a compressed correction, the k largest entries of x_i - x_hat_i (values and their int32
indices), and moves each model towards its neighbours' public copies:
    q_i <- top_k(x_i - x_hat_i);   x_hat_i <- x_hat_i + q_i   (every holder of x_hat_i adds q_i)
    x_i <- x_i + gamma sum_j W_ij (x_hat_j - x_hat_i)
`communicate` returns what went over the wire, so the run's bytes_sent counts k values and k
indices per message, not a full vector. Options in [choco]: the kept share and gamma.
"""

import math
from dataclasses import dataclass

import torch

from gossiplab.algorithms import Algorithm, Sent
from gossiplab.algorithms.base import BYTES_PER_NUMBER
from gossiplab.config import documented, register_section
from gossiplab.merge import message_count
from gossiplab.registry import ALGORITHMS


@dataclass
class ChocoConfig:
    kept: float = documented(0.1, "share of x_i - x_hat_i sent each round (top-k by magnitude), in (0, 1]")
    gamma: float = documented(0.5, "consensus step size gamma, in (0, 1]")

    def problems(self, config) -> list[str]:
        return [f"field 'choco.{name}' = {value}: must be in (0, 1]"
                for name, value in (("kept", self.kept), ("gamma", self.gamma)) if not 0 < value <= 1]  # fmt: skip


register_section("choco", ChocoConfig)


@ALGORITHMS.register("choco-sgd")
class ChocoSGD(Algorithm):
    def init(self) -> dict:
        return {"public": torch.zeros_like(self.experiment.population.theta)}  # x_hat, known to the neighbours

    @torch.no_grad()
    def communicate(self, weights, state, comm) -> Sent:
        theta, public, options = self.experiment.population.theta, state["public"], self.experiment.config.choco
        k = math.ceil(options.kept * theta.shape[1])
        difference = theta - public
        kept = difference.abs().topk(k, dim=1).indices
        public.scatter_add_(1, kept, difference.gather(1, kept))  # x_hat_i += q_i
        mixed = public.clone()
        comm.mix(mixed, weights, self.averager(mixed))  # sum_j W_ij x_hat_j
        theta.add_(mixed - public, alpha=options.gamma)
        messages = message_count(weights)
        return Sent(messages, messages * k * 2 * BYTES_PER_NUMBER)  # k values and k indices per message
