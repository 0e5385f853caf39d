"""The researcher's day: Python API, run comparison, the HTML report in a real browser, TensorBoard."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pandas
import pytest
import torch
from PIL import Image

import gossiplab
from gossiplab.mixing import metropolis

SHORT = ["num_sites=4", "train.steps=60", "eval.every=30"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    default = gossiplab.run("default", SHORT, run_dir=root / "default")
    local = gossiplab.run("local-only", SHORT, run_dir=root / "local")
    return default, local


def test_api_result_holds_metrics_matrix_run_dir_and_plots(two_runs):
    default, _ = two_runs
    assert default.metrics["step"] == [0, 30, 60]
    assert len(default.metrics["ala"]) == 3 and default.metrics["ala"][-1] == default.final["ala"]
    assert default.accuracy_matrix.shape == (4, 4)
    assert default.final["ala"] == pytest.approx(float(default.accuracy_matrix.diagonal().mean()))
    assert {p.name for p in default.plots} >= {"accuracy.png", "consensus.png", "accuracy_matrix.png", "mixing.png"}
    again = gossiplab.Result.load(default.run_dir)
    assert again.final == default.final and again.config == default.config


def test_api_callback_and_a_swapped_mixing_rule(tmp_path):
    config = gossiplab.build_config("default", SHORT)
    experiment = gossiplab.build_experiment(config)
    rounds = []

    def lazy_metropolis(adjacency, experiment):
        rounds.append(adjacency)
        return (torch.eye(len(adjacency)) + metropolis(adjacency)) / 2

    experiment.mixing_rule = lazy_metropolis
    seen = []
    result = gossiplab.run(config, run_dir=tmp_path / "lazy", experiment=experiment,
                           on_evaluation=lambda runner, row: seen.append(row["step"]))  # fmt: skip
    plain = gossiplab.run(config, run_dir=tmp_path / "plain")
    assert seen == [0, 30, 60]
    assert len(rounds) == 1 + 6  # the contract check before step 1, then every 10 steps
    assert result.final["consensus_distance"] != plain.final["consensus_distance"]
    # what ran is recorded, by qualified name; the caller's config is left as it was
    assert result.final["parts"]["gossip.mixing"].endswith("<locals>.lazy_metropolis")
    assert result.config.gossip.mixing == result.final["parts"]["gossip.mixing"] and config.gossip.mixing == "uniform"


def test_compare_groups_by_the_differing_key_and_plots(two_runs, tmp_path):
    default, local = two_runs
    runs = [str(default.run_dir), str(local.run_dir)]
    result = subprocess.run(
        [sys.executable, "-m", "gossiplab", "compare", *runs, "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "schedule=every" in result.stdout and "schedule=none" in result.stdout
    assert f"{default.final['ala']:.4f}" in result.stdout and f"{local.final['aga']:.4f}" in result.stdout
    assert (tmp_path / "compare_curves.png").stat().st_size > 5000 and (tmp_path / "compare_cost.png").is_file()


def test_load_runs_is_one_tidy_frame_and_compare_csv_writes_the_same_table(two_runs, tmp_path, gossiplab_main):
    default, local = two_runs
    frame = gossiplab.load_runs([default.run_dir, local.run_dir])
    assert list(frame.columns[:2]) == ["run", "seed"] and list(frame.columns[-3:]) == ["step", "metric", "value"]
    assert "gossip.schedule" in frame.columns and "train.steps" not in frame.columns  # only keys that differ
    mmga = frame[frame.metric == "mmga"].set_index(["gossip.schedule", "step"]).value
    assert mmga["every", 60] == default.final["mmga"] and mmga["none", 30] == local.metrics["mmga"][1]
    assert len(frame) == len(frame.drop_duplicates(["run", "step", "metric"]))
    runs = [str(default.run_dir), str(local.run_dir)]
    code, out, err = gossiplab_main("compare", *runs, "--out", str(tmp_path), "--csv", str(tmp_path / "runs.csv"))
    assert code == 0 and f"wrote {tmp_path / 'runs.csv'}" in out, err
    written = pandas.read_csv(tmp_path / "runs.csv")
    assert written.shape == frame.shape and list(written.columns) == list(frame.columns)
    assert written.value.tolist() == pytest.approx(frame.value.tolist(), rel=1e-12)


def find_chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_report_renders_in_a_real_headless_browser(two_runs, tmp_path):
    browser = find_chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: make test installs it")
        pytest.skip("chromium not installed (make test installs it)")
    report = two_runs[0].run_dir / "report.html"
    text = report.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dom = subprocess.run([browser, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert "Final metrics" in dom.stdout and "MMGA" in dom.stdout
    assert dom.stdout.count("<img") >= 5
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri()],
                   capture_output=True, timeout=120)  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 20  # text, tables and plots, not a blank page
    assert len(np.unique(pixels)) > 50


def read_scalars(folder):
    """Scalars from TensorBoard event files (TFRecord: length, crc, Event proto, crc)."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, position = path.read_bytes(), 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position : position + 8])
            event = event_pb2.Event.FromString(data[position + 12 : position + 12 + length])
            position += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_logs_every_metric_per_evaluation(tmp_path):
    result = gossiplab.run("default", [*SHORT, "eval.tensorboard=true"], run_dir=tmp_path / "tb")
    scalars = read_scalars(tmp_path / "tb" / "tensorboard")
    assert sorted(scalars["gossiplab/mmga"]) == [0, 30, 60]
    assert scalars["gossiplab/ala"][60] == pytest.approx(result.final["ala"])
    assert {"gossiplab/aga", "gossiplab/gossip_gain", "gossiplab/consensus_distance"} <= set(scalars)


def test_without_the_extra_tensorboard_is_refused_with_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboardX" else real(name, *a)
    )
    with pytest.raises(gossiplab.ConfigError, match=r"pip install 'gossiplab\[tensorboard\]'"):
        gossiplab.build_config("default", ["eval.tensorboard=true"])
