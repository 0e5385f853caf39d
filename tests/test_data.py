"""Partitions and the federation, on the real Fashion-MNIST data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gossiplab.config import build_config
from gossiplab.data import partition
from gossiplab.data.federation import build_federation
from gossiplab.data.sources import SourceMissingError, load_fashion_mnist, load_source


def test_fashion_mnist_loads_with_its_class_names():
    data = load_source("fashion-mnist")
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
    assert abs(float(data.train_x.mean())) < 1e-3


def test_missing_source_names_the_install_command(tmp_path):
    with pytest.raises(SourceMissingError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path))


def test_dirichlet_partition_is_disjoint_complete_skewed_and_seeded():
    labels = load_source("fashion-mnist").train_y.numpy()
    sites = partition.dirichlet(labels, 16, 0.1, 64, np.random.default_rng(0))
    joined = np.concatenate(sites)
    assert len(joined) == len(labels) == len(np.unique(joined))
    assert min(len(s) for s in sites) >= 64
    top2_share = [np.sort(np.bincount(labels[s], minlength=10))[-2:].sum() / len(s) for s in sites]
    assert np.median(top2_share) > 0.8  # most sites dominated by two classes
    even = partition.dirichlet(labels, 16, 1000.0, 64, np.random.default_rng(0))
    assert max(np.sort(np.bincount(labels[s], minlength=10))[-2:].sum() / len(s) for s in even) < 0.25
    again = partition.dirichlet(labels, 16, 0.1, 64, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(sites, again, strict=True))


def test_iid_partition_sizes_add_up():
    sites = partition.iid(np.arange(103), 10, 1, np.random.default_rng(0))
    assert sorted(len(s) for s in sites) == [10] * 7 + [11] * 3
    assert len(np.unique(np.concatenate(sites))) == 103


def test_each_site_test_set_follows_its_training_labels_and_their_union_is_the_test_split():
    federation = build_federation(build_config("default"))
    counts = federation.train_label_counts().float()
    assert len(federation.test_y) == 10000
    for site in range(federation.num_sites):
        test_counts = torch.bincount(federation.test_y[federation.test_site == site], minlength=10).float()
        train_share, test_share = counts[site] / counts[site].sum(), test_counts / test_counts.sum()
        assert (train_share - test_share).abs().max() < 0.05


def test_batches_come_only_from_each_sites_own_samples():
    federation = build_federation(build_config("default"))
    x, y = federation.sample_batch(64, torch.Generator().manual_seed(0))
    assert x.shape == (16, 64, 1, 28, 28) and y.shape == (16, 64)
    counts = federation.train_label_counts()
    for site in range(16):
        assert (counts[site][y[site]] > 0).all()


def test_more_sites_than_samples_is_refused_with_the_fields_named():
    with pytest.raises(partition.PartitionError, match=r"num_sites=70000 x data.min_site_samples=64"):
        build_federation(build_config("default", ["num_sites=70000"]))
