"""The per-site reference: plain nn.Module copies, torch.optim, and a Python loop over sites.

This is what the papers' own code does; the vectorized engine must reproduce it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

TORCH_OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05),
    "momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3, weight_decay=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2),
}


def state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters, then floating buffers and BatchNorm's counter: a population row's layout."""
    buffers = [b for name, b in model.named_buffers() if b.is_floating_point() or name.endswith("num_batches_tracked")]
    return [*model.parameters(), *buffers]


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().to(torch.get_default_dtype()).flatten() for t in state_tensors(model)])


def load_flat(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for t in state_tensors(model):
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def reference_training(
    module: nn.Module,
    initial: torch.Tensor,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    optimizer: str,
    mixing: list[torch.Tensor | None],
    random_streams: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Train N independent copies site by site in train mode; after step t, gossip with mixing[t]
    if given. With `random_streams` (one CPU generator state per site), site i's random layers
    draw from stream i, which it advances.

    Gossip mixes each floating tensor of each model's state dict (parameters and BatchNorm
    statistics) from the others', one by one; BatchNorm's step counter is the same on every site
    and is kept. Returns the final flat states [N, P + B] and each step's per-site losses.
    """
    models = [copy.deepcopy(module).train() for _ in range(len(initial))]
    for model, row in zip(models, initial, strict=True):
        load_flat(model, row)
    optimizers = [TORCH_OPTIMIZERS[optimizer](model.parameters()) for model in models]
    streams = None if random_streams is None else random_streams.clone()
    losses = []
    for (x, y), weights in zip(batches, mixing, strict=True):
        step_losses = []
        for i, (model, opt) in enumerate(zip(models, optimizers, strict=True)):
            opt.zero_grad()
            with torch.random.fork_rng(devices=[]):
                if streams is not None:
                    torch.set_rng_state(streams[i].clone())
                loss = F.cross_entropy(model(x[i]), y[i])
                if streams is not None:
                    streams[i] = torch.get_rng_state()
            loss.backward()
            opt.step()
            step_losses.append(loss.detach())
        losses.append(torch.stack(step_losses))
        if weights is not None:
            states = [copy.deepcopy(model.state_dict()) for model in models]
            for i, model in enumerate(models):
                mixed = {
                    k: sum(weights[i, j] * states[j][k] for j in range(len(models)))
                    if states[i][k].is_floating_point()
                    else states[i][k]
                    for k in states[i]
                }
                model.load_state_dict(mixed)
    return torch.stack([flat_parameters(m) for m in models]), losses
