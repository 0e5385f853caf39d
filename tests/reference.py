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


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def load_flat(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def reference_training(
    module: nn.Module,
    initial: torch.Tensor,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    optimizer: str,
    mixing: list[torch.Tensor | None],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Train N independent copies site by site; after step t, gossip with mixing[t] if given.

    Gossip mixes each parameter tensor of each model from the others' state dicts, one by one.
    Returns the final flat parameters [N, P] and each step's per-site losses.
    """
    models = [copy.deepcopy(module) for _ in range(len(initial))]
    for model, row in zip(models, initial, strict=True):
        load_flat(model, row)
    optimizers = [TORCH_OPTIMIZERS[optimizer](model.parameters()) for model in models]
    losses = []
    for (x, y), weights in zip(batches, mixing, strict=True):
        step_losses = []
        for i, (model, opt) in enumerate(zip(models, optimizers, strict=True)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[i]), y[i])
            loss.backward()
            opt.step()
            step_losses.append(loss.detach())
        losses.append(torch.stack(step_losses))
        if weights is not None:
            states = [copy.deepcopy(model.state_dict()) for model in models]
            for i, model in enumerate(models):
                mixed = {k: sum(weights[i, j] * states[j][k] for j in range(len(models))) for k in states[i]}
                model.load_state_dict(mixed)
    return torch.stack([flat_parameters(m) for m in models]), losses
