"""Evaluation: every model on every site's test set (the accuracy matrix) and the paper metrics."""

from __future__ import annotations

from typing import Any

import torch

from gossiplab import merge, metrics
from gossiplab.distributed import SingleProcess


def evaluate(
    experiment: Any, active: torch.Tensor | None = None, comm: Any = None
) -> tuple[dict[str, Any], torch.Tensor]:
    """Every model and the counterfactual merged model (the algorithm's, else the mean of the active
    rows) on the global test set, scored per site; sites dropped for divergence (`active` False)
    are left out. Returns the metrics row and the accuracy matrix A[i, j] (model i, site j's test set).

    Across processes (`comm`), each scores its own models, the merged model is a sum over
    processes, and the [N, n_test] hits are gathered so every process computes the same metrics."""
    federation, population = experiment.federation, experiment.population
    comm = comm or SingleProcess(len(population.theta))
    theta = population.theta
    active = torch.ones(comm.num_sites, dtype=torch.bool) if active is None else active
    # each test sample is classified in its own site's label space (MAZEL: by that site's names)
    allowed = federation.class_mask()[federation.test_site] if population.class_mask is not None else None
    correct = comm.gather((population.predict(theta, federation.test_x, allowed) == federation.test_y).cpu())
    mean = merge.merged_model(theta, active, comm)
    merged = experiment.algorithm.merged_model(active, experiment.state, comm)
    merged = mean if merged is None else merged
    merged_correct = (population.predict(merged, federation.test_x, allowed) == federation.test_y).cpu()
    # per-site squared distances of the parameters, row sums (a reduction over all of [N, P] would
    # split across threads in a thread-count dependent order), gathered: the consensus distance of
    # the active sites
    distances = (population.parameters - mean[:, : population.num_parameters]).square().sum(1)
    consensus = float(comm.gather(distances.cpu())[active].mean())
    return metrics.evaluation_row(correct, merged_correct, federation.test_site, consensus, active)
