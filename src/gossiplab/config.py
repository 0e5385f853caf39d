"""Typed experiment configuration: presets, `key=value` overrides and validation before any work.

One `Config` describes one experiment completely; its TOML form (`config.toml` in every run
directory) re-runs it as is. Presets are TOML files of overrides on top of the defaults below,
which are themselves the embedded default experiment.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

SCHEDULES = ("every", "steps", "window", "uniform", "two-stage", "cosine", "none")
ROUND_SCHEDULES = ("uniform", "two-stage", "cosine")  # a fixed total of gossip.rounds
FINAL_MERGES = ("none", "exact", "exponential", "one-peer-exponential")
OPTIMIZERS = ("sgd", "adam", "adamw")
BACKBONES = ("pixels", "efficientnet-lite0", "clip")
HEADS = ("linear", "text")
TEXT_ENCODERS = ("minilm-l6", "clip")
LR_SCHEDULES = ("constant", "cosine", "warmup-constant", "warmup-cosine")
PARTITIONS = ("iid", "dirichlet", "shards", "by_domain")
WITHIN_SOURCE = ("iid", "dirichlet")
ENGINES = ("auto", "linear", "vmap", "loop")
INITS = ("shared", "independent")


def documented(default: Any, doc: str) -> Any:
    """A config field with its documentation (the configuration reference is generated from it)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every bad field and what is allowed."""


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["fashion-mnist"])
    partition: str = "dirichlet"
    alpha: float = 0.1
    min_site_samples: int = 64
    samples_per_site: int = 0
    classes_per_site: int = 2
    shards_per_class: int = 0
    sites_per_source: list[int] = field(default_factory=list)
    within_source: str = "iid"
    val_fraction: float = 0.1
    image_size: int = 28
    channels: int = 1
    train_per_source: int = 0
    test_per_source: int = 0


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [200, 200])
    channels: list[int] = field(default_factory=lambda: [16, 32])
    init: str = "shared"
    width: int = 1
    backbone: str = "pixels"
    feature_size: int = 64
    clip_path: str = ""
    head: str = "linear"
    text_encoder: str = "minilm-l6"
    prompt: str = "a photo of a {}."
    logit_scale: float = 20.0
    zero_shot_init: bool = False


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    engine: str = "auto"
    on_divergence: str = "stop"
    threads: int = 0
    lr_schedule: str = "constant"
    warmup_steps: int = 0


@dataclass
class GossipConfig:
    """When and how sites communicate; `algorithm`, `topology` and `mixing` name registered parts."""

    algorithm: str = "dsgd"
    topology: str = "random-one-peer"
    p: float = 1.0
    mixing: str = "uniform"
    schedule: str = "every"
    every: int = 10
    steps: list[int] = field(default_factory=list)
    window_start: int = 0
    window_end: int = 0
    final_merge: str = "none"
    final_merge_rounds: int = 0
    rounds: int = 0
    stage_split: float = 0.5
    early_share: float = 0.67
    warmup_fraction: float = 0.1


@dataclass
class EvalConfig:
    every: int = 100
    tensorboard: bool = False


@dataclass
class DistributedConfig:
    """Used only when several processes run the experiment (torchrun); see gossiplab.distributed."""

    timeout_s: float = 60.0
    on_failure: str = "drop"
    secret_env: str = "GOSSIPLAB_JOIN_SECRET"
    secret_file: str = ""


SECTIONS: dict[str, type] = {}  # config sections declared by parts (algorithms, mixing rules): name -> dataclass


def register_section(name: str, section: type) -> type:
    """Declare the config section `[name]` a part owns: a dataclass whose fields are its keys, with
    their defaults and (in the field's metadata) their documentation. Its optional
    `problems(config) -> list[str]` method validates it, each problem naming its field."""
    if name in SECTIONS and SECTIONS[name] is not section:
        raise ValueError(f"config section [{name}] is declared already by {SECTIONS[name].__qualname__}")
    SECTIONS[name] = section
    return section


def section_reference(builtin_only: bool = True) -> list[str]:
    """The configuration reference rows (Markdown) of the parts' own sections, from their
    declarations: key, default, documentation. The README's key table holds them verbatim."""
    load_builtin_parts()
    rows = []
    for name, section in SECTIONS.items():
        if builtin_only and not section.__module__.startswith("gossiplab."):
            continue
        for item in dataclasses.fields(section):
            default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
            shown = f"`{default}`" if isinstance(default, str) and default else json.dumps(default)
            rows.append(f"| `{name}.{item.name}` | {shown} | {item.metadata.get('doc', '')} |")
    return rows


def load_builtin_parts() -> None:
    """Import the modules that register the built-in parts and their config sections."""
    import gossiplab.algorithms  # noqa: F401


@dataclass
class Config:
    name: str = "default"
    description: str = "16 sites, Fashion-MNIST, Dirichlet(0.1) label skew, MLP, DSGD with random one-peer gossip"
    seed: int = 0
    num_sites: int = 16
    plugins: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sections: dict[str, Any] = field(default_factory=dict, repr=False)  # the parts' own sections, by name

    def __post_init__(self) -> None:
        load_builtin_parts()
        for name, section in SECTIONS.items():
            self.sections.setdefault(name, section())

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"Config has no section or field '{name}'")

    def to_dict(self) -> dict[str, Any]:
        table = dataclasses.asdict(self)
        return table | table.pop("sections")

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def _leaf_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every settable field as 'section.key' -> its type."""
    paths: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(cls).items():
        path = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            paths.update(_leaf_paths(hint, f"{path}."))
        elif path != "sections":
            paths[path] = hint
    return paths


def leaf_types() -> dict[str, Any]:
    """Every settable key of a config, the parts' sections included, as 'section.key' -> type."""
    load_builtin_parts()
    paths = _leaf_paths(Config)
    for name, section in SECTIONS.items():
        paths.update(_leaf_paths(section, f"{name}."))
    return paths


# keys of earlier versions, so that old config.toml files (run directories) and sweeps keep working
RENAMED_KEYS = {
    "gossip.match_samples": "dimat.match_samples",
    "gossip.l2c_lr": "l2c.lr",
    "gossip.l2c_weight_decay": "l2c.weight_decay",
    "gossip.meta_encoder": "l2c.meta_encoder",
    "gossip.prune_round": "l2c.prune_round",
    "gossip.keep_neighbours": "l2c.keep_neighbours",
    "gossip.ditto_lambda": "ditto.strength",
}
MERGE_ALGORITHMS = {"average": "dsgd", "push-sum": "sgp", "activation-matching": "dimat"}


def upgrade_keys(values: dict[str, Any]) -> dict[str, Any]:
    """Earlier keys in their current form. The algorithm was named by three keys, gossip.merge,
    gossip.order (CDSGD) and gossip.mixing (L2C); its options lived in [gossip]; gossip.val_batch
    served both L2C and FOMO."""
    values = dict(values)
    merge, order = values.pop("gossip.merge", None), values.pop("gossip.order", None)
    for old, new in RENAMED_KEYS.items():
        if old in values:
            values.setdefault(new, values.pop(old))
    if "gossip.val_batch" in values:
        batch = values.pop("gossip.val_batch")
        values.setdefault("l2c.val_batch", batch)
        values.setdefault("fomo.val_batch", batch)
    algorithm = MERGE_ALGORITHMS.get(merge, merge) if isinstance(merge, str) else None
    if order == "before-update" and algorithm in (None, "dsgd"):
        algorithm = "cdsgd"
    if values.get("gossip.mixing") in ("l2c", "meta-l2c"):
        algorithm = values.pop("gossip.mixing")
    if algorithm is not None:
        values.setdefault("gossip.algorithm", algorithm)
    return values


def _coerce(path: str, value: Any, types: dict[str, Any]) -> Any:
    """Check a raw TOML value against the field's type; ints are accepted where floats are."""
    hint = types[path]
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if item is str and isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"field '{path}' = {value!r}: must be a list of {item.__name__}")
        return list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"field '{path}' = {value!r}: must be a finite number")
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"field '{path}' = {value!r}: must be of type {hint.__name__}")
    return value


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def differing_fields(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    """The 'section.key' paths whose values differ between two flattened configs (a key either
    side lacks counts as differing): what a refusal to mix two configs names."""
    return sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))


def resolve_key(key: str, types: dict[str, Any]) -> str:
    """Full path of an override key; a bare leaf name ('topology') is accepted when unambiguous
    (the core sections win over the parts' own: 'lr' is train.lr)."""
    if key in types:
        return key
    matches = [path for path in types if path.rsplit(".", 1)[-1] == key]
    core = [path for path in matches if path.split(".")[0] not in SECTIONS]  # e.g. lr: train.lr, not l2c.lr
    if len(matches) == 1 or len(core) == 1:
        return core[0] if core else matches[0]
    if matches:
        raise ConfigError(f"key '{key}' is ambiguous: write one of {', '.join(matches)}")
    raise ConfigError(f"unknown key '{key}'; known keys: {', '.join(types)}")


def apply_values(config: Config, values: dict[str, Any]) -> None:
    """Set 'section.key' -> value pairs on a config, checking every key and type (earlier keys
    are read in their current form, `upgrade_keys`)."""
    config.__post_init__()  # sections of parts registered since the config was made (plug-ins)
    types = leaf_types()
    errors = []
    for key, value in upgrade_keys(values).items():
        try:
            path = resolve_key(key, types)
            target: Any = config
            *parents, leaf = path.split(".")
            for parent in parents:
                target = getattr(target, parent)
            setattr(target, leaf, _coerce(path, value, types))
        except ConfigError as error:
            errors.append(str(error))
    if errors:
        raise ConfigError("\n".join(errors))


def parse_override(text: str) -> tuple[str, Any]:
    """'gossip.topology=ring' -> ('gossip.topology', 'ring'); values are read as TOML, else as strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. gossip.topology=ring)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def preset_names() -> list[str]:
    folder = resources.files("gossiplab") / "presets"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> Config:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset '{name}'; available presets: {', '.join(names)}")
    text = (resources.files("gossiplab") / "presets" / f"{name}.toml").read_text()
    return config_from_toml(text, origin=f"preset '{name}'")


def config_from_toml(text: str, origin: str = "config", untrusted: tuple[Path, ...] = ()) -> Config:
    """The config of a TOML text; its plug-ins are imported first, so their sections are known."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{origin} is not valid TOML: {error}") from error
    _import_plugins(table.get("plugins", []), untrusted)
    config = Config()
    try:
        apply_values(config, flatten(table))
    except ConfigError as error:
        raise ConfigError(f"{origin}: {error}") from error
    return config


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
    _import_plugins(values.get("plugins", []), (path.parent,) if path is not None else ())
    apply_values(config, values)
    validate(config)
    return config


def read_run_config(path: Path) -> Config:
    """The config.toml of a finished run, read to look at its results: not validated, since a
    part it names may be a user's that is not importable here (the parts are recorded by name)."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror})") from error
    return config_from_toml(text, origin=str(path), untrusted=(path.parent,))


def _import_plugins(names: Any, untrusted: tuple[Path, ...]) -> None:
    from gossiplab.plugins import import_plugins

    names = _coerce("plugins", names, {"plugins": list[str]})
    import_plugins(names, untrusted=list(untrusted))


def part_problems(config: Config) -> list[str]:
    """The named parts exist, and what they say of the config: each registered section's own
    `problems(config)`, and the chosen algorithm's and mixing rule's cross-field rules."""
    from gossiplab.registry import ALGORITHMS, MIXING_RULES, MODELS, TOPOLOGIES, UnknownPart

    errors = []
    for registry, name in (
        (ALGORITHMS, config.gossip.algorithm),
        (TOPOLOGIES, config.gossip.topology),
        (MIXING_RULES, config.gossip.mixing),
        (MODELS, config.model.name),
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
    return errors


def validate(config: Config) -> None:
    """Refuse every impossible value up front, naming the field, the value and what is allowed."""
    errors: list[str] = []

    def need(ok: bool, path: str, allowed: str) -> None:
        if not ok:
            value: Any = config
            for part in path.split("."):
                value = getattr(value, part)
            errors.append(f"field '{path}' = {value!r}: {allowed}")

    def one_of(path: str, choices: tuple[str, ...]) -> None:
        value: Any = config
        for part in path.split("."):
            value = getattr(value, part)
        need(value in choices, path, f"must be one of {', '.join(choices)}")

    need(config.num_sites >= 1, "num_sites", "must be >= 1")
    need(0 <= config.seed < 2**63, "seed", "must be in [0, 2**63) (a 64-bit seed)")
    name = Path(config.name)
    need(bool(config.name.strip()) and not name.is_absolute() and ".." not in name.parts and "\\" not in config.name,
         "name", "must be a relative name without '..' (it names the run's directory under runs/)")  # fmt: skip
    data = config.data
    need(len(data.sources) >= 1, "data.sources", "must name at least one source")
    one_of("data.partition", PARTITIONS)
    one_of("data.within_source", WITHIN_SOURCE)
    need(data.alpha > 0, "data.alpha", "must be > 0")
    need(data.min_site_samples >= 1, "data.min_site_samples", "must be >= 1")
    need(data.samples_per_site >= 0, "data.samples_per_site", "must be >= 0 (0: split all the data)")
    need(data.classes_per_site >= 1, "data.classes_per_site", "must be >= 1")
    need(data.shards_per_class >= 0, "data.shards_per_class", "must be >= 0 (0: derived from num_sites)")
    need(0 <= data.val_fraction < 1, "data.val_fraction", "must be in [0, 1)")
    need(data.image_size >= 4, "data.image_size", "must be >= 4")
    need(data.channels in (1, 3), "data.channels", "must be 1 or 3")
    need(data.train_per_source >= 0, "data.train_per_source", "must be >= 0 (0: all training images)")
    need(data.test_per_source >= 0, "data.test_per_source", "must be >= 0 (0: all test images)")
    if data.partition == "by_domain":
        per_source = data.sites_per_source or [1] * len(data.sources)
        need(
            len(per_source) == len(data.sources) and all(k >= 1 for k in per_source),
            "data.sites_per_source",
            f"must list one count >= 1 per source ({len(data.sources)} sources), or be empty for one site each",
        )
        need(
            sum(per_source) == config.num_sites,
            "num_sites",
            f"must equal the sites of data.sites_per_source with partition 'by_domain' ({sum(per_source)})",
        )
    one_of("model.init", INITS)
    need(all(h >= 1 for h in config.model.hidden), "model.hidden", "must be a list of sizes >= 1 ([] = linear)")
    model = config.model
    need(model.width >= 1, "model.width", "must be >= 1 (ResNet-20 width multiplier)")
    one_of("model.backbone", BACKBONES)
    one_of("model.head", HEADS)
    one_of("model.text_encoder", TEXT_ENCODERS)
    need(model.feature_size >= 32, "model.feature_size", "must be >= 32 (pixels fed to the frozen image encoder)")
    need(model.logit_scale > 0, "model.logit_scale", "must be > 0")
    need(model.prompt.count("{}") == 1, "model.prompt", "must contain '{}' exactly once, where the class name goes")
    need(
        model.backbone == "pixels" or model.name == "mlp",
        "model.name",
        f"must be 'mlp' with model.backbone = '{model.backbone}' (the trainable part sits on feature vectors)",
    )
    need(
        "clip" not in (model.backbone, model.text_encoder if model.head == "text" else "") or bool(model.clip_path),
        "model.clip_path",
        "must name a local folder holding a CLIP saved with save_pretrained when a CLIP encoder is used",
    )
    need(
        not model.zero_shot_init or (model.head == "text" and model.backbone != "pixels"),
        "model.zero_shot_init",
        "needs model.head = 'text' and a pretrained model.backbone (efficientnet-lite0 or clip)",
    )
    need(
        len(config.model.channels) >= 1 and all(c >= 1 for c in config.model.channels),
        "model.channels",
        "must be a non-empty list of channel counts >= 1",
    )
    need(config.train.steps >= 1, "train.steps", "must be >= 1")
    need(config.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    one_of("train.optimizer", OPTIMIZERS)
    need(config.train.lr > 0, "train.lr", "must be > 0")
    need(0 <= config.train.momentum < 1, "train.momentum", "must be in [0, 1)")
    need(config.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(0 <= config.train.beta1 < 1, "train.beta1", "must be in [0, 1)")
    need(0 <= config.train.beta2 < 1, "train.beta2", "must be in [0, 1)")
    need(config.train.eps > 0, "train.eps", "must be > 0")
    one_of("train.engine", ENGINES)
    need(config.train.engine != "linear" or (model.name == "mlp" and model.head == "linear"), "train.engine",
         "'linear' is for plain MLPs (model.name = 'mlp', model.head = 'linear'); use auto, vmap or loop")  # fmt: skip
    one_of("train.lr_schedule", LR_SCHEDULES)
    need(
        0 <= config.train.warmup_steps < config.train.steps,
        "train.warmup_steps",
        f"must be in [0, train.steps={config.train.steps})",
    )
    one_of("train.on_divergence", ("stop", "drop"))
    need(config.train.threads >= 0, "train.threads", "must be >= 0 (0: PyTorch's default)")
    need(0 < config.gossip.p <= 1, "gossip.p", "must be in (0, 1]")
    one_of("gossip.schedule", SCHEDULES)
    need(config.gossip.every >= 1, "gossip.every", "must be >= 1")
    need(
        all(1 <= s <= config.train.steps for s in config.gossip.steps),
        "gossip.steps",
        f"every step must be in [1, train.steps={config.train.steps}]",
    )
    need(
        config.gossip.schedule != "steps" or len(config.gossip.steps) > 0,
        "gossip.steps",
        "must list at least one step when gossip.schedule = 'steps'",
    )
    if config.gossip.schedule == "window":
        need(
            1 <= config.gossip.window_start <= config.gossip.window_end <= config.train.steps,
            "gossip.window_start",
            f"with gossip.window_end={config.gossip.window_end} must satisfy 1 <= window_start <= window_end <= "
            f"train.steps={config.train.steps} when gossip.schedule = 'window'",
        )
    if config.gossip.schedule in ROUND_SCHEDULES:
        need(
            1 <= config.gossip.rounds <= config.train.steps // 2,
            "gossip.rounds",
            f"must be in [1, train.steps/2 = {config.train.steps // 2}] for gossip.schedule = "
            f"'{config.gossip.schedule}' (the total number of gossip rounds, spread over the steps)",
        )
    need(0 < config.gossip.stage_split < 1, "gossip.stage_split", "must be in (0, 1) (end of the early stage)")
    need(0 < config.gossip.early_share < 1, "gossip.early_share", "must be in (0, 1) (share of rounds early)")
    need(0 <= config.gossip.warmup_fraction < 1, "gossip.warmup_fraction", "must be in [0, 1)")
    one_of("gossip.final_merge", FINAL_MERGES)
    need(config.gossip.final_merge_rounds >= 0, "gossip.final_merge_rounds", "must be >= 0 (0: ceil(log2 N))")
    need(config.eval.every >= 1, "eval.every", "must be >= 1")
    need(config.distributed.timeout_s > 0, "distributed.timeout_s", "must be > 0 (seconds)")
    one_of("distributed.on_failure", ("drop", "stop"))
    need(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", config.distributed.secret_env)), "distributed.secret_env",
         "must name the environment variable that holds the join secret (never the secret itself)")  # fmt: skip
    need(not config.distributed.secret_file or Path(config.distributed.secret_file).expanduser().is_file(),
         "distributed.secret_file", "must be a readable file holding the join secret, or empty")  # fmt: skip
    need(
        not config.eval.tensorboard or importlib.util.find_spec("tensorboardX") is not None,
        "eval.tensorboard",
        "needs the tensorboard extra: pip install 'gossiplab[tensorboard]'",
    )
    errors += part_problems(config)
    from gossiplab.data.sources import SOURCES, is_local

    unknown = [s for s in data.sources if s not in SOURCES and not is_local(s)]
    need(
        not unknown,
        "data.sources",
        f"{unknown} unknown: use {', '.join(SOURCES)}, or a path to an .npz file or a folder",
    )
    if errors:
        raise ConfigError("\n".join(errors))
