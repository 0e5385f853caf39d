"""Any model, any device: torch-only kernels equal the compiled ones, devices are checked before
any work, FedBN keeps normalisation layers local, and a user's loss trains through the API."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import gossiplab
from gossiplab.assembly import build_data_and_model, memory_estimate
from gossiplab.catalogue import build_config
from gossiplab.config import ConfigError, ModelConfig
from gossiplab.merge import GossipAverager
from gossiplab.mixing import mixing_matrix
from gossiplab.models import build_model
from gossiplab.population import Population
from gossiplab.runner import Runner
from gossiplab.topology import build_adjacency
from resume import stopped_then_resumed

TINY = ["num_sites=4", "train.steps=40", "eval.every=20"]


@pytest.mark.parametrize("topology", ["ring", "exponential", "random-one-peer", "complete", "dense"])
def test_torch_kernels_equal_the_compiled_ones(topology):
    """The torch-only gossip (what runs off the CPU) against the compiled sparse pass and the
    GEMM paths, on every shape of W they serve."""
    num_sites, width = 16, 5000
    if topology == "dense":  # every weight different: the blocked GEMM
        weights = torch.rand(num_sites, num_sites, generator=torch.Generator().manual_seed(1)).softmax(1)
    else:
        weights = mixing_matrix(build_adjacency(topology, num_sites, 3, seed=1, p=0.5), "metropolis")
    theta = torch.randn(num_sites, width, generator=torch.Generator().manual_seed(0))
    compiled, torch_only = theta.clone(), theta.clone()
    GossipAverager(theta.shape, "numba")(compiled, weights)
    GossipAverager(theta.shape, "torch")(torch_only, weights)
    assert not torch.equal(compiled, theta)
    torch.testing.assert_close(torch_only, compiled, rtol=1e-6, atol=1e-6)


def test_a_run_on_torch_kernels_equals_the_default_run(tmp_path):
    runs = {}
    for kernels in ("auto", "torch"):
        config = build_config("default", [*TINY, f"train.kernels={kernels}"])
        runner = Runner(config, tmp_path / kernels, show_progress=False)
        runs[kernels] = (runner.run(), runner.experiment.population.theta)
        averager = runner.experiment.algorithm.averager(runner.experiment.population.theta)
        assert averager.kernels == {"auto": "numba", "torch": "torch"}[kernels]  # auto: compiled on the CPU
    torch.testing.assert_close(runs["torch"][1], runs["auto"][1], rtol=1e-5, atol=1e-6)
    assert abs(runs["torch"][0]["ala"] - runs["auto"][0]["ala"]) < 1e-6


def test_without_numba_auto_takes_the_torch_kernels_and_numba_is_refused_naming_the_extra(tmp_path, monkeypatch):
    """numba is the optional `compiled` extra: a core-only install runs (here the default's one-peer
    W, which the compiled pass serves when numba is there) on torch, with the same numbers."""
    with_numba = Runner(build_config("default", TINY), tmp_path / "numba", show_progress=False).run()
    monkeypatch.setitem(sys.modules, "numba", None)  # what importing it is like when it is not installed
    runner = Runner(build_config("default", TINY), tmp_path / "torch", show_progress=False)
    assert runner.experiment.algorithm.averager(runner.experiment.population.theta).kernels == "torch"
    assert abs(runner.run()["ala"] - with_numba["ala"]) < 1e-6
    with pytest.raises(ConfigError, match=r"train.kernels.*pip install 'gossiplab\[compiled\]'"):
        build_config("default", ["train.kernels=numba"])


def test_a_device_this_machine_lacks_or_an_unknown_one_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"field 'train.device' = 'tpu': unknown device; allowed: cpu, cuda"):
        build_config("default", ["train.device=tpu"])
    with pytest.raises(ConfigError, match=r"train.kernels.*'numba' runs on the CPU only"):
        build_config("default", ["train.device=auto", "train.kernels=numba"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"train.device' = 'cuda:1': CUDA is not available"):
            build_config("default", ["train.device=cuda:1"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_run_matches_the_cpu_run(tmp_path):
    rows = {}
    for device in ("cpu", "cuda"):
        config = build_config("default", [*TINY, f"train.device={device}"])
        rows[device] = Runner(config, tmp_path / device, show_progress=False).run()
    assert abs(rows["cuda"]["ala"] - rows["cpu"]["ala"]) < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_runs_on_cuda(gossiplab_main, tmp_path):
    out = tmp_path / "bench.json"
    code, _, err = gossiplab_main(
        "bench", "--device", "cuda", "--models", "mlp,cnn", "--sites", "4", "--repeats", "1", "--seconds", "0.05",
        "--json", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out.read_text())["device"] == "cuda"


@pytest.mark.parametrize("normalization", ["average", "local"])
def test_fedbn_keeps_normalisation_layers_local_and_averages_the_rest(tmp_path, normalization):
    """Complete graph, uniform weights, gossip after every step (the last one included): every
    column is the sites' common average, except under FedBN the BatchNorm layers', which differ."""
    config = build_config("default", [
        "num_sites=4", "train.steps=6", "eval.every=6", "model.name=cnn", "model.channels=[4]", "model.norm=batch",
        "gossip.topology=complete",
        "gossip.every=1", f"gossip.normalization={normalization}",
    ])  # fmt: skip
    runner = Runner(config, tmp_path, show_progress=False)
    runner.run()
    population = runner.experiment.population
    theta, norm = population.theta, population.normalization_columns()
    assert len(norm) == 4 * 2 + 4 * 2 + 1  # affine weight and bias, running mean and variance, the counter
    shared = torch.ones(theta.shape[1], dtype=torch.bool)
    shared[norm] = False
    torch.testing.assert_close(theta[:, shared], theta[:1, shared].expand(4, -1), rtol=1e-5, atol=1e-6)
    spread = (theta[:, norm] - theta[:1, norm]).abs().amax()
    assert (spread > 1e-3) if normalization == "local" else (spread < 1e-5)


def squared_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Brier score: the squared distance of the softmax to the one-hot target."""
    return (logits.softmax(-1) - torch.nn.functional.one_hot(targets, logits.shape[-1])).square().sum(-1).mean()


def test_a_users_loss_trains_through_the_api_and_is_recorded(tmp_path):
    result = gossiplab.run("default", TINY, run_dir=tmp_path / "run", loss_fn=squared_error)
    assert result.summary["ala"] > 0.4  # 10 classes: chance is 0.1
    assert build_config(path=tmp_path / "run" / "config.toml").train.loss == "test_devices.squared_error"
    assert result.summary["strategy"] == "vmap"  # the linear engine's backward is cross-entropy's


def test_the_memory_estimate_counts_the_buffers_of_every_site():
    """BatchNorm and GroupNorm carry the same affine parameters; BatchNorm adds its running mean
    and variance per channel and a step count per layer, in every site's row."""
    estimates = {}
    for norm in ("group", "batch"):
        config = build_config(
            "default", ["num_sites=8", "model.name=cnn", "model.channels=[16,32]", f"model.norm={norm}"]
        )
        federation, module = build_data_and_model(config)
        estimates[norm] = memory_estimate(config, federation, module)
    buffers = (2 * 16 + 1) + (2 * 32 + 1)
    assert estimates["batch"]["population"] - estimates["group"]["population"] == 8 * buffers * 4
    assert estimates["batch"]["gradients and optimizer state"] == estimates["group"]["gradients and optimizer state"]


def test_vmap_dropout_resumes_exactly(tmp_path):
    """The random stream is checkpointed: stopped at step 20 and resumed, a vmapped MLP with dropout
    ends where the uninterrupted run does, bit for bit."""
    config = build_config("default", [*TINY, "model.dropout=0.3", "train.engine=vmap"])
    full = Runner(config, tmp_path / "full", show_progress=False)
    full.run()
    resumed = stopped_then_resumed(config, tmp_path / "half", stop_step=20)
    assert torch.equal(resumed.experiment.population.theta, full.experiment.population.theta)
    assert torch.equal(resumed.experiment.population.random_streams, full.experiment.population.random_streams)


def test_a_resnet_on_full_size_images_is_not_refused_for_memory_it_does_not_use():
    """Evaluation runs one model on 4,096 inputs at a time outside vmap; the estimate counted 2**16
    inputs for every strategy and refused a 4-site ResNet-20 on 28x28 images (125 GiB)."""
    config = build_config("default", ["num_sites=4", "model.name=resnet20", "model.norm=batch"])
    federation, module = build_data_and_model(config)
    assert sum(memory_estimate(config, federation, module).values()) < 12 * 2**30


def test_constant_buffers_are_not_per_site_state():
    """MAZEL's frozen class-name embeddings are a buffer of the text head, the same on every site
    and never trained: not stacked into the rows, gossiped nor counted in the bytes sent."""
    module = build_model(ModelConfig(name="mlp", hidden=[8], head="text"), (16,), 5, torch.randn(5, 12))
    population = Population(module, 3, seed=0)
    assert population.num_buffers == 0 and population.theta.shape == (3, population.num_parameters)
