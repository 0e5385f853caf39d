"""Simulated pre-training: an image-to-text projection aligned on public data, MAZEL's strong start.

MAZEL's claims 1 and 3 rest on CLIP's zero-shot start (about 53% on CIFAR-100 before any
training, MAZEL section 5): a site that trains alone from there stays general. No CLIP ships in a
registry package, and ConSE on the ImageNet EfficientNet-Lite0 (gossiplab.encoders) starts at
about 22% on Fashion-MNIST, so a site trained alone specialises as under MDSL. What makes CLIP's
start is an image tower aligned to a text tower on data no site holds. This module builds that,
scaled down, the way LiT does (Zhai et al. 2022: one tower locked, the other learned by the
contrastive loss): the text tower (MiniLM class-name embeddings, frozen in MAZEL too) is locked
and a linear projection P of the frozen image features into the text space is learned, centrally
and once, on public images:

    min_P  E_(x, y) [ -log softmax_k( s cos(P f(x), t_k) )_y ]

the image-to-text half of the contrastive loss, whose negatives are the other class names of the
public data (with class-name texts, the batch's distinct texts are exactly those). The public
images are each source's training images outside the run's subset (`held-out`: no site holds
them), or, the stricter test, only sources the run does not use at all (`cross-domain`). The
projection is cached like the image features, keyed by what it was trained on, and becomes the
zero-shot embedding the MAZEL model is a residual on (gossiplab.models.ZeroShotResidual), so step
0 is the pre-aligned classifier. Reports label this start "simulated pre-training".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.console import Console

from gossiplab.config import Config, ConfigError
from gossiplab.data.federation import kept, to_shape
from gossiplab.data.sources import SOURCES, Dataset, load_source
from gossiplab.encoders import EncoderError, FrozenParts, cache_dir, cached_image_features
from gossiplab.safeload import PlainDataFileError, UnsafeFileError, load_tensors

BATCH = 256
LR = 1e-3
SALT = 2  # the subset of held-out images taken, apart from the run's own train (0) and test (1) subsets


@dataclass
class PublicData:
    """The public images one pre-alignment trains on: uint8 [n, C, H, W], labels into `class_names`."""

    sources: tuple[str, ...]
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]


def public_sources(config: Config) -> list[str]:
    """The sources public images come from: the run's own (held-out) or the registered ones it does not use."""
    if config.model.pre_alignment == "held-out":
        return list(config.data.sources)
    unused = [name for name in SOURCES if name not in config.data.sources]
    if not unused:
        raise ConfigError(
            "field 'model.pre_alignment' = 'cross-domain': the run uses every registered source "
            f"({', '.join(SOURCES)}), so none is left to pre-align on; use `held-out`"
        )
    return unused


def public_indices(config: Config, dataset: Dataset) -> torch.Tensor:
    """The training images of `dataset` that pre-alignment may use: under `held-out` none of the
    run's subset (data.train_per_source), at most model.pre_alignment_per_source of them."""
    index = torch.arange(len(dataset.train_y))
    if config.model.pre_alignment == "held-out":
        used = torch.zeros(len(index), dtype=torch.bool)
        used[kept(dataset, len(index), config.data.train_per_source, 0)] = True
        index = index[~used]
    return index[kept(dataset, len(index), config.model.pre_alignment_per_source, SALT)]


def public_data(config: Config) -> PublicData:
    """At most `model.pre_alignment_per_source` images of each public source, brought to the run's image shape."""
    data = config.data
    images, labels, class_names, sources = [], [], [], []
    for name in public_sources(config):
        dataset = load_source(name)
        index = public_indices(config, dataset)
        if not len(index):
            continue
        names = [c for c in dataset.class_names if c not in class_names]
        class_names += names
        to_public = torch.tensor([class_names.index(c) for c in dataset.class_names])
        images.append(to_shape(dataset.train_x[index], data.channels, data.image_size))
        labels.append(to_public[dataset.train_y[index]])
        sources.append(name)
    if not images:
        raise ConfigError(
            f"field 'model.pre_alignment' = '{config.model.pre_alignment}': the sources "
            f"{', '.join(public_sources(config))} leave no public image (data.train_per_source takes them all); "
            "lower data.train_per_source or use `cross-domain`"
        )
    return PublicData(tuple(sources), torch.cat(images), torch.cat(labels), tuple(class_names))


def train_projection(
    features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, logit_scale: float, steps: int
) -> dict[str, torch.Tensor]:
    """P = (weight [d, D], bias [d]) minimising the image-to-text contrastive loss of the module
    docstring by Adam, from a fixed seed: the same public data gives the same projection."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(text.shape[1], features.shape[1], generator=generator) / features.shape[1] ** 0.5
    bias = torch.zeros(text.shape[1])
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=LR)
    text = F.normalize(text, dim=-1)
    for _ in range(steps):
        batch = torch.randint(len(labels), (BATCH,), generator=generator)
        logits = logit_scale * F.normalize(features[batch] @ weight.T + bias, dim=-1) @ text.T
        loss = F.cross_entropy(logits, labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"weight": weight.detach(), "bias": bias.detach()}


def pre_aligned_projection(
    config: Config, frozen: FrozenParts, console: Console | None = None
) -> dict[str, torch.Tensor]:
    """The run's pre-aligned projection, trained on first use and cached under cache_dir()."""
    public, steps = public_data(config), config.model.pre_alignment_steps
    features, _ = cached_image_features(frozen.image, public.images, console)
    text = frozen.class_embeddings(public.class_names)
    key = hashlib.sha256()
    for part in (frozen.image.name, frozen.text.name, config.model.prompt, repr(public.class_names), repr(steps)):
        key.update(part.encode())
    key.update(public.images.contiguous().numpy().tobytes())
    key.update(public.labels.numpy().tobytes())
    key.update(repr(config.model.logit_scale).encode())
    path = cache_dir() / "pre-alignment" / f"{key.hexdigest()[:24]}.pt"
    if path.is_file():
        with contextlib.suppress(PlainDataFileError, UnsafeFileError, TypeError, KeyError):
            cached = load_tensors(path, "pre-alignment cache")
            return {"weight": cached["weight"], "bias": cached["bias"]}
    if console is not None:
        console.print(
            f"simulated pre-training: aligning {len(public.labels):,} public images of {', '.join(public.sources)} "
            f"to {len(public.class_names)} class names ({steps} steps, cached afterwards)"
        )
    projection = train_projection(features, public.labels, text, config.model.logit_scale, steps)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(projection, tmp)
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise EncoderError(
            f"the pre-alignment cache {path.parent} cannot be written ({error.strerror or error}); set "
            "GOSSIPLAB_CACHE to a writable folder"
        ) from error
    return projection
