"""(b) Graphs of your own: a fixed adjacency matrix, and a graph that changes every round.

A topology is `graph(num_sites, round_index, seed, p) -> [N, N] bool`, adjacency[i, j] True when
site i receives from site j. Name it as `gossip.topology` with this module in `plugins`.
"""

import torch

from gossiplab.registry import TOPOLOGIES


@TOPOLOGIES.register("two-cliques", time_varying=False)
def two_cliques(num_sites: int, round_index: int, seed: int, p: float) -> torch.Tensor:
    """Two complete halves joined by one edge (site 0 <-> the last site): a given adjacency matrix."""
    half = num_sites // 2
    group = torch.arange(num_sites) < half
    adjacency = group[:, None] == group[None, :]
    adjacency[0, -1] = adjacency[-1, 0] = True
    adjacency.fill_diagonal_(False)
    return adjacency


@TOPOLOGIES.register("alternating-pairs", time_varying=True)
def alternating_pairs(num_sites: int, round_index: int, seed: int, p: float) -> torch.Tensor:
    """Even rounds pair sites (0,1), (2,3), ...; odd rounds (1,2), (3,4), ..., (N-1,0)."""
    sites = torch.arange(num_sites)
    partner = sites ^ 1 if round_index % 2 == 0 else torch.where(sites % 2 == 1, sites + 1, sites - 1) % num_sites
    adjacency = torch.zeros(num_sites, num_sites, dtype=torch.bool)
    adjacency[sites, partner] = True
    return adjacency
