"""AD-PSGD, asynchronous decentralized parallel SGD (Lian et al. 2018, Algorithm 1), on the clock.

Every site loops at its own speed, with no round that waits for the slowest:

    read x_hat_i <- x_i; compute g_i at x_hat_i on a batch    c_i seconds (the [network] clock)
    pick a neighbour j at random; x_i, x_j <- (x_i + x_j) / 2   an exchange: latency + bytes / bandwidth
    x_i <- x_i - lr g_i                                         stale if j averaged into x_i meanwhile

Time runs in ticks, one loop step each, as long as the shortest iteration (the fastest site's
step and an exchange), so that no site ends two iterations in a tick. A tick's gradients are taken
at every site's last read (`gradients_at`); a site that read in the previous tick keeps that
gradient for its iteration. The iterations that end in a tick are applied in waves: in time order
(ties by site), each goes into the first wave after every earlier one that touches its site or its
neighbour, so one wave's exchanges touch disjoint sites and commute, and the waves in order equal
the events one by one (a test holds them equal bit for bit). `train.steps` counts ticks; compare a
run with a synchronous method on `simulated_time_s`. The update is plain SGD (momentum, weight
decay and clipping are refused), on a fixed graph, without churn or message loss (not modelled
yet).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from gossiplab.algorithms.base import BYTES_PER_NUMBER, Algorithm, Sent
from gossiplab.communicator import Communicator
from gossiplab.config import Config, problems_of
from gossiplab.registry import ALGORITHMS
from gossiplab.sparse import dense

ADPSGD_STREAM = 0x414450  # offsets the run's seed for the neighbour draws ("ADP")
FIXED_GRAPHS = ("ring", "exponential", "complete")


def waves(sites: list[int], neighbours: list[int]) -> list[list[int]]:
    """Positions of the events (site i with neighbour j, in time order) grouped into waves: each
    event goes one wave after the last earlier event touching i or j."""
    last: dict[int, int] = {}
    grouped: list[list[int]] = []
    for position, (site, neighbour) in enumerate(zip(sites, neighbours, strict=True)):
        wave = max(last.get(site, -1), last.get(neighbour, -1)) + 1
        last[site] = last[neighbour] = wave
        if wave == len(grouped):
            grouped.append([])
        grouped[wave].append(position)
    return grouped


@torch.no_grad()
def apply_events(
    theta: torch.Tensor, reads: torch.Tensor, pending: torch.Tensor, sites: torch.Tensor, neighbours: torch.Tensor,
    lr: float,
) -> None:  # fmt: skip
    """The iterations ending now, in time order, wave by wave: average with the neighbour, take the
    stale gradient step, read the model for the next iteration."""
    for wave in waves(sites.tolist(), neighbours.tolist()):
        i, j = sites[wave], neighbours[wave]
        mean = (theta[i] + theta[j]) / 2  # a wave's pairs are disjoint: i and j never overlap
        theta[j] = mean
        theta[i] = mean - lr * pending[i]
        reads[i] = theta[i]


@ALGORITHMS.register("ad-psgd")
class ADPSGD(Algorithm):
    """AD-PSGD (Lian et al. 2018): sites step at their own speed and average with one random
    neighbour at the end of each of their steps."""

    @staticmethod
    def problems(config: Config) -> list[str]:
        train, gossip, network = config.train, config.gossip, config.network
        return problems_of(config, [
            (train.optimizer == "sgd", "train.optimizer", "must be sgd for gossip.algorithm = 'ad-psgd' (plain SGD)"),
            (train.momentum == 0, "train.momentum", "must be 0 for gossip.algorithm = 'ad-psgd' (plain SGD)"),
            (train.weight_decay == 0, "train.weight_decay", "must be 0 for gossip.algorithm = 'ad-psgd'"),
            (train.clip_grad_norm == 0, "train.clip_grad_norm", "must be 0 for gossip.algorithm = 'ad-psgd'"),
            (gossip.schedule == "every" and gossip.every == 1, "gossip.every",
             "must be 1 with gossip.schedule = 'every' for gossip.algorithm = 'ad-psgd' (it exchanges every tick)"),
            (gossip.topology in FIXED_GRAPHS, "gossip.topology",
             f"must be a fixed graph for gossip.algorithm = 'ad-psgd': {', '.join(FIXED_GRAPHS)}"),
            (network.churn_leave == 0 and not network.churn_trace and network.message_loss == 0,
             "gossip.algorithm", "'ad-psgd' runs on the clock without churn or message loss (not modelled yet)"),
            (not network.link_trace, "network.link_trace",
             "must be empty for gossip.algorithm = 'ad-psgd' (its exchanges take network.latency and bandwidth)"),
        ])  # fmt: skip

    def init(self) -> dict[str, Any]:
        theta, network = self.experiment.population.theta, self.experiment.network
        exchange = network.transfer_time(theta.shape[1] * BYTES_PER_NUMBER)
        iteration = network.compute_time + exchange  # [N] seconds from one read to the next
        return {
            "reads": theta.clone(),  # x_hat: the model each site read when its iteration began
            "pending": torch.zeros_like(theta),  # the gradient each site's iteration will apply
            "fresh": torch.ones(len(theta), dtype=torch.bool),  # read in the last tick: gradient to keep
            "finish": iteration.clone(),  # when each site's iteration ends (simulated seconds)
            "iteration": iteration,
            "ticks": torch.zeros((), dtype=torch.long),
        }

    def tick(self, state: dict[str, Any]) -> float:
        """The shortest iteration (a step and an exchange): no site ends two iterations in a tick."""
        return float(state["iteration"].min())

    @contextlib.contextmanager
    def gradients_at(self, state: dict[str, Any]) -> Iterator[None]:
        """Gradients at every site's read model, not its current one (which its neighbours may
        have averaged into since)."""
        theta = self.experiment.population.theta
        current = theta.clone()
        theta.copy_(state["reads"])
        try:
            yield
        finally:
            theta.copy_(current)

    def adjust_gradients(self, x: torch.Tensor, y: torch.Tensor, state: dict[str, Any]) -> None:
        """Keep the gradients of the sites that just read; the loop's optimizer step then moves
        nothing (its gradient is zero): the iterations move the models in `communicate`."""
        grad, fresh = self.experiment.population.grad, state["fresh"]
        state["pending"][fresh] = grad[fresh]
        fresh.zero_()
        grad.zero_()

    def mixing(self, round_index: int, adjacency: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """No round-wide W: each iteration averages one pair (identity here, so nothing else mixes)."""
        return torch.eye(self.experiment.config.num_sites)

    def neighbour_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each site's neighbours in the fixed graph, in increasing order ([N, max degree], padded),
        and their counts; made once."""
        cached = self.__dict__.get("_neighbours")
        if cached is None:
            graph = dense(self.experiment.topology(0)).clone()
            graph.fill_diagonal_(False)
            degrees = graph.sum(1)
            order = torch.argsort((~graph).to(torch.uint8), dim=1, stable=True)  # neighbours first, in order
            cached = self.__dict__["_neighbours"] = (order[:, : int(degrees.max())], degrees)
        return cached

    @torch.no_grad()
    def communicate(self, weights: torch.Tensor, state: dict[str, Any], comm: Communicator) -> Sent:
        """Apply the iterations that end in this tick, each exchanging two models with its neighbour."""
        experiment = self.experiment
        state["ticks"] += 1
        now, finish = experiment.network.time, state["finish"]
        ending = torch.nonzero(finish <= now).flatten()
        ending = ending[torch.argsort(finish[ending], stable=True)]  # time order, ties by site
        if len(ending) == 0:
            return Sent(0, 0)
        seed = (experiment.config.seed + ADPSGD_STREAM + int(state["ticks"])) % 2**63
        draw = torch.rand(len(ending), generator=torch.Generator().manual_seed(seed))
        table, degrees = self.neighbour_table()
        picks = (draw * degrees[ending]).long()  # the k-th neighbour, uniformly
        neighbours = table[ending, picks]
        population = experiment.population
        apply_events(population.theta, state["reads"], state["pending"], ending, neighbours, experiment.optimizer.lr)
        finish[ending] += state["iteration"][ending]
        state["fresh"][ending] = True
        vector_bytes = population.theta.shape[1] * BYTES_PER_NUMBER
        return Sent(2 * len(ending), 2 * len(ending) * vector_bytes)  # x_i to j and x_j back
