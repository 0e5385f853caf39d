"""L2C: learned mixing weights, their gradient, pruning, and a real run on the shard tasks."""

from __future__ import annotations

import pytest
import torch

from gossiplab.algorithms.l2c.learned import LearnedMixing, MetaLearnedMixing
from gossiplab.assembly import build_experiment
from gossiplab.catalogue import build_config
from gossiplab.config import ConfigError
from gossiplab.mixing import fomo, uniform
from gossiplab.runner import Runner
from gossiplab.topology import build_adjacency
from resume import stopped_then_resumed


def learned(lr: float = 0.1, sites: int = 6, topology: str = "complete", **kwargs) -> LearnedMixing:
    # the validation share these finite differences were sized on: with the preset's 20% a ReLU
    # kink falls within one step of alpha[0, 5] and the central difference is off by 3%
    config = build_config("l2c", ["num_sites=20", "model.hidden=[16]", "data.val_fraction=0.1"])
    experiment = build_experiment(config)
    candidates = build_adjacency(topology, 20, 0, seed=0)
    options = {"weight_decay": 0.0, "prune_round": 0, "keep": 3, "val_batch": 16, "seed": 0, **kwargs}
    return LearnedMixing(experiment.population, experiment.federation, candidates, lr=lr, **options)


def drifted(mixing: LearnedMixing) -> torch.Tensor:
    """theta^(t+1/2): every site moved away from its round start."""
    generator = torch.Generator().manual_seed(1)
    return mixing.round_start + 0.05 * torch.randn(mixing.round_start.shape, generator=generator)


def test_weights_are_a_distribution_over_each_sites_candidates():
    mixing = learned(topology="ring")
    with torch.no_grad():
        mixing.alpha.copy_(torch.randn(20, 20))
    weights = mixing.weights()
    torch.testing.assert_close(weights.sum(1), torch.ones(20))
    assert (weights >= 0).all() and (weights[~mixing.mask] == 0).all()
    assert mixing.mask.sum(1).tolist() == [3] * 20  # ring neighbours and itself


def test_with_alpha_frozen_l2c_is_update_aggregation_with_the_initial_uniform_weights():
    mixing = learned(lr=0.0)
    start = mixing.round_start.clone()
    for _ in range(2):
        half = drifted(mixing)
        theta = half.clone()
        mixing(theta, torch.empty(0))
        expected = start - uniform(build_adjacency("complete", 20, 0, seed=0)) @ (start - half)
        torch.testing.assert_close(theta, expected)
        start = expected
    torch.testing.assert_close(mixing.alpha, torch.zeros(20, 20))


def test_alpha_gradient_matches_finite_differences():
    mixing = learned()
    half = drifted(mixing)
    x, y = mixing.validation_batch()
    with torch.no_grad():
        mixing.alpha.copy_(0.3 * torch.randn(20, 20, generator=torch.Generator().manual_seed(2)))
    loss = mixing.validation_loss(half, x, y)
    (gradient,) = torch.autograd.grad(loss, mixing.alpha)
    for i, j in [(0, 0), (0, 5), (7, 3), (19, 12)]:
        step = 1e-2
        with torch.no_grad():
            mixing.alpha[i, j] += step
            up = float(mixing.validation_loss(half, x, y))
            mixing.alpha[i, j] -= 2 * step
            down = float(mixing.validation_loss(half, x, y))
            mixing.alpha[i, j] += step
        assert gradient[i, j] == pytest.approx((up - down) / (2 * step), rel=2e-2, abs=1e-4)


def test_pruning_keeps_exactly_k0_neighbours_the_largest():
    mixing = learned(prune_round=1, keep=3)
    with torch.no_grad():
        mixing.alpha.copy_(torch.randn(20, 20, generator=torch.Generator().manual_seed(3)))
    before = mixing.weights().detach()
    theta = drifted(mixing)
    mixing.optimizer.param_groups[0]["lr"] = 0.0  # prune on the weights above
    mixing(theta, torch.empty(0))
    assert mixing.mask.sum(1).tolist() == [4] * 20  # 3 neighbours and itself
    for i in range(20):
        others = before[i].clone()
        others[i] = -1
        assert set(mixing.mask[i].nonzero().flatten().tolist()) == {i, *others.topk(3).indices.tolist()}
    assert (mixing.weights() != 0).sum() == 80  # communication follows the pruned graph


def test_l2c_run_learns_to_listen_to_same_task_sites_and_resumes_exactly(tmp_path):
    overrides = ["train.steps=400", "eval.every=200", "l2c.prune_round=2", "model.hidden=[64]"]
    config = build_config("l2c", overrides)
    (tmp_path / "full").mkdir()
    summary = Runner(config, tmp_path / "full", show_progress=False).run()
    assert summary["ala"] > 0.7  # chance: 0.1 (10-way prediction, each site holds 2 classes)
    assert summary["learned_weight_same_task"] > 2 * summary["learned_weight_other_task"]
    history = torch.load(tmp_path / "full" / "learned_weights.pt")
    assert history.shape == (4, 20, 20) and (tmp_path / "full" / "learned_weights.png").is_file()
    resumed = stopped_then_resumed(config, tmp_path / "half", stop_step=200)
    final = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    assert torch.equal(resumed.experiment.population.theta, final["theta"])
    assert torch.equal(
        resumed.experiment.state["learned"].alpha.detach(), final["algorithm"]["learned"]["learnable"][0]
    )


def test_l2c_needs_validation_data_and_its_own_weights():
    with pytest.raises(ConfigError) as error:
        build_config("l2c", ["data.val_fraction=0", "gossip.mixing=metropolis"])
    assert "field 'data.val_fraction' = 0.0: must be > 0 with gossip.algorithm = 'l2c'" in str(error.value)
    assert "field 'gossip.mixing' = 'metropolis': must be 'uniform'" in str(error.value)


def test_fomo_weights_follow_the_first_order_gain_of_each_neighbour():
    adjacency = build_adjacency("complete", 3, 0, seed=0)
    # losses[i, j]: site i's validation loss of model j
    losses = torch.tensor([[1.0, 0.5, 0.8], [0.2, 0.4, 0.9], [0.3, 0.3, 0.1]])
    distances = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 2.0], [0.5, 2.0, 0.0]])
    weights = fomo(adjacency, losses, distances)
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    # site 0: gains 0.5 / 1 from model 1 and 0.2 / 0.5 from model 2 -> 0.5 : 0.4, its own weight 0
    torch.testing.assert_close(weights[0], torch.tensor([0.0, 0.5 / 0.9, 0.4 / 0.9]))
    torch.testing.assert_close(weights[1], torch.tensor([1.0, 0.0, 0.0]))  # only model 0 helps site 1
    torch.testing.assert_close(weights[2], torch.tensor([0.0, 0.0, 1.0]))  # nobody helps site 2: keep its own


def test_a_final_gossip_merge_after_l2c_is_plain_averaging(tmp_path):
    """log2(16) rounds of one-peer exponential gossip average exactly; the learned rule must not run there."""
    overrides = [
        "num_sites=16",
        "data.partition=iid",
        "train.steps=40",
        "eval.every=40",
        "gossip.every=20",
        "gossip.final_merge=one-peer-exponential",
    ]
    config = build_config("l2c", overrides)
    (tmp_path / "run").mkdir()
    runner = Runner(config, tmp_path / "run", show_progress=False)
    summary = runner.run()
    assert summary["consensus_distance"] == pytest.approx(0.0, abs=1e-8)
    assert runner.experiment.state["learned"].rounds == 2  # the two training rounds only


@pytest.mark.parametrize("algorithm", ["l2c", "meta-l2c"])
def test_a_run_that_never_communicates_reports_no_learned_weights(tmp_path, algorithm):
    """With gossip.schedule = "none" the weights stay at their uniform start: not a result to report."""
    overrides = [f"gossip.algorithm={algorithm}", "gossip.schedule=none", "train.steps=20", "eval.every=20"]
    runner = Runner(build_config("l2c", overrides), tmp_path, show_progress=False)
    summary = runner.run()
    assert summary["learned_rounds"] == 0
    assert "learned_weight_same_task" not in summary and "learned_self_weight" not in summary
    assert not any(tmp_path.glob("learned_*"))


def meta(sites: int = 20, **kwargs) -> MetaLearnedMixing:
    config = build_config("l2c", [f"num_sites={sites}", "model.hidden=[16]", "gossip.algorithm=meta-l2c"])
    experiment = build_experiment(config)
    options = {"lr": 0.1, "weight_decay": 0.0, "prune_round": 0, "keep": 3, "val_batch": 16, "seed": 0, **kwargs}
    return MetaLearnedMixing(experiment.population, experiment.federation, build_adjacency("ring", sites, 0, seed=0),
                             **options)  # fmt: skip


def test_meta_l2c_weights_are_attention_over_encoded_updates_shared_by_all_sites():
    """The encoder has no per-site parameters: relabelling the sites relabels W (P W P^T), and it is
    the per-channel (10, 5) network of L2C section 4, one per weight matrix."""
    mixing = meta()
    mixing.mask = torch.ones(20, 20, dtype=torch.bool)
    half = drifted(mixing)
    weights = mixing.weights(half)
    torch.testing.assert_close(weights.sum(1), torch.ones(20))
    order = torch.randperm(20, generator=torch.Generator().manual_seed(4))
    mixing.initial = mixing.initial[order]
    torch.testing.assert_close(mixing.weights(half[order]), weights[order][:, order])
    assert [tuple(p.shape) for p in mixing.encoders[0].parameters()] == [(10, 784), (10,), (5, 10), (5,)]
    assert len(mixing.encoders) == 2  # the MLP's two weight matrices (784-16-10)
    ring = meta()
    with torch.no_grad():
        assert (ring.weights(half)[~ring.mask] == 0).all() and ring.mask.sum(1).tolist() == [3] * 20


def test_meta_l2c_encoder_gradient_matches_finite_differences():
    mixing = meta()
    half = drifted(mixing)
    x, y = mixing.validation_batch()
    parameter = mixing.encoders[1][2].weight  # the second layer of the last weight matrix's encoder
    (gradient,) = torch.autograd.grad(mixing.validation_loss(half, x, y), parameter)
    # the three largest entries: float32 finite differences of a loss summed over 20 sites resolve ~1e-4
    for flat in gradient.abs().flatten().topk(3).indices.tolist():
        index = divmod(flat, gradient.shape[1])
        step = 1e-2
        with torch.no_grad():
            parameter[index] += step
            up = float(mixing.validation_loss(half, x, y))
            parameter[index] -= 2 * step
            down = float(mixing.validation_loss(half, x, y))
            parameter[index] += step
        assert gradient[index] == pytest.approx((up - down) / (2 * step), rel=5e-2, abs=1e-4)


def test_ditto_personal_models_are_local_training_at_lambda_0_and_its_global_track_is_fedavg(tmp_path):
    """Ditto = FedAvg's global model + personal models pulled towards it by lambda (v - w^t):
    at lambda = 0 the personal models are exactly local SGD, and the global track is exactly a
    FedAvg run on the same batches."""
    small = ["num_sites=10", "data.shards_per_class=2", "model.hidden=[16]", "train.steps=200", "eval.every=100",
             "gossip.topology=complete", "gossip.algorithm=dsgd"]  # fmt: skip

    def run(name: str, *overrides: str) -> dict:
        (tmp_path / name).mkdir()
        Runner(build_config("l2c", [*small, *overrides]), tmp_path / name, show_progress=False).run()
        return torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)

    ditto = run("ditto", "gossip.algorithm=ditto", "ditto.strength=0")
    local = run("local", "gossip.schedule=none")
    fedavg = run("fedavg")
    torch.testing.assert_close(ditto["theta"], local["theta"], rtol=0, atol=0)
    torch.testing.assert_close(ditto["algorithm"]["global"], fedavg["theta"], rtol=1e-6, atol=1e-7)
    pulled = run("pulled", "gossip.algorithm=ditto", "ditto.strength=1")
    distance = (pulled["theta"] - pulled["algorithm"]["received"]).norm(dim=1)
    assert (distance < (ditto["theta"] - ditto["algorithm"]["received"]).norm(dim=1)).all()
