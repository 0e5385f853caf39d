"""Seconds per gossip round: gossipy (one Python object per node) against gossiplab's [N, P] loop,
on the same workload, measured in one process, alternating (docs/performance.md quotes it).

Workload: N sites of Fashion-MNIST (IID), the MLP 784-200-200-10 (199,210 parameters), batch 32.
Each round every online site averages its model with one neighbour's and takes one SGD step;
half the messages are lost, sites churn. gossipy: GossipSimulator, PUSH protocol, MERGE_UPDATE,
one batch per update (local_epochs=0), drop_prob=0.5, online_prob=0.83, delta=1 time unit per
round, no evaluation. gossiplab: `gossiplab bench --network`'s "churn + loss" variant (random
one-peer DSGD every step, churn 0.01/0.05, loss 0.5), its steps timed the same way.

Under churn and loss gossipy updates a node only when a message reaches it (about 41% of the
nodes per round here), while gossiplab computes every site's gradient and puts the offline sites'
rows back; the reliable rows are the like-for-like comparison (every node one step and one merge).

Not run by the test suite: it needs gossipy-dfl 0.0.1 from PyPI beside gossiplab (and its
dependencies dill and scikit-learn); gossipy imports torchvision only for its dataset downloaders,
which this script does not use. Run: python benchmarks/gossipy_comparison.py --sites 16,64,256
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from gossipy import CACHE, set_seed
from gossipy.core import AntiEntropyProtocol, ConstantDelay, CreateModelMode, StaticP2PNetwork
from gossipy.data import DataDispatcher
from gossipy.data.handler import ClassificationDataHandler
from gossipy.model import TorchModel
from gossipy.model.handler import TorchModelHandler
from gossipy.node import GossipNode
from gossipy.simul import GossipSimulator

from gossiplab.bench_network import CHURN_AND_LOSS, seconds_per_step
from gossiplab.catalogue import build_config
from gossiplab.data.federation import build_federation


class MLP(TorchModel):
    """gossiplab's default model, 784-200-200-10, as gossipy's model type."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(784, 200),
            torch.nn.ReLU(),
            torch.nn.Linear(200, 200),
            torch.nn.ReLU(),
            torch.nn.Linear(200, 10),
        )

    def forward(self, x):
        return self.net(x)

    def init_weights(self, *args, **kwargs) -> None:
        pass


def gossipy_seconds_per_round(sites: int, rounds: int, lossy: bool, warmup: int = 2) -> float:
    """gossipy's seconds per round on the default experiment's data (IID over `sites` nodes)."""
    set_seed(0)
    config = build_config("default", [f"num_sites={sites}", "data.partition=iid"])
    federation = build_federation(config)
    x = federation.normalise(federation.pool_x[federation.train_index]).reshape(-1, 784)
    y = federation.pool_y[federation.train_index]
    handler = ClassificationDataHandler(x, y, test_size=0)
    dispatcher = DataDispatcher(handler, n=sites, eval_on_user=False, auto_assign=False)
    owners = np.repeat(np.arange(sites), federation.train_sizes.numpy())
    dispatcher.set_assignments([list(np.nonzero(owners == s)[0]) for s in range(sites)], None)
    network = StaticP2PNetwork(sites, None)
    nodes = {}
    for site in range(sites):
        model_handler = TorchModelHandler(
            net=MLP(),
            optimizer=torch.optim.SGD,
            optimizer_params={"lr": 0.05, "momentum": 0.9},
            criterion=torch.nn.functional.cross_entropy,
            local_epochs=0,
            batch_size=32,
            create_model_mode=CreateModelMode.MERGE_UPDATE,
        )
        nodes[site] = GossipNode(site, dispatcher[site], 1, model_handler, network, sync=True)
    simulator = GossipSimulator(
        nodes,
        dispatcher,
        delta=1,
        protocol=AntiEntropyProtocol.PUSH,
        drop_prob=0.5 if lossy else 0.0,
        online_prob=0.83 if lossy else 1.0,
        delay=ConstantDelay(0),
    )
    simulator.init_nodes()
    simulator.start(n_rounds=warmup)
    started = time.perf_counter()
    simulator.start(n_rounds=rounds)
    seconds = (time.perf_counter() - started) / rounds
    CACHE.clear()
    return seconds


def main(sites_list: list[int], rounds: int, repeats: int) -> None:
    """One line per (N, network): both libraries' median ms per round and the ratio."""
    for sites in sites_list:
        for lossy in (False, True):
            ours, theirs = [], []
            for _ in range(repeats):
                common = [
                    f"num_sites={sites}",
                    f"train.steps={rounds + 5}",
                    f"eval.every={rounds + 5}",
                    "gossip.every=1",
                    "data.partition=iid",
                    "gossip.topology=random-one-peer",
                    *(CHURN_AND_LOSS if lossy else []),
                ]
                ours.append(seconds_per_step(common, rounds + 5))
                theirs.append(gossipy_seconds_per_round(sites, rounds, lossy))
            a, b = statistics.median(ours), statistics.median(theirs)
            print(
                f"N={sites} {'churn+loss' if lossy else 'reliable'}: gossiplab {1e3 * a:.1f} ms/round, "
                f"gossipy {1e3 * b:.1f} ms/round, ratio {b / a:.1f}x",
                flush=True,
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="16,64,256", help="numbers of sites, comma-separated")
    parser.add_argument("--rounds", type=int, default=20, help="rounds timed per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per row (the median is shown)")
    arguments = parser.parse_args()
    main([int(s) for s in arguments.sites.split(",")], arguments.rounds, arguments.repeats)
