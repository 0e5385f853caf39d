"""Determinism, crash safety, divergence, resource limits, and bad input refused (never a traceback)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gossiplab.assembly import check_memory, memory_estimate
from gossiplab.catalogue import build_config
from gossiplab.config import ConfigError
from gossiplab.data.federation import build_federation
from gossiplab.data.partition import PartitionError
from gossiplab.data.sources import SourceMissingError
from gossiplab.memory import ResourceError
from gossiplab.models import build_model
from gossiplab.rundir import RunDirError
from gossiplab.runner import DivergenceError, Runner

SMALL = ["num_sites=4", "train.steps=300", "eval.every=50"]


def cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "gossiplab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)  # fmt: skip


def finish(config, run_dir, resume=False, **hooks):
    run_dir.mkdir(parents=True, exist_ok=True)
    return Runner(config, run_dir, show_progress=False, resume=resume).run(**hooks)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the SMALL config, through the CLI."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    process = cli("run", *SMALL, "--quiet", "--run-dir", str(run_dir))
    assert process.wait() == 0, process.stderr.read()
    return run_dir


CNN = [
    "model.name=cnn",
    "model.channels=[8]",
    "num_sites=4",
    "train.steps=12",
    "eval.every=6",
    "--quiet",
    "data.test_per_source=1000",
]  # fmt: skip  (evaluating 10,000 test images dominated the run)


def final_metrics(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.long
def test_a_run_pins_its_thread_count_so_its_config_reruns_to_the_same_bytes_under_any_environment(tmp_path):
    """The promise (docs/trust.md): the same config, seed and thread count on the same kind of CPU
    and PyTorch give the same bytes. A run pins its thread count (`train.threads`, 0 = PyTorch's
    starting count) and config.toml records the number, so its config re-runs with that count
    whatever OMP_NUM_THREADS says. The CNN shows it here: oneDNN's convolutions reduce in a
    thread-count dependent order on this CPU (the MLP's matrix kernels do not on Intel, but did on
    an AMD EPYC), so a re-run on another count would differ."""
    first = cli("run", *CNN, "--run-dir", str(tmp_path / "first"), env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert first.wait() == 0, first.stderr.read()
    assert "threads = 2" in (tmp_path / "first" / "config.toml").read_text()
    assert final_metrics(tmp_path / "first")["platform"]["threads"] == 2
    again = cli("run", "--config", str(tmp_path / "first" / "config.toml"), "--quiet", "--run-dir",
                str(tmp_path / "again"), env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert again.wait() == 0, again.stderr.read()
    assert (tmp_path / "again" / "metrics.jsonl").read_bytes() == (tmp_path / "first" / "metrics.jsonl").read_bytes()
    # another thread count is another reduction order: not the same bits, the same results within a
    # tolerance (measured: 1 vs 2 threads, 12 steps: losses 1e-5 apart, accuracies one test image)
    other = cli("run", *CNN, "train.threads=1", "--run-dir", str(tmp_path / "other"))
    assert other.wait() == 0, other.stderr.read()
    pinned, one = final_metrics(tmp_path / "first"), final_metrics(tmp_path / "other")
    for metric in ("ala", "aga", "mmga"):
        assert abs(pinned[metric] - one[metric]) <= 0.01, metric
    for metric in ("train_loss", "consensus_distance"):
        assert abs(pinned[metric] - one[metric]) <= 1e-3 * abs(pinned[metric]), metric


def test_a_run_in_a_process_pins_its_thread_count_and_gives_the_callers_back(tmp_path):
    config = build_config("default", ["num_sites=4", "train.steps=4", "eval.every=2", "train.threads=1"])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    try:
        finish(config, tmp_path / "run", on_step=lambda runner: seen.append(torch.get_num_threads()))
        assert seen == [1, 1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_changed_seed_changes_partition_init_and_topology():
    a, b = build_config("default", ["num_sites=4"]), build_config("default", ["num_sites=4", "seed=1"])
    fa, fb = build_federation(a), build_federation(b)
    assert not torch.equal(fa.train_index, fb.train_index)
    from gossiplab.population import Population
    from gossiplab.topology import random_one_peer

    module = build_model(a.model, fa.image_shape, fa.num_classes)
    assert not torch.equal(Population(module, 2, seed=0).theta, Population(module, 2, seed=1).theta)
    assert any(not torch.equal(random_one_peer(8, r, 0), random_one_peer(8, r, 1)) for r in range(3))


@pytest.mark.long
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_result(reference, tmp_path):
    rng = random.Random(1234)
    resumed_from_checkpoint = 0
    for attempt in range(3):  # one kill at any moment, two during the training
        run_dir = tmp_path / f"killed-{attempt}"
        process = cli("run", *SMALL, "--quiet", "--run-dir", str(run_dir))
        if attempt:  # a random moment of the training itself (the run takes a few seconds on 2 cores)
            deadline = time.time() + 60
            while not (run_dir / "checkpoint.pt").exists() and process.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.8))
        else:  # any moment: during start-up too, before anything was written
            time.sleep(rng.uniform(0.5, 3.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if (run_dir / "summary.json").exists():
            continue  # finished before the kill
        if (run_dir / "checkpoint.pt").exists():
            resumed_from_checkpoint += 1
        if (run_dir / "config.toml").exists():
            resumed = cli("run", "--resume", str(run_dir), "--quiet")
        else:
            resumed = cli("run", *SMALL, "--quiet", "--run-dir", str(run_dir))
        assert resumed.wait() == 0, resumed.stderr.read()
        assert (run_dir / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
        final = torch.load(run_dir / "checkpoint.pt", weights_only=True)["theta"]
        assert torch.equal(final, torch.load(reference / "checkpoint.pt", weights_only=True)["theta"])
    assert resumed_from_checkpoint >= 1  # at least one kill landed mid-run


@pytest.mark.long
def test_a_checkpoint_cut_short_mid_write_is_never_the_one_resumed(reference, tmp_path):
    """Writes go to a temporary file then are renamed: a half-written one is ignored."""
    run_dir = tmp_path / "torn"
    config = build_config("default", SMALL)

    def stop_at_100(runner, row):
        if row["step"] == 100:
            runner.request_stop()

    run_dir.mkdir()
    with pytest.raises(Exception, match="stopped at step 100"):
        Runner(config, run_dir, show_progress=False).run(on_evaluation=stop_at_100)
    (run_dir / ".checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 150, "ala": 0.')  # a row cut short by the kill
    finish(config, run_dir, resume=True)
    assert (run_dir / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()


@pytest.mark.long
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(reference, tmp_path):
    run_dir = tmp_path / "interrupted"
    process = cli("run", *SMALL, "--run-dir", str(run_dir), "--quiet")
    deadline = time.time() + 60
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate()
    if process.returncode == 0:
        pytest.skip("the run finished before Ctrl-C arrived")
    assert process.returncode == 130
    assert f"gossiplab run --resume {run_dir}" in stderr
    resumed = cli("run", "--resume", str(run_dir), "--quiet")
    assert resumed.wait() == 0
    assert (run_dir / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()


def test_killed_after_logging_a_row_but_before_its_checkpoint_resumes_without_duplicate_rows(tmp_path, monkeypatch):
    """The state a SIGKILL can leave (found by the random-kill test on a loaded machine): the
    step-0 checkpoint, and metrics rows for steps 0 and 40. Resuming re-runs steps 1-40 and must
    not log step 0 a second time."""
    config = build_config("default", ["num_sites=4", "train.steps=80", "eval.every=40"])
    for name in ("reference", "killed"):
        (tmp_path / name).mkdir()
    Runner(config, tmp_path / "reference", show_progress=False).run()
    real_save = Runner.save_checkpoint

    def save_unless_step_40(runner):
        if runner.step != 40:
            real_save(runner)

    def kill_at_40(_runner, row):
        if row["step"] == 40:
            raise KeyboardInterrupt

    monkeypatch.setattr(Runner, "save_checkpoint", save_unless_step_40)
    with pytest.raises(KeyboardInterrupt):
        Runner(config, tmp_path / "killed", show_progress=False).run(on_evaluation=kill_at_40)
    monkeypatch.setattr(Runner, "save_checkpoint", real_save)
    Runner(config, tmp_path / "killed", resume=True, show_progress=False).run()
    reference = (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()
    resumed = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in resumed] == [0, 40, 80]
    assert [{k: v for k, v in json.loads(r).items() if k != "wall_time_s"} for r in resumed] == [
        {k: v for k, v in json.loads(r).items() if k != "wall_time_s"} for r in reference
    ]


def test_divergence_stops_naming_site_step_and_last_finite_loss(tmp_path):
    config = build_config("default", ["num_sites=4", "train.steps=60", "eval.every=20", "train.lr=1e6"])
    (tmp_path / "r").mkdir()
    with pytest.raises(
        DivergenceError, match=r"non-finite (loss|parameters) at step \d+ on sites \[.*\] \(last finite"
    ):
        Runner(config, tmp_path / "r", show_progress=False).run()
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["sites"]
    assert (tmp_path / "r" / "metrics.jsonl").read_text().startswith('{"step": 0')  # step 0 kept


def test_a_divergence_while_clipping_suggests_a_smaller_clip_not_clipping(tmp_path):
    config = build_config("ring", ["num_sites=4", "train.steps=60", "eval.every=20", "train.lr=1e12"])
    (tmp_path / "r").mkdir()
    with pytest.raises(DivergenceError) as raised:
        Runner(config, tmp_path / "r", show_progress=False).run()
    assert "a smaller train.clip_grad_norm (now 1)" in str(raised.value)
    assert "clip gradients (train.clip_grad_norm=1.0)" not in str(raised.value)


def test_divergence_can_drop_the_site_and_go_on(tmp_path):
    config = build_config("default", ["num_sites=4", "train.steps=60", "eval.every=20", "train.on_divergence=drop"])
    run_dir = tmp_path / "drop"
    run_dir.mkdir()
    runner = Runner(config, run_dir, show_progress=False)

    def poison_site_2(runner_, row):
        if row["step"] == 20:
            runner_.experiment.population.theta[2, 0] = float("nan")

    summary = runner.run(on_evaluation=poison_site_2)
    assert summary["status"] == "finished" and summary["dropped_sites"] == [2]
    assert summary["local_accuracy"][2] is None
    assert all(a is not None for i, a in enumerate(summary["local_accuracy"]) if i != 2)
    assert torch.isfinite(torch.tensor([summary["ala"], summary["aga"], summary["mmga"]])).all()


def test_a_run_that_would_not_fit_in_memory_is_refused_with_the_estimate():
    config = build_config("default", ["num_sites=400", "data.partition=iid", "model.hidden=[4000, 4000]"])
    federation = build_federation(config)
    estimate = memory_estimate(config, federation, build_model(config.model, federation.image_shape, 10))
    assert sum(estimate.values()) > 80 * 2**30
    with pytest.raises(ResourceError, match=r"needs about \d+\.\d GiB .* but 24\.0 GiB is available; lower num_sites"):
        check_memory(estimate, 24 * 2**30)
    small = build_config("default", ["num_sites=4"])
    fed = build_federation(small)
    check_memory(memory_estimate(small, fed, build_model(small.model, fed.image_shape, 10)), 24 * 2**30)


def test_a_checkpoint_from_another_config_is_refused_naming_the_fields(tmp_path):
    config = build_config("default", ["num_sites=4", "train.steps=40", "eval.every=20"])
    finish(config, tmp_path / "a")
    (tmp_path / "a" / "summary.json").unlink()
    text = (tmp_path / "a" / "config.toml").read_text().replace("lr = 0.05", "lr = 0.5")
    (tmp_path / "a" / "config.toml").write_text(text)
    with pytest.raises(RunDirError, match=r"another config .*train.lr: 0.05 vs 0.5"):
        finish(build_config(path=tmp_path / "a" / "config.toml"), tmp_path / "a", resume=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--bogus"], "No such option"),
        (["run", "data.sources=/nonexistent/data.npz", "--quiet"], "no such file or folder"),
        (["run", "--preset", "nope"], "unknown preset 'nope'"),
        (["run", "--config", "/nonexistent.toml"], "cannot read it"),
        (["run", "--resume", "/nonexistent-run"], "no config.toml there"),
    ],
)
@pytest.mark.long
def test_cli_bad_input_is_a_message_not_a_traceback(args, message, tmp_path):
    process = cli(*args, cwd=tmp_path)
    _, stderr = process.communicate()
    assert process.returncode == 2
    assert message in stderr and "Traceback" not in stderr


def test_an_unwritable_run_directory_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    process = cli("run", "--run-dir", str(tmp_path / "file" / "run"))
    _, stderr = process.communicate()
    assert process.returncode == 2 and "cannot be written" in stderr and "Traceback" not in stderr


VALUES = {
    "num_sites": st.integers(-1, 5),
    "seed": st.integers(-1, 3),
    "data.sources": st.sampled_from(['["digits-8x8"]', '["mnist-5k", "digits-8x8"]', '["cifar-11"]', "[]"]),
    "data.partition": st.sampled_from(["iid", "dirichlet", "shards", "by_domain", "random"]),
    "data.alpha": st.floats(-1, 2),
    "data.min_site_samples": st.integers(-1, 400),
    "data.samples_per_site": st.integers(-1, 50),
    "data.classes_per_site": st.integers(0, 4),
    "data.val_fraction": st.floats(-0.5, 1.2),
    "data.image_size": st.integers(0, 12),
    "data.channels": st.integers(0, 4),
    "model.name": st.sampled_from(["mlp", "cnn", "vit"]),
    "model.hidden": st.sampled_from(["[8]", "[]", "[0]", '"wide"']),
    "train.steps": st.integers(-1, 4),
    "train.batch_size": st.integers(-1, 8),
    "train.optimizer": st.sampled_from(["sgd", "adam", "adamw", "lion"]),
    "train.lr": st.floats(-0.1, 0.5),
    "train.momentum": st.floats(-0.5, 1.5),
    "gossip.topology": st.sampled_from(
        ["complete", "ring", "exponential", "one-peer-exponential", "random-one-peer", "star"]
    ),
    "gossip.p": st.floats(-0.5, 1.5),
    "gossip.mixing": st.sampled_from(["uniform", "metropolis", "learned"]),
    "gossip.schedule": st.sampled_from(["every", "steps", "window", "none", "sometimes"]),
    "gossip.every": st.integers(-1, 3),
    "gossip.steps": st.sampled_from(["[]", "[1, 2]", "[0]", "[99]"]),
    "gossip.window_start": st.integers(-1, 5),
    "gossip.window_end": st.integers(-1, 5),
    "gossip.final_merge": st.sampled_from(["none", "exact", "exponential", "one-peer-exponential", "magic"]),
    "eval.every": st.integers(-1, 3),
    "no.such.key": st.just("1"),
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(VALUES)), st.none(), max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: VALUES[k] for k in keys})))  # fmt: skip
def test_random_configs_either_run_or_fail_with_a_named_field(tmp_path_factory, values):
    overrides = ["num_sites=3", "train.steps=3", "eval.every=2", "data.sources=digits-8x8", "data.min_site_samples=8"]
    overrides += [f"{k}={v}" for k, v in values.items()]
    try:
        config = build_config("default", overrides)
        run_dir = tmp_path_factory.mktemp("random")
        Runner(config, run_dir, show_progress=False).run()
        event("ran")
    except ConfigError as error:
        assert "field '" in str(error) or "unknown key" in str(error) or "key=value" in str(error)
        event("refused by validation")
    except (PartitionError, SourceMissingError, DivergenceError, ResourceError) as error:
        assert str(error)
        event(f"refused: {type(error).__name__}")
