"""What a run does around the loop, as callbacks: the progress bar and warnings, metrics.jsonl and
the accuracy matrices, TensorBoard, checkpoints, the files of the final merge, and a user's own
`on_step` / `on_evaluation`.

A callback sees what the loop sees, the experiment and the training state (`gossiplab.state`):
at every step, after every gossip round (its graph and the W delivered), at every evaluation with
the metrics row, before the final merge, when sites are dropped, at the start and end of the
loop, and with the summary of a finished run (the plots and the HTML report are such a callback,
`gossiplab.report.Plots`, added by the API and the command line: the loop's layer draws nothing).
Callbacks that write files are given their paths by the runner (`gossiplab.runfolder.RunFolder`)
and are made only in the process that writes them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gossiplab.algorithms import restore, saved
from gossiplab.rundir import atomic_save, atomic_write, drop_fallback, write_checkpoint
from gossiplab.runfolder import RunFolder

if TYPE_CHECKING:
    from gossiplab.assembly import Experiment
    from gossiplab.runner import Runner
    from gossiplab.state import TrainingState


class Callback:
    """Hooks around the loop; subclass and override the ones you need (each does nothing here)."""

    def on_start(self, experiment: Experiment, state: TrainingState) -> None:
        """Before the first step of this process's loop (also after a resume)."""

    def on_step(self, experiment: Experiment, state: TrainingState) -> None:
        """After every step (local update and any communication)."""

    def on_gossip(
        self, experiment: Experiment, state: TrainingState, adjacency: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """After every gossip round: its graph and the mixing matrix the network delivered."""

    def on_evaluation(
        self, experiment: Experiment, state: TrainingState, row: dict[str, Any], matrix: torch.Tensor
    ) -> None:
        """After every evaluation: the metrics row and the accuracy matrix A[i, j] (over every site
        up to 1,024 sites, else over `metrics.matrix_sites`)."""

    def on_final_merge(self, experiment: Experiment, state: TrainingState, row: dict[str, Any]) -> None:
        """Just before the single global merge (gossip.final_merge), with the metrics row of the
        models it is about to merge."""

    def on_sites_dropped(self, experiment: Experiment, state: TrainingState, message: str) -> None:
        """Sites diverged and train.on_divergence = 'drop' took them out (`state.active`)."""

    def on_end(self, experiment: Experiment, state: TrainingState) -> None:
        """When the loop stops, finished or not."""

    def on_finish(self, experiment: Experiment, state: TrainingState, summary: dict[str, Any]) -> None:
        """After a finished run's summary is complete, before summary.json marks the run finished
        (in the process that writes the run directory)."""


class MetricsLog(Callback):
    """metrics.jsonl, one row per evaluation, flushed to disk; the accuracy matrix of every
    evaluation as accuracy_matrices/step-NNNNNNN.pt."""

    def __init__(self, folder: RunFolder):
        self.folder = folder

    def on_evaluation(
        self, experiment: Experiment, state: TrainingState, row: dict[str, Any], matrix: torch.Tensor
    ) -> None:
        with open(self.folder.metrics, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        path = self.folder.accuracy_matrix(row["step"])
        path.parent.mkdir(exist_ok=True)
        atomic_save(matrix.clone(), path)


class TensorBoardLog(Callback):
    """Every scalar of the metrics rows under gossiplab/ in RUN/tensorboard."""

    def __init__(self, folder: RunFolder):
        self.folder = folder

    def on_start(self, experiment: Experiment, state: TrainingState) -> None:
        from tensorboardX import SummaryWriter

        # purge_step drops events logged after the checkpoint by a run that was killed
        self.writer = SummaryWriter(str(self.folder.tensorboard), purge_step=state.step or None)

    def on_evaluation(
        self, experiment: Experiment, state: TrainingState, row: dict[str, Any], matrix: torch.Tensor
    ) -> None:
        for key, value in row.items():
            if isinstance(value, int | float) and key != "step":
                self.writer.add_scalar(f"gossiplab/{key}", value, state.step)
        self.writer.flush()

    def on_end(self, experiment: Experiment, state: TrainingState) -> None:
        self.writer.close()


class Checkpoints(Callback):
    """A verified checkpoint of this process at every evaluation: the training state and every
    part's own (theta with the sites' random streams, the optimizer's buffers, the states of the
    algorithm and the gradient transforms, the network's clock and churn) and the config that ran
    (a resume under another config is refused). `step` is the step of the last one written (-1: none yet)."""

    def __init__(self, path: Path, config: dict[str, Any]):
        self.path, self.config, self.step = path, config, -1

    def on_evaluation(
        self, experiment: Experiment, state: TrainingState, row: dict[str, Any], matrix: torch.Tensor
    ) -> None:
        self.save(experiment, state)

    def save(self, experiment: Experiment, state: TrainingState) -> None:
        """Write this step's checkpoint (the previous one is kept as the fallback)."""
        content = {
            **state.state_dict(),
            "network": experiment.network.state_dict(),
            "theta": experiment.population.theta,
            "random_streams": experiment.population.random_streams,
            "optimizer": experiment.optimizer.state_dict(),
            "algorithm": saved(experiment.state),
            "gradient_transforms": [saved(state) for state in experiment.transform_states],
            "config": self.config,
        }
        write_checkpoint(content, self.path)
        self.step = state.step

    def on_end(self, experiment: Experiment, state: TrainingState) -> None:
        if self.step == state.step == experiment.config.train.steps:  # finished, its last step saved
            drop_fallback(self.path)

    @staticmethod
    def restore(experiment: Experiment, state: TrainingState, content: dict[str, Any], vector_bytes: int) -> None:
        """Put a checkpoint's content back into the parts and the training state."""
        state.load_state_dict(content, vector_bytes)
        if "network" in content:  # written before gossiplab simulated networks (2026-12-06): all online, no clock
            experiment.network.load_state_dict(content["network"])
        experiment.population.theta.copy_(content["theta"])
        experiment.population.random_streams.copy_(content["random_streams"])
        experiment.optimizer.load_state_dict(content["optimizer"])
        restore(experiment.state, content["algorithm"])
        for state, written in zip(experiment.transform_states, content.get("gradient_transforms", []), strict=False):
            restore(state, written)


class LastEvaluation(Callback):
    """The accuracy matrix of the last evaluation this process ran (the summary's)."""

    def __init__(self) -> None:
        self.matrix: torch.Tensor | None = None

    def on_evaluation(
        self, experiment: Experiment, state: TrainingState, row: dict[str, Any], matrix: torch.Tensor
    ) -> None:
        self.matrix = matrix


class FinalMergeFiles(Callback):
    """Before the final global merge: this process's rows of theta as premerge.pt (its own
    file, `theta`), and the metrics just before the merge as premerge.json (`metrics`, given
    to the process that writes the run directory)."""

    def __init__(self, theta: Path, metrics: Path | None):
        self.theta, self.metrics = theta, metrics

    def on_final_merge(self, experiment: Experiment, state: TrainingState, row: dict[str, Any]) -> None:
        atomic_save(experiment.population.theta, self.theta)
        if self.metrics is not None:
            before = {k: v for k, v in row.items() if k != "local_accuracy"}
            atomic_write(self.metrics, json.dumps(before).encode())


class ProgressBar(Callback):
    """A rich progress bar with the latest ALA / AGA / MMGA, and the run's warnings (dropped sites)
    on its console, shown even when the bar is not."""

    def __init__(self, console: Any, description: str, enabled: bool):
        self.console = console
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

    def on_start(self, experiment: Experiment, state: TrainingState) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=experiment.config.train.steps, status="")
        self.progress.update(self.task, completed=state.step)

    def on_step(self, experiment: Experiment, state: TrainingState) -> None:
        self.progress.update(self.task, completed=state.step)

    def on_evaluation(
        self, experiment: Experiment, state: TrainingState, row: dict[str, Any], matrix: torch.Tensor
    ) -> None:
        self.progress.update(self.task, status=f"ALA {row['ala']:.3f}  AGA {row['aga']:.3f}  MMGA {row['mmga']:.3f}")

    def on_sites_dropped(self, experiment: Experiment, state: TrainingState, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {escape(message)}")

    def on_end(self, experiment: Experiment, state: TrainingState) -> None:
        self.progress.stop()


class Hooks(Callback):
    """A user's functions: on_step(runner) after every step, on_evaluation(runner, row) after
    every evaluation (the row as written to metrics.jsonl), given the Runner (`runner.step`,
    `runner.state`, `runner.experiment`)."""

    def __init__(
        self,
        runner: Runner,
        on_step: Callable[[Runner], None] | None = None,
        on_evaluation: Callable[[Runner, dict[str, Any]], None] | None = None,
    ):
        self.runner, self.step_hook, self.evaluation_hook = runner, on_step, on_evaluation

    def on_step(self, experiment: Experiment, state: TrainingState) -> None:
        if self.step_hook is not None:
            self.step_hook(self.runner)

    def on_evaluation(
        self, experiment: Experiment, state: TrainingState, row: dict[str, Any], matrix: torch.Tensor
    ) -> None:
        if self.evaluation_hook is not None:
            self.evaluation_hook(self.runner, row)
