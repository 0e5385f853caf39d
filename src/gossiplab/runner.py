"""One run in one run directory: the loop (gossiplab.loop) with its run-directory side.

A run directory holds config.toml (re-runnable, naming the parts that ran), metrics.jsonl, the
accuracy matrix of every evaluation, summary.json, checkpoint.pt and the plots. Checkpoints and
summaries are written atomically; a resumed run continues from the last checkpoint with the same
batches, graphs and updates, so it ends at the uninterrupted result.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from gossiplab import loop, metrics
from gossiplab.assembly import Experiment, build_experiment, check_experiment, part_names, record_parts
from gossiplab.callbacks import (
    Callback,
    Checkpoints,
    FinalMergeFiles,
    Hooks,
    LastEvaluation,
    MetricsLog,
    ProgressBar,
    TensorBoardLog,
)
from gossiplab.catalogue import build_config
from gossiplab.communicator import Communicator, PeerLost, SingleProcess
from gossiplab.config import Config, ConfigError, config_from_tables, differing_fields, flatten, upgrade_keys
from gossiplab.devices import PinnedCompute, platform_record, resolve_device, resolved_threads, with_pinned_threads
from gossiplab.evaluation import evaluate
from gossiplab.launch import launched_distributed
from gossiplab.loop import DivergenceError, StopRequested
from gossiplab.rundir import (
    RunDirError,
    RunDirLock,
    atomic_write,
    prepare_run_dir,
    read_checkpoints,
    read_metrics,
)
from gossiplab.runfolder import RunFolder
from gossiplab.state import TrainingState


class RunInterrupted(RuntimeError):
    """The run stopped on request after saving a checkpoint; `gossiplab run --resume` continues it."""


def resume_command(run_dir: Path, processes: int) -> str:
    """The command that continues a run: the same launch as before, with --resume."""
    if processes == 1:
        return f"gossiplab run --resume {run_dir}"
    return f"torchrun --nproc-per-node {processes} -m gossiplab run --resume {run_dir} (across machines: on each)"


def load_run_config(run_dir: Path, finished_ok: bool = False, rank: int = 0) -> Config:
    """The config.toml of a run directory; unless `finished_ok`, the run must be resumable.
    Process `rank` > 0 of a distributed run reads its own copy (rank 0 checks the directory)."""
    folder = RunFolder(run_dir)
    if rank > 0:
        path = folder.rank_config(rank)
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
    elif not folder.config.is_file():
        raise RunDirError(f"{run_dir} holds no config.toml")
    return build_config(path=folder.config)


class Runner:
    """Runs one experiment in one run directory, from scratch or from its last checkpoint: the
    run directory's side of the loop (its lock, files and checkpoints, resuming, recovering from a
    lost process, the summary); the loop itself is `gossiplab.loop.train` on the experiment and
    the training state (`runner.state`)."""

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
        self.folder = RunFolder(run_dir, self.comm.own_folder(run_dir))
        self.resume = resume
        self.console = console or Console(stderr=True)
        self.show_progress = show_progress
        try:
            self.experiment = experiment or build_experiment(config, self.console, self.comm.sites)
            self.config = config = copy.deepcopy(self.experiment.config)
            config.train.threads = self.threads
            unresolvable = record_parts(self.experiment, config)  # config.toml names the parts that run
            self.parts = {**part_names(self.experiment), "model.name": config.model.name}
            self.experiment.init_states()
            check_experiment(self.experiment, self.comm.sites)
        except BaseException:
            self._lock.release()
            self._compute.restore()
            raise
        schedule = self.experiment.schedule
        if schedule.kind != "none" and schedule.rounds_until(config.train.steps) == 0:
            alone = " until the final merge" if schedule.final_merge else ""
            self.console.print(
                f"[yellow]warning:[/] gossip.schedule = '{escape(config.gossip.schedule)}' gives no gossip round in "
                f"train.steps = {config.train.steps}: every site trains alone{alone} (gossip.schedule=none says so)"
            )
        for name in unresolvable:
            self.console.print(
                f"[yellow]warning:[/] {escape(name)} is not importable by name: config.toml cannot re-run it "
                "(register it in a module and name that module in `plugins`)"
            )
        self.state = TrainingState.start(config.num_sites, config.seed)
        self.checkpoints = Checkpoints(self.folder.checkpoint, config.to_dict())
        self._last_evaluation = LastEvaluation()

    @property
    def step(self) -> int:
        """The last step trained (the training state's)."""
        return self.state.step

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and raise RunInterrupted (Ctrl-C does this)."""
        self.state.stop_requested = True

    def save_checkpoint(self) -> None:
        """This process's checkpoint, verified by its digest on resume. The previous one is kept:
        the fallback for a damaged newest one, and across processes the common step when a process
        was killed between two processes' writes, leaving them one checkpoint apart."""
        self.checkpoints.save(self.experiment, self.state)

    def _read_checkpoints(self) -> list[dict[str, Any]]:
        """This process's intact checkpoints, newest first (a damaged one is skipped, with a warning)."""

        def warn(message: str) -> None:
            self.console.print(f"[yellow]warning:[/] {escape(message)}")

        return read_checkpoints(self.folder.checkpoint, warn)

    def _load_checkpoint(self) -> None:
        """Continue from the last complete checkpoint (across processes: the newest one all of
        them hold); without one (killed before the first was written) start over, dropping the
        rows logged so far."""
        states = self._read_checkpoints()
        steps = [state["step"] for state in states] + [-1] * (2 - len(states))
        agreed = self.comm.agree_on_step(steps[:2])
        if agreed < 0:
            if self.comm.writes:
                atomic_write(self.folder.metrics, b"")
            return
        state = next(state for state in states if state["step"] == agreed)
        if "random_streams" not in state:  # written before sites kept buffers and random streams (2026-12)
            raise RunDirError(f"{self.run_dir}/checkpoint.pt was written by an earlier gossiplab; start the run anew")
        try:  # a key added to gossiplab since the checkpoint was written reads as its default
            written = flatten(config_from_tables(state["config"], f"{self.folder.checkpoint}").to_dict())
        except ConfigError:  # (a key gossiplab no longer knows: compared as written, so refused below)
            written = upgrade_keys(flatten(state["config"]))
        written = with_pinned_threads(written)
        current = flatten(self.config.to_dict())
        differing = differing_fields(written, current)
        if differing:
            details = ", ".join(f"{k}: {written.get(k)!r} vs {current.get(k)!r}" for k in differing)
            raise RunDirError(
                f"{self.run_dir}/checkpoint.pt was written by another config (checkpoint vs now: {details})"
            )
        Checkpoints.restore(self.experiment, self.state, state, loop.vector_bytes(self.experiment))
        self.checkpoints.step = self.state.step
        if self.comm.writes:
            kept = [line for line in read_metrics(self.folder.metrics) if line["step"] <= self.step]
            self._check_rows_kept([row["step"] for row in kept])
            atomic_write(self.folder.metrics, "".join(json.dumps(row) + "\n" for row in kept).encode())

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

    def callbacks(
        self,
        on_step: Callable | None = None,
        on_evaluation: Callable | None = None,
        extra: list[Callback] | None = None,
    ) -> list[Callback]:
        """The run's callbacks in the order they act at an evaluation: metrics, TensorBoard,
        checkpoint, progress bar, then the user's; the files of the final merge."""
        writes = self.comm.writes
        chosen: list[Callback] = [MetricsLog(self.folder)] if writes else []
        if self.config.eval.tensorboard and writes:
            chosen.append(TensorBoardLog(self.folder))
        chosen += [
            self.checkpoints,
            self._last_evaluation,
            FinalMergeFiles(self.folder.premerge_theta, self.folder.premerge_metrics if writes else None),
            ProgressBar(self.console, self.config.name, self.show_progress and writes),
            Hooks(self, on_step, on_evaluation),
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
        config, experiment, state = self.config, self.experiment, self.state
        if self.resume:
            self._load_checkpoint()
        elif self.comm.writes:
            atomic_write(self.folder.config, config.to_toml().encode())
        if self.comm.world_size > 1:  # each process's copy, for resuming where rank 0's files are not
            atomic_write(self.folder.own_config, config.to_toml().encode())
        chosen = self.callbacks(on_step, on_evaluation, callbacks)
        started: list[Callback] = []
        try:
            for callback in chosen:
                callback.on_start(experiment, state)
                started.append(callback)
            while True:
                try:
                    loop.train(experiment, state, self.comm, chosen)
                    break
                except self.comm.failures as error:
                    self._continue_without_lost(self.comm.recover(error))
        except DivergenceError as error:
            if self.comm.writes:
                atomic_write(self.folder.summary, json.dumps(error.summary, indent=2).encode())
            raise
        except StopRequested:
            if self.checkpoints.step != state.step:  # a second checkpoint of one step would push out the fallback
                self.save_checkpoint()
            raise RunInterrupted(
                f"stopped at step {state.step}/{config.train.steps}; continue with: "
                f"{resume_command(self.run_dir, self.comm.world_size)}"
            ) from None
        finally:
            for callback in started:
                callback.on_end(experiment, state)
            self._lock.release()
        return self._finish(chosen)

    def _continue_without_lost(self, lost: PeerLost) -> None:
        """A process of the run died: roll every survivor back to the last checkpoint they all hold,
        cut the lost sites out of W (rows renormalised) and the metrics, and go on."""
        self._load_checkpoint()
        self.state.active[lost.lost_sites] = False
        self.console.print(
            f"[yellow]warning:[/] {escape(str(lost))}; dropped those sites from the mixing matrix and continue from "
            f"step {self.step} with {int(self.state.active.sum())} sites"
        )

    def _read_premerge(self) -> dict[str, Any] | None:
        path = self.folder.premerge_metrics
        return json.loads(path.read_text()) if self.experiment.schedule.final_merge and path.is_file() else None

    def _communication_cost(self) -> dict[str, Any]:
        """The single-merge paper's cost O(m R P T + 2 m P): its terms as measured in this run.

        m sites, P parameters, T gossip rounds, R parameter vectors sent per site per round on
        average (peers), and the final merge's vectors (2 (m - 1) for an exact ring all-reduce).
        """
        m, p = self.config.num_sites, self.experiment.population.theta.shape[1]  # parameters and buffers
        rounds = self.experiment.schedule.rounds_until(self.config.train.steps)
        traffic, vector_bytes = self.state.traffic, loop.vector_bytes(self.experiment)
        return {
            "sites_m": m,
            "parameters_P": p,
            "gossip_rounds_T": rounds,
            "peers_per_round_R": traffic.gossip_messages / (m * rounds) if rounds else 0.0,
            "gossip_bytes": traffic.gossip_bytes,
            "messages_lost": traffic.messages_lost,
            "final_merge_bytes": traffic.merge_messages * vector_bytes,
            "total_bytes": traffic.bytes_sent(vector_bytes),
        }

    def _finish(self, callbacks: list[Callback]) -> dict[str, Any]:
        experiment, state = self.experiment, self.state
        matrix = self._last_evaluation.matrix
        if matrix is None:
            matrix = evaluate(experiment, state.active, self.comm)[1]
        processes = self.comm.world_size
        network = int(self.comm.sum(torch.tensor([self.comm.bytes_sent], dtype=torch.float64)))
        self.comm.close()
        if not self.comm.writes:
            return {"status": "finished", "rank": self.comm.rank, "run_dir": str(self.run_dir)}
        rows = read_metrics(self.folder.metrics)
        final = rows[-1]
        steps = [r["step"] for r in rows]
        summary = {
            "status": "finished",
            "name": self.config.name,
            "run_dir": str(self.run_dir),
            "wall_time_s": round(state.wall_time, 3),
            "strategy": experiment.population.strategy,
            "num_parameters": experiment.population.num_parameters,
            "parts": self.parts,
            "platform": platform_record(self.threads, experiment.population.theta.device),
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
            "communication_steps": experiment.schedule.communication_steps(),
            "communication": self._communication_cost(),
            "dropped_sites": torch.nonzero(~state.active).flatten().tolist(),
            "before_final_merge": self._read_premerge(),
        }
        if processes > 1:  # parameter bytes the processes actually sent each other since they started
            summary["distributed"] = {"processes": processes, "payload_bytes_sent": network}
        summary.update(experiment.algorithm.summary(experiment.state, self.run_dir))
        for callback in callbacks:
            callback.on_finish(experiment, state, summary)
        atomic_write(self.folder.summary, json.dumps(summary, indent=2).encode())
        return summary
