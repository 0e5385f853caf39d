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

import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gossiplab import merge, metrics
from gossiplab.config import Config, build_config, differing_fields, flatten
from gossiplab.data.federation import Federation, build_federation, sample_held_out
from gossiplab.distributed import PeerLost, SingleProcess, launched_distributed
from gossiplab.encoders import frozen_parts
from gossiplab.l2c import LearnedMixing, MetaLearnedMixing
from gossiplab.memory import ResourceError, available_memory
from gossiplab.mixing import fomo, influence, mixing_matrix, uniform
from gossiplab.models import build_model
from gossiplab.optim import build_optimizer, learning_rate
from gossiplab.permutation import permutation_spec
from gossiplab.population import Population
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
from gossiplab.schedule import GossipSchedule
from gossiplab.topology import build_adjacency

BYTES_PER_PARAMETER = 4


class RunInterrupted(RuntimeError):
    """The run stopped on request after saving a checkpoint; `gossiplab run --resume` continues it."""


class DivergenceError(RuntimeError):
    """A site's loss became NaN or Inf; the run stopped and recorded it in summary.json."""


def message_count(weights: torch.Tensor) -> int:
    """Parameter vectors sent in one gossip round: one per off-diagonal non-zero W_ij (j sends to i)."""
    return int((weights != 0).sum() - (weights.diagonal() != 0).sum())


@dataclass
class Experiment:
    """Everything one run is made of, built from a config; every part can be swapped before a run.

    topology(round) -> adjacency [N, N]; mixing_rule(adjacency) -> W [N, N]; merge(theta, W)
    mixes the population in place (GossipAverager: theta <- W theta).
    """

    config: Config
    federation: Federation
    population: Population
    optimizer: Any
    schedule: GossipSchedule
    topology: Callable[[int], torch.Tensor]
    mixing_rule: Callable[[torch.Tensor], torch.Tensor]
    merge: Callable[[torch.Tensor, torch.Tensor], None]


def activation_count(module: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """Numbers every layer outputs for one input: the per-sample activation memory, in floats."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        total += output.numel()

    leaves = [m for m in module.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    with torch.no_grad():
        module(torch.zeros(1, *input_shape))
    for hook in hooks:
        hook.remove()
    return total


def memory_estimate(config: Config, federation: Federation, module: torch.nn.Module) -> dict[str, int]:
    """Bytes the run will hold: [N, P] buffers (parameters, gradients, optimizer state; gossip
    works in cache-sized blocks), training activations (forward and backward), and the data."""
    n = config.num_sites
    p = sum(t.numel() for t in module.parameters())
    # SGD: a momentum buffer if any; Adam(W): exp_avg and exp_avg_sq (the fused update needs no more)
    optimizer_rows = (1 if config.train.momentum > 0 else 0) if config.train.optimizer == "sgd" else 2
    activations = activation_count(module, federation.image_shape)
    data = sum(t.numel() * t.element_size() for t in (federation.pool_x, federation.val_x, federation.test_x))
    return {
        "population buffers": (2 + optimizer_rows) * n * p * 4,
        "activations": 3 * n * config.train.batch_size * activations * 4 + 2**16 * activations * 4,
        "data": data,
    }


def check_memory(estimate: dict[str, int], available: int) -> None:
    total = sum(estimate.values())
    if total > available:
        parts = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in estimate.items())
        raise ResourceError(
            f"the run needs about {total / 2**30:.1f} GiB ({parts}) but {available / 2**30:.1f} GiB is available; "
            "lower num_sites, the model size (model.hidden / model.channels) or train.batch_size"
        )


def build_data_and_model(config: Config, console: Console | None = None) -> tuple[Federation, torch.nn.Module]:
    """The sites' data (frozen features in place of images when the model has a pretrained
    backbone) and one site's model (with the text head over the prompted class names)."""
    frozen = frozen_parts(config.model, console)
    federation = build_federation(config, frozen.inputs if frozen and frozen.image else None)
    class_embeddings = frozen.class_embeddings(federation.class_names) if config.model.head == "text" else None
    zero_shot_dim = frozen.zero_shot_dim if frozen else 0
    module = build_model(config.model, federation.image_shape, federation.num_classes, class_embeddings, zero_shot_dim)
    return federation, module


def build_experiment(config: Config, console: Console | None = None, sites: slice | None = None) -> Experiment:
    """The experiment of `config`; with `sites`, this process's population holds only that block
    of the sites (one process of a distributed run), each initialised as in the whole population."""
    sites = sites or slice(0, config.num_sites)
    federation, module = build_data_and_model(config, console)
    check_memory(memory_estimate(config, federation, module), available_memory())
    population = Population(
        module,
        sites.stop - sites.start,
        seed=config.seed,
        init=config.model.init,
        strategy=config.train.engine,
        class_mask=federation.class_mask()[sites] if config.model.head == "text" else None,
        first_site=sites.start,
    )
    optimizer = build_optimizer(config.train, population.theta.shape)
    gossip = config.gossip
    if gossip.mixing in ("l2c", "meta-l2c"):
        meta = {"encoder_path": gossip.meta_encoder} if gossip.mixing == "meta-l2c" else {}
        learned = (MetaLearnedMixing if meta else LearnedMixing)(
            population,
            federation,
            build_adjacency(gossip.topology, config.num_sites, 0, seed=config.seed, p=gossip.p),
            lr=gossip.l2c_lr,
            weight_decay=gossip.l2c_weight_decay,
            prune_round=gossip.prune_round,
            keep=gossip.keep_neighbours,
            val_batch=gossip.val_batch,
            seed=config.seed,
            **meta,
        )
        mixing_rule = learned.mixing_rule
    elif gossip.mixing == "fomo":
        mixing_rule = fomo_rule(config, federation, population)
    elif gossip.mixing == "influence":

        def mixing_rule(adjacency: torch.Tensor) -> torch.Tensor:
            return influence(uniform(adjacency), population.grad, optimizer.lr)

    else:
        mixing_rule = functools.partial(mixing_matrix, rule=config.gossip.mixing)
    return Experiment(
        config=config,
        federation=federation,
        population=population,
        optimizer=optimizer,
        schedule=GossipSchedule.from_config(config.gossip, config.train.steps),
        topology=functools.partial(
            build_adjacency, config.gossip.topology, config.num_sites, seed=config.seed, p=config.gossip.p
        ),
        mixing_rule=mixing_rule,
        merge=learned if gossip.mixing in ("l2c", "meta-l2c") else build_merge(config, federation, population),
    )


def fomo_rule(config: Config, federation: Federation, population: Population) -> Callable:
    """FOMO's mixing rule: every model scored on every site's fixed validation sample
    (`gossip.val_batch` images each, drawn once from the seed), then `mixing.fomo`."""
    num_sites, batch = config.num_sites, config.gossip.val_batch
    generator = torch.Generator().manual_seed(config.seed + 2)
    x, y = sample_held_out(federation.val_x, federation.val_y, federation.val_site, num_sites, batch, generator)
    x, y = x.flatten(0, 1), y.flatten()
    owner = torch.arange(num_sites).repeat_interleave(batch)

    def rule(adjacency: torch.Tensor) -> torch.Tensor:
        theta = population.theta
        logits = population.logits(theta, x)  # [models, samples, classes]
        if population.class_mask is not None:
            logits.masked_fill_(~population.class_mask[owner], -torch.inf)
        ce = F.cross_entropy(logits.transpose(1, 2), y.expand(len(theta), -1), reduction="none")
        losses = ce.view(len(theta), num_sites, batch).mean(2).T  # [site i, model j]
        return fomo(adjacency, losses, torch.cdist(theta, theta))

    return rule


def build_merge(config: Config, federation: Federation, population: Population) -> Callable:
    """gossip.merge: plain averaging, DIMAT's matched merges, SGP's push-sum, or Ditto's global track."""
    kind = config.gossip.merge
    if kind == "average":
        return merge.GossipAverager(population.theta.shape)
    if kind == "push-sum":
        return merge.PushSum(config.num_sites)
    if kind == "ditto":
        optimizer = build_optimizer(config.train, population.theta.shape)
        return merge.Ditto(population, optimizer, config.gossip.ditto_lambda)
    spec = permutation_spec(population.module, federation.image_shape)
    match_inputs = None
    if kind == "activation-matching":
        # a fixed sample of each site's own training data (DIMAT matches on local data)
        generator = torch.Generator().manual_seed(config.seed + 1)
        match_inputs, _ = federation.sample_batch(config.gossip.match_samples, generator)
    return merge.MatchedMerge(population, spec, kind, match_inputs)


def evaluate(
    experiment: Experiment, active: torch.Tensor | None = None, comm: Any = None
) -> tuple[dict[str, Any], torch.Tensor]:
    """Every model and the counterfactual merged model (mean of the active rows) on the global test
    set, scored per site; sites dropped for divergence (`active` False) are left out.

    Across processes (`comm`), each scores its own models, the merged model is a sum over
    processes, and the [N, n_test] hits are gathered so every process computes the same metrics."""
    federation, population = experiment.federation, experiment.population
    comm = comm or SingleProcess(len(population.theta))
    theta = population.theta
    active = torch.ones(comm.num_sites, dtype=torch.bool) if active is None else active
    # each test sample is classified in its own site's label space (MAZEL: by that site's names)
    allowed = federation.class_mask()[federation.test_site] if population.class_mask is not None else None
    correct = comm.gather(population.predict(theta, federation.test_x, allowed) == federation.test_y)
    mean = merge.merged_model(theta, active, comm)
    # the counterfactual merged model, by the run's own merge operator when it aligns units (DIMAT)
    merged = experiment.merge.merged_model(theta, active) if hasattr(experiment.merge, "merged_model") else mean
    merged_correct = population.predict(merged, federation.test_x, allowed) == federation.test_y
    # per-site squared distances, row sums (a reduction over all of [N, P] would split across
    # threads in a thread-count dependent order), gathered: the consensus distance of the active sites
    consensus = float(comm.gather((theta - mean).square().sum(1))[active].mean())
    return metrics.evaluation_row(correct, merged_correct, federation.test_site, consensus, active)


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
        comm: Any = None,
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
        if config.train.threads:
            # convolution kernels reduce in a thread-count dependent order: pin it for identical results
            torch.set_num_threads(config.train.threads)
        self.config = config
        self.run_dir = run_dir
        self.resume = resume
        self.console = console or Console(stderr=True)
        self.show_progress = show_progress
        self._stop_requested = False
        try:
            self.experiment = experiment or build_experiment(config, self.console, self.comm.sites)
        except BaseException:
            self._lock.release()
            raise
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.gossip_messages = 0  # parameter vectors sent by gossip rounds
        self.merge_messages = 0  # parameter vectors sent by the final global merge
        self.wall_time = 0.0
        self.loss_sum, self.loss_count = 0.0, 0  # mean training loss since the last evaluation
        self.active = torch.ones(config.num_sites, dtype=torch.bool)  # sites not dropped for divergence
        self.last_finite_loss = torch.full((config.num_sites,), float("nan"))
        self._last_matrix: torch.Tensor | None = None
        self._tensorboard: Any = None

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and raise RunInterrupted (Ctrl-C does this)."""
        self._stop_requested = True

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _save_checkpoint(self) -> None:
        """This process's checkpoint, verified by its digest on resume. The previous one is kept:
        the fallback for a damaged newest one, and across processes the common step when a process
        was killed between two processes' writes, leaving them one checkpoint apart."""
        state = {
            "step": self.step,
            "gossip_messages": self.gossip_messages,
            "merge_messages": self.merge_messages,
            "wall_time": self.wall_time,
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            "active": self.active,
            "last_finite_loss": self.last_finite_loss,
            "theta": self.experiment.population.theta,
            "optimizer": self.experiment.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "config": self.config.to_dict(),
        }
        if hasattr(self.experiment.merge, "state_dict"):
            state["merge"] = self.experiment.merge.state_dict()
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
        written, current = flatten(state["config"]), flatten(self.config.to_dict())
        differing = differing_fields(written, current)
        if differing:
            details = ", ".join(f"{k}: {written.get(k)!r} vs {current.get(k)!r}" for k in differing)
            raise RunDirError(
                f"{self.run_dir}/checkpoint.pt was written by another config (checkpoint vs now: {details})"
            )
        self.step = state["step"]
        self.loss_sum, self.loss_count = state["loss_sum"], state["loss_count"]
        self.active.copy_(state["active"])
        self.last_finite_loss.copy_(state["last_finite_loss"])
        self.gossip_messages = state["gossip_messages"]
        self.merge_messages = state["merge_messages"]
        self.wall_time = state["wall_time"]
        self.experiment.population.theta.copy_(state["theta"])
        self.experiment.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if "merge" in state:
            self.experiment.merge.load_state_dict(state["merge"])
        if self.comm.writes:
            kept = [line for line in read_metrics(self.metrics_path) if line["step"] <= self.step]
            atomic_write(self.metrics_path, "".join(json.dumps(row) + "\n" for row in kept).encode())

    def _append_row(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _evaluate_and_log(self, train_loss: float | None) -> dict[str, Any]:
        finite = self.comm.gather(torch.isfinite(self.experiment.population.theta).all(1))
        if (self.active & ~finite).any():
            self._handle_divergence(self.active & ~finite, "non-finite parameters")
        row, matrix = evaluate(self.experiment, self.active, self.comm)
        row = {
            "step": self.step,
            "gossip_rounds": self.experiment.schedule.rounds_until(self.step),
            "bytes_sent": self.bytes_sent,
            "train_loss": train_loss,
            **row,
        }
        if self.comm.writes:
            self._append_row(row)
        if self._tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, int | float) and key != "step":
                    self._tensorboard.add_scalar(f"gossiplab/{key}", value, self.step)
            self._tensorboard.flush()
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
            adjacency = experiment.topology(experiment.schedule.rounds_until(step) - 1)
            weights = merge.without_sites(experiment.mixing_rule(adjacency), self.active)
            self.comm.mix(theta, weights, experiment.merge)
            self.gossip_messages += message_count(weights)
        if experiment.schedule.merges_globally_at(step):
            atomic_save(theta, self.comm.rank_file(self.run_dir, "premerge.pt"))
            before = evaluate(experiment, self.active, self.comm)[0]
            if self.comm.writes:
                before = {k: v for k, v in before.items() if k != "local_accuracy"}
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
            merge.global_merge(theta, self.active, self.comm)
            return 2 * (int(self.active.sum()) - 1)
        rounds = gossip.final_merge_rounds or max(1, math.ceil(math.log2(num_sites)))
        # plain averaging, whatever the run's merge operator (L2C or DIMAT would learn or match here)
        averager = merge.GossipAverager(theta.shape)
        sent = 0
        for round_index in range(rounds):
            adjacency = build_adjacency(gossip.final_merge, num_sites, round_index, self.config.seed)
            weights = merge.without_sites(mixing_matrix(adjacency, "uniform"), self.active)
            self.comm.mix(theta, weights, averager)
            sent += message_count(weights)
        return sent

    def run(self, on_evaluation: Callable[[Runner, dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train to `train.steps`, then write summary.json and the plots; return the summary."""
        config = self.config
        if self.resume:
            self._load_checkpoint()
        elif self.comm.writes:
            atomic_write(self.run_dir / "config.toml", config.to_toml().encode())
        if self.comm.world_size > 1:  # each process's copy, for resuming where rank 0's files are not
            atomic_write(self.comm.rank_file(self.run_dir, "config.toml"), config.to_toml().encode())
        if config.eval.tensorboard and self.comm.writes:
            from tensorboardX import SummaryWriter

            # purge_step drops events logged after the checkpoint by a run that was killed
            self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step or None)
        try:
            return self._train(on_evaluation)
        finally:
            if self._tensorboard is not None:
                self._tensorboard.close()
            self._lock.release()

    def _train(self, on_evaluation: Callable[[Runner, dict[str, Any]], None] | None) -> dict[str, Any]:
        config = self.config
        total = config.train.steps
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            disable=not (self.show_progress and self.comm.writes),
            transient=False,
        )
        with progress:
            task = progress.add_task(config.name, total=total, completed=self.step, status="")
            while True:
                try:
                    self._steps(progress, task, on_evaluation)
                    break
                except self.comm.failures as error:
                    self._continue_without_lost(self.comm.recover(error))
                    progress.update(task, completed=self.step)
        return self._finish()

    def _steps(self, progress: Progress, task: Any, on_evaluation: Callable | None) -> None:
        """Train from self.step to train.steps (one process's block of the sites across processes)."""
        config, experiment, sites = self.config, self.experiment, self.comm.sites
        federation, population = experiment.federation, experiment.population
        total = config.train.steps
        started = time.perf_counter() - self.wall_time
        # step 0 is evaluated once: a run resumed from its step-0 checkpoint already logged it
        unlogged = self.comm.writes and not read_metrics(self.metrics_path)
        if self.step == 0 and self.comm.share("step-0-unlogged", "yes" if unlogged else "") == "yes":
            row = self._evaluate_and_log(None)
            self._save_checkpoint()
            progress.update(task, status=self._status(row))
        while self.step < total:
            self.step += 1
            x, y = federation.sample_batch(config.train.batch_size, self.generator, sites)
            losses = self.comm.gather(population.compute_gradients(x, y))  # [N], every site's
            finite = torch.isfinite(losses)
            if (self.active & ~finite).any():
                self._handle_divergence(self.active & ~finite, "non-finite loss")
            self.last_finite_loss = torch.where(finite, losses, self.last_finite_loss)
            mine = self.active[sites]
            if not mine.all():
                population.grad[~mine] = 0.0
            if config.gossip.order == "before-update":  # CDSGD: mix, then the step at the old point
                self._communicate(self.step)
            if isinstance(experiment.merge, merge.PushSum):  # SGP: x = w z takes the SGD step
                population.grad.div_(experiment.merge.push_sum_weights[:, None])
            experiment.optimizer.lr = learning_rate(config.train, self.step)
            if isinstance(experiment.merge, merge.Ditto):  # the proximal term, and the global track's step
                experiment.merge.optimizer.lr = experiment.optimizer.lr
                experiment.merge.local_step(population, x, y)
            experiment.optimizer.step(population.theta, population.grad)
            if not mine.all():
                population.theta[~mine] = 0.0
            if config.gossip.order == "after-update":
                self._communicate(self.step)
            self.loss_sum += float(losses[self.active].mean())
            self.loss_count += 1
            progress.update(task, completed=self.step)
            evaluated = self.step % config.eval.every == 0 or self.step == total
            if evaluated:
                self.wall_time = time.perf_counter() - started
                row = self._evaluate_and_log(self.loss_sum / self.loss_count)
                self.loss_sum, self.loss_count = 0.0, 0
                self._save_checkpoint()
                progress.update(task, status=self._status(row))
                if on_evaluation is not None:
                    on_evaluation(self, row)
            if self._stop_requested:
                if not evaluated:  # a second checkpoint of one step would push out the older fallback
                    self.wall_time = time.perf_counter() - started
                    self._save_checkpoint()
                raise RunInterrupted(
                    f"stopped at step {self.step}/{total}; continue with: "
                    f"{resume_command(self.run_dir, self.comm.world_size)}"
                )
        self.wall_time = time.perf_counter() - started

    def _continue_without_lost(self, lost: PeerLost) -> None:
        """A process of the run died: roll every survivor back to the last checkpoint they all hold,
        cut the lost sites out of W (rows renormalised) and the metrics, and go on."""
        self._load_checkpoint()
        self.active[lost.lost_sites] = False
        self.console.print(
            f"[yellow]warning:[/] {escape(str(lost))}; dropped those sites from the mixing matrix and continue from "
            f"step {self.step} with {int(self.active.sum())} sites"
        )

    @staticmethod
    def _status(row: dict[str, Any]) -> str:
        return f"ALA {row['ala']:.3f}  AGA {row['aga']:.3f}  MMGA {row['mmga']:.3f}"

    def _handle_divergence(self, bad: torch.Tensor, what: str) -> None:
        """Stop the run (train.on_divergence = 'stop'), or drop the sites from gossip, merging and
        the metrics and go on ('drop'), as long as one site is left."""
        sites = torch.nonzero(bad).flatten().tolist()
        last = {i: round(float(self.last_finite_loss[i]), 6) for i in sites}
        message = f"{what} at step {self.step} on sites {sites} (last finite loss per site: {last})"
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
        raise DivergenceError(f"training diverged: {message}")

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
        from gossiplab.report import write_outputs

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
            **{k: v for k, v in final.items() if k != "local_accuracy"},
            "convergence_step": {
                m: metrics.convergence_step(steps, [r[m] for r in rows]) for m in ("ala", "aga", "mmga")
            },
            "local_accuracy": final["local_accuracy"],
            "accuracy_matrix": matrix.tolist(),
            "communication_steps": self.experiment.schedule.communication_steps(),
            "communication": self._communication_cost(),
            "dropped_sites": torch.nonzero(~self.active).flatten().tolist(),
            "before_final_merge": self._read_premerge(),
        }
        if processes > 1:  # parameter bytes the processes actually sent each other since they started
            summary["distributed"] = {"processes": processes, "payload_bytes_sent": network}
        if hasattr(self.experiment.merge, "summarize"):  # L2C: the learned weights and what they favour
            summary.update(self.experiment.merge.summarize(self.run_dir))
        write_outputs(self.run_dir, self.config, rows, summary)
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        return summary
