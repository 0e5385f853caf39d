"""Scale (#35): sparse graphs and mixing matrices end to end, equal to the dense ones; evaluation
in O(N) memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gossiplab import evaluation, merge, metrics, mixing, sparse, topology
from gossiplab.api import run
from gossiplab.assembly import (
    PartMismatch,
    build_data_and_model,
    build_experiment,
    check_mixing_matrix,
    memory_estimate,
)
from gossiplab.catalogue import build_config
from gossiplab.communicator import SingleProcess
from gossiplab.evaluation import evaluate

SPARSE_TOPOLOGIES = ("ring", "exponential", "one-peer-exponential", "random-one-peer", "random-one-peer-pull")


def built_sparse(monkeypatch, name: str, num_sites: int, round_index: int = 1) -> torch.Tensor:
    monkeypatch.setattr(sparse, "SPARSE_FROM_SITES", 0)
    adjacency = topology.build_adjacency(name, num_sites, round_index, seed=5, p=0.7)
    monkeypatch.setattr(sparse, "SPARSE_FROM_SITES", 1024)
    return adjacency


@pytest.mark.parametrize("name", SPARSE_TOPOLOGIES)
@pytest.mark.parametrize("num_sites", [2, 3, 16, 17])
def test_sparse_graphs_and_their_weights_equal_the_dense_ones(monkeypatch, name, num_sites):
    dense_graph = topology.build_adjacency(name, num_sites, 1, seed=5, p=0.7)
    sparse_graph = built_sparse(monkeypatch, name, num_sites)
    assert not dense_graph.is_sparse and sparse_graph.is_sparse
    assert torch.equal(sparse_graph.to_dense(), dense_graph)
    for rule in (mixing.uniform, mixing.metropolis):
        weights = rule(sparse_graph)
        assert weights.is_sparse
        torch.testing.assert_close(weights.to_dense(), rule(dense_graph), rtol=0, atol=1e-7)
        check_mixing_matrix(weights, num_sites, rule.__name__, sparse_graph)
        assert merge.message_count(weights) == merge.message_count(rule(dense_graph))


def test_built_in_sparse_graphs_are_sparse_from_the_threshold_and_metropolis_keeps_the_mean():
    """At 100,000 sites a ring's W holds 3N entries, not N^2, and keeps the population's mean."""
    num_sites = 100_000
    weights = mixing.metropolis(topology.build_adjacency("ring", num_sites, 0, seed=0))
    assert weights.is_sparse and weights._nnz() == num_sites * 3
    assert topology.build_adjacency("complete", 2048, 0, seed=0).layout == torch.strided
    theta = torch.randn(num_sites, 3)
    before = theta.mean(0)
    merge.GossipAverager(theta.shape, kernels="torch")(theta, weights)
    torch.testing.assert_close(theta.mean(0), before, rtol=0, atol=1e-5)
    assert float(sparse.row_sums(weights).sub(1).abs().max()) < 1e-6


@pytest.mark.parametrize("kernels", ["torch", "numba"])
@pytest.mark.parametrize("name", ["ring", "exponential", "random-one-peer-pull"])
def test_gossip_with_a_sparse_w_equals_the_dense_product(monkeypatch, kernels, name):
    if kernels == "numba":
        pytest.importorskip("numba")
    num_sites, width = 40, 1000
    weights = mixing.uniform(built_sparse(monkeypatch, name, num_sites))
    theta = torch.randn(num_sites, width)
    expected = weights.to_dense().double() @ theta.double()
    merge.GossipAverager(theta.shape, kernels=kernels)(theta, weights)
    torch.testing.assert_close(theta.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stochastic", ["rows", "columns"])
def test_dropped_sites_are_cut_from_a_sparse_w_as_from_a_dense_one(monkeypatch, stochastic):
    """The cut keeps the sums W must keep: its rows' (DSGD), or its columns' (push-sum)."""
    num_sites = 12
    sparse_weights = mixing.uniform(built_sparse(monkeypatch, "exponential", num_sites))
    active = torch.ones(num_sites, dtype=torch.bool)
    active[[3, 7]] = False
    cut = merge.without_sites(sparse_weights, active, stochastic)
    assert cut.is_sparse
    expected = merge.without_sites(sparse_weights.to_dense(), active, stochastic)
    torch.testing.assert_close(cut.to_dense(), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(expected.sum(1 if stochastic == "rows" else 0), torch.ones(num_sites))
    identity = torch.eye(num_sites)
    assert torch.equal(expected[3], identity[3]) and torch.equal(expected[:, 3], identity[:, 3])  # cut off


def test_a_sparse_w_breaking_the_contract_is_refused_naming_the_rule(monkeypatch):
    graph = built_sparse(monkeypatch, "ring", 8)
    weights = mixing.uniform(graph)
    rows, columns, values = sparse.entries(weights)
    negative = sparse.matrix(rows, columns, torch.where(rows == 2, -values, values), 8)
    with pytest.raises(PartMismatch, match=r"mixing \(mine\) returned W with negative weights \(e.g. W\[2, 1\]"):
        check_mixing_matrix(negative, 8, "mine", graph)
    off_graph = sparse.matrix(torch.tensor([0, 0]), torch.tensor([0, 4]), torch.tensor([0.5, 0.5]), 8)
    identity_rest = sparse.matrix(torch.arange(1, 8), torch.arange(1, 8), torch.ones(7), 8)
    outside = r"1 pairs that are not edges of the round's graph \(e.g. site 0 from site 4\)"
    with pytest.raises(PartMismatch, match=outside):
        check_mixing_matrix((off_graph + identity_rest).coalesce(), 8, "mine", graph)
    with pytest.raises(PartMismatch, match="rows do not sum to 1"):
        check_mixing_matrix((weights * 0.5).coalesce(), 8, "mine", graph)


@pytest.mark.parametrize(
    ("name", "rule", "algorithm"),
    [("ring", "metropolis", "dsgd"), ("random-one-peer", "uniform", "dsgd"), ("exponential", "uniform", "local")],
)
def test_a_run_on_sparse_graphs_equals_the_run_on_dense_ones(monkeypatch, tmp_path, name, rule, algorithm):
    """The whole loop (gossip, dropped-site rule, message count, evaluation) on 16 sites, graphs
    built sparse as from 1,024 sites, gives the dense run's numbers."""
    overrides = [
        "num_sites=16", "train.steps=60", "eval.every=30", "gossip.every=5", f"gossip.topology={name}",
        f"gossip.mixing={rule}", f"gossip.algorithm={algorithm}", "data.train_per_source=4000",
        "data.test_per_source=1000", "model.hidden=[32]",
    ]  # fmt: skip
    dense_run = run("default", overrides, run_dir=tmp_path / "dense")
    monkeypatch.setattr(sparse, "SPARSE_FROM_SITES", 0)
    sparse_run = run("default", overrides, run_dir=tmp_path / "sparse")
    for key in ("ala", "aga", "mmga", "consensus_distance", "bytes_sent"):
        assert sparse_run.final[key] == pytest.approx(dense_run.final[key], rel=1e-5, abs=1e-6), key
    assert dense_run.final["ala"] > 0.3


def test_evaluation_in_chunks_with_a_sampled_matrix_gives_the_whole_evaluations_metrics(monkeypatch):
    """Models classified a few at a time and A kept over a sample of sites (as beyond 1,024 sites)
    give the same metrics, and the sample's block of the whole A."""
    config = build_config("default", ["num_sites=12", "model.hidden=[16]", "data.train_per_source=4000"])
    experiment = build_experiment(config)
    population = experiment.population
    population.theta.add_(torch.randn(population.theta.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    comm = SingleProcess(config.num_sites)
    whole_row, whole_matrix = evaluate(experiment, None, comm)
    monkeypatch.setattr(evaluation, "LOGITS_PER_CHUNK", 1)  # one model at a time
    monkeypatch.setattr(metrics, "MATRIX_SITES", 8)
    monkeypatch.setattr(metrics, "MATRIX_SAMPLE", 4)
    row, matrix = evaluate(experiment, None, comm)
    assert metrics.matrix_sites(12).tolist() == [0, 3, 6, 9]
    torch.testing.assert_close(matrix, whole_matrix[[0, 3, 6, 9]][:, [0, 3, 6, 9]])
    assert row == pytest.approx(whole_row)
    assert len(set(row["local_accuracy"])) > 3  # the sites' models differ


def test_a_10000_site_run_stays_within_its_memory_estimate(tmp_path):
    """The --dry-run estimate bounds the run's peak memory, and is not far above it (at 10,000
    sites a batch, the population and its optimizer state dominate: gigabytes, where one stray
    copy is a refusal or an out-of-memory kill)."""
    overrides = [
        "num_sites=10000", "data.samples_per_site=32", "data.partition=iid", "data.val_fraction=0",
        "eval.local_test=class-weighted", "model.hidden=[16]", "gossip.topology=ring", "train.steps=4",
        "eval.every=2", "data.test_per_source=1000",
    ]  # fmt: skip
    config = build_config("default", overrides)
    estimate = sum(memory_estimate(config, *build_data_and_model(config)).values())
    script = (
        "import resource, subprocess, sys; "
        f"code = subprocess.call([sys.executable, '-m', 'gossiplab', 'run', '--quiet', '--run-dir', {str(tmp_path)!r}, "
        f"*{overrides!r}]); "
        "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    code, peak = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).stdout.split()[-2:]
    assert code == "0"
    assert 0.6 * estimate < int(peak) <= estimate, (int(peak) / 2**30, estimate / 2**30)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["accuracy_matrix"]) == 256 and summary["accuracy_matrix_sites"][:3] == [0, 39, 78]
    assert summary["ala"] > 0.3  # 4 steps: 0.44 (chance 0.1)
