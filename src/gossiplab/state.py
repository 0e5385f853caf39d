"""The training state: everything the loop changes that is not a part of the experiment.

The parts keep their own state (the population's theta, the optimizer's buffers, the algorithm's
`experiment.state`, the network's clock and churn); this is the rest of what a checkpoint must hold
for a resumed run to end at the uninterrupted result: the step, the batch generator, which sites
are still active, the loss sums since the last evaluation, and what was sent (`Traffic`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Traffic:
    """What the run sent so far: gossip messages and their bytes, as each round's algorithm
    reported them (`gossiplab.algorithms.Sent`), the parameter vectors of the final global merge,
    and the gossip messages lost in transit."""

    gossip_messages: int = 0
    gossip_bytes: int = 0
    merge_messages: int = 0
    messages_lost: int = 0

    def bytes_sent(self, vector_bytes: int) -> int:
        """Every byte sent: the gossip rounds' as reported, and the final merge's rows."""
        return self.gossip_bytes + self.merge_messages * vector_bytes


@dataclass
class TrainingState:
    """The loop's own state (`gossiplab.loop.train` advances it; callbacks read it).

    `active`: sites not dropped for divergence or lost with their process; `loss_sum` /
    `loss_count`: the mean training loss of the active sites since the last evaluation, and
    `site_loss_sum` per site; `last_finite_loss`: each site's, for the divergence message;
    `wall_time`: seconds of training so far (across resumes); `start_evaluated`: step 0's
    evaluation is logged (a state read from a checkpoint); `stop_requested`: finish the step,
    then stop (Ctrl-C)."""

    step: int
    generator: torch.Generator
    active: torch.Tensor
    site_loss_sum: torch.Tensor
    last_finite_loss: torch.Tensor
    loss_sum: float = 0.0
    loss_count: int = 0
    traffic: Traffic = field(default_factory=Traffic)
    wall_time: float = 0.0
    start_evaluated: bool = False
    stop_requested: bool = False

    @classmethod
    def start(cls, num_sites: int, seed: int) -> TrainingState:
        """The state before step 1: every site active, batches drawn from `seed`."""
        return cls(
            step=0,
            generator=torch.Generator().manual_seed(seed),
            active=torch.ones(num_sites, dtype=torch.bool),
            site_loss_sum=torch.zeros(num_sites, dtype=torch.float64),
            last_finite_loss=torch.full((num_sites,), float("nan")),
        )

    def record_losses(self, losses: torch.Tensor) -> None:
        """Add every site's loss of this step [N] to the means (after the loop's divergence
        policy has dropped the sites whose loss is not finite, or stopped the run)."""
        finite = torch.isfinite(losses)
        self.last_finite_loss = torch.where(finite, losses, self.last_finite_loss)
        self.loss_sum += float(losses[self.active].mean())
        self.site_loss_sum += torch.where(self.active & finite, losses, 0.0)
        self.loss_count += 1

    def mean_loss(self) -> float:
        """The mean training loss of the active sites since the last evaluation."""
        return self.loss_sum / self.loss_count

    def site_mean_losses(self) -> list[float]:
        """Each site's mean training loss since the last evaluation."""
        return (self.site_loss_sum / self.loss_count).tolist()

    def reset_losses(self) -> None:
        """After an evaluation: the next means start from nothing."""
        self.loss_sum, self.loss_count = 0.0, 0
        self.site_loss_sum.zero_()

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's entries of this state (flat keys, as checkpoints have always held them)."""
        return {
            "step": self.step,
            "gossip_messages": self.traffic.gossip_messages,
            "gossip_bytes": self.traffic.gossip_bytes,
            "merge_messages": self.traffic.merge_messages,
            "messages_lost": self.traffic.messages_lost,
            "wall_time": self.wall_time,
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            "site_loss_sum": self.site_loss_sum,
            "active": self.active,
            "last_finite_loss": self.last_finite_loss,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any], vector_bytes: int) -> None:
        """Continue from a checkpoint's entries. One written before the algorithms reported their
        bytes counts one parameter vector (`vector_bytes`) per message; one written before
        simulated networks lost nothing."""
        self.step = state["step"]
        self.loss_sum, self.loss_count = state["loss_sum"], state["loss_count"]
        self.site_loss_sum.copy_(state["site_loss_sum"])
        self.active.copy_(state["active"])
        self.last_finite_loss.copy_(state["last_finite_loss"])
        messages = state["gossip_messages"]
        self.traffic = Traffic(
            gossip_messages=messages,
            gossip_bytes=state.get("gossip_bytes", messages * vector_bytes),
            merge_messages=state["merge_messages"],
            messages_lost=state.get("messages_lost", 0),
        )
        self.wall_time = state["wall_time"]
        self.generator.set_state(state["generator"])
        self.start_evaluated = True  # a checkpoint is written after its step's evaluation
