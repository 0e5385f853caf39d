"""`gossiplab bench --distributed`: one gossip round with the sites in 1, 2 and 4 processes.

The same N sites (the default experiment's MLP on Fashion-MNIST) are split over K gloo processes on
127.0.0.1 (K = 1 is the single-process simulation). A round is what a run does per step with
gossip every step: every process's local step on its block (sample, forward, backward, update) and
one exchange + mix. Each process uses cores / K threads so every K has the whole machine.
Each K > 1 runs twice: without a join secret, and with one (every payload then carries an HMAC-SHA256
tag, computed by the sender and checked by the receiver: the MAC's cost per round, side by side).
Reported per K and topology: milliseconds per round (wall time on rank 0; and the local step and
the exchange + mix, each the mean over processes), and the bytes of one round three ways: the
analytic count (`payload_rows`: each row a peer reads, once per peer), the payload the processes
handed to gloo, and what crossed the loopback interface (/proc/net/dev: gloo and store traffic
with TCP/IP headers).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from gossiplab.assembly import build_experiment
from gossiplab.catalogue import build_config
from gossiplab.communicator import SingleProcess
from gossiplab.distributed import DEFAULT_SECRET_ENV, ProcessGroup, payload_rows
from gossiplab.merge import GossipAverager
from gossiplab.mixing import mixing_matrix
from gossiplab.topology import build_adjacency

SPEC = "GOSSIPLAB_BENCH_DISTRIBUTED"  # the worker's job, as JSON in the environment


def loopback_bytes() -> int | None:
    """Bytes sent on the loopback interface so far (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[8])
    except OSError:
        pass
    return None


def worker() -> None:
    """One process of the benchmark: time `rounds` rounds after warm-up; rank 0 prints the result."""
    spec = json.loads(os.environ[SPEC])
    torch.set_num_threads(spec["threads"])
    config = build_config(
        "default",
        [
            f"num_sites={spec['sites']}",
            f"gossip.topology={spec['topology']}",
            "gossip.mixing=uniform",
            "data.train_per_source=8000",
            "data.test_per_source=1000",
        ],
    )
    comm = ProcessGroup(config) if spec["processes"] > 1 else SingleProcess(config.num_sites)
    experiment = build_experiment(config, None, comm.sites)
    federation, population, optimizer = experiment.federation, experiment.population, experiment.optimizer
    averager = GossipAverager(population.theta.shape)
    generator = torch.Generator().manual_seed(0)
    weights = [mixing_matrix(build_adjacency(spec["topology"], config.num_sites, r, seed=0), "uniform") for r in
               range(spec["warmup"] + spec["rounds"])]  # fmt: skip
    step_s, exchange_s = 0.0, 0.0
    for index, matrix in enumerate(weights):
        if index == spec["warmup"]:
            comm.sum(torch.zeros(1))  # every process is done with the warm-up rounds' exchanges
            wire = loopback_bytes()
            comm.sum(torch.zeros(1))  # everyone starts the timed rounds together, after this reading
            started, handed = time.perf_counter(), comm.bytes_sent
            step_s = exchange_s = 0.0
        tick = time.perf_counter()
        x, y = federation.sample_batch(config.train.batch_size, generator, comm.sites)
        population.compute_gradients(x, y)
        optimizer.step(population.parameters, population.grad)
        tock = time.perf_counter()
        comm.mix(population.theta, matrix, averager)
        step_s += tock - tick
        exchange_s += time.perf_counter() - tock
    comm.sum(torch.zeros(1))
    rounds = spec["rounds"]
    elapsed = time.perf_counter() - started
    wire_end = loopback_bytes()
    per_process = comm.sum(torch.tensor([step_s, exchange_s], dtype=torch.float64) / rounds)
    handed_total = float(comm.sum(torch.tensor([float(comm.bytes_sent - handed)], dtype=torch.float64)))
    comm.close()
    if comm.rank != 0:
        return
    members = list(range(spec["processes"]))
    blocks = getattr(comm, "blocks", [(0, config.num_sites)])
    analytic = sum(sum(payload_rows(w, blocks, members)) for w in weights[spec["warmup"] :])
    bytes_per_row = population.theta.shape[1] * 4
    result = {
        "processes": spec["processes"],
        "authenticated": spec["secret"],
        "topology": spec["topology"],
        "sites": config.num_sites,
        "threads_per_process": spec["threads"],
        "round_ms": 1000 * elapsed / rounds,
        "local_step_ms": 1000 * float(per_process[0]) / spec["processes"],  # mean over processes
        "exchange_ms": 1000 * float(per_process[1]) / spec["processes"],
        "analytic_bytes_per_round": analytic * bytes_per_row / rounds,
        "payload_bytes_per_round": handed_total / rounds,
        "loopback_bytes_per_round": None if wire is None or wire_end is None else (wire_end - wire) / rounds,
    }
    print(json.dumps(result), flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(processes: int, topology: str, sites: int, rounds: int, secret: bool = False, timeout_s: float = 600) -> dict:
    """Launch `processes` workers (torchrun's variables) and return rank 0's measurements; with
    `secret`, the workers share a join secret (authenticated payloads)."""
    cores = os.cpu_count() or 1
    spec = {"processes": processes, "topology": topology, "sites": sites, "rounds": rounds, "warmup": 3,
            "threads": max(1, cores // processes), "secret": secret}  # fmt: skip
    port = str(free_port())
    workers = []
    for rank in range(processes):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **{SPEC: json.dumps(spec)})
        env.pop(DEFAULT_SECRET_ENV, None)
        if secret:
            env[DEFAULT_SECRET_ENV] = "bench-" + port
        command = [sys.executable, "-c", "from gossiplab.bench_distributed import worker; worker()"]
        workers.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for process in workers:
            outputs.append(process.communicate(timeout=timeout_s))
    finally:
        for process in workers:
            process.kill()
    if any(p.returncode for p in workers):
        raise RuntimeError("a benchmark process failed:\n" + "\n".join(err[-2000:] for _, err in outputs))
    return json.loads(outputs[0][0].strip().splitlines()[-1])
