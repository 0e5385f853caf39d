"""Topologies, mixing rules and the gossip operation on the [N, P] tensor."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gossiplab import kernels
from gossiplab.merge import GossipAverager, global_merge, mix_block, rows_read
from gossiplab.mixing import metropolis, mixing_matrix, spectral_gap, uniform
from gossiplab.schedule import GossipSchedule
from gossiplab.topology import build_adjacency, exponential, one_peer_exponential, random_one_peer, ring

GRAPHS = ["complete", "ring", "exponential", "one-peer-exponential", "random-one-peer"]


@pytest.mark.parametrize("topology", GRAPHS)
@pytest.mark.parametrize("rule", ["uniform", "metropolis"])
@pytest.mark.parametrize("num_sites", [2, 7, 16])
def test_mixing_is_doubly_stochastic_and_preserves_the_mean(topology, rule, num_sites):
    weights = mixing_matrix(build_adjacency(topology, num_sites, 3, seed=5), rule)
    torch.testing.assert_close(weights.sum(1), torch.ones(num_sites))
    torch.testing.assert_close(weights.sum(0), torch.ones(num_sites))
    assert (weights >= 0).all()
    theta = torch.randn(num_sites, 1000)
    mean = theta.mean(0)
    GossipAverager(theta.shape)(theta, weights)
    torch.testing.assert_close(theta.mean(0), mean, rtol=1e-5, atol=1e-6)


def test_uniform_weights_on_an_irregular_graph_are_row_but_not_column_stochastic():
    star = torch.zeros(4, 4, dtype=torch.bool)
    star[0, 1:] = star[1:, 0] = True
    weights = uniform(star)
    torch.testing.assert_close(weights.sum(1), torch.ones(4))
    assert not torch.allclose(weights.sum(0), torch.ones(4))
    torch.testing.assert_close(metropolis(star).sum(0), torch.ones(4))
    assert torch.equal(metropolis(star), metropolis(star).T)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("blocks", ["one block", "blocks of 64 columns"])
@pytest.mark.parametrize("weights_of", [*GRAPHS, "dense random"])
def test_sparse_equal_row_and_dense_gossip_equal_the_matrix_product(weights_of, blocks, threads, monkeypatch):
    """Each of GossipAverager's three paths (compiled sparse pass, serial on one thread and
    parallel on more: ring, exponential, one-peer; identical rows: complete; GEMM: dense random W)
    equals W @ theta, in one block and in many."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    if blocks != "one block":  # 257 columns: 4 full blocks and a partial one
        monkeypatch.setattr(GossipAverager, "CACHE_FLOATS", 32 * 64)
        monkeypatch.setattr(GossipAverager, "SPARSE_CACHE_FLOATS", 32 * 64)
        monkeypatch.setattr(GossipAverager, "SPARSE_MIN_COLUMNS", 64)
    if weights_of == "dense random":
        weights = torch.rand(32, 32, generator=torch.Generator().manual_seed(0))
        weights /= weights.sum(1, keepdim=True)
    else:
        weights = mixing_matrix(build_adjacency(weights_of, 32, 1, seed=0), "metropolis")
    theta = torch.randn(32, 257)
    expected = weights @ theta
    GossipAverager(theta.shape)(theta, weights)
    torch.testing.assert_close(theta, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("topology", ["ring", "exponential", "complete", "random-one-peer"])
@pytest.mark.parametrize("kernels_name", ["torch", "numba"])
def test_a_blocks_mix_from_the_rows_it_reads_equals_those_rows_of_the_whole_mix(topology, kernels_name):
    """What a process mixes for its own sites from the public copies they read (CHOCO across
    processes) is those sites' rows of theta <- W theta, and it reads only its block and neighbours."""
    num_sites = 12
    weights = metropolis(build_adjacency(topology, num_sites, 3, seed=1))
    theta = torch.randn(num_sites, 700, generator=torch.Generator().manual_seed(0))
    whole = theta.clone()
    GossipAverager(whole.shape, kernels_name)(whole, weights)
    averagers: dict = {}
    for sites in (slice(0, 4), slice(4, 8), slice(8, 12), slice(5, 6)):
        torch.testing.assert_close(mix_block(theta, weights, sites, averagers, kernels_name), whole[sites])
    expected = {"ring": [3, 4, 5, 6, 7, 8], "complete": list(range(num_sites))}
    if topology in expected:
        assert rows_read(weights, slice(4, 8)).tolist() == expected[topology]


@pytest.mark.parametrize("topology", [*GRAPHS, "star"])
def test_row_width_is_the_most_neighbours_of_any_row(topology):
    """The count that sends W to the sparse pass (kernels.row_width) is the largest number of
    non-zeros in a row: a star's hub has all N, its leaves 2."""
    if topology == "star":
        adjacency = torch.zeros(9, 9, dtype=torch.bool)
        adjacency[0, :] = adjacency[:, 0] = True
        adjacency.fill_diagonal_(True)
        weights = uniform(adjacency)
    else:
        weights = mixing_matrix(build_adjacency(topology, 16, 1, seed=0), "metropolis")
    assert kernels.row_width(weights.numpy()) == int((weights != 0).sum(1).max())


def test_graph_shapes():
    assert ring(6).sum(1).tolist() == [2] * 6
    assert ring(2).sum().item() == 2
    assert exponential(16).sum(1).tolist() == [4] * 16  # hops 1, 2, 4, 8
    assert exponential(16)[0, 16 - 4]


def test_random_one_peer_is_a_matching_derived_from_seed_and_round():
    a = random_one_peer(16, round_index=4, seed=1)
    assert torch.equal(a, a.T)
    assert a.sum(1).tolist() == [1] * 16
    assert torch.equal(a, random_one_peer(16, round_index=4, seed=1))
    assert not torch.equal(a, random_one_peer(16, round_index=5, seed=1))
    assert not torch.equal(a, random_one_peer(16, round_index=4, seed=2))


def test_random_one_peer_with_probability_p_activates_about_p_of_the_sites():
    active = torch.stack([random_one_peer(200, r, seed=0, p=0.2).any(1) for r in range(50)]).float().mean()
    assert 0.15 < active < 0.22  # odd leftovers stay alone, so slightly below p
    assert (random_one_peer(200, 0, seed=0, p=0.2).sum(1) <= 1).all()


def test_spectral_gap_orders_graphs_by_mixing_speed():
    gaps = {t: spectral_gap(mixing_matrix(build_adjacency(t, 16, 0, seed=0), "uniform")) for t in GRAPHS[:3]}
    assert gaps["complete"] == pytest.approx(1.0)
    assert gaps["complete"] > gaps["exponential"] > gaps["ring"] > 0


def test_global_merge_sets_every_row_to_the_mean():
    theta = torch.randn(5, 10)
    mean = theta.mean(0)
    global_merge(theta)
    for row in theta:
        torch.testing.assert_close(row, mean)


def test_schedules():
    every = GossipSchedule("every", 100, every=10)
    assert every.communication_steps() == list(range(10, 101, 10))
    assert every.rounds_until(35) == 3
    listed = GossipSchedule("steps", 100, steps=frozenset({5, 50}))
    assert [t for t in range(1, 101) if listed.gossips_at(t)] == [5, 50]
    final = GossipSchedule("none", 100, final_merge=True)
    assert final.communication_steps() == [100]
    assert not any(final.gossips_at(t) for t in range(1, 101))
    assert final.merges_globally_at(100) and not final.merges_globally_at(99)
    assert GossipSchedule("none", 100).communication_steps() == []
    window = GossipSchedule("window", 100, every=5, window=(41, 60), final_merge=True)
    assert window.communication_steps() == [45, 50, 55, 60, 100]
    assert window.rounds_until(52) == 2 and window.rounds_until(100) == 4


@pytest.mark.parametrize("num_sites", [2, 4, 8, 16, 64])
def test_log2_n_rounds_of_one_peer_exponential_gossip_give_the_exact_average(num_sites):
    theta = torch.randn(num_sites, 33, dtype=torch.float64)
    mean = theta.mean(0)
    rounds = int(math.log2(num_sites))
    for r in range(rounds):
        theta = uniform(one_peer_exponential(num_sites, r)).double() @ theta
    torch.testing.assert_close(theta, mean.expand_as(theta), rtol=0, atol=1e-12)


def test_one_peer_exponential_needs_all_log2_n_rounds():
    theta = torch.randn(16, 5, dtype=torch.float64)
    for r in range(3):
        theta = uniform(one_peer_exponential(16, r)).double() @ theta
    assert (theta - theta.mean(0)).abs().max() > 1e-3


def test_static_exponential_gossip_error_shrinks_as_its_spectral_gap_predicts():
    weights = uniform(exponential(12)).double()  # 12 is not a power of two: no exact finite averaging
    second = 1 - spectral_gap(weights)
    theta = torch.randn(12, 50, dtype=torch.float64)
    error0 = (theta - theta.mean(0)).norm()
    errors = []
    for k in range(1, 8):
        theta = weights @ theta
        errors.append(float((theta - theta.mean(0)).norm()))
        assert errors[-1] <= second**k * error0 * (1 + 1e-9)  # W is circulant, hence normal
    assert all(b < a for a, b in itertools.pairwise(errors))
