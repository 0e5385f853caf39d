"""Permutation symmetry of hidden units, described declaratively per architecture.

Permuting the hidden units of a layer (rows of its weight and bias, the matching channels of its
normalisation, columns of the next layer's weight) leaves the network's function unchanged. A
`PermutationSpec` lists every permutable hidden dimension (a `PermutationGroup`) with each
parameter axis it acts on and the module whose output holds its activations, so that the matched
merges of DIMAT (activation matching) and Git Re-Basin (weight matching), both in
gossiplab.algorithms.dimat.matching, are written once for every architecture. Adding an
architecture means writing its spec, not merge code: a user's model declares its own as a method,
`permutation_spec(input_shape) -> PermutationSpec`, in the names of its own parameters
(examples/user_model.py).

GroupNorm normalises groups of consecutive channels: moving one channel to another group changes
the statistics, so under GroupNorm (`blocks` groups) a permutation moves whole groups and
permutes channels within each group, and nothing else.
BatchNorm normalises each channel alone: its affine parameters and running statistics (buffers,
in the same population row) move with the channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gossiplab.errors import ConfigError
from gossiplab.models import ResNet20, TextEmbeddingHead, ZeroShotResidual


@dataclass(frozen=True)
class Axis:
    """Parameter `name`, dimension `axis`; `repeat` consecutive entries per unit (a linear layer
    reading flattened [C, H, W] feature maps sees each channel as H * W inputs)."""

    name: str
    axis: int
    repeat: int = 1


@dataclass(frozen=True)
class PermutationGroup:
    size: int
    axes: tuple[Axis, ...]
    activation: str  # the module whose output carries these units' activations
    blocks: int = 1  # units are permuted within `blocks` equal consecutive blocks only


@dataclass(frozen=True)
class PermutationSpec:
    groups: tuple[PermutationGroup, ...]


def norm_axes(layer: nn.Module, name: str) -> list[Axis]:
    """The per-channel entries of a normalisation layer: affine parameters, and BatchNorm's
    running statistics; none for an Identity (`model.norm = "none"`)."""
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return [Axis(f"{name}.{entry}", 0) for entry in ("weight", "bias", "running_mean", "running_var")]
    if isinstance(layer, nn.GroupNorm):
        return [Axis(f"{name}.weight", 0), Axis(f"{name}.bias", 0)]
    return []


def _sequential_spec(sequential: nn.Sequential, prefix: str, input_shape: tuple[int, ...]) -> list[PermutationGroup]:
    """Spec of a Linear/Conv2d (-> GroupNorm) -> ReLU (-> pool) stack: every hidden layer but the output."""
    layers = list(sequential.named_children())
    weighted = [k for k, (_, m) in enumerate(layers) if isinstance(m, nn.Linear | nn.Conv2d)]
    shapes = {}
    x = torch.zeros(1, *input_shape, device=next(sequential.parameters()).device)
    with torch.no_grad():
        for name, module in layers:
            x = module.eval()(x) if isinstance(module, nn.modules.batchnorm._BatchNorm) else module(x)
            module.train()
            shapes[name] = x.shape[1:]
    groups = []
    for position, k in enumerate(weighted[:-1]):
        name, layer = layers[k]
        axes = [Axis(f"{prefix}{name}.weight", 0)]
        if layer.bias is not None:
            axes.append(Axis(f"{prefix}{name}.bias", 0))
        blocks, activation = 1, name
        for later_name, later in layers[k + 1 : weighted[position + 1]]:
            axes += norm_axes(later, f"{prefix}{later_name}")
            if isinstance(later, nn.GroupNorm):
                blocks = later.num_groups
            if isinstance(later, nn.ReLU):
                activation = later_name
        next_name, next_layer = layers[weighted[position + 1]]
        size = layer.weight.shape[0]
        repeat = next_layer.weight.shape[1] // size if isinstance(next_layer, nn.Linear) else 1
        axes.append(Axis(f"{prefix}{next_name}.weight", 1, repeat))
        groups.append(PermutationGroup(size, tuple(axes), f"{prefix}{activation}", blocks))
    return groups


def _resnet_spec(model: ResNet20, prefix: str) -> list[PermutationGroup]:
    """The residual stream of a stage shares one permutation (it is added across blocks); each
    block's inner width has its own."""

    def norm(name: str) -> list[Axis]:
        return norm_axes(model.get_submodule(name.removeprefix(prefix)), name)

    groups = []
    gn = model.stem_norm.num_groups if isinstance(model.stem_norm, nn.GroupNorm) else 1
    stream = [Axis(f"{prefix}stem.weight", 0), *norm(f"{prefix}stem_norm")]
    stream_activation, stream_size = f"{prefix}stem_relu", model.stem.out_channels
    for k, block in enumerate(model.blocks):
        name = f"{prefix}blocks.{k}"
        stream.append(Axis(f"{name}.conv1.weight", 1))
        if len(block.shortcut):  # a new stage: the previous stream ends at this block's inputs
            stream.append(Axis(f"{name}.shortcut.0.weight", 1))
            groups.append(PermutationGroup(stream_size, tuple(stream), stream_activation, gn))
            stream = [Axis(f"{name}.shortcut.0.weight", 0), *norm(f"{name}.shortcut.1")]
            stream_size = block.conv2.out_channels
        stream += [Axis(f"{name}.conv2.weight", 0), *norm(f"{name}.norm2")]
        stream_activation = f"{name}.relu2"
        inner = [Axis(f"{name}.conv1.weight", 0), *norm(f"{name}.norm1"), Axis(f"{name}.conv2.weight", 1)]
        groups.append(PermutationGroup(block.conv1.out_channels, tuple(inner), f"{name}.relu1", gn))
    stream.append(Axis(f"{prefix}fc.weight", 1))
    groups.append(PermutationGroup(stream_size, tuple(stream), stream_activation, gn))
    return groups


def with_prefix(spec: PermutationSpec, prefix: str) -> PermutationSpec:
    """A module's spec as seen from a model that holds it under `prefix` (a text head's encoder)."""
    return PermutationSpec(
        tuple(
            PermutationGroup(
                group.size,
                tuple(Axis(f"{prefix}{axis.name}", axis.axis, axis.repeat) for axis in group.axes),
                f"{prefix}{group.activation}",
                group.blocks,
            )
            for group in spec.groups
        )
    )


def permutation_spec(module: nn.Module, input_shape: tuple[int, ...]) -> PermutationSpec:
    """The spec of a model: gossiplab's MLP, CNN, ResNet-20 (also under a text head or zero-shot
    residual), or a user model's own `permutation_spec(input_shape)`, checked against its parameters."""
    prefix = ""
    if isinstance(module, TextEmbeddingHead):
        module, prefix = module.encoder, "encoder."
    if isinstance(module, ZeroShotResidual):
        input_shape = (input_shape[0] - module.zero_shot_dim,)
        module, prefix = module.body, f"{prefix}body."
    if hasattr(module, "permutation_spec"):
        spec = module.permutation_spec(input_shape)
        check_spec(spec, module)
        return with_prefix(spec, prefix)
    if isinstance(module, ResNet20):
        return PermutationSpec(tuple(_resnet_spec(module, prefix)))
    if isinstance(module, nn.Sequential):
        return PermutationSpec(tuple(_sequential_spec(module, prefix, input_shape)))
    raise ConfigError(
        f"field 'gossip.algorithm': matching (dimat, weight-matching) permutes hidden units, and model "
        f"{type(module).__name__} does not say which: give it a method permutation_spec(input_shape) -> "
        "gossiplab.permutation.PermutationSpec (examples/user_model.py), or use gossiplab's mlp, cnn or resnet20, "
        "or an algorithm that averages (dsgd)"
    )


def check_spec(spec: PermutationSpec, module: nn.Module) -> None:
    """A model's own spec names its entries (parameters and buffers) and sizes them right: `size`
    units times `repeat` along each axis, and an activation module that exists."""
    entries = dict(module.named_parameters()) | dict(module.named_buffers())
    modules = dict(module.named_modules())
    owner = f"{type(module).__name__}.permutation_spec"
    problems = []
    if not isinstance(spec, PermutationSpec):
        problems.append(f"returned {type(spec).__name__}, not a PermutationSpec")
    for group in spec.groups if not problems else ():
        if group.activation not in modules:
            problems.append(f"activation {group.activation!r} is not a submodule of the model")
        for axis in group.axes:
            entry = entries.get(axis.name)
            if entry is None:
                problems.append(f"{axis.name!r} is not a parameter or buffer of the model")
            elif axis.axis >= entry.dim() or entry.shape[axis.axis] != group.size * axis.repeat:
                problems.append(
                    f"{axis.name!r} has shape {list(entry.shape)}: axis {axis.axis} must hold {group.size} units x "
                    f"{axis.repeat}"
                )
    if problems:
        raise ConfigError(f"model {owner}: {'; '.join(problems)}")


def permuted_index(
    spec: PermutationSpec, names: list[str], shapes: list[torch.Size], perms: list[torch.Tensor]
) -> torch.Tensor:
    """[P] flat index such that theta[index] is theta with every group's units permuted: new unit
    k of group g is old unit perms[g][k]. One gather then permutes a whole parameter vector."""
    sizes = [s.numel() for s in shapes]
    offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0).tolist()
    views = {n: torch.arange(o, o + z).view(s) for n, o, z, s in zip(names, offsets, sizes, shapes, strict=True)}
    for group, perm in zip(spec.groups, perms, strict=True):
        for axis in group.axes:
            expanded = (perm[:, None] * axis.repeat + torch.arange(axis.repeat)).flatten()
            views[axis.name] = views[axis.name].index_select(axis.axis, expanded)
    return torch.cat([views[n].flatten() for n in names])


def random_permutations(spec: PermutationSpec, generator: torch.Generator) -> list[torch.Tensor]:
    """A random permutation per group that GroupNorm allows: its blocks shuffled whole, and the
    units within each block shuffled."""
    perms = []
    for group in spec.groups:
        width = group.size // group.blocks
        order = torch.randperm(group.blocks, generator=generator)
        perms.append(torch.cat([b * width + torch.randperm(width, generator=generator) for b in order.tolist()]))
    return perms
