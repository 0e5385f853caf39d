"""`gossiplab bench` and scale: the benchmark runs and reports every column (timings are never
asserted), and a 1,000-site run fits and finishes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gossiplab.assembly import build_experiment, memory_estimate
from gossiplab.bench import training_flops
from gossiplab.catalogue import build_config
from gossiplab.config import ModelConfig
from gossiplab.models import build_model
from gossiplab.runner import Runner


@pytest.mark.long
def test_bench_reports_every_model_and_ratio(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--sites", "2,3", "--repeats", "1", "--seconds", "0.01", "--json", str(out)]
    result = subprocess.run([sys.executable, "-m", "gossiplab", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # piped, the table is printed whole: no cell cut to fit 80 columns
    assert "gossip complete / copy" in result.stdout and "…" not in result.stdout
    table = json.loads(out.read_text())
    assert table["square_gemm_peak_gflops"] > 0 and table["device"] == "cpu"
    rows = {(r["model"], r["sites"]): r for r in table["rows"]}
    assert set(rows) == {(m, n) for m in ("mlp", "cnn", "head") for n in (2, 3)}
    assert rows[("cnn", 2)]["strategy"] == "loop" and rows[("cnn", 2)]["fraction_of_kernel_limit"] is None
    for row in rows.values():
        assert row["speedup"] > 0 and row["gossip_ring_vs_copy"] > 0 and row["gossip_complete_vs_copy"] > 0
    assert rows[("mlp", 2)]["fraction_of_kernel_limit"] > 0
    assert all(row["optimizer_share"] > 0 for row in rows.values())


def test_training_flops_count_the_work_a_step_does_and_no_dx_for_the_data():
    """Forward, dW and dX of every layer, except dX of the first: its input is the data, and
    neither the engine nor the loop computes a gradient for it (GFLOP/s would be inflated)."""
    mlp = build_model(ModelConfig(name="mlp", hidden=[200, 200]), (1, 28, 28), 10)
    forward = [2 * 784 * 200, 2 * 200 * 200, 2 * 200 * 10]
    assert training_flops(mlp, (1, 28, 28)) == 3 * sum(forward) - forward[0]
    cnn = build_model(ModelConfig(name="cnn", channels=[16, 32]), (1, 28, 28), 10)
    # 2 x output elements x input channels x kernel area; 5x5 convolutions padded 2, pooled by 2
    forward = [2 * (16 * 28 * 28) * 1 * 25, 2 * (32 * 14 * 14) * 16 * 25, 2 * 1568 * 10]
    assert training_flops(cnn, (1, 28, 28)) == 3 * sum(forward) - forward[0]


def test_bench_refuses_bad_arguments():
    result = subprocess.run(
        [sys.executable, "-m", "gossiplab", "bench", "--models", "mlp,transformer"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--models mlp,transformer: allowed values are mlp, cnn, head" in result.stderr


def test_bench_refuses_a_device_before_any_work(gossiplab_main):
    code, _, err = gossiplab_main("bench", "--device", "tpu")
    assert code == 2 and "--device tpu: unknown device; allowed: cpu, cuda, cuda:K, mps or auto" in err
    code, _, err = gossiplab_main("bench", "--device", "auto", "--distributed")
    assert code == 2 and "--device auto: --distributed times the CPU (gloo) runtime" in err


def test_bench_busy_times_both_spin_counts_idle_and_with_a_busy_core(tmp_path, gossiplab_main):
    out = tmp_path / "busy.json"
    args = ["bench", "--busy", "--repeats", "1", "--seconds", "0.05", "--json", str(out)]
    result = subprocess.run([sys.executable, "-m", "gossiplab", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "one core busy" in result.stdout and "1000 spins" in result.stdout
    rows = json.loads(out.read_text())
    assert [row["busy_core"] for row in rows] == [False, True]
    assert all(row["stock_steps_per_s"] > 0 and row["gossiplab_steps_per_s"] > 0 for row in rows)
    code, _, err = gossiplab_main("bench", "--busy", "--distributed")
    assert code == 2 and "--busy times the CPU in fresh processes" in err


def test_bench_network_times_every_variant_against_the_synchronous_loop(tmp_path, gossiplab_main):
    out = tmp_path / "network.json"
    code, stdout, _ = gossiplab_main("bench", "--network", "--sites", "4", "--rounds", "8", "--repeats", "1",
                                     "--json", str(out))  # fmt: skip
    assert code == 0 and "churn + loss" in stdout
    (row,) = json.loads(out.read_text())
    assert row["sites"] == 4 and row["synchronous"]["vs_synchronous"] == 1.0
    assert all(row[name]["steps_per_s"] > 0 for name in ("churn + loss", "CHOCO top-10%", "CHOCO + churn + loss"))
    code, _, err = gossiplab_main("bench", "--network", "--busy")
    assert code == 2 and "--network times the simulated network on the CPU" in err
    code, _, err = gossiplab_main("bench", "--network", "--rounds", "5")
    assert code == 2 and "--rounds 5: --network times the steps after 5 warm-up steps" in err


@pytest.mark.parametrize(("given", "seen"), [(None, "1000"), ("5", "5")])
def test_gossiplab_imported_first_sets_openmps_spin_count_unless_the_user_did(given, seen):
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | ({"GOMP_SPINCOUNT": given} if given else {})
    code = "import os, gossiplab, torch; print(os.environ['GOMP_SPINCOUNT'])"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == seen


@pytest.mark.long
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
    big = memory_estimate(config, experiment.federation, module)["population"]
    small = memory_estimate(half, experiment.federation, module)["population"]
    assert big == 2 * small  # N x P x (optimizer state): nothing grows like N^2
    (tmp_path / "run").mkdir()
    summary = Runner(config, tmp_path / "run", show_progress=False, experiment=experiment).run()
    assert len(summary["local_accuracy"]) == 1000 and summary["ala"] > 0.2
