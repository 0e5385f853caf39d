"""Where the sites live: all in this process (simulation) or in blocks across processes (DESIGN section 7).

The runner trains, mixes and evaluates through a communicator, so one algorithm code serves both:
- `SingleProcess`: the N sites are all here; gossip is the merge operator on the whole [N, P] tensor.
- `ProcessGroup`: `torchrun --nproc-per-node K -m gossiplab run ...` (or any launcher that sets
  RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Process r owns the contiguous block r of the sites
  (`torch.tensor_split`, sizes differ by at most one) as its own [N_r, P] population, trained
  vectorized as in simulation. Every process derives the same topology and W from the shared seed;
  for a gossip round theta_i <- sum_j W_ij theta_j (i in its block) it needs only the rows j with
  W_ij != 0, so it receives exactly those (point-to-point) and sends each peer exactly the rows
  that peer needs. When every process needs every other process's whole block (a dense W), one
  all_gather moves the same bytes in fewer messages. The process then mixes its extended block
  (own rows and received rows, in global site order) with the run's merge operator, so a sparse
  round sums in the same order as the simulation.

Faults: a process that dies is detected by its peers' failing sends/receives (or the group timeout);
process 0, which writes the run directory, compares heartbeat counters in the rendezvous store to
name the lost processes, and the survivors form a new group. The runner then rolls back to the last
checkpoint and drops the lost sites from W (rows renormalised), or stops (`distributed.on_failure`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from gossiplab.config import Config, ConfigError, flatten

HEARTBEAT_S = 0.5  # how often each process bumps its heartbeat counter in the store
DISTRIBUTED_MIXING = ("uniform", "metropolis")  # rules computed from the topology alone
DISTRIBUTED_MERGES = ("average",)


class ExchangeFailed(RuntimeError):
    """A send, receive or collective with the other processes failed or timed out."""


def exchange(method: Callable) -> Callable:
    """gloo reports a lost peer (connection reset, timeout) as a bare RuntimeError: name it."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except RuntimeError as error:
            raise ExchangeFailed(str(error)) from error

    return wrapped


class ResumeError(ValueError):
    """The processes' checkpoints do not share a step to resume from; nothing was changed."""


class PeerLost(RuntimeError):
    """Processes of the run were lost; `lost_sites` are the sites they held."""

    def __init__(self, message: str, lost_sites: list[int]):
        super().__init__(message)
        self.lost_sites = lost_sites


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
        """theta <- W theta by the merge operator; returns the bytes this process sent (none)."""
        operator(theta, weights)
        return 0

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-site rows [N_r, ...] of every process stacked in site order: [N, ...]."""
        return rows

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over processes (here: the value)."""
        return value

    def rank_file(self, run_dir: Path, name: str) -> Path:
        """Where this process keeps its own file `name` (checkpoints): the run directory."""
        return run_dir / name

    def share(self, key: str, value: str) -> str:
        """Rank 0's `value`, seen by every process."""
        return value

    def agree_on_step(self, steps: list[int]) -> int:
        return steps[0]

    def recover(self, error: Exception) -> PeerLost:
        raise error

    def close(self, together: bool = True) -> None:
        pass


def launched_distributed() -> bool:
    """True when a launcher (torchrun, srun wrappers) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def everyone_needs_everything(needs: torch.Tensor, blocks: list[tuple[int, int]], members: list[int]) -> bool:
    """True when every process reads every row of every process (a dense W): then one all_gather."""
    return all(
        bool(needs[a:b, c:d].all()) for a, b in (blocks[r] for r in members) for c, d in (blocks[r] for r in members)
    )


def payload_rows(weights: torch.Tensor, blocks: list[tuple[int, int]], members: list[int]) -> list[int]:
    """Parameter rows each process sends in one gossip round with W = `weights`: to each peer, the
    rows of its own block that some site of the peer's block reads (W_ij != 0), each row once; for a
    dense W, its whole block (padded to the largest block) to every peer."""
    needs = weights != 0
    if everyone_needs_everything(needs, blocks, members):
        padded = max(b - a for a, b in (blocks[r] for r in members))
        return [padded * (len(members) - 1) for _ in members]
    rows = []
    for sender in members:
        lo, hi = blocks[sender]
        rows.append(sum(int(needs[slice(*blocks[peer]), lo:hi].any(0).sum()) for peer in members if peer != sender))
    return rows


def rank_of_process() -> int:
    """This process's rank in a distributed run (0 in simulation)."""
    return int(os.environ.get("RANK", "0")) if launched_distributed() else 0


def rendezvous_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The key-value store at MASTER_ADDR:MASTER_PORT (hosted by rank 0, or by torchrun's agent),
    under a prefix per launch attempt: torchrun keeps its store across `--max-restarts`
    relaunches, and a relaunched group must not read the dead attempt's addresses."""
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_hosts, timeout=timeout)  # fmt: skip
    return dist.PrefixStore(f"gossiplab/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def relaunched_by_torchrun(run_dir: Path | None) -> bool:
    """True for a worker torchrun restarted (`--max-restarts`) into a run directory its earlier
    attempt already started: the same command must then continue that run from its checkpoints."""
    if not launched_distributed() or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return False
    rank = rank_of_process()
    own = "config.toml" if rank == 0 else f"rank{rank}/config.toml"
    return run_dir is not None and (run_dir / own).is_file()


def check_distributed(config: Config) -> None:
    """Refuse, before any work, what the multi-process runtime does not run (named by field)."""
    gossip = config.gossip
    world = int(os.environ.get("WORLD_SIZE", "1"))
    errors = []
    if gossip.mixing not in DISTRIBUTED_MIXING:
        errors.append(
            f"field 'gossip.mixing': '{gossip.mixing}' runs only in one process; across processes use one "
            f"of {', '.join(DISTRIBUTED_MIXING)}"
        )
    if gossip.merge not in DISTRIBUTED_MERGES:
        errors.append(
            f"field 'gossip.merge': '{gossip.merge}' runs only in one process; across processes use "
            f"{', '.join(DISTRIBUTED_MERGES)}"
        )
    if config.num_sites < world:
        errors.append(f"field 'num_sites': {config.num_sites} sites cannot fill {world} processes")
    if errors:
        raise ConfigError("\n".join(errors))


class ProcessGroup:
    """This process's block of sites in a gloo process group, with failure detection and regrouping."""

    writes: bool

    def __init__(self, config: Config):
        check_distributed(config)
        timeout = datetime.timedelta(seconds=config.distributed.timeout_s)
        self.timeout = timeout
        self.on_failure = config.distributed.on_failure
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.writes = self.rank == 0
        self.store = rendezvous_store(self.rank, self.world_size, timeout)
        dist.init_process_group("gloo", store=self.store, rank=self.rank, world_size=self.world_size, timeout=timeout)
        self.group = dist.group.WORLD
        self.members = list(range(self.world_size))  # original ranks still in the run
        self.epoch = 0  # regroupings so far
        self.num_sites = config.num_sites
        blocks = torch.tensor_split(torch.arange(config.num_sites), self.world_size)
        self.blocks = [(int(b[0]), int(b[-1]) + 1) for b in blocks]
        self.owner = torch.cat([torch.full((len(b),), r) for r, b in enumerate(blocks)])
        self.sites = slice(*self.blocks[self.rank])
        self._beats = 0
        self._shared = 0  # values shared by rank 0 so far
        self.bytes_sent = 0  # parameter payload this process sent to others
        self.failures = (ExchangeFailed,)
        self._averagers: dict[int, tuple[torch.Tensor, Callable]] = {}
        self._stopped = threading.Event()
        self._beat()
        self._heart = threading.Thread(target=self._heartbeat, daemon=True)
        self._heart.start()
        try:
            self._check_same_config(config)
        except ConfigError:
            self.close(together=False)
            raise

    # --- setup -------------------------------------------------------------------------------

    def _beat(self) -> None:
        self._beats += 1
        self.store.set(f"gossiplab/beat/{self.rank}", str(self._beats))

    def _heartbeat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_S):
            try:
                self._beat()
            except Exception:  # the store's host is gone: the main thread will find out and stop
                return

    def _check_same_config(self, config: Config) -> None:
        """Every process must run the same config: refuse to start, naming the fields that differ."""
        mine = flatten(config.to_dict())
        self.store.set(f"gossiplab/config/{self.rank}", json.dumps(mine, sort_keys=True))
        for other in range(self.world_size):
            theirs = json.loads(self.store.get(f"gossiplab/config/{other}"))
            differing = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            if differing:
                details = ", ".join(
                    f"'{k}' ({mine.get(k)!r} here, {theirs.get(k)!r} on rank {other})" for k in differing
                )
                raise ConfigError(f"rank {self.rank} and rank {other} run different configs: fields {details}")

    @exchange
    def share(self, key: str, value: str) -> str:
        """Rank 0's `value`, seen by every process (every process calls this in the same order)."""
        self._shared += 1
        key = f"gossiplab/share/{self._shared}/{key}"
        if self.rank == 0:
            self.store.set(key, value)
            return value
        return self.store.get(key).decode()

    def close(self, together: bool = True) -> None:
        """Stop the heartbeat and leave the group; `together` (a finished run) waits for every
        process first, since rank 0 hosts the store the others still use."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._heart.join()
        if together:
            with contextlib.suppress(RuntimeError):  # a peer already gone: nothing left to wait for
                self.sum(torch.zeros(1))
        dist.destroy_process_group()

    # --- communication -----------------------------------------------------------------------

    def _index(self, rank: int) -> int:
        """The position of an original rank in the current group."""
        return self.members.index(rank)

    @exchange
    def mix(self, theta: torch.Tensor, weights: torch.Tensor, operator: Callable) -> int:
        """theta_i <- sum_j W_ij theta_j for this block's sites; returns the bytes this process sent.
        `operator`'s class (the run's GossipAverager) mixes the extended block, one per block size."""
        lo, hi = self.sites.start, self.sites.stop
        needs = weights != 0  # [i, j]: site i reads site j
        peers = [r for r in self.members if r != self.rank]
        dense = everyone_needs_everything(needs, self.blocks, self.members)
        if dense:
            extended_sites = torch.cat([torch.arange(*self.blocks[r]) for r in self.members])
        else:
            wanted = needs[lo:hi].any(0)
            wanted[lo:hi] = True
            extended_sites = torch.nonzero(wanted).flatten()
        if len(extended_sites) not in self._averagers:  # buffers and mixer per extended-block size, reused
            shape = torch.Size((len(extended_sites), theta.shape[1]))
            self._averagers[len(extended_sites)] = (torch.empty(shape), type(operator)(shape))
        extended, averager = self._averagers[len(extended_sites)]
        position = {int(s): k for k, s in enumerate(extended_sites)}
        own = slice(position[lo], position[lo] + (hi - lo))
        extended[own] = theta
        sent = 0
        if dense:
            send = torch.zeros(self._padded(), theta.shape[1])
            send[: hi - lo] = theta
            received = [torch.empty_like(send) for _ in self.members]
            self._wait([self.group.allgather([received], [send])])
            for r, rows in zip(self.members, received, strict=True):
                a, b = self.blocks[r]
                extended[position[a] : position[a] + b - a] = rows[: b - a]
            sent = send.numel() * 4 * len(peers)
        else:
            works = []
            for peer in peers:
                a, b = self.blocks[peer]
                rows_to_send = torch.nonzero(needs[a:b, lo:hi].any(0)).flatten() + lo
                if len(rows_to_send):
                    payload = theta[rows_to_send - lo].contiguous()
                    works.append(self.group.send([payload], self._index(peer), 0))
                    sent += payload.numel() * 4
                rows_to_receive = [s for s in range(a, b) if s in position]
                if rows_to_receive:
                    first = position[rows_to_receive[0]]
                    works.append(
                        self.group.recv([extended[first : first + len(rows_to_receive)]], self._index(peer), 0)
                    )
            self._wait(works)
        local = weights[extended_sites][:, extended_sites]
        outside = torch.ones(len(extended_sites), dtype=torch.bool)
        outside[own] = False
        local[outside] = torch.eye(len(extended_sites))[outside]  # received rows are inputs only
        averager(extended, local)
        theta.copy_(extended[own])
        self.bytes_sent += sent
        return sent

    def _wait(self, works: list) -> None:
        for work in works:
            work.wait(self.timeout)

    def _padded(self) -> int:
        return max(b - a for a, b in (self.blocks[r] for r in self.members))

    @exchange
    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-site rows [N_r, ...] of every process in site order [N, ...]; lost processes' rows are zero."""
        size = self._padded()
        send = torch.zeros(size, *rows.shape[1:], dtype=rows.dtype)
        send[: len(rows)] = rows
        received = [torch.empty_like(send) for _ in self.members]
        self._wait([self.group.allgather([received], [send])])
        full = torch.zeros(self.num_sites, *rows.shape[1:], dtype=rows.dtype)
        for r, part in zip(self.members, received, strict=True):
            a, b = self.blocks[r]
            full[a:b] = part[: b - a]
        return full

    @exchange
    def sum(self, value: torch.Tensor) -> torch.Tensor:
        total = value.clone()
        self._wait([self.group.allreduce([total])])
        return total

    # --- checkpoints -------------------------------------------------------------------------

    def rank_file(self, run_dir: Path, name: str) -> Path:
        """This process's own file `name` (checkpoints, a config copy): under run_dir/rank<r>/."""
        folder = run_dir / f"rank{self.rank}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def agree_on_step(self, steps: list[int]) -> int:
        """The step every process can resume from: the oldest newest checkpoint (a process killed
        between two processes' checkpoint writes leaves them one checkpoint apart; each keeps its
        previous one). `steps` are this process's [newest, previous] checkpoint steps (-1: none)."""
        held = self.gather(torch.tensor([steps]))[torch.tensor([self.blocks[r][0] for r in self.members])]
        agreed = int(held[:, 0].min())
        missing = [r for r, pair in zip(self.members, held.tolist(), strict=True) if agreed not in pair]
        if missing:
            raise ResumeError(
                f"cannot resume: rank(s) {missing} hold no checkpoint of step {agreed}, the newest one every "
                f"process has (checkpoints per rank: {dict(zip(self.members, held.tolist(), strict=True))}); "
                "a run that dropped a process cannot be resumed"
            )
        return agreed

    # --- faults ------------------------------------------------------------------------------

    def recover(self, error: Exception) -> PeerLost:
        """After a failed exchange: agree with the other survivors on who is left and form a new
        group of them. Returns what was lost; raises PeerLost when the run must stop instead."""
        self.epoch += 1
        prefix = f"gossiplab/regroup/{self.epoch}"
        deadline = self.timeout + datetime.timedelta(seconds=10 * HEARTBEAT_S)
        try:
            self.store.set(f"{prefix}/joined/{self.rank}", "1")
            if self.rank == 0:
                before = {r: self.store.get(f"gossiplab/beat/{r}") for r in self.members}
                time.sleep(4 * HEARTBEAT_S)
                # alive: joined the regrouping already (its heartbeat may wait behind that store
                # call), or still beating (it will join once its own exchange fails or times out)
                alive = [
                    r
                    for r in self.members
                    if self.store.check([f"{prefix}/joined/{r}"]) or self.store.get(f"gossiplab/beat/{r}") != before[r]
                ]
                self.store.wait([f"{prefix}/joined/{r}" for r in alive], deadline)
                self.store.set(f"{prefix}/members", json.dumps(alive))
            else:
                self.store.wait([f"{prefix}/members"], deadline)
                alive = json.loads(self.store.get(f"{prefix}/members"))
        except Exception as store_error:  # the store lives with rank 0 (or the launcher): it is gone
            raise PeerLost(
                f"lost contact with rank 0, which writes the run directory ({store_error}); stopping. "
                "Checkpoints written so far are intact.",
                [],
            ) from error
        if self.rank not in alive:
            raise PeerLost("rank 0 saw no heartbeat from this process and dropped it; stopping", []) from error
        lost = [r for r in self.members if r not in alive]
        lost_sites = [s for r in lost for s in range(*self.blocks[r])]
        message = f"lost rank(s) {lost} holding sites {lost_sites} ({str(error).splitlines()[0][:160]})"
        if 0 in lost or self.on_failure == "stop" or not lost:
            raise PeerLost(f"{message}; stopping. Checkpoints written so far are intact.", lost_sites) from error
        self.members = alive
        store = dist.PrefixStore(f"{prefix}/group", self.store)
        self.group = dist.ProcessGroupGloo(store, alive.index(self.rank), len(alive), self.timeout)
        return PeerLost(message, lost_sites)
