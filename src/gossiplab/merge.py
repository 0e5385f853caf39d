"""Merge operators on the [N, P] population tensor: gossip averaging and the global merge."""

from __future__ import annotations

import torch


class GossipAverager:
    """theta <- W theta (MAZEL Algorithm 1, line 7), into preallocated buffers.

    For sparse W (few neighbours per row, e.g. one-peer or ring) each output row is a weighted
    sum of gathered neighbour rows, O(N k P); for dense W one GEMM, O(N^2 P). Fresh [N, P]
    allocations per round cost several times a write into an existing buffer, so none are made.
    """

    def __init__(self, shape: torch.Size):
        self._mixed = torch.empty(shape)
        self._gathered = torch.empty(shape)

    @torch.no_grad()
    def __call__(self, theta: torch.Tensor, weights: torch.Tensor) -> None:
        num_sites = len(weights)
        nonzero = weights != 0
        width = int(nonzero.sum(1).max())
        if 4 * width >= num_sites:
            torch.mm(weights, theta, out=self._mixed)
        else:
            columns = torch.argsort(nonzero.int(), dim=1, descending=True, stable=True)[:, :width]
            coefficients = weights.gather(1, columns)
            for k in range(width):
                torch.index_select(theta, 0, columns[:, k], out=self._gathered)
                if k == 0:
                    torch.mul(self._gathered, coefficients[:, :1], out=self._mixed)
                else:
                    self._mixed.addcmul_(self._gathered, coefficients[:, k : k + 1])
        theta.copy_(self._mixed)


@torch.no_grad()
def merged_model(theta: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
    """The uniform average of the (active) rows, [1, P] (model soup; MAZEL: theta_merged = 1/N sum_i theta_i)."""
    if active is None or bool(active.all()):
        return theta.mean(0, keepdim=True)
    return theta[active].mean(0, keepdim=True)


@torch.no_grad()
def global_merge(theta: torch.Tensor, active: torch.Tensor | None = None) -> None:
    """Replace every (active) row by their mean: the single final global merge."""
    mean = merged_model(theta, active)
    if active is None:
        theta.copy_(mean.expand_as(theta))
    else:
        theta[active] = mean


def without_sites(weights: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """W with dropped sites cut out: nobody receives from them, they keep their own row, and the
    remaining weights of every row are renormalised to sum to 1."""
    if bool(active.all()):
        return weights
    weights = torch.where(active[:, None] & active[None, :], weights, 0.0)
    weights = torch.where(active[:, None], weights, torch.eye(len(weights)))
    return weights / weights.sum(1, keepdim=True)
