"""The file names of a run directory, in one place (no PyTorch: the command line asks about a
run directory before it imports PyTorch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFolder:
    """The file names of a run directory, in one place. `own` is where this process keeps the
    files only it writes (its checkpoints, premerge.pt, a copy of the config): rank<r>/ in the
    directory for a process of a run of several, else (None) the directory itself."""

    path: Path
    own_folder: Path | None = None

    @property
    def own(self) -> Path:
        """The folder of this process's own files."""
        return self.own_folder or self.path

    @property
    def config(self) -> Path:
        """The config that ran, naming its parts (re-runnable)."""
        return self.path / "config.toml"

    @property
    def metrics(self) -> Path:
        """One JSON row per evaluation."""
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        """The final metrics and the run's record; its `status` says whether the run finished."""
        return self.path / "summary.json"

    @property
    def accuracy_matrices(self) -> Path:
        """The accuracy matrix of every evaluation, step-NNNNNNN.pt."""
        return self.path / "accuracy_matrices"

    def accuracy_matrix(self, step: int) -> Path:
        """The accuracy matrix of the evaluation at `step`."""
        return self.accuracy_matrices / f"step-{step:07d}.pt"

    @property
    def premerge_metrics(self) -> Path:
        """The metrics just before the final global merge."""
        return self.path / "premerge.json"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's event files (eval.tensorboard)."""
        return self.path / "tensorboard"

    @property
    def report(self) -> Path:
        """The self-contained HTML report, its plots inlined (the PNG files beside it)."""
        return self.path / "report.html"

    def holds_a_run(self) -> bool:
        """Whether a run wrote here (its config, summary or metrics): a folder for other outputs
        must not be one, whose files they would overwrite or mix with."""
        return any(path.exists() for path in (self.config, self.summary, self.metrics))

    def rank_config(self, rank: int) -> Path:
        """The copy of config.toml that process `rank` > 0 of a run of several resumes from."""
        return self.path / f"rank{rank}" / "config.toml"

    @property
    def checkpoint(self) -> Path:
        """This process's newest checkpoint (the one before it beside it, `PREVIOUS`)."""
        return self.own / "checkpoint.pt"

    @property
    def premerge_theta(self) -> Path:
        """This process's rows of theta just before the final global merge."""
        return self.own / "premerge.pt"

    @property
    def own_config(self) -> Path:
        """This process's copy of config.toml (a process of several resumes from it)."""
        return self.own / "config.toml"
