"""The simulated network ([network]): churn, message loss and the clock, under the same loop."""

from __future__ import annotations

import json
import re

import pytest
import torch

from gossiplab.algorithms.adpsgd import apply_events, waves
from gossiplab.algorithms.sgp import push_sum_matrix
from gossiplab.config import ConfigError, NetworkConfig
from gossiplab.mixing import mixing_matrix
from gossiplab.network import Network
from gossiplab.runner import Runner
from gossiplab.sparse import entries, matrix
from gossiplab.topology import build_adjacency
from resume import stopped_then_resumed


def lossy(num_sites: int = 32, **options: float) -> Network:
    return Network(NetworkConfig(**options), num_sites, seed=3)


def test_without_churn_or_loss_the_network_leaves_w_as_it_is_and_draws_nothing():
    network = lossy()
    weights = mixing_matrix(build_adjacency("exponential", 32, 0, seed=0), "metropolis")
    state = network.generator.get_state()
    assert network.deliver(weights, "rows").weights is weights
    network.advance(1, torch.ones(32, dtype=torch.bool))
    assert torch.equal(network.generator.get_state(), state)
    assert network.time == 1.0


@pytest.mark.parametrize("stochastic", ["rows", "columns"])
def test_a_lost_message_weight_stays_with_the_receiver_or_the_sender(stochastic):
    """Rows still sum to 1 (the receiver keeps its own model in place of what it missed), or, for
    push-sum, columns (the sender keeps the mass it could not deliver); only lost entries change."""
    weights = mixing_matrix(build_adjacency("exponential", 32, 0, seed=0), "metropolis")
    weights = push_sum_matrix(weights) if stochastic == "columns" else weights
    delivery = lossy(message_loss=0.3).deliver(weights, stochastic)
    after = delivery.weights
    sums = after.sum(1) if stochastic == "rows" else after.sum(0)
    torch.testing.assert_close(sums, torch.ones(32))
    off_diagonal = ~torch.eye(32, dtype=torch.bool)
    lost = off_diagonal & (weights != 0) & (after == 0)
    assert delivery.lost == int(lost.sum())
    messages = int((off_diagonal & (weights != 0)).sum())
    assert 0.2 * messages < delivery.lost < 0.4 * messages  # 320 messages at p = 0.3
    assert torch.equal(after[off_diagonal & ~lost], weights[off_diagonal & ~lost])
    moved = (weights * lost).sum(1 if stochastic == "rows" else 0)
    torch.testing.assert_close(after.diagonal(), weights.diagonal() + moved)


def test_a_sparse_w_loses_the_same_messages_as_its_dense_form():
    weights = mixing_matrix(build_adjacency("exponential", 32, 0, seed=0), "metropolis")
    rows, columns, values = entries(weights)
    sparse = matrix(rows, columns, values, 32)
    dense_delivery = lossy(message_loss=0.5).deliver(weights, "rows")
    sparse_delivery = lossy(message_loss=0.5).deliver(sparse, "rows")
    assert sparse_delivery.weights.is_sparse
    assert sparse_delivery.lost == dense_delivery.lost
    torch.testing.assert_close(sparse_delivery.weights.to_dense(), dense_delivery.weights)


def test_churn_is_a_two_state_markov_chain_per_site():
    """The stationary share of online sites is return / (leave + return)."""
    network = lossy(num_sites=2000, churn_leave=0.1, churn_return=0.3)
    everyone = torch.ones(2000, dtype=torch.bool)
    shares = []
    for _ in range(60):
        network.advance(1, everyone)
        shares.append(float(network.online.float().mean()))
    assert sum(shares[20:]) / 40 == pytest.approx(0.75, abs=0.02)
    weights = mixing_matrix(build_adjacency("ring", 2000, 0, seed=0), "uniform")
    after = network.deliver(weights, "rows").weights.to_dense()  # 2,000 sites: a sparse W
    offline = ~network.online
    assert torch.equal(after[offline], torch.eye(2000)[offline])  # an offline site receives nothing
    sent_by_offline = after[:, offline] * ~torch.eye(2000, dtype=torch.bool)[:, offline]
    assert not sent_by_offline.any()  # nor sends


@pytest.mark.parametrize("churn_per", ["step", "second"])
def test_churn_per_second_is_the_same_in_time_whatever_a_step_lasts(churn_per):
    """Ticks of 0.05 s and of 0.1 s over the same 400 simulated seconds: churn per second gives
    both the same share offline (leave / (leave + return) = 0.2) and about the same leaves per
    second; churn per step (the same numbers as probabilities) leaves twice as often on the
    shorter ticks."""
    options = {"churn_leave": 0.02, "churn_return": 0.08, "churn_per": churn_per}
    leaves_per_second, offline_shares = [], []
    for tick in (0.05, 0.1):
        network, everyone = lossy(num_sites=500, **options), torch.ones(500, dtype=torch.bool)
        leaves, offline = 0, 0.0
        for _ in range(round(400 / tick)):
            before = network.online
            network.advance(1, everyone, tick)
            leaves += int((before & ~network.online).sum())
            offline += tick * float((~network.online).float().mean())
        leaves_per_second.append(leaves / 400)
        offline_shares.append(offline / 400)
    ratio = leaves_per_second[0] / leaves_per_second[1]
    if churn_per == "second":
        assert offline_shares == pytest.approx([0.2, 0.2], abs=0.02)
        assert ratio == pytest.approx(1.0, abs=0.1)
    else:
        assert ratio == pytest.approx(2.0, abs=0.2)


def run(config, run_dir, on_step=None) -> Runner:
    run_dir.mkdir()
    runner = Runner(config, run_dir, show_progress=False)
    runner.run(on_step=on_step)
    return runner


def test_an_offline_site_neither_trains_nor_sends_nor_receives(small_config, tmp_path):
    """Every step, the rows of the sites offline in it (parameters and momentum) end the step
    exactly as they began it; the sites online move."""
    config = small_config("default", "gossip.every=1", "network.churn_leave=0.2", "network.churn_return=0.3")
    before: dict[str, torch.Tensor] = {}
    checked = {"offline": 0, "online": 0}

    def check(runner: Runner) -> None:
        theta = runner.experiment.population.theta
        momentum = runner.experiment.optimizer.momentum_buffer
        offline = ~runner.experiment.network.online
        if before:
            assert torch.equal(theta[offline], before["theta"][offline])
            assert torch.equal(momentum[offline], before["momentum"][offline])
            assert not torch.equal(theta[~offline], before["theta"][~offline])
            checked["offline"] += int(offline.sum())
            checked["online"] += int((~offline).sum())
        before.update(theta=theta.clone(), momentum=momentum.clone())

    runner = run(config, tmp_path / "churn", on_step=check)
    assert checked["offline"] > 100 and checked["online"] > 300
    summary = json.loads((tmp_path / "churn" / "summary.json").read_text())
    assert summary["online_sites"] == int(runner.experiment.network.online.sum())


def test_push_sum_keeps_its_mass_when_messages_are_lost(small_config, tmp_path):
    """SGP over a lossy, churning network: every round's P stays column stochastic, so the push-sum
    weights still sum to N after 120 steps of gossip."""
    config = small_config(
        "default", "gossip.algorithm=sgp", "gossip.topology=exponential", "gossip.every=1",
        "network.message_loss=0.3", "network.churn_leave=0.1", "network.churn_return=0.5",
    )  # fmt: skip
    runner = run(config, tmp_path / "sgp")
    weights = runner.experiment.state["push_sum_weights"]
    assert float(weights.sum()) == pytest.approx(8.0, rel=1e-5)
    assert float(weights.std()) > 0.01  # the losses made the weights uneven: the check is not vacuous
    assert runner.state.traffic.messages_lost > 0


def test_the_clock_prices_the_slowest_site_and_every_round(small_config, tmp_path):
    """120 steps of the slowest of 8 log-normal speeds, and 12 rounds of latency + bytes / bandwidth."""
    config = small_config(
        "default", "gossip.every=10", "network.compute_spread=0.5", "network.latency=0.25", "network.bandwidth=1e6"
    )
    runner = run(config, tmp_path / "clock")
    network = runner.experiment.network
    message_bytes = runner.experiment.population.theta.shape[1] * 4
    expected = 120 * float(network.compute_time.max()) + 12 * (0.25 + message_bytes / 1e6)
    rows = [json.loads(line) for line in (tmp_path / "clock" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["simulated_time_s"] == pytest.approx(expected, rel=1e-9)
    assert [row["simulated_time_s"] > 0 for row in rows] == [False, True, True, True]


def test_lost_messages_are_counted_and_charged(small_config, tmp_path):
    config = small_config("default", "gossip.every=10", "network.message_loss=0.5")
    runner = run(config, tmp_path / "lossy")
    communication = json.loads((tmp_path / "lossy" / "summary.json").read_text())["communication"]
    traffic, vector_bytes = runner.state.traffic, runner.experiment.population.theta.shape[1] * 4
    assert communication["messages_lost"] == traffic.messages_lost > 0
    assert communication["gossip_bytes"] == traffic.gossip_messages * vector_bytes


@pytest.mark.parametrize(
    "churn", [["network.churn_leave=0.1"], ["network.churn_per=second", "network.churn_leave=0.1"]]
)
def test_a_lossy_churning_run_resumes_exactly(small_config, tmp_path, churn):
    config = small_config("default", "gossip.every=5", "network.message_loss=0.3", *churn, "network.compute_spread=1")
    run(config, tmp_path / "whole")
    stopped_then_resumed(config, tmp_path / "split", stop_step=40)
    whole, split = (tmp_path / name / "metrics.jsonl" for name in ("whole", "split"))
    assert split.read_bytes() == whole.read_bytes()


def test_traces_give_each_sites_speed_and_offline_spells(small_config, tmp_path):
    """A speed trace prices each step at its slowest online site's measured time; a churn trace
    takes sites offline exactly for their spells (site 2 over steps 10-29 trains not at all)."""
    speeds = tmp_path / "speeds.csv"
    speeds.write_text("site,seconds\n" + "".join(f"{site},{0.1 * (site + 1)}\n" for site in range(8)))
    spells = tmp_path / "spells.csv"
    spells.write_text("site,offline_from,offline_until\n2,10,30\n7,1,121\n")
    config = small_config("default", "gossip.every=1", f"network.speed_trace={speeds}", f"network.churn_trace={spells}")
    seen: dict[int, torch.Tensor] = {}

    def keep(runner: Runner) -> None:
        if runner.step in (9, 29):
            seen[runner.step] = runner.experiment.population.theta[2].clone()
        assert bool(runner.experiment.network.online[2]) == (not 10 <= runner.step < 30)

    runner = run(config, tmp_path / "traced", on_step=keep)
    assert torch.equal(seen[9], seen[29])
    assert runner.experiment.network.time == pytest.approx(120 * 0.7)  # site 7 (0.8 s) is never online
    assert runner.experiment.network.online.tolist() == [True] * 7 + [False]


def test_a_link_trace_prices_each_message_over_its_own_link(tmp_path):
    """A round lasts its slowest message: the traced slow link when the round uses it, the default
    link otherwise; the final merge goes over the slowest link."""
    trace = tmp_path / "links.csv"
    trace.write_text("receiver,sender,latency,bandwidth\n1,0,2.0,1000\n")
    network = Network(NetworkConfig(latency=0.5, bandwidth=0, link_trace=str(trace)), 4, seed=0)
    ring = mixing_matrix(build_adjacency("ring", 4, 0, seed=0), "uniform")
    network.charge_round(500.0, network.deliver(ring, "rows"))
    assert network.time == pytest.approx(2.0 + 500 / 1000)  # 1 <- 0 is in the ring: the slow link
    pairs = torch.zeros(4, 4, dtype=torch.bool)
    pairs[2, 3] = pairs[3, 2] = True
    network.time = 0.0
    network.charge_round(500.0, network.deliver(mixing_matrix(pairs, "uniform"), "rows"))
    assert network.time == pytest.approx(0.5)  # only 2 <-> 3: default links
    network.time = 0.0
    network.charge_all_reduce(4, 4000.0)
    assert network.time == pytest.approx(6 * (2.0 + 1000 / 1000))


LINKS = "receiver,sender,latency,bandwidth\n"


@pytest.mark.parametrize(
    ("field", "lines", "message"),
    [
        ("speed_trace", "site,seconds\n0,1\n9,1\n", "line 3: site 9 is not a site of this run (0 to 7)"),
        ("speed_trace", "site,seconds\n0,1\n", "lists no seconds for sites 1, 2, 3, 4, 5 and 2 more; list every site"),
        ("speed_trace", "sites,time\n0,1\n", "the first line must be the header site,seconds"),
        ("speed_trace", "site,seconds\n0,-1\n", "site 0 takes -1 s; must be > 0"),
        ("link_trace", "receiver,sender,latency,bandwidth\n1,9,0,0\n", "sender 9 is not a site of this run (0 to 7)"),
        (
            "link_trace",
            "receiver,sender,latency,bandwidth\n1,2,-1,0\n",
            "the link 1 <- 2 has latency -1 and bandwidth 0",
        ),
    ],
)
def test_a_bad_trace_is_refused_by_line_before_any_work(small_config, tmp_path, field, lines, message):
    trace = tmp_path / "trace.csv"
    trace.write_text(lines)
    with pytest.raises(ConfigError, match=re.escape(message)):
        small_config("default", f"network.{field}={trace}")


def test_a_churn_trace_and_the_markov_chain_are_not_both_taken(small_config, tmp_path):
    trace = tmp_path / "spells.csv"
    trace.write_text("site,offline_from,offline_until\n1,5,3\n")
    with pytest.raises(ConfigError, match="site 1 offline from step 5 until 3; must satisfy"):
        small_config("default", f"network.churn_trace={trace}")
    trace.write_text("site,offline_from,offline_until\n1,3,5\n")
    with pytest.raises(ConfigError, match=r"network\.churn_trace.*leave network\.churn_leave at 0"):
        small_config("default", f"network.churn_trace={trace}", "network.churn_leave=0.1")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("network.message_loss=1.5", "'network.message_loss' = 1.5: must be a probability in [0, 1]"),
        ("network.churn_leave=-0.1", "'network.churn_leave' = -0.1: must be a probability in [0, 1]"),
        ("network.churn_return=1.5", "'network.churn_return' = 1.5: must be a probability in [0, 1]"),
        ("network.churn_per=minute", "'network.churn_per' = 'minute'"),
        ("network.latency=-1", "'network.latency' = -1"),
        ("network.bandwidth=-5", "'network.bandwidth' = -5"),
        ("network.compute_time=0", "'network.compute_time' = 0"),
    ],
)
def test_bad_network_values_get_one_line_errors_naming_the_field(gossiplab_main, override, message):
    code, _, err = gossiplab_main("run", "--dry-run", override)
    assert code == 2
    assert message in err


@pytest.mark.parametrize("lossy_exchanges", [False, True])
@pytest.mark.parametrize("kernels", ["torch", "numba"])
def test_ad_psgd_exchanges_equal_its_iterations_one_by_one(lossy_exchanges, kernels):
    """Twelve iterations ending in one tick (sites repeat as neighbours), applied in waves (torch)
    or in one compiled pass (numba), equal the same iterations applied one after the other in
    time order, bit for bit; with lost requests (the site steps alone) and lost replies (only the
    neighbour averages) too."""
    generator = torch.Generator().manual_seed(0)
    theta, pending = torch.randn(6, 5000, generator=generator), torch.randn(6, 5000, generator=generator)
    sites = torch.tensor([0, 3, 1, 4, 2, 5])
    neighbours = torch.tensor([1, 2, 0, 5, 3, 4])
    delivered = answered = None
    if lossy_exchanges:
        delivered = torch.tensor([True, False, True, True, True, False])
        answered = torch.tensor([True, False, False, True, False, False])
        neighbours = torch.where(delivered, neighbours, sites)
    grouped_theta, grouped_reads = theta.clone(), torch.zeros_like(theta)
    if kernels == "numba":
        compiled = pytest.importorskip("gossiplab.kernels")
        every = torch.ones(6, dtype=torch.bool)
        compiled.apply_exchanges(grouped_theta, grouped_reads, pending, sites, neighbours,
                                 every if delivered is None else delivered, every if answered is None else answered,
                                 0.1, block=1024)  # fmt: skip
    else:
        apply_events(grouped_theta, grouped_reads, pending, sites, neighbours, 0.1, delivered, answered)
        assert len(waves(sites.tolist(), neighbours.tolist())) > 1  # the events conflict: not one wave
    one_by_one, reads = theta.clone(), torch.zeros_like(theta)
    for k, (i, j) in enumerate(zip(sites.tolist(), neighbours.tolist(), strict=True)):
        mean = (one_by_one[i] + one_by_one[j]) / 2
        if delivered is None or delivered[k]:
            one_by_one[j] = mean
        if delivered is None or answered[k]:
            one_by_one[i] = mean
        one_by_one[i] = one_by_one[i] - 0.1 * pending[i]
        reads[i] = one_by_one[i]
    assert torch.equal(grouped_theta, one_by_one) and torch.equal(grouped_reads, reads)


AD_PSGD = ["gossip.algorithm=ad-psgd", "gossip.topology=ring", "gossip.every=1", "train.momentum=0"]


def test_ad_psgd_ticks_the_clock_takes_gradients_at_reads_and_resumes_exactly(small_config, tmp_path):
    config = small_config("default", *AD_PSGD, "network.compute_spread=0.5", "network.latency=0.2")
    reads_seen = []

    def check(runner: Runner) -> None:
        algorithm, state = runner.experiment.algorithm, runner.experiment.state
        theta = runner.experiment.population.theta
        with algorithm.gradients_at(state):
            reads_seen.append(torch.equal(theta, state["reads"]))

    runner = run(config, tmp_path / "whole", on_step=check)
    assert all(reads_seen) and len(reads_seen) == 120
    tick = float(runner.experiment.state["iteration"].min())
    assert tick == pytest.approx(float(runner.experiment.network.compute_time.min()) + 0.2)
    assert runner.experiment.network.time == pytest.approx(120 * tick)
    stopped_then_resumed(config, tmp_path / "split", stop_step=40)
    assert (tmp_path / "split" / "metrics.jsonl").read_bytes() == (tmp_path / "whole" / "metrics.jsonl").read_bytes()


def test_ad_psgd_under_churn_and_loss_freezes_offline_sites_and_counts_lost_exchanges(small_config, tmp_path):
    """AD-PSGD on a churning, lossy network: an offline site's model and read stay as they were
    and its iteration starts afresh when it comes back (it ends no iteration while offline); lost
    requests and replies are counted; the run resumes to the same metrics."""
    config = small_config(
        "default", *AD_PSGD, "network.compute_spread=0.5", "network.churn_leave=0.1", "network.churn_return=0.4",
        "network.message_loss=0.2",
    )  # fmt: skip
    before: dict[str, torch.Tensor] = {}
    seen = {"offline": 0}

    def check(runner: Runner) -> None:
        theta, state = runner.experiment.population.theta, runner.experiment.state
        network = runner.experiment.network
        offline = ~network.online
        if before:
            assert torch.equal(theta[offline], before["theta"][offline])
            assert bool((state["finish"][offline] > network.time).all())
            assert torch.equal(state["reads"][offline], theta[offline])
            seen["offline"] += int(offline.sum())
        before.update(theta=theta.clone())

    runner = run(config, tmp_path / "whole", on_step=check)
    assert seen["offline"] > 50
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    lost, sent = summary["communication"]["messages_lost"], runner.state.traffic.gossip_messages
    assert 0.1 * sent < lost < 0.3 * sent  # each message lost with probability 0.2
    assert summary["aga"] > 0.3  # 0.39 (0.47 on the same clock without churn or loss; chance 0.1)
    stopped_then_resumed(config, tmp_path / "split", stop_step=40)
    assert (tmp_path / "split" / "metrics.jsonl").read_bytes() == (tmp_path / "whole" / "metrics.jsonl").read_bytes()


def test_ad_psgd_stops_exchanging_with_a_site_dropped_for_divergence(small_config, tmp_path):
    """A dropped site is zeroed by the loop; AD-PSGD picks its partners itself (not through the W the
    loop cuts), so it must stop picking it: before it did, the zeros and the NaN were averaged into
    the ring neighbours (AGA 0.14, one site at 0.03)."""
    config = small_config("default", *AD_PSGD, "train.on_divergence=drop")
    frozen = {}

    def poison_site_2(runner: Runner, row: dict) -> None:
        if row["step"] == 40:  # its model and its read: the next loss, taken at the read, is NaN
            runner.experiment.population.theta[2, 0] = float("nan")
            runner.experiment.state["reads"][2, 0] = float("nan")

    def check(runner: Runner) -> None:
        if not bool(runner.state.active[2]):
            frozen.setdefault("finish", float(runner.experiment.state["finish"][2]))
            assert float(runner.experiment.state["finish"][2]) == frozen["finish"]  # it ends no iteration

    run_dir = tmp_path / "drop"
    run_dir.mkdir()
    summary = Runner(config, run_dir, show_progress=False).run(on_step=check, on_evaluation=poison_site_2)
    assert summary["dropped_sites"] == [2] and frozen
    healthy = [a for i, a in enumerate(summary["local_accuracy"]) if i != 2]
    assert min(healthy) > 0.4 and summary["aga"] > 0.4  # measured 0.45 and 0.54


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.momentum=0.9", "'train.momentum' = 0.9: must be 0 for gossip.algorithm = 'ad-psgd'"),
        ("gossip.topology=random-one-peer", "must be a fixed graph for gossip.algorithm = 'ad-psgd'"),
        ("network.link_trace=links.csv", "must be empty for gossip.algorithm = 'ad-psgd'"),
    ],
)
def test_ad_psgd_refuses_what_it_does_not_model(small_config, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        small_config("default", *AD_PSGD, override)
