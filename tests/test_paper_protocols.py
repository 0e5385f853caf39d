"""The papers' own protocols as parts: DIMAT's pre-training phase shared by every baseline, a
fresh optimizer per phase, BatchNorm statistics on global data, WA through DIMAT's own merge;
the single-merge paper's round structure; `reproduce --jobs` giving a serial run's numbers."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

from gossiplab.algorithms.dimat.matching import MatchedMerge
from gossiplab.api import run
from gossiplab.assembly import build_experiment
from gossiplab.catalogue import build_config
from gossiplab.config import SECTIONS, ConfigError
from gossiplab.data.federation import sample_held_out
from gossiplab.mixing import uniform
from gossiplab.optim import StackedAdam, StackedSGD
from gossiplab.permutation import permutation_spec
from gossiplab.registry import MIXING_RULES
from gossiplab.schedule import GossipSchedule
from gossiplab.sweep import oversubscription, run_in_processes, run_one

# the dimat preset's protocol on a small MLP: 30 steps alone, then a round every 5 steps
SMALL_DIMAT = [
    "model.name=mlp", "model.hidden=[32]", "train.steps=40", "gossip.start_after=30", "gossip.every=5",
    "eval.every=40", "data.test_per_source=500", "dimat.match_samples=64",
]  # fmt: skip


def test_no_round_falls_in_the_pre_training_phase_and_every_counts_from_its_end():
    config = build_config("dimat", SMALL_DIMAT)
    schedule = GossipSchedule.from_config(config.gossip, config.train.steps)
    assert schedule.communication_steps() == [35, 40]
    assert [schedule.rounds_until(t) for t in (30, 34, 35, 40)] == [0, 0, 1, 2]
    uniform = build_config("dimat", [*SMALL_DIMAT, "gossip.schedule=uniform", "gossip.rounds=4"])
    assert min(GossipSchedule.from_config(uniform.gossip, 40).communication_steps()) > 30


@pytest.mark.parametrize(
    "baseline",
    [
        ["gossip.algorithm=merge-average"],
        ["gossip.algorithm=sgp", "gossip.every=1", "train.reset_optimizer=false"],
        ["gossip.algorithm=cdsgd", "gossip.every=1", "train.reset_optimizer=false"],
    ],
    ids=["wa", "sgp", "cdsgd"],
)
def test_every_baseline_starts_from_the_same_pre_trained_agents_as_dimat(tmp_path, baseline):
    """DIMAT's code starts SGP and CDSGD from its pre-trained checkpoints: the phase before the
    first round is the same computation whatever comes after it, bit for bit."""

    def after_pre_training(overrides: list[str], folder: str) -> torch.Tensor:
        seen = {}

        def keep(runner):
            if runner.step == 30:
                seen["theta"] = runner.experiment.population.theta.clone()

        run("dimat", [*SMALL_DIMAT, *overrides], run_dir=tmp_path / folder, on_step=keep)
        return seen["theta"]

    dimat = after_pre_training([], "dimat")
    assert len(dimat.unique(dim=0)) == 5  # five agents trained alone from five initialisations
    assert torch.equal(after_pre_training(baseline, "baseline"), dimat)


def test_a_fresh_optimizer_after_each_round_is_a_new_optimizers_state():
    shape = torch.Size([3, 4])
    theta, grad = torch.randn(shape), torch.randn(shape)
    for optimizer, fresh in (
        (StackedAdam(shape, 0.1), StackedAdam(shape, 0.1)),
        (StackedSGD(shape, 0.1, momentum=0.9), StackedSGD(shape, 0.1, momentum=0.9)),
    ):
        for _ in range(3):
            optimizer.step(theta.clone(), torch.randn(shape))
        optimizer.reset()
        a, b = theta.clone(), theta.clone()
        optimizer.step(a, grad)
        fresh.step(b, grad)
        assert torch.equal(a, b)


def test_reset_optimizer_resets_after_every_round_in_a_run(tmp_path):
    steps = []

    def record(runner):
        steps.append((runner.step, runner.experiment.optimizer.momentum_buffer.abs().sum().item()))

    run("dimat", [*SMALL_DIMAT, "gossip.algorithm=merge-average"], run_dir=tmp_path / "run", on_step=record)
    momentum = dict(steps)
    assert momentum[35] == momentum[40] == 0 and momentum[34] > 0 and momentum[36] > 0


def test_batchnorm_statistics_on_global_data_are_one_for_every_agent_after_a_consensus_merge(tmp_path):
    """On a complete graph every agent holds the one merged model; statistics recomputed on the
    same global batches are then the same in every row, on each agent's own data they are not."""
    cnn = ["model.name=cnn", "model.channels=[4]", "gossip.topology=complete", "train.steps=20",
           "gossip.start_after=10", "gossip.every=10", "eval.every=20", "data.test_per_source=500",
           "dimat.match_samples=64"]  # fmt: skip
    rows = {}
    for where in ("global", "own"):
        config = build_config("dimat", [*cnn, f"dimat.reestimate_on={where}"])
        experiment = build_experiment(config)
        run(config, run_dir=tmp_path / where, experiment=experiment)
        population = experiment.population
        rows[where] = population.theta[:, population.num_parameters :]
    assert torch.equal(rows["global"], rows["global"][:1].expand_as(rows["global"]))
    assert not torch.allclose(rows["own"], rows["own"][:1].expand_as(rows["own"]))


def test_merge_average_is_plain_weighted_averaging_through_dimats_merge():
    experiment = build_experiment(build_config("dimat", [*SMALL_DIMAT, "gossip.algorithm=merge-average"]))
    population = experiment.population
    spec = permutation_spec(population.module, experiment.federation.image_shape)
    theta = population.theta.clone()
    ring = torch.tensor([[1 / 3 if abs(i - j) in (0, 1, 4) else 0.0 for j in range(5)] for i in range(5)])
    expected = ring @ theta
    MatchedMerge(population, spec, "identity")(theta, ring)
    torch.testing.assert_close(theta, expected, atol=1e-6, rtol=1e-6)


def test_the_single_merge_studies_run_the_papers_round_structure():
    from gossiplab.sweep import load_sweep, variant_configs

    for name in ("merge-budget", "merge-window"):
        for config in variant_configs(load_sweep(name), [], 1).values():
            train, gossip = config.train, config.gossip
            assert (train.optimizer, train.lr, train.weight_decay) == ("adamw", 5e-4, 5e-4)
            assert gossip.every == 100 and config.model.init == "independent" and gossip.final_merge == "exact"


@pytest.mark.long
def test_runs_in_worker_processes_give_a_serial_runs_numbers(tmp_path, monkeypatch):
    """Also when this process holds a config section from a module the workers cannot import (a
    plug-in loaded from a notebook's folder): the workers get each config as its TOML text."""
    notebook_plugin = types.ModuleType("notebook_only_plugin")
    section = dataclasses.make_dataclass("NotebookSection", [("strength", float, 1.0)])
    section.__module__ = notebook_plugin.__name__
    notebook_plugin.NotebookSection = section
    monkeypatch.setitem(sys.modules, notebook_plugin.__name__, notebook_plugin)
    monkeypatch.setitem(SECTIONS, "notebook", section)
    overrides = ["num_sites=4", "train.steps=30", "eval.every=10", "train.threads=1", "data.test_per_source=500"]
    runs = [(build_config("default", [*overrides, f"seed={seed}"]), tmp_path / "jobs" / str(seed)) for seed in (0, 1)]
    run_in_processes(runs, 2)
    for config, folder in runs:
        run_one(config, tmp_path / "serial" / str(config.seed))
        serial = (tmp_path / "serial" / str(config.seed) / "metrics.jsonl").read_text().splitlines()
        parallel = (folder / "metrics.jsonl").read_text().splitlines()
        assert [line.split('"wall')[0] for line in parallel] == [line.split('"wall')[0] for line in serial]


def test_jobs_whose_threads_do_not_fit_the_cores_are_warned_with_the_count_that_fits():
    assert oversubscription(2, 1, 2) is None and oversubscription(4, 2, 8) is None
    warning = oversubscription(2, 2, 2)
    assert warning is not None and "2 jobs x 2 threads a run = 4 threads on 2 cores" in warning
    assert warning.endswith("train.threads=1 fits them")
    assert oversubscription(3, 8, 16).endswith("train.threads=5 fits them")


def test_dice_influence_is_the_raw_one_hop_score_of_each_receivers_held_out_gradient(tmp_path):
    """W_i = softmax_j(lr W_ij <g'_i, g_j> / T) over i and its peers, checked entry by entry; the
    sites' training gradients are left as they were for the optimizer."""

    config = build_config(
        "default", ["num_sites=4", "gossip.mixing=influence-dice", "gossip.dice_temperature=0.01", "model.hidden=[16]"]
    )
    experiment = build_experiment(config)
    population = experiment.population
    x, y = experiment.federation.sample_batch(8, torch.Generator().manual_seed(0))
    population.compute_gradients(x, y)
    training = population.grad.clone()
    ring = torch.tensor([[abs(i - j) in (1, 3) for j in range(4)] for i in range(4)])
    weights = MIXING_RULES.get("influence-dice")(ring, experiment)
    assert torch.equal(population.grad, training)
    federation = experiment.federation
    batch = config.sections["fomo"].val_batch
    vx, vy = sample_held_out(federation.val_x, federation.val_y, federation.val_site, 4, batch,
                             torch.Generator().manual_seed(config.seed + 3))  # fmt: skip
    population.compute_gradients(vx, vy)
    held_out = population.grad.clone()
    base = uniform(ring)
    for i in range(4):
        candidates = [j for j in range(4) if base[i, j] > 0]
        scores = torch.stack([experiment.optimizer.lr * base[i, j] * held_out[i] @ training[j] for j in candidates])
        expected = torch.softmax(scores / 0.01, 0)
        torch.testing.assert_close(weights[i, candidates], expected, atol=1e-6, rtol=1e-5)
        assert float(weights[i].sum()) == pytest.approx(1.0)
    with pytest.raises(
        ConfigError, match=r"data\.val_fraction' = 0\.0: must be > 0 with gossip\.mixing = 'influence-dice'"
    ):
        build_config("default", ["gossip.mixing=influence-dice", "data.val_fraction=0"])
