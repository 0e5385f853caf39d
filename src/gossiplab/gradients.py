"""Gradient transforms: the local step's named chain, in the spirit of Optax's `chain`.

`train.gradient_transforms = ["proximal", ...]` names links that change every site's gradient
[N, P], in that order, after the algorithm's own `adjust_gradients` and before clipping and the
optimizer step. A link is independent of the algorithm, so a proximal term composes with any
method (DSGD, CHOCO-SGD's compressed gossip, SGP, ...) without a class for the pair. Each link is
built on the experiment (as an algorithm is), keeps its own state (checkpointed with the run),
and is registered the same way a user's link is:

    from gossiplab.gradients import GradientTransform
    from gossiplab.registry import GRADIENT_TRANSFORMS

    @GRADIENT_TRANSFORMS.register("my-link")
    class MyLink(GradientTransform):
        def update(self, grad, state, step): ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from gossiplab.config import ProximalConfig
from gossiplab.registry import GRADIENT_TRANSFORMS

if TYPE_CHECKING:
    from gossiplab.assembly import Experiment


class GradientTransform:
    """One link of the chain; this base class changes nothing.

    `init()` gives the link's state when the run starts (a dict of tensors: the checkpoint keeps
    it); `update(grad, state, step)` changes this process's gradients [N, P] in place before each
    optimizer step; `after_gossip(state)` runs after each gossip round."""

    def __init__(self, experiment: Experiment):
        self.experiment = experiment

    def init(self) -> dict[str, Any]:
        """The link's state at step 0 (tensors, or objects with `state_dict`)."""
        return {}

    def update(self, grad: torch.Tensor, state: dict[str, Any], step: int) -> None:
        """Change `grad` [N, P] (the sites' gradients of their parameters) in place."""

    def after_gossip(self, state: dict[str, Any]) -> None:
        """After a gossip round has changed theta."""


@GRADIENT_TRANSFORMS.register("proximal", distributed=True)
class ProximalTerm(GradientTransform):
    """A proximal term in the local step (FedProx, Li et al. 2020, eq. 2, with the anchor a
    decentralized site has): every gradient is pulled towards the model the site held after its
    last gossip round, g_i <- g_i + mu (theta_i - anchor_i) (`proximal.mu`), which bounds how far a
    site drifts between rounds; mu = 0 changes nothing."""

    def init(self) -> dict[str, Any]:
        return {"anchor": self.experiment.population.parameters.clone()}

    def update(self, grad: torch.Tensor, state: dict[str, Any], step: int) -> None:
        mu = self.experiment.config.section(ProximalConfig).mu
        grad.add_(self.experiment.population.parameters - state["anchor"], alpha=mu)

    def after_gossip(self, state: dict[str, Any]) -> None:
        state["anchor"].copy_(self.experiment.population.parameters)
