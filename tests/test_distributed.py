"""The multi-process runtime: K gloo processes on 127.0.0.1 give the single-process result.

Every test starts real processes (`python -m gossiplab run` with the variables torchrun sets, or
torchrun itself), bounded in time; they stop by themselves or are killed by the test.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gossiplab.bench_distributed import free_port
from gossiplab.catalogue import build_config
from gossiplab.config import ConfigError
from gossiplab.distributed import payload_rows
from gossiplab.rundir import read_metrics
from gossiplab.runner import Runner

# a small real run: 8 sites of Fashion-MNIST, an MLP, gossip after every step
SMALL = [
    "num_sites=8",
    "train.steps=6",
    "eval.every=3",
    "gossip.every=1",
    "train.threads=1",
    "data.train_per_source=4000",
    "data.test_per_source=1000",
]
TIMEOUT_S = 240


def start(processes: int, args: list[str], extra: list[list[str]] | None = None) -> list[subprocess.Popen]:
    """K processes of `gossiplab run` wired as torchrun wires them (RANK, WORLD_SIZE, MASTER_*)."""
    port = free_port()
    started = []
    for rank in range(processes):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        command = [sys.executable, "-m", "gossiplab", "run", "--quiet", *args, *(extra[rank] if extra else [])]
        started.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return started


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Wait for every process (killing all of them past the time limit); (exit code, output) each."""
    deadline = time.monotonic() + TIMEOUT_S
    results = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail(f"distributed run did not finish within {TIMEOUT_S} s")
        results.append((process.returncode, output))
    return results


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in their own process groups)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def simulate(overrides: list[str], run_dir: Path) -> tuple[torch.Tensor, list[dict]]:
    config = build_config("default", overrides)
    run_dir.mkdir()
    Runner(config, run_dir, show_progress=False).run()
    theta = torch.load(run_dir / "checkpoint.pt", weights_only=True)["theta"]
    return theta, read_metrics(run_dir / "metrics.jsonl")


def uninterrupted(processes: int, overrides: list[str], run_dir: Path) -> tuple[torch.Tensor, list[dict]]:
    """The reference for a long interrupted run: the same processes, uninterrupted. Over hundreds of
    steps the engine's batched kernels, shaped by each process's block size, round differently
    from one process holding every site, and training amplifies that; like is compared with like."""
    results = finish(start(processes, [*overrides, "--run-dir", str(run_dir)]))
    assert all(code == 0 for code, _ in results), results
    return gathered_theta(run_dir, processes), read_metrics(run_dir / "metrics.jsonl")


def gathered_theta(run_dir: Path, processes: int) -> torch.Tensor:
    return torch.cat(
        [torch.load(run_dir / f"rank{r}" / "checkpoint.pt", weights_only=True)["theta"] for r in range(processes)]
    )


def assert_same_run(theta: torch.Tensor, rows: list[dict], run_dir: Path, processes: int) -> None:
    torch.testing.assert_close(gathered_theta(run_dir, processes), theta, rtol=1e-5, atol=1e-6)
    distributed_rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in distributed_rows] == [r["step"] for r in rows]
    for mine, reference in zip(distributed_rows, rows, strict=True):
        for key in ("ala", "aga", "mmga", "consensus_distance", "worst10_local", "bytes_sent", "simulated_time_s"):
            assert mine[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key


LOSSY_CHURNING = [
    "train.steps=40", "eval.every=20", "network.message_loss=0.3", "network.churn_leave=0.1", "network.churn_return=0.3"
]  # fmt: skip


@pytest.mark.parametrize(
    ("processes", "topology", "mixing", "network"),
    [
        (2, "ring", "uniform", []),
        pytest.param(4, "random-one-peer", "metropolis", [], marks=pytest.mark.long),
        pytest.param(4, "complete", "uniform", [], marks=pytest.mark.long),
        pytest.param(2, "exponential", "metropolis", [], marks=pytest.mark.long),
        pytest.param(2, "exponential", "metropolis", LOSSY_CHURNING, marks=pytest.mark.long, id="lossy-churning"),
    ],
)
def test_processes_reproduce_the_single_process_simulation(tmp_path, processes, topology, mixing, network):
    """Across processes, the same run as one process simulates, a lossy and churning network too
    (every process draws the network's events from the same stream)."""
    overrides = [*SMALL, f"gossip.topology={topology}", f"gossip.mixing={mixing}", "gossip.final_merge=exact", *network]
    theta, rows = simulate(overrides, tmp_path / "simulation")
    results = finish(start(processes, [*overrides, "--run-dir", str(tmp_path / "distributed")]))
    assert all(code == 0 for code, _ in results), results
    assert_same_run(theta, rows, tmp_path / "distributed", processes)
    summary = json.loads((tmp_path / "distributed" / "summary.json").read_text())
    assert summary["distributed"]["processes"] == processes
    assert "ALA" in results[0][1] and "ALA" not in results[1][1]  # rank 0 alone reports


@pytest.mark.parametrize(
    ("compressor", "travels", "network"),
    [
        pytest.param("top-k", lambda p: 8 * math.ceil(0.1 * p), [], id="top-k"),
        pytest.param("qsgd", lambda p: 4 + math.ceil(6 * p / 8), [], marks=pytest.mark.long, id="qsgd"),
        pytest.param(
            "top-k", lambda p: 8 * math.ceil(0.1 * p), LOSSY_CHURNING, marks=pytest.mark.long, id="top-k-lossy-churning"
        ),
    ],
)
def test_choco_across_processes_is_the_simulation_and_sends_its_compressed_messages(
    tmp_path, compressor, travels, network
):
    """CHOCO-SGD on 2 processes: the single-process run (on a lossy, churning network too), with
    each process sending its 4 sites' compressed messages to the other every round, as they travel
    (top-k: k float32 values and k int32 indices; qsgd: the norm and 6 bits per entry at s = 16), measured
    at the process group."""
    overrides = [*SMALL, "gossip.algorithm=choco-sgd", "gossip.topology=ring", f"choco.compressor={compressor}",
                 *network]  # fmt: skip
    theta, rows = simulate(overrides, tmp_path / "simulation")
    results = finish(start(2, [*overrides, "--run-dir", str(tmp_path / "distributed")]))
    assert all(code == 0 for code, _ in results), results
    assert_same_run(theta, rows, tmp_path / "distributed", 2)
    summary = json.loads((tmp_path / "distributed" / "summary.json").read_text())
    rounds, width = summary["gossip_rounds"], summary["communication"]["parameters_P"]
    assert summary["distributed"]["payload_bytes_sent"] == rounds * 2 * 4 * travels(width)


def test_bytes_sent_are_the_rows_neighbours_need():
    """Two blocks of 4 sites on a ring: each block sends its two boundary rows, nothing else."""
    weights = torch.zeros(8, 8)
    for i in range(8):
        weights[i, [i, (i + 1) % 8, (i - 1) % 8]] = 1 / 3
    blocks = [(0, 4), (4, 8)]
    assert payload_rows(weights, blocks, [0, 1]) == [2, 2]
    assert payload_rows(torch.full((8, 8), 1 / 8), blocks, [0, 1]) == [4, 4]  # dense: whole blocks
    assert payload_rows(torch.eye(8), blocks, [0, 1]) == [0, 0]


# a 2-process run long enough to be killed mid-way, and its uninterrupted result (shared by the tests)
LONG = [*SMALL, "train.steps=300", "eval.every=5", "gossip.topology=ring"]


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory) -> tuple[torch.Tensor, list[dict]]:
    return uninterrupted(2, LONG, tmp_path_factory.mktemp("long") / "uninterrupted")


@pytest.mark.long
def test_torchrun_launch_with_resume_across_ranks(tmp_path, long_reference):
    """The README's command; the processes are killed mid-run and `--resume` ends at the
    uninterrupted result (ranks may stop one checkpoint apart: they agree on the older one)."""
    overrides = LONG
    theta, rows = long_reference
    run_dir = tmp_path / "distributed"
    port = str(free_port())
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    torchrun = subprocess.Popen(
        [*launch, "-m", "gossiplab", "run", "--quiet", *overrides, "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT_S
    while len(read_metrics(run_dir / "metrics.jsonl")) < 4 and torchrun.poll() is None:
        assert time.monotonic() < deadline, "no metrics written"
        time.sleep(0.05)
    for pid in [*descendants(torchrun.pid), torchrun.pid]:  # the workers, then torchrun: a power cut
        os.kill(pid, signal.SIGKILL)
    torchrun.wait()
    assert not (run_dir / "summary.json").exists(), "the run ended before it was killed"
    resumed = subprocess.run(
        [*launch, "-m", "gossiplab", "run", "--quiet", "--resume", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_run(theta, rows, run_dir, 2)


@pytest.mark.long
def test_torchrun_restarts_a_killed_worker_and_the_run_continues_to_the_same_result(tmp_path, long_reference):
    """On one machine torchrun ends every worker when one dies; with --max-restarts it relaunches
    them with the same command, which continues from the checkpoints (no site is lost)."""
    overrides = LONG
    theta, rows = long_reference
    run_dir = tmp_path / "distributed"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1"]
    torchrun = subprocess.Popen(
        [*launch, "--master-port", str(free_port()), "-m", "gossiplab", "run", "--quiet", *overrides,
         "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    while len(read_metrics(run_dir / "metrics.jsonl")) < 4:
        assert time.monotonic() < deadline and torchrun.poll() is None, "no metrics written"
        time.sleep(0.05)
    workers = descendants(torchrun.pid)
    os.kill(workers[-1], signal.SIGKILL)
    try:
        output, _ = torchrun.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(torchrun.pid), torchrun.pid]:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the relaunched run did not finish within {TIMEOUT_S} s")
    assert torchrun.returncode == 0, output
    assert "restart" in output.lower()
    assert_same_run(theta, rows, run_dir, 2)


@pytest.mark.long
@pytest.mark.parametrize("on_failure", ["drop", "stop"])
def test_a_killed_process_is_dropped_or_stops_the_run_cleanly(tmp_path, on_failure):
    run_dir = tmp_path / "run"
    overrides = [
        *SMALL,
        "train.steps=200",
        "eval.every=20",
        "gossip.topology=ring",
        "distributed.timeout_s=10",
        f"distributed.on_failure={on_failure}",
    ]
    processes = start(3, [*overrides, "--run-dir", str(run_dir)])
    deadline = time.monotonic() + TIMEOUT_S
    while len(read_metrics(run_dir / "metrics.jsonl")) < 3:
        assert time.monotonic() < deadline and processes[2].poll() is None, "the run did not get going"
        time.sleep(0.02)
    processes[2].kill()  # rank 2 holds sites 6 and 7 (blocks 0-2, 3-5, 6-7)
    written = read_metrics(run_dir / "metrics.jsonl")
    results = finish(processes)
    log = results[0][1]
    assert "lost rank(s) [2] holding sites [6, 7]" in log
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps))
    assert rows[: len(written) - 1] == written[: len(written) - 1]  # nothing already written is lost
    if on_failure == "drop":
        assert [code for code, _ in results[:2]] == [0, 0], results
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["dropped_sites"] == [6, 7] and summary["step"] == 200
        assert rows[-1]["local_accuracy"][6:] == [None, None]
        assert rows[-1]["ala"] > 0.5
    else:
        assert [code for code, _ in results[:2]] == [1, 1], results
        assert "stopping" in log and not (run_dir / "summary.json").exists()
        for rank in range(3):  # every process keeps a loadable checkpoint at a logged step
            newest = run_dir / f"rank{rank}" / "checkpoint.pt"  # (or only the previous one, if killed
            path = newest if newest.is_file() else newest.with_name("checkpoint.previous.pt")  # mid-write)
            assert torch.load(path, weights_only=True)["step"] in steps
        # restarted, all three continue from the newest checkpoint they share, to the uninterrupted result
        results = finish(start(3, ["--resume", str(run_dir)]))
        assert [code for code, _ in results] == [0, 0, 0], results
        assert_same_run(*uninterrupted(3, overrides, tmp_path / "uninterrupted"), run_dir, 3)


@pytest.mark.long
def test_two_torchrun_nodes_one_loses_its_worker_and_the_other_finishes_without_its_sites(tmp_path):
    """The README's multi-machine launch, two torchrun agents on 127.0.0.1 standing in for two
    machines (c10d rendezvous); node 1's worker dies and node 0 drops its sites and finishes.
    (Node 0 must be the one at the rendezvous endpoint: losing the node that hosts torchrun's
    store ends every agent, whatever gossiplab does.)"""
    run_dir = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    overrides = [*SMALL, "train.steps=400", "eval.every=20", "gossip.topology=ring", "distributed.timeout_s=10"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    launch += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "-m", "gossiplab", "run", "--quiet"]
    command = [*launch, *overrides, "--run-dir", str(run_dir)]
    nodes = []
    for _ in range(2):  # node 0 first: it hosts torchrun's rendezvous store and gets rank 0
        nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        time.sleep(2)
    deadline = time.monotonic() + TIMEOUT_S
    while len(read_metrics(run_dir / "metrics.jsonl")) < 3:
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), "the run did not get going"
        time.sleep(0.02)
    (worker,) = descendants(nodes[1].pid)
    assert b"RANK=1" in Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    os.kill(worker, signal.SIGKILL)
    # the surviving node's agent then waits at torchrun's exit barrier for the lost node (300 s by
    # default): the run is complete once its worker has written summary.json and exited
    while not (run_dir / "summary.json").is_file() or any(descendants(node.pid) for node in nodes):
        assert time.monotonic() < deadline, "the surviving worker did not finish"
        time.sleep(0.1)
    for node in nodes:
        node.kill()
    log = "".join(node.communicate()[0] for node in nodes)
    assert "lost rank(s) [1] holding sites [4, 5, 6, 7]" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dropped_sites"] == [4, 5, 6, 7] and summary["step"] == 400


def test_processes_with_different_configs_refuse_to_start(tmp_path):
    results = finish(start(2, [*SMALL, "--run-dir", str(tmp_path)], extra=[["train.lr=0.05"], ["train.lr=0.1"]]))
    assert [code for code, _ in results] == [2, 2]
    assert all("'train.lr'" in output for _, output in results)
    assert not any(tmp_path.iterdir())


def test_rules_that_need_the_whole_population_are_refused_by_field(monkeypatch):
    """A process a launcher started (WORLD_SIZE > 1) refuses, while reading its config, the parts that
    need every site in one process, and fewer sites than processes."""
    build_config("l2c")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"mixing' = 'influence': runs only in one process.*uniform, metropolis"):
        build_config("default", ["gossip.mixing=influence"])
    with pytest.raises(ConfigError, match=r"gossip\.algorithm' = 'l2c': runs only in one process.*dsgd"):
        build_config("l2c")
    with pytest.raises(ConfigError, match=r"gossip\.algorithm' = 'dimat'"):
        build_config("dimat")
    with pytest.raises(ConfigError, match=r"num_sites' = 3: 3 sites cannot fill 4 processes"):
        build_config("default", ["num_sites=3"])


@pytest.mark.long
def test_bench_distributed_sends_exactly_the_analytic_bytes(tmp_path):
    """`gossiplab bench --distributed`: every K and topology reported; the payload handed to gloo
    is the analytic count, and what crosses loopback is that plus headers and small messages."""
    out = tmp_path / "bench.json"
    args = ["bench", "--distributed", "--sites", "4", "--rounds", "2", "--json", str(out)]
    result = subprocess.run([sys.executable, "-m", "gossiplab", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout and "…" not in result.stdout  # piped: the table printed whole
    rows = json.loads(out.read_text())
    variants = ((1, False), (2, False), (2, True), (4, False), (4, True))  # True: authenticated payloads
    assert [(r["topology"], r["processes"], r["authenticated"]) for r in rows] == [
        (t, k, a) for t in ("ring", "complete") for k, a in variants
    ]
    for row in rows:
        assert row["round_ms"] > 0
        assert row["payload_bytes_per_round"] == row["analytic_bytes_per_round"]
        if row["processes"] > 1 and row["loopback_bytes_per_round"] is not None:
            assert 1.0 <= row["loopback_bytes_per_round"] / row["payload_bytes_per_round"] < 1.1
    assert rows[0]["analytic_bytes_per_round"] == 0  # one process sends nothing
