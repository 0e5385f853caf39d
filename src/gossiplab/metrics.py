"""The papers' metrics, computed from the models' hits on the global test set and the merged model's.

A[i, j] = accuracy of model i on site j's test set (MAZEL eq. 1 when i = j). Sites' test sets
are disjoint and their union is the global test set, so GlobalTestAcc (eq. 2) of a model is its
accuracy over all test samples, i.e. the test-size weighted mean of its row of A. Every metric
needs only A's diagonal and each model's hits per class, so an evaluation keeps those (`Hits`)
and A itself over at most MATRIX_SITES sites: O(N (C + S)) memory, not O(N^2), at 100,000 sites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MATRIX_SITES = 1024  # the whole accuracy matrix A is kept (saved, plotted) up to this many sites
MATRIX_SAMPLE = 256  # beyond, A over this many evenly spaced sites (A is N x N: 40 GB at 100,000)


def matrix_sites(num_sites: int) -> torch.Tensor:
    """The sites whose rows and columns of A an evaluation keeps: all of them up to MATRIX_SITES,
    else MATRIX_SAMPLE evenly spaced ones (0, N/S, 2N/S, ...: spread over partitions that number
    their sites by domain)."""
    if num_sites <= MATRIX_SITES:
        return torch.arange(num_sites)
    return torch.arange(MATRIX_SAMPLE) * num_sites // MATRIX_SAMPLE


@dataclass(frozen=True)
class Scoring:
    """Who owns each global test sample and its class, and how each site's local accuracy is scored:
    on its own share of the test set, or (class_weights [N, C], L2C's rule) on all test samples of
    each class weighted by the site's class proportions."""

    test_y: torch.Tensor
    test_site: torch.Tensor
    num_sites: int
    num_classes: int
    class_weights: torch.Tensor | None = None

    def hits(self, correct: torch.Tensor, owners: torch.Tensor, columns: torch.Tensor) -> Hits:
        """What `Hits` keeps of models' hits `correct` [M, n_test] (bool); owners [M]: the site
        whose model each row is (-1 for none: a merged model); columns: the sites whose test
        shares are counted one by one."""
        counted = correct.float()
        per_class = torch.zeros(len(correct), self.num_classes).index_add_(1, self.test_y, counted)
        mine = owners[:, None] == self.test_site[None, :]
        own_site = (correct & mine).sum(1).float()
        column = torch.full((self.num_sites,), -1, dtype=torch.long)
        column[columns] = torch.arange(len(columns))
        wanted = column[self.test_site]
        keep = wanted >= 0
        per_site = torch.zeros(len(correct), len(columns)).index_add_(1, wanted[keep], counted[:, keep])
        return Hits(per_class, own_site, per_site)

    def local_accuracy(self, hits: Hits, owners: torch.Tensor) -> torch.Tensor:
        """LocalTestAcc [M] of each row on its own site `owners[m]` (MAZEL eq. 1), or by class."""
        if self.class_weights is None:
            sizes = torch.bincount(self.test_site, minlength=self.num_sites).float()
            return hits.own_site / sizes[owners]
        return (self._per_class_accuracy(hits) * self.class_weights[owners]).sum(1)

    def matrix(self, hits: Hits, columns: torch.Tensor) -> torch.Tensor:
        """`A[m, s]`, `[M, S]`: each row's accuracy on the sites `columns` (the sites `hits.per_site` counts)."""
        if self.class_weights is None:
            return hits.per_site / torch.bincount(self.test_site, minlength=self.num_sites)[columns].float()
        return self._per_class_accuracy(hits) @ self.class_weights[columns].T

    def global_accuracy(self, hits: Hits) -> torch.Tensor:
        """GlobalTestAcc of each row [M]: accuracy over the union of all sites' test sets (eq. 2)."""
        return hits.per_class.sum(1) / len(self.test_y)

    def _per_class_accuracy(self, hits: Hits) -> torch.Tensor:
        return hits.per_class / torch.bincount(self.test_y, minlength=self.num_classes).clamp(min=1).float()


@dataclass(frozen=True)
class Hits:
    """What an evaluation keeps of M models' hits on the global test set: per class [M, C], on the
    model's own site's share [M], and per site for a set of sites [M, S]. Every metric follows from
    these in O(M (C + S)) memory, where the hits themselves are [M, n_test] and A is [M, N]."""

    per_class: torch.Tensor
    own_site: torch.Tensor
    per_site: torch.Tensor

    @staticmethod
    def cat(parts: list[Hits]) -> Hits:
        return Hits(*(torch.cat([getattr(p, name) for p in parts]) for name in ("per_class", "own_site", "per_site")))

    def rows(self, index: torch.Tensor) -> Hits:
        return Hits(self.per_class[index], self.own_site[index], self.per_site[index])


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
    test: Scoring,
    hits: Hits,
    merged: Hits,
    consensus: float,
    active: torch.Tensor | None = None,
    matched: Hits | None = None,
) -> tuple[dict[str, float | list[float | None]], torch.Tensor]:
    """All metrics of one evaluation, and the accuracy matrix over `matrix_sites`.

    hits: every site's model, in site order, counted per site over `matrix_sites(N)`;
    merged: the counterfactual merged model (the uniform mean of the active rows: MMGA,
    Definition 1), counted per site over every site;
    consensus: the active sites' `consensus_distance` (computed where their parameters are);
    active: sites still in the run (all by default); dropped sites' models are left out of every
    metric, while their test data stays part of the global test set;
    matched: an algorithm's own merged model (DIMAT's matched merge), reported as `matched_mmga`.
    """
    num_sites = test.num_sites
    active = torch.ones(num_sites, dtype=torch.bool) if active is None else active
    sites, columns = torch.arange(num_sites), matrix_sites(num_sites)
    every_local = test.local_accuracy(hits, sites)
    local = every_local[active]
    ala = float(local.mean())
    aga = float(test.global_accuracy(hits)[active].mean())
    mmga = float(test.global_accuracy(merged)[0])
    merged_local = test.matrix(merged, sites)[0]
    row: dict[str, float | list[float | None]] = {
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
        "local_accuracy": [float(a) if keep else None for a, keep in zip(every_local, active, strict=True)],
    }
    if matched is not None:
        row["matched_mmga"] = float(test.global_accuracy(matched)[0])
    return row, test.matrix(hits.rows(columns), columns)


def convergence_step(steps: list[int], values: list[float], fraction: float = 0.95) -> int | None:
    """First evaluated step at which a metric reaches `fraction` of its best value in the run."""
    if not values:
        return None
    best = max(values)
    return next(s for s, v in zip(steps, values, strict=True) if v >= fraction * best)
