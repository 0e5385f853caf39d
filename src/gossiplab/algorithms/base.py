"""The algorithm protocol: what a decentralized method adds to the loop (DESIGN section 3).

The loop (gossiplab.loop) calls an algorithm unconditionally and names none:

    every step:  [tick(state): the simulated seconds of a step, for sites at their own speed]
                 gradients of all sites (the engine), at gradients_at(state)'s point
                 adjust_gradients(x, y, state)          SGP's push-sum scaling, Ditto's proximal
                                                        term, gradient tracking, ...
                 the optimizer step on [N, P]
                 if the schedule fires:
                     W = mixing(round, adjacency, state)  default: the configured mixing rule
                     communicate(W, state, comm) -> Sent  default: theta <- W theta (DSGD),
                                                        one parameter vector per edge
    a divergence: drop_sites(dropped, state)            (train.on_divergence = drop)
    evaluation:  merged_model(active, state, comm)       the counterfactual merged model
    the end:     summary(state, run_dir)                 extra summary fields and files

`init()` gives the state, in the spirit of Optax: a dict of tensors and of objects with
`state_dict()`/`load_state_dict()`. It is what the checkpoint saves, and resume restores it in
place, so an algorithm's own buffers may alias its tensors. An algorithm registers under its
`gossip.algorithm` name; `problems(config)` holds its cross-field rules, and `distributed` says
whether it runs when the sites are spread over processes (`comm` is a
`gossiplab.communicator.Communicator`: only its `mix`, `gather` and `sum` cross processes).
The options it needs come from a config section it declares (`gossiplab.config.register_section`).

`communicate` returns what it sent (`Sent`: messages and their bytes, all sites together), and the
run's accounting (summary.json's `bytes_sent`, the communication cost) sums those: a compressed or
a two-vector algorithm reports what it really sends. Returning None counts one parameter vector per
off-diagonal non-zero of W, the plain gossip message.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from gossiplab.communicator import Communicator
from gossiplab.merge import GossipAverager, final_merge, message_count

if TYPE_CHECKING:
    from gossiplab.assembly import Experiment
    from gossiplab.config import Config


BYTES_PER_NUMBER = 4  # float32 values and int32 indices on the wire


@dataclass(frozen=True)
class Sent:
    """What one communication round sent, all sites together: how many messages (one per
    receiver and sender), the bytes of their payloads, and how many of those messages the
    algorithm itself saw lost in transit (AD-PSGD's exchanges; a synchronous round's losses are
    the network's, in its Delivery)."""

    messages: int
    bytes: int
    lost: int = 0

    @classmethod
    def vectors(cls, weights: torch.Tensor, width: int, per_message: int = 1) -> Sent:
        """One message per off-diagonal non-zero W_ij (j sends to i), each `per_message` vectors
        of `width` float32 numbers."""
        messages = message_count(weights)
        return cls(messages, messages * per_message * width * BYTES_PER_NUMBER)


class Algorithm:
    """A decentralized method as hooks on the loop; this base class is DSGD (Lian et al. 2017):
    a local SGD step, then theta <- W theta with the configured mixing rule."""

    distributed: ClassVar[bool] = False  # runs with the sites spread over processes
    communicate_before_step: ClassVar[bool] = False  # mix before the optimizer step (CDSGD)
    # whose sums W keeps: 'rows' (each site averages what it receives; the rule's contract) or
    # 'columns' (each sender splits its mass: push-sum); a lost message's weight stays with the
    # receiver or the sender accordingly (gossiplab.network), and dropped sites are cut the same way
    stochastic: ClassVar[str] = "rows"

    def __init__(self, experiment: Experiment):
        self.experiment = experiment

    @staticmethod
    def problems(config: Config) -> list[str]:
        """What this algorithm cannot run with, each naming the field, the value and what is allowed."""
        return []

    def init(self) -> dict[str, Any]:
        """The algorithm's state when the run starts (what checkpoints save); DSGD has none."""
        return {}

    def mixing(self, round_index: int, adjacency: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """W [N, N] of round `round_index` on its graph, rows or columns summing to 1 as `stochastic`
        says; default: the experiment's mixing rule."""
        return self.experiment.mixing_rule(adjacency, self.experiment)

    def tick(self, state: dict[str, Any]) -> float | None:
        """Simulated seconds one loop step covers when sites step at their own speed (AD-PSGD);
        None: a synchronous round, as long as its slowest online site's step."""
        return None

    def gradients_at(self, state: dict[str, Any]) -> contextlib.AbstractContextManager:
        """Where the step's gradients are taken: a context in which theta holds that point
        (AD-PSGD: each site's stale read); default: the current theta."""
        return contextlib.nullcontext()

    def adjust_gradients(self, x: torch.Tensor, y: torch.Tensor, state: dict[str, Any]) -> None:
        """Change `population.grad` [N, P] before the optimizer step (the batch is [N, B, ...])."""

    def communicate(self, weights: torch.Tensor, state: dict[str, Any], comm: Communicator) -> Sent | None:
        """One communication round with W; default: theta <- W theta, in place, through `comm`
        (which exchanges the rows other processes hold), one row of theta per edge."""
        theta = self.experiment.population.theta
        comm.mix(theta, weights, self.averager(theta))
        return Sent.vectors(weights, theta.shape[1])

    def drop_sites(self, dropped: torch.Tensor, state: dict[str, Any]) -> None:
        """The loop took these sites ([N] bool) out for divergence (train.on_divergence = drop).
        W reaches `communicate` with them cut out already; an algorithm that picks its partners
        itself, not through W (AD-PSGD), must stop picking them here."""

    def merged_model(self, active: torch.Tensor, state: dict[str, Any], comm: Communicator) -> torch.Tensor | None:
        """The counterfactual merged model [1, P]; None: the uniform mean of the active rows."""
        return None

    def final_merge(self, active: torch.Tensor, state: dict[str, Any], comm: Communicator) -> int:
        """The single global merge after the last step (gossip.final_merge); returns how many
        parameter vectors it sent. Default: plain averaging of the active rows, exact or by a few
        gossip rounds (`gossiplab.merge.final_merge`); a method that merges its own way (matched
        units, learned weights) overrides it."""
        return final_merge(self.experiment.population.theta, self.experiment.config, active, comm)

    def summary(self, state: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        """Extra fields for summary.json (and files of its own in the run directory)."""
        return {}

    def averager(self, theta: torch.Tensor) -> GossipAverager:
        """The in-place gossip averager for theta's shape (its buffers are made once)."""
        cached = self.__dict__.get("_averager")
        if cached is None or cached.shape != theta.shape:
            cached = self.__dict__["_averager"] = GossipAverager(
                theta.shape, self.experiment.config.train.kernels, theta.device
            )
        return cached


def restore(state: dict[str, Any], saved: dict[str, Any]) -> None:
    """Load a checkpoint's algorithm state into `state` in place (tensors copied, objects loaded)."""
    for key, value in saved.items():
        current = state.get(key)
        if isinstance(current, torch.Tensor):
            current.copy_(value)
        elif hasattr(current, "load_state_dict"):
            current.load_state_dict(value)
        else:
            state[key] = value


def saved(state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint stores of the algorithm state."""
    return {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
