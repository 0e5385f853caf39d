"""Backbones, built as plain `nn.Module`s and called functionally on rows of the population.

No BatchNorm: it neither vmaps cleanly nor averages well across sites (DESIGN section 2), so
the CNN normalises with GroupNorm, like the L2C paper's CNN.
"""

from __future__ import annotations

import itertools
import math

from torch import nn

from gossiplab.config import ModelConfig


def mlp(input_shape: tuple[int, ...], hidden: list[int], num_classes: int) -> nn.Module:
    widths = [math.prod(input_shape), *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for w_in, w_out in itertools.pairwise(widths):
        layers += [nn.Linear(w_in, w_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], num_classes))


def cnn(input_shape: tuple[int, ...], channels: list[int], num_classes: int) -> nn.Module:
    """5x5 conv -> GroupNorm -> ReLU -> 2x2 max-pool blocks, then one linear classifier.

    The convolutions carry no bias: GroupNorm subtracts it again, so its gradient is rounding
    noise, which Adam would turn into full-size steps.
    """
    in_channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [
            nn.Conv2d(in_channels, out_channels, 5, padding=2, bias=False),
            nn.GroupNorm(min(4, out_channels), out_channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        in_channels, height, width = out_channels, height // 2, width // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(in_channels * height * width, num_classes))


def build_model(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if config.name == "mlp":
        return mlp(input_shape, config.hidden, num_classes)
    return cnn(input_shape, config.channels, num_classes)


def has_convolutions(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())
