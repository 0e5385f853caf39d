"""`gossiplab bench --network`: what the simulated network costs a training step.

The default experiment (MLP, B = 32 per site) at N sites, gossiping at every step (the worst case
for per-round costs), run through the real loop in five variants: synchronous and reliable (the
plain loop), with churn and message loss, CHOCO-SGD with top-10% compression, both, and a tick of
AD-PSGD (over a ring, plain SGD; every site's gradient at its read, the exchanges ending in the
tick applied in time order). Each is timed over the same steps after a warm-up, without the
evaluations; the variants alternate within each repeat, so that machine noise hits all alike, and
the median over repeats is reported with its ratio to the synchronous loop measured in the same
repeat sequence.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from gossiplab.catalogue import build_config
from gossiplab.runner import Runner

WARMUP_STEPS = 5
CHURN_AND_LOSS = ["network.churn_leave=0.01", "network.churn_return=0.05", "network.message_loss=0.5"]
VARIANTS = {
    "synchronous": [],
    "churn + loss": CHURN_AND_LOSS,
    "CHOCO top-10%": ["gossip.algorithm=choco-sgd"],
    "CHOCO + churn + loss": ["gossip.algorithm=choco-sgd", *CHURN_AND_LOSS],
    "AD-PSGD tick": ["gossip.algorithm=ad-psgd", "gossip.topology=ring", "train.momentum=0"],
}


def seconds_per_step(overrides: list[str], steps: int) -> float:
    """Seconds per training step of one short run, from the end of the warm-up to the last step."""
    config = build_config("default", overrides)
    marks: dict[int, float] = {}

    def mark(runner: Runner) -> None:
        if runner.step in (WARMUP_STEPS, steps):
            marks[runner.step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as folder:
        quiet = Console(file=io.StringIO())
        Runner(config, Path(folder) / "run", console=quiet, show_progress=False).run(on_step=mark)
    return (marks[steps] - marks[WARMUP_STEPS]) / (steps - WARMUP_STEPS)


def run(sites: list[int], steps: int, repeats: int) -> list[dict[str, Any]]:
    """One row per number of sites: each variant's steps/s and its ratio to the synchronous loop."""
    rows = []
    for count in sites:
        common = [f"num_sites={count}", f"train.steps={steps}", f"eval.every={steps}", "gossip.every=1",
                  "data.partition=iid", "network.compute_spread=0.5"]  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(repeats):
            for name, extra in VARIANTS.items():
                times[name].append(seconds_per_step([*common, *extra], steps))
        synchronous = statistics.median(times["synchronous"])
        row: dict[str, Any] = {"sites": count}
        for name in VARIANTS:
            median = statistics.median(times[name])
            row[name] = {"steps_per_s": 1 / median, "vs_synchronous": synchronous / median}
        rows.append(row)
    return rows
