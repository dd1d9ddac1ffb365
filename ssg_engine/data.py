"""Fashion-MNIST: IDX reader, class names, text prompts, and image preparation for the 32x32 VQ-VAE / VAR.

The data set is the Debian package ``dataset-fashion-mnist`` (files under
``/usr/share/datasets/fashion-mnist/``); ``SSG_ENGINE_FASHION_MNIST`` overrides that folder.
"""
from __future__ import annotations

import gzip
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "SSG_ENGINE_FASHION_MNIST"

FASHION_MNIST_CLASSES: Tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)

_ALIASES: Dict[str, int] = {
    "tshirt": 0, "t-shirt/top": 0, "tshirt/top": 0, "t-shirt-top": 0, "top": 0, "tee": 0,
    "trousers": 1, "pants": 1,
    "pullovers": 2, "sweater": 2,
    "dresses": 3,
    "coats": 4,
    "sandals": 5,
    "shirts": 6,
    "sneakers": 7,
    "bags": 8,
    "ankleboot": 9, "ankle boot": 9, "ankle_boot": 9, "boot": 9, "boots": 9, "ankle-boots": 9,
}

# Text prompts of the text-to-image (Infinity) model: a class phrase in a template. The model trains on the
# TRAIN_TEMPLATES; the HELD_OUT_TEMPLATES are for evaluation only (their words are in the vocabulary, untrained).
CLASS_PHRASES: Tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
TRAIN_TEMPLATES: Tuple[str, ...] = (
    "a {}", "a photo of a {}", "an image of a {}", "a {} on a dark background", "a photo of the {}",
    "a black and white photo of a {}", "a small {}", "the {}",
)
HELD_OUT_TEMPLATES: Tuple[str, ...] = ("a picture of a {}", "a grayscale {}", "one {}")


def make_prompt(label: int, template: str) -> str:
    """The prompt for class ``label`` in ``template`` (one ``{}``), with ``a`` -> ``an`` before a vowel."""
    if not 0 <= int(label) < len(CLASS_PHRASES):
        raise ValueError(f"label {label} out of range [0, {len(CLASS_PHRASES)})")
    return re.sub(r"\ba(?= [aeiou])", "an", template.format(CLASS_PHRASES[int(label)]))


def prompt_words(prompt: str) -> List[str]:
    """The words of a prompt: lowercase, split on anything that is not a letter."""
    return re.findall(r"[a-z]+", prompt.lower())


def prompt_vocabulary() -> Tuple[str, ...]:
    """Every word of every prompt of every template (train and held-out), sorted."""
    prompts = [make_prompt(y, t) for t in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES for y in range(len(CLASS_PHRASES))]
    return tuple(sorted({w for p in prompts for w in prompt_words(p)}))


SPLIT_SIZES = {"train": 60000, "test": 10000}  # images per Fashion-MNIST split: the most a count of them can ask for
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class FashionMNISTMissing(FileNotFoundError):
    """The Fashion-MNIST IDX files were not found; the message says how to install them."""


def class_index(name_or_int: Union[str, int], num_classes: int = 10) -> int:
    """Class index for a Fashion-MNIST class name (or alias) or an integer in ``[0, num_classes)``."""
    valid = ", ".join(f"{i}={n}" for i, n in enumerate(FASHION_MNIST_CLASSES[:num_classes]))
    if isinstance(name_or_int, (int, np.integer)) and not isinstance(name_or_int, bool):
        idx = int(name_or_int)
    else:
        key = str(name_or_int).strip().lower()
        if key.lstrip("-").isdigit():
            idx = int(key)
        else:
            norm = key.replace("_", "-").replace(" ", "-")
            if key in FASHION_MNIST_CLASSES:
                idx = FASHION_MNIST_CLASSES.index(key)
            elif norm in FASHION_MNIST_CLASSES:
                idx = FASHION_MNIST_CLASSES.index(norm)
            elif key in _ALIASES:
                idx = _ALIASES[key]
            elif norm in _ALIASES:
                idx = _ALIASES[norm]
            else:
                raise ValueError(f"unknown class {name_or_int!r}; valid classes: {valid}")
    if not 0 <= idx < num_classes:
        raise ValueError(f"class index {idx} out of range [0, {num_classes}); valid classes: {valid}")
    return idx


def dataset_dir(root: Optional[Union[str, Path]] = None) -> Path:
    """The folder searched: ``root``, else ``$SSG_ENGINE_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist``."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_DIR


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        p = folder / name
        if p.is_file():
            return p
    raise FashionMNISTMissing(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder}. Install the data set with "
        f"`apt-get install dataset-fashion-mnist` (it puts the IDX files in {DEFAULT_DIR}), "
        f"or set the environment variable {ENV_VAR} to a folder holding "
        f"train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]."
    )


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its declared dtype and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {arr.size} elements")
    return arr.reshape(shape)


def load_fashion_mnist(split: str = "train", root: Optional[Union[str, Path]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of ``split`` ('train': 60000, 'test': 10000)."""
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
    folder = dataset_dir(root)
    if not folder.is_dir():
        raise FashionMNISTMissing(
            f"Fashion-MNIST folder {folder} does not exist. Install the data set with "
            f"`apt-get install dataset-fashion-mnist` (it puts the IDX files in {DEFAULT_DIR}), "
            f"or set the environment variable {ENV_VAR} to the folder holding the IDX files."
        )
    img_stem, lab_stem = _SPLIT_FILES[split]
    images = read_idx(_find(folder, img_stem))
    labels = read_idx(_find(folder, lab_stem))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split}: inconsistent shapes {images.shape} / {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def prepare_images(images_u8: torch.Tensor, size: int = 32, channels: int = 3) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, channels, size, size) float32 in [-1, 1] (zero-padded to ``size``, gray replicated)."""
    x = images_u8.float().div(127.5).sub(1.0).unsqueeze(1)
    h, w = x.shape[-2:]
    if size < max(h, w):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    elif size > h or size > w:
        pt, pl = (size - h) // 2, (size - w) // 2
        x = torch.nn.functional.pad(x, (pl, size - w - pl, pt, size - h - pt), value=-1.0)
    return x.expand(-1, channels, -1, -1).contiguous()
