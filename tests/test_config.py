"""Bad input is refused before any work, naming the field and what is allowed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gossiplab.catalogue import build_config
from gossiplab.config import ConfigError, config_from_toml, preset_names


def test_presets_exist_and_build():
    assert {"default", "local-only", "complete-graph", "ring", "final-merge-only"} <= set(preset_names())
    for name in preset_names():
        assert build_config(name).name == name


def test_overrides_accept_full_paths_and_unambiguous_leaf_names():
    config = build_config("default", ["gossip.topology=ring", "gossip.steps=[3, 9]", "lr=0.1", "num_sites=4"])
    assert config.gossip.topology == "ring" and config.train.lr == 0.1 and config.num_sites == 4
    assert config.gossip.steps == [3, 9]
    assert build_config("default", ["train.steps=50"]).train.steps == 50


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("gossip.topology=star-of-david", "field 'gossip.topology' = 'star-of-david': must be one of complete, ring"),
        ("data.alpha=0", "field 'data.alpha' = 0.0: must be > 0"),
        ("gossip.p=1.5", r"field 'gossip.p' = 1.5: must be in \(0, 1\]"),
        ("gossip.p=0", r"field 'gossip.p' = 0.0: must be in \(0, 1\]"),
        ("num_sites=0", "field 'num_sites' = 0: must be >= 1"),
        ("train.batch_size=-4", "field 'train.batch_size' = -4: must be >= 1"),
        ("train.steps=0", "field 'train.steps' = 0: must be >= 1"),
        ("train.lr=fast", "field 'train.lr' = 'fast': must be of type float"),
        ("gossip.learning=1", "unknown key 'gossip.learning'"),
        ("every=3", "key 'every' is ambiguous: write one of gossip.every, eval.every"),
        ("noequals", "not of the form key=value"),
        ("data.sources=cifar-11", r"field 'data.sources' = \['cifar-11'\]: \['cifar-11'\] unknown: use fashion-mnist"),
        ("data.partition=by_domain", "field 'num_sites' = 16: must equal the sites of data.sites_per_source"),
        ("data.val_fraction=1.0", r"field 'data.val_fraction' = 1.0: must be in \[0, 1\)"),
        ("data.channels=2", "field 'data.channels' = 2: must be 1 or 3"),
    ],
)
def test_bad_values_are_refused_with_field_and_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("default", [override])


def test_a_pre_training_phase_that_leaves_no_round_is_refused_and_a_run_without_rounds_is_said(tmp_path, capsys):
    """DIMAT's preset shortened below its 500 pre-training steps would train every agent alone and
    call it DIMAT (the docs' figure run did); a short run with rounds rarer than its steps is a
    smoke test, run with a warning."""
    with pytest.raises(
        ConfigError,
        match=r"field 'gossip.start_after' = 500: with gossip.every=100 leaves no "
        r"gossip round in train.steps=200 \(the first would be at step 600\)",
    ):
        build_config("dimat", ["train.steps=200"])
    with pytest.raises(ConfigError, match=r"field 'gossip.start_after' = 10: leaves none of gossip.steps=\[5, 10\]"):
        build_config("default", ["gossip.schedule=steps", "gossip.steps=[5, 10]", "gossip.start_after=10"])
    assert build_config("dimat", ["train.steps=600"]).gossip.start_after == 500  # one round, at step 600
    code = subprocess.run([sys.executable, "-m", "gossiplab", "run", "num_sites=4", "train.steps=4", "eval.every=4",
                           "--quiet", "--run-dir", str(tmp_path / "run")], capture_output=True, text=True)  # fmt: skip
    assert code.returncode == 0, code.stderr
    assert "gossip.schedule = 'every' gives no gossip round in train.steps = 4" in " ".join(code.stderr.split())


def test_all_errors_are_reported_together():
    with pytest.raises(ConfigError) as error:
        build_config("default", ["data.alpha=-1", "gossip.p=2"])
    assert "data.alpha" in str(error.value) and "gossip.p" in str(error.value)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available presets: complete-graph, default"):
        build_config("nope")


@pytest.mark.parametrize("model", [["model.name=cnn"], ["model.head=text"]])
def test_the_linear_engine_is_refused_for_anything_but_a_plain_mlp(model):
    with pytest.raises(ConfigError, match=r"field 'train\.engine' = 'linear': 'linear' is for plain MLPs"):
        build_config("default", [*model, "train.engine=linear"])
    plain_mlp = build_config("default", ["model.name=mlp", "model.head=linear", "train.engine=linear"])
    assert plain_mlp.train.engine == "linear"


def test_malformed_config_file_is_refused():
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_from_toml("[gossip\n")
    with pytest.raises(ConfigError, match=r"unknown key 'gossip\.colour'"):
        config_from_toml("[gossip]\ncolour = 'red'\n")


def test_config_round_trips_through_toml():
    config = build_config("ring", ["seed=7", "gossip.steps=[1, 2]"])
    assert config_from_toml(config.to_toml()) == config


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gossiplab", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_refuses_bad_input_before_any_work(tmp_path):
    result = run_cli("run", "gossip.p=3", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "field 'gossip.p' = 3.0: must be in (0, 1]" in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_finished_run_dir_and_keeps_its_results(tmp_path):
    run_dir = tmp_path / "done"
    run_dir.mkdir()
    summary = {"status": "finished", "ala": 0.9}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    result = run_cli("run", "--run-dir", str(run_dir))
    assert result.returncode == 2
    assert "already holds a finished run" in result.stderr
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert sorted(p.name for p in run_dir.iterdir()) == ["summary.json"]


def test_cli_lists_presets():
    result = run_cli("presets")
    assert result.returncode == 0
    assert "final-merge-only" in result.stdout and "local-only" in result.stdout


def test_cli_data_lists_sources_and_shows_a_source_and_a_preset(tmp_path, gossiplab_main):
    code, listing, _ = gossiplab_main("data")
    assert code == 0
    for name in ("fashion-mnist", "mnist-5k", "animal-silhouettes", "digits-8x8", "font-letters"):
        assert name in listing
    code, _, _ = gossiplab_main("data", "show", "digits-8x8", "--out", str(tmp_path / "grid.png"))
    assert code == 0 and (tmp_path / "grid.png").stat().st_size > 1000
    code, sites, err = gossiplab_main("data", "show", "mazel-8site", "--out", str(tmp_path / "sites.png"))
    assert code == 0, err
    assert "40 classes" in sites and "digits-8x8" in sites
    assert (tmp_path / "sites.png").stat().st_size > 1000
    code, _, err = gossiplab_main("data", "show", "cifar-11")
    assert code == 2 and "no source" in err


def test_an_unknown_key_suggests_the_nearest_keys_and_a_comma_list_is_named_as_multirun(gossiplab_main):
    with pytest.raises(ConfigError, match=r"unknown key 'topolgy': did you mean gossip\.topology\?$"):
        build_config("default", ["topolgy=ring"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr': did you mean train\.lr"):
        build_config("default", ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'0\.1,0\.01': must be of type float; a comma list is Hydra's multirun"):
        build_config("default", ["train.lr=0.1,0.01"])
    code, out, _ = gossiplab_main("--version")
    assert code == 0 and out.strip().startswith("gossiplab 0.")


@pytest.mark.parametrize(
    ("arguments", "exit_code", "says"),
    [
        (["--help"], 0, "Usage"),
        (["--version"], 0, "gossiplab 0."),
        (["run", "--help"], 0, "Usage"),
        (["sweep", "--help"], 0, "Usage"),
        (["data", "show", "--help"], 0, "Usage"),
        (["presets"], 0, "mazel-8site"),  # every preset read: a config is data, it imports no part
        (["run", "train.lrr=0.1"], 2, "did you mean train.lr"),  # a typo is answered before PyTorch
    ],
)
def test_help_presets_and_typos_answer_without_importing_pytorch(arguments, exit_code, says):
    """`gossiplab --help`, the shell's completion, the preset list and a mistyped key must answer at
    once; PyTorch's import takes seconds, so only a command that runs something may import it."""
    probe = (
        "import sys\n"
        f"sys.argv = ['gossiplab', *{arguments!r}]\n"
        "from gossiplab.cli import main\n"
        f"try:\n    main()\nexcept SystemExit as end:\n    assert (end.code or 0) == {exit_code}, end.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert says in result.stdout + result.stderr


def test_a_part_reads_its_own_section_by_its_class():
    """`config.section(ChocoConfig)` is the [choco] table, typed; sections are not attributes of
    the config (no `config.choco`), and a class no one declared is refused naming the fix."""
    from dataclasses import dataclass

    from gossiplab.config import ChocoConfig

    config = build_config("default", ["choco.gamma=0.25", "choco.compressor=qsgd"])
    options = config.section(ChocoConfig)
    assert isinstance(options, ChocoConfig) and (options.gamma, options.compressor) == (0.25, "qsgd")
    assert options is config.sections["choco"]
    assert not hasattr(config, "choco")

    @dataclass
    class Undeclared:
        size: int = 1

    with pytest.raises(ConfigError, match=r"Undeclared is not a config section: declare it with register_section"):
        config.section(Undeclared)
