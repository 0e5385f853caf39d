"""Shared by the algorithm tests: stop a run at an evaluation, then resume it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gossiplab.config import Config
from gossiplab.runner import RunInterrupted, Runner


def stopped_then_resumed(config: Config, run_dir: Path, stop_step: int) -> Runner:
    """Run until the evaluation at `stop_step`, stop there (as Ctrl-C does), resume to the end."""
    run_dir.mkdir()

    def stop(runner: Runner, row: dict) -> None:
        if row["step"] == stop_step:
            runner.request_stop()

    with pytest.raises(RunInterrupted):
        Runner(config, run_dir, show_progress=False).run(on_evaluation=stop)
    resumed = Runner(config, run_dir, resume=True, show_progress=False)
    resumed.run()
    return resumed
