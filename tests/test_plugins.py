"""The plug-in framework: registries, contract checks before step 1, what a run records, and the
config reference generated from the parts' declarations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gossiplab
from gossiplab.assembly import PartMismatch
from gossiplab.catalogue import build_config
from gossiplab.config import SECTIONS, ConfigError, config_from_toml, config_reference, leaf_types
from gossiplab.population import Population

ROOT = Path(__file__).parent.parent
TINY = ["num_sites=4", "train.steps=20", "eval.every=10", "gossip.every=5", "model.hidden=[16]"]


def test_the_configuration_reference_is_generated_for_every_key():
    """The site's configuration page is the generated table (docs/hooks.py fills the placeholder),
    and the table has one documented row per settable key."""
    assert "<!-- config-reference -->" in (ROOT / "docs" / "reference" / "configuration.md").read_text()
    rows = config_reference()
    keys = [row.split("`")[1] for row in rows]
    examples = tuple(f"{name}." for name, section in SECTIONS.items() if not section.__module__.startswith("gossiplab"))
    assert sorted(keys) == sorted(k for k in leaf_types() if not k.startswith(examples))  # examples/ sections out
    assert all(row.count(" | ") == 2 and not row.endswith("|  |") for row in rows)  # default and text filled


def test_unknown_parts_are_refused_naming_the_field_and_the_choices():
    with pytest.raises(ConfigError) as error:
        build_config("default", ["gossip.algorithm=gradient-descent", "gossip.topology=torus", "model.name=vit"])
    message = str(error.value)
    assert "field 'gossip.algorithm' = 'gradient-descent': must be one of " in message
    choices = message.split("must be one of ")[1].split(" (a registered")[0].split(", ")
    assert {"dsgd", "cdsgd", "sgp", "dimat", "weight-matching", "ditto", "l2c", "meta-l2c", "local"} <= set(choices)
    assert "field 'gossip.topology' = 'torus': must be one of complete, ring" in message
    assert "field 'model.name' = 'vit': must be one of mlp, cnn, resnet20" in message


def test_keys_of_earlier_versions_are_read_in_their_current_form():
    old = config_from_toml(
        '[gossip]\nmerge = "push-sum"\nval_batch = 16\nl2c_lr = 0.5\nditto_lambda = 0.3\nmatch_samples = 64\n'
    )
    sections = old.sections
    assert (old.gossip.algorithm, sections["l2c"].val_batch, sections["fomo"].val_batch) == ("sgp", 16, 16)
    assert (sections["l2c"].lr, sections["ditto"].strength, sections["dimat"].match_samples) == (0.5, 0.3, 64)
    assert build_config("default", ["gossip.order=before-update"]).gossip.algorithm == "cdsgd"
    l2c = build_config("default", ["gossip.mixing=meta-l2c"])
    assert (l2c.gossip.algorithm, l2c.gossip.mixing) == ("meta-l2c", "uniform")


def test_mismatched_parts_are_refused_before_step_1_naming_the_part(tmp_path):
    config = build_config("default", TINY)
    experiment = gossiplab.build_experiment(config)
    experiment.population = Population(experiment.population.module, 3, seed=0)
    with pytest.raises(PartMismatch, match=r"population has 3 rows for 4 sites.*optimizer is built for \[4, "):
        gossiplab.run(config, run_dir=tmp_path / "population", experiment=experiment)
    experiment = gossiplab.build_experiment(config)
    experiment.algorithm = gossiplab.build_experiment(config).algorithm
    with pytest.raises(PartMismatch, match=r"algorithm \(dsgd\) was built for another experiment"):
        gossiplab.run(config, run_dir=tmp_path / "algorithm", experiment=experiment)
    assert not (tmp_path / "algorithm" / "metrics.jsonl").exists()  # refused before any work


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        (lambda adjacency, experiment: gossiplab.mixing.uniform(adjacency).double(), "dtype torch.float64"),
        (lambda adjacency, experiment: torch.ones(4, 4), "rows do not sum to 1"),
        (lambda adjacency, experiment: torch.eye(3), r"shape \[3, 3\], not \[4, 4\]"),
    ],
    ids=["float64", "rows", "shape"],
)
def test_a_bad_mixing_matrix_is_refused_naming_the_rule(tmp_path, rule, problem):
    config = build_config("default", TINY)
    experiment = gossiplab.build_experiment(config)
    experiment.mixing_rule = rule
    with pytest.raises(PartMismatch, match=rf"mixing \(.*<lambda>\) returned W.*{problem}"):
        gossiplab.run(config, run_dir=tmp_path / "run", experiment=experiment)


def test_overrides_that_would_not_reach_a_built_experiment_are_refused(tmp_path):
    config = build_config("default", TINY)
    experiment = gossiplab.build_experiment(config)
    with pytest.raises(ConfigError, match="would not reach the parts of a pre-built experiment"):
        gossiplab.run(config, ["gossip.topology=ring"], run_dir=tmp_path / "run", experiment=experiment)
    other = build_config("default", [*TINY, "gossip.final_merge=exact"])
    with pytest.raises(ConfigError, match="differs from the pre-built experiment's config"):
        gossiplab.run(other, run_dir=tmp_path / "run", experiment=experiment)


def test_a_run_keeps_every_accuracy_matrix_per_site_losses_and_a_frame(tmp_path):
    result = gossiplab.run("default", TINY, run_dir=tmp_path / "run")
    matrices = result.accuracy_matrices()
    assert sorted(matrices) == [0, 10, 20]
    assert matrices[20].tolist() == result.accuracy_matrix.tolist()
    frame = result.to_frame()
    assert list(frame.index) == [0, 10, 20] and frame.loc[20, "ala"] == result.final["ala"]
    losses = result.metrics["site_train_loss"]
    assert losses[0] is None and len(losses[2]) == 4
    assert sum(losses[2]) / 4 == pytest.approx(result.metrics["train_loss"][2], rel=1e-5)
    assert result.final["parts"] == {"gossip.algorithm": "dsgd", "gossip.topology": "random-one-peer",
                                     "gossip.mixing": "uniform", "train.loss": "cross-entropy",
                                     "train.gradient_transforms": [], "model.name": "mlp"}  # fmt: skip


def test_a_notebook_cell_that_declares_a_section_runs_twice_and_another_class_is_refused():
    cell = (
        "from dataclasses import dataclass\nfrom gossiplab.config import register_section\n"
        "@dataclass\nclass NotebookOptions:\n    rate: float = RATE\n"
        "register_section('notebook', NotebookOptions)\n"
    )
    try:
        first, again = {"__name__": "__main__"}, {"__name__": "__main__"}
        exec(cell.replace("RATE", "0.1"), first)
        exec(cell.replace("RATE", "0.2"), again)  # the cell again, edited: it replaces
        config = build_config("default", ["notebook.rate=0.3"])
        assert config.section(again["NotebookOptions"]).rate == 0.3
        assert config.section(first["NotebookOptions"]).rate == 0.3  # the class of the cell's first run too
        assert SECTIONS["notebook"]().rate == 0.2
        with pytest.raises(ValueError, match=r"\[notebook\] is declared already by __main__.NotebookOptions: declare"):
            exec(cell.replace("RATE", "0.1").replace("NotebookOptions", "Other"), {"__name__": "__main__"})
    finally:  # other tests list the sections
        SECTIONS.pop("notebook", None)
