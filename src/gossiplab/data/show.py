"""Look at data: a source's samples per class, and how a config spreads data over sites."""

from __future__ import annotations

from pathlib import Path

import torch

from gossiplab.data.federation import Federation
from gossiplab.data.sources import Dataset
from gossiplab.plots import plt


def sample_grid(dataset: Dataset, path: Path, per_class: int = 10, seed: int = 0) -> Path:
    """A PNG with one row per class (its name on the left) and `per_class` random training samples."""
    generator = torch.Generator().manual_seed(seed)
    rows = dataset.num_classes
    fig, axes = plt.subplots(rows, per_class, figsize=(per_class * 0.8 + 1.2, rows * 0.8), squeeze=False)
    for c, name in enumerate(dataset.class_names):
        members = torch.nonzero(dataset.train_y == c).flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[:per_class]]
        for k in range(per_class):
            ax = axes[c, k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k < len(chosen):
                image = dataset.train_x[chosen[k]]
                pixels = (image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)).numpy()
                ax.imshow(pixels, cmap="gray", vmin=0, vmax=255)
            if k == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{dataset.name}: {len(dataset.train_y)} train / {len(dataset.test_y)} test")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def site_rows(federation: Federation, top: int = 3) -> list[dict]:
    """Per site: source, split sizes, classes present out of its label space, and its top classes."""
    counts = federation.train_label_counts()
    val = torch.bincount(federation.val_site, minlength=federation.num_sites)
    test = torch.bincount(federation.test_site, minlength=federation.num_sites)
    rows = []
    for i in range(federation.num_sites):
        share = counts[i].float() / counts[i].sum()
        order = share.argsort(descending=True)[:top]
        rows.append({
            "site": i,
            "source": federation.site_sources[i],
            "train": int(counts[i].sum()),
            "val": int(val[i]),
            "test": int(test[i]),
            "classes": f"{int((counts[i] > 0).sum())}/{len(federation.site_classes[i])}",
            "top": ", ".join(f"{federation.class_names[c]} {share[c]:.0%}" for c in order if share[c] > 0),
        })  # fmt: skip
    return rows


def site_class_heatmap(federation: Federation, path: Path, title: str) -> Path:
    """A PNG of each site's training class shares (rows: sites, columns: the global label space)."""
    counts = federation.train_label_counts().float()
    shares = counts / counts.sum(1, keepdim=True)
    width = max(6.0, 0.22 * federation.num_classes + 2)
    fig, ax = plt.subplots(figsize=(width, 0.3 * federation.num_sites + 2))
    image = ax.imshow(shares.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=float(shares.max()),
                      interpolation="nearest")  # fmt: skip
    fig.colorbar(image, ax=ax, label="share of the site's training samples")
    ax.set_yticks(range(federation.num_sites))
    ax.set_yticklabels([f"{i} {s}" for i, s in enumerate(federation.site_sources)], fontsize=7)
    ax.set_xticks(range(federation.num_classes))
    ax.set_xticklabels(federation.class_names, rotation=90, fontsize=6)
    ax.set(xlabel="class", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
