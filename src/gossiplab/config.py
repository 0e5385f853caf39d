"""Typed experiment configuration: presets, `key=value` overrides and validation before any work.

One `Config` describes one experiment completely; its TOML form (`config.toml` in every run
directory) re-runs it as is. Presets are TOML files of overrides on top of the defaults below,
which are themselves the embedded default experiment.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from gossiplab.errors import ConfigError

SCHEDULES = ("every", "steps", "window", "uniform", "two-stage", "cosine", "cosine-random", "none")
ROUND_SCHEDULES = ("uniform", "two-stage", "cosine", "cosine-random")  # a fixed total of gossip.rounds
FINAL_MERGES = ("none", "exact", "exponential", "one-peer-exponential")
OPTIMIZERS = ("sgd", "adam", "adamw")
BACKBONES = ("pixels", "efficientnet-lite0", "clip")
HEADS = ("linear", "text")
TEXT_ENCODERS = ("minilm-l6", "clip")
LOCAL_TESTS = ("split", "class-weighted")
LR_SCHEDULES = ("constant", "cosine", "warmup-constant", "warmup-cosine")
PARTITIONS = ("iid", "dirichlet", "shards", "by_domain")
PRE_ALIGNMENTS = ("none", "held-out", "cross-domain")
WITHIN_SOURCE = ("iid", "dirichlet")
ENGINES = ("auto", "linear", "vmap", "loop")
INITS = ("shared", "independent")
NORMS = ("group", "batch", "none")
KERNELS = ("auto", "numba", "torch")
NORMALIZATION_GOSSIP = ("average", "local")


def documented(default: Any, doc: str, choices: tuple[str, ...] = ()) -> Any:
    """A config field with its documentation and, for a fixed set, its allowed values: the
    configuration reference is generated from them, and `validate` checks the choices."""
    metadata = {"doc": doc, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def table_of(config: Any, path: str) -> tuple[Any, str]:
    """The table holding the key `path` (the config itself, a core section such as `train`, or a
    part's own section from `config.sections`) and the key's name in it."""
    *parents, leaf = path.split(".")
    table, sections = config, getattr(config, "sections", {})
    for depth, parent in enumerate(parents):
        table = sections[parent] if depth == 0 and parent in sections else getattr(table, parent)
    return table, leaf


def problem(config: Any, path: str, allowed: str) -> str:
    """'field PATH = VALUE: ALLOWED', the value read from the config."""
    table, leaf = table_of(config, path)
    return f"field '{path}' = {getattr(table, leaf)!r}: {allowed}"


def problems_of(config: Any, checks: list[tuple[bool, str, str]]) -> list[str]:
    """The failed checks (ok, 'section.key', what is allowed) as messages."""
    return [problem(config, path, allowed) for ok, path, allowed in checks if not ok]


@dataclass
class DataConfig:
    """[data]: where the sites' data comes from and how it is split over them."""

    sources: list[str] = documented(
        ["fashion-mnist"], "source names (`gossiplab data`), or paths to an `.npz` file / image folder"
    )
    partition: str = documented("dirichlet", "how the data is split over the sites", PARTITIONS)
    alpha: float = documented(0.1, "dirichlet: the concentration (smaller: more label skew), > 0")
    min_site_samples: int = documented(64, "dirichlet: redraw until every site has at least this many samples")
    samples_per_site: int = documented(
        0, "dirichlet, iid: each site draws this many samples from the shared pool, so sites may share samples and "
        "their number is not bounded by the data (0: split all the data)",
    )  # fmt: skip
    classes_per_site: int = documented(2, "shards: M classes per site")
    shards_per_class: int = documented(0, "shards: P shards per class (0: derived from num_sites)")
    sites_per_source: list[int] = documented([], "by_domain: sites per source ([]: one each)")
    within_source: str = documented("iid", "by_domain: how a source is split over its sites", WITHIN_SOURCE)
    val_fraction: float = documented(0.1, "each site's validation share, in [0, 1)")
    image_size: int = documented(28, "the common image size every source is brought to")
    channels: int = documented(1, "the common number of channels, 1 or 3")
    train_per_source: int = documented(
        0,
        "cap each source at a fixed random subset of training images (0: all; independent of `seed`, so cached "
        "features serve every seed)",
    )
    test_per_source: int = documented(0, "the same for test images (0: all)")

    def problems(self, config: Any) -> list[str]:
        checks = [
            (len(self.sources) >= 1, "data.sources", "must name at least one source"),
            (
                len(set(self.sources)) == len(self.sources),
                "data.sources",
                f"names {sorted({x for x in self.sources if self.sources.count(x) > 1})} more than once (each source's "
                "data would be used twice); name each source once",
            ),
            (self.alpha > 0, "data.alpha", "must be > 0"),
            (self.min_site_samples >= 1, "data.min_site_samples", "must be >= 1"),
            (self.samples_per_site >= 0, "data.samples_per_site", "must be >= 0 (0: split all the data)"),
            (self.classes_per_site >= 1, "data.classes_per_site", "must be >= 1"),
            (self.shards_per_class >= 0, "data.shards_per_class", "must be >= 0 (0: derived from num_sites)"),
            (0 <= self.val_fraction < 1, "data.val_fraction", "must be in [0, 1)"),
            (self.image_size >= 4, "data.image_size", "must be >= 4"),
            (self.channels in (1, 3), "data.channels", "must be 1 or 3"),
            (self.train_per_source >= 0, "data.train_per_source", "must be >= 0 (0: all training images)"),
            (self.test_per_source >= 0, "data.test_per_source", "must be >= 0 (0: all test images)"),
        ]
        if self.partition == "by_domain":
            per_source = self.sites_per_source or [1] * len(self.sources)
            checks += [
                (len(per_source) == len(self.sources) and all(k >= 1 for k in per_source), "data.sites_per_source",
                 f"must list one count >= 1 per source ({len(self.sources)} sources), or be empty for one site each"),
                (sum(per_source) == config.num_sites, "num_sites",
                 f"must equal the sites of data.sites_per_source with partition 'by_domain' ({sum(per_source)})"),
            ]  # fmt: skip
        return problems_of(config, checks)


@dataclass
class ModelConfig:
    """[model]: each site's network (a registered model), its frozen backbone and its head."""

    name: str = documented(
        "mlp", "the network: `mlp`, `cnn` (GroupNorm CNN), `resnet20` (GroupNorm), or a user's registered model"
    )
    hidden: list[int] = documented([200, 200], "mlp: hidden widths ([]: linear)")
    channels: list[int] = documented([16, 32], "cnn: channels per convolution block")
    init: str = documented("shared", "one initialisation for all sites, or one each", INITS)
    width: int = documented(1, "resnet20: width multiplier")
    backbone: str = documented(
        "pixels", "train on images, or on the cached features of a frozen pretrained encoder", BACKBONES
    )
    feature_size: int = documented(64, "pixels fed to the frozen image encoder, >= 32")
    clip_path: str = documented("", "a local CLIP folder (`save_pretrained`), for a CLIP encoder")
    head: str = documented(
        "linear",
        "`linear` (MDSL: one head over the union label space) / `text` (MAZEL: cosine to each site's own class-name "
        "embeddings)",
        HEADS,
    )
    text_encoder: str = documented("minilm-l6", "the frozen text encoder of the class names", TEXT_ENCODERS)
    prompt: str = documented("a photo of a {}.", "the prompt template, `{}` where the class name goes")
    logit_scale: float = documented(20.0, "s in logits = s cos(v, t_k), > 0")
    zero_shot_init: bool = documented(False, "start from the encoder's zero-shot embedding (ConSE for EfficientNet)")
    pre_alignment: str = documented(
        "none", "simulated pre-training (LiT, gossiplab.prealign): the zero-shot embedding is a projection of the "
        "features into the text space, trained once on public images no site holds: each source's images outside "
        "the run's subset (`held-out`), or only sources the run does not use (`cross-domain`)", PRE_ALIGNMENTS,
    )  # fmt: skip
    pre_alignment_per_source: int = documented(5000, "pre_alignment: at most this many public images per source")
    pre_alignment_steps: int = documented(
        1500, "pre_alignment: Adam steps of the central alignment (batch 256, lr 1e-3), >= 1"
    )
    norm: str = documented("group", "cnn/resnet20 normalisation: GroupNorm, BatchNorm (per-site statistics) or none",
                           NORMS)  # fmt: skip
    dropout: float = documented(0.0, "dropout before the last layer (mlp, cnn, resnet20), in [0, 1)")

    def problems(self, config: Any) -> list[str]:
        return problems_of(config, [
            (all(h >= 1 for h in self.hidden), "model.hidden", "must be a list of sizes >= 1 ([] = linear)"),
            (self.width >= 1, "model.width", "must be >= 1 (ResNet-20 width multiplier)"),
            (0 <= self.dropout < 1, "model.dropout", "must be in [0, 1)"),
            (self.feature_size >= 32, "model.feature_size", "must be >= 32 (pixels fed to the frozen image encoder)"),
            (self.logit_scale > 0, "model.logit_scale", "must be > 0"),
            (self.prompt.count("{}") == 1, "model.prompt", "must contain '{}' exactly once, where the class name goes"),
            (self.backbone == "pixels" or self.name == "mlp", "model.name",
             f"must be 'mlp' with model.backbone = '{self.backbone}' (the trainable part sits on feature vectors)"),
            ("clip" not in (self.backbone, self.text_encoder if self.head == "text" else "") or bool(self.clip_path),
             "model.clip_path",
             "must name a local folder holding a CLIP saved with save_pretrained when a CLIP encoder is used"),
            (not self.zero_shot_init or (self.head == "text" and self.backbone != "pixels"), "model.zero_shot_init",
             "needs model.head = 'text' and a pretrained model.backbone (efficientnet-lite0 or clip)"),
            (self.pre_alignment == "none" or self.zero_shot_init, "model.pre_alignment",
             "needs model.zero_shot_init = true (the pre-aligned projection is the zero-shot start)"),
            (self.pre_alignment_per_source >= 1, "model.pre_alignment_per_source", "must be >= 1"),
            (self.pre_alignment_steps >= 1, "model.pre_alignment_steps", "must be >= 1"),
            (len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "model.channels",
             "must be a non-empty list of channel counts >= 1"),
        ])  # fmt: skip


@dataclass
class TrainConfig:
    """[train]: the local steps every site takes."""

    steps: int = documented(2000, "local steps T, >= 1")
    batch_size: int = documented(32, "images per site per step, >= 1")
    optimizer: str = documented("sgd", "the stacked optimizer of every site", OPTIMIZERS)
    lr: float = documented(0.05, "learning rate, > 0")
    momentum: float = documented(0.9, "sgd: heavy-ball momentum, in [0, 1)")
    weight_decay: float = documented(0.0, "L2 (sgd, adam) or decoupled (adamw) weight decay, >= 0")
    beta1: float = documented(0.9, "adam(w): first-moment decay, in [0, 1)")
    beta2: float = documented(0.999, "adam(w): second-moment decay, in [0, 1)")
    eps: float = documented(1e-8, "adam(w): epsilon, > 0")
    engine: str = documented(
        "auto", "how the N gradients are computed (`linear`: plain MLPs only; `gossiplab bench` measures them)", ENGINES
    )
    on_divergence: str = documented(
        "stop", "a site with a NaN/Inf loss: stop the run, or drop the site and go on", ("stop", "drop")
    )
    threads: int = documented(
        0,
        "CPU threads the run computes with, pinned for the run and recorded in config.toml (0: PyTorch's count "
        "when gossiplab started); the same bits need the same count",
    )
    clip_grad_norm: float = documented(
        0.0, "clip each site's gradient to this L2 norm before its step (0: off), >= 0; a remedy for divergence"
    )
    gradient_transforms: list[str] = documented(
        [],
        "the local step's named chain: links that change every site's gradient, in this order, after the "
        "algorithm's own and before clipping (`proximal`, or a user's registered link; gossiplab.gradients)",
    )
    reset_optimizer: bool = documented(
        False, "every site's optimizer state starts fresh after each communication round (DIMAT's code builds a new "
        "optimizer for each training phase)",
    )  # fmt: skip
    lr_schedule: str = documented("constant", '`warmup-constant` is MAZEL\'s "uniform with warmup"', LR_SCHEDULES)
    warmup_steps: int = documented(0, "linear warmup steps, in [0, steps)")
    loss: str = documented("cross-entropy", "loss(logits, targets): `cross-entropy`, or a user's registered loss")
    device: str = documented("cpu", "where the run's tensors live: cpu, cuda, cuda:K, mps or auto")
    kernels: str = documented("auto", "gossip kernels: compiled (numba, CPU only, the `compiled` extra) or "
                              "torch-only; auto: numba on the CPU when installed", KERNELS)  # fmt: skip

    def problems(self, config: Any) -> list[str]:
        model = config.model
        return problems_of(config, [
            (self.kernels != "numba" or self.device == "cpu", "train.kernels",
             "'numba' runs on the CPU only (train.device = 'cpu'); use auto or torch"),
            (self.steps >= 1, "train.steps", "must be >= 1"),
            (self.batch_size >= 1, "train.batch_size", "must be >= 1"),
            (self.lr > 0, "train.lr", "must be > 0"),
            (0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)"),
            (self.weight_decay >= 0, "train.weight_decay", "must be >= 0"),
            (0 <= self.beta1 < 1, "train.beta1", "must be in [0, 1)"),
            (0 <= self.beta2 < 1, "train.beta2", "must be in [0, 1)"),
            (self.eps > 0, "train.eps", "must be > 0"),
            (self.engine != "linear" or (model.name == "mlp" and model.head == "linear"), "train.engine",
             "'linear' is for plain MLPs (model.name = 'mlp', model.head = 'linear'); use auto, vmap or loop"),
            (0 <= self.warmup_steps < self.steps, "train.warmup_steps", f"must be in [0, train.steps={self.steps})"),
            (self.threads >= 0, "train.threads", "must be >= 0 (0: PyTorch's default)"),
            (self.clip_grad_norm >= 0, "train.clip_grad_norm", "must be >= 0 (0: no clipping)"),
        ])  # fmt: skip


@dataclass
class GossipConfig:
    """[gossip]: when and how sites communicate; `algorithm`, `topology` and `mixing` name registered parts."""

    algorithm: str = documented(
        "dsgd",
        "what a round does: `dsgd` (D-PSGD)/`cdsgd` (mix before the step)/`sgp` (push-sum)/`dimat` "
        "(activation-matched merge)/`weight-matching`/`merge-average` (WA through the same merge)/`ditto` "
        "(with FedAvg's global track)/`l2c`/`meta-l2c` "
        "(learned weights)/`local` (no communication), or a user's registered algorithm",
    )
    topology: str = documented(
        "random-one-peer",
        "the graph of each round: `complete`/`ring`/`exponential`/`one-peer-exponential`/`random-one-peer` (a "
        "matching of the active sites)/`random-one-peer-pull` (the single-merge paper's: each active site pulls "
        "from one random peer), or a user's registered graph",
    )
    p: float = documented(1.0, "random-one-peer(-pull): each site's probability of taking part in a round, in (0, 1]")
    mixing: str = documented(
        "uniform",
        "W from the graph: `uniform`/`metropolis`/`influence` (MAZEL's softmax over DICE one-hop influence)/"
        "`influence-dice` (DICE's raw score with the receiver's held-out gradient)/`influence-share` (self-weight "
        "kept, the rest by positive influence)/`fomo`, or a user's registered rule",
    )
    influence_temperature: float = documented(
        1.0, "influence: softmax temperature over each site's and its peers' scores relative to its own, > 0"
    )
    dice_temperature: float = documented(
        0.001, "influence-dice: softmax temperature over the raw DICE scores I_ij = lr W_ij <g'_i, g_j> (a loss "
        "decrease, so it depends on the run's lr and gradients), > 0",
    )  # fmt: skip
    schedule: str = documented("every", "when rounds happen", SCHEDULES)
    start_after: int = documented(
        0, "steps of local training before any round, >= 0: DIMAT's pre-training phase, every agent alone "
        "(`every` counts from here; it must leave at least one round in train.steps)",
    )  # fmt: skip
    every: int = documented(10, "every/window: steps between rounds, >= 1")
    steps: list[int] = documented([], "steps: the steps that gossip")
    window_start: int = documented(0, "window: first step of the window")
    window_end: int = documented(0, "window: last step of the window")
    outside_window_p: float = documented(
        0.0, "window: outside it, each site pulls from one random peer with this probability every `every` steps "
        "(the single-merge paper's R; 0: silent), in [0, 1]",
    )  # fmt: skip
    final_merge: str = documented(
        "none", "one global merge after the last step: exact, or k rounds of uniform gossip on that graph", FINAL_MERGES
    )
    final_merge_rounds: int = documented(0, "k for a gossip final merge (0: ceil(log2 N))")
    rounds: int = documented(
        0, "uniform/two-stage/cosine: the fixed total of gossip rounds (cosine-random: the expected total), in "
        "[1, steps/2]",
    )  # fmt: skip
    stage_split: float = documented(0.5, "two-stage: end of the early stage, in (0, 1)")
    early_share: float = documented(0.67, "two-stage: share of the rounds in the early stage, in (0, 1)")
    warmup_fraction: float = documented(0.1, "cosine, cosine-random: warmup share of the steps, in [0, 1)")
    normalization: str = documented(
        "average", "normalisation layers (affine parameters, BatchNorm statistics): gossiped like the rest, or kept "
        "local as in FedBN", NORMALIZATION_GOSSIP,
    )  # fmt: skip

    def problems(self, config: Any) -> list[str]:
        steps = config.train.steps
        checks = [
            (0 < self.p <= 1, "gossip.p", "must be in (0, 1]"),
            (self.influence_temperature > 0, "gossip.influence_temperature", "must be > 0"),
            (self.dice_temperature > 0, "gossip.dice_temperature", "must be > 0"),
            (0 <= self.outside_window_p <= 1, "gossip.outside_window_p", "must be in [0, 1]"),
            (self.every >= 1, "gossip.every", "must be >= 1"),
            (self.start_after >= 0, "gossip.start_after", "must be >= 0 (0: rounds from the start)"),
            (all(1 <= s <= steps for s in self.steps), "gossip.steps",
             f"every step must be in [1, train.steps={steps}]"),
            (self.schedule != "steps" or len(self.steps) > 0, "gossip.steps",
             "must list at least one step when gossip.schedule = 'steps'"),
            (self.schedule != "window" or 1 <= self.window_start <= self.window_end <= steps, "gossip.window_start",
             f"with gossip.window_end={self.window_end} must satisfy 1 <= window_start <= window_end <= "
             f"train.steps={steps} when gossip.schedule = 'window'"),
            (self.schedule not in ROUND_SCHEDULES or 1 <= self.rounds <= steps // 2, "gossip.rounds",
             f"must be in [1, train.steps/2 = {steps // 2}] for gossip.schedule = '{self.schedule}' "
             "(the total number of gossip rounds, spread over the steps)"),
            (0 < self.stage_split < 1, "gossip.stage_split", "must be in (0, 1) (end of the early stage)"),
            (0 < self.early_share < 1, "gossip.early_share", "must be in (0, 1) (share of rounds early)"),
            (0 <= self.warmup_fraction < 1, "gossip.warmup_fraction", "must be in [0, 1)"),
            (self.final_merge_rounds >= 0, "gossip.final_merge_rounds", "must be >= 0 (0: ceil(log2 N))"),
            (self.schedule != "every" or not self.start_after or self.start_after + self.every <= steps,
             "gossip.start_after", f"with gossip.every={self.every} leaves no gossip round in train.steps={steps} "
             f"(the first would be at step {self.start_after + self.every}): a pre-training phase with nothing "
             "after it; lower it, or set gossip.schedule=none for a run without gossip"),
            (self.schedule != "steps" or any(s > self.start_after for s in self.steps), "gossip.start_after",
             f"leaves none of gossip.steps={self.steps} a round (no round in the first start_after steps): lower it, "
             "or set gossip.schedule=none for a run without gossip"),
        ]  # fmt: skip
        return problems_of(config, checks)


@dataclass
class EvalConfig:
    """[eval]: how often every model is evaluated (and checkpointed)."""

    every: int = documented(100, "steps between evaluations (and checkpoints), >= 1")
    tensorboard: bool = documented(False, "also log every metric to RUN/tensorboard (the `tensorboard` extra)")
    local_test: str = documented(
        "split", "a site's local accuracy: on its own disjoint share of the test set (`split`), or L2C's rule, on "
        "the whole test set per class weighted by the site's class proportions (`class-weighted`)", LOCAL_TESTS,
    )  # fmt: skip

    def problems(self, config: Any) -> list[str]:
        return problems_of(config, [
            (self.every >= 1, "eval.every", "must be >= 1"),
            (not self.tensorboard or importlib.util.find_spec("tensorboardX") is not None, "eval.tensorboard",
             "needs the tensorboard extra: pip install 'gossiplab[tensorboard]'"),
        ])  # fmt: skip


@dataclass
class DistributedConfig:
    """[distributed]: used only when several processes run the experiment (torchrun); see gossiplab.distributed."""

    timeout_s: float = documented(60.0, "seconds before an unanswered exchange counts as a lost peer")
    on_failure: str = documented(
        "drop",
        "a lost peer: drop its sites and go on, or stop (also: a process refused for the join secret)",
        ("drop", "stop"),
    )
    secret_env: str = documented(
        "GOSSIPLAB_JOIN_SECRET", "the environment variable that holds the join secret (never the secret itself)"
    )
    secret_file: str = documented("", "or a file that holds it")
    authenticate_payloads: bool = documented(
        True,
        "with a join secret: every tensor exchanged carries an HMAC-SHA256 tag, checked on receipt (false: "
        "only the membership is proven)",
    )

    def problems(self, config: Any) -> list[str]:
        return problems_of(config, [
            (self.timeout_s > 0, "distributed.timeout_s", "must be > 0 (seconds)"),
            (bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.secret_env)), "distributed.secret_env",
             "must name the environment variable that holds the join secret (never the secret itself)"),
            (not self.secret_file or Path(self.secret_file).expanduser().is_file(), "distributed.secret_file",
             "must be a readable file holding the join secret, or empty"),
        ])  # fmt: skip


@dataclass
class NetworkConfig:
    """[network]: the conditions of a simulated network (gossiplab.network): sites that leave and
    come back, messages lost in transit, and a clock that prices steps and messages in seconds."""

    message_loss: float = documented(0.0, "probability that a gossip message is lost in transit, in [0, 1]")
    churn_leave: float = documented(
        0.0, "each step, an online site's probability of going offline, in [0, 1] (per second: a rate, >= 0)"
    )
    churn_return: float = documented(
        0.1, "each step, an offline site's probability of coming back, in [0, 1] (per second: a rate, >= 0)"
    )
    churn_per: str = documented(
        "step", "what churn_leave and churn_return count: per loop `step` (probabilities), or per simulated `second` "
        "of the clock (rates: the chain moves over the time each step took, so methods whose steps last "
        "differently, AD-PSGD's ticks and synchronous rounds, see the same churn in time)", ("step", "second"),
    )  # fmt: skip
    compute_time: float = documented(1.0, "simulated seconds of one local step on a median site, > 0")
    compute_spread: float = documented(
        0.0, "sigma of each site's log-normal slowdown, drawn once (0: every site equally fast), >= 0"
    )
    latency: float = documented(0.0, "seconds before a message starts arriving, >= 0")
    bandwidth: float = documented(0.0, "bytes per second of a link (0: unlimited), >= 0")
    speed_trace: str = documented(
        "",
        "a CSV file `site,seconds`: each site's simulated seconds per step, measured (replaces compute_time "
        "and compute_spread)",
    )
    link_trace: str = documented(
        "",
        "a CSV file `receiver,sender,latency,bandwidth`: the links that differ from network.latency and "
        "network.bandwidth (bandwidth 0: unlimited)",
    )
    churn_trace: str = documented(
        "",
        "a CSV file `site,offline_from,offline_until`: the steps [from, until) each site is offline "
        "(replaces the Markov chain)",
    )

    def problems(self, config: Any) -> list[str]:
        probability, rate = "must be a probability in [0, 1]", "must be a rate >= 0 (per second)"
        churn_bound, churn_allowed = (1, probability) if self.churn_per == "step" else (math.inf, rate)
        return problems_of(config, [
            (0 <= self.message_loss <= 1, "network.message_loss", probability),
            (0 <= self.churn_leave <= churn_bound, "network.churn_leave", churn_allowed),
            (0 <= self.churn_return <= churn_bound, "network.churn_return", churn_allowed),
            (self.compute_time > 0, "network.compute_time", "must be > 0 (simulated seconds per step)"),
            (self.compute_spread >= 0, "network.compute_spread", "must be >= 0 (0: equal speeds)"),
            (self.latency >= 0, "network.latency", "must be >= 0 (seconds)"),
            (self.bandwidth >= 0, "network.bandwidth", "must be >= 0 (bytes per second; 0: unlimited)"),
            (not (self.churn_trace and self.churn_leave > 0), "network.churn_trace",
             "replaces the Markov chain: leave network.churn_leave at 0, or the trace empty"),
        ])  # fmt: skip


Section = TypeVar("Section")
SECTIONS: dict[str, type] = {}  # config sections declared by parts (algorithms, mixing rules): name -> dataclass


def register_section(name: str, section: type) -> type:
    """Declare the config section `[name]` a part owns: a dataclass whose fields are its keys, with
    their defaults and (in the field's metadata) their documentation. Its optional
    `problems(config) -> list[str]` method validates it, each problem naming its field. Declaring
    the same class again (a notebook cell run twice) replaces it; another class is refused."""
    known = SECTIONS.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (section.__module__, section.__qualname__):
        raise ValueError(
            f"config section [{name}] is declared already by {known.__module__}.{known.__qualname__}: declare "
            f"{section.__module__}.{section.__qualname__} under another name"
        )
    SECTIONS[name] = section
    return section


# The built-in parts' own sections are data too, declared here so that reading a config (a preset,
# a run's config.toml) imports no part: a user's part declares its section the same way, in its module.


@dataclass
class DimatConfig:
    """[dimat]"""

    match_samples: int = documented(1024, "training images that activations are matched on")
    match_on: str = documented(
        "global", "whose images: one sample of the global training set for every merge (DIMAT's code), or each "
        "receiver's `own` training data", ("global", "own"),
    )  # fmt: skip
    reestimate_batches: int = documented(
        8, "BatchNorm models: batches of each site's own data its statistics are recomputed on after a merge "
        "(0: keep the merged statistics)",
    )  # fmt: skip
    reestimate_on: str = documented(
        "own", "BatchNorm models: whose batches the statistics are recomputed on: each site's `own`, or the "
        "`global` training set (DIMAT's code)", ("own", "global"),
    )  # fmt: skip

    def problems(self, config: Config) -> list[str]:
        problems = []
        if self.match_samples < 2:
            problems.append(
                f"field 'dimat.match_samples' = {self.match_samples}: must be >= 2 (samples per site to match on)"
            )
        if self.reestimate_batches < 0:
            problems.append(f"field 'dimat.reestimate_batches' = {self.reestimate_batches}: must be >= 0")
        return problems


register_section("dimat", DimatConfig)


@dataclass
class DittoConfig:
    """[ditto]"""

    strength: float = documented(0.1, "lambda, the proximal pull of personal models to the global one")

    def problems(self, config: Config) -> list[str]:
        return [] if self.strength >= 0 else [f"field 'ditto.strength' = {self.strength}: must be >= 0"]


register_section("ditto", DittoConfig)


@dataclass
class ProximalConfig:
    """[proximal]: the proximal link of the local step's chain (gossiplab.gradients.ProximalTerm)."""

    mu: float = documented(0.01, "mu, the pull of each gradient towards the model after the site's last gossip round")

    def problems(self, config: Config) -> list[str]:
        return [] if self.mu >= 0 else [f"field 'proximal.mu' = {self.mu}: must be >= 0"]


register_section("proximal", ProximalConfig)


@dataclass
class L2CConfig:
    """[l2c]"""

    lr: float = documented(0.1, "Adam's step on the mixing logits (0: the weights stay uniform)")
    weight_decay: float = documented(0.01, "Adam's weight decay on the logits")
    val_batch: int = documented(32, "validation images per site per round")
    prune_round: int = documented(0, "the round T0 after which only the largest weights stay (0: never)")
    keep_neighbours: int = documented(10, "K0, the neighbours each site keeps at pruning")
    meta_encoder: str = documented("", "a trained meta-L2C encoder (learned_encoder.pt) to start from")

    def problems(self, config: Config) -> list[str]:
        checks = [
            (self.lr >= 0, "lr", "must be >= 0 (0: the weights stay uniform)"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.val_batch >= 1, "val_batch", "must be >= 1"),
            (self.prune_round >= 0, "prune_round", "must be >= 0 (0: never prune)"),
            (self.keep_neighbours >= 1, "keep_neighbours", "must be >= 1"),
            (not self.meta_encoder or config.gossip.algorithm == "meta-l2c", "meta_encoder",
             "is a trained meta-L2C encoder: set gossip.algorithm = 'meta-l2c' to use it"),
            (not self.meta_encoder or Path(self.meta_encoder).is_file(), "meta_encoder",
             f"'{self.meta_encoder}' is not a file (a learned_encoder.pt from a meta-l2c run)"),
        ]  # fmt: skip
        return [f"field 'l2c.{key}' = {getattr(self, key)!r}: {allowed}" for ok, key, allowed in checks if not ok]


register_section("l2c", L2CConfig)


@dataclass
class FomoConfig:
    """[fomo]: the validation sample FOMO scores the models on."""

    val_batch: int = documented(32, "validation images per site scoring every model, drawn once")

    def problems(self, config: Config) -> list[str]:
        return [] if self.val_batch >= 1 else [f"field 'fomo.val_batch' = {self.val_batch}: must be >= 1"]


register_section("fomo", FomoConfig)


COMPRESSORS = ("top-k", "random-k", "qsgd")


@dataclass
class ChocoConfig:
    """[choco]: CHOCO-SGD's compressor and consensus step size (gossiplab.algorithms.choco)."""

    compressor: str = documented("top-k", "what a message carries of x_i - x_hat_i", COMPRESSORS)
    kept: float = documented(0.1, "top-k, random-k: the share of the entries sent each round, in (0, 1]")
    levels: int = documented(16, "qsgd: s, the quantization levels per sign, >= 1")
    gamma: float = documented(0.5, "the consensus step size gamma, in (0, 1]")

    def problems(self, config: Config) -> list[str]:
        checks = [
            (0 < self.kept <= 1, "kept", "must be in (0, 1]"),
            (self.levels >= 1, "levels", "must be >= 1"),
            (0 < self.gamma <= 1, "gamma", "must be in (0, 1]"),
        ]
        return [f"field 'choco.{key}' = {getattr(self, key)!r}: {allowed}" for ok, key, allowed in checks if not ok]


register_section("choco", ChocoConfig)


def config_reference(builtin_only: bool = True) -> list[str]:
    """The configuration reference as Markdown table rows, generated from the declarations of the
    fields (default, documentation, allowed values): the core sections, then the parts' own
    (`register_section`). The site's configuration page is these rows (docs/hooks.py)."""
    tables = core_tables(Config())
    tables += [(f"{name}.", section) for name, section in SECTIONS.items()
               if not builtin_only or section.__module__.startswith("gossiplab.")]  # fmt: skip
    rows = []
    for prefix, table in tables:
        for item in dataclasses.fields(table):
            if "doc" not in item.metadata:
                continue
            default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
            shown = f"`{default}`" if isinstance(default, str) and default else json.dumps(default)
            choices = item.metadata.get("choices")
            allowed = f"{'/'.join(f'`{c}`' for c in choices)}: " if choices else ""
            rows.append(f"| `{prefix}{item.name}` | {shown} | {allowed}{item.metadata['doc']} |")
    return rows


def core_tables(config: Config) -> list[tuple[str, Any]]:
    """The config's own fields and its core sections, as (key prefix, dataclass): ("", config),
    ("data.", config.data), ...; the parts' sections are in `config.sections`."""
    sections = [(f"{f.name}.", getattr(config, f.name)) for f in dataclasses.fields(config)]
    return [("", config)] + [(prefix, table) for prefix, table in sections if dataclasses.is_dataclass(table)]


def choice_problems(config: Config) -> list[str]:
    """Every field declared with a fixed set of allowed values holds one of them (the parts' sections too)."""
    errors = []
    for prefix, table in [*core_tables(config), *((f"{name}.", t) for name, t in config.sections.items())]:
        for item in dataclasses.fields(table):
            choices = item.metadata.get("choices")
            if choices and getattr(table, item.name) not in choices:
                errors.append(problem(config, f"{prefix}{item.name}", f"must be one of {', '.join(choices)}"))
    return errors


@dataclass
class Config:
    name: str = documented("default", "the run's name (its directory under `runs/`)")
    description: str = documented(
        "16 sites, Fashion-MNIST, Dirichlet(0.1) label skew, MLP, DSGD with random one-peer gossip",
        "a line saying what the experiment is",
    )
    seed: int = documented(0, "every random choice (initialisation, data split, batches, graphs) derives from it")
    num_sites: int = documented(16, "N, the number of sites, >= 1")
    plugins: list[str] = documented(
        [],
        "importable module names (never file paths) imported before the config is checked, so it can name the parts "
        "they register",
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    sections: dict[str, Any] = field(default_factory=dict, repr=False)  # the parts' own sections, by name

    def __post_init__(self) -> None:
        for name, section in SECTIONS.items():
            self.sections.setdefault(name, section())

    def section(self, kind: type[Section]) -> Section:
        """A part's own section, typed: `config.section(ChocoConfig).gamma`. A part finds its
        options by the class it declared with `register_section`, so a type checker sees its
        fields (the name string is the TOML table's, `[choco]`). A class declared again (a notebook
        cell run twice) is the same section."""
        for name, declared in SECTIONS.items():
            if (declared.__module__, declared.__qualname__) == (kind.__module__, kind.__qualname__):
                return self.sections.setdefault(name, declared())  # (declared after this config was made)
        raise ConfigError(
            f"{kind.__module__}.{kind.__qualname__} is not a config section: declare it with "
            f"register_section(name, {kind.__qualname__})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The config as TOML tables: the core sections, the built-in parts' sections, and the
        sections of the plug-ins this config names (a section some other code registered in the
        same process is left out, so the file reads back wherever its own plug-ins import)."""
        from gossiplab.plugins import imported_packages, within

        table = dataclasses.asdict(self)
        sections = table.pop("sections")
        packages = imported_packages(self.plugins)
        return table | {
            name: values for name, values in sections.items() if within(SECTIONS[name].__module__, packages)
        }

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
        multirun = (
            "; a comma list is Hydra's multirun, and one gossiplab run takes one value: run several (a shell "
            "loop over the values), or a sweep (`gossiplab sweep`)"
            if isinstance(value, str) and "," in value and hint is not str
            else ""
        )
        raise ConfigError(f"field '{path}' = {value!r}: must be of type {hint.__name__}{multirun}")
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
    by_leaf: dict[str, list[str]] = {}
    for path in types:
        by_leaf.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    nearest = difflib.get_close_matches(key, list(types), n=3, cutoff=0.8)
    for leaf in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=3, cutoff=0.6):
        nearest += [path for path in by_leaf[leaf] if path not in nearest]
    hint = f"did you mean {', '.join(nearest[:3])}?" if nearest else "`gossiplab run --dry-run` prints every key"
    raise ConfigError(f"unknown key '{key}': {hint}")


def apply_values(config: Config, values: dict[str, Any]) -> None:
    """Set 'section.key' -> value pairs on a config, checking every key and type (earlier keys
    are read in their current form, `upgrade_keys`)."""
    config.__post_init__()  # sections of parts registered since the config was made (plug-ins)
    types = leaf_types()
    errors = []
    for key, value in upgrade_keys(values).items():
        try:
            path = resolve_key(key, types)
            table, leaf = table_of(config, path)
            setattr(table, leaf, _coerce(path, value, types))
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
    return config_from_tables(table, origin, untrusted)


def config_from_tables(table: dict[str, Any], origin: str = "config", untrusted: tuple[Path, ...] = ()) -> Config:
    """The config of TOML tables (`Config.to_dict()`'s form): keys it lacks keep their defaults,
    earlier keys are read in their current form."""
    import_config_plugins(table.get("plugins", []), untrusted)
    config = Config()
    try:
        apply_values(config, flatten(table))
    except ConfigError as error:
        raise ConfigError(f"{origin}: {error}") from error
    return config


def read_run_config(path: Path) -> Config:
    """The config.toml of a finished run, read to look at its results: not validated, since a
    part it names may be a user's that is not importable here (the parts are recorded by name)."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror})") from error
    return config_from_toml(text, origin=str(path), untrusted=(path.parent,))


def import_config_plugins(names: Any, untrusted: tuple[Path, ...]) -> None:
    from gossiplab.plugins import import_plugins

    names = _coerce("plugins", names, {"plugins": list[str]})
    import_plugins(names, untrusted=list(untrusted))
