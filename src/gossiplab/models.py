"""Backbones and heads, built as plain `nn.Module`s and called functionally on rows of the population.

The CNN and ResNet-20 normalise with GroupNorm by default, like the L2C paper's CNN
(`model.norm`); BatchNorm (`model.norm = "batch"`, as in the DIMAT paper and code) keeps its
running statistics per site, in the site's row of the population (gossiplab.population), and
gossip averages them or keeps them local (`gossip.normalization`). `model.dropout` adds dropout
before the last layer.

Two heads (MAZEL section 3.3-3.5): `model.head = "linear"` is MDSL's classifier over the label
space all sites must share; `model.head = "text"` is MAZEL's `TextEmbeddingHead`, scoring the
trainable image embedding against frozen text embeddings of class names. On frozen features
(`model.backbone` not "pixels") the trainable part is an MLP on the cached features; with
`model.zero_shot_init` it is a residual on the encoder's zero-shot embedding, with its last layer
starting at zero, so that step 0 is exactly the zero-shot classifier.

The body is a registered model (`model.name`): `factory(model_config, input_shape, out_features)
-> nn.Module` mapping an input batch to `out_features` numbers (class logits, or the text-space
embedding under the text head). A user's `nn.Module` registers the same way.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from gossiplab.config import ModelConfig
from gossiplab.registry import MODELS


def dropout_layer(p: float) -> list[nn.Module]:
    """[Dropout(p)], or nothing at p = 0 (so that a plain MLP stays a plain linear stack)."""
    return [nn.Dropout(p)] if p > 0 else []


def normalization(kind: str, channels: int, groups: int) -> nn.Module:
    """GroupNorm over `groups` groups, BatchNorm, or nothing (`model.norm`)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(groups, channels) if kind == "group" else nn.Identity()


def mlp(input_shape: tuple[int, ...], hidden: list[int], num_classes: int, dropout: float = 0.0) -> nn.Module:
    widths = [math.prod(input_shape), *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for w_in, w_out in itertools.pairwise(widths):
        layers += [nn.Linear(w_in, w_out), nn.ReLU()]
    return nn.Sequential(*layers, *dropout_layer(dropout), nn.Linear(widths[-1], num_classes))


def cnn(
    input_shape: tuple[int, ...], channels: list[int], num_classes: int, norm: str = "group", dropout: float = 0.0
) -> nn.Module:
    """5x5 conv -> GroupNorm (or BatchNorm) -> ReLU -> 2x2 max-pool blocks, then one linear classifier.

    The convolutions carry no bias: the normalisation subtracts it again, so its gradient is
    rounding noise, which Adam would turn into full-size steps (with `norm = "none"` they have one).
    """
    in_channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [
            nn.Conv2d(in_channels, out_channels, 5, padding=2, bias=norm == "none"),
            normalization(norm, out_channels, min(4, out_channels)),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        in_channels, height, width = out_channels, height // 2, width // 2
    classifier = nn.Linear(in_channels * height * width, num_classes)
    return nn.Sequential(*layers, nn.Flatten(), *dropout_layer(dropout), classifier)


class BasicBlock(nn.Module):
    """conv3x3 -> norm -> ReLU -> conv3x3 -> norm, plus the shortcut (1x1 conv + norm when the
    shape changes, "option B"), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, norm: str = "group"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = normalization(norm, out_channels, groups)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = normalization(norm, out_channels, groups)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), normalization(norm, out_channels, groups)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(self.conv1(x)))
        return self.relu2(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for small images (He et al. 2016, section 4.2): a 3x3 stem, 3 stages of 3 basic
    blocks at widths (16, 32, 64) x `width`, global average pooling, (dropout,) one linear layer.
    Normalised by GroupNorm by default; the DIMAT paper and its code use BatchNorm (`norm = "batch"`)."""

    def __init__(
        self, in_channels: int, num_classes: int, width: int = 1, groups: int = 4, norm: str = "group",
        dropout: float = 0.0,
    ):  # fmt: skip
        super().__init__()
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.stem_norm = normalization(norm, widths[0], groups)
        self.stem_relu = nn.ReLU()
        blocks, channels = [], widths[0]
        for stage, out_channels in enumerate(widths):
            for index in range(3):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride, groups, norm))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self.stem_norm(self.stem(x)))
        return self.fc(self.dropout(self.pool(self.blocks(x)).flatten(1)))


class ZeroInitLinear(nn.Linear):
    """A linear layer whose (re)initialisation is all zeros: the last layer of a zero-shot residual."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class ZeroShotResidual(nn.Module):
    """Inputs are [zero-shot embedding (zero_shot_dim) | frozen features]; output = zero-shot
    embedding + body(features). The body's last layer starts at zero (ZeroInitLinear)."""

    def __init__(self, zero_shot_dim: int, body: nn.Sequential):
        super().__init__()
        self.zero_shot_dim = zero_shot_dim
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : self.zero_shot_dim] + self.body(x[..., self.zero_shot_dim :])


class TextEmbeddingHead(nn.Module):
    """MAZEL's classifier: logits_k = s * <v / |v|, t_k / |t_k|> (MAZEL section 3.5), v the image
    embedding from `encoder`, t_k the frozen text embedding of class k ([C, d] buffer, never
    trained nor gossiped). Which classes a site may predict is decided outside, by a mask."""

    def __init__(self, encoder: nn.Module, class_embeddings: torch.Tensor, logit_scale: float):
        super().__init__()
        self.encoder = encoder
        # non-persistent: a constant of the architecture, not per-site state (gossiplab.population)
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.float(), dim=-1), persistent=False)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.encoder(x), dim=-1)
        return self.logit_scale * image @ self.class_embeddings.T


def build_model(
    config: ModelConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    class_embeddings: torch.Tensor | None = None,
    zero_shot_dim: int = 0,
) -> nn.Module:
    """The trainable model of one site. With a text head, the body's output is the text dimension
    and `class_embeddings` [C, d] are required; `zero_shot_dim` > 0 marks that many leading input
    numbers as the zero-shot embedding the body is a residual on."""
    out = num_classes if config.head == "linear" else class_embeddings.shape[1]
    if zero_shot_dim:
        body = mlp((input_shape[0] - zero_shot_dim,), config.hidden, out)
        body[-1] = ZeroInitLinear(body[-1].in_features, out)
        encoder: nn.Module = ZeroShotResidual(zero_shot_dim, body)
    else:
        encoder = MODELS.get(config.name)(config, input_shape, out)
    if config.head == "linear":
        return encoder
    return TextEmbeddingHead(encoder, class_embeddings, config.logit_scale)


@MODELS.register("mlp")
def build_mlp(config: ModelConfig, input_shape: tuple[int, ...], out_features: int) -> nn.Module:
    """Fully connected ReLU layers of widths `model.hidden`."""
    return mlp(input_shape, config.hidden, out_features, config.dropout)


@MODELS.register("cnn")
def build_cnn(config: ModelConfig, input_shape: tuple[int, ...], out_features: int) -> nn.Module:
    """Convolution, normalisation, ReLU and max-pool blocks of `model.channels`, then a linear layer."""
    return cnn(input_shape, config.channels, out_features, config.norm, config.dropout)


@MODELS.register("resnet20")
def build_resnet20(config: ModelConfig, input_shape: tuple[int, ...], out_features: int) -> nn.Module:
    """ResNet-20 (GroupNorm or BatchNorm), `model.width` times wider."""
    return ResNet20(input_shape[0], out_features, config.width, norm=config.norm, dropout=config.dropout)


def has_convolutions(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def has_random_layers(module: nn.Module) -> bool:
    """Dropout of any kind: layers whose training-mode output is random."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in module.modules())
