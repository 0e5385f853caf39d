"""Who may join a run, and loading what others wrote without running their code.

The join tests start real gloo processes on 127.0.0.1 (as test_distributed does) and a third
process that claims a rank of the run without the secret, or with a wrong one.
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gossiplab.bench_distributed import free_port
from gossiplab.catalogue import build_config
from gossiplab.config import ConfigError
from gossiplab.distributed import join_secret, on_one_machine
from gossiplab.rundir import RunDirError, read_metrics
from gossiplab.runner import Runner
from gossiplab.safeload import UnsafeFileError, load_numpy_pickle, load_tensors
from test_distributed import SMALL, finish

SECRET_ENV = "GOSSIPLAB_JOIN_SECRET"
RUN = [*SMALL, "gossip.topology=ring", "distributed.timeout_s=30"]


class Payload:
    """What an attacker pickles: loading it would call print (any callable would do)."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def launch(
    rank: int, port: int, args: list[str], secret: str | None, world: int = 2, local_world: int | None = None
) -> subprocess.Popen:
    """One process of a run as torchrun starts it; `local_world` < `world` stands for several machines."""
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    env["LOCAL_WORLD_SIZE"] = str(local_world or world)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.pop(SECRET_ENV, None)
    if secret is not None:
        env[SECRET_ENV] = secret
    command = [sys.executable, "-m", "gossiplab", "run", "--quiet", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_with_intruders(run_dir: Path) -> list[tuple[int, str]]:
    """Rank 0 starts, then two intruders claiming rank 1 (one without the secret, one with a wrong
    one), then the rightful rank 1."""
    port = free_port()
    args = [*RUN, "--run-dir", str(run_dir)]
    rank0 = launch(0, port, args, "the right secret")
    time.sleep(2)
    intruders = [launch(1, port, args, None), launch(1, port, args, "a wrong secret")]
    time.sleep(3)
    rank1 = launch(1, port, args, "the right secret")
    return finish([rank0, *intruders, rank1])


def two_processes(run_dir: Path, secret: str | None, local_world: int | None = None) -> list[tuple[int, str]]:
    port = free_port()
    args = [*RUN, "--run-dir", str(run_dir)]
    return finish([launch(rank, port, args, secret, local_world=local_world) for rank in range(2)])


def final_state(run_dir: Path) -> tuple[list[torch.Tensor], list[dict]]:
    thetas = [torch.load(run_dir / f"rank{r}" / "checkpoint.pt", weights_only=True)["theta"] for r in range(2)]
    rows = [{k: v for k, v in row.items() if k != "wall_time"} for row in read_metrics(run_dir / "metrics.jsonl")]
    return thetas, rows


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """The two-process run without any secret, launched as across two machines (one process each):
    what every run with a secret must equal, bit for bit. Rank 0 warns, once, that the network
    must be trusted."""
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    results = two_processes(run_dir, None, local_world=1)
    assert all(code == 0 for code, _ in results), results
    warning = "warning: no join secret"
    assert results[0][1].count(warning) == 1 and warning not in results[1][1], results
    return run_dir


def test_on_one_machine_is_loopback_with_every_process_local(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    for address, local, expected in [("127.0.0.1", "4", True), ("localhost", "4", True), ("127.0.0.1", "2", False),
                                     ("10.0.0.7", "4", False), ("host0", "4", False)]:  # fmt: skip
        monkeypatch.setenv("MASTER_ADDR", address)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert on_one_machine() is expected, (address, local)


@pytest.mark.long
def test_processes_without_the_secret_are_refused_and_the_run_finishes_unchanged(tmp_path, plain):
    (code0, out0), *intruders, (code1, out1) = run_with_intruders(tmp_path / "run")
    assert code0 == 0 and code1 == 0, out0 + out1
    (no_secret_code, no_secret), (wrong_secret_code, wrong_secret) = intruders
    assert no_secret_code == 2 and "did not admit this process" in no_secret and "no join secret" in no_secret
    assert wrong_secret_code == 2 and "the two secrets differ" in wrong_secret, wrong_secret
    assert out0.count("refused a process claiming rank 1") == 2 and "cannot prove the join secret" in out0, out0
    # with the secret, and the intruders turned away, the run is the run without any of that, bit for bit
    plain_thetas, plain_rows = final_state(plain)
    thetas, rows = final_state(tmp_path / "run")
    assert all(torch.equal(a, b) for a, b in zip(thetas, plain_thetas, strict=True))
    assert rows == plain_rows


def attacker(mode: str, port: int) -> subprocess.Popen:
    """tests/attacker.py: a process without the secret that reaches the run's store."""
    command = [sys.executable, str(Path(__file__).parent / "attacker.py"), mode, str(port)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def store_client(port: int) -> torch.distributed.TCPStore:
    for _ in range(200):  # rank 0 starts the store
        try:
            return torch.distributed.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                                              timeout=datetime.timedelta(seconds=5))  # fmt: skip
        except Exception:
            time.sleep(0.05)
    raise AssertionError("rank 0 never opened its store")


def test_an_eavesdropper_that_takes_a_rank_in_gloo_is_caught_before_any_exchange(tmp_path):
    """The attack of the audit: torch's store lists its keys to anyone, so a process without the
    secret finds the group's prefix and joins gloo as rank 1 ahead of the rightful process (frozen
    here right after its claim, so the attacker surely wins the race), then follows the protocol.
    The membership proof over the gloo connection catches it: the run stops with the reason,
    having written nothing, instead of finishing with the attacker's rows."""
    port = free_port()
    args = [*RUN, "--run-dir", str(tmp_path / "run")]
    rank0 = launch(0, port, args, "the right secret")
    store = store_client(port)
    rank1 = launch(1, port, args, "the right secret")
    deadline = time.monotonic() + 60
    while not store.check(["gossiplab/attempt0/join/claim/1/1"]) and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(rank1.pid, signal.SIGSTOP)
    eavesdropper = attacker("race", port)
    try:
        attack, _ = eavesdropper.communicate(timeout=120)
        code0, out0 = rank0.wait(timeout=120), rank0.stdout.read()
    finally:
        os.kill(rank1.pid, signal.SIGCONT)
        rank1.kill()
        rank0.kill()
    assert "joined gloo as rank 1, then refused" in attack, attack
    assert code0 == 2 and "rank(s) [1] of the process group cannot prove the join secret" in out0, out0
    assert "Traceback" not in out0 and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.long
def test_a_forged_abort_is_ignored_and_the_run_finishes_unchanged(tmp_path, plain):
    port = free_port()
    args = [*RUN, "--run-dir", str(tmp_path / "run")]
    rank0 = launch(0, port, args, "the right secret")
    forger = attacker("abort", port)
    assert forger.communicate(timeout=60)[0].strip().endswith("wrote join/abort")
    rank1 = launch(1, port, args, "the right secret")
    (code0, out0), (code1, out1) = finish([rank0, rank1])
    assert code0 == 0 and code1 == 0, out0 + out1
    assert "ignored 'join/abort' in the run's store: rank 0 did not write it" in out1, out1
    plain_thetas, plain_rows = final_state(plain)
    thetas, rows = final_state(tmp_path / "run")
    assert all(torch.equal(a, b) for a, b in zip(thetas, plain_thetas, strict=True)) and rows == plain_rows


@pytest.mark.long
def test_an_inflated_ticket_counter_costs_rank_0_a_bounded_number_of_checks(tmp_path):
    """A million tickets drawn for rank 1: the rightful rank 1 stops at once (its ticket is past
    the bound rank 0 judges), and rank 0 stops at its timeout naming the flood."""
    port = free_port()
    args = [*RUN, "distributed.timeout_s=6", "--run-dir", str(tmp_path / "run")]
    rank0 = launch(0, port, args, "the right secret")
    assert attacker("inflate", port).communicate(timeout=60)[0].strip().endswith("ticket counter")
    rank1 = launch(1, port, args, "the right secret")
    (code0, out0), (code1, out1) = finish([rank0, rank1])
    assert code1 == 2 and "someone floods this run's store" in out1, out1
    assert code0 == 2 and "more than 16 claims of rank(s) [1]: someone floods the store" in out0, out0
    assert "Traceback" not in out0 + out1


TAMPER = """
import sys
from gossiplab.cli import main
from gossiplab.distributed import ProcessGroup

tag = ProcessGroup._tag


def altered(self, payload, sender, receiver):  # from the third exchange on, rank 1's rows change on the way
    if sender == self.rank == 1 and self._exchanges >= 8:
        payload = payload + 1.0
    return tag(self, payload, sender, receiver)


ProcessGroup._tag = altered
sys.argv = ["gossiplab", *sys.argv[1:]]
main()
"""


def test_a_payload_altered_on_the_way_stops_the_run_with_its_rows_kept(tmp_path):
    """Rank 1's tags are computed over altered rows (as if the rows had been changed in flight):
    rank 0 refuses the payload, stops (exit 1) and keeps what it had written; it never mixes them."""
    (tmp_path / "tamper.py").write_text(TAMPER)
    port = free_port()
    args = [*RUN, "--run-dir", str(tmp_path / "run")]
    rank0 = launch(0, port, args, "the right secret")
    env = dict(os.environ, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    env.update(MASTER_PORT=str(port), **{SECRET_ENV: "the right secret"})
    tampered = subprocess.Popen([sys.executable, str(tmp_path / "tamper.py"), "run", "--quiet", *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    (code0, out0), _ = finish([rank0, tampered])
    assert code0 == 1 and "a payload from rank 1 failed its authentication" in out0, out0
    assert "Traceback" not in out0 and not (tmp_path / "run" / "summary.json").exists()
    assert [row["step"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0]  # kept, none after


def test_a_named_secret_variable_that_is_unset_is_refused():
    with pytest.raises(ConfigError, match=r"field 'distributed\.secret_env' = 'MY_RUN_SECRET': no such environment"):
        join_secret(build_config("default", ["distributed.secret_env=MY_RUN_SECRET"]))


@pytest.mark.long
def test_with_on_failure_stop_a_refused_process_stops_the_run(tmp_path):
    """Three ranks: rank 1 is admitted and waits for rank 2; an intruder claims rank 2 and is refused."""
    port = free_port()
    args = [*RUN, "distributed.on_failure=stop", "--run-dir", str(tmp_path / "run")]
    rank0 = launch(0, port, args, "the right secret", world=3)
    time.sleep(1)
    rank1 = launch(1, port, args, "the right secret", world=3)
    time.sleep(2)
    intruder = launch(2, port, args, "a wrong secret", world=3)
    (code0, out0), (code1, out1), (intruder_code, _) = finish([rank0, rank1, intruder])
    assert (code0, code1, intruder_code) == (2, 2, 2), out0 + out1
    assert "refused a process claiming rank 2" in out0 and "distributed.on_failure = 'stop'" in out0
    # rank 1 hears why, whether it was admitted already or still waiting for its verdict
    assert "rank 0 refused a process claiming rank 2" in out1 or "rank 0 stopped" in out1, out1
    assert "Traceback" not in out0 + out1 and not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.long
def test_a_process_that_finds_no_run_says_so(tmp_path):
    port = free_port()
    args = [*RUN, "distributed.timeout_s=1", "--run-dir", str(tmp_path / "run")]
    ((code, output),) = finish([launch(1, port, args, None)])
    assert code == 2 and f"127.0.0.1:{port}" in output and "Traceback" not in output, output


@pytest.mark.long
def test_a_process_holding_a_secret_does_not_join_a_run_without_one(tmp_path):
    port = free_port()
    args = [*RUN, "distributed.timeout_s=3", "--run-dir", str(tmp_path / "run")]
    results = finish([launch(0, port, args, None), launch(1, port, args, "a secret")])
    assert results[1][0] == 2 and "rank 0 runs without one" in results[1][1], results
    assert results[0][0] == 2 and "not every process of the run joined" in results[0][1], results
    assert "Traceback" not in results[0][1] + results[1][1]


def test_the_secret_comes_from_a_file_or_a_variable_never_from_the_config(tmp_path):
    (tmp_path / "secret").write_text("s3cret-from-a-file\n")
    config = build_config("default", [f"distributed.secret_file={tmp_path / 'secret'}"])
    assert join_secret(config) == b"s3cret-from-a-file" and "s3cret" not in config.to_toml()
    os.environ[SECRET_ENV] = "s3cret-from-the-environment"
    try:
        assert join_secret(build_config()) == b"s3cret-from-the-environment"
    finally:
        del os.environ[SECRET_ENV]
    assert join_secret(build_config()) is None
    with pytest.raises(ConfigError, match=r"distributed\.secret_file"):
        build_config("default", [f"distributed.secret_file={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match=r"distributed\.secret_env"):
        build_config("default", ["distributed.secret_env=not a variable name"])
    with pytest.raises(ConfigError, match=r"unknown key 'distributed\.secret'"):
        build_config("default", ["distributed.secret=hunter2"])


def test_a_checkpoint_carrying_a_pickled_object_is_refused(tmp_path, capfd):
    config = build_config("default", ["num_sites=4", "train.steps=4", "eval.every=2"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    Runner(config, run_dir, show_progress=False).run()
    (run_dir / "summary.json").unlink()
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["payload"] = Payload()
    torch.save(state, run_dir / "checkpoint.pt")
    with pytest.raises(RunDirError, match="refusing to load this checkpoint: it holds pickled objects"):
        Runner(config, run_dir, resume=True, show_progress=False).run()
    assert "this ran while loading" not in capfd.readouterr().out
    result = subprocess.run(
        [sys.executable, "-m", "gossiplab", "run", "--resume", str(run_dir)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "pickled objects" in result.stderr and "Traceback" not in result.stderr
    assert "this ran while loading" not in result.stdout


def test_feature_caches_and_dataset_pickles_never_run_code(tmp_path, capfd):
    cache = tmp_path / "features.pt"
    torch.save({"features": torch.zeros(2, 3), "zero_shot": Payload()}, cache)
    with pytest.raises(UnsafeFileError):
        load_tensors(cache, "feature cache")
    arrays = tmp_path / "arrays.gz"
    with gzip.open(arrays, "wb") as handle:
        pickle.dump(np.arange(6, dtype=np.uint8).reshape(2, 3), handle)
    with gzip.open(arrays, "rb") as handle:
        assert load_numpy_pickle(handle, arrays).tolist() == [[0, 1, 2], [3, 4, 5]]
    with gzip.open(arrays, "wb") as handle:
        pickle.dump([np.zeros(2), Payload()], handle)
    with gzip.open(arrays, "rb") as handle, pytest.raises(UnsafeFileError, match=r"builtins\.print"):
        load_numpy_pickle(handle, arrays)
    assert "this ran while loading" not in capfd.readouterr().out


PLUGIN = """
import numpy as np

from gossiplab.data.sources import SourceInfo, dataset_from_arrays, register_source, split_stratified


def load():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 200)
    x = (rng.random((800, 1, 8, 8)) * 60 + y[:, None, None, None] * 60).astype(np.uint8)
    return dataset_from_arrays("bars", *split_stratified(x, y), ("a", "b", "c", "d"))


register_source(SourceInfo("bars", load, "pip install my-bars", "four brightness levels", "CC0"))
"""


def gossiplab_cli(*args: str, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(pythonpath)) if pythonpath else None
    return subprocess.run([sys.executable, "-m", "gossiplab", *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.mark.long
def test_a_plugin_is_announced_imported_and_rerun_from_config_toml(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "my_bars.py").write_text(PLUGIN)
    overrides = ["plugins=['my_bars']", "data.sources=['bars']", "num_sites=4", "train.steps=40", "eval.every=20"]
    first = gossiplab_cli("run", "--quiet", "--run-dir", "one", *overrides, cwd=tmp_path, pythonpath=plugins)
    assert first.returncode == 0, first.stderr
    assert f"importing plug-in my_bars from {plugins / 'my_bars.py'}" in first.stderr
    again = gossiplab_cli("run", "--quiet", "--config", "one/config.toml", "--run-dir", "two", cwd=tmp_path,
                          pythonpath=plugins)  # fmt: skip
    assert again.returncode == 0, again.stderr
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert one["ala"] == two["ala"] and one["accuracy_matrix"] == two["accuracy_matrix"]


@pytest.mark.long
@pytest.mark.parametrize("name", ["one/evil.py", "../evil", "evil-module", "os;import evil"])
def test_a_plugin_must_be_a_module_name(name, tmp_path):
    result = gossiplab_cli("run", "--dry-run", f"plugins=['{name}']", cwd=tmp_path)
    assert result.returncode == 2 and "field 'plugins'" in result.stderr and "not a module name" in result.stderr


def test_code_shipped_beside_a_config_is_never_run(tmp_path):
    """A run directory from elsewhere holds config.toml naming a plug-in, and the plug-in beside it."""
    run_dir = tmp_path / "downloaded"
    run_dir.mkdir()
    (run_dir / "evil.py").write_text("print('this ran while loading')\n")
    config = build_config("default", ["train.steps=20"])
    (run_dir / "config.toml").write_text(config.to_toml().replace("plugins = []", "plugins = ['evil']"))
    result = gossiplab_cli("run", "--dry-run", "--config", "config.toml", cwd=run_dir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "inside the folder of the config" in result.stderr and "this ran while loading" not in result.stdout
