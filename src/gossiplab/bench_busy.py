"""`gossiplab bench --busy`: the default's training step (the 16-site MLP, B = 32 per site) on an
idle machine and on one where another process keeps a core busy, with libgomp's stock spin count
(GOMP_SPINCOUNT unset: 300,000) and with the 1,000 that gossiplab sets (see gossiplab/__init__.py).

libgomp reads its spin count when it loads, so every measurement is a fresh process; they are
interleaved (spin counts alternate within each repeat, the busy process starts and stops around
its half) and the median over repeats is reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from gossiplab import OPENMP_SPIN_COUNT

SITES = 16
STEP = """
import json, sys, torch
from gossiplab.bench import BATCH, MODELS, engine, timed
shape, model_config, train = MODELS["mlp"]
from gossiplab.models import build_model
module = build_model(model_config, shape, 10)
generator = torch.Generator().manual_seed(0)
x = torch.randn({sites}, BATCH, *shape, generator=generator)
y = torch.randint(0, 10, ({sites}, BATCH), generator=generator)
_, step, _, _ = engine(module, {sites}, train, "auto", torch.device("cpu"))
print(json.dumps({{"steps_per_s": 1 / timed(lambda: step(x, y), {seconds}), "threads": torch.get_num_threads()}}))
"""


def steps_per_second(spin_count: str | None, seconds: float) -> dict:
    """One fresh process's engine steps/s with this spin count (None: libgomp's own default)."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}  # the step imports torch first:
    env.update({"GOMP_SPINCOUNT": spin_count} if spin_count else {})  # unset, libgomp keeps its default
    code = STEP.format(sites=SITES, seconds=seconds)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(repeats: int, seconds: float) -> list[dict]:
    """Rows (machine idle / one core busy): median steps/s with libgomp's and gossiplab's spin count."""
    samples: dict[tuple[bool, str | None], list[float]] = {}
    threads = 0
    for _ in range(repeats):
        for busy in (False, True):
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                for spin_count in (None, OPENMP_SPIN_COUNT):
                    result = steps_per_second(spin_count, seconds)
                    threads = result["threads"]
                    samples.setdefault((busy, spin_count), []).append(result["steps_per_s"])
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    rows = []
    for busy in (False, True):
        stock, ours = (statistics.median(samples[busy, spin]) for spin in (None, OPENMP_SPIN_COUNT))
        rows.append({"busy_core": busy, "threads": threads, "cores": os.cpu_count(),
                     "stock_steps_per_s": stock, "gossiplab_steps_per_s": ours})  # fmt: skip
    return rows
