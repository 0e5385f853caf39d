"""The Python API: build, run and read experiments from scripts and notebooks.

import gossiplab
result = gossiplab.run("ring", ["train.steps=300"])
result.final["mmga"], result.metrics["ala"], result.accuracy_matrix, result.plots, result.to_frame()
frame = gossiplab.load_runs(["sweeps/lr"])  # every run of a sweep, one tidy frame
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gossiplab.assembly import Experiment
from gossiplab.callbacks import Callback
from gossiplab.catalogue import build_config, validate
from gossiplab.config import Config, ConfigError, apply_values, parse_override, read_run_config
from gossiplab.registry import LOSSES, qualified_name
from gossiplab.report import Plots
from gossiplab.rundir import read_metrics, read_summary
from gossiplab.runfolder import RunFolder
from gossiplab.runner import Runner
from gossiplab.safeload import load_tensors


@dataclass
class Result:
    """A finished run read back from its directory."""

    run_dir: Path
    config: Config
    summary: dict[str, Any]
    rows: list[dict[str, Any]]

    @classmethod
    def load(cls, run_dir: str | Path) -> Result:
        folder = RunFolder(Path(run_dir))
        rows = read_metrics(folder.metrics)
        summary = read_summary(folder.path)
        return cls(folder.path, read_run_config(folder.config), summary, rows)

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
        """A[i, j]: site i's final model on site j's test set (beyond 1,024 sites, over the 256
        sites summary["accuracy_matrix_sites"] names)."""
        return torch.tensor(self.summary["accuracy_matrix"])

    @property
    def plots(self) -> list[Path]:
        """The run's PNG plots (accuracy, consensus, accuracy matrix, topology, mixing, ...)."""
        return sorted(self.run_dir.glob("*.png"))

    def accuracy_matrices(self) -> dict[int, torch.Tensor]:
        """step -> A[i, j] at every evaluation (model i on site j's test set)."""
        files = sorted(RunFolder(self.run_dir).accuracy_matrices.glob("step-*.pt"))
        return {int(f.stem.removeprefix("step-")): load_tensors(f, "accuracy matrix") for f in files}

    def to_frame(self) -> Any:
        """The metrics as a pandas DataFrame, one row per evaluation and one column per metric; the
        per-site columns (local_accuracy, site_train_loss) hold lists. Needs the `frames` extra."""
        return _pandas("Result.to_frame").DataFrame(self.rows).set_index("step")


def _pandas(what: str) -> Any:
    try:
        import pandas
    except ImportError as error:
        raise ImportError(f"{what} needs pandas: pip install 'gossiplab[frames]'") from error
    return pandas


def load_runs(paths: str | Path | list[str | Path]) -> Any:
    """Every finished run under `paths` (run folders and sweep folders) as one tidy pandas frame:
    a row per (run, evaluation step, metric) with columns run, seed, the config keys that differ
    between the runs, step, metric and value; unfinished runs are left out with a warning. For
    example `frame[frame.metric == "mmga"].groupby(["train.lr", "step"]).value.mean()`. Needs the
    `frames` extra (`gossiplab compare --csv` writes the same table without it)."""
    import warnings

    from gossiplab.compare import find_runs, tidy_rows

    pandas = _pandas("load_runs")
    folders = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    return pandas.DataFrame(tidy_rows(find_runs(folders, warn=lambda text: warnings.warn(text, stacklevel=3))))


def run(
    config: Config | str = "default",
    overrides: list[str] | None = None,
    *,
    run_dir: str | Path | None = None,
    experiment: Experiment | None = None,
    on_evaluation: Callable[[Runner, dict[str, Any]], None] | None = None,
    on_step: Callable[[Runner], None] | None = None,
    callbacks: list[Callback] | None = None,
    progress: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Result:
    """Run a preset (by name) or a Config, with key=value overrides, into `run_dir`
    (default runs/NAME-TIME). `experiment` runs parts built with `build_experiment` and swapped;
    its own config is the run's, so overrides (which could not reach parts already built) and a
    different config are refused. `on_step(runner)`, `on_evaluation(runner, row)` and
    `callbacks` (gossiplab.callbacks.Callback) act during the run. `loss_fn(logits, targets)`
    (the batch's mean loss) replaces cross-entropy: it is registered under its qualified name,
    which the run's config.toml records as `train.loss`."""
    if loss_fn is not None:
        if experiment is not None:
            raise ConfigError("`loss_fn` would not reach a pre-built experiment: set train.loss before building it")
        name = qualified_name(loss_fn)
        LOSSES.register(name, loss_fn, origin=loss_fn.__module__)
        overrides = [*(overrides or []), f"train.loss={name}"]
    if experiment is not None:
        if overrides:
            raise ConfigError(
                f"overrides {overrides} would not reach the parts of a pre-built experiment: apply them to the "
                "config before build_experiment(config), or run without `experiment`"
            )
        if not isinstance(config, str) and config is not experiment.config and config != experiment.config:
            raise ConfigError("`config` differs from the pre-built experiment's config; pass only the experiment")
        config = experiment.config
    elif isinstance(config, str):
        config = build_config(config, overrides)
    else:
        config = copy.deepcopy(config)
        apply_values(config, dict(parse_override(o) for o in overrides or []))
        validate(config)
    target = (
        Path(run_dir) if run_dir else Path("runs") / f"{config.name.replace('/', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    target.mkdir(parents=True, exist_ok=True)
    runner = Runner(config, target, show_progress=progress, experiment=experiment)
    runner.run(on_evaluation=on_evaluation, on_step=on_step, callbacks=[Plots(), *(callbacks or [])])
    return Result.load(target)
