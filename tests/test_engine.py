"""The vectorized engine equals the per-site reference (nn.Module + torch.optim, loop over sites)."""

from __future__ import annotations

import copy

import pytest
import torch

from gossiplab.config import ModelConfig, TrainConfig
from gossiplab.merge import GossipAverager
from gossiplab.mixing import mixing_matrix
from gossiplab.models import build_model
from gossiplab.optim import build_optimizer
from gossiplab.population import Population
from gossiplab.topology import build_adjacency
from reference import load_flat, reference_training

ENGINE_OPTIMIZERS = {
    "sgd": TrainConfig(optimizer="sgd", lr=0.05, momentum=0.0),
    "momentum": TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": TrainConfig(optimizer="adam", lr=1e-3, weight_decay=1e-3),
    "adamw": TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-2),
}
NUM_SITES, BATCH, STEPS = 5, 8, 6


def train_engine(population, optimizer, batches, mixing, kernels="numba"):
    """Steps of the engine, gossiping after step t with mixing[t] if given; returns the losses."""
    opt = build_optimizer(ENGINE_OPTIMIZERS[optimizer], population.parameters.shape)
    averager = GossipAverager(population.theta.shape, kernels)
    losses = []
    for (x, y), weights in zip(batches, mixing, strict=True):
        losses.append(population.compute_gradients(x, y))
        opt.step(population.parameters, population.grad)
        if weights is not None:
            averager(population.theta, weights)
    return losses


def run_engine(module, strategy, optimizer, batches, mixing):
    population = Population(module, NUM_SITES, seed=3, init="independent", strategy=strategy)
    initial = population.theta.clone()
    return initial, population, train_engine(population, optimizer, batches, mixing)


def make_batches(input_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(NUM_SITES, BATCH, *input_shape, generator=g),
            torch.randint(0, 10, (NUM_SITES, BATCH), generator=g),
        )
        for _ in range(STEPS)
    ]


def make_mixing():
    """Gossip after steps 2, 4 and 6: a random one-peer round, a ring (Metropolis), the complete graph."""
    rounds = {
        1: mixing_matrix(build_adjacency("random-one-peer", NUM_SITES, 0, seed=1), "uniform"),
        3: mixing_matrix(build_adjacency("ring", NUM_SITES, 1, seed=1), "metropolis"),
        5: mixing_matrix(build_adjacency("complete", NUM_SITES, 2, seed=1), "uniform"),
    }
    return [rounds.get(t) for t in range(STEPS)]


MODELS = {  # name: (config, input shape)
    "mlp": (ModelConfig(name="mlp", hidden=[32, 16]), (1, 8, 8)),
    "cnn": (ModelConfig(name="cnn", channels=[4, 8]), (1, 12, 12)),
}


@pytest.mark.parametrize("optimizer", list(ENGINE_OPTIMIZERS))
@pytest.mark.parametrize(
    ("model", "strategy"),
    [("mlp", s) for s in ("linear", "linear-chunked", "vmap", "vmap-chunked", "loop")]
    + [("cnn", s) for s in ("vmap", "vmap-chunked", "loop")],  # "linear" refuses a CNN (tested below)
)
def test_engine_equals_per_site_reference(model, optimizer, strategy, monkeypatch):
    """Parameters and losses to 1e-5 relative. The CNN needs no looser bound: on CPU the vmapped
    convolution matched the single-model kernel to 1e-6 here; a GPU kernel may sum in another order.
    "-chunked" runs over chunks of one site, as large runs do over several chunks. "linear"
    (the written-out backward) exists for linear stacks only."""
    if strategy.endswith("-chunked"):
        strategy = strategy.removesuffix("-chunked")
        monkeypatch.setattr(Population, f"{strategy.upper()}_CHUNK_FLOATS", 1)  # one site per chunk
    config, input_shape = MODELS[model]
    module = build_model(config, input_shape, 10)
    batches, mixing = make_batches(input_shape), make_mixing()
    initial, population, losses = run_engine(module, strategy, optimizer, batches, mixing)
    theta = population.theta
    expected, expected_losses = reference_training(module, initial, batches, optimizer, mixing)
    assert not torch.equal(theta, initial)
    torch.testing.assert_close(theta, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected_losses), rtol=1e-5, atol=1e-6)


def test_auto_strategy_is_loop_for_convolutions_linear_for_mlps_and_vmap_otherwise():
    cnn = build_model(ModelConfig(name="cnn", channels=[4]), (1, 8, 8), 10)
    mlp = build_model(ModelConfig(name="mlp", hidden=[8]), (1, 8, 8), 10)
    text_head = build_model(ModelConfig(name="mlp", hidden=[8], head="text"), (16,), 3, torch.randn(3, 4))
    assert Population(cnn, 2, seed=0).strategy == "loop"
    assert Population(mlp, 2, seed=0).strategy == "linear"
    assert Population(text_head, 2, seed=0).strategy == "vmap"
    with pytest.raises(ValueError, match="linear stack"):
        Population(cnn, 2, seed=0, strategy="linear")


def test_linear_backward_with_a_class_mask_equals_vmap():
    """Each site scoring only its own classes (MAZEL's private label spaces): the written-out
    backward equals autograd through vmap, and the mask changes the gradients."""
    module = build_model(ModelConfig(name="mlp", hidden=[16]), (1, 6, 6), 10)
    x, y = make_batches((1, 6, 6))[0]
    mask = torch.rand(NUM_SITES, 10, generator=torch.Generator().manual_seed(0)) < 0.5
    mask[torch.arange(NUM_SITES)[:, None], y] = True
    unmasked = Population(module, NUM_SITES, seed=0, init="independent", strategy="linear")
    unmasked.compute_gradients(x, y)
    results = []
    for strategy in ("linear", "vmap"):
        population = Population(module, NUM_SITES, seed=0, init="independent", strategy=strategy, class_mask=mask)
        results.append((population.compute_gradients(x, y), population.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(results[0][1], unmasked.grad)


def test_shared_init_gives_identical_rows_and_independent_differs():
    module = build_model(ModelConfig(name="mlp", hidden=[8]), (1, 8, 8), 10)
    shared = Population(module, 3, seed=0, init="shared").theta
    independent = Population(module, 3, seed=0, init="independent").theta
    assert torch.equal(shared[0], shared[2])
    assert not torch.equal(independent[0], independent[1])


@pytest.mark.parametrize("strategy", ["vmap", "linear", "loop"])
def test_predict_matches_each_row_called_alone(strategy, monkeypatch):
    """Whichever strategy evaluates (vmapped, or one model at a time in chunks of inputs: here 16
    of 50), and, with `allowed`, each input classified among its own allowed classes only."""
    monkeypatch.setattr(Population, "EVAL_CHUNK_INPUTS", 16)
    module = build_model(ModelConfig(name="mlp", hidden=[16]), (1, 8, 8), 10)
    population = Population(module, 4, seed=0, init="independent", strategy=strategy)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 1, 8, 8, generator=generator)
    allowed = torch.rand(50, 10, generator=generator) < 0.3
    allowed[:, 0] = True
    predictions = population.predict(population.theta, x)
    masked = population.predict(population.theta, x, allowed)
    for i in range(4):
        logits = torch.func.functional_call(module, population.views(population.theta[i]), (x,))
        assert torch.equal(predictions[i], logits.argmax(-1))
        assert torch.equal(masked[i], logits.masked_fill(~allowed, -torch.inf).argmax(-1))
    assert not torch.equal(predictions, masked)


def batchnorm_batches(num_sites: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(num_sites, BATCH, 1, 8, 8, generator=g), torch.randint(0, 10, (num_sites, BATCH), generator=g))
        for _ in range(steps)
    ]


@pytest.fixture
def float64():
    """Float64 everywhere (population, reference): a ReLU network with BatchNorm has units within
    float32 rounding of 0, and two correct strategies that round differently (vmap's batched
    convolutions vs single-model ones, 1e-7 apart) flip one now and then; a flipped unit changed a
    site's gradient by up to 3% (measured: 1e-7 noise on theta, gradients moved by 0.03 on some
    sites, 1.5e-5 on the rest). In float64 no unit is that close, and equal means 1e-9."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize(("strategy", "dropout"), [("loop", 0.3), ("vmap", 0.0)])
def test_a_batchnorm_resnet_with_dropout_equals_the_per_site_reference_statistics_included(strategy, dropout, float64):
    """ResNet-20 with BatchNorm (and dropout in the loop strategy) on 8 sites: 4 steps in train
    mode with gossip after steps 1 and 3 (parameters and running statistics mixed), then each
    site's eval-mode outputs, which read its own running statistics. The loop's dropout draws
    from per-site streams, the reference's from the same streams. vmap draws dropout for all its
    sites from one stream (randomness="different"), which no per-site reference reproduces: its
    dropout is tested for reproducibility and independence below."""
    num_sites = 8
    module = build_model(ModelConfig(name="resnet20", norm="batch", dropout=dropout), (1, 8, 8), 10)
    population = Population(module, num_sites, seed=3, strategy=strategy)
    initial, streams = population.theta.clone(), population.random_streams.clone()
    batches = [(x.double(), y) for x, y in batchnorm_batches(num_sites, 4)]
    ring = mixing_matrix(build_adjacency("ring", num_sites, 0, seed=1), "metropolis").double()
    mixing = [ring, None, ring, None]
    losses = train_engine(population, "momentum", batches, mixing, kernels="torch")  # numba's kernels are float32
    expected, expected_losses = reference_training(
        module, initial, batches, "momentum", mixing, streams if dropout else None
    )
    statistics = population.theta[:, population.num_parameters :]
    assert not torch.equal(statistics, initial[:, population.num_parameters :])  # running stats moved
    torch.testing.assert_close(population.theta, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected_losses), rtol=1e-9, atol=1e-9)
    test_x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    models = [copy.deepcopy(module) for _ in range(num_sites)]
    for model, row in zip(models, expected, strict=True):
        load_flat(model, row)
    with torch.no_grad():
        outputs = torch.stack([model.eval()(test_x) for model in models])
    torch.testing.assert_close(population.logits(population.theta, test_x), outputs, rtol=1e-9, atol=1e-9)
    assert population.module.training  # back in train mode after evaluating


def test_vmap_dropout_is_reproducible_from_the_seed_and_independent_across_sites():
    module = build_model(ModelConfig(name="mlp", hidden=[32], dropout=0.5), (1, 8, 8), 10)
    x, y = batchnorm_batches(4, 1)[0]
    x = x[:, :1].expand(4, BATCH, 1, 8, 8)  # every site the same batch
    y = y[:1].expand(4, BATCH)
    grads = []
    for _ in range(2):
        population = Population(module, 4, seed=3, strategy="vmap")
        population.compute_gradients(x, y)
        grads.append(population.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)  # the same seed: the same draws
    assert not torch.allclose(grads[0][0], grads[0][1])  # same model and batch, different masks


def test_auto_picks_the_loop_for_random_layers_and_a_user_loss_leaves_the_linear_engine():
    dropout_mlp = build_model(ModelConfig(name="mlp", hidden=[16], dropout=0.2), (1, 4, 4), 10)
    assert Population(dropout_mlp, 2, seed=0).strategy == "loop"
    mlp = build_model(ModelConfig(name="mlp", hidden=[16]), (1, 4, 4), 10)
    assert Population(mlp, 2, seed=0).strategy == "linear"

    def squared_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (logits.softmax(-1) - torch.nn.functional.one_hot(targets, 10)).square().sum(-1).mean()

    population = Population(mlp, 3, seed=0, loss=squared_error)
    assert population.strategy == "vmap"
    x, y = batchnorm_batches(3, 1)[0]
    x = x[..., :4, :4]
    losses = population.compute_gradients(x, y)
    for i in range(3):
        model = copy.deepcopy(mlp)
        load_flat(model, population.theta[i])
        loss = squared_error(model(x[i]), y[i])
        loss.backward()
        torch.testing.assert_close(losses[i], loss.detach(), rtol=1e-6, atol=1e-7)
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        torch.testing.assert_close(population.grad[i], grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="cross-entropy"):
        Population(mlp, 2, seed=0, strategy="linear", loss=squared_error)
