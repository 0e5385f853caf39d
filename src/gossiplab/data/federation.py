"""The N sites of one experiment: which samples each holds, and batches shaped [N, B, ...]."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gossiplab.config import Config
from gossiplab.data import partition
from gossiplab.data.sources import Dataset, load_source


@dataclass
class Federation:
    """Sites' train samples as one index array in site order, and the global test set in site order.

    Sampling a batch for all sites is index arithmetic on `train_index`; no per-site Python loop.
    """

    dataset: Dataset
    train_index: torch.Tensor  # [n_train_used] dataset indices, site 0's first
    train_offsets: torch.Tensor  # [N]
    train_sizes: torch.Tensor  # [N]
    test_x: torch.Tensor  # [n_test, ...] sorted by site
    test_y: torch.Tensor  # [n_test]
    test_site: torch.Tensor  # [n_test] owning site of each test sample

    @property
    def num_sites(self) -> int:
        return len(self.train_sizes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.dataset.class_names

    def train_label_counts(self) -> torch.Tensor:
        """[N, C] number of training samples of each class on each site."""
        site = torch.repeat_interleave(torch.arange(self.num_sites), self.train_sizes)
        counts = torch.zeros(self.num_sites, self.dataset.num_classes, dtype=torch.long)
        counts.index_put_((site, self.dataset.train_y[self.train_index]), torch.tensor(1), accumulate=True)
        return counts

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch per site, drawn uniformly with replacement from the site's own data: [N, B, ...]."""
        u = torch.rand(self.num_sites, batch_size, generator=generator)
        local = (u * self.train_sizes[:, None]).long()
        index = self.train_index[self.train_offsets[:, None] + local]
        return self.dataset.train_x[index], self.dataset.train_y[index]


def build_federation(config: Config) -> Federation:
    """Partition the source over `config.num_sites` sites, deterministically from `config.seed`."""
    dataset = load_source(config.data.source, config.data.path)
    rng = np.random.default_rng([config.seed, 0])
    labels = dataset.train_y.numpy()
    n = config.num_sites
    if config.data.partition == "iid":
        sites = partition.iid(labels, n, config.data.min_site_samples, rng)
    else:
        sites = partition.dirichlet(labels, n, config.data.alpha, config.data.min_site_samples, rng)
    counts = np.stack([np.bincount(labels[s], minlength=dataset.num_classes) for s in sites])
    tests = partition.split_test_like(dataset.test_y.numpy(), counts, rng)
    empty = [i for i, t in enumerate(tests) if len(t) == 0]
    if empty:
        raise partition.PartitionError(
            f"sites {empty} received no test samples; raise data.min_site_samples or data.alpha"
        )
    sizes = torch.tensor([len(s) for s in sites])
    test_index = torch.from_numpy(np.concatenate(tests))
    return Federation(
        dataset=dataset,
        train_index=torch.from_numpy(np.concatenate(sites)),
        train_offsets=torch.cumsum(sizes, 0) - sizes,
        train_sizes=sizes,
        test_x=dataset.test_x[test_index],
        test_y=dataset.test_y[test_index],
        test_site=torch.repeat_interleave(torch.arange(n), torch.tensor([len(t) for t in tests])),
    )
