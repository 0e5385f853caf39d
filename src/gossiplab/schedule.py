"""Gossip schedules: at which training steps the sites communicate.

Steps are 1-indexed; gossip at step t happens after every site's local update of step t. The
optional final global merge (`gossip.final_merge`) comes after the last step's gossip.
"""

from __future__ import annotations

from dataclasses import dataclass

from gossiplab.config import GossipConfig


@dataclass(frozen=True)
class GossipSchedule:
    """kind: 'every' (each `every` steps), 'steps' (an explicit list), 'window' (each `every` steps
    inside [window_start, window_end] only, the single-merge paper's communication windows) or
    'none' (no gossip during training)."""

    kind: str
    total_steps: int
    every: int = 1
    steps: frozenset[int] = frozenset()
    window: tuple[int, int] = (0, 0)
    final_merge: bool = False

    @classmethod
    def from_config(cls, config: GossipConfig, total_steps: int) -> GossipSchedule:
        return cls(
            config.schedule,
            total_steps,
            config.every,
            frozenset(config.steps),
            (config.window_start, config.window_end),
            config.final_merge != "none",
        )

    def gossips_at(self, step: int) -> bool:
        if self.kind == "every":
            return step % self.every == 0
        if self.kind == "steps":
            return step in self.steps
        if self.kind == "window":
            return self.window[0] <= step <= self.window[1] and step % self.every == 0
        return False

    def merges_globally_at(self, step: int) -> bool:
        return self.final_merge and step == self.total_steps

    def rounds_until(self, step: int) -> int:
        """How many gossip rounds happen in steps 1..step; round r uses index r - 1 for its graph."""
        if self.kind == "every":
            return step // self.every
        return sum(1 for t in range(1, step + 1) if self.gossips_at(t))

    def communication_steps(self) -> list[int]:
        """Every step at which parameters are exchanged (gossip or the global merge)."""
        return [t for t in range(1, self.total_steps + 1) if self.gossips_at(t) or self.merges_globally_at(t)]
