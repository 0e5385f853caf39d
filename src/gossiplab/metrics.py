"""The papers' metrics, all computed from the accuracy matrix and the merged model's predictions.

A[i, j] = accuracy of model i on site j's test set (MAZEL eq. 1 when i = j). Sites' test sets
are disjoint and their union is the global test set, so GlobalTestAcc (eq. 2) of a model is its
accuracy over all test samples, i.e. the test-size weighted mean of its row of A.
"""

from __future__ import annotations

import math

import torch


def accuracy_matrix(correct: torch.Tensor, test_site: torch.Tensor, num_sites: int) -> torch.Tensor:
    """A [M, N] from correct [M, n_test] (bool) and the owning site of each test sample."""
    hits = torch.zeros(len(correct), num_sites).index_add_(1, test_site, correct.float())
    counts = torch.bincount(test_site, minlength=num_sites).float()
    return hits / counts


def global_accuracy(correct: torch.Tensor) -> torch.Tensor:
    """GlobalTestAcc of each model [M]: accuracy over the union of all sites' test sets (eq. 2)."""
    return correct.float().mean(1)


def consensus_distance(theta: torch.Tensor) -> float:
    """(1/N) sum_i ||theta_i - theta_bar||^2: how far the sites' models are from agreement."""
    return float((theta - theta.mean(0, keepdim=True)).square().sum(1).mean())


def worst_fraction_mean(values: torch.Tensor, fraction: float) -> float:
    """Mean of the lowest ceil(fraction * N) values (L2C's worst-10% / worst-20% fairness metrics)."""
    count = max(1, math.ceil(fraction * len(values)))
    return float(values.sort().values[:count].mean())


def gossip_gain(mmga: float, aga: float) -> float:
    """MAZEL Definition 2: GG = (MMGA / AGA - 1) x 100%."""
    return (mmga / aga - 1.0) * 100.0 if aga > 0 else float("nan")


def evaluation_row(
    correct: torch.Tensor,
    merged_correct: torch.Tensor,
    test_site: torch.Tensor,
    consensus: float,
    active: torch.Tensor | None = None,
) -> tuple[dict[str, float | list[float | None]], torch.Tensor]:
    """All metrics of one evaluation, and the accuracy matrix they come from.

    correct: [N, n_test] hits of every site's model on the global test set;
    merged_correct: [1, n_test] hits of the counterfactual merged model (mean of the active rows);
    consensus: the active sites' `consensus_distance` (computed where their parameters are);
    active: sites still in the run (all by default); dropped sites' models are left out of every
    metric, while their test data stays part of the global test set.
    """
    num_sites = len(correct)
    active = torch.ones(num_sites, dtype=torch.bool) if active is None else active
    matrix = accuracy_matrix(correct, test_site, num_sites)
    local = matrix.diagonal()[active]
    ala = float(local.mean())
    aga = float(global_accuracy(correct[active]).mean())
    mmga = float(global_accuracy(merged_correct)[0])
    merged_local = accuracy_matrix(merged_correct, test_site, num_sites)[0]
    row: dict[str, float | list[float]] = {
        "ala": ala,
        "aga": aga,
        "mmga": mmga,
        "ala_aga_mean": (ala + aga) / 2,
        "gossip_gain": gossip_gain(mmga, aga),
        "consensus_distance": consensus,
        "worst10_local": worst_fraction_mean(local, 0.1),
        "worst20_local": worst_fraction_mean(local, 0.2),
        "std_local": float(local.std()) if len(local) > 1 else 0.0,
        "merged_ala": float(merged_local[active].mean()),
        "local_accuracy": [float(a) if keep else None for a, keep in zip(matrix.diagonal(), active, strict=True)],
    }
    return row, matrix


def convergence_step(steps: list[int], values: list[float], fraction: float = 0.95) -> int | None:
    """First evaluated step at which a metric reaches `fraction` of its best value in the run."""
    if not values:
        return None
    best = max(values)
    return next(s for s, v in zip(steps, values, strict=True) if v >= fraction * best)
