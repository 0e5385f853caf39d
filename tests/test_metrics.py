"""The paper metrics against values computed by hand."""

from __future__ import annotations

import pytest
import torch

from gossiplab.metrics import (
    Scoring,
    consensus_distance,
    convergence_step,
    evaluation_row,
    gossip_gain,
    worst_fraction_mean,
)


def scored(correct: torch.Tensor, merged: torch.Tensor, test_site: torch.Tensor, consensus: float):
    """The metrics row and A of hits `correct` [N, n_test] (site i's model in row i)."""
    num_sites = len(correct)
    test = Scoring(torch.zeros_like(test_site), test_site, num_sites, 1)
    sites = torch.arange(num_sites)
    hits = test.hits(correct, sites, sites)
    return evaluation_row(test, hits, test.hits(merged, torch.tensor([-1]), sites), consensus)


def test_metrics_match_hand_computed_values():
    # Two sites: site 0 owns test samples 0-3, site 1 owns samples 4-5.
    test_site = torch.tensor([0, 0, 0, 0, 1, 1])
    correct = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0],  # model 0: 3/4 on site 0, 0/2 on site 1, 3/6 global
            [0, 1, 0, 0, 1, 1],  # model 1: 1/4 on site 0, 2/2 on site 1, 3/6 global
        ],
        dtype=torch.bool,
    )
    merged = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)  # 5/6 global
    theta = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    row, matrix = scored(correct, merged, test_site, consensus_distance(theta))
    torch.testing.assert_close(matrix, torch.tensor([[0.75, 0.0], [0.25, 1.0]]))
    assert row["ala"] == pytest.approx((0.75 + 1.0) / 2)
    assert row["aga"] == pytest.approx(0.5)
    assert row["mmga"] == pytest.approx(5 / 6)
    assert row["ala_aga_mean"] == pytest.approx((0.875 + 0.5) / 2)
    assert row["gossip_gain"] == pytest.approx((5 / 6 / 0.5 - 1) * 100)
    assert row["consensus_distance"] == pytest.approx(1.0)  # each row is 1 away from the mean (1, 0)
    assert row["merged_ala"] == pytest.approx((1.0 + 0.5) / 2)
    assert row["worst10_local"] == pytest.approx(0.75)
    assert row["local_accuracy"] == pytest.approx([0.75, 1.0])


def test_global_accuracy_is_test_size_weighted_not_a_mean_of_site_accuracies():
    test_site = torch.tensor([0, 1, 1, 1])
    correct = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    row, matrix = scored(correct, correct[:1], test_site, 0.0)
    assert matrix.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert row["aga"] == pytest.approx(0.25)


def test_small_helpers():
    assert gossip_gain(0.6, 0.5) == pytest.approx(20.0)
    assert consensus_distance(torch.ones(4, 3)) == 0.0
    assert worst_fraction_mean(torch.tensor([0.9, 0.1, 0.5, 0.7] * 5), 0.1) == pytest.approx(0.1)
    assert worst_fraction_mean(torch.tensor([0.2, 0.4, 0.9]), 0.1) == pytest.approx(0.2)
    assert convergence_step([0, 10, 20, 30], [0.1, 0.5, 0.96, 1.0]) == 20
