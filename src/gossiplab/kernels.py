"""Compiled loops (numba) for the few operations torch has no single fused kernel for.

Gossip with a sparse W (ring, one-peer, exponential graphs) is theta_i <- sum_k W_{i,j_k} theta_{j_k}
over a handful of neighbours j_k. In torch that is one gather and one multiply-add per neighbour,
each a separate pass over theta (or, blocked to stay in cache, about seven small kernel launches
per block); `gossiplab bench` measured those at 3.4-5.7x one `copy_` of theta. One compiled loop
reads each block of theta once and writes it back once, like a copy.

AD-PSGD's exchanges (gossiplab.algorithms.adpsgd) are the same shape of problem: the events of a
tick, in time order, each averaging two rows and stepping one; torch takes about ten passes over
the rows per wave of disjoint events, one compiled loop over each block of columns takes every
event in order, reading and writing each row it touches once.

numba is optional (`pip install 'gossiplab[compiled]'`): without it `train.kernels = auto` takes the
torch path, which gives the same numbers up to rounding, more slowly on sparse W (and the same
bits for AD-PSGD's exchanges).
"""

from __future__ import annotations

import numba
import numpy as np
import torch


@numba.njit(cache=True, boundscheck=False, inline="always")
def _mix_block(theta: np.ndarray, columns: np.ndarray, coefficients: np.ndarray, mixed: np.ndarray, start: int) -> None:
    """theta[i, block] <- sum_k coefficients[i, k] theta[columns[i, k], block] for the block of
    columns from `start`, mixed into `mixed` [N, >= block] and written back. Sums run in k order:
    c_0 x_0 first, then + c_k x_k."""
    num_rows, num_columns = theta.shape
    stop = min(start + mixed.shape[1], num_columns)
    for i in range(num_rows):
        out = mixed[i, : stop - start]
        source = theta[columns[i, 0], start:stop]
        coefficient = coefficients[i, 0]
        for q in range(stop - start):
            out[q] = coefficient * source[q]
        for k in range(1, columns.shape[1]):
            source = theta[columns[i, k], start:stop]
            coefficient = coefficients[i, k]
            for q in range(stop - start):
                out[q] += coefficient * source[q]
    for i in range(num_rows):
        theta[i, start:stop] = mixed[i, : stop - start]


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _mix_rows_parallel(theta: np.ndarray, columns: np.ndarray, coefficients: np.ndarray, buffers: np.ndarray) -> None:
    """Every block of columns, one per parallel iteration, each thread in its own buffer."""
    block = buffers.shape[2]
    for b in numba.prange((theta.shape[1] + block - 1) // block):
        _mix_block(theta, columns, coefficients, buffers[numba.get_thread_id()], b * block)


@numba.njit(cache=True, boundscheck=False)
def _mix_rows_serial(theta: np.ndarray, columns: np.ndarray, coefficients: np.ndarray, buffers: np.ndarray) -> None:
    """Every block of columns in turn. On one thread (as under torchrun, which gives each process
    one) this one is used: the parallel one would start numba's OpenMP pool, whose idle threads
    competed with the other processes for the cores (the 3-process tests ran 3x slower)."""
    block = buffers.shape[2]
    for start in range(0, theta.shape[1], block):
        _mix_block(theta, columns, coefficients, buffers[0], start)


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _exchanges(
    theta: np.ndarray, reads: np.ndarray, pending: np.ndarray, sites: np.ndarray, neighbours: np.ndarray,
    delivered: np.ndarray, answered: np.ndarray, lr: np.float32, block: int,
) -> None:  # fmt: skip
    """Per block of columns (one per parallel iteration), every event in order: the mean of x_i and
    x_j, to j if delivered, to i if answered; then x_i -= lr g_i and i reads x_i. The float32
    operations are torch's, in its order: (x_i + x_j) / 2, then x - (lr g)."""
    half = np.float32(0.5)
    for b in numba.prange((theta.shape[1] + block - 1) // block):
        start, stop = b * block, min((b + 1) * block, theta.shape[1])
        for e in range(len(sites)):
            i, j = sites[e], neighbours[e]
            for q in range(start, stop):
                own = theta[i, q]
                mean = (own + theta[j, q]) * half
                if delivered[e]:
                    theta[j, q] = mean
                base = mean if answered[e] else own
                value = base - lr * pending[i, q]
                theta[i, q] = value
                reads[i, q] = value


def apply_exchanges(
    theta: torch.Tensor, reads: torch.Tensor, pending: torch.Tensor, sites: torch.Tensor, neighbours: torch.Tensor,
    delivered: torch.Tensor, answered: torch.Tensor, lr: float, block: int = 4096,
) -> None:  # fmt: skip
    """AD-PSGD's exchanges ending in a tick, in time order, in place (contiguous CPU float32 rows)."""
    _exchanges(
        theta.numpy(), reads.numpy(), pending.numpy(), sites.numpy(), neighbours.numpy(), delivered.numpy(),
        answered.numpy(), np.float32(lr), block,
    )  # fmt: skip


@numba.njit(cache=True)
def row_width(weights: np.ndarray) -> int:
    """The most non-zeros in any row of `weights`: how many neighbours the sparse pass must mix.
    Asked every round; torch's `(W != 0).sum(1).max()` took 7-9x as long (11 vs 1.5 us at N = 64,
    0.95 vs 0.15 ms at N = 1,000)."""
    width = 0
    for i in range(weights.shape[0]):
        count = 0
        for j in range(weights.shape[1]):
            count += weights[i, j] != 0
        width = max(width, count)
    return width


@numba.njit(cache=True)
def neighbours(weights: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's non-zero columns in increasing order and their weights, padded to `width` with
    the row's own index and weight 0."""
    num_rows = weights.shape[0]
    columns = np.empty((num_rows, width), dtype=np.int64)
    coefficients = np.zeros((num_rows, width), dtype=np.float32)
    for i in range(num_rows):
        k = 0
        for j in range(weights.shape[1]):
            if weights[i, j] != 0:
                columns[i, k] = j
                coefficients[i, k] = weights[i, j]
                k += 1
        columns[i, k:] = i
    return columns, coefficients


class SparseMixer:
    """theta <- W theta for a W with at most a few non-zeros per row, in blocks of `block` columns
    (with thread-private [N, block] buffers, one per thread torch uses, allocated once: at
    100,000 sites each is 200 MB, so not one per core of a large machine)."""

    def __init__(self, num_rows: int, block: int):
        self.buffers = np.empty((0, num_rows, block), dtype=np.float32)

    def __call__(self, theta: torch.Tensor, columns: np.ndarray, coefficients: np.ndarray) -> None:
        """theta: contiguous CPU float32 [N, P]; row i mixes rows columns[i, :] with coefficients[i, :]
        ([N, k]: `neighbours` of a dense W, or `sparse.neighbour_lists` of a sparse one)."""
        if not theta.is_contiguous() or theta.dtype != torch.float32:
            raise ValueError(f"SparseMixer needs a contiguous float32 theta, got {theta.dtype}")
        threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
        if len(self.buffers) < threads:
            self.buffers = np.empty((threads, *self.buffers.shape[1:]), dtype=np.float32)
        if threads == 1:
            _mix_rows_serial(theta.numpy(), columns, coefficients, self.buffers)
        else:
            numba.set_num_threads(threads)
            _mix_rows_parallel(theta.numpy(), columns, coefficients, self.buffers)
