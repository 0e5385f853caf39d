"""The local step's gradient chain (gossiplab.gradients): links compose with any algorithm."""

from __future__ import annotations

import json

import pytest
import torch

import gossiplab
from gossiplab.runner import Runner

SHORT = ["num_sites=8", "train.steps=60", "eval.every=30", "gossip.every=10"]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_proximal_term_pulls_sites_together_and_mu_zero_changes_nothing(tmp_path):
    plain = gossiplab.run("default", SHORT, run_dir=tmp_path / "plain")
    chained = [*SHORT, "train.gradient_transforms=['proximal']"]
    off = gossiplab.run("default", [*chained, "proximal.mu=0"], run_dir=tmp_path / "off")
    assert rows(off.run_dir) == rows(plain.run_dir)  # mu = 0 is DSGD exactly
    pulled = gossiplab.run("default", [*chained, "proximal.mu=1"], run_dir=tmp_path / "pulled")
    assert pulled.final["consensus_distance"] < 0.5 * plain.final["consensus_distance"]


def test_the_proximal_anchor_is_the_model_after_the_last_gossip_round(tmp_path):
    """The last step (60) gossips, so the anchor ends equal to theta; and the term is
    g + mu (theta - anchor): one step's gradient checked against that formula."""
    config = gossiplab.build_config("default", [*SHORT, "train.gradient_transforms=['proximal']", "proximal.mu=0.3"])
    seen = {}

    def check(runner: Runner) -> None:
        experiment = runner.experiment
        ((transform, state),) = experiment.gradient_chain
        if runner.step == 15:  # between rounds: re-apply the link to a known gradient
            grad = torch.ones_like(experiment.population.grad)
            transform.update(grad, state, runner.step)
            expected = 1 + 0.3 * (experiment.population.parameters - state["anchor"])
            seen["difference"] = float((grad - expected).abs().max())
            seen["moved"] = float((experiment.population.parameters - state["anchor"]).abs().max())

    (tmp_path / "run").mkdir()
    runner = Runner(config, tmp_path / "run", show_progress=False)
    runner.run(on_step=check)
    ((_, state),) = runner.experiment.gradient_chain
    assert torch.equal(state["anchor"], runner.experiment.population.parameters)
    assert seen["difference"] < 1e-6 and seen["moved"] > 1e-3


def test_an_unknown_link_is_refused_naming_the_field_and_the_choices():
    with pytest.raises(gossiplab.ConfigError, match=r"train.gradient_transforms' = 'proxmal': must be one of proximal"):
        gossiplab.build_config("default", ["train.gradient_transforms=['proxmal']"])
