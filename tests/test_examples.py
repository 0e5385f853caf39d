"""The researcher tasks of examples/, run through the public API with no edit to the library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gossiplab
from gossiplab.data.sources import SOURCES, SourceInfo, dataset_from_arrays, register_source
from gossiplab.registry import MIXING_RULES
from resume import stopped_then_resumed

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SHORT = ["num_sites=8", "train.steps=60", "eval.every=30", "gossip.every=10"]


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_mixing_rule_on_current_parameters_is_named_in_toml_and_reruns_from_config_toml(tmp_path, gossiplab_main):
    config_file = tmp_path / "inverse.toml"
    config_file.write_text(
        'plugins = ["inverse_distance_mixing"]\nnum_sites = 8\n'
        '[gossip]\nmixing = "inverse-distance"\nevery = 10\n[train]\nsteps = 60\n[eval]\nevery = 30\n'
    )
    code, _, err = gossiplab_main("run", "--config", str(config_file), "--run-dir", str(tmp_path / "first"), "--quiet")
    assert code == 0, err
    first = gossiplab.Result.load(tmp_path / "first")
    assert first.final["parts"]["gossip.mixing"] == "inverse-distance" and first.final["ala"] > 0.5
    code, _, err = gossiplab_main("run", "--config", str(tmp_path / "first" / "config.toml"),
                                  "--run-dir", str(tmp_path / "again"), "--quiet")  # fmt: skip
    assert code == 0, err
    assert metrics(tmp_path / "first") == metrics(tmp_path / "again")
    uniform = gossiplab.run("default", SHORT, run_dir=tmp_path / "uniform")
    assert uniform.final["consensus_distance"] != first.final["consensus_distance"]  # the weights did differ


def test_a_user_adjacency_matrix_and_a_time_varying_graph(tmp_path):
    import user_graphs

    assert user_graphs.two_cliques(8, 0, 0, 1.0).sum() == 2 * 4 * 3 + 2
    cliques = gossiplab.run("default", [*SHORT, "plugins=['user_graphs']", "gossip.topology=two-cliques"],
                            run_dir=tmp_path / "cliques")  # fmt: skip
    assert cliques.final["communication"]["peers_per_round_R"] == pytest.approx(26 / 8)
    pairs = gossiplab.run("default", [*SHORT, "plugins=['user_graphs']", "gossip.topology=alternating-pairs"],
                          run_dir=tmp_path / "pairs")  # fmt: skip
    assert pairs.final["communication"]["peers_per_round_R"] == 1.0
    even, odd = user_graphs.alternating_pairs(8, 0, 0, 1.0), user_graphs.alternating_pairs(8, 1, 0, 1.0)
    assert even[0, 1] and odd[0, 7] and not (even & odd).any()
    assert (
        pairs.final["consensus_distance"]
        < gossiplab.run("local-only", SHORT, run_dir=tmp_path / "local").final["consensus_distance"]
    )


def test_an_installed_package_offers_its_parts_under_an_entry_point_name(tmp_path, monkeypatch):
    """A package declares `[gossiplab.plugins] my-graphs = user_graphs`; a config names `my-graphs`."""
    dist = tmp_path / "site" / "my_graphs-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-graphs\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[gossiplab.plugins]\nmy-graphs = user_graphs\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    config = gossiplab.build_config("default", [*SHORT, "plugins=['my-graphs']", "gossip.topology=two-cliques"])
    assert config.plugins == ["my-graphs"] and config.gossip.topology == "two-cliques"
    run = gossiplab.run(config, run_dir=tmp_path / "run")  # its module is the named plug-in's: not added again
    assert 'plugins = [\n    "my-graphs",\n]' in (run.run_dir / "config.toml").read_text()


def test_a_user_network_trains_on_real_data(tmp_path):
    result = gossiplab.run(
        "default", ["num_sites=4", "train.steps=100", "eval.every=50", "plugins=['user_model']",
                    "model.name=small-convnet", "data.test_per_source=2000"], run_dir=tmp_path / "convnet"
    )  # fmt: skip
    assert result.final["parts"]["model.name"] == "small-convnet"
    assert result.final["num_parameters"] == 8 * 9 + 8 + 2 * 8 + 8 * 7 * 7 * 10 + 10  # conv, BatchNorm, linear
    untrained = result.metrics["ala"][0]  # step 0
    assert result.final["ala"] > max(0.5, 3 * untrained)  # 100 steps; 0.64 measured (0.7 without BatchNorm)
    theta = torch.load(tmp_path / "convnet" / "checkpoint.pt", weights_only=True)["theta"]
    assert theta.shape[1] == result.final["num_parameters"] + 2 * 8 + 1  # running mean and variance, the count
    assert result.final["strategy"] == "loop"  # per-site dropout streams


def test_a_link_of_the_gradient_chain_chained_after_the_proximal_term(tmp_path):
    """examples/gradient_noise.py chained after the built-in proximal term, under CHOCO-SGD: sigma
    = 0 is the proximal run exactly; noise changes the run, and a stopped and resumed run draws the
    same noise (the generator is the link's checkpointed state)."""
    chain = [*SHORT, "plugins=['gradient_noise']", "gossip.algorithm=choco-sgd", "proximal.mu=0.2",
             "train.gradient_transforms=['proximal', 'gaussian-noise']"]  # fmt: skip
    proximal = gossiplab.run("default", [*chain[:-1], "train.gradient_transforms=['proximal']"],
                             run_dir=tmp_path / "proximal")  # fmt: skip
    silent = gossiplab.run("default", [*chain, "noise.sigma=0"], run_dir=tmp_path / "silent")
    assert metrics(silent.run_dir) == metrics(proximal.run_dir)
    noisy = gossiplab.build_config("default", [*chain, "noise.sigma=0.02"])
    whole = gossiplab.run(noisy, run_dir=tmp_path / "noisy")
    assert whole.config.section(sys.modules["gradient_noise"].NoiseConfig).sigma == 0.02
    assert whole.final["parts"]["train.gradient_transforms"] == ["proximal", "gaussian-noise"]
    assert metrics(whole.run_dir) != metrics(proximal.run_dir)
    stopped_then_resumed(noisy, tmp_path / "split", stop_step=30)
    assert metrics(tmp_path / "split") == metrics(whole.run_dir)


SITES = 4
POINTS = np.random.default_rng(0).integers(0, 256, size=(SITES // 2, 4, 4), dtype=np.uint8)


def one_point_source(site: int) -> SourceInfo:
    """Site `site` holds one image (shared with its pair site) with one label: its gradient is the
    same for every batch, and the pair's labels conflict, so the average loss has a finite minimum
    (log 2, both logits equal on every image) that no single site's loss has."""
    images = np.repeat(POINTS[site // 2][None], 64, axis=0)
    labels = np.full(64, site % 2)
    name = f"one-point-{site}"
    return SourceInfo(name, lambda: dataset_from_arrays(name, images, labels, images, labels, ["a", "b"]), "", "", "")


def test_gradient_tracking_reaches_the_exact_minimiser_where_dsgd_keeps_a_bias(tmp_path, request):
    """Every site's model at the minimum of the average loss F (F* = log 2) and in consensus under
    gradient tracking; DSGD with the same constant step leaves each site off the minimum, pulled
    towards its own label."""
    for site in range(SITES):
        name = register_source(one_point_source(site)).name
        request.addfinalizer(lambda name=name: SOURCES.pop(name))  # no later test sees these sources
    problem = [
        f"num_sites={SITES}", f"data.sources={[f'one-point-{s}' for s in range(SITES)]}", "data.partition=by_domain",
        "data.image_size=4", "data.val_fraction=0", "data.min_site_samples=1", "model.hidden=[]",
        "train.steps=500", "train.lr=0.02", "train.momentum=0", "eval.every=500", "gossip.topology=ring",
        "gossip.mixing=metropolis", "gossip.every=1", "plugins=['gradient_tracking']",
    ]  # fmt: skip
    gap, spread = {}, {}
    for algorithm in ("dsgd", "gradient-tracking"):
        config = gossiplab.build_config("default", [*problem, f"gossip.algorithm={algorithm}"])
        experiment = gossiplab.build_experiment(config)
        gossiplab.run(config, run_dir=tmp_path / algorithm, experiment=experiment)
        population = experiment.population
        x, y = experiment.federation.sample_batch(1, torch.Generator().manual_seed(0))  # every site's one point
        average_loss = [float(population.site_losses(row.expand_as(population.theta), x, y).mean())
                        for row in population.theta]  # fmt: skip
        gap[algorithm] = max(average_loss) - float(np.log(2))
        spread[algorithm] = float(population.theta.std(0).max())
    assert gap["gradient-tracking"] < 1e-6 and spread["gradient-tracking"] < 1e-6, (gap, spread)
    assert gap["dsgd"] > 1e-4 and spread["dsgd"] > 1e-3, (gap, spread)


def test_a_plugin_section_goes_only_into_the_config_toml_of_configs_naming_its_plugin():
    """Once imported, the `[noise]` section exists in every config of the process, but only a config
    that names `gradient_noise` writes it: the others' config.toml must read back where it is not installed."""
    import gradient_noise  # noqa: F401

    assert "noise" not in gossiplab.build_config("default").to_dict()
    assert gossiplab.build_config("default", ["plugins=['gradient_noise']"]).to_dict()["noise"] == {"sigma": 0.01}


def test_dsgd_written_from_scratch_ends_where_the_librarys_run_ends(tmp_path):
    """examples/dsgd_from_scratch.py: per-site modules, torch.optim and a Python loop give the
    engine's final parameters (random one-peer graphs, momentum SGD, 60 steps, 6 gossip rounds)."""
    from dsgd_from_scratch import dsgd_from_scratch

    overrides = ["num_sites=4", "train.steps=60", "eval.every=60", "data.test_per_source=500"]
    gossiplab.run("default", overrides, run_dir=tmp_path / "library")
    library = torch.load(tmp_path / "library" / "checkpoint.pt", weights_only=True)["theta"]
    ours = dsgd_from_scratch(gossiplab.build_config("default", overrides))
    torch.testing.assert_close(ours, library, rtol=0, atol=1e-5)
    assert (ours - ours.mean(0)).abs().max() > 1e-2  # the sites differ: gossip did not make them one model


def test_gradient_tracking_counts_both_vectors_it_sends(tmp_path):
    problem = [*SHORT, "train.momentum=0", "gossip.mixing=metropolis"]
    dsgd = gossiplab.run("default", problem, run_dir=tmp_path / "dsgd")
    tracking = ["plugins=['gradient_tracking']", "gossip.algorithm=gradient-tracking"]
    tracking = gossiplab.run("default", [*problem, *tracking], run_dir=tmp_path / "tracking")
    assert tracking.final["bytes_sent"] == 2 * dsgd.final["bytes_sent"] > 0


def test_a_user_model_declares_the_units_dimat_may_permute_and_a_model_without_is_refused_by_name():
    """The spec of examples/user_model.py leaves the function unchanged under a random permutation
    (BatchNorm statistics included); a model without a spec, or with a wrong one, is refused naming it."""
    from torch import nn
    from user_model import SmallConvNet, small_convnet

    from gossiplab.config import ConfigError
    from gossiplab.permutation import (
        Axis,
        PermutationGroup,
        PermutationSpec,
        permutation_spec,
        permuted_index,
        random_permutations,
    )
    from gossiplab.population import Population

    population = Population(small_convnet(None, (1, 28, 28), 10), 2, seed=0, init="independent")
    population.theta[:, population.num_parameters :].uniform_(0.5, 1.5)
    spec = permutation_spec(population.module, (1, 28, 28))
    index = permuted_index(spec, population.names, population.shapes, random_permutations(spec, torch.Generator()))
    assert not torch.equal(index, torch.arange(len(index)))
    x = torch.randn(6, 1, 28, 28)
    with population.evaluating():
        permuted, plain = (
            torch.func.functional_call(population.module, population.views(row), (x,))
            for row in (population.theta[0][index], population.theta[0])
        )
    torch.testing.assert_close(permuted, plain, atol=1e-5, rtol=1e-5)

    class NoSpec(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(784, 10)

        def forward(self, x):
            return self.linear(x.flatten(1))

    with pytest.raises(ConfigError, match=r"model NoSpec does not say which: give it a method permutation_spec"):
        permutation_spec(NoSpec(), (1, 28, 28))

    class WrongSpec(SmallConvNet):
        def permutation_spec(self, input_shape):
            axes = (Axis("features.0.weight", 1), Axis("head.weight", 1))
            return PermutationSpec((PermutationGroup(8, axes, "relu"),))

    with pytest.raises(ConfigError, match=r"model WrongSpec.permutation_spec: activation 'relu' is not a submodule"
                                          r".*'features.0.weight' has shape \[8, 1, 3, 3\]: axis 1 must hold 8 units"
                                          r".*'head.weight' is not a parameter or buffer"):  # fmt: skip
        permutation_spec(WrongSpec(1, 392, 10), (1, 28, 28))


@pytest.mark.long
def test_dimat_runs_on_a_user_model_and_its_matching_acts(tmp_path):
    """DIMAT's preset with examples/user_model.py's network: two matched merges after pre-training,
    against weight averaging through the same merge (merge-average), same seed and data."""
    shorter = ["plugins=['user_model']", "model.name=small-convnet", "train.steps=400", "eval.every=100",
               "gossip.start_after=200"]  # fmt: skip
    matched = gossiplab.run("dimat", shorter, run_dir=tmp_path / "dimat", progress=False).final
    averaged = gossiplab.run("dimat", [*shorter, "gossip.algorithm=merge-average"], run_dir=tmp_path / "wa").final
    assert matched["parts"]["model.name"] == "small-convnet"
    # measured: ALA 0.770 vs 0.701, AGA 0.374 vs 0.327, matched MMGA 0.429 (the uniform mean 0.324 vs 0.412)
    assert matched["aga"] > averaged["aga"] + 0.02 and matched["ala"] > averaged["ala"]
    assert matched["matched_mmga"] > matched["mmga"]


def test_a_population_made_by_hand_is_what_config_toml_and_the_summary_record(tmp_path, capsys):
    """A user's own module swapped into a built experiment (population and optimizer) runs, and
    config.toml names it by class and size, not the configured MLP it replaced, with a warning
    that the file cannot re-run it."""
    from gossiplab.assembly import build_experiment
    from gossiplab.optim import build_optimizer
    from gossiplab.population import Population

    config = gossiplab.build_config("default", [*SHORT, "num_sites=4"])
    experiment = build_experiment(config)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    experiment.population = Population(module, 4, seed=0)
    experiment.optimizer = build_optimizer(config.train, experiment.population.parameters.shape)
    capsys.readouterr()
    result = gossiplab.run(config, run_dir=tmp_path / "swapped", experiment=experiment)
    recorded = "<torch.nn.modules.container.Sequential: 7,850 parameters>"
    assert f'name = "{recorded}"' in (result.run_dir / "config.toml").read_text()
    assert result.final["parts"]["model.name"] == recorded and result.final["num_parameters"] == 7850
    assert f"model.name = '{recorded}' is not importable by name" in " ".join(capsys.readouterr().err.split())


def test_a_part_registered_by_a_plain_import_is_recorded_so_config_toml_reruns_it(tmp_path, capsys):
    """A script that imports its parts (without naming them in `plugins`) still saves a config that
    re-runs in a fresh process: the part's module goes into `plugins`, and its section with it. A
    part registered in a script or notebook (`__main__`) is run, with a warning that it cannot be."""
    import gradient_noise  # noqa: F401  (registers gaussian-noise and its [noise] section)

    noisy = [*SHORT, "train.gradient_transforms=['gaussian-noise']", "noise.sigma=0.02"]
    first = gossiplab.run("default", noisy, run_dir=tmp_path / "first")
    saved = (first.run_dir / "config.toml").read_text()
    assert 'plugins = [\n    "gradient_noise",\n]' in saved and "[noise]\nsigma = 0.02" in saved
    again = tmp_path / "again"
    command = [sys.executable, "-m", "gossiplab", "run", "--config", str(first.run_dir / "config.toml"), "--quiet",
               "--run-dir", str(again)]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(EXAMPLES)}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr
    assert metrics(again) == metrics(first.run_dir)

    notebook = {"__name__": "__main__"}
    exec(  # a cell of a notebook (its module is __main__)
        "from gossiplab.mixing import metropolis\nfrom gossiplab.registry import MIXING_RULES\n"
        "MIXING_RULES.register('notebook-metropolis', lambda adjacency, experiment: metropolis(adjacency))",
        notebook,
    )
    capsys.readouterr()
    try:
        gossiplab.run("default", [*SHORT, "gossip.mixing=notebook-metropolis"], run_dir=tmp_path / "notebook")
    finally:  # other tests list the registered rules
        for table in (MIXING_RULES._parts, MIXING_RULES._properties, MIXING_RULES._origins):
            del table["notebook-metropolis"]
    warning = " ".join(capsys.readouterr().err.split())
    assert "gossip.mixing = 'notebook-metropolis' is not importable by name: config.toml cannot re-run it" in warning
