"""One run in one run directory: the loop (gossiplab.loop) with its run-directory side.

A run directory holds config.toml (re-runnable, naming the parts that ran), metrics.jsonl, the
accuracy matrix of every evaluation, summary.json, checkpoint.pt and the plots. Checkpoints and
summaries are written atomically; a resumed run continues from the last checkpoint with the same
batches, graphs and updates, so it ends at the uninterrupted result.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from gossiplab import loop, merge, metrics
from gossiplab.algorithms import Sent, restore, saved
from gossiplab.algorithms.base import BYTES_PER_NUMBER
from gossiplab.assembly import Experiment, build_experiment, check_experiment, part_names, record_parts
from gossiplab.callbacks import Callback, Checkpoints, Hooks, MetricsLog, ProgressBar, TensorBoardLog
from gossiplab.catalogue import build_config
from gossiplab.communicator import Communicator, PeerLost, SingleProcess
from gossiplab.config import Config, differing_fields, flatten, upgrade_keys
from gossiplab.data.partition import listed_sites
from gossiplab.devices import PinnedCompute, platform_record, resolve_device, resolved_threads, with_pinned_threads
from gossiplab.evaluation import evaluate, per_row
from gossiplab.launch import launched_distributed
from gossiplab.network import Delivery
from gossiplab.rundir import (
    RunDirError,
    RunDirLock,
    atomic_save,
    atomic_write,
    prepare_run_dir,
    read_checkpoints,
    read_metrics,
    write_checkpoint,
)


class RunInterrupted(RuntimeError):
    """The run stopped on request after saving a checkpoint; `gossiplab run --resume` continues it."""


class DivergenceError(RuntimeError):
    """A site's loss became NaN or Inf; the run stopped and recorded it in summary.json."""


def resume_command(run_dir: Path, processes: int) -> str:
    """The command that continues a run: the same launch as before, with --resume."""
    if processes == 1:
        return f"gossiplab run --resume {run_dir}"
    return f"torchrun --nproc-per-node {processes} -m gossiplab run --resume {run_dir} (across machines: on each)"


def load_run_config(run_dir: Path, finished_ok: bool = False, rank: int = 0) -> Config:
    """The config.toml of a run directory; unless `finished_ok`, the run must be resumable.
    Process `rank` > 0 of a distributed run reads its own copy (rank 0 checks the directory)."""
    if rank > 0:
        path = run_dir / f"rank{rank}" / "config.toml"
        if not path.is_file():
            raise RunDirError(f"--resume {run_dir}: no {path} (the copy of the config this process keeps)")
        return build_config(path=path)
    if not finished_ok:
        prepare_run_dir(run_dir, resume=True)
        processes = len(list(run_dir.glob("rank[0-9]*")))
        if processes > 1 and not launched_distributed():
            raise RunDirError(
                f"{run_dir} is a run of {processes} processes: resume it with the same launch, e.g. "
                f"{resume_command(run_dir, processes)} (one process alone would start it over)"
            )
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
        experiment: Experiment | None = None,
        comm: Communicator | None = None,
    ):
        # where the sites live: all here (simulation), or a block per process (gossiplab.distributed)
        self.comm = comm or SingleProcess(config.num_sites)
        self._lock = RunDirLock(run_dir)  # held by the process that writes the run directory
        refusal = None
        if self.comm.writes:
            try:
                if resume and not run_dir.is_dir():
                    raise RunDirError(f"--resume {run_dir}: no such run directory")
                self._lock.check_free()  # refuse before creating anything in the directory
                prepare_run_dir(run_dir, resume)
                run_dir.mkdir(parents=True, exist_ok=True)
                self._lock.acquire()
                prepare_run_dir(run_dir, resume)  # again, holding the lock: what another run did meanwhile
            except RunDirError as error:
                refusal = str(error)
        refusal = self.comm.share("run-dir-check", refusal or "")  # every process refuses together
        if refusal:
            self._lock.release()
            raise RunDirError(refusal)
        # the matrix kernels reduce in a thread-count dependent order: the run pins its count (given
        # back when it ends) and records it in config.toml, so a re-run or a resume computes the same bits
        self.threads = resolved_threads(config.train.threads)
        self._compute = PinnedCompute(self.threads, resolve_device(config.train.device))
        self.config = config
        self.run_dir = run_dir
        self.resume = resume
        self.console = console or Console(stderr=True)
        self.show_progress = show_progress
        self._stop_requested = False
        try:
            self.experiment = experiment or build_experiment(config, self.console, self.comm.sites)
            self.config = config = copy.deepcopy(self.experiment.config)
            config.train.threads = self.threads
            unresolvable = record_parts(self.experiment, config)  # config.toml names the parts that run
            self.parts = {**part_names(self.experiment), "model.name": config.model.name}
            self.experiment.state = self.experiment.algorithm.init()
            check_experiment(self.experiment, self.comm.sites)
        except BaseException:
            self._lock.release()
            self._compute.restore()
            raise
        for name in unresolvable:
            self.console.print(
                f"[yellow]warning:[/] {escape(name)} is not importable by name: config.toml cannot re-run it "
                "(register it in a module and name that module in `plugins`)"
            )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.gossip_messages = 0  # messages sent by gossip rounds
        self.gossip_bytes = 0  # and their bytes, as each round's algorithm reported them
        self.merge_messages = 0  # parameter vectors sent by the final global merge
        self.messages_lost = 0  # gossip messages sent and lost in transit ([network] message_loss)
        self.wall_time = 0.0
        self.loss_sum, self.loss_count = 0.0, 0  # mean training loss since the last evaluation
        self.site_loss_sum = torch.zeros(config.num_sites, dtype=torch.float64)  # and per site
        self.active = torch.ones(config.num_sites, dtype=torch.bool)  # sites not dropped for divergence
        population = self.experiment.population
        local = config.gossip.normalization == "local"
        self.local_columns = population.normalization_columns() if local else torch.empty(0, dtype=torch.long)
        self.last_finite_loss = torch.full((config.num_sites,), float("nan"))
        self._last_matrix: torch.Tensor | None = None
        self._first_round: tuple[torch.Tensor, torch.Tensor] | None = None  # the graph and W drawn in mixing.png
        self._started = 0.0

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and raise RunInterrupted (Ctrl-C does this)."""
        self._stop_requested = True

    @property
    def metrics_path(self) -> Path:
        """RUN/metrics.jsonl."""
        return self.run_dir / "metrics.jsonl"

    def save_checkpoint(self) -> None:
        """This process's checkpoint, verified by its digest on resume. The previous one is kept:
        the fallback for a damaged newest one, and across processes the common step when a process
        was killed between two processes' writes, leaving them one checkpoint apart."""
        state = {
            "step": self.step,
            "gossip_messages": self.gossip_messages,
            "gossip_bytes": self.gossip_bytes,
            "merge_messages": self.merge_messages,
            "messages_lost": self.messages_lost,
            "network": self.experiment.network.state_dict(),
            "wall_time": self.wall_time,
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            "site_loss_sum": self.site_loss_sum,
            "active": self.active,
            "last_finite_loss": self.last_finite_loss,
            "theta": self.experiment.population.theta,
            "random_streams": self.experiment.population.random_streams,
            "optimizer": self.experiment.optimizer.state_dict(),
            "algorithm": saved(self.experiment.state),
            "generator": self.generator.get_state(),
            "config": self.config.to_dict(),
        }
        write_checkpoint(state, self.comm.rank_file(self.run_dir, "checkpoint.pt"))

    def _read_checkpoints(self) -> list[dict[str, Any]]:
        """This process's intact checkpoints, newest first (a damaged one is skipped, with a warning)."""

        def warn(message: str) -> None:
            self.console.print(f"[yellow]warning:[/] {escape(message)}")

        return read_checkpoints(self.comm.rank_file(self.run_dir, "checkpoint.pt"), warn)

    def _load_checkpoint(self) -> None:
        """Continue from the last complete checkpoint (across processes: the newest one all of
        them hold); without one (killed before the first was written) start over, dropping the
        rows logged so far."""
        states = self._read_checkpoints()
        steps = [state["step"] for state in states] + [-1] * (2 - len(states))
        agreed = self.comm.agree_on_step(steps[:2])
        if agreed < 0:
            if self.comm.writes:
                atomic_write(self.metrics_path, b"")
            return
        state = next(state for state in states if state["step"] == agreed)
        if "random_streams" not in state:  # written before sites kept buffers and random streams (2026-12)
            raise RunDirError(f"{self.run_dir}/checkpoint.pt was written by an earlier gossiplab; start the run anew")
        written = with_pinned_threads(upgrade_keys(flatten(state["config"])))
        current = flatten(self.config.to_dict())
        differing = differing_fields(written, current)
        if differing:
            details = ", ".join(f"{k}: {written.get(k)!r} vs {current.get(k)!r}" for k in differing)
            raise RunDirError(
                f"{self.run_dir}/checkpoint.pt was written by another config (checkpoint vs now: {details})"
            )
        self.step = state["step"]
        self.loss_sum, self.loss_count = state["loss_sum"], state["loss_count"]
        self.site_loss_sum.copy_(state["site_loss_sum"])
        self.active.copy_(state["active"])
        self.last_finite_loss.copy_(state["last_finite_loss"])
        self.gossip_messages = state["gossip_messages"]
        # a checkpoint from before the algorithms reported their bytes: one parameter vector per message
        self.gossip_bytes = state.get("gossip_bytes", self.gossip_messages * self.vector_bytes)
        self.merge_messages = state["merge_messages"]
        self.messages_lost = state.get("messages_lost", 0)
        if "network" in state:  # written before gossiplab simulated networks (2026-12-06): all online, no clock
            self.experiment.network.load_state_dict(state["network"])
        self.wall_time = state["wall_time"]
        self.experiment.population.theta.copy_(state["theta"])
        self.experiment.population.random_streams.copy_(state["random_streams"])
        self.experiment.optimizer.load_state_dict(state["optimizer"])
        restore(self.experiment.state, state["algorithm"])
        self.generator.set_state(state["generator"])
        if self.comm.writes:
            kept = [line for line in read_metrics(self.metrics_path) if line["step"] <= self.step]
            self._check_rows_kept([row["step"] for row in kept])
            atomic_write(self.metrics_path, "".join(json.dumps(row) + "\n" for row in kept).encode())

    def _check_rows_kept(self, logged: list[int]) -> None:
        """Rows are written before the checkpoint of their step, so a resumable run holds the row of
        every evaluation up to the checkpoint. A metrics.jsonl deleted or cut short is refused: the
        rows cannot be rebuilt from a checkpoint, and a run finished without them would show a
        table as if it were complete."""
        every, last = self.config.eval.every, self.config.train.steps
        expected = [t for t in range(self.step + 1) if t % every == 0 or t == last]
        missing = sorted(set(expected) - set(logged))
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise RunDirError(
                f"--resume {self.run_dir}: metrics.jsonl lacks the rows of steps {shown} (deleted or cut short); "
                "they cannot be rebuilt from the checkpoint, so the run is not resumed: restore the file, or run "
                "the config again into a new folder"
            )

    # the loop's side (gossiplab.loop calls these)

    def step_zero_unlogged(self) -> bool:
        """Step 0 is evaluated once: a run resumed from its step-0 checkpoint already logged it."""
        unlogged = self.comm.writes and not read_metrics(self.metrics_path)
        return self.comm.share("step-0-unlogged", "yes" if unlogged else "") == "yes"

    def record_losses(self, losses: torch.Tensor) -> None:
        """Every site's loss of this step [N]: divergence check, and the means since the last evaluation."""
        finite = torch.isfinite(losses)
        if (self.active & ~finite).any():
            self._handle_divergence(self.active & ~finite, "non-finite loss")
        self.last_finite_loss = torch.where(finite, losses, self.last_finite_loss)
        self.loss_sum += float(losses[self.active].mean())
        self.site_loss_sum += torch.where(self.active & finite, losses, 0.0)
        self.loss_count += 1

    def mean_loss(self) -> float:
        """The mean training loss of the active sites since the last evaluation."""
        return self.loss_sum / self.loss_count

    def zero_dropped(self, rows: torch.Tensor) -> None:
        """Zero this process's rows of sites dropped for divergence (their gradients, parameters)."""
        mine = self.active[self.comm.sites]
        if not mine.all():
            rows[~mine] = 0.0

    def count_round(self, adjacency: torch.Tensor, delivery: Delivery, sent: Sent | None) -> None:
        """Add what a gossip round sent, as its algorithm reported it for the messages delivered
        (None: one parameter vector per off-diagonal non-zero of W), and the messages lost in
        transit, each as large as the round's delivered ones (a parameter vector when none
        arrived); advance the clock by the round's time; keep the first round's graph."""
        if sent is None:
            sent = Sent.vectors(delivery.weights, self.experiment.population.theta.shape[1])
        message_bytes = sent.bytes / sent.messages if sent.messages else self.vector_bytes
        self.gossip_messages += sent.messages + delivery.lost
        self.gossip_bytes += sent.bytes + round(delivery.lost * message_bytes)
        self.messages_lost += delivery.lost + sent.lost
        if sent.messages + delivery.lost and self.experiment.algorithm.tick(self.experiment.state) is None:
            self.experiment.network.charge_round(message_bytes, delivery)  # (asynchronous: inside its iterations)
        if self._first_round is None:
            self._first_round = (adjacency, delivery.weights)

    def merge_globally(self) -> None:
        """The single global merge, with the metrics just before it kept in premerge.json."""
        theta = self.experiment.population.theta
        atomic_save(theta, self.comm.rank_file(self.run_dir, "premerge.pt"))
        before = evaluate(self.experiment, self.active, self.comm)[0]
        if self.comm.writes:
            before = {k: v for k, v in before.items() if k != "local_accuracy"}
            atomic_write(self.run_dir / "premerge.json", json.dumps(before).encode())
        self.merge_messages += merge.final_merge(theta, self.config, self.active, self.comm)
        network, sites = self.experiment.network, int(self.active.sum())
        if self.config.gossip.final_merge == "exact":
            network.charge_all_reduce(sites, self.vector_bytes)
        else:
            for _ in range(merge.final_merge_rounds(self.config)):
                network.charge_round(self.vector_bytes)

    def evaluate(self, train_loss: float | None) -> tuple[dict[str, Any], torch.Tensor]:
        """The metrics row of this step (with the mean training loss since the last evaluation,
        overall and per site) and the accuracy matrix."""
        self.wall_time = time.perf_counter() - self._started
        finite = self.comm.gather(per_row(self.experiment.population.theta, lambda b: torch.isfinite(b).all(1)).cpu())
        if (self.active & ~finite).any():
            self._handle_divergence(self.active & ~finite, "non-finite parameters")
        row, matrix = evaluate(self.experiment, self.active, self.comm)
        site_loss = (self.site_loss_sum / self.loss_count).tolist() if train_loss is not None else None
        row = {
            "step": self.step,
            "gossip_rounds": self.experiment.schedule.rounds_until(self.step),
            "bytes_sent": self.bytes_sent,
            "simulated_time_s": self.experiment.network.time,
            "online_sites": int((self.experiment.network.online & self.active).sum()),
            "train_loss": train_loss,
            **row,
            "site_train_loss": site_loss,
        }
        self.loss_sum, self.loss_count = 0.0, 0
        self.site_loss_sum.zero_()
        self._last_matrix = matrix
        return row, matrix

    def stop_if_requested(self, checkpointed: bool) -> None:
        """After a step: on request (Ctrl-C), save a checkpoint unless this step wrote one, and stop."""
        if not self._stop_requested:
            return
        if not checkpointed:  # a second checkpoint of one step would push out the older fallback
            self.wall_time = time.perf_counter() - self._started
            self.save_checkpoint()
        raise RunInterrupted(
            f"stopped at step {self.step}/{self.config.train.steps}; continue with: "
            f"{resume_command(self.run_dir, self.comm.world_size)}"
        )

    @property
    def vector_bytes(self) -> int:
        """One row of theta on the wire: a site's parameters and, with BatchNorm, its running statistics."""
        return self.experiment.population.theta.shape[1] * BYTES_PER_NUMBER

    @property
    def bytes_sent(self) -> int:
        """Bytes sent by all sites so far: what the gossip rounds reported, and the final merge's rows."""
        return self.gossip_bytes + self.merge_messages * self.vector_bytes

    def callbacks(
        self,
        on_step: Callable | None = None,
        on_evaluation: Callable | None = None,
        extra: list[Callback] | None = None,
    ) -> list[Callback]:
        """The run's callbacks in the order they act at an evaluation: metrics, TensorBoard,
        checkpoint, progress bar, then the user's."""
        chosen: list[Callback] = [MetricsLog()]
        if self.config.eval.tensorboard and self.comm.writes:
            chosen.append(TensorBoardLog())
        chosen += [
            Checkpoints(),
            ProgressBar(self.console, self.config.name, self.show_progress and self.comm.writes),
            Hooks(on_step, on_evaluation),
            *(extra or []),
        ]
        return chosen

    def run(
        self,
        on_evaluation: Callable[[Runner, dict[str, Any]], None] | None = None,
        *,
        on_step: Callable[[Runner], None] | None = None,
        callbacks: list[Callback] | None = None,
    ) -> dict[str, Any]:
        """Train to `train.steps`, then write summary.json; return the summary. `on_step(runner)` /
        `on_evaluation(runner, row)` and `callbacks` are the user's (and the plots: `report.Plots()`)."""
        try:
            return self._run(on_evaluation, on_step, callbacks)
        finally:
            self._compute.restore()

    def _run(
        self,
        on_evaluation: Callable[[Runner, dict[str, Any]], None] | None,
        on_step: Callable[[Runner], None] | None,
        callbacks: list[Callback] | None,
    ) -> dict[str, Any]:
        config = self.config
        if self.resume:
            self._load_checkpoint()
        elif self.comm.writes:
            atomic_write(self.run_dir / "config.toml", config.to_toml().encode())
        if self.comm.world_size > 1:  # each process's copy, for resuming where rank 0's files are not
            atomic_write(self.comm.rank_file(self.run_dir, "config.toml"), config.to_toml().encode())
        chosen = self.callbacks(on_step, on_evaluation, callbacks)
        started: list[Callback] = []
        try:
            for callback in chosen:
                callback.on_start(self)
                started.append(callback)
            while True:
                self._started = time.perf_counter() - self.wall_time
                try:
                    loop.train(self, chosen)
                    break
                except self.comm.failures as error:
                    self._continue_without_lost(self.comm.recover(error))
            self.wall_time = time.perf_counter() - self._started
        finally:
            for callback in started:
                callback.on_end(self)
            self._lock.release()
        return self._finish(chosen)

    def _continue_without_lost(self, lost: PeerLost) -> None:
        """A process of the run died: roll every survivor back to the last checkpoint they all hold,
        cut the lost sites out of W (rows renormalised) and the metrics, and go on."""
        self._load_checkpoint()
        self.active[lost.lost_sites] = False
        self.console.print(
            f"[yellow]warning:[/] {escape(str(lost))}; dropped those sites from the mixing matrix and continue from "
            f"step {self.step} with {int(self.active.sum())} sites"
        )

    def _handle_divergence(self, bad: torch.Tensor, what: str) -> None:
        """Stop the run (train.on_divergence = 'stop'), or drop the sites from gossip, merging and
        the metrics and go on ('drop'), as long as one site is left."""
        sites = torch.nonzero(bad).flatten().tolist()
        last = {i: round(float(self.last_finite_loss[i]), 6) for i in sites}
        shown = dict(list(last.items())[:8])
        message = f"{what} at step {self.step} on {listed_sites(sites)} (last finite loss per site: {shown})"
        if self.config.train.on_divergence == "drop" and bool((self.active & ~bad).any()):
            self.active &= ~bad
            mine = bad[self.comm.sites]
            self.experiment.population.theta[mine] = 0.0
            self.experiment.optimizer.reset_rows(mine)
            self.console.print(f"[yellow]warning:[/] {message}; dropped them, {int(self.active.sum())} sites remain")
            return
        summary = {"status": "diverged", "message": message, "step": self.step, "sites": sites}
        if self.comm.writes:
            atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        clip = self.config.train.clip_grad_norm
        clipping = (
            f"a smaller train.clip_grad_norm (now {clip:g})" if clip else "clip gradients (train.clip_grad_norm=1.0)"
        )
        raise DivergenceError(
            f"training diverged: {message}; try a lower train.lr (now {self.config.train.lr:g}) or {clipping}, "
            "or let the run drop such sites (train.on_divergence=drop)"
        )

    def _read_premerge(self) -> dict[str, Any] | None:
        path = self.run_dir / "premerge.json"
        return json.loads(path.read_text()) if self.experiment.schedule.final_merge and path.is_file() else None

    def _communication_cost(self) -> dict[str, Any]:
        """The single-merge paper's cost O(m R P T + 2 m P): its terms as measured in this run.

        m sites, P parameters, T gossip rounds, R parameter vectors sent per site per round on
        average (peers), and the final merge's vectors (2 (m - 1) for an exact ring all-reduce).
        """
        m, p = self.config.num_sites, self.experiment.population.theta.shape[1]  # parameters and buffers
        rounds = self.experiment.schedule.rounds_until(self.config.train.steps)
        return {
            "sites_m": m,
            "parameters_P": p,
            "gossip_rounds_T": rounds,
            "peers_per_round_R": self.gossip_messages / (m * rounds) if rounds else 0.0,
            "gossip_bytes": self.gossip_bytes,
            "messages_lost": self.messages_lost,
            "final_merge_bytes": self.merge_messages * self.vector_bytes,
            "total_bytes": self.bytes_sent,
        }

    def drawn_graph(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph and W of the first gossip round this process ran (else, as the parts give them
        for round 0): what topology.png and mixing.png show."""
        if self._first_round is not None:
            return self._first_round
        adjacency = self.experiment.topology(0)
        return adjacency, self.experiment.algorithm.mixing(0, adjacency, self.experiment.state)

    def _finish(self, callbacks: list[Callback]) -> dict[str, Any]:
        matrix = self._last_matrix
        if matrix is None:
            matrix = evaluate(self.experiment, self.active, self.comm)[1]
        processes = self.comm.world_size
        network = int(self.comm.sum(torch.tensor([self.comm.bytes_sent], dtype=torch.float64)))
        self.comm.close()
        if not self.comm.writes:
            return {"status": "finished", "rank": self.comm.rank, "run_dir": str(self.run_dir)}
        rows = read_metrics(self.metrics_path)
        final = rows[-1]
        steps = [r["step"] for r in rows]
        summary = {
            "status": "finished",
            "name": self.config.name,
            "run_dir": str(self.run_dir),
            "wall_time_s": round(self.wall_time, 3),
            "strategy": self.experiment.population.strategy,
            "num_parameters": self.experiment.population.num_parameters,
            "parts": self.parts,
            "platform": platform_record(self.threads, self.experiment.population.theta.device),
            **{k: v for k, v in final.items() if k not in ("local_accuracy", "site_train_loss")},
            "convergence_step": {
                m: metrics.convergence_step(steps, [r[m] for r in rows]) for m in ("ala", "aga", "mmga")
            },
            "start": {m: rows[0][m] for m in ("ala", "aga", "mmga")} if steps[0] == 0 else None,
            "local_accuracy": final["local_accuracy"],
            "accuracy_matrix": matrix.tolist(),
            "accuracy_matrix_sites": metrics.matrix_sites(self.config.num_sites).tolist()
            if self.config.num_sites > metrics.MATRIX_SITES
            else None,
            "communication_steps": self.experiment.schedule.communication_steps(),
            "communication": self._communication_cost(),
            "dropped_sites": torch.nonzero(~self.active).flatten().tolist(),
            "before_final_merge": self._read_premerge(),
        }
        if processes > 1:  # parameter bytes the processes actually sent each other since they started
            summary["distributed"] = {"processes": processes, "payload_bytes_sent": network}
        summary.update(self.experiment.algorithm.summary(self.experiment.state, self.run_dir))
        for callback in callbacks:
            callback.on_finish(self, summary)
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        return summary
