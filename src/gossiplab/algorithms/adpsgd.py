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
decay and clipping are refused), on a fixed graph.

Under churn and loss ([network]): a site that is offline in a tick abandons its iteration and
starts a new one (a fresh read) when it comes back; a site picks its neighbour among its online
ones (membership is known, as the synchronous loop's cut of W assumes) and, with none online,
takes its gradient step alone. Each of an exchange's two messages is lost with probability
`message_loss`: a lost request leaves both models unaveraged (site i steps alone), a lost reply
leaves j averaged and i not, so the pair's mean is no longer kept. Both are counted as sent and
lost; the iteration takes as long either way (the loss is noticed within the exchange's time).
A site dropped for divergence (train.on_divergence = drop) ends no more iterations and is nobody's
neighbour from then on, as a synchronous W cuts it out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from gossiplab.algorithms.base import BYTES_PER_NUMBER, Algorithm, Sent
from gossiplab.communicator import Communicator
from gossiplab.config import Config, problems_of
from gossiplab.devices import resolve_kernels
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
    lr: float, delivered: torch.Tensor | None = None, answered: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """The iterations ending now, in time order, wave by wave: average with the neighbour, take the
    stale gradient step, read the model for the next iteration. `delivered` [E]: x_i reached j
    (j averages); `answered` [E]: x_j came back to i (i averages); None: every message arrived.
    A site stepping alone is its own neighbour with neither."""
    for wave in waves(sites.tolist(), neighbours.tolist()):
        i, j = sites[wave], neighbours[wave]
        mean = (theta[i] + theta[j]) / 2  # a wave's pairs are disjoint: i and j never overlap
        if delivered is None or answered is None:
            theta[j] = mean
            theta[i] = mean - lr * pending[i]
        else:
            theta[j] = torch.where(delivered[wave, None], mean, theta[j])
            theta[i] = torch.where(answered[wave, None], mean, theta[i]) - lr * pending[i]
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
            "active": torch.ones(len(theta), dtype=torch.bool),  # not dropped for divergence
        }

    def drop_sites(self, dropped: torch.Tensor, state: dict[str, Any]) -> None:
        """A dropped site ends no more iterations and no site picks it: its model (zeroed by the
        loop) would otherwise be averaged into its neighbours' at their next exchange."""
        state["active"] &= ~dropped

    def tick(self, state: dict[str, Any]) -> float:
        """The shortest iteration (a step and an exchange): no site ends two iterations in a tick."""
        return float(state["iteration"].min())

    @contextlib.contextmanager
    def gradients_at(self, state: dict[str, Any]) -> Iterator[None]:
        """Gradients at every site's read model, not its current one (which its neighbours may
        have averaged into since). The current models wait in a buffer made once (a fresh clone of
        [N, P] each tick cost 3x a copy: new pages)."""
        theta = self.experiment.population.theta
        current = self.__dict__.get("_current")
        if current is None or current.shape != theta.shape:
            current = self.__dict__["_current"] = torch.empty_like(theta)
        current.copy_(theta)
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

    def apply(
        self, theta: torch.Tensor, state: dict[str, Any], sites: torch.Tensor, neighbours: torch.Tensor,
        delivered: torch.Tensor | None, answered: torch.Tensor | None,
    ) -> None:  # fmt: skip
        """The exchanges in time order: one compiled pass (train.kernels resolving to numba, rows
        in float32 on the CPU), else `apply_events`' waves; the same bits either way (tested)."""
        lr, reads, pending = self.experiment.optimizer.lr, state["reads"], state["pending"]
        compiled = resolve_kernels(self.experiment.config.train.kernels, theta.device) == "numba"
        if compiled and theta.dtype == torch.float32 and theta.is_contiguous():
            from gossiplab import kernels  # numba is optional (the `compiled` extra)

            every = torch.ones(len(sites), dtype=torch.bool)
            kernels.apply_exchanges(theta, reads, pending, sites, neighbours,
                                    every if delivered is None else delivered,
                                    every if answered is None else answered, lr)  # fmt: skip
        else:
            apply_events(theta, reads, pending, sites, neighbours, lr, delivered, answered)

    def pick_neighbours(
        self, ending: torch.Tensor, draw: torch.Tensor, active: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each ending site's neighbour, uniform among its online, not dropped ones (the k-th,
        k = floor(draw * count)), and whether it had one (if not, it is its own)."""
        table, degrees = self.neighbour_table()
        candidates = table[ending]
        reachable = self.experiment.network.online & active
        usable = (torch.arange(table.shape[1]) < degrees[ending, None]) & reachable[candidates]
        counts = usable.sum(1)
        picks = (draw * counts).long()
        position = (usable.cumsum(1) > picks[:, None]).to(torch.uint8).argmax(1)  # the picks-th usable one
        found = counts > 0
        return torch.where(found, candidates[torch.arange(len(ending)), position], ending), found

    @torch.no_grad()
    def communicate(self, weights: torch.Tensor, state: dict[str, Any], comm: Communicator) -> Sent:
        """Apply the iterations that end in this tick, each exchanging two models with its neighbour."""
        experiment = self.experiment
        network = experiment.network
        state["ticks"] += 1
        now, finish = network.time, state["finish"]
        theta = experiment.population.theta
        if network.churns:  # offline sites abandon their iteration: a new one from now, a fresh read
            offline = ~network.online
            finish[offline] = now + state["iteration"][offline]
            state["reads"][offline] = theta[offline]
            state["fresh"][offline] = True
        ending = torch.nonzero((finish <= now) & state["active"]).flatten()
        ending = ending[torch.argsort(finish[ending], stable=True)]  # time order, ties by site
        if len(ending) == 0:
            return Sent(0, 0)
        seed = (experiment.config.seed + ADPSGD_STREAM + int(state["ticks"])) % 2**63
        generator = torch.Generator().manual_seed(seed)
        neighbours, found = self.pick_neighbours(ending, torch.rand(len(ending), generator=generator), state["active"])
        requests = replies = int(found.sum())
        lost = 0
        delivered = answered = None
        if network.config.message_loss > 0:
            request_lost, reply_lost = torch.rand(2, len(ending), generator=generator) < network.config.message_loss
            delivered = found & ~request_lost
            answered = delivered & ~reply_lost
            replies = int(delivered.sum())
            lost = int((found & request_lost).sum() + (delivered & reply_lost).sum())
            neighbours = torch.where(delivered, neighbours, ending)  # an undelivered request touches no neighbour
        elif not bool(found.all()):
            delivered = answered = found
        self.apply(theta, state, ending, neighbours, delivered, answered)
        finish[ending] += state["iteration"][ending]
        state["fresh"][ending] = True
        vector_bytes = theta.shape[1] * BYTES_PER_NUMBER
        return Sent(requests + replies, (requests + replies) * vector_bytes, lost)  # x_i to j, x_j back
