"""The loop of DESIGN section 1 (MAZEL Algorithm 1). It names no algorithm and knows no file: the
experiment's algorithm adjusts the gradients, gives W and communicates; the training state
(`gossiplab.state`) holds the step, the batches' generator, the active sites, the loss sums and
the traffic; callbacks log, checkpoint, draw and report.

    for t = step + 1 .. T:
        [the network: churn moves, the clock waits for the slowest online site (or ticks, asynchronous)]
        every site's gradient on its own batch, at algorithm.gradients_at   (one engine call)
        [communicate, for algorithms that mix before the step (CDSGD)]
        algorithm.adjust_gradients; the gradient transforms' chain (train.gradient_transforms);
        the optimizer step on [N, P]; offline sites' rows put back
        [communicate: if the schedule fires, W = algorithm.mixing(round, graph) as the network delivers
         it (offline sites and lost messages cut), algorithm.communicate(W), its Sent added to the
         traffic (then, with train.reset_optimizer, a fresh optimizer state)]
        [at T with gossip.final_merge: the single global merge]
        every eval.every steps and at T: evaluate -> callbacks (metrics, checkpoint, progress, user)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from gossiplab import merge
from gossiplab.algorithms.base import BYTES_PER_NUMBER, Sent
from gossiplab.assembly import Experiment, check_mixing_matrix, part_names
from gossiplab.data.partition import listed_sites
from gossiplab.evaluation import evaluate as score
from gossiplab.evaluation import per_row
from gossiplab.optim import clip_site_gradients, learning_rate
from gossiplab.state import TrainingState

if TYPE_CHECKING:
    from gossiplab.callbacks import Callback
    from gossiplab.communicator import Communicator


class DivergenceError(RuntimeError):
    """A site's loss or parameters became NaN or Inf and train.on_divergence = 'stop' (or no site
    would be left): `summary` is what the run directory's summary.json records."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


class StopRequested(Exception):
    """The state's `stop_requested` was set: the loop stopped after finishing step `state.step`."""


def train(experiment: Experiment, state: TrainingState, comm: Communicator, callbacks: Sequence[Callback]) -> None:
    """Train from `state.step` to train.steps (across processes: this process's block of sites)."""
    config, population, optimizer = experiment.config, experiment.population, experiment.optimizer
    algorithm, network = experiment.algorithm, experiment.network
    started = time.perf_counter() - state.wall_time
    if state.step == 0 and not state.start_evaluated:
        evaluate(experiment, state, comm, callbacks, started, train_loss=None)
        state.start_evaluated = True
    while state.step < config.train.steps:
        state.step += 1
        network.advance(state.step, state.active, algorithm.tick(experiment.state))
        offline = network.frozen_offline(population.theta, optimizer, comm.sites)
        x, y = experiment.federation.sample_batch(config.train.batch_size, state.generator, comm.sites)
        with algorithm.gradients_at(experiment.state):
            losses = comm.gather(population.compute_gradients(x, y))
        diverged = state.active & ~torch.isfinite(losses)
        if diverged.any():
            handle_divergence(experiment, state, comm, callbacks, diverged, "non-finite loss")
        state.record_losses(losses)
        zero_dropped(state, comm, population.grad)
        if algorithm.communicate_before_step:
            communicate(experiment, state, comm, callbacks)
        optimizer.lr = learning_rate(config.train, state.step)
        algorithm.adjust_gradients(x, y, experiment.state)
        for transform, transform_state in experiment.gradient_chain:
            transform.update(population.grad, transform_state, state.step)
        if config.train.clip_grad_norm:
            clip_site_gradients(population.grad, config.train.clip_grad_norm)
        optimizer.step(population.parameters, population.grad)
        zero_dropped(state, comm, population.theta)
        offline.restore()
        if not algorithm.communicate_before_step:
            communicate(experiment, state, comm, callbacks)
        for callback in callbacks:
            callback.on_step(experiment, state)
        if state.step % config.eval.every == 0 or state.step == config.train.steps:
            evaluate(experiment, state, comm, callbacks, started, train_loss=state.mean_loss())
        if state.stop_requested:
            state.wall_time = time.perf_counter() - started
            raise StopRequested
        del x, y  # the next batch is drawn without this one alive: at 100,000 sites a batch is gigabytes
    state.wall_time = time.perf_counter() - started


def zero_dropped(state: TrainingState, comm: Communicator, rows: torch.Tensor) -> None:
    """Zero this process's rows of sites dropped for divergence (their gradients, parameters)."""
    mine = state.active[comm.sites]
    if not mine.all():
        rows[~mine] = 0.0


def vector_bytes(experiment: Experiment) -> int:
    """One row of theta on the wire: a site's parameters and, with BatchNorm, its running statistics."""
    return experiment.population.theta.shape[1] * BYTES_PER_NUMBER


def communicate(
    experiment: Experiment, state: TrainingState, comm: Communicator, callbacks: Sequence[Callback]
) -> None:
    """A gossip round if the schedule fires at this step; the global merge if it is the last.
    With gossip.normalization = 'local' (FedBN) normalisation layers stay out of both.

    The round's traffic is what its algorithm reported sending (`Sent`; None: one parameter vector
    per off-diagonal non-zero of the delivered W), and the messages lost in transit, each as large
    as the round's delivered ones; the network's clock advances by the round's time."""
    config, step = experiment.config, state.step
    schedule, algorithm, population = experiment.schedule, experiment.algorithm, experiment.population
    gossips, merges = schedule.gossips_at(step), schedule.merges_globally_at(step)
    if not (gossips or merges):
        return
    local = config.gossip.normalization == "local"
    with population.keeping_local(population.normalization_columns() if local else torch.empty(0, dtype=torch.long)):
        if gossips:
            round_index = schedule.rounds_until(step) - 1
            adjacency = experiment.graph(step, round_index)
            weights = algorithm.mixing(round_index, adjacency, experiment.state)
            mixing_name = part_names(experiment)["gossip.mixing"]
            check_mixing_matrix(weights, config.num_sites, mixing_name, adjacency, algorithm.stochastic)
            weights = merge.without_sites(weights, state.active, algorithm.stochastic)
            delivery = experiment.network.deliver(weights, algorithm.stochastic)
            sent = algorithm.communicate(delivery.weights, experiment.state, comm)
            if sent is None:
                sent = Sent.vectors(delivery.weights, population.theta.shape[1])
            message_bytes = sent.bytes / sent.messages if sent.messages else vector_bytes(experiment)
            traffic = state.traffic
            traffic.gossip_messages += sent.messages + delivery.lost
            traffic.gossip_bytes += sent.bytes + round(delivery.lost * message_bytes)
            traffic.messages_lost += delivery.lost + sent.lost
            if sent.messages + delivery.lost and algorithm.tick(experiment.state) is None:
                experiment.network.charge_round(message_bytes, delivery)  # (asynchronous: inside its iterations)
            for transform, transform_state in experiment.gradient_chain:
                transform.after_gossip(transform_state)
            for callback in callbacks:
                callback.on_gossip(experiment, state, adjacency, delivery.weights)
        if merges:
            merge_globally(experiment, state, comm, callbacks)
    if config.train.reset_optimizer:
        experiment.optimizer.reset()


def merge_globally(
    experiment: Experiment, state: TrainingState, comm: Communicator, callbacks: Sequence[Callback]
) -> None:
    """The single global merge, the callbacks shown the metrics just before it."""
    config = experiment.config
    before = score(experiment, state.active, comm)[0]
    for callback in callbacks:
        callback.on_final_merge(experiment, state, before)
    state.traffic.merge_messages += experiment.algorithm.final_merge(state.active, experiment.state, comm)
    network, sites, row_bytes = experiment.network, int(state.active.sum()), vector_bytes(experiment)
    if config.gossip.final_merge == "exact":
        network.charge_all_reduce(sites, row_bytes)
    else:
        for _ in range(merge.final_merge_rounds(config)):
            network.charge_round(row_bytes)


def evaluate(
    experiment: Experiment,
    state: TrainingState,
    comm: Communicator,
    callbacks: Sequence[Callback],
    started: float,
    train_loss: float | None,
) -> None:
    """The metrics row of this step (with the mean training loss since the last evaluation,
    overall and per site) and the accuracy matrix, shown to the callbacks."""
    state.wall_time = time.perf_counter() - started
    theta = experiment.population.theta
    finite = comm.gather(per_row(theta, lambda block: torch.isfinite(block).all(1)).cpu())
    if (state.active & ~finite).any():
        handle_divergence(experiment, state, comm, callbacks, state.active & ~finite, "non-finite parameters")
    row, matrix = score(experiment, state.active, comm)
    row = {
        "step": state.step,
        "gossip_rounds": experiment.schedule.rounds_until(state.step),
        "bytes_sent": state.traffic.bytes_sent(vector_bytes(experiment)),
        "simulated_time_s": experiment.network.time,
        "online_sites": int((experiment.network.online & state.active).sum()),
        "train_loss": train_loss,
        **row,
        "site_train_loss": state.site_mean_losses() if train_loss is not None else None,
    }
    state.reset_losses()
    for callback in callbacks:
        callback.on_evaluation(experiment, state, row, matrix)


def handle_divergence(
    experiment: Experiment,
    state: TrainingState,
    comm: Communicator,
    callbacks: Sequence[Callback],
    diverged: torch.Tensor,
    what: str,
) -> None:
    """train.on_divergence: 'drop' takes the sites out of gossip, merging and the metrics (their
    rows zeroed, their optimizer state reset) and goes on, as long as one site is left; else the
    run stops with DivergenceError naming what to try."""
    config = experiment.config
    sites = torch.nonzero(diverged).flatten().tolist()
    last = {i: round(float(state.last_finite_loss[i]), 6) for i in sites}
    shown = dict(list(last.items())[:8])
    message = f"{what} at step {state.step} on {listed_sites(sites)} (last finite loss per site: {shown})"
    if config.train.on_divergence == "drop" and bool((state.active & ~diverged).any()):
        state.active &= ~diverged
        experiment.algorithm.drop_sites(diverged, experiment.state)
        mine = diverged[comm.sites]
        experiment.population.theta[mine] = 0.0
        experiment.optimizer.reset_rows(mine)
        for callback in callbacks:
            remain = f"{message}; dropped them, {int(state.active.sum())} sites remain"
            callback.on_sites_dropped(experiment, state, remain)
        return
    clip = config.train.clip_grad_norm
    clipping = f"a smaller train.clip_grad_norm (now {clip:g})" if clip else "clip gradients (train.clip_grad_norm=1.0)"
    raise DivergenceError(
        f"training diverged: {message}; try a lower train.lr (now {config.train.lr:g}) or {clipping}, "
        "or let the run drop such sites (train.on_divergence=drop)",
        {"status": "diverged", "message": message, "step": state.step, "sites": sites},
    )
