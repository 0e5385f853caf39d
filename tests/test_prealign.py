"""Simulated pre-training (gossiplab.prealign): the pre-aligned start MAZEL's claims rest on, on
public images no site holds, and the bad inputs it refuses."""

from __future__ import annotations

import pytest
import torch

from gossiplab.assembly import build_data_and_model
from gossiplab.catalogue import build_config
from gossiplab.config import ConfigError
from gossiplab.data.federation import kept
from gossiplab.data.sources import SOURCES, load_source
from gossiplab.prealign import public_indices, public_sources
from gossiplab.rundir import read_metrics
from gossiplab.runner import Runner

# Fashion-MNIST on 4 sites and a subset, pre-aligned on 600 held-out images: seconds once cached
SMALL = [
    "num_sites=4", "data.train_per_source=400", "data.test_per_source=300", "model.pre_alignment_per_source=600",
    "model.pre_alignment_steps=300", "train.steps=1", "eval.every=1",
]  # fmt: skip


def step_zero(tmp_path, overrides):
    config = build_config("mazel-fashion", [*SMALL, *overrides])
    run_dir = tmp_path / config.model.pre_alignment
    run_dir.mkdir()
    Runner(config, run_dir, show_progress=False).run()
    return read_metrics(run_dir / "metrics.jsonl")[0]


def test_pre_alignment_on_held_out_images_lifts_the_zero_shot_start_far_above_conse(tmp_path):
    conse = step_zero(tmp_path, ["model.pre_alignment=none"])
    aligned = step_zero(tmp_path, ["model.pre_alignment=held-out"])
    assert conse["step"] == aligned["step"] == 0
    assert aligned["aga"] >= 0.45 and aligned["aga"] > conse["aga"] + 0.2  # measured: 0.22 -> 0.8 on 600 images


def test_held_out_images_are_none_of_the_runs_own_and_cross_domain_uses_other_sources_only(monkeypatch):
    config = build_config("mazel-fashion", [*SMALL, "model.pre_alignment=held-out"])
    dataset = load_source("fashion-mnist")
    public = public_indices(config, dataset)
    used = kept(dataset, len(dataset.train_y), config.data.train_per_source, 0)
    assert len(public) == 600 and not set(public.tolist()) & set(used.tolist())
    cross = build_config("mazel-fashion", [*SMALL, "model.pre_alignment=cross-domain"])
    assert "fashion-mnist" not in public_sources(cross) and "mnist-5k" in public_sources(cross)
    every = build_config("mazel-8site", ["model.pre_alignment=cross-domain"])
    for name in set(SOURCES) - set(every.data.sources):  # a source another test or a doc's plug-in registered
        monkeypatch.delitem(SOURCES, name)
    with pytest.raises(ConfigError, match=r"model\.pre_alignment.*cross-domain.*every registered source"):
        public_sources(every)


def test_the_pre_aligned_projection_is_the_zero_shot_embedding_the_model_starts_from():
    config = build_config("mazel-fashion", [*SMALL, "model.pre_alignment=held-out"])
    federation, module = build_data_and_model(config)
    zero_shot = federation.test_x[:, : module.encoder.zero_shot_dim]
    torch.testing.assert_close(zero_shot.norm(dim=1), torch.ones(len(zero_shot)))
    again, _ = build_data_and_model(config)  # the cached projection gives the same start
    torch.testing.assert_close(again.test_x, federation.test_x, atol=0, rtol=0)


def test_pre_alignment_needs_the_zero_shot_start_and_names_the_way_out():
    with pytest.raises(ConfigError, match=r"model\.pre_alignment.*zero_shot_init = true"):
        build_config("mazel-fashion", ["model.head=linear", "model.zero_shot_init=false"])
    with pytest.raises(ConfigError, match=r"model\.pre_alignment' = 'sometimes'.*none, held-out, cross-domain"):
        build_config("mazel-fashion", ["model.pre_alignment=sometimes"])
