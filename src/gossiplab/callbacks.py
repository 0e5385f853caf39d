"""What a run does around the loop, as callbacks: the progress bar, metrics.jsonl and the
accuracy matrices, TensorBoard, checkpoints, and a user's own `on_step` / `on_evaluation`.

A callback gets the Runner (its `step`, `experiment`, `run_dir`, `comm`) at every step, at every
evaluation with the metrics row, at the start and end of the loop, and with the summary of a
finished run (the plots and the HTML report are such a callback, `gossiplab.report.Plots`, added
by the API and the command line: the loop's layer draws nothing). Only the process that
writes the run directory (`runner.comm.writes`) writes files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gossiplab.rundir import atomic_save

if TYPE_CHECKING:
    from gossiplab.runner import Runner

ACCURACY_MATRICES = "accuracy_matrices"


class Callback:
    """Hooks around the loop; subclass and override the ones you need (each does nothing here)."""

    def on_start(self, runner: Runner) -> None:
        """Before the first step of this process's loop (also after a resume)."""

    def on_step(self, runner: Runner) -> None:
        """After every step (local update and any communication)."""

    def on_evaluation(self, runner: Runner, row: dict[str, Any], matrix: torch.Tensor) -> None:
        """After every evaluation: the metrics row and the accuracy matrix A[i, j] (over every site
        up to 1,024 sites, else over `metrics.matrix_sites`)."""

    def on_end(self, runner: Runner) -> None:
        """When the loop stops, finished or not."""

    def on_finish(self, runner: Runner, summary: dict[str, Any]) -> None:
        """After a finished run's summary is complete, before summary.json marks the run finished
        (in the process that writes the run directory)."""


def matrix_path(run_dir: Path, step: int) -> Path:
    return run_dir / ACCURACY_MATRICES / f"step-{step:07d}.pt"


class MetricsLog(Callback):
    """metrics.jsonl, one row per evaluation, flushed to disk; the accuracy matrix of every
    evaluation as accuracy_matrices/step-NNNNNNN.pt."""

    def on_evaluation(self, runner: Runner, row: dict[str, Any], matrix: torch.Tensor) -> None:
        if not runner.comm.writes:
            return
        with open(runner.metrics_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        path = matrix_path(runner.run_dir, row["step"])
        path.parent.mkdir(exist_ok=True)
        atomic_save(matrix.clone(), path)


class TensorBoardLog(Callback):
    """Every scalar of the metrics rows under gossiplab/ in RUN/tensorboard."""

    def on_start(self, runner: Runner) -> None:
        from tensorboardX import SummaryWriter

        # purge_step drops events logged after the checkpoint by a run that was killed
        self.writer = SummaryWriter(str(runner.run_dir / "tensorboard"), purge_step=runner.step or None)

    def on_evaluation(self, runner: Runner, row: dict[str, Any], matrix: torch.Tensor) -> None:
        for key, value in row.items():
            if isinstance(value, int | float) and key != "step":
                self.writer.add_scalar(f"gossiplab/{key}", value, runner.step)
        self.writer.flush()

    def on_end(self, runner: Runner) -> None:
        self.writer.close()


class Checkpoints(Callback):
    """A verified checkpoint at every evaluation (`Runner.save_checkpoint`)."""

    def on_evaluation(self, runner: Runner, row: dict[str, Any], matrix: torch.Tensor) -> None:
        runner.save_checkpoint()


class ProgressBar(Callback):
    """A rich progress bar with the latest ALA / AGA / MMGA."""

    def __init__(self, console: Any, description: str, enabled: bool):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.description = description
        self.task: Any = None

    def on_start(self, runner: Runner) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=runner.config.train.steps, status="")
        self.progress.update(self.task, completed=runner.step)

    def on_step(self, runner: Runner) -> None:
        self.progress.update(self.task, completed=runner.step)

    def on_evaluation(self, runner: Runner, row: dict[str, Any], matrix: torch.Tensor) -> None:
        self.progress.update(self.task, status=f"ALA {row['ala']:.3f}  AGA {row['aga']:.3f}  MMGA {row['mmga']:.3f}")

    def on_end(self, runner: Runner) -> None:
        self.progress.stop()


class Hooks(Callback):
    """A user's functions: on_step(runner) after every step, on_evaluation(runner, row) after
    every evaluation (the row as written to metrics.jsonl)."""

    def __init__(
        self,
        on_step: Callable[[Runner], None] | None = None,
        on_evaluation: Callable[[Runner, dict[str, Any]], None] | None = None,
    ):
        self.step_hook, self.evaluation_hook = on_step, on_evaluation

    def on_step(self, runner: Runner) -> None:
        if self.step_hook is not None:
            self.step_hook(runner)

    def on_evaluation(self, runner: Runner, row: dict[str, Any], matrix: torch.Tensor) -> None:
        if self.evaluation_hook is not None:
            self.evaluation_hook(runner, row)
