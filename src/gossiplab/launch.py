"""What a launcher (torchrun, an srun wrapper) told this process, read from its environment alone,
so the command line can ask before importing PyTorch."""

from __future__ import annotations

import os
from pathlib import Path

from gossiplab.runfolder import RunFolder


def launched_distributed() -> bool:
    """True when a launcher (torchrun, srun wrappers) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_of_process() -> int:
    """This process's rank in a distributed run (0 in simulation)."""
    return int(os.environ.get("RANK", "0")) if launched_distributed() else 0


def relaunched_by_torchrun(run_dir: Path | None) -> bool:
    """True for a worker torchrun restarted (`--max-restarts`) into a run directory its earlier
    attempt already started: the same command must then continue that run from its checkpoints."""
    if not launched_distributed() or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return False
    if run_dir is None:
        return False
    rank, folder = rank_of_process(), RunFolder(run_dir)
    return (folder.config if rank == 0 else folder.rank_config(rank)).is_file()
