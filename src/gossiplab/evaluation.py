"""Evaluation: every model on every site's test set (the accuracy matrix) and the paper metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gossiplab import merge, metrics
from gossiplab.communicator import Communicator

LOGITS_PER_CHUNK = 2**24  # models x test samples x classes scored at once: 64 MB of float32 logits
ROW_BLOCK_FLOATS = 2**24  # per-row reductions of [N, P] run on blocks of rows this size: no [N, P] temporary


def per_row(values: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """reduce(block) [rows] over blocks of rows of `values` [N, P], concatenated [N]: a reduction
    of each row that never makes an [N, P] temporary (1.4 GB at 30,000 sites of a linear head)."""
    rows = max(1, ROW_BLOCK_FLOATS // max(1, values.shape[1]))
    return torch.cat([reduce(values[start : start + rows]) for start in range(0, len(values), rows)])


def buffer_bytes(num_sites: int, num_classes: int) -> int:
    """What an evaluation holds (the memory estimate): the reduced hits of every model [N, C + 1 + S]
    (and their gathered copy), and a chunk's logits, predictions and hits."""
    columns = len(metrics.matrix_sites(num_sites))
    return 2 * 4 * num_sites * (num_classes + 1 + columns) + 3 * 4 * LOGITS_PER_CHUNK


def evaluate(experiment: Any, active: torch.Tensor | None, comm: Communicator) -> tuple[dict[str, Any], torch.Tensor]:
    """Every model and the counterfactual merged model (the mean of the active rows, MMGA; an
    algorithm's own merged model, DIMAT's matched one, as `matched_mmga`) on the global test set,
    scored per site (or by L2C's class-weighted rule, `eval.local_test`); sites dropped for divergence (`active` False)
    are left out. Returns the metrics row and the accuracy matrix A[i, j] (model i, site j's test
    set) over `metrics.matrix_sites` (every site up to 1,024).

    Models are classified a chunk at a time and their hits reduced at once (`metrics.Hits`), so
    memory stays O(N (C + S)) however many sites. Across processes (`comm`), each scores its own
    models, the merged model is a sum over processes, and the reduced hits are gathered so every
    process computes the same metrics."""
    federation, population = experiment.federation, experiment.population
    theta = population.theta
    num_sites = comm.num_sites
    active = torch.ones(num_sites, dtype=torch.bool) if active is None else active
    # each test sample is classified in its own site's label space (MAZEL: by that site's names)
    allowed = federation.class_mask()[federation.test_site] if population.class_mask is not None else None
    class_weights = None
    if experiment.config.eval.local_test == "class-weighted":
        counts = federation.train_label_counts().float()
        class_weights = counts / counts.sum(1, keepdim=True).clamp(min=1)
    test = metrics.Scoring(
        federation.test_y.cpu(), federation.test_site.cpu(), num_sites, federation.num_classes, class_weights
    )
    test_y = federation.test_y

    def hits(rows: torch.Tensor, owners: torch.Tensor, columns: torch.Tensor) -> metrics.Hits:
        chunk = max(1, LOGITS_PER_CHUNK // max(1, len(test_y) * federation.num_classes))
        return metrics.Hits.cat([
            test.hits((population.predict(rows[start : start + chunk], federation.test_x, allowed) == test_y).cpu(),
                      owners[start : start + chunk], columns)
            for start in range(0, len(rows), chunk)
        ])  # fmt: skip

    merged_owner, sites = torch.tensor([-1]), torch.arange(num_sites)
    mine = hits(theta, sites[comm.sites], metrics.matrix_sites(num_sites))
    gathered = metrics.Hits(*(comm.gather(part) for part in (mine.per_class, mine.own_site, mine.per_site)))
    mean = merge.merged_model(theta, active, comm)
    merged = hits(mean, merged_owner, sites)
    own_merge = experiment.algorithm.merged_model(active, experiment.state, comm)
    matched = None if own_merge is None else hits(own_merge, merged_owner, sites[:0])
    # per-site squared distances of the parameters, row sums (a reduction over all of [N, P] would
    # split across threads in a thread-count dependent order), gathered: the consensus distance of
    # the active sites
    center = mean[:, : population.num_parameters]
    distances = per_row(population.parameters, lambda block: (block - center).square_().sum(1))
    consensus = float(comm.gather(distances.cpu())[active].mean())
    return metrics.evaluation_row(test, gathered, merged, consensus, active, matched)
