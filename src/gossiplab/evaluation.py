"""Evaluation: every model on every site's test set (the accuracy matrix) and the paper metrics."""

from __future__ import annotations

from typing import Any

import torch

from gossiplab import merge, metrics
from gossiplab.communicator import Communicator


def evaluate(experiment: Any, active: torch.Tensor | None, comm: Communicator) -> tuple[dict[str, Any], torch.Tensor]:
    """Every model and the counterfactual merged model (the mean of the active rows, MMGA; an
    algorithm's own merged model, DIMAT's matched one, as `matched_mmga`) on the global test set,
    scored per site (or by L2C's class-weighted rule, `eval.local_test`); sites dropped for divergence (`active` False)
    are left out. Returns the metrics row and the accuracy matrix A[i, j] (model i, site j's test set).

    Across processes (`comm`), each scores its own models, the merged model is a sum over
    processes, and the [N, n_test] hits are gathered so every process computes the same metrics."""
    federation, population = experiment.federation, experiment.population
    theta = population.theta
    active = torch.ones(comm.num_sites, dtype=torch.bool) if active is None else active
    # each test sample is classified in its own site's label space (MAZEL: by that site's names)
    allowed = federation.class_mask()[federation.test_site] if population.class_mask is not None else None

    def hits(rows: torch.Tensor) -> torch.Tensor:
        return (population.predict(rows, federation.test_x, allowed) == federation.test_y).cpu()

    correct = comm.gather(hits(theta))
    mean = merge.merged_model(theta, active, comm)
    merged_correct = hits(mean)
    own_merge = experiment.algorithm.merged_model(active, experiment.state, comm)
    matched_correct = None if own_merge is None else hits(own_merge)
    class_weighted = None
    if experiment.config.eval.local_test == "class-weighted":
        counts = federation.train_label_counts().float()
        class_weighted = (federation.test_y.cpu(), counts / counts.sum(1, keepdim=True).clamp(min=1))
    # per-site squared distances of the parameters, row sums (a reduction over all of [N, P] would
    # split across threads in a thread-count dependent order), gathered: the consensus distance of
    # the active sites
    distances = (population.parameters - mean[:, : population.num_parameters]).square().sum(1)
    consensus = float(comm.gather(distances.cpu())[active].mean())
    return metrics.evaluation_row(
        correct, merged_correct, federation.test_site, consensus, active, class_weighted, matched_correct
    )
