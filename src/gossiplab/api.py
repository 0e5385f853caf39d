"""The Python API: build, run and read experiments from scripts and notebooks.

import gossiplab
result = gossiplab.run("ring", ["train.steps=300"])
result.final["mmga"], result.metrics["ala"], result.accuracy_matrix, result.plots
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gossiplab.config import Config, apply_values, build_config, parse_override, validate
from gossiplab.rundir import read_metrics, read_summary
from gossiplab.runner import Experiment, Runner


@dataclass
class Result:
    """A finished run read back from its directory."""

    run_dir: Path
    config: Config
    summary: dict[str, Any]
    rows: list[dict[str, Any]]

    @classmethod
    def load(cls, run_dir: str | Path) -> Result:
        run_dir = Path(run_dir)
        rows = read_metrics(run_dir / "metrics.jsonl")
        summary = read_summary(run_dir)
        return cls(run_dir, build_config(path=run_dir / "config.toml"), summary, rows)

    @property
    def final(self) -> dict[str, Any]:
        """The final metrics (ALA, AGA, MMGA, gossip_gain, consensus_distance, bytes_sent, ...)."""
        return self.summary

    @property
    def metrics(self) -> dict[str, list[Any]]:
        """The metrics table as columns: name -> one value per evaluation (`step` is a column)."""
        return {key: [row.get(key) for row in self.rows] for key in self.rows[0]}

    @property
    def accuracy_matrix(self) -> torch.Tensor:
        """A[i, j]: site i's final model on site j's test set."""
        return torch.tensor(self.summary["accuracy_matrix"])

    @property
    def plots(self) -> list[Path]:
        return sorted(self.run_dir.glob("*.png"))


def run(
    config: Config | str = "default",
    overrides: list[str] | None = None,
    *,
    run_dir: str | Path | None = None,
    experiment: Experiment | None = None,
    on_evaluation: Callable[[Runner, dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> Result:
    """Run a preset (by name) or a Config, with key=value overrides, into `run_dir`
    (default runs/NAME-TIME); `experiment` swaps in parts built with `build_experiment`."""
    if isinstance(config, str):
        config = build_config(config, overrides)
    else:
        config = copy.deepcopy(config)
        apply_values(config, dict(parse_override(o) for o in overrides or []))
        validate(config)
    target = (
        Path(run_dir) if run_dir else Path("runs") / f"{config.name.replace('/', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    target.mkdir(parents=True, exist_ok=True)
    Runner(config, target, show_progress=progress, experiment=experiment).run(on_evaluation=on_evaluation)
    return Result.load(target)
