"""(f) The whole of D-PSGD (Lian et al. 2017) in one readable loop, with no engine: one nn.Module and
one torch.optim.SGD per site, a Python loop over sites, and gossip theta_i <- sum_j W_ij theta_j.
It borrows only gossiplab's data, graphs and initialisation, and ends where `gossiplab.run` of the
same config ends (tests/test_examples.py checks it to 1e-5), so the library's stacked [N, P]
engine is this loop, vectorized."""

import copy

import torch
import torch.nn.functional as F

from gossiplab.data.federation import build_federation
from gossiplab.mixing import uniform
from gossiplab.models import build_model
from gossiplab.population import initial_parameters
from gossiplab.schedule import GossipSchedule
from gossiplab.topology import build_adjacency


def dsgd_from_scratch(config) -> torch.Tensor:
    """Train every site of `config` (an MLP, SGD with momentum, uniform W) as the papers' code
    does; returns the final parameters, one row per site."""
    federation = build_federation(config)
    model = build_model(config.model, federation.image_shape, federation.num_classes)
    torch.nn.utils.vector_to_parameters(initial_parameters(model, config.seed), model.parameters())
    models = [copy.deepcopy(model) for _ in range(config.num_sites)]
    train = config.train
    optimizers = [torch.optim.SGD(m.parameters(), lr=train.lr, momentum=train.momentum) for m in models]
    schedule = GossipSchedule.from_config(config.gossip, train.steps, config.seed)
    generator = torch.Generator().manual_seed(config.seed)  # every site's batch indices, step by step
    for step in range(1, train.steps + 1):
        x, y = federation.sample_batch(train.batch_size, generator)  # [N, B, ...]: site i's own data
        for i, (m, optimizer) in enumerate(zip(models, optimizers, strict=True)):
            optimizer.zero_grad()
            F.cross_entropy(m(x[i]), y[i]).backward()
            optimizer.step()
        if schedule.gossips_at(step):  # one gossip round: W of this round's graph
            round_index = schedule.rounds_until(step) - 1
            graph = build_adjacency(config.gossip.topology, config.num_sites, round_index, config.seed)
            theta = torch.stack([torch.nn.utils.parameters_to_vector(m.parameters()) for m in models])
            mixed = uniform(graph) @ theta
            for m, row in zip(models, mixed, strict=True):
                torch.nn.utils.vector_to_parameters(row, m.parameters())
    return torch.stack([torch.nn.utils.parameters_to_vector(m.parameters()).detach() for m in models])
