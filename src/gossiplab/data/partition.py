"""How a source's samples are spread over sites: iid or Dirichlet label skew, and test sets that follow.

Every function takes a seeded `numpy.random.Generator`, so a partition is a pure function of the
seed, and returns one index array per site; no sample is on two sites, except where each site
draws a fixed number of samples from the shared pool (`data.samples_per_site`).
"""

from __future__ import annotations

import numpy as np


class PartitionError(ValueError):
    """The requested split cannot be made from this data; the message names the fields to change."""


def listed_sites(sites: list[int], shown: int = 8) -> str:
    """Sites named in a message: all of a few, else the first `shown` and how many in all (a
    10,000-site run must not print 5,000 numbers)."""
    if len(sites) <= shown:
        return f"sites {sites}"
    return f"{len(sites):,} sites ({', '.join(map(str, sites[:shown]))}, ...)"


def _check_fill(num_samples: int, num_sites: int, min_site_samples: int, val_fraction: float = 0.0) -> None:
    """Every site can get min_site_samples (for training, once a validation share is held out)."""
    usable = num_samples * (1 - val_fraction)
    if num_sites * min_site_samples > usable:
        share = f" training samples after data.val_fraction={val_fraction}" if val_fraction else ""
        raise PartitionError(
            f"num_sites={num_sites} x data.min_site_samples={min_site_samples}{share} exceeds the {num_samples} "
            f"training samples of the source: use at most {int(usable // min_site_samples)} sites or fewer "
            f"samples per site{', or a smaller validation share' if val_fraction else ''}"
        )


def iid(labels: np.ndarray, num_sites: int, min_site_samples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Equal-sized random split (sizes differ by at most one)."""
    _check_fill(len(labels), num_sites, min_site_samples)
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_sites)]


def iid_fixed_size(labels: np.ndarray, num_sites: int, samples_per_site: int, rng: np.random.Generator) -> list:
    """Each site draws `samples_per_site` samples uniformly from the shared pool, without
    replacement within the site and independently of the others: any number of sites (100,000
    sites of 32 samples from Fashion-MNIST's 60,000), with samples shared between sites."""
    if samples_per_site > len(labels):
        raise PartitionError(
            f"data.samples_per_site={samples_per_site} exceeds the {len(labels)} training samples of the source"
        )
    return [np.sort(rng.choice(len(labels), samples_per_site, replace=False)) for _ in range(num_sites)]


def dirichlet(
    labels: np.ndarray,
    num_sites: int,
    alpha: float,
    min_site_samples: int,
    rng: np.random.Generator,
    max_tries: int = 1000,
    val_fraction: float = 0.0,
) -> list[np.ndarray]:
    """Per-class Dirichlet label skew (Hsu et al. 2019), as in MAZEL and the single-merge paper.

    For each class c, site shares q_c ~ Dir(alpha * 1_N) split that class's samples; small alpha
    (0.1) leaves most sites dominated by a few classes, large alpha tends to an even spread. The
    draw is repeated until every site keeps at least `min_site_samples` samples for training once
    `hold_out` has taken its `val_fraction` share.
    """
    _check_fill(len(labels), num_sites, min_site_samples, val_fraction)
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
        if min(len(s) - round(val_fraction * len(s)) for s in sites) >= min_site_samples:
            return sites
    raise PartitionError(
        f"data.alpha={alpha} with num_sites={num_sites}: no draw in {max_tries} gave every site "
        f"data.min_site_samples={min_site_samples} samples; raise data.alpha or lower data.min_site_samples"
    )


def dirichlet_fixed_size(
    labels: np.ndarray, num_sites: int, alpha: float, samples_per_site: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each site draws `samples_per_site` samples with its own class mix q_i ~ Dir(alpha * 1_C).

    The single-merge paper's setting (4096 per agent): class counts are a multinomial draw from
    q_i, samples are drawn without replacement within a site, but sites draw independently, so
    two sites may hold the same sample (the paper's 32 x 4096 exceeds Tiny ImageNet's 100k).
    A class with fewer samples than a site asks for is taken whole, the rest re-drawn from q_i.
    """
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    capacity = np.array([len(m) for m in members])
    if samples_per_site > len(labels):
        raise PartitionError(
            f"data.samples_per_site={samples_per_site} exceeds the {len(labels)} training samples of the source"
        )
    sites = []
    for _ in range(num_sites):
        shares = rng.dirichlet(np.full(len(classes), alpha))
        counts = np.zeros(len(classes), dtype=np.int64)
        while (remaining := samples_per_site - counts.sum()) > 0:
            counts += np.minimum(rng.multinomial(remaining, shares), capacity - counts)
            open_classes = counts < capacity
            shares = np.where(open_classes, shares, 0.0)
            shares = shares / shares.sum() if shares.sum() > 0 else open_classes / open_classes.sum()
        sites.append(
            np.sort(np.concatenate([rng.choice(m, k, replace=False) for m, k in zip(members, counts, strict=True)]))
        )
    return sites


def shards(
    labels: np.ndarray, num_sites: int, classes_per_site: int, shards_per_class: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """L2C's task generation (L2C Fig. 2): every site gets `classes_per_site` classes, one shard each.

    Each of the C classes is cut into P = shards_per_class shards; shard p of every class forms
    group p; each group is shuffled and cut left to right into runs of M = classes_per_site
    shards, one run per site, giving K = C P / M sites, each with exactly M distinct classes.
    """
    classes = np.unique(labels)
    num_classes = len(classes)
    if num_classes % classes_per_site:
        raise PartitionError(
            f"data.classes_per_site={classes_per_site} does not divide the source's {num_classes} classes"
        )
    expected = num_classes * shards_per_class // classes_per_site
    if expected != num_sites:
        raise PartitionError(
            f"shards give K = classes x data.shards_per_class / data.classes_per_site = {num_classes} x "
            f"{shards_per_class} / {classes_per_site} = {expected} sites, but num_sites={num_sites}"
        )
    cut = [np.array_split(rng.permutation(np.flatnonzero(labels == c)), shards_per_class) for c in classes]
    sites = []
    for group in range(shards_per_class):
        order = rng.permutation(num_classes)
        for start in range(0, num_classes, classes_per_site):
            sites.append(np.sort(np.concatenate([cut[c][group] for c in order[start : start + classes_per_site]])))
    return sites


def hold_out(site_indices: list[np.ndarray], fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """Split each site's training indices into (train, validation), `fraction` of each site held out."""
    train, validation = [], []
    for indices in site_indices:
        shuffled = rng.permutation(indices)
        count = round(fraction * len(indices))
        validation.append(np.sort(shuffled[:count]))
        train.append(np.sort(shuffled[count:]))
    return train, validation


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
