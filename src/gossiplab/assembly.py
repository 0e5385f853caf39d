"""Assembly: the parts of one experiment built from its config, and their contract checked.

An `Experiment` holds every part of a run; each can be swapped from Python before the run. The
Runner checks the parts against each other before step 1 (`check_experiment`) and records, in
`config.toml` and `summary.json`, the parts that ran (`record_parts`), a user's by qualified name.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console

from gossiplab.catalogue import load_builtin_parts
from gossiplab.config import Config, ConfigError
from gossiplab.data.federation import Federation, build_federation
from gossiplab.devices import available_device_memory, resolve_device, resolve_kernels
from gossiplab.encoders import frozen_parts
from gossiplab.evaluation import buffer_bytes as evaluation_buffer_bytes
from gossiplab.memory import ResourceError, available_memory
from gossiplab.merge import GossipAverager
from gossiplab.models import build_model
from gossiplab.network import Network
from gossiplab.optim import build_optimizer
from gossiplab.plugins import DEBUG_HINT, describe_fault, imported_packages, within
from gossiplab.population import Population, choose_strategy, state_entries
from gossiplab.prealign import pre_aligned_projection
from gossiplab.registry import (
    ALGORITHMS,
    GRADIENT_TRANSFORMS,
    LOSSES,
    MIXING_RULES,
    MODELS,
    TOPOLOGIES,
    Registry,
    qualified_name,
)
from gossiplab.schedule import GossipSchedule
from gossiplab.sparse import entries, oriented, row_sums
from gossiplab.topology import build_adjacency

ROW_SUM_TOLERANCE = 1e-4
RUNTIME_BYTES = 2**29  # Python, PyTorch and libraries: a 16-site run peaked at 0.72 GiB, the rest of its estimate 0.35


class PartMismatch(ConfigError):
    """Parts of an experiment that do not fit together (sizes, W's shape or dtype, rows of W)."""


@dataclass
class Experiment:
    """Everything one run is made of, built from a config; every part can be swapped before a run.

    topology(round) -> adjacency [N, N] bool; mixing_rule(adjacency, experiment) -> W [N, N]
    (rows sum to 1); algorithm: the hooks the loop calls (gossiplab.algorithms), built on this
    experiment; state: the algorithm's state; gradient_transforms: the local step's chain
    (gossiplab.gradients), with their states in transform_states (the states are made by
    `init_states()` when the run starts, after any part was swapped); network: the simulated
    network's conditions and clock (gossiplab.network).
    """

    config: Config
    federation: Federation
    population: Population
    optimizer: Any
    schedule: GossipSchedule
    topology: Callable[[int], torch.Tensor]
    mixing_rule: Callable[[torch.Tensor, Any], torch.Tensor]
    algorithm: Any = None
    state: dict[str, Any] = field(default_factory=dict)
    gradient_transforms: list[Any] = field(default_factory=list)
    transform_states: list[dict[str, Any]] = field(default_factory=list)
    network: Network = None  # type: ignore[assignment]  # churn, loss and the clock ([network]): made from config

    def __post_init__(self) -> None:
        if self.network is None:
            self.network = Network(self.config.network, self.config.num_sites, self.config.seed)

    @property
    def gradient_chain(self) -> list[tuple[Any, dict[str, Any]]]:
        """The gradient transforms with their states, in the chain's order."""
        return list(zip(self.gradient_transforms, self.transform_states, strict=True))

    def init_states(self) -> None:
        """The algorithm's and the gradient transforms' states at step 0."""
        self.state = self.algorithm.init()
        self.transform_states = [transform.init() for transform in self.gradient_transforms]

    def graph(self, step: int, round_index: int) -> torch.Tensor:
        """The graph of the round at `step`: the topology's, or outside a communication window with
        `gossip.outside_window_p` the single-merge paper's low-budget graph (each site pulls from
        one random peer with that probability)."""
        if self.schedule.in_window(step):
            return self.topology(round_index)
        config = self.config
        return build_adjacency(
            "random-one-peer-pull", config.num_sites, round_index, config.seed, self.schedule.outside_p
        )


def activation_count(module: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """Numbers every layer outputs for one input: the per-sample activation memory, in floats."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        total += output.numel()

    leaves = [m for m in module.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    with evaluation_mode(module), torch.no_grad():  # BatchNorm would refuse a batch of one, and update its statistics
        module(torch.zeros(1, *input_shape))
    for hook in hooks:
        hook.remove()
    return total


@contextlib.contextmanager
def evaluation_mode(module: torch.nn.Module) -> Iterator[None]:
    """The module in eval mode (BatchNorm reads its running statistics and leaves them as they are;
    dropout is off), then back in the mode it was in."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


def check_model(module: Any, name: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Before anything runs it: `model.name`'s part must be an nn.Module with parameters that maps a
    batch of inputs to one logit per class. Checked on two zero inputs in eval mode, so the
    module's running statistics are left as they are."""
    if not isinstance(module, torch.nn.Module):
        raise PartMismatch(f"model ({name}) returned {type(module).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in module.parameters()):
        raise PartMismatch(f"model ({name}) has no trainable parameters: there is nothing to train or gossip")
    device = next(module.parameters()).device
    try:
        with evaluation_mode(module), torch.no_grad():
            logits = module(torch.zeros(2, *input_shape, device=device))
    except Exception as error:
        raise PartMismatch(
            f"model ({name}) failed on a batch of 2 inputs of shape {list(input_shape)}: {describe_fault(error)}; "
            f"{DEBUG_HINT}"
        ) from error
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, num_classes):
        got = f"shape {list(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise PartMismatch(
            f"model ({name}) gives {got} for a batch of 2 inputs; the run has {num_classes} classes, so it must "
            f"give [2, {num_classes}] (the model's out_features argument is the number to use)"
        )


def check_loss(loss: Any, name: str, num_classes: int) -> None:
    """`train.loss` must return the batch's mean loss as a 0-d float tensor (as F.cross_entropy)."""
    logits = torch.zeros(2, num_classes, requires_grad=True)
    try:
        value = loss(logits, torch.zeros(2, dtype=torch.long))
    except Exception as error:
        raise PartMismatch(
            f"loss ({name}) failed on logits [2, {num_classes}] and targets [2]: {describe_fault(error)}; {DEBUG_HINT}"
        ) from error
    if not isinstance(value, torch.Tensor) or value.ndim != 0 or not value.is_floating_point():
        got = f"a tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise PartMismatch(
            f"loss ({name}) returned {got}; a loss returns the batch's mean as a 0-d float tensor with its graph "
            "(as F.cross_entropy(logits, targets) does)"
        )


def memory_estimate(config: Config, federation: Federation, module: torch.nn.Module) -> dict[str, int]:
    """Bytes the run will hold, by what holds them: the [N, P + B] population (parameters and the
    model's buffers, such as BatchNorm statistics), [N, P] gradients and optimizer state, each
    step's batch of every site [N, B, ...] (sampled indices, inputs, labels), the activations of
    the sites one forward and backward pass trains (a chunk of sites; forward and backward) and of
    an evaluation pass, the evaluation's reduced hits and logits, the gossip kernel's buffers, the
    data, and the Python process itself. A 10,000-site run peaks within it (tests/test_scale.py)."""
    n, batch = config.num_sites, config.train.batch_size
    p = sum(t.numel() for t in module.parameters())
    b = sum(value.numel() for _, value in state_entries(module)) - p
    # SGD: a momentum buffer if any; Adam(W): exp_avg and exp_avg_sq (the fused update needs no more)
    optimizer_rows = (1 if config.train.momentum > 0 else 0) if config.train.optimizer == "sgd" else 2
    activations = activation_count(module, federation.image_shape)
    strategy = choose_strategy(module, config.train.engine, LOSSES.get(config.train.loss))
    trained_at_once = Population.sites_at_once(strategy, n, p + b)
    # inputs in one evaluation forward pass: 2**16 across the vmapped models, else a chunk for
    # one model (the estimate took 2**16 for every strategy and refused a 4-site ResNet-20 on
    # 28x28 images: 125 GiB of activations, where evaluation holds 4,096 inputs at a time)
    evaluated_inputs = 2**16 if strategy == "vmap" else Population.EVAL_CHUNK_INPUTS
    # per sample of a batch: its pool index, uniform draw and label (8 + 4 + 8 bytes), its input
    # gathered from the pool and, for images, normalised to float32
    inputs = math.prod(federation.image_shape)
    normalised = 0 if federation.pool_x.is_floating_point() else 4
    sample_bytes = 20 + inputs * (federation.pool_x.element_size() + normalised)
    compiled = resolve_kernels(config.train.kernels, resolve_device(config.train.device)) == "numba"
    data = sum(t.numel() * t.element_size() for t in (federation.pool_x, federation.val_x, federation.test_x))
    return {
        "population": n * (p + b) * 4,
        "gradients and optimizer state": (1 + optimizer_rows) * n * p * 4,
        "batches": n * batch * sample_bytes,
        "activations": 3 * trained_at_once * batch * activations * 4 + evaluated_inputs * activations * 4,
        "evaluation": evaluation_buffer_bytes(n, federation.num_classes),
        "gossip buffers": GossipAverager.buffer_bytes((n, p + b), compiled, torch.get_num_threads()),
        "data": data,
        "runtime": RUNTIME_BYTES,
    }


def check_memory(estimate: dict[str, int], available: int, where: str = "") -> None:
    """Refuse a run whose estimate exceeds the memory available (on the device `where`, if named)."""
    total = sum(estimate.values())
    if total > available:
        parts = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in estimate.items())
        raise ResourceError(
            f"the run needs about {total / 2**30:.1f} GiB ({parts}) but {available / 2**30:.1f} GiB is available"
            f"{f' on {where}' if where else ''}; "
            "lower num_sites, the model size (model.hidden / model.channels) or train.batch_size"
        )


def check_run_memory(config: Config, federation: Federation, module: torch.nn.Module) -> dict[str, int]:
    """The run's memory estimate, checked against the free memory of its device (of the machine
    on the CPU); returns the estimate."""
    device = resolve_device(config.train.device)
    on_device = available_device_memory(device)
    estimate = memory_estimate(config, federation, module)
    if on_device is None:
        check_memory(estimate, available_memory())
    else:
        check_memory(estimate, on_device, str(device))
    return estimate


def build_data_and_model(config: Config, console: Console | None = None) -> tuple[Federation, torch.nn.Module]:
    """The sites' data (frozen features in place of images when the model has a pretrained
    backbone) and one site's model (with the text head over the prompted class names)."""
    load_builtin_parts()  # a config read without the catalogue (a run's config.toml) names built-in parts
    frozen = frozen_parts(config.model, console)
    if frozen and config.model.pre_alignment != "none":
        frozen.projection = pre_aligned_projection(config, frozen, console)
    federation = build_federation(config, frozen.inputs if frozen and frozen.image else None)
    class_embeddings = frozen.class_embeddings(federation.class_names) if config.model.head == "text" else None
    zero_shot_dim = frozen.zero_shot_dim if frozen else 0
    module = build_model(config.model, federation.image_shape, federation.num_classes, class_embeddings, zero_shot_dim)
    check_model(module, config.model.name, federation.image_shape, federation.num_classes)
    check_loss(LOSSES.get(config.train.loss), config.train.loss, federation.num_classes)
    return federation, module


def build_experiment(config: Config, console: Console | None = None, sites: slice | None = None) -> Experiment:
    """The experiment of `config`; with `sites`, this process's population holds only that block
    of the sites (one process of a distributed run), each initialised as in the whole population."""
    sites = sites or slice(0, config.num_sites)
    federation, module = build_data_and_model(config, console)
    device = resolve_device(config.train.device)
    check_run_memory(config, federation, module)
    federation.to(device)
    population = Population(
        module,
        sites.stop - sites.start,
        seed=config.seed,
        init=config.model.init,
        strategy=config.train.engine,
        class_mask=federation.class_mask()[sites] if config.model.head == "text" else None,
        first_site=sites.start,
        loss=LOSSES.get(config.train.loss),
        device=device,
        model_name=config.model.name,
    )
    gossip = config.gossip
    experiment = Experiment(
        config=config,
        federation=federation,
        population=population,
        optimizer=build_optimizer(config.train, population.parameters.shape, population.theta.device),
        schedule=GossipSchedule.from_config(gossip, config.train.steps, config.seed),
        topology=functools.partial(build_adjacency, gossip.topology, config.num_sites, seed=config.seed, p=gossip.p),
        mixing_rule=MIXING_RULES.get(gossip.mixing),
    )
    experiment.algorithm = ALGORITHMS.get(gossip.algorithm)(experiment)
    experiment.gradient_transforms = [
        GRADIENT_TRANSFORMS.get(name)(experiment) for name in config.train.gradient_transforms
    ]
    return experiment


def topology_name(topology: Callable[[int], torch.Tensor]) -> str:
    """The gossip.topology name of a topology part: the registered graph a `build_adjacency`
    partial draws, else the part's qualified name."""
    if isinstance(topology, functools.partial) and topology.func is build_adjacency:
        return topology.args[0]
    return qualified_name(topology)


def part_names(experiment: Experiment) -> dict[str, Any]:
    """The parts that run, as a config names them (a user's unregistered part by qualified name)."""
    return {
        "gossip.algorithm": ALGORITHMS.name_of(type(experiment.algorithm)),
        "gossip.topology": topology_name(experiment.topology),
        "gossip.mixing": MIXING_RULES.name_of(experiment.mixing_rule),
        "train.loss": LOSSES.name_of(experiment.population.loss),
        "train.gradient_transforms": [GRADIENT_TRANSFORMS.name_of(type(t)) for t in experiment.gradient_transforms],
    }


def configured_names(config: Config, registry: Registry) -> list[str]:
    """The names of the parts of one kind a config names (one, or a chain's list)."""
    section, leaf = registry.field.split(".")
    value = getattr(getattr(config, section), leaf)
    return value if isinstance(value, list) else [value]


def record_parts(experiment: Experiment, config: Config) -> list[str]:
    """Write the parts that run into `config` (the run's copy, so config.toml re-runs them), adding
    the module a user's part comes from (the module that registered it, or that defines an
    unregistered one) to `plugins`, so the saved config imports it, and with it the part's own
    config section; returns the names that cannot be re-run from a config (a lambda, a part from
    a script or notebook, `__main__`, a population a user made from a module of their own: named
    by its class and size, so config.toml does not claim the configured model ran)."""
    for key, name in part_names(experiment).items():
        section, leaf = key.split(".")
        setattr(getattr(config, section), leaf, name)
    population = experiment.population
    if population.model_name != config.model.name:
        config.model.name = f"<{qualified_name(type(population.module))}: {population.num_parameters:,} parameters>"
    unresolvable, packages = [], imported_packages(config.plugins)
    registries = (ALGORITHMS, TOPOLOGIES, MIXING_RULES, MODELS, LOSSES, GRADIENT_TRANSFORMS)
    for registry, name in ((r, name) for r in registries for name in configured_names(config, r)):
        module = registry.origin(name)
        if "<" in name or module == "__main__":
            unresolvable.append(f"{registry.field} = {name!r}")
        elif module and not within(module, packages):
            config.plugins.append(module)
            packages.append(module)
    return unresolvable


def check_mixing_matrix(
    weights: Any, num_sites: int, part: str, adjacency: torch.Tensor | None = None, stochastic: str = "rows"
) -> None:
    """W must be a float32 [N, N] tensor (dense, or sparse: gossiplab.sparse) of finite,
    non-negative weights whose rows (or, for a push-sum algorithm, columns) sum to 1, and (given the
    round's graph) weigh only a site itself and its neighbours in that graph: a weight on another
    pair would quietly replace the configured topology (and send messages it never counts). A
    sparse W is checked on its entries only."""
    problem = None
    if not isinstance(weights, torch.Tensor):
        problem = f"returned {type(weights).__name__}, not a tensor"
    elif weights.shape != (num_sites, num_sites):
        problem = f"returned W of shape {list(weights.shape)}, not [{num_sites}, {num_sites}]"
    elif weights.dtype != torch.float32:
        problem = f"returned W of dtype {weights.dtype}; the population is float32 (use .float())"
    else:
        rows, columns, values = entries(weights.cpu())
        if not bool(torch.isfinite(values).all()):
            problem = "returned W with NaN or infinite weights"
        elif bool((values < 0).any()):
            k = int(torch.nonzero(values < 0)[0])
            example = f"W[{int(rows[k])}, {int(columns[k])}] = {float(values[k]):.3g}"
            problem = f"returned W with negative weights (e.g. {example}); weights must be >= 0"
        elif (worst := float((row_sums(oriented(weights.cpu(), stochastic)) - 1).abs().max())) > ROW_SUM_TOLERANCE:
            problem = f"returned W whose {stochastic} do not sum to 1 (off by up to {worst:.3g})"
        elif adjacency is not None:
            receivers, senders, _ = entries(adjacency.cpu())
            edges = torch.cat([receivers * num_sites + senders, senders * num_sites + receivers])
            outside = (rows != columns) & ~torch.isin(rows * num_sites + columns, edges)
            if bool(outside.any()):
                k = int(torch.nonzero(outside)[0])
                problem = (
                    f"put weight on {int(outside.sum())} pairs that are not edges of the round's graph (e.g. site "
                    f"{int(rows[k])} from site {int(columns[k])}): a mixing rule weighs only a site and its "
                    "neighbours in that graph"
                )
    if problem:
        raise PartMismatch(f"mixing ({part}) {problem}")


def check_experiment(experiment: Experiment, sites: slice) -> None:
    """Before step 1: the parts fit together. Sizes of population, optimizer, data and algorithm
    agree; the first graph and its W have the right shape, dtype and rows."""
    population, n = experiment.population, experiment.config.num_sites
    names = part_names(experiment)
    rows, shape = sites.stop - sites.start, population.parameters.shape
    problems = []
    if shape[0] != rows:
        problems.append(f"population has {shape[0]} rows for {rows} sites (num_sites = {n})")
    if getattr(experiment.optimizer, "shape", shape) != shape:
        problems.append(f"optimizer is built for {list(experiment.optimizer.shape)}, the population is {list(shape)}")
    if experiment.federation.num_sites != n:
        problems.append(f"federation has {experiment.federation.num_sites} sites, num_sites = {n}")
    algorithm = experiment.algorithm
    if getattr(algorithm, "experiment", None) is not experiment:
        problems.append(f"algorithm ({names['gossip.algorithm']}) was built for another experiment")
    adjacency = experiment.topology(0)
    if not isinstance(adjacency, torch.Tensor) or adjacency.dtype != torch.bool or adjacency.shape != (n, n):
        got = f"{adjacency.dtype} {list(adjacency.shape)}" if isinstance(adjacency, torch.Tensor) else adjacency
        problems.append(f"topology ({names['gossip.topology']}) gave {got!s:.60}, not a bool [{n}, {n}] adjacency")
    if problems:
        raise PartMismatch("the experiment's parts do not fit: " + "; ".join(problems))
    weights = algorithm.mixing(0, adjacency, experiment.state)
    check_mixing_matrix(weights, n, names["gossip.mixing"], adjacency, algorithm.stochastic)
