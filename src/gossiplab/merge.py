"""Merge operators on the [N, P] population tensor: gossip averaging and the single final global
merge (DIMAT's matched merge is DIMAT's own: gossiplab.algorithms.dimat.matching)."""

from __future__ import annotations

import math
from typing import Any

import torch

from gossiplab.communicator import Communicator
from gossiplab.devices import resolve_kernels
from gossiplab.mixing import mixing_matrix
from gossiplab.sparse import dense, entries, matrix, neighbour_lists, off_diagonal_count, oriented
from gossiplab.topology import build_adjacency


def message_count(weights: torch.Tensor) -> int:
    """Parameter vectors sent in one gossip round: one per off-diagonal non-zero W_ij (j sends to i)."""
    if weights.is_sparse:
        return off_diagonal_count(weights)
    return int((weights != 0).sum() - (weights.diagonal() != 0).sum())


class GossipAverager:
    """theta <- W theta (MAZEL Algorithm 1, line 7), in place, streaming theta about once, like one `copy_`.

    Mixing acts on every column of theta independently; the work depends on W's shape:
    - sparse W (at most max(8, N / 4) neighbours per row: ring, one-peer, exponential graphs): one
      compiled pass (kernels.SparseMixer) that mixes a cache-sized block of columns of all rows
      into a small buffer and writes it back, O(N k P);
    - W with identical rows (complete graph with uniform or Metropolis weights: every site gets the
      same average): the one mixed row w theta, then written to every row, O(N P);
    - other dense W: one GEMM per cache-sized block of columns, O(N^2 P);
    - a sparse W (a sparse tensor, gossiplab.sparse: graphs of 1,024 sites or more): the compiled
      pass on its neighbour lists, or, with the torch kernels, per block of columns one gathered
      multiply-add per neighbour, O(N k P) either way (never a dense [N, N] matrix).
    The crossover width and the block sizes were measured with `gossiplab bench` (the compiled
    sparse pass loses to GEMM from about 16 neighbours per row at N = 32, 32 at N = 64). Nothing
    of size [N, P] is allocated.

    `kernels = "torch"` (the only choice off the CPU, selectable on it) leaves out the compiled
    pass: dense W take the GEMM path, equal to the compiled pass up to rounding.
    """

    CACHE_FLOATS = 2**17  # GEMM blocks: measured best of 2**15..2**21
    # compiled sparse pass: measured best of 2**12..2**16 (a ring at N = 4 and 16 took 1.2-1.4x less
    # time than with 2**14; blocks are SPARSE_MIN_COLUMNS wide from N = 8 on, not from N = 32)
    SPARSE_CACHE_FLOATS = 2**12
    SPARSE_MIN_COLUMNS = 512  # and of 128..2048 (short row pieces cost more than the cache misses)
    SPARSE_WIDTH = 8

    def __init__(self, shape: torch.Size, kernels: str = "auto", device: torch.device | str = "cpu"):
        self.shape, self.device = torch.Size(shape), torch.device(device)
        self.kernels = resolve_kernels(kernels, self.device)  # train.kernels; auto: numba on the CPU
        num_sites, self.num_parameters = shape
        self.block = min(self.num_parameters, max(64, self.CACHE_FLOATS // num_sites))
        if self.kernels == "numba":
            from gossiplab import kernels as compiled  # numba is optional (the `compiled` extra)

            self._compiled = compiled
            columns = max(self.SPARSE_MIN_COLUMNS, self.SPARSE_CACHE_FLOATS // num_sites)
            self._sparse = compiled.SparseMixer(num_sites, min(self.num_parameters, columns))
        self._mixed = torch.empty(max(num_sites * self.block, self.num_parameters), device=self.device)

    @classmethod
    def buffer_bytes(cls, shape: tuple[int, int], compiled: bool, threads: int) -> int:
        """What an averager for `shape` holds beside theta: the mixed block, and the compiled pass's
        per-thread [N, columns] buffers or the torch pass's gathered block (the memory estimate)."""
        num_sites, num_parameters = shape
        block = min(num_parameters, max(64, cls.CACHE_FLOATS // num_sites))
        mixed = max(num_sites * block, num_parameters)
        columns = min(num_parameters, max(cls.SPARSE_MIN_COLUMNS, cls.SPARSE_CACHE_FLOATS // num_sites))
        extra = threads * num_sites * columns if compiled else num_sites * block
        return 4 * (mixed + extra)

    def resized(self, shape: torch.Size) -> GossipAverager:
        """An averager like this one for another shape (a process's extended block of rows)."""
        return GossipAverager(shape, self.kernels, self.device)

    @torch.no_grad()
    def __call__(self, theta: torch.Tensor, weights: torch.Tensor) -> None:
        num_sites = len(weights)
        if weights.is_sparse:
            self._mix_sparse(theta, *neighbour_lists(weights))
            return
        if self.kernels == "numba":
            width = self._compiled.row_width(weights.numpy())
            if width < num_sites and width <= max(self.SPARSE_WIDTH, num_sites // 4):
                self._sparse(theta, *self._compiled.neighbours(weights.numpy(), width))
                return
        weights = weights.to(self.device)
        if bool((weights == weights[:1]).all()):
            mixed = self._mixed[: self.num_parameters].view(1, -1)
            torch.mm(weights[:1], theta, out=mixed)
            theta.copy_(mixed.expand_as(theta))
        else:
            for start in range(0, self.num_parameters, self.block):
                part = theta[:, start : start + self.block]
                mixed = self._mixed[: part.numel()].view(part.shape)
                torch.mm(weights, part, out=mixed)
                part.copy_(mixed)

    def _mix_sparse(self, theta: torch.Tensor, neighbours: torch.Tensor, coefficients: torch.Tensor) -> None:
        """theta_i <- sum_k coefficients[i, k] theta[neighbours[i, k]], neighbours in increasing order."""
        if self.kernels == "numba":
            self._sparse(theta, neighbours.numpy(), coefficients.numpy())
            return
        neighbours, coefficients = neighbours.to(self.device), coefficients.to(self.device)
        for start in range(0, self.num_parameters, self.block):
            part = theta[:, start : start + self.block]
            mixed = self._mixed[: part.numel()].view(part.shape)
            torch.mul(part[neighbours[:, 0]], coefficients[:, :1], out=mixed)
            for k in range(1, neighbours.shape[1]):
                mixed.addcmul_(part[neighbours[:, k]], coefficients[:, k : k + 1])
            part.copy_(mixed)


@torch.no_grad()
def merged_model(
    theta: torch.Tensor, active: torch.Tensor | None = None, comm: Communicator | None = None
) -> torch.Tensor:
    """The uniform average of the (active) rows, [1, P] (model soup; MAZEL: theta_merged = 1/N sum_i theta_i).
    Across processes (`comm`), theta is this process's block and the sum runs over every process;
    without `comm`, theta holds every site."""
    count = len(theta) if comm is None else comm.num_sites
    if active is not None and not bool(active.all()):  # indexing copies theta: only when some are dropped
        theta, count = theta[active if comm is None else active[comm.sites]], int(active.sum())
    total = theta.sum(0, keepdim=True)
    return (total if comm is None else comm.sum(total)) / count


@torch.no_grad()
def global_merge(theta: torch.Tensor, active: torch.Tensor | None = None, comm: Communicator | None = None) -> None:
    """Replace every (active) row by their mean: the single final global merge (an all-reduce
    across processes)."""
    rows = slice(None) if active is None else active if comm is None else active[comm.sites]
    theta[rows] = merged_model(theta, active, comm)


def rows_read(weights: torch.Tensor, sites: slice) -> torch.Tensor:
    """The sites a block of sites reads in theta <- W theta (its own and every j with W_ij != 0),
    in increasing order: the extended block it mixes."""
    wanted = (weights[sites] != 0).any(0)
    wanted[sites] = True
    return torch.nonzero(wanted).flatten()


def block_weights(weights: torch.Tensor, extended_sites: torch.Tensor, own: slice) -> torch.Tensor:
    """W cut to an extended block: the block's own rows mix as in W, the rows it only reads are
    inputs (identity rows), so mixing the extended block computes the own rows' sum_j W_ij theta_j."""
    local = weights[extended_sites][:, extended_sites]
    outside = torch.ones(len(extended_sites), dtype=torch.bool)
    outside[own] = False
    local[outside] = torch.eye(len(extended_sites), dtype=local.dtype)[outside]
    return local


def mix_block(
    theta: torch.Tensor, weights: torch.Tensor, sites: slice, averagers: dict[int, GossipAverager], kernels: str
) -> torch.Tensor:
    """sum_j W_ij theta_j [n, P] for the block `sites` only, when every row of theta is at hand (CHOCO's
    public copies across processes): the block and the rows it reads, mixed with `block_weights`,
    O(rows read) instead of O(N); `averagers` keeps one per extended-block size."""
    weights = dense(weights)
    extended_sites = rows_read(weights, sites)
    start = int(torch.searchsorted(extended_sites, sites.start))
    own = slice(start, start + sites.stop - sites.start)
    extended = theta[extended_sites]
    averager = averagers.get(len(extended_sites))
    if averager is None:
        averager = averagers[len(extended_sites)] = GossipAverager(extended.shape, kernels, theta.device)
    averager(extended, block_weights(weights, extended_sites, own))
    return extended[own]


def without_sites(weights: torch.Tensor, active: torch.Tensor, stochastic: str = "rows") -> torch.Tensor:
    """W with dropped sites cut out: nobody receives from them, they keep their own row, and the
    remaining weights of every row are renormalised to sum to 1 (a sparse W stays sparse); of every
    column, for a column-stochastic (push-sum) W."""
    if bool(active.all()):
        return weights
    weights = oriented(weights, stochastic)
    if weights.is_sparse:
        rows, columns, values = entries(weights)
        keep = active[rows] & active[columns]
        dropped = torch.nonzero(~active).flatten()
        rows, columns = torch.cat([rows[keep], dropped]), torch.cat([columns[keep], dropped])
        values = torch.cat([values[keep], torch.ones(len(dropped))])
        total = torch.zeros(len(weights)).index_add_(0, rows, values)
        return oriented(matrix(rows, columns, values / total[rows], len(weights)), stochastic)
    weights = torch.where(active[:, None] & active[None, :], weights, 0.0)
    weights = torch.where(active[:, None], weights, torch.eye(len(weights)))
    return oriented(weights / weights.sum(1, keepdim=True), stochastic)


def final_merge_rounds(config: Any) -> int:
    """k, the rounds of a gossip final merge: gossip.final_merge_rounds, or ceil(log2 N)."""
    return config.gossip.final_merge_rounds or max(1, math.ceil(math.log2(config.num_sites)))


def final_merge(theta: torch.Tensor, config: Any, active: torch.Tensor, comm: Communicator) -> int:
    """The single global merge after the last step; returns how many parameter vectors it sent.

    'exact': every row <- the mean (an all-reduce: 2 (N - 1) vectors, ring all-reduce).
    'exponential' / 'one-peer-exponential': k rounds of uniform gossip on that graph instead
    (k = gossip.final_merge_rounds, or ceil(log2 N)), the single-merge paper's appendix C. Plain
    averaging: what `Algorithm.final_merge` does unless a method overrides it.
    """
    gossip, num_sites = config.gossip, config.num_sites
    if gossip.final_merge == "exact":
        global_merge(theta, active, comm)
        return 2 * (int(active.sum()) - 1)
    rounds = final_merge_rounds(config)
    averager = GossipAverager(theta.shape, config.train.kernels, theta.device)
    sent = 0
    for round_index in range(rounds):
        adjacency = build_adjacency(gossip.final_merge, num_sites, round_index, config.seed)
        weights = without_sites(mixing_matrix(adjacency, "uniform"), active)
        comm.mix(theta, weights, averager)
        sent += message_count(weights)
    return sent
