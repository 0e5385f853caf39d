"""`gossiplab bench` and scale: the benchmark runs and reports every column (timings are never
asserted), and a 1,000-site run fits and finishes."""

from __future__ import annotations

import json
import subprocess
import sys

from gossiplab.config import build_config
from gossiplab.runner import Runner, build_experiment, memory_estimate


def test_bench_reports_every_model_and_ratio(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--sites", "2,3", "--repeats", "1", "--seconds", "0.01", "--json", str(out)]
    result = subprocess.run([sys.executable, "-m", "gossiplab", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    table = json.loads(out.read_text())
    assert table["square_gemm_peak_gflops"] > 0
    rows = {(r["model"], r["sites"]): r for r in table["rows"]}
    assert set(rows) == {(m, n) for m in ("mlp", "cnn", "head") for n in (2, 3)}
    assert rows[("cnn", 2)]["strategy"] == "loop" and rows[("cnn", 2)]["fraction_of_kernel_limit"] is None
    for row in rows.values():
        assert row["speedup"] > 0 and row["gossip_ring_vs_copy"] > 0 and row["gossip_complete_vs_copy"] > 0
    assert rows[("mlp", 2)]["fraction_of_kernel_limit"] > 0


def test_bench_refuses_bad_arguments():
    result = subprocess.run(
        [sys.executable, "-m", "gossiplab", "bench", "--models", "mlp,transformer"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--models mlp,transformer: allowed values are mlp, cnn, head" in result.stderr


def test_a_thousand_sites_fit_and_run_with_memory_linear_in_sites(tmp_path):
    overrides = [
        "num_sites=1000",
        "data.partition=iid",
        "data.min_site_samples=16",
        "model.hidden=[32]",
        "train.steps=20",
        "eval.every=20",
    ]
    config = build_config("default", overrides)
    experiment = build_experiment(config)
    half = build_config("default", [*overrides, "num_sites=500"])
    module = experiment.population.module
    big = memory_estimate(config, experiment.federation, module)["population buffers"]
    small = memory_estimate(half, experiment.federation, module)["population buffers"]
    assert big == 2 * small  # N x P x (optimizer state): nothing grows like N^2
    (tmp_path / "run").mkdir()
    summary = Runner(config, tmp_path / "run", show_progress=False, experiment=experiment).run()
    assert len(summary["local_accuracy"]) == 1000 and summary["ala"] > 0.2
