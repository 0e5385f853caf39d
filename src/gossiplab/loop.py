"""The loop of DESIGN section 1 (MAZEL Algorithm 1). It names no algorithm: the experiment's
algorithm adjusts the gradients, gives W and communicates; callbacks log, checkpoint and report.

    for t = step + 1 .. T:
        [the network: churn moves, the clock waits for the slowest online site (or ticks, asynchronous)]
        every site's gradient on its own batch, at algorithm.gradients_at   (one engine call)
        [communicate, for algorithms that mix before the step (CDSGD)]
        algorithm.adjust_gradients; the optimizer step on [N, P]; offline sites' rows put back
        [communicate: if the schedule fires, W = algorithm.mixing(round, graph) as the network delivers
         it (offline sites and lost messages cut), algorithm.communicate(W)
         (then, with train.reset_optimizer, a fresh optimizer state)]
        [at T with gossip.final_merge: the single global merge]
        every eval.every steps and at T: evaluate -> callbacks (metrics, checkpoint, progress, user)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gossiplab.assembly import check_mixing_matrix
from gossiplab.callbacks import Callback
from gossiplab.merge import without_sites
from gossiplab.optim import clip_site_gradients, learning_rate

if TYPE_CHECKING:
    from gossiplab.runner import Runner


def train(runner: Runner, callbacks: Sequence[Callback]) -> None:
    """Train from `runner.step` to train.steps (across processes: this process's block of sites)."""
    config, experiment, comm = runner.config, runner.experiment, runner.comm
    population, optimizer, algorithm = experiment.population, experiment.optimizer, experiment.algorithm
    network = experiment.network
    if runner.step == 0 and runner.step_zero_unlogged():
        evaluate(runner, callbacks, train_loss=None)
    while runner.step < config.train.steps:
        runner.step += 1
        network.advance(runner.step, runner.active, algorithm.tick(experiment.state))
        offline = network.frozen_offline(population.theta, optimizer, comm.sites)
        x, y = experiment.federation.sample_batch(config.train.batch_size, runner.generator, comm.sites)
        with algorithm.gradients_at(experiment.state):
            runner.record_losses(comm.gather(population.compute_gradients(x, y)))
        runner.zero_dropped(population.grad)
        if algorithm.communicate_before_step:
            communicate(runner)
        optimizer.lr = learning_rate(config.train, runner.step)
        algorithm.adjust_gradients(x, y, experiment.state)
        if config.train.clip_grad_norm:
            clip_site_gradients(population.grad, config.train.clip_grad_norm)
        optimizer.step(population.parameters, population.grad)
        runner.zero_dropped(population.theta)
        offline.restore()
        if not algorithm.communicate_before_step:
            communicate(runner)
        for callback in callbacks:
            callback.on_step(runner)
        evaluated = runner.step % config.eval.every == 0 or runner.step == config.train.steps
        if evaluated:
            evaluate(runner, callbacks, train_loss=runner.mean_loss())
        runner.stop_if_requested(checkpointed=evaluated)
        del x, y  # the next batch is drawn without this one alive: at 100,000 sites a batch is gigabytes


def communicate(runner: Runner) -> None:
    """A gossip round if the schedule fires at this step; the global merge if it is the last.
    With gossip.normalization = 'local' (FedBN) normalisation layers stay out of both."""
    experiment, step = runner.experiment, runner.step
    schedule, algorithm = experiment.schedule, experiment.algorithm
    gossips, merges = schedule.gossips_at(step), schedule.merges_globally_at(step)
    if not (gossips or merges):
        return
    with experiment.population.keeping_local(runner.local_columns):
        if gossips:
            round_index = schedule.rounds_until(step) - 1
            adjacency = experiment.graph(step, round_index)
            weights = algorithm.mixing(round_index, adjacency, experiment.state)
            check_mixing_matrix(
                weights, runner.config.num_sites, runner.parts["gossip.mixing"], adjacency, algorithm.stochastic
            )
            weights = without_sites(weights, runner.active, algorithm.stochastic)
            delivery = experiment.network.deliver(weights, algorithm.stochastic)
            sent = algorithm.communicate(delivery.weights, experiment.state, runner.comm)
            runner.count_round(adjacency, delivery, sent)
        if merges:
            runner.merge_globally()
    if runner.config.train.reset_optimizer:
        experiment.optimizer.reset()


def evaluate(runner: Runner, callbacks: Sequence[Callback], train_loss: float | None) -> None:
    row, matrix = runner.evaluate(train_loss)
    for callback in callbacks:
        callback.on_evaluation(runner, row, matrix)
