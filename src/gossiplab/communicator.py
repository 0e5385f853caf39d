"""How an algorithm reaches the other sites' rows: the communicator protocol (DESIGN section 7).

The loop, the evaluation and every algorithm talk only to this protocol, so one algorithm code
serves the simulation and the multi-process runtime:
- `SingleProcess` (here): the N sites are all in this process; a gossip round is the merge
  operator on the whole [N, P] tensor.
- `gossiplab.distributed.ProcessGroup`: process r holds the block `sites` of the rows and `mix`
  exchanges exactly the rows W needs (torch.distributed).
A user's own communicator (another transport, a simulated network) implements the same members.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


class PeerLost(RuntimeError):
    """Processes of the run were lost; `lost_sites` are the sites they held."""

    def __init__(self, message: str, lost_sites: list[int]):
        super().__init__(message)
        self.lost_sites = lost_sites


@runtime_checkable
class Communicator(Protocol):
    """Where the sites' rows live and how they meet.

    `sites` is this process's block of the N sites (its rows of theta); `writes` says whether this
    process writes the run directory; `failures` are the errors `recover` can turn into a `PeerLost`.
    """

    rank: int
    world_size: int
    writes: bool
    num_sites: int
    sites: slice
    bytes_sent: int
    failures: tuple[type[Exception], ...]

    def mix(self, theta: torch.Tensor, weights: torch.Tensor, operator: Callable) -> int:
        """theta <- W theta for this process's rows, by `operator(rows, weights)`, in place; returns
        the bytes this process sent."""
        ...

    def gather(self, rows: torch.Tensor, payload: bool = False) -> torch.Tensor:
        """Per-site rows [N_r, ...] of every process stacked in site order: [N, ...]. `payload`:
        they are gossip messages (CHOCO's compressed ones), their bytes counted in `bytes_sent`."""
        ...

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over processes."""
        ...

    def own_folder(self, run_dir: Path) -> Path | None:
        """Where this process keeps the files only it writes (its checkpoints), if not in run_dir
        itself (`gossiplab.runfolder.RunFolder`)."""
        ...

    def share(self, key: str, value: str) -> str:
        """Rank 0's `value`, seen by every process."""
        ...

    def agree_on_step(self, steps: list[int]) -> int:
        """The latest checkpoint step every process holds, of this process's `steps`."""
        ...

    def recover(self, error: Exception) -> PeerLost:
        """After one of `failures`: what was lost (the survivors go on), or raise PeerLost to stop."""
        ...

    def close(self, together: bool = True) -> None:
        """Leave the group (`together`: after the others finished too)."""
        ...


class SingleProcess:
    """All sites in this process: the simulation."""

    rank = 0
    world_size = 1
    writes = True  # this process writes metrics, summary and plots
    bytes_sent = 0
    failures: tuple[type[Exception], ...] = ()  # nothing to recover from

    def __init__(self, num_sites: int):
        self.num_sites = num_sites
        self.sites = slice(0, num_sites)

    def mix(self, theta: torch.Tensor, weights: torch.Tensor, operator: Callable) -> int:
        operator(theta, weights)
        return 0

    def gather(self, rows: torch.Tensor, payload: bool = False) -> torch.Tensor:
        return rows

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def own_folder(self, run_dir: Path) -> Path | None:
        return None

    def share(self, key: str, value: str) -> str:
        return value

    def agree_on_step(self, steps: list[int]) -> int:
        return steps[0]

    def recover(self, error: Exception) -> PeerLost:
        raise error

    def close(self, together: bool = True) -> None:
        pass
