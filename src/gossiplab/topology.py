"""Communication graphs: who each site receives from in gossip round r.

`adjacency[i, j]` is True when site i receives site j's parameters (no self-loops; the mixing
rule adds the self-weight). Every graph is a pure function of (name, N, round, seed, p), so
every process of a distributed run derives the same graph for round r without talking.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def complete(num_sites: int) -> torch.Tensor:
    return ~torch.eye(num_sites, dtype=torch.bool)


def ring(num_sites: int) -> torch.Tensor:
    """Each site exchanges with its two ring neighbours i-1 and i+1 (one neighbour when N = 2)."""
    adjacency = torch.zeros(num_sites, num_sites, dtype=torch.bool)
    if num_sites > 1:
        sites = torch.arange(num_sites)
        adjacency[sites, (sites + 1) % num_sites] = True
        adjacency[sites, (sites - 1) % num_sites] = True
    return adjacency


def exponential(num_sites: int) -> torch.Tensor:
    """Static exponential graph (Ying et al. 2021): site i receives from i - 2^k mod N, k = 0..log2(N-1).

    Directed and circulant, so uniform weights over the closed in-neighbourhood are doubly stochastic.
    """
    adjacency = torch.zeros(num_sites, num_sites, dtype=torch.bool)
    sites = torch.arange(num_sites)
    hop = 1
    while hop < num_sites:
        adjacency[sites, (sites - hop) % num_sites] = True
        hop *= 2
    return adjacency


def one_peer_exponential(num_sites: int, round_index: int) -> torch.Tensor:
    """One-peer exponential graph (Ying et al. 2021): in round r, site i receives from i + 2^(r mod L).

    L = ceil(log2 N). Each site sends to one peer and receives from one; with uniform weights
    W = (I + shift) / 2 is doubly stochastic, and for N a power of two, L consecutive rounds
    give the exact average (single-merge paper, appendix C).
    """
    adjacency = torch.zeros(num_sites, num_sites, dtype=torch.bool)
    if num_sites > 1:
        period = max(1, math.ceil(math.log2(num_sites)))
        sites = torch.arange(num_sites)
        adjacency[sites, (sites + 2 ** (round_index % period)) % num_sites] = True
    return adjacency


def random_one_peer(num_sites: int, round_index: int, seed: int, p: float = 1.0) -> torch.Tensor:
    """Random one-peer gossip: each round, active sites are paired by a random perfect matching.

    Each site is active with probability p ("R 0.2" of the single-merge paper: p = 0.2, "R 1":
    p = 1) and exchanges with exactly one other active site; with an odd number of active sites
    one stays alone. A matching keeps one send and one receive per site and makes W symmetric,
    so plain averaging preserves the population mean.
    """
    rng = np.random.default_rng([seed, 2, round_index])
    active = np.flatnonzero(rng.random(num_sites) < p)
    order = rng.permutation(active)
    pairs = torch.from_numpy(order[: len(order) // 2 * 2].reshape(-1, 2))
    adjacency = torch.zeros(num_sites, num_sites, dtype=torch.bool)
    adjacency[pairs[:, 0], pairs[:, 1]] = True
    adjacency[pairs[:, 1], pairs[:, 0]] = True
    return adjacency


def build_adjacency(name: str, num_sites: int, round_index: int, seed: int, p: float = 1.0) -> torch.Tensor:
    if name == "complete":
        return complete(num_sites)
    if name == "ring":
        return ring(num_sites)
    if name == "exponential":
        return exponential(num_sites)
    if name == "one-peer-exponential":
        return one_peer_exponential(num_sites, round_index)
    if name == "random-one-peer":
        return random_one_peer(num_sites, round_index, seed, p)
    raise ValueError(f"unknown gossip.topology '{name}'")


def is_time_varying(name: str) -> bool:
    return name in ("random-one-peer", "one-peer-exponential")
