"""Mixing rules: the weights W (N x N, rows sum to 1) of gossip averaging theta_i <- sum_j W_ij theta_j."""

from __future__ import annotations

import torch


def uniform(adjacency: torch.Tensor) -> torch.Tensor:
    """Equal weight over the closed in-neighbourhood: W_ij = 1 / (|N_in(i)| + 1) for j in N_in(i) and j = i.

    Row stochastic always; doubly stochastic on regular symmetric graphs (complete, ring,
    matchings) and circulant ones (exponential), not on irregular graphs (use Metropolis there).
    """
    closed = adjacency | torch.eye(len(adjacency), dtype=torch.bool)
    weights = closed.float()
    return weights / weights.sum(1, keepdim=True)


def metropolis(adjacency: torch.Tensor) -> torch.Tensor:
    """Metropolis-Hastings weights (Xiao & Boyd 2004) on the undirected graph A | A^T.

    W_ij = 1 / (1 + max(d_i, d_j)) for each edge, W_ii = 1 - sum_j W_ij: symmetric and doubly
    stochastic on any graph, so the population mean is preserved.
    """
    undirected = adjacency | adjacency.T
    degree = undirected.sum(1).float()
    weights = torch.where(undirected, 1.0 / (1.0 + torch.maximum(degree[:, None], degree[None, :])), 0.0)
    weights.diagonal().copy_(1.0 - weights.sum(1))
    return weights


def influence(weights: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """Influence-weighted mixing after DICE (Zhu et al., ICLR 2025), the rule MAZEL's
    "Random (influence-weighted)" rows use.

    DICE's one-hop influence of neighbour j on receiver i, to first order, is the decrease of i's
    loss caused by j's latest local update reaching i through W_ij:
        I_ij = lr * W_ij * <g_i, g_j>,
    g_i, g_j the sites' gradients of their own losses at the latest step (`grad` [N, P]). Each row
    keeps its self-weight W_ii and shares the rest, 1 - W_ii, among its neighbours in proportion to
    their positive influence, max(I_ij, 0); a site whose neighbours all have I_ij <= 0 keeps its
    own model (W_ii = 1). Rows sum to 1; W is not symmetric, so the mean is not preserved.
    """
    off_diagonal = weights.clone()
    off_diagonal.diagonal().zero_()
    rows, cols = off_diagonal.nonzero(as_tuple=True)
    scores = torch.zeros_like(weights)
    # dense graphs: one Gram matrix instead of |E| row products
    dense = len(rows) > len(weights)
    dots = (grad @ grad.T)[rows, cols] if dense else torch.linalg.vecdot(grad[rows], grad[cols])
    scores[rows, cols] = (lr * off_diagonal[rows, cols] * dots).clamp(min=0)
    total = scores.sum(1, keepdim=True)
    share = torch.where(total > 0, scores / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)
    mixed = share * (1 - weights.diagonal())[:, None]
    mixed.diagonal().copy_(1 - mixed.sum(1))
    return mixed


def fomo(adjacency: torch.Tensor, losses: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """FOMO's first-order model-optimisation weights (Zhang et al., ICLR 2021, eq. 6-7).

    losses[i, j] = site i's validation loss of site j's model; distances[i, j] = ||theta_j - theta_i||.
    w_ij = max(L_ii - L_ij, 0) / ||theta_j - theta_i|| for the neighbours j of i, normalised to sum
    to 1; theta_i <- theta_i + sum_j w_ij (theta_j - theta_i). A site no neighbour improves keeps its
    own model. Rows sum to 1; not symmetric.
    """
    gain = (losses.diagonal()[:, None] - losses).clamp(min=0) / distances.clamp(min=torch.finfo(distances.dtype).tiny)
    gain = torch.where(adjacency & ~torch.eye(len(adjacency), dtype=torch.bool), gain, 0.0)
    total = gain.sum(1, keepdim=True)
    weights = torch.where(total > 0, gain / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)
    weights.diagonal().copy_(1 - weights.sum(1))
    return weights


def mixing_matrix(adjacency: torch.Tensor, rule: str) -> torch.Tensor:
    if rule == "uniform":
        return uniform(adjacency)
    if rule == "metropolis":
        return metropolis(adjacency)
    raise ValueError(f"unknown gossip.mixing '{rule}'")


def spectral_gap(weights: torch.Tensor) -> float:
    """1 - |lambda_2(W)|: how fast repeated gossip with this W reaches consensus (0 = never)."""
    moduli = torch.linalg.eigvals(weights.double()).abs().sort(descending=True).values
    return float(1.0 - moduli[1]) if len(moduli) > 1 else 1.0
