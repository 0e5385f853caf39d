"""(d) A proximal term in the local step (in the spirit of FedProx, Li et al. 2020): every local
gradient is pulled towards the model the site held after its last gossip round,
    g_i <- g_i + mu (theta_i - anchor_i),
which limits how far sites drift apart between rounds. mu is in the config section [prox].
"""

from dataclasses import dataclass

from gossiplab.algorithms.dsgd import DSGD
from gossiplab.config import documented, register_section
from gossiplab.registry import ALGORITHMS


@dataclass
class ProxConfig:
    mu: float = documented(0.1, "strength of the pull towards the model after the last gossip round")

    def problems(self, config) -> list[str]:
        return [] if self.mu >= 0 else [f"field 'prox.mu' = {self.mu}: must be >= 0"]


register_section("prox", ProxConfig)


@ALGORITHMS.register("dsgd-prox")
class ProximalDSGD(DSGD):
    def init(self) -> dict:
        return {"anchor": self.experiment.population.theta.clone()}

    def adjust_gradients(self, x, y, state) -> None:
        population = self.experiment.population
        anchor = state["anchor"][:, : population.num_parameters]
        population.grad.add_(population.parameters - anchor, alpha=self.experiment.config.section(ProxConfig).mu)

    def communicate(self, weights, state, comm):
        sent = super().communicate(weights, state, comm)  # DSGD's round, and what it sent
        state["anchor"].copy_(self.experiment.population.theta)
        return sent
