"""Communication graphs: who each site receives from in gossip round r.

`adjacency[i, j]` is True when site i receives site j's parameters (no self-loops; the mixing
rule adds the self-weight). The sparse graphs are sparse tensors from `sparse.SPARSE_FROM_SITES`
sites on (gossiplab.sparse); the complete graph stays dense (its uniform W is one mean). Every
graph is a pure function of (name, N, round, seed, p), so every process of a distributed run
derives the same graph for round r without talking.

A topology is registered under its `gossip.topology` name as `graph(num_sites, round_index, seed,
p) -> [N, N] bool` (dense or sparse); `time_varying` says whether the graph changes from round to
round. A user's graph (a fixed adjacency matrix, or one per round) registers the same way.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gossiplab.registry import TOPOLOGIES
from gossiplab.sparse import adjacency_from_edges


@TOPOLOGIES.register("complete", time_varying=False)
def complete(num_sites: int, round_index: int = 0, seed: int = 0, p: float = 1.0) -> torch.Tensor:
    """Every site receives from every other."""
    return ~torch.eye(num_sites, dtype=torch.bool)


@TOPOLOGIES.register("ring", time_varying=False)
def ring(num_sites: int, round_index: int = 0, seed: int = 0, p: float = 1.0) -> torch.Tensor:
    """Each site exchanges with its two ring neighbours i-1 and i+1 (one neighbour when N = 2)."""
    sites = torch.arange(num_sites if num_sites > 1 else 0)
    return adjacency_from_edges(sites.repeat(2), torch.cat([sites + 1, sites - 1]) % num_sites, num_sites)


@TOPOLOGIES.register("exponential", time_varying=False)
def exponential(num_sites: int, round_index: int = 0, seed: int = 0, p: float = 1.0) -> torch.Tensor:
    """Static exponential graph (Ying et al. 2021): site i receives from i - 2^k mod N, k = 0..log2(N-1).

    Directed and circulant, so uniform weights over the closed in-neighbourhood are doubly stochastic.
    """
    sites = torch.arange(num_sites)
    hops = [2**k for k in range((num_sites - 1).bit_length())]  # 1, 2, 4, ... < N
    senders = torch.cat([(sites - hop) % num_sites for hop in hops]) if hops else sites[:0]
    return adjacency_from_edges(sites.repeat(len(hops)), senders, num_sites)


@TOPOLOGIES.register("one-peer-exponential", time_varying=True)
def one_peer_exponential(num_sites: int, round_index: int, seed: int = 0, p: float = 1.0) -> torch.Tensor:
    """One-peer exponential graph (Ying et al. 2021): in round r, site i receives from i + 2^(r mod L).

    L = ceil(log2 N). Each site sends to one peer and receives from one; with uniform weights
    W = (I + shift) / 2 is doubly stochastic, and for N a power of two, L consecutive rounds
    give the exact average (single-merge paper, appendix C).
    """
    sites = torch.arange(num_sites if num_sites > 1 else 0)
    period = max(1, math.ceil(math.log2(max(num_sites, 2))))
    return adjacency_from_edges(sites, (sites + 2 ** (round_index % period)) % num_sites, num_sites)


@TOPOLOGIES.register("random-one-peer", time_varying=True)
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
    return adjacency_from_edges(torch.cat([pairs[:, 0], pairs[:, 1]]), torch.cat([pairs[:, 1], pairs[:, 0]]), num_sites)


@TOPOLOGIES.register("random-one-peer-pull", time_varying=True)
def random_one_peer_pull(num_sites: int, round_index: int, seed: int, p: float = 1.0) -> torch.Tensor:
    """The single-merge paper's random graph (its appendix C.1, "R 0.2"): each round every site,
    with probability p, pulls from one peer drawn uniformly among the others; the rest train on.

    Directed: i receiving from j does not make j receive from i, so a site may be pulled from by
    several others, and each active site averages with exactly one model (uniform mixing: 1/2 and
    1/2). The expected share of sites communicating is p exactly (a matching of the active sites,
    `random-one-peer`, leaves one alone when their number is odd, and pairs only active sites).
    W is row stochastic but not doubly stochastic, as in the paper's code: the mean drifts.
    """
    rng = np.random.default_rng([seed, 4, round_index])
    active = rng.random(num_sites) < p
    peers = (np.arange(num_sites) + 1 + rng.integers(0, max(num_sites - 1, 1), num_sites)) % num_sites
    pulling = torch.from_numpy(np.flatnonzero(active & (num_sites > 1)))
    return adjacency_from_edges(pulling, torch.from_numpy(peers)[pulling], num_sites)


def build_adjacency(name: str, num_sites: int, round_index: int, seed: int, p: float = 1.0) -> torch.Tensor:
    """The graph of round `round_index` of the registered topology `name`."""
    return TOPOLOGIES.get(name)(num_sites, round_index, seed, p)


def is_time_varying(name: str) -> bool:
    """Whether the registered topology's graph changes from round to round."""
    return bool(TOPOLOGIES.property(name, "time_varying", True))
