"""Gossip schedules: at which training steps the sites communicate.

Steps are 1-indexed; gossip at step t happens after every site's local update of step t. The
optional final global merge (`gossip.final_merge`) comes after the last step's gossip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gossiplab.config import GossipConfig


def uniform_steps(total_steps: int, rounds: int) -> list[int]:
    """`rounds` rounds at equal intervals, none at the very end: t_k = round(k T / (R + 1))."""
    return [round(k * total_steps / (rounds + 1)) for k in range(1, rounds + 1)]


def two_stage_steps(total_steps: int, rounds: int, stage_split: float, early_share: float) -> list[int]:
    """MAZEL's two-stage gossip scheduler (section D): a share of the rounds at short intervals in
    the early stage (steps up to stage_split * T, the last round at its end), the rest at longer
    intervals in the convergence stage, spaced so that none falls in the final interval."""
    early = min(rounds, max(1, round(early_share * rounds))) if rounds > 1 else rounds
    late = rounds - early
    boundary = stage_split * total_steps
    steps = [round(k * boundary / early) for k in range(1, early + 1)]
    interval = (total_steps - boundary) / (late + 1)
    return steps + [round(boundary + k * interval) for k in range(1, late + 1)]


def cosine_density(total_steps: int, warmup_fraction: float) -> list[float]:
    """MAZEL's gossip density (section D, Fig. D.1): a linear ramp over the warmup, then the cosine
    decay (1 + cos(pi (t - t_w) / (T - t_w))) / 2, for t = 1..T."""
    warmup = warmup_fraction * total_steps
    return [
        t / warmup if t < warmup else 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total_steps - warmup)))
        for t in range(1, total_steps + 1)
    ]


def cosine_steps(total_steps: int, rounds: int, warmup_fraction: float) -> list[int]:
    """MAZEL's cosine gossip scheduler with the total number of rounds fixed, placed
    deterministically: round k falls at the first step where the cumulative `cosine_density`
    reaches (k - 1/2) / R of its total."""
    density = cosine_density(total_steps, warmup_fraction)
    total = sum(density)
    steps, cumulative, k = [], 0.0, 1
    for t, rho in enumerate(density, start=1):
        cumulative += rho
        while k <= rounds and cumulative >= (k - 0.5) / rounds * total:
            steps.append(max(t, steps[-1] + 1 if steps else 1))
            k += 1
    return steps


def cosine_random_steps(total_steps: int, rounds: int, warmup_fraction: float, seed: int) -> list[int]:
    """MAZEL's cosine gossip scheduler as the paper states it (appendix D: it "gradually reduces
    the probability of gossiping"): step t gossips with probability
    q(t) = min(1, R rho(t) / sum_s rho(s)), rho the `cosine_density`, so R rounds are expected
    (not fixed). The draws come from the seed alone: every process and rerun agrees."""
    density = cosine_density(total_steps, warmup_fraction)
    total = sum(density)
    draws = np.random.default_rng([seed, 5]).random(total_steps)
    return [t for t, (rho, u) in enumerate(zip(density, draws, strict=True), start=1) if u < rounds * rho / total]


@dataclass(frozen=True)
class GossipSchedule:
    """kind: 'every' (each `every` steps), 'steps' (an explicit list), 'window' (each `every` steps
    inside [window_start, window_end], the single-merge paper's communication windows; with
    `outside_p` > 0 the rounds go on outside it on the paper's low-budget graph, each site pulling
    from one random peer with that probability) or 'none' (no gossip during training). No round
    falls in the first `start_after` steps."""

    kind: str
    total_steps: int
    every: int = 1
    steps: frozenset[int] = frozenset()
    window: tuple[int, int] = (0, 0)
    final_merge: bool = False
    outside_p: float = 0.0
    start_after: int = 0

    @classmethod
    def from_config(cls, config: GossipConfig, total_steps: int, seed: int = 0) -> GossipSchedule:
        """The round-count schedules (uniform, two-stage, cosine, cosine-random) become explicit step lists."""
        fixed = {
            "uniform": lambda: uniform_steps(total_steps, config.rounds),
            "two-stage": lambda: two_stage_steps(total_steps, config.rounds, config.stage_split, config.early_share),
            "cosine": lambda: cosine_steps(total_steps, config.rounds, config.warmup_fraction),
            "cosine-random": lambda: cosine_random_steps(total_steps, config.rounds, config.warmup_fraction, seed),
        }
        if config.schedule in fixed:
            steps = frozenset(fixed[config.schedule]())
            return cls(
                "steps", total_steps, steps=steps, final_merge=config.final_merge != "none",
                start_after=config.start_after,
            )  # fmt: skip
        return cls(
            config.schedule,
            total_steps,
            config.every,
            frozenset(config.steps),
            (config.window_start, config.window_end),
            config.final_merge != "none",
            config.outside_window_p,
            config.start_after,
        )

    def gossips_at(self, step: int) -> bool:
        """No round in the first `start_after` steps (a pre-training phase); `every` counts from its end."""
        if step <= self.start_after:
            return False
        if self.kind == "every":
            return (step - self.start_after) % self.every == 0
        if self.kind == "steps":
            return step in self.steps
        if self.kind == "window":
            return step % self.every == 0 and (self.outside_p > 0 or self.in_window(step))
        return False

    def in_window(self, step: int) -> bool:
        """Whether `step` gossips on the configured graph (outside a window: the low-budget one)."""
        return self.kind != "window" or self.window[0] <= step <= self.window[1]

    def merges_globally_at(self, step: int) -> bool:
        return self.final_merge and step == self.total_steps

    def rounds_until(self, step: int) -> int:
        """How many gossip rounds happen in steps 1..step; round r uses index r - 1 for its graph."""
        if self.kind == "every":
            return max(0, step - self.start_after) // self.every
        return sum(1 for t in range(1, step + 1) if self.gossips_at(t))

    def communication_steps(self) -> list[int]:
        """Every step at which parameters are exchanged (gossip or the global merge)."""
        return [t for t in range(1, self.total_steps + 1) if self.gossips_at(t) or self.merges_globally_at(t)]
