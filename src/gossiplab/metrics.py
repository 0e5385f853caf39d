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


def class_weighted_accuracy_matrix(
    correct: torch.Tensor, test_y: torch.Tensor, site_class_weights: torch.Tensor
) -> torch.Tensor:
    """A [M, N] by L2C's local test rule (L2C section 4): model i scored on *all* the test data of
    the classes in site j's task, each class weighted by its share of site j's training data:
    A[i, j] = sum_c pi_jc acc_c(model i), pi_j = site j's class proportions [N, C]. For shard tasks
    (equal classes per site) this is the accuracy on the whole test set of the site's classes;
    for Dirichlet splits it is what a test set drawn like the site's data would give in expectation."""
    num_classes = site_class_weights.shape[1]
    hits = torch.zeros(len(correct), num_classes).index_add_(1, test_y, correct.float())
    per_class = hits / torch.bincount(test_y, minlength=num_classes).clamp(min=1).float()
    return per_class @ site_class_weights.T


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
    class_weighted: tuple[torch.Tensor, torch.Tensor] | None = None,
    matched_correct: torch.Tensor | None = None,
) -> tuple[dict[str, float | list[float | None]], torch.Tensor]:
    """All metrics of one evaluation, and the accuracy matrix they come from.

    correct: [N, n_test] hits of every site's model on the global test set;
    merged_correct: [1, n_test] hits of the counterfactual merged model, the uniform mean of the
    active rows (MMGA, Definition 1);
    consensus: the active sites' `consensus_distance` (computed where their parameters are);
    active: sites still in the run (all by default); dropped sites' models are left out of every
    metric, while their test data stays part of the global test set;
    class_weighted: (test_y, site class proportions [N, C]): local accuracies by L2C's rule
    (`class_weighted_accuracy_matrix`) instead of each site's own share of the test set;
    matched_correct: [1, n_test] hits of an algorithm's own merged model (DIMAT's matched merge),
    reported beside MMGA as `matched_mmga`.
    """
    num_sites = len(correct)
    active = torch.ones(num_sites, dtype=torch.bool) if active is None else active

    def scores(hits: torch.Tensor) -> torch.Tensor:
        if class_weighted is None:
            return accuracy_matrix(hits, test_site, num_sites)
        return class_weighted_accuracy_matrix(hits, *class_weighted)

    matrix = scores(correct)
    local = matrix.diagonal()[active]
    ala = float(local.mean())
    aga = float(global_accuracy(correct[active]).mean())
    mmga = float(global_accuracy(merged_correct)[0])
    merged_local = scores(merged_correct)[0]
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
    if matched_correct is not None:
        row["matched_mmga"] = float(global_accuracy(matched_correct)[0])
    return row, matrix


def convergence_step(steps: list[int], values: list[float], fraction: float = 0.95) -> int | None:
    """First evaluated step at which a metric reaches `fraction` of its best value in the run."""
    if not values:
        return None
    best = max(values)
    return next(s for s, v in zip(steps, values, strict=True) if v >= fraction * best)
