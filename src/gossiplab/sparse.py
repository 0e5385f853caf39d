"""Sparse graphs and mixing matrices: gossip that costs O(edges), not O(N^2), at 100,000 sites.

A dense bool adjacency takes N^2 bytes and a dense float32 W 4 N^2 (10 GB and 40 GB at 100,000
sites) while a ring has 2N edges. From `SPARSE_FROM_SITES` sites on, the built-in sparse graphs
(ring, exponential, the one-peer graphs) are sparse COO tensors (`torch.sparse_coo_tensor`,
coalesced, so their entries are sorted by row, then column); the graph-only mixing rules (uniform,
Metropolis) keep that layout, and the contract checks, the dropped-site rule, the message count and
the gossip kernel read it. Below that size, and for the complete graph (whose uniform W is one
mean), tensors stay dense: on a few hundred sites a dense W costs little and GEMM is fast. A user's
topology or mixing rule may return either layout; a rule that needs a dense matrix takes `dense(...)`.
"""

from __future__ import annotations

import torch

SPARSE_FROM_SITES = 1024  # graphs of this many sites or more are built sparse


def adjacency_from_edges(receivers: torch.Tensor, senders: torch.Tensor, num_sites: int) -> torch.Tensor:
    """The bool adjacency [N, N] with adjacency[receivers[k], senders[k]] True (repeats allowed):
    dense below `SPARSE_FROM_SITES` sites, sparse from there."""
    if num_sites < SPARSE_FROM_SITES:
        adjacency = torch.zeros(num_sites, num_sites, dtype=torch.bool)
        adjacency[receivers, senders] = True
        return adjacency
    values = torch.ones(len(receivers), dtype=torch.bool)
    return _coo(torch.stack([receivers, senders]), values, num_sites)


def matrix(rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, num_sites: int) -> torch.Tensor:
    """A sparse [N, N] matrix with values at (rows[k], columns[k]); repeated entries are summed."""
    return _coo(torch.stack([rows, columns]), values, num_sites)


def _coo(indices: torch.Tensor, values: torch.Tensor, num_sites: int) -> torch.Tensor:
    size = (num_sites, num_sites)
    return torch.sparse_coo_tensor(indices, values, size, check_invariants=True).coalesce()


def entries(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, columns, values) of the non-zero entries of a dense or sparse [N, N] tensor, sorted
    by row, then column."""
    if tensor.is_sparse:
        tensor = tensor.coalesce()
        rows, columns = tensor.indices()
        values = tensor.values()
        keep = values != 0
        return rows[keep], columns[keep], values[keep]
    rows, columns = torch.nonzero(tensor, as_tuple=True)
    return rows, columns, tensor[rows, columns]


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """The dense form of a graph or W, for rules that need every pair (influence, L2C)."""
    return tensor.to_dense() if tensor.is_sparse else tensor


def identity(num_sites: int, like: torch.Tensor) -> torch.Tensor:
    """W = I (no mixing) in the layout of `like`."""
    if not like.is_sparse:
        return torch.eye(num_sites)
    sites = torch.arange(num_sites)
    return matrix(sites, sites, torch.ones(num_sites), num_sites)


def oriented(weights: torch.Tensor, stochastic: str) -> torch.Tensor:
    """W with the sums that must be 1 along its rows: W itself, or W^T for a column-stochastic
    (push-sum) W."""
    return weights.t() if stochastic == "columns" else weights


def row_sums(weights: torch.Tensor) -> torch.Tensor:
    """sum_j W_ij for every row i, [N] (float64 for a sparse W, so the check sees W's error, not the sum's)."""
    if not weights.is_sparse:
        return weights.sum(1)
    rows, _, values = entries(weights)
    return torch.zeros(len(weights), dtype=torch.float64).index_add_(0, rows, values.double())


def off_diagonal_count(weights: torch.Tensor) -> int:
    """Non-zero W_ij with i != j: the messages of one round (j sends to i)."""
    rows, columns, _ = entries(weights)
    return int((rows != columns).sum())


def neighbour_lists(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's non-zero columns in increasing order [N, k] and their weights [N, k] (k the most
    non-zeros in a row), padded with the row's own index and weight 0: what the gossip kernels
    consume. The same lists as `kernels._neighbours` makes from a dense W."""
    rows, columns, values = entries(weights)
    num_sites = len(weights)
    counts = torch.bincount(rows, minlength=num_sites)
    width = int(counts.max()) if len(rows) else 1
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(rows)) - starts[rows]
    neighbours = torch.arange(num_sites)[:, None].repeat(1, width)
    coefficients = torch.zeros(num_sites, width, dtype=torch.float32)
    neighbours[rows, slot] = columns
    coefficients[rows, slot] = values.float()
    return neighbours, coefficients
