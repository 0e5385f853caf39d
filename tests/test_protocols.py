"""The papers' protocols: the single-merge paper's pull graph and communication windows, MAZEL's
probabilistic cosine scheduler, L2C's local test rule, DIMAT's global matching and exact consensus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gossiplab.algorithms.dimat.matching import MatchedMerge
from gossiplab.assembly import build_experiment
from gossiplab.catalogue import build_config
from gossiplab.communicator import SingleProcess
from gossiplab.data.federation import build_federation
from gossiplab.evaluation import evaluate
from gossiplab.metrics import Scoring
from gossiplab.permutation import permutation_spec
from gossiplab.runner import Runner
from gossiplab.schedule import GossipSchedule, cosine_density, cosine_random_steps
from gossiplab.topology import build_adjacency


def test_the_pull_graph_talks_at_the_nominal_rate_where_the_matching_falls_short():
    """R 0.2 of the single-merge paper: each site pulls from one random peer with probability p."""
    num_sites, rounds = 16, 3000
    pull = torch.stack([build_adjacency("random-one-peer-pull", num_sites, r, seed=0, p=0.2) for r in range(rounds)])
    matching = torch.stack([build_adjacency("random-one-peer", num_sites, r, seed=0, p=0.2) for r in range(rounds)])
    assert not pull.diagonal(dim1=1, dim2=2).any()
    assert int(pull.sum(2).max()) == 1  # one peer at most, pulled (directed)
    assert float(pull.any(2).float().mean()) == pytest.approx(0.2, abs=0.005)
    assert float(matching.any(2).float().mean()) < 0.185  # the odd active site is left out
    peers = pull.float().sum((0, 1))
    assert float(peers.std() / peers.mean()) < 0.1  # peers drawn uniformly
    again = build_adjacency("random-one-peer-pull", num_sites, 7, seed=0, p=0.2)
    assert torch.equal(again, pull[7])  # a pure function of (seed, round): every process agrees


def test_a_window_with_r_outside_gossips_on_the_pull_graph_outside_it(tmp_path):
    overrides = [
        "num_sites=8", "train.steps=100", "eval.every=50", "gossip.topology=complete", "gossip.schedule=window",
        "gossip.window_start=41", "gossip.window_end=60", "gossip.every=10",
    ]  # fmt: skip
    schedule = GossipSchedule.from_config(
        build_config("default", [*overrides, "gossip.outside_window_p=0.5"]).gossip, 100
    )
    assert [t for t in range(1, 101) if schedule.gossips_at(t)] == list(range(10, 101, 10))
    assert [t for t in range(1, 101) if schedule.gossips_at(t) and schedule.in_window(t)] == [50, 60]
    summaries = {}
    for p in (0.0, 0.5):
        config = build_config("default", [*overrides, f"gossip.outside_window_p={p}"])
        (tmp_path / str(p)).mkdir()
        summaries[p] = Runner(config, tmp_path / str(p), show_progress=False).run()
    row = summaries[0.0]["num_parameters"] * 4
    inside = 2 * 8 * 7 * row  # two complete-graph rounds
    assert summaries[0.0]["bytes_sent"] == inside
    outside = summaries[0.5]["bytes_sent"] - inside  # eight rounds of about 8 x 0.5 pulls
    assert outside % row == 0 and 0 < outside // row <= 8 * 8


def test_the_probabilistic_cosine_scheduler_is_seeded_and_spends_its_rounds_early():
    steps, rounds = 4600, 9
    draws = [cosine_random_steps(steps, rounds, 0.1, seed) for seed in range(400)]
    assert cosine_random_steps(steps, rounds, 0.1, 3) == draws[3]  # every process derives the same rounds
    assert draws[0] != draws[1]
    assert np.mean([len(d) for d in draws]) == pytest.approx(rounds, rel=0.05)  # R rounds expected
    first_half = np.mean([sum(t <= steps / 2 for t in d) for d in draws])
    density = cosine_density(steps, 0.1)
    assert first_half / rounds == pytest.approx(sum(density[: steps // 2]) / sum(density), abs=0.03)
    config = build_config("default", ["gossip.schedule=cosine-random", "gossip.rounds=9", "train.steps=4600"])
    schedule = GossipSchedule.from_config(config.gossip, 4600, seed=3)
    assert sorted(schedule.steps) == draws[3]


def test_class_weighted_local_accuracy_is_each_sites_classes_on_the_whole_test_set():
    """L2C's rule: on shard tasks, site j's local accuracy is the accuracy on all test images of its classes."""
    config = build_config("l2c", ["num_sites=20", "model.hidden=[16]", "train.steps=1"])
    experiment = build_experiment(config)
    federation = experiment.federation
    correct = torch.rand(3, len(federation.test_y), generator=torch.Generator().manual_seed(0)) < 0.6
    counts = federation.train_label_counts().float()
    test = Scoring(
        federation.test_y, federation.test_site, 20, federation.num_classes, counts / counts.sum(1, keepdim=True)
    )
    sites = torch.arange(20)
    matrix = test.matrix(test.hits(correct, torch.full((3,), -1), sites), sites)
    for site in (0, 7, 19):
        classes = counts[site].nonzero().flatten()
        assert len(classes) == 2  # its task; the validation hold-out leaves its two classes near 50/50
        share = counts[site, classes] / counts[site, classes].sum()
        per_class = [correct[:, federation.test_y == c].float().mean(1) for c in classes]
        torch.testing.assert_close(matrix[:, site], share[0] * per_class[0] + share[1] * per_class[1])
    assert config.eval.local_test == "class-weighted" and config.data.val_fraction == 0.2
    _, scored = evaluate(experiment, None, SingleProcess(config.num_sites))
    population = experiment.population
    hits = population.predict(population.theta, federation.test_x) == federation.test_y
    torch.testing.assert_close(scored, test.matrix(test.hits(hits, sites, sites), sites))


def test_dimat_on_a_complete_graph_hands_every_agent_one_matched_model_and_reports_mmga_apart(tmp_path):
    overrides = ["train.steps=20", "eval.every=20", "gossip.every=10", "gossip.start_after=0", "model.name=mlp"]
    config = build_config("dimat", [*overrides, "model.hidden=[64]", "gossip.topology=complete"])
    assert config.num_sites == 5 and config.sections["dimat"].match_on == "global"
    experiment = build_experiment(config)
    federation = experiment.federation
    owners = federation.train_label_counts() > 0
    assert bool((owners.sum(0) == 1).all()) and bool((owners.sum(1) == 2).all())  # disjoint whole classes
    (tmp_path / "run").mkdir()
    Runner(config, tmp_path / "run", show_progress=False, experiment=experiment).run()
    theta = experiment.population.theta
    torch.testing.assert_close(theta, theta[:1].expand_as(theta), atol=0, rtol=0)  # exact consensus
    match = experiment.algorithm.merge.match_inputs
    assert torch.equal(match[0], match[4])  # one sample of the global training set for every agent
    pool = federation.normalise(federation.pool_x[federation.train_index]).flatten(1)
    nearest = torch.cdist(match[0, :40].flatten(1), pool).argmin(1)
    labels = federation.pool_y[federation.train_index[nearest]]
    assert len(labels.unique()) >= 6  # many agents' classes, not the receiver's two
    rows = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all('"matched_mmga"' in line for line in rows)


def test_the_consensus_merge_aligns_every_row_to_the_first_and_averages_with_the_weights():
    config = build_config("dimat", ["model.name=mlp", "model.hidden=[32]"])
    experiment = build_experiment(config)
    population = experiment.population
    spec = permutation_spec(population.module, experiment.federation.image_shape)
    inputs = torch.randn(64, 1, 28, 28).expand(5, -1, -1, -1, -1)
    merge = MatchedMerge(population, spec, "activation-matching", inputs)
    theta = population.theta.clone()
    expected = merge.merged_model(theta)
    merge(theta, torch.full((5, 5), 0.2))
    torch.testing.assert_close(theta, expected.expand_as(theta), atol=1e-6, rtol=1e-6)


def test_dirichlet_redraws_leave_every_site_its_minimum_after_validation():
    config = build_config(
        "mazel-fashion",
        [
            "seed=1",
            "model.backbone=pixels",
            "model.head=linear",
            "model.zero_shot_init=false",
            "model.pre_alignment=none",
        ],
    )
    federation = build_federation(config)
    assert int(federation.train_sizes.min()) >= config.data.min_site_samples
