"""Sources, partitions and federations, on the real bundled data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gossiplab.catalogue import build_config
from gossiplab.data import partition
from gossiplab.data.federation import build_federation, to_shape
from gossiplab.data.sources import SOURCES, SourceMissingError, load_fashion_mnist, load_source, package_file

EXPECTED = {  # name: (train, test, first class, last class)
    "fashion-mnist": (60000, 10000, "T-shirt/top", "Ankle boot"),
    "mnist-5k": (4000, 1000, "0", "9"),
    "animal-silhouettes": (8000, 2000, "Bear", "Zebra"),
    "digits-8x8": (1438, 359, "0", "9"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_registered_sources_load_with_sizes_and_class_names(name):
    data = load_source(name)
    train, test, first, last = EXPECTED[name]
    assert (len(data.train_y), len(data.test_y)) == (train, test)
    assert data.class_names[0] == first and data.class_names[-1] == last and data.num_classes == 10
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape[1] == 1
    assert data.train_x.float().std() > 20  # real images, not blank
    counts = torch.bincount(torch.cat([data.train_y, data.test_y]))
    assert counts.min() >= 0.7 * counts.max()  # every source is class balanced


def test_font_letters_are_rendered_from_many_typefaces_with_unseen_test_typefaces():
    data = load_source("font-letters")
    assert data.class_names == tuple("ABCDEFGHIJ")
    assert len(data.train_y) > 10 * 12 * 50 and len(data.test_y) > 10 * 12 * 10  # > 50 train typefaces
    assert torch.bincount(data.train_y).unique().numel() == 1
    means = torch.stack([data.train_x[data.train_y == c].float().mean(0) for c in range(10)])
    assert (means[0] - means[8]).abs().mean() > 10  # an average 'A' is not an average 'I'
    assert all(not torch.equal(a, b) for a, b in zip(data.test_x[:50], data.train_x[:50], strict=True))


def test_missing_sources_name_the_install_command(tmp_path):
    with pytest.raises(SourceMissingError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(SourceMissingError, match=r"pip install --no-deps animal-mnist==0\.4"):
        package_file("no_such_module_here", "x", SOURCES["animal-silhouettes"].install, "animal-silhouettes")
    with pytest.raises(SourceMissingError, match="unknown data source 'cifar-11'"):
        load_source("cifar-11")


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


def test_dirichlet_with_a_fixed_size_per_site():
    labels = load_source("fashion-mnist").train_y.numpy()
    sites = partition.dirichlet_fixed_size(labels, 32, 0.1, 4096, np.random.default_rng(0))
    assert [len(s) for s in sites] == [4096] * 32
    assert all(len(np.unique(s)) == 4096 for s in sites)
    top2_share = [np.sort(np.bincount(labels[s], minlength=10))[-2:].sum() / 4096 for s in sites]
    assert np.median(top2_share) > 0.8


def test_iid_partition_sizes_add_up():
    sites = partition.iid(np.arange(103), 10, 1, np.random.default_rng(0))
    assert sorted(len(s) for s in sites) == [10] * 7 + [11] * 3
    assert len(np.unique(np.concatenate(sites))) == 103


def test_shards_give_each_site_exactly_m_classes():
    labels = load_source("fashion-mnist").train_y.numpy()
    sites = partition.shards(labels, 20, classes_per_site=2, shards_per_class=4, rng=np.random.default_rng(0))
    assert [len(np.unique(labels[s])) for s in sites] == [2] * 20
    joined = np.concatenate(sites)
    assert len(joined) == len(np.unique(joined)) == len(labels)
    with pytest.raises(partition.PartitionError, match="does not divide"):
        partition.shards(labels, 10, classes_per_site=3, shards_per_class=3, rng=np.random.default_rng(0))
    with pytest.raises(partition.PartitionError, match="= 20 sites, but num_sites=16"):
        partition.shards(labels, 16, classes_per_site=2, shards_per_class=4, rng=np.random.default_rng(0))


def test_each_site_test_set_follows_its_training_labels_and_their_union_is_the_test_split():
    federation = build_federation(build_config("default"))
    counts = federation.train_label_counts().float()
    assert len(federation.test_y) == 10000
    for site in range(federation.num_sites):
        test_counts = torch.bincount(federation.test_y[federation.test_site == site], minlength=10).float()
        train_share, test_share = counts[site] / counts[site].sum(), test_counts / test_counts.sum()
        assert (train_share - test_share).abs().max() < 0.05


def test_train_validation_test_splits_are_disjoint():
    federation = build_federation(build_config("default", ["data.val_fraction=0.2"]))
    total = int(federation.train_sizes.sum()) + len(federation.val_y)
    assert total == 60000
    assert len(federation.val_y) == pytest.approx(12000, abs=16)
    assert len(np.unique(federation.train_index.numpy())) == len(federation.train_index)
    assert torch.bincount(federation.val_site).tolist() == pytest.approx(
        (0.2 / 0.8 * federation.train_sizes.float()).tolist(), abs=1
    )


def test_batches_come_only_from_each_sites_own_samples():
    federation = build_federation(build_config("default"))
    x, y = federation.sample_batch(64, torch.Generator().manual_seed(0))
    assert x.shape == (16, 64, 1, 28, 28) and y.shape == (16, 64) and x.dtype == torch.float32
    counts = federation.train_label_counts()
    for site in range(16):
        assert (counts[site][y[site]] > 0).all()


def test_by_domain_sites_carry_their_sources_label_space():
    config = build_config(
        "default",
        [
            'data.sources=["mnist-5k", "digits-8x8", "animal-silhouettes"]',
            "data.partition=by_domain",
            "num_sites=4",
            "data.sites_per_source=[1, 1, 2]",
        ],
    )
    federation = build_federation(config)
    assert federation.site_sources == ["mnist-5k", "digits-8x8", "animal-silhouettes", "animal-silhouettes"]
    assert federation.class_names[:10] == tuple(str(d) for d in range(10))  # digits share their names
    assert federation.num_classes == 20
    assert federation.site_classes[0] == federation.site_classes[1] == list(range(10))
    assert federation.site_classes[2] == list(range(10, 20))
    counts = federation.train_label_counts()
    assert counts[2, :10].sum() == 0 and counts[0, 10:].sum() == 0
    assert counts[1].sum() == pytest.approx(1438 * 0.9, abs=1)  # the whole source, less validation
    assert federation.image_shape == (1, 28, 28)  # 8x8 digits resized to the common shape


def test_federation_is_deterministic_given_the_seed():
    a = build_federation(build_config("default", ["num_sites=4"]))
    b = build_federation(build_config("default", ["num_sites=4"]))
    c = build_federation(build_config("default", ["num_sites=4", "seed=1"]))
    assert torch.equal(a.train_index, b.train_index) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_index, c.train_index)


def test_images_are_brought_to_one_shape():
    grey = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    rgb = to_shape(grey, 3, 32)
    assert rgb.shape == (5, 3, 32, 32) and torch.equal(rgb[:, 0], rgb[:, 2])
    assert to_shape(rgb, 1, 32).shape == (5, 1, 32, 32)
    assert to_shape(grey, 1, 28) is grey


def test_more_sites_than_samples_is_refused_with_the_fields_named():
    with pytest.raises(partition.PartitionError, match=r"num_sites=70000 x data.min_site_samples=64"):
        build_federation(build_config("default", ["num_sites=70000"]))


def test_local_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 12, 12, 3), dtype=np.uint8)
    y = np.repeat(np.arange(5), 10)
    np.savez(tmp_path / "mine.npz", x=x, y=y, class_names=np.array(["a", "b", "c", "d", "e"]))
    data = load_source(str(tmp_path / "mine.npz"))
    assert data.name == "mine" and data.class_names == ("a", "b", "c", "d", "e")
    assert data.train_x.shape == (40, 3, 12, 12) and len(data.test_y) == 10
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(SourceMissingError, match=r"cannot read it as \.npz"):
        load_source(str(tmp_path / "bad.npz"))


def test_local_image_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 2)):
        for name in ("cat", "dog"):
            (tmp_path / "pets" / split / name).mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "pets" / split / name / f"{k}.png")
    (tmp_path / "pets" / "train" / "cat" / "notes.txt").write_text("not an image")
    data = load_source(str(tmp_path / "pets"))
    assert data.class_names == ("cat", "dog")
    assert data.train_x.shape == (8, 3, 9, 9) and data.test_y.tolist() == [0, 0, 1, 1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceMissingError, match="no class sub-folders"):
        load_source(str(tmp_path / "empty"))
    with pytest.raises(SourceMissingError, match="no such file or folder"):
        load_source(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(("preset", "sites"), [("mazel-8site", 8), ("mazel-16site", 16), ("l2c-shards", 20)])
def test_benchmark_presets_build_their_federations(preset, sites):
    federation = build_federation(build_config(preset))
    assert federation.num_sites == sites
    if preset.startswith("mazel"):
        assert len(set(federation.site_sources)) == 5 and federation.num_classes == 40
    else:
        assert (federation.train_label_counts() > 0).sum(1).tolist() == [2] * 20


def test_fashion_dirichlet_preset_draws_a_fixed_size_per_site():
    federation = build_federation(build_config("fashion-dirichlet"))
    assert (federation.train_sizes + torch.bincount(federation.val_site, minlength=16)).tolist() == [3000] * 16
