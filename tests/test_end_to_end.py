"""Small real runs on Fashion-MNIST: learning, the label-skew signature, files, resume, re-run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gossiplab.catalogue import build_config
from gossiplab.metrics import consensus_distance
from gossiplab.runner import RunInterrupted, Runner


def finish(config, run_dir, **kwargs):
    run_dir.mkdir(parents=True, exist_ok=True)
    return Runner(config, run_dir, show_progress=False, **kwargs).run()


@pytest.fixture(scope="module")
def default_and_local(tmp_path_factory):
    """The default experiment (16 sites, Dirichlet 0.1) and local-only, shortened to 300 steps."""
    root = tmp_path_factory.mktemp("runs")
    short = ["train.steps=300", "eval.every=100"]
    return (
        finish(build_config("default", short), root / "default"),
        finish(build_config("local-only", short), root / "local"),
    )


def test_default_learns_far_above_chance(default_and_local):
    default, _ = default_and_local
    assert default["ala"] > 0.7  # chance is 0.1
    assert default["mmga"] > 0.5
    assert default["communication_steps"][:2] == [10, 20]


def test_local_only_shows_the_label_skew_signature(default_and_local):
    default, local = default_and_local
    assert local["ala"] > 0.8
    assert local["aga"] < local["ala"] - 0.3  # local models do not generalise to other sites' labels
    assert local["bytes_sent"] == 0
    assert default["aga"] > local["aga"] + 0.1  # gossip transfers knowledge across sites


def test_final_merge_only_ends_in_consensus(small_config, tmp_path):
    summary = finish(small_config("final-merge-only"), tmp_path / "final")
    assert summary["consensus_distance"] == pytest.approx(0.0, abs=1e-12)
    assert summary["mmga"] == pytest.approx(summary["aga"])
    assert summary["communication_steps"] == [120]
    premerge = torch.load(tmp_path / "final" / "premerge.pt", weights_only=True)
    final = torch.load(tmp_path / "final" / "checkpoint.pt", weights_only=True)["theta"]
    assert (premerge - premerge.mean(0)).abs().max() > 1e-3  # sites had drifted apart before the merge
    torch.testing.assert_close(final, premerge.mean(0).expand_as(final))


@pytest.mark.parametrize("method", ["one-peer-exponential", "exponential"])
def test_final_merge_by_exponential_gossip(small_config, tmp_path, method):
    """8 sites, log2 8 = 3 rounds: one-peer exponential gives the exact average; the static graph
    (|lambda_2| = 1/2) shrinks the squared distance to the mean at least 4^3-fold."""
    summary = finish(small_config("final-merge-only", f"gossip.final_merge={method}"), tmp_path / method)
    premerge = torch.load(tmp_path / method / "premerge.pt", weights_only=True)
    before = consensus_distance(premerge)
    if method == "one-peer-exponential":
        assert summary["consensus_distance"] < 1e-9 * before
    else:
        assert 0 < summary["consensus_distance"] <= before / 4**3


def test_byte_counts_match_the_analytic_formula(small_config, tmp_path):
    """Ring: every round each of m sites sends P parameters to 2 neighbours (m R P T with R = 2),
    plus an exact final merge of 2 (m - 1) P; 4 bytes per parameter."""
    summary = finish(small_config("ring", "gossip.every=10", "gossip.final_merge=exact"), tmp_path / "ring")
    m, p, rounds = 8, summary["num_parameters"], 120 // 10
    assert summary["bytes_sent"] == 4 * (m * 2 * p * rounds + 2 * (m - 1) * p)


def test_resume_continues_to_the_uninterrupted_result(small_config, tmp_path):
    config = small_config("default", "train.optimizer=adam", "train.lr=0.001")
    finish(config, tmp_path / "whole")

    def stop_after_first_evaluation(runner, row):
        if row["step"] == 40:
            runner.request_stop()

    (tmp_path / "split").mkdir()
    with pytest.raises(RunInterrupted, match="stopped at step 40/120"):
        Runner(config, tmp_path / "split", show_progress=False).run(on_evaluation=stop_after_first_evaluation)
    assert not (tmp_path / "split" / "summary.json").exists()
    finish(config, tmp_path / "split", resume=True)

    assert (tmp_path / "split" / "metrics.jsonl").read_bytes() == (tmp_path / "whole" / "metrics.jsonl").read_bytes()
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert torch.equal(whole["theta"], split["theta"])
    assert torch.equal(whole["optimizer"]["exp_avg_sq"], split["optimizer"]["exp_avg_sq"])


def test_resume_refuses_a_finished_run(small_config, tmp_path):
    finish(small_config(), tmp_path / "done")
    from gossiplab.rundir import RunDirError

    with pytest.raises(RunDirError, match="already holds a finished run"):
        Runner(small_config(), tmp_path / "done", resume=True)


@pytest.mark.long
def test_cli_run_writes_a_complete_run_directory_that_reruns_identically(tmp_path):
    args = ["num_sites=4", "train.steps=60", "eval.every=30", "--quiet"]
    first = subprocess.run(
        [sys.executable, "-m", "gossiplab", "run", *args, "--run-dir", str(tmp_path / "a")],
        capture_output=True,
        text=True,
    )
    assert first.returncode == 0, first.stderr
    assert "MMGA" in first.stdout and f"run directory: {tmp_path / 'a'}" in first.stdout
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "checkpoint.pt",
        "accuracy.png",
        "consensus.png",
        "accuracy_matrix.png",
    } <= files
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 30, 60]
    assert len(json.loads((tmp_path / "a" / "summary.json").read_text())["accuracy_matrix"]) == 4

    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "gossiplab",
            "run",
            "--config",
            str(tmp_path / "a" / "config.toml"),
            "--quiet",
            "--run-dir",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == (tmp_path / "b" / "metrics.jsonl").read_bytes()


def test_the_loop_trains_without_a_run_directory(small_config, tmp_path):
    """`gossiplab.loop.train(experiment, state, comm, callbacks)` alone, no runner and no file,
    computes the runner's metrics to the bit: the run directory is the runner's side only."""
    from gossiplab.assembly import build_experiment, check_experiment
    from gossiplab.callbacks import Callback
    from gossiplab.communicator import SingleProcess
    from gossiplab.devices import PinnedCompute, resolve_device, resolved_threads
    from gossiplab.loop import train
    from gossiplab.state import TrainingState

    config = small_config("default", "gossip.final_merge=exact")
    finish(config, tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    class Rows(Callback):
        def __init__(self):
            self.rows = []

        def on_evaluation(self, experiment, state, row, matrix):
            self.rows.append(row)

    rows = Rows()
    compute = PinnedCompute(resolved_threads(config.train.threads), resolve_device(config.train.device))
    try:
        experiment, comm = build_experiment(config), SingleProcess(config.num_sites)
        experiment.init_states()
        check_experiment(experiment, comm.sites)
        state = TrainingState.start(config.num_sites, config.seed)
        train(experiment, state, comm, [rows])
    finally:
        compute.restore()
    assert [row["step"] for row in rows.rows] == [0, 40, 80, 120]
    assert json.loads(json.dumps(rows.rows)) == logged
    assert state.traffic.merge_messages == 2 * (config.num_sites - 1)  # the exact final merge ran


def test_a_checkpoint_from_before_a_config_key_existed_resumes_with_its_default(small_config, tmp_path):
    """A run stopped by an earlier gossiplab, whose checkpoint's config lacks a key added since
    (train.gradient_transforms), resumes: the missing key reads as its default, which is what that
    run ran. A key whose value differs is still refused."""
    from gossiplab.rundir import RunDirError, read_checkpoints, write_checkpoint

    config = small_config()
    finish(config, tmp_path / "whole")

    def stop(runner, row):
        if row["step"] == 40:
            runner.request_stop()

    (tmp_path / "split").mkdir()
    with pytest.raises(RunInterrupted):
        Runner(config, tmp_path / "split", show_progress=False).run(on_evaluation=stop)
    path = tmp_path / "split" / "checkpoint.pt"
    state = read_checkpoints(path)[0]
    del state["config"]["train"]["gradient_transforms"]
    write_checkpoint(state, path)  # (the previous one, step 0, is kept beside it)
    finish(config, tmp_path / "split", resume=True)
    assert (tmp_path / "split" / "metrics.jsonl").read_bytes() == (tmp_path / "whole" / "metrics.jsonl").read_bytes()

    (tmp_path / "other").mkdir()
    with pytest.raises(RunInterrupted):
        Runner(config, tmp_path / "other", show_progress=False).run(on_evaluation=stop)
    with pytest.raises(RunDirError, match=r"another config .*train.lr: 0.05 vs 0.01"):
        Runner(small_config("default", "train.lr=0.01"), tmp_path / "other", resume=True, show_progress=False).run()
