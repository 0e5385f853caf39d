"""A plug-in's fault is the plug-in's: one line naming the plug-in and where, exit 2, never "a bug
in gossiplab"; the plug-in's own traceback with --debug. Contract checks before step 1 catch the
parts that break their contract (W, model, loss) before they quietly change the run.

The plug-ins are modules written into a folder on sys.path; every test gets the registries back as
they were, so a plug-in registered here is never seen by another test."""

from __future__ import annotations

import sys
import textwrap

import pytest

from gossiplab.assembly import build_experiment
from gossiplab.catalogue import build_config, load_builtin_parts
from gossiplab.config import ConfigError
from gossiplab.registry import ALGORITHMS, LOSSES, MIXING_RULES, MODELS, TOPOLOGIES

TINY = ["num_sites=4", "train.steps=2", "eval.every=2", "data.test_per_source=500", "--quiet"]

RULES = """
import torch
import torch.nn.functional as F
from torch import nn

from gossiplab.registry import LOSSES, MIXING_RULES, MODELS


@MIXING_RULES.register("raiser")
def raiser(adjacency, experiment):
    raise ValueError("my rule is broken")


@MIXING_RULES.register("negative")
def negative(adjacency, experiment):
    n = len(adjacency)
    return torch.full((n, n), -1.0 / n) + 2.0 * torch.eye(n)


@MIXING_RULES.register("everyone")
def everyone(adjacency, experiment):
    n = len(adjacency)
    return torch.full((n, n), 1.0 / n)


@MODELS.register("no-parameters")
def no_parameters(config, input_shape, out_features):
    return nn.Flatten()


@MODELS.register("not-a-module")
def not_a_module(config, input_shape, out_features):
    return lambda x: x


@MODELS.register("thirteen-logits")
def thirteen_logits(config, input_shape, out_features):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 13))


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(784, 10)

    def forward(self, x):
        raise RuntimeError("forward is broken")


@MODELS.register("broken-forward")
def broken_forward(config, input_shape, out_features):
    return Broken()


@MODELS.register("batchnorm1d")
def batchnorm1d(config, input_shape, out_features):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, out_features))


@MODELS.register("batchnorm2d")
def batchnorm2d(config, input_shape, out_features):
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Unflatten(1, (32, 1, 1)), nn.BatchNorm2d(32), nn.Flatten(), nn.Linear(32, out_features))


class Custom(nn.Module):
    def __init__(self, out_features):
        super().__init__()
        self.linear = nn.Linear(784, out_features)

    def forward(self, x):
        return self.linear(x.flatten(1))


@MODELS.register("custom")
def custom(config, input_shape, out_features):
    return Custom(out_features)


@LOSSES.register("per-sample")
def per_sample(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")


@LOSSES.register("a-float")
def a_float(logits, targets):
    return float(F.cross_entropy(logits, targets))
"""

MODULES = {
    "fault_rules": RULES,
    "fault_on_import": 'raise RuntimeError("this plug-in cannot start")\n',
    "fault_twice": """
        import torch
        from gossiplab.registry import MIXING_RULES

        @MIXING_RULES.register("twice")
        def first(adjacency, experiment):
            return torch.eye(len(adjacency))

        @MIXING_RULES.register("twice")
        def second(adjacency, experiment):
            return torch.eye(len(adjacency))
    """,
    "fault_shadow": """
        from gossiplab.registry import TOPOLOGIES

        @TOPOLOGIES.register("ring")
        def my_ring(num_sites, round_index, seed):
            raise RuntimeError
    """,
}


@pytest.fixture(autouse=True)
def plugin_folder(tmp_path, monkeypatch):
    """The plug-in modules on sys.path, and the registries (and imported modules) restored after."""
    for name, source in MODULES.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    load_builtin_parts()  # before the snapshot: restoring it must not drop them (their modules stay imported)
    registries = (TOPOLOGIES, MIXING_RULES, ALGORITHMS, MODELS, LOSSES)
    saved = [(dict(r._parts), dict(r._properties), dict(r._origins)) for r in registries]
    yield tmp_path
    for registry, (parts, properties, origins) in zip(registries, saved, strict=True):
        registry._parts, registry._properties, registry._origins = parts, properties, origins
    for name in MODULES:
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["plugins=['fault_on_import']"], "plug-in module 'fault_on_import' ({folder}/fault_on_import.py) failed "
         "while being imported: RuntimeError: this plug-in cannot start ({folder}/fault_on_import.py:1, in <module>)"),
        (["plugins=['fault_twice']"], "plug-in module 'fault_twice' ({folder}/fault_twice.py) failed while being "
         "imported: ValueError: mixing rule 'twice' is registered already (by fault_twice.first)"),
        (["plugins=['fault_shadow']"], "ValueError: topology 'ring' is a built-in part of gossiplab "
         "(gossiplab.topology.ring): a plug-in cannot replace it; register fault_shadow.my_ring under another name"),
        (["plugins=['fault_rules']", "gossip.mixing=raiser"], "plug-in module 'fault_rules' failed: ValueError: my "
         "rule is broken ({folder}/fault_rules.py:{raiser_line}, in raiser); a fault of the plug-in, not of gossiplab"),
        (["plugins=['fault_rules']", "gossip.mixing=negative"], "mixing (negative) returned W with negative weights "
         "(e.g. W[0, 1] = -0.25); weights must be >= 0"),
        (["plugins=['fault_rules']", "gossip.mixing=everyone"], "mixing (everyone) put weight on 8 pairs that are "
         "not edges of the round's graph (e.g. site 0 from site 2)"),
        (["plugins=['fault_rules']", "model.name=no-parameters"], "model (no-parameters) has no trainable parameters"),
        (["plugins=['fault_rules']", "model.name=not-a-module"], "model (not-a-module) returned function, not a "
         "torch.nn.Module"),
        (["plugins=['fault_rules']", "model.name=thirteen-logits"], "model (thirteen-logits) gives shape [2, 13] for "
         "a batch of 2 inputs; the run has 10 classes, so it must give [2, 10]"),
        (["plugins=['fault_rules']", "model.name=broken-forward"], "model (broken-forward) failed on a batch of 2 "
         "inputs of shape [1, 28, 28]: RuntimeError: forward is broken ({folder}/fault_rules.py:{forward_line}, "
         "in forward)"),
        (["plugins=['fault_rules']", "train.loss=per-sample"], "loss (per-sample) returned a tensor of shape [2]; a "
         "loss returns the batch's mean as a 0-d float tensor"),
        (["plugins=['fault_rules']", "train.loss=a-float"], "loss (a-float) returned float; a loss returns"),
    ],
)  # fmt: skip
def test_a_plugins_mistake_is_one_line_naming_the_plugin(overrides, message, plugin_folder, gossiplab_main, tmp_path):
    code, _, err = gossiplab_main("run", *TINY, *overrides, "--run-dir", str(tmp_path / "run"))
    assert code == 2, err
    lines = RULES.splitlines()
    raiser_line = lines.index('    raise ValueError("my rule is broken")') + 1
    forward_line = lines.index('        raise RuntimeError("forward is broken")') + 1
    assert message.format(folder=plugin_folder, raiser_line=raiser_line, forward_line=forward_line) in err, err
    assert "bug in gossiplab" not in err and "Traceback" not in err


def test_debug_shows_the_plugins_own_traceback(gossiplab_main, tmp_path, monkeypatch):
    monkeypatch.delenv("GOSSIPLAB_DEBUG", raising=False)
    code, _, err = gossiplab_main("--debug", "run", *TINY, "plugins=['fault_on_import']", "--run-dir", str(tmp_path))
    assert code == 2 and "Traceback" in err and 'raise RuntimeError("this plug-in cannot start")' in err, err
    sys.modules.pop("fault_on_import", None)
    code, _, err = gossiplab_main("parts", "fault_on_import")  # the next command, without --debug: one line
    assert code == 2 and "Traceback" not in err and "plug-in module 'fault_on_import'" in err, err
    monkeypatch.setenv("GOSSIPLAB_DEBUG", "1")
    sys.modules.pop("fault_on_import", None)
    code, _, err = gossiplab_main("parts", "fault_on_import")
    assert code == 2 and "Traceback" in err, err


@pytest.mark.parametrize("model", ["batchnorm1d", "batchnorm2d"])
def test_a_user_model_with_batchnorm_runs_and_nothing_touches_its_statistics_before_training(model):
    """The memory estimate and the contract check run the model before training: in eval mode, so
    BatchNorm1d takes a batch of one and no running statistic moves (fresh: mean 0, var 1, 0 batches)."""
    config = build_config("default", ["plugins=['fault_rules']", f"model.name={model}", *TINY[:-1]])
    population = build_experiment(config).population
    statistics = {n: v for n, v in population.views(population.theta[0]).items() if "running" in n or "batches" in n}
    assert statistics
    for name, value in statistics.items():
        fresh = 0.0 if "mean" in name or "batches" in name else 1.0
        assert bool((value == fresh).all()), name


def test_matching_a_model_without_a_permutation_spec_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"gossip\.algorithm.*model Custom does not say which: .* permutation_spec"):
        build_experiment(build_config("dimat", ["plugins=['fault_rules']", "model.name=custom"])).algorithm.init()
