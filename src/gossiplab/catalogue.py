"""The catalogue of parts, and the checks of a config that need it.

A config is data (gossiplab.config imports no part); whether the algorithm, topology, mixing rule,
model, loss and data sources it names exist, and what they say of it, is known only once the parts
are imported. This module sits above both: it imports the built-in parts (their modules register
them), and `build_config` reads a preset or a TOML file, applies the overrides and checks the
result against the parts, so every impossible value is refused before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from gossiplab.config import (
    Config,
    ConfigError,
    apply_values,
    choice_problems,
    config_from_toml,
    core_tables,
    import_config_plugins,
    load_preset,
    parse_override,
    problem,
    problems_of,
)
from gossiplab.launch import launched_distributed
from gossiplab.registry import (
    ALGORITHMS,
    GRADIENT_TRANSFORMS,
    LOSSES,
    MIXING_RULES,
    MODELS,
    TOPOLOGIES,
    UnknownPart,
)


def load_builtin_parts() -> None:
    """Import the modules that register the built-in parts (algorithms, topologies, mixing rules,
    models, the loss, gradient transforms); a user's parts are imported by the config's `plugins`."""
    import gossiplab.algorithms
    import gossiplab.gradients
    import gossiplab.mixing
    import gossiplab.models
    import gossiplab.population
    import gossiplab.topology  # noqa: F401


def build_config(preset: str = "default", overrides: list[str] | None = None, path: Path | None = None) -> Config:
    """The preset (or the config file at `path`) with the overrides applied, validated."""
    if path is not None:
        try:
            text = path.read_text()
        except OSError as error:
            raise ConfigError(f"--config {path}: cannot read it ({error.strerror})") from error
        config = config_from_toml(text, origin=str(path), untrusted=(path.parent,))
    else:
        config = load_preset(preset)
    values = dict(parse_override(o) for o in overrides or [])
    import_config_plugins(values.get("plugins", []), (path.parent,) if path is not None else ())
    apply_values(config, values)
    validate(config)
    return config


def part_problems(config: Config) -> list[str]:
    """The named parts, data sources and device exist (and numba, if named), and what the parts say
    of the config: each registered section's own `problems(config)`, and the chosen algorithm's and
    mixing rule's cross-field rules."""
    from gossiplab.data.sources import SOURCES, is_local  # (PyTorch: after a config's own checks)
    from gossiplab.devices import compiled_kernels_installed, device_problem
    from gossiplab.network import trace_problems

    load_builtin_parts()
    errors = []
    for registry, name in (
        (ALGORITHMS, config.gossip.algorithm),
        (TOPOLOGIES, config.gossip.topology),
        (MIXING_RULES, config.gossip.mixing),
        (MODELS, config.model.name),
        (LOSSES, config.train.loss),
        *((GRADIENT_TRANSFORMS, name) for name in config.train.gradient_transforms),
    ):
        try:
            registry.get(name)
        except UnknownPart as error:
            errors.append(str(error))
            continue
        problems = registry.property(name, "problems")
        errors += problems(config) if problems else []
    for section in config.sections.values():
        if hasattr(section, "problems"):
            errors += section.problems(config)
    errors += trace_problems(config)
    device = device_problem(config.train.device)
    if device is not None:
        errors.append(problem(config, "train.device", device))
    if config.train.kernels == "numba" and not compiled_kernels_installed():
        errors.append(
            problem(
                config, "train.kernels", "'numba' needs numba: pip install 'gossiplab[compiled]'; or use auto or torch"
            )
        )
    unknown = [s for s in config.data.sources if s not in SOURCES and not is_local(s)]
    if unknown:
        errors.append(
            problem(
                config,
                "data.sources",
                f"{unknown} unknown: use {', '.join(SOURCES)}, or a path to an .npz file or a folder",
            )
        )
    return errors


def distributed_problems(config: Config, world_size: int) -> list[str]:
    """What the multi-process runtime cannot run, for `world_size` processes: parts that need the
    whole population in one process (they do not declare `distributed=True`), and fewer sites than
    processes."""
    load_builtin_parts()
    errors = []
    for registry, name in (
        (ALGORITHMS, config.gossip.algorithm),
        (MIXING_RULES, config.gossip.mixing),
        *((GRADIENT_TRANSFORMS, name) for name in config.train.gradient_transforms),
    ):
        if name in registry.names() and not registry.property(name, "distributed", False):
            allowed = [n for n in registry.names() if registry.property(n, "distributed", False)]
            where = f"runs only in one process; across processes use one of {', '.join(allowed)}"
            errors.append(problem(config, registry.field, where))
    if config.num_sites < world_size:
        errors.append(problem(config, "num_sites", f"{config.num_sites} sites cannot fill {world_size} processes"))
    return errors


def validate(config: Config) -> None:
    """Refuse every impossible value up front, naming the field, the value and what is allowed:
    the declared choices, each section's own `problems`, and the named parts' rules."""
    name = Path(config.name)
    errors = problems_of(config, [
        (config.num_sites >= 1, "num_sites", "must be >= 1"),
        (0 <= config.seed < 2**63, "seed", "must be in [0, 2**63) (a 64-bit seed)"),
        (bool(config.name.strip()) and not name.is_absolute() and ".." not in name.parts and "\\" not in config.name
         and not any(part.startswith(".") for part in Path(config.name.strip()).parts) and config.name.strip() != ".",
         "name", "must be a relative name without '..' whose parts do not start with '.' (it names the run's "
                 "directory under runs/, which must not be hidden)"),
    ])  # fmt: skip
    errors += choice_problems(config)
    for _, section in core_tables(config)[1:]:
        errors += section.problems(config)
    errors += part_problems(config)
    if launched_distributed():
        errors += distributed_problems(config, int(os.environ["WORLD_SIZE"]))
    if errors:
        raise ConfigError("\n".join(errors))
