"""A simulated network under the synchronous loop: churn, message loss and a clock ([network]).

Churn: every site is a two-state Markov chain, online -> offline with probability `churn_leave`
and offline -> online with `churn_return` at each step (from step 1; all sites start online); with
`churn_per = "second"` they are rates per simulated second, and at each step the chain moves over
the time the previous step took (probabilities 1 - exp(-rate dt)), so an asynchronous method's
short ticks and a synchronous method's rounds see the same churn in time. An
offline site neither trains nor sends nor receives: its parameters, buffers and optimizer state
are left exactly as they were, and every message from or to it is not sent.

Loss: each message of a round (an off-diagonal non-zero W_ij: j sends to i) between online sites
is lost in transit with probability `message_loss`, independently. Where a lost or unsent
message's weight goes is the algorithm's rule (`Algorithm.stochastic`): a row-stochastic method
(DSGD) has the receiver keep its own model in its place, W_ii += W_ij, so every row still sums to
1; a column-stochastic one (push-sum, SGP) has the sender keep the mass it could not deliver,
W_jj += W_ij, so every column still sums to 1 and the total mass is kept.

Clock: site i's step takes `compute_time * exp(compute_spread * z_i)` simulated seconds, z_i ~
N(0, 1) drawn once (heterogeneous devices); a synchronous step lasts as long as its slowest online
site. A message takes `latency + bytes / bandwidth`, links in parallel, so a round lasts one
message's time (lost messages are waited for as long). The single final global merge is a ring
all-reduce: 2 (m - 1) sequential transfers of P/m numbers. Every metrics row carries the clock
(`simulated_time_s`), so accuracy can be read against time as well as steps and bytes.

Traces replace the draws: `speed_trace` gives each site's seconds per step as measured,
`churn_trace` the steps [from, until) each site is offline, and `link_trace` the latency and
bandwidth of the links that differ from the default (CSV files with a header; every site of the
speed trace, any of the others; a site outside [0, N) is refused by line). With a link trace a
round lasts its slowest message over its own link; the final merge goes over the slowest link.

Draws come from the network's own generator (seeded from the run's seed), so a run without churn
or loss draws nothing from it, and with them it is reproducible and resumes exactly.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gossiplab.config import ConfigError, NetworkConfig
from gossiplab.optim import site_state
from gossiplab.sparse import entries, matrix

NETWORK_STREAM = 0x4E6574  # offsets the run's seed for the network's generator ("Net")


@dataclass(frozen=True)
class Delivery:
    """One round through the network: W as it acts, how many of its messages were lost in transit
    (sent, but never delivered), and the links of every message sent (receivers, senders; None:
    those of W as it acts)."""

    weights: torch.Tensor
    lost: int
    sent: tuple[torch.Tensor, torch.Tensor] | None = None


class Network:
    """Who is online, which messages arrive, and the simulated time, for a run of `num_sites` sites."""

    def __init__(self, config: NetworkConfig, num_sites: int, seed: int):
        self.config = config
        self.generator = torch.Generator().manual_seed((seed + NETWORK_STREAM) % 2**63)
        speeds = torch.Generator().manual_seed((seed + 2 * NETWORK_STREAM) % 2**63)
        slowdown = torch.exp(config.compute_spread * torch.randn(num_sites, generator=speeds, dtype=torch.float64))
        self.compute_time = config.compute_time * slowdown  # [N] simulated seconds per step, per site
        if config.speed_trace:
            self.compute_time = read_speed_trace(Path(config.speed_trace).expanduser(), num_sites)
        self.offline_spells = (  # (sites, from, until) of the churn trace's offline spells
            read_churn_trace(Path(config.churn_trace).expanduser(), num_sites) if config.churn_trace else None
        )
        links = read_link_trace(Path(config.link_trace).expanduser(), num_sites) if config.link_trace else None
        self.links = links if links is not None and len(links[0]) else None  # (keys, latency, bandwidth)
        self.online = torch.ones(num_sites, dtype=torch.bool)
        self.time = 0.0  # simulated seconds so far
        self.churned_at = 0.0  # the clock when the chain last moved (churn per second)

    @property
    def churns(self) -> bool:
        return self.config.churn_leave > 0 or self.offline_spells is not None

    def advance(self, step: int, active: torch.Tensor, tick: float | None = None) -> None:
        """Step to training step `step`: churn moves every site's chain once (or the churn trace
        says who is offline), and the clock waits for the slowest site that trains in it (online
        and not dropped); for an asynchronous algorithm it moves the algorithm's `tick`."""
        if self.offline_spells is not None:
            sites, start, until = self.offline_spells
            self.online = torch.ones_like(self.online)
            self.online[sites[(start <= step) & (step < until)]] = False
        elif self.churns:
            draw = torch.rand(len(self.online), generator=self.generator)
            leave, come_back = self.config.churn_leave, self.config.churn_return
            if self.config.churn_per == "second":
                elapsed, self.churned_at = self.time - self.churned_at, self.time
                leave, come_back = -math.expm1(-leave * elapsed), -math.expm1(-come_back * elapsed)
            self.online = torch.where(self.online, draw >= leave, draw < come_back)
        if tick is not None:
            self.time += tick
            return
        training = self.online & active
        self.time += float(self.compute_time[training].max()) if bool(training.any()) else 0.0

    def deliver(self, weights: torch.Tensor, stochastic: str) -> Delivery:
        """W as the network lets it act: messages from or to offline sites are not sent, and each
        other message is lost with probability `message_loss`; a dropped weight moves to the
        diagonal of the receiver (`stochastic='rows'`) or of the sender ('columns')."""
        loss = self.config.message_loss
        if not self.churns and loss == 0:
            return Delivery(weights, 0)
        rows, columns, values = entries(weights)
        between_sites = rows != columns
        unsent = between_sites & ~(self.online[rows] & self.online[columns])
        lost = torch.zeros_like(between_sites)
        if loss > 0:
            draw = torch.rand(int(between_sites.sum()), generator=self.generator)
            lost[between_sites] = draw < loss
            lost &= ~unsent
        dropped = unsent | lost
        sent = (rows[between_sites & ~unsent], columns[between_sites & ~unsent])
        if not bool(dropped.any()):
            return Delivery(weights, 0, sent)
        keeper = (columns if stochastic == "columns" else rows)[dropped]
        kept = ~dropped
        if weights.is_sparse:
            rows, columns = torch.cat([rows[kept], keeper]), torch.cat([columns[kept], keeper])
            weights = matrix(rows, columns, torch.cat([values[kept], values[dropped]]), len(weights))
        else:
            weights = weights.clone()
            weights[rows[dropped], columns[dropped]] = 0.0
            weights.diagonal().index_add_(0, keeper, values[dropped])
        return Delivery(weights, int(lost.sum()), sent)

    def transfer_time(self, message_bytes: float) -> float:
        """Simulated seconds of one message of `message_bytes` over one link."""
        bandwidth = self.config.bandwidth
        return self.config.latency + (message_bytes / bandwidth if bandwidth > 0 else 0.0)

    def charge_round(self, message_bytes: float, delivery: Delivery | None = None) -> None:
        """A gossip round whose messages go in parallel: its slowest message's time. With a link
        trace, each message over its own link (a round without its Delivery, the final merge's:
        over the slowest link)."""
        if self.links is None:
            self.time += self.transfer_time(message_bytes)
            return
        if delivery is None:
            self.time += self.slowest_transfer(message_bytes)
            return
        keys, latency, bandwidth = self.links
        if delivery.sent is not None:
            receivers, senders = delivery.sent
        else:
            rows, columns, _ = entries(delivery.weights)
            receivers, senders = rows[rows != columns], columns[rows != columns]
        if len(receivers) == 0:
            return
        wanted = receivers * len(self.online) + senders
        found = torch.searchsorted(keys, wanted).clamp(max=len(keys) - 1)
        listed = keys[found] == wanted
        link_latency = torch.where(listed, latency[found], self.config.latency)
        link_bandwidth = torch.where(listed, bandwidth[found], self.config.bandwidth)
        seconds = link_latency + torch.where(link_bandwidth > 0, message_bytes / link_bandwidth, 0.0)
        self.time += float(seconds.max())

    def slowest_transfer(self, message_bytes: float) -> float:
        """Seconds of one message over the slowest link: the default one, or one the trace lists."""
        seconds = self.transfer_time(message_bytes)
        if self.links is not None:
            _, latency, bandwidth = self.links
            traced = latency + torch.where(bandwidth > 0, message_bytes / bandwidth, 0.0)
            seconds = max(seconds, float(traced.max()))
        return seconds

    def charge_all_reduce(self, sites: int, vector_bytes: float) -> None:
        """The global merge as a ring all-reduce over `sites` sites: 2 (m - 1) transfers of a
        1/m share of the vector, one after the other (over the slowest link)."""
        if sites > 1:
            self.time += 2 * (sites - 1) * self.slowest_transfer(vector_bytes / sites)

    def frozen_offline(self, theta: torch.Tensor, optimizer: Any, sites: slice) -> OfflineRows:
        """Guard the rows of this process's offline sites (`sites`: the rows theta holds) in theta
        and the optimizer's per-site state."""
        if not self.churns:
            return OfflineRows([], None)
        return OfflineRows([theta, *site_state(optimizer)], ~self.online[sites])

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(), "online": self.online.clone(), "time": self.time,
            "churned_at": self.churned_at,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.online = state["online"].clone()
        self.time = state["time"]
        self.churned_at = state.get("churned_at", self.time)  # (checkpoints of per-step churn only)


class OfflineRows:
    """The rows of offline sites in a step's tensors (theta, optimizer state), copied when the step
    starts and put back when it ends: an offline site does not train."""

    def __init__(self, tensors: Sequence[torch.Tensor], offline: torch.Tensor | None):
        self.saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if offline is not None and bool(offline.any()):
            for tensor in tensors:
                rows = offline.to(tensor.device)
                self.saved.append((tensor, rows, tensor[rows].clone()))

    def restore(self) -> None:
        for tensor, rows, before in self.saved:
            tensor[rows] = before


def read_trace(
    path: Path, columns: tuple[str, ...], num_sites: int, field: str, site_columns: int = 1
) -> list[list[float]]:
    """The rows of a CSV trace with these columns (a header first), each a list of numbers, the
    first `site_columns` of them sites of the run; every problem is one ConfigError naming the
    field, the file and the line."""
    try:
        with path.open(newline="") as file:
            lines = list(csv.reader(file))
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"field '{field}' = '{path}': cannot be read ({error})") from None
    header = [name.strip() for name in lines[0]] if lines else []
    if header != list(columns):
        raise ConfigError(f"field '{field}' = '{path}': the first line must be the header {','.join(columns)}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line:  # a blank line
            continue
        try:
            values = [float(value) for value in line]
        except ValueError:
            values = []
        where = f"field '{field}' = '{path}', line {number}"
        if len(values) != len(columns) or not all(map(math.isfinite, values)):
            raise ConfigError(f"{where}: must hold {len(columns)} numbers ({','.join(columns)})")
        for name, value, text in list(zip(columns, values, line, strict=True))[:site_columns]:
            if value != int(value) or not 0 <= value < num_sites:
                raise ConfigError(f"{where}: {name} {text.strip()} is not a site of this run (0 to {num_sites - 1})")
        rows.append(values)
    return rows


def read_speed_trace(path: Path, num_sites: int) -> torch.Tensor:
    """[N] seconds per step from a `site,seconds` trace that lists every site once, seconds > 0."""
    field = "network.speed_trace"
    seconds = torch.full((num_sites,), math.nan, dtype=torch.float64)
    for site, value in read_trace(path, ("site", "seconds"), num_sites, field):
        if value <= 0:
            raise ConfigError(f"field '{field}' = '{path}': site {int(site)} takes {value:g} s; must be > 0")
        seconds[int(site)] = value
    missing = torch.nonzero(seconds.isnan()).flatten().tolist()
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"field '{field}' = '{path}': lists no seconds for sites {shown}; list every site")
    return seconds


def read_churn_trace(path: Path, num_sites: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sites, from, until) of a `site,offline_from,offline_until` trace: site offline at the steps
    from <= t < until."""
    field = "network.churn_trace"
    rows = read_trace(path, ("site", "offline_from", "offline_until"), num_sites, field)
    for site, start, until in rows:
        if not 1 <= start <= until:
            raise ConfigError(
                f"field '{field}' = '{path}': site {int(site)} offline from step {start:g} until {until:g}; "
                "must satisfy 1 <= offline_from <= offline_until"
            )
    table = torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)
    return table[:, 0].long(), table[:, 1], table[:, 2]


def read_link_trace(path: Path, num_sites: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(receiver * N + sender sorted, latency, bandwidth) of a `receiver,sender,latency,bandwidth`
    trace: latency >= 0 seconds, bandwidth >= 0 bytes per second (0: unlimited)."""
    field = "network.link_trace"
    rows = read_trace(path, ("receiver", "sender", "latency", "bandwidth"), num_sites, field, site_columns=2)
    for receiver, sender, latency, bandwidth in rows:
        if latency < 0 or bandwidth < 0:
            raise ConfigError(
                f"field '{field}' = '{path}': the link {int(receiver)} <- {int(sender)} has latency {latency:g} and "
                f"bandwidth {bandwidth:g}; both must be >= 0"
            )
    table = torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)
    keys = table[:, 0].long() * num_sites + table[:, 1].long()
    order = torch.argsort(keys)
    return keys[order], table[order, 2], table[order, 3]


def trace_problems(config: Any) -> list[str]:
    """The traces a config names can be read, for its number of sites (checked before any work)."""
    problems = []
    network = config.network
    traces = ((network.speed_trace, read_speed_trace), (network.churn_trace, read_churn_trace),
              (network.link_trace, read_link_trace))  # fmt: skip
    for path, read in traces:
        if path:
            try:
                read(Path(path).expanduser(), config.num_sites)
            except ConfigError as error:
                problems.append(str(error))
    return problems
