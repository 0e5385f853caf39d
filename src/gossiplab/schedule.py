"""Gossip schedules: at which training steps the sites communicate.

Steps are 1-indexed; gossip at step t happens after every site's local update of step t.
"""

from __future__ import annotations

from dataclasses import dataclass

from gossiplab.config import GossipConfig


@dataclass(frozen=True)
class GossipSchedule:
    """kind: 'every' (each `every` steps), 'steps' (an explicit list), 'final-only' (no gossip,
    one global merge after the last step) or 'none' (local training only)."""

    kind: str
    total_steps: int
    every: int = 1
    steps: frozenset[int] = frozenset()

    @classmethod
    def from_config(cls, config: GossipConfig, total_steps: int) -> GossipSchedule:
        return cls(config.schedule, total_steps, config.every, frozenset(config.steps))

    def gossips_at(self, step: int) -> bool:
        if self.kind == "every":
            return step % self.every == 0
        if self.kind == "steps":
            return step in self.steps
        return False

    def merges_globally_at(self, step: int) -> bool:
        return self.kind == "final-only" and step == self.total_steps

    def rounds_until(self, step: int) -> int:
        """How many gossip rounds happen in steps 1..step; round r uses index r - 1 for its graph."""
        if self.kind == "every":
            return step // self.every
        if self.kind == "steps":
            return sum(1 for s in self.steps if s <= step)
        return 0

    def communication_steps(self) -> list[int]:
        """Every step at which parameters are exchanged (gossip or the global merge)."""
        return [t for t in range(1, self.total_steps + 1) if self.gossips_at(t) or self.merges_globally_at(t)]
