"""The training loop of DESIGN section 1 (MAZEL Algorithm 1), with logging, checkpoints and resume.

    for t = 1..T:
        every site takes one local optimizer step on its own batch      (one engine call)
        if the schedule fires: theta <- W_r theta                          (one row operation)
        if t = T and gossip.final_merge is set: the global merge (exact mean, or k gossip rounds)
        every eval.every steps and at T: evaluate, append metrics.jsonl, checkpoint

A run directory holds config.toml (re-runnable), metrics.jsonl, summary.json, checkpoint.pt and
the plots. Checkpoints and summaries are written atomically; a resumed run continues from the last
checkpoint with the same batches, graphs and updates, so it ends at the uninterrupted result.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gossiplab import merge, metrics
from gossiplab.config import Config, build_config
from gossiplab.data.federation import Federation, build_federation
from gossiplab.mixing import mixing_matrix
from gossiplab.models import build_model
from gossiplab.optim import build_optimizer
from gossiplab.population import Population
from gossiplab.schedule import GossipSchedule
from gossiplab.topology import build_adjacency

BYTES_PER_PARAMETER = 4


class RunDirError(ValueError):
    """The run directory cannot be used as asked; nothing in it was changed."""


class RunInterrupted(RuntimeError):
    """The run stopped on request after saving a checkpoint; `gossiplab run --resume` continues it."""


class DivergenceError(RuntimeError):
    """A site's loss became NaN or Inf; the run stopped and recorded it in summary.json."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync, then rename: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_save(obj: object, path: Path) -> None:
    """torch.save through a temporary file, fsync and rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def message_count(weights: torch.Tensor) -> int:
    """Parameter vectors sent in one gossip round: one per off-diagonal non-zero W_ij (j sends to i)."""
    return int((weights != 0).sum() - (weights.diagonal() != 0).sum())


@dataclass
class Experiment:
    """Everything one run is made of, built from a config."""

    config: Config
    federation: Federation
    population: Population
    optimizer: Any
    averager: merge.GossipAverager
    schedule: GossipSchedule


def build_experiment(config: Config) -> Experiment:
    federation = build_federation(config)
    module = build_model(config.model, federation.image_shape, federation.num_classes)
    population = Population(
        module, config.num_sites, seed=config.seed, init=config.model.init, strategy=config.train.engine
    )
    return Experiment(
        config=config,
        federation=federation,
        population=population,
        optimizer=build_optimizer(config.train, population.theta.shape),
        averager=merge.GossipAverager(population.theta.shape),
        schedule=GossipSchedule.from_config(config.gossip, config.train.steps),
    )


def evaluate(experiment: Experiment) -> tuple[dict[str, Any], torch.Tensor]:
    """Every model and the counterfactual merged model on the global test set, scored per site."""
    federation, population = experiment.federation, experiment.population
    theta = population.theta
    correct = population.predict(theta, federation.test_x) == federation.test_y
    merged_correct = population.predict(merge.merged_model(theta), federation.test_x) == federation.test_y
    return metrics.evaluation_row(correct, merged_correct, federation.test_site, theta)


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse a directory that holds a finished run, or an unfinished one unless resuming."""
    if resume:
        for name in ("config.toml", "checkpoint.pt"):
            if not (run_dir / name).is_file():
                raise RunDirError(f"--resume {run_dir}: no {name} there, so there is nothing to resume")
    if (run_dir / "summary.json").is_file():
        raise RunDirError(f"run directory {run_dir} already holds a finished run; choose another --run-dir")
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(
            f"run directory {run_dir} already holds an unfinished run; continue it with "
            f"'gossiplab run --resume {run_dir}' or choose another --run-dir"
        )


def load_run_config(run_dir: Path, finished_ok: bool = False) -> Config:
    """The config.toml of a run directory; unless `finished_ok`, the run must be resumable."""
    if not finished_ok:
        prepare_run_dir(run_dir, resume=True)
    elif not (run_dir / "config.toml").is_file():
        raise RunDirError(f"{run_dir} holds no config.toml")
    return build_config(path=run_dir / "config.toml")


class Runner:
    """Runs one experiment in one run directory, from scratch or from its last checkpoint."""

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        *,
        resume: bool = False,
        console: Console | None = None,
        show_progress: bool = True,
    ):
        prepare_run_dir(run_dir, resume)
        self.config = config
        self.run_dir = run_dir
        self.resume = resume
        self.console = console or Console(stderr=True)
        self.show_progress = show_progress
        self._stop_requested = False
        self.experiment = build_experiment(config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.gossip_messages = 0  # parameter vectors sent by gossip rounds
        self.merge_messages = 0  # parameter vectors sent by the final global merge
        self.wall_time = 0.0
        self._last_matrix: torch.Tensor | None = None

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and raise RunInterrupted (Ctrl-C does this)."""
        self._stop_requested = True

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _save_checkpoint(self) -> None:
        state = {
            "step": self.step,
            "gossip_messages": self.gossip_messages,
            "merge_messages": self.merge_messages,
            "wall_time": self.wall_time,
            "theta": self.experiment.population.theta,
            "optimizer": self.experiment.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "config": self.config.to_dict(),
        }
        atomic_save(state, self.run_dir / "checkpoint.pt")

    def _load_checkpoint(self) -> None:
        state = torch.load(self.run_dir / "checkpoint.pt", weights_only=True)
        if state["config"] != self.config.to_dict():
            raise RunDirError(f"{self.run_dir}/checkpoint.pt was written by another config than config.toml")
        self.step = state["step"]
        self.gossip_messages = state["gossip_messages"]
        self.merge_messages = state["merge_messages"]
        self.wall_time = state["wall_time"]
        self.experiment.population.theta.copy_(state["theta"])
        self.experiment.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        kept = [line for line in self._read_rows() if line["step"] <= self.step]
        atomic_write(self.metrics_path, "".join(json.dumps(row) + "\n" for row in kept).encode())

    def _read_rows(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def _append_row(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _evaluate_and_log(self, train_loss: float | None) -> dict[str, Any]:
        row, matrix = evaluate(self.experiment)
        row = {
            "step": self.step,
            "gossip_rounds": self.experiment.schedule.rounds_until(self.step),
            "bytes_sent": self.bytes_sent,
            "train_loss": train_loss,
            **row,
        }
        self._append_row(row)
        self._last_matrix = matrix
        return row

    @property
    def bytes_sent(self) -> int:
        """Bytes sent by all sites so far: 4 bytes per parameter per parameter vector sent."""
        vector_bytes = self.experiment.population.num_parameters * BYTES_PER_PARAMETER
        return (self.gossip_messages + self.merge_messages) * vector_bytes

    def _communicate(self, step: int) -> None:
        experiment = self.experiment
        theta = experiment.population.theta
        if experiment.schedule.gossips_at(step):
            gossip = self.config.gossip
            round_index = experiment.schedule.rounds_until(step) - 1
            adjacency = build_adjacency(gossip.topology, self.config.num_sites, round_index, self.config.seed, gossip.p)
            weights = mixing_matrix(adjacency, gossip.mixing)
            experiment.averager(theta, weights)
            self.gossip_messages += message_count(weights)
        if experiment.schedule.merges_globally_at(step):
            atomic_save(theta, self.run_dir / "premerge.pt")
            before = {k: v for k, v in evaluate(experiment)[0].items() if k != "local_accuracy"}
            atomic_write(self.run_dir / "premerge.json", json.dumps(before).encode())
            self.merge_messages += self._final_merge(theta)

    def _final_merge(self, theta: torch.Tensor) -> int:
        """The single global merge; returns how many parameter vectors it sent.

        'exact': every row <- the mean (an all-reduce: 2 (N - 1) vectors, ring all-reduce).
        'exponential' / 'one-peer-exponential': k rounds of uniform gossip on that graph instead
        (k = gossip.final_merge_rounds, or ceil(log2 N)), the single-merge paper's appendix C.
        """
        gossip, num_sites = self.config.gossip, self.config.num_sites
        if gossip.final_merge == "exact":
            merge.global_merge(theta)
            return 2 * (num_sites - 1)
        rounds = gossip.final_merge_rounds or max(1, math.ceil(math.log2(num_sites)))
        sent = 0
        for round_index in range(rounds):
            weights = mixing_matrix(
                build_adjacency(gossip.final_merge, num_sites, round_index, self.config.seed), "uniform"
            )
            self.experiment.averager(theta, weights)
            sent += message_count(weights)
        return sent

    def run(self, on_evaluation: Callable[[Runner, dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train to `train.steps`, then write summary.json and the plots; return the summary."""
        config, experiment = self.config, self.experiment
        if self.resume:
            self._load_checkpoint()
        else:
            atomic_write(self.run_dir / "config.toml", config.to_toml().encode())
        federation, population = experiment.federation, experiment.population
        total = config.train.steps
        started = time.perf_counter() - self.wall_time
        loss_sum, loss_count = 0.0, 0
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            disable=not self.show_progress,
            transient=False,
        )
        with progress:
            task = progress.add_task(config.name, total=total, completed=self.step, status="")
            if self.step == 0:
                row = self._evaluate_and_log(None)
                progress.update(task, status=self._status(row))
            while self.step < total:
                self.step += 1
                x, y = federation.sample_batch(config.train.batch_size, self.generator)
                losses = population.compute_gradients(x, y)
                if not torch.isfinite(losses).all():
                    self._diverged(losses)
                experiment.optimizer.step(population.theta, population.grad)
                self._communicate(self.step)
                loss_sum += float(losses.mean())
                loss_count += 1
                progress.update(task, completed=self.step)
                if self.step % config.eval.every == 0 or self.step == total:
                    self.wall_time = time.perf_counter() - started
                    row = self._evaluate_and_log(loss_sum / loss_count)
                    loss_sum, loss_count = 0.0, 0
                    self._save_checkpoint()
                    progress.update(task, status=self._status(row))
                    if on_evaluation is not None:
                        on_evaluation(self, row)
                if self._stop_requested:
                    self.wall_time = time.perf_counter() - started
                    self._save_checkpoint()
                    raise RunInterrupted(
                        f"stopped at step {self.step}/{total}; continue with: gossiplab run --resume {self.run_dir}"
                    )
        self.wall_time = time.perf_counter() - started
        return self._finish()

    @staticmethod
    def _status(row: dict[str, Any]) -> str:
        return f"ALA {row['ala']:.3f}  AGA {row['aga']:.3f}  MMGA {row['mmga']:.3f}"

    def _diverged(self, losses: torch.Tensor) -> None:
        bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
        rows = self._read_rows()
        last = rows[-1]["train_loss"] if rows else None
        message = (
            f"training diverged at step {self.step}: non-finite loss on sites {bad} (last logged mean loss {last})"
        )
        summary = {"status": "diverged", "message": message, "step": self.step, "sites": bad}
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        raise DivergenceError(message)

    def _read_premerge(self) -> dict[str, Any] | None:
        path = self.run_dir / "premerge.json"
        return json.loads(path.read_text()) if self.experiment.schedule.final_merge and path.is_file() else None

    def _communication_cost(self) -> dict[str, Any]:
        """The single-merge paper's cost O(m R P T + 2 m P): its terms as measured in this run.

        m sites, P parameters, T gossip rounds, R parameter vectors sent per site per round on
        average (peers), and the final merge's vectors (2 (m - 1) for an exact ring all-reduce).
        """
        m, p = self.config.num_sites, self.experiment.population.num_parameters
        rounds = self.experiment.schedule.rounds_until(self.config.train.steps)
        return {
            "sites_m": m,
            "parameters_P": p,
            "gossip_rounds_T": rounds,
            "peers_per_round_R": self.gossip_messages / (m * rounds) if rounds else 0.0,
            "gossip_bytes": self.gossip_messages * p * BYTES_PER_PARAMETER,
            "final_merge_bytes": self.merge_messages * p * BYTES_PER_PARAMETER,
            "total_bytes": self.bytes_sent,
        }

    def _finish(self) -> dict[str, Any]:
        from gossiplab.report import plot_run

        rows = self._read_rows()
        final = rows[-1]
        steps = [r["step"] for r in rows]
        matrix = self._last_matrix if self._last_matrix is not None else evaluate(self.experiment)[1]
        summary = {
            "status": "finished",
            "name": self.config.name,
            "run_dir": str(self.run_dir),
            "wall_time_s": round(self.wall_time, 3),
            "strategy": self.experiment.population.strategy,
            "num_parameters": self.experiment.population.num_parameters,
            **{k: v for k, v in final.items() if k != "local_accuracy"},
            "convergence_step": {
                m: metrics.convergence_step(steps, [r[m] for r in rows]) for m in ("ala", "aga", "mmga")
            },
            "local_accuracy": final["local_accuracy"],
            "accuracy_matrix": matrix.tolist(),
            "communication_steps": self.experiment.schedule.communication_steps(),
            "communication": self._communication_cost(),
            "before_final_merge": self._read_premerge(),
        }
        plot_run(self.run_dir, rows, summary)
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        return summary
