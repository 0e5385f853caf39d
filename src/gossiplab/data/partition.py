"""How a source's samples are spread over sites: iid or Dirichlet label skew, and test sets that follow.

Every function takes a seeded `numpy.random.Generator`, so a partition is a pure function of the
seed, and returns one index array per site; no sample is on two sites.
"""

from __future__ import annotations

import numpy as np


class PartitionError(ValueError):
    """The requested split cannot be made from this data; the message names the fields to change."""


def _check_fill(num_samples: int, num_sites: int, min_site_samples: int) -> None:
    if num_sites * min_site_samples > num_samples:
        raise PartitionError(
            f"num_sites={num_sites} x data.min_site_samples={min_site_samples} exceeds the {num_samples} training "
            f"samples of the source: use at most {num_samples // min_site_samples} sites or fewer samples per site"
        )


def iid(labels: np.ndarray, num_sites: int, min_site_samples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Equal-sized random split (sizes differ by at most one)."""
    _check_fill(len(labels), num_sites, min_site_samples)
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_sites)]


def dirichlet(
    labels: np.ndarray,
    num_sites: int,
    alpha: float,
    min_site_samples: int,
    rng: np.random.Generator,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Per-class Dirichlet label skew (Hsu et al. 2019), as in MAZEL and the single-merge paper.

    For each class c, site shares q_c ~ Dir(alpha * 1_N) split that class's samples; small alpha
    (0.1) leaves most sites dominated by a few classes, large alpha tends to an even spread. The
    draw is repeated until every site holds at least `min_site_samples` samples.
    """
    _check_fill(len(labels), num_sites, min_site_samples)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for site, chunk in enumerate(np.split(members, cuts)):
                parts[site].append(chunk)
        sites = [np.sort(np.concatenate(chunks)) for chunks in parts]
        if min(len(s) for s in sites) >= min_site_samples:
            return sites
    raise PartitionError(
        f"data.alpha={alpha} with num_sites={num_sites}: no draw in {max_tries} gave every site "
        f"data.min_site_samples={min_site_samples} samples; raise data.alpha or lower data.min_site_samples"
    )


def split_test_like(test_labels: np.ndarray, train_counts: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Split the source's test set over sites so each site's test labels follow its train labels.

    Class c's test samples go to sites in proportion to train_counts[:, c], so LocalTestAcc_i is
    measured on site i's own distribution (MAZEL eq. 1), the sites' test sets are disjoint, and
    their union is the global test set (eq. 2).
    """
    num_sites = train_counts.shape[0]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for c in range(train_counts.shape[1]):
        total = train_counts[:, c].sum()
        if total == 0:
            continue
        members = rng.permutation(np.flatnonzero(test_labels == c))
        cuts = np.round(np.cumsum(train_counts[:, c])[:-1] / total * len(members)).astype(np.int64)
        for site, chunk in enumerate(np.split(members, cuts)):
            parts[site].append(chunk)
    return [np.sort(np.concatenate(chunks)) if chunks else np.zeros(0, np.int64) for chunks in parts]
