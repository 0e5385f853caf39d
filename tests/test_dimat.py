"""DIMAT: permutation specs, activation and weight matching, matched merges, and the baselines."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from gossiplab.algorithms.dimat.matching import MatchedMerge, activations, match_activations, match_weights
from gossiplab.algorithms.sgp import SGP, push_sum_matrix
from gossiplab.assembly import build_experiment
from gossiplab.catalogue import build_config
from gossiplab.communicator import SingleProcess
from gossiplab.config import ModelConfig
from gossiplab.models import build_model
from gossiplab.permutation import permutation_spec, permuted_index, random_permutations
from gossiplab.population import Population
from gossiplab.runner import Runner
from gossiplab.topology import build_adjacency
from reference import flat_parameters, load_flat
from resume import stopped_then_resumed

ARCHITECTURES = [
    ("mlp", (1, 28, 28), {}),
    ("cnn", (1, 28, 28), {}),
    ("resnet20", (3, 16, 16), {"width": 1}),
    ("resnet20", (1, 12, 12), {"width": 2}),
    ("resnet20", (3, 16, 16), {"norm": "batch", "dropout": 0.2}),
    ("cnn", (1, 28, 28), {"norm": "batch"}),
]


def population_of(name: str, shape: tuple[int, ...], sites: int = 2, **model) -> Population:
    module = build_model(ModelConfig(name=name, **model), shape, 10)
    return Population(module, sites, seed=0, init="independent")


def outputs(population: Population, row: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Eval mode: BatchNorm on the row's running statistics, no dropout."""
    with population.evaluating():
        return torch.func.functional_call(population.module, population.views(row), (x,))


@pytest.mark.parametrize(("name", "shape", "model"), ARCHITECTURES)
def test_permuting_hidden_units_leaves_the_function_unchanged(name, shape, model):
    population = population_of(name, shape, **model)
    population.theta[:, population.num_parameters :].uniform_(0.5, 1.5)  # BatchNorm statistics, not 0 and 1
    spec = permutation_spec(population.module, shape)
    perms = random_permutations(spec, torch.Generator().manual_seed(3))
    index = permuted_index(spec, population.names, population.shapes, perms)
    width = population.theta.shape[1]
    assert torch.equal(index.sort().values, torch.arange(width))  # a permutation of the row
    assert not torch.equal(index, torch.arange(width))
    x = torch.randn(6, *shape)
    theta = population.theta[0]
    torch.testing.assert_close(
        outputs(population, theta[index], x), outputs(population, theta, x), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(("name", "shape", "model"), ARCHITECTURES[:3])
def test_matching_a_permuted_copy_recovers_the_permutation_and_the_merge_returns_the_model(name, shape, model):
    population = population_of(name, shape, **model)
    spec = permutation_spec(population.module, shape)
    perms = random_permutations(spec, torch.Generator().manual_seed(5))
    original = population.theta[0].clone()
    index = permuted_index(spec, population.names, population.shapes, perms)
    population.theta[1] = original[index]  # the same model with its hidden units shuffled
    x = torch.randn(64, *shape)
    reference = activations(population.module, spec, population.views(population.theta[0]), x)
    shuffled = activations(population.module, spec, population.views(population.theta[1]), x)
    found = match_activations(reference, shuffled, spec)
    inverse = [torch.argsort(p) for p in perms]  # new unit k of the shuffled copy is old unit perms[k]
    assert all(torch.equal(f, i) for f, i in zip(found, inverse, strict=True))
    by_weights = match_weights(spec, population.names, population.shapes, population.theta[0], population.theta[1])
    assert all(torch.equal(f, i) for f, i in zip(by_weights, inverse, strict=True))
    for method in ("activation-matching", "weight-matching"):
        theta = population.theta.clone()
        MatchedMerge(population, spec, method, x.expand(2, *x.shape))(theta, torch.full((2, 2), 0.5))
        torch.testing.assert_close(theta[0], original, atol=1e-6, rtol=1e-6)


def test_matched_merge_of_identical_models_is_that_model():
    population = population_of("cnn", (1, 28, 28), sites=4)
    population.theta.copy_(population.theta[2].expand(4, -1))
    spec = permutation_spec(population.module, (1, 28, 28))
    theta = population.theta.clone()
    weights = torch.full((4, 4), 0.25)
    MatchedMerge(population, spec, "activation-matching", torch.randn(4, 32, 1, 28, 28))(theta, weights)
    torch.testing.assert_close(theta, population.theta, atol=1e-6, rtol=1e-6)


def test_matched_merge_beats_plain_averaging_for_models_trained_from_different_inits(tmp_path):
    """Two MLPs from independent initialisations, trained on real Fashion-MNIST (iid halves)."""
    config = build_config(
        "default",
        [
            "num_sites=2",
            "data.partition=iid",
            "model.init=independent",
            "gossip.schedule=none",
            "train.steps=400",
            "eval.every=400",
            "model.hidden=[128]",
        ],
    )
    experiment = build_experiment(config)
    (tmp_path / "run").mkdir()
    Runner(config, tmp_path / "run", show_progress=False, experiment=experiment).run()
    population, federation = experiment.population, experiment.federation
    spec = permutation_spec(population.module, federation.image_shape)
    weights = torch.full((2, 2), 0.5)
    accuracy = {}
    plain = population.theta.mean(0, keepdim=True)
    accuracy["average"] = float((population.predict(plain, federation.test_x) == federation.test_y).float().mean())
    inputs, _ = federation.sample_batch(256, torch.Generator().manual_seed(1))
    for method in ("activation-matching", "weight-matching"):
        theta = population.theta.clone()
        MatchedMerge(population, spec, method, inputs)(theta, weights)
        accuracy[method] = float((population.predict(theta[:1], federation.test_x) == federation.test_y).float().mean())
    assert accuracy["activation-matching"] > accuracy["average"] + 0.05, accuracy
    assert accuracy["weight-matching"] > accuracy["average"] + 0.05, accuracy


def test_push_sum_is_column_stochastic_and_preserves_the_mass():
    torch.manual_seed(0)
    theta = torch.randn(5, 3)
    links = torch.rand(5, 5) < 0.4  # an irregular directed graph
    links.diagonal().fill_(False)
    sgp, state = push_sum(theta)
    mass_before = theta.sum(0)
    for _ in range(3):
        sgp.communicate(push_sum_matrix(links.float()), state, SingleProcess(5))
        # sum_i x_i = sum_i w_i z_i and sum_i w_i are invariant under column-stochastic mixing
        torch.testing.assert_close((state["push_sum_weights"][:, None] * theta).sum(0), mass_before)
        assert state["push_sum_weights"].sum() == pytest.approx(5.0)
    ring, ring_state = push_sum(torch.randn(5, 3))
    ring.communicate(push_sum_matrix(build_adjacency("ring", 5, 0, seed=0).float()), ring_state, SingleProcess(5))
    torch.testing.assert_close(ring_state["push_sum_weights"], torch.ones(5))  # regular graph: SGP is DSGD


def push_sum(theta: torch.Tensor) -> tuple[SGP, dict]:
    """SGP on a bare population of rows theta (the algorithm reads only experiment.population.theta)."""
    sgp = SGP(SimpleNamespace(population=SimpleNamespace(theta=theta)))
    return sgp, sgp.init()


@pytest.mark.parametrize(
    "overrides",
    [
        ["gossip.algorithm=dimat", "gossip.topology=ring"],
        ["gossip.algorithm=weight-matching", "gossip.topology=complete"],
        ["gossip.algorithm=sgp", "gossip.topology=exponential"],
        ["gossip.algorithm=cdsgd", "gossip.topology=ring", "gossip.every=1"],
        [
            "gossip.algorithm=dimat",
            "gossip.topology=ring",
            "model.name=cnn",
            "model.channels=[4]",
            "model.norm=batch",
            "model.dropout=0.2",
            "data.test_per_source=1000",
            "dimat.match_samples=64",
        ],
    ],
    ids=["dimat-ring", "wm-complete", "sgp", "cdsgd", "dimat-batchnorm-dropout"],
)
def test_dimat_and_baselines_run_end_to_end_and_resume_exactly(tmp_path, overrides):
    common = ["num_sites=4", "data.partition=iid", "train.steps=40", "eval.every=20", "gossip.every=10"]
    config = build_config("default", [*common, *overrides])
    (tmp_path / "full").mkdir()
    full = Runner(config, tmp_path / "full", show_progress=False).run()
    assert full["ala"] > 0.4
    resumed = stopped_then_resumed(config, tmp_path / "half", stop_step=20)
    final = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["theta"]
    assert torch.equal(resumed.experiment.population.theta, final)


def test_statistics_reestimated_after_a_merge_are_each_sites_own_cumulative_average():
    """Reset, then BatchNorm's cumulative average (momentum None) over each site's own batches,
    with dropout off: what a lone BatchNorm network computes on the same batches."""
    module = build_model(ModelConfig(name="cnn", channels=[4], norm="batch", dropout=0.5), (1, 12, 12), 10)
    population = Population(module, 2, seed=0, init="independent")
    population.theta[:, population.num_parameters :] = 7.0  # merged statistics that belong to no network
    batches = [torch.randn(2, 16, 1, 12, 12, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    population.reestimate_statistics(batches)
    for site in range(2):
        reference = copy.deepcopy(module)
        load_flat(reference, population.theta[site])
        norm = reference[1]
        norm.reset_running_stats()
        norm.momentum = None
        reference.eval()
        norm.train()
        with torch.no_grad():
            for x in batches:
                reference(x[site])
        torch.testing.assert_close(population.theta[site], flat_parameters(reference), rtol=1e-6, atol=1e-6)
        assert norm.num_batches_tracked == 3
