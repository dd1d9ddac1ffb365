"""The small Fashion-MNIST VQ-VAE + VAR shipped with the package (see assets/fashion_mnist/MODEL_CARD.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple, Union

import torch

from .params import SamplingParams

PRETRAINED_DIR = Path(__file__).resolve().parent / "assets" / "fashion_mnist"
_FILES = ("vae.safetensors", "var.safetensors", "config.json")
# The model card's sampling settings (MODEL_CARD.md: they looked best on this model); the CLI's defaults for it.
SAMPLING = SamplingParams(cfg=2.0, top_k=128, top_p=0.95)


def pretrained_files() -> Tuple[Path, Path, Path]:
    """Paths of (vae.safetensors, var.safetensors, config.json); FileNotFoundError naming what is missing."""
    paths = tuple(PRETRAINED_DIR / f for f in _FILES)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the shipped Fashion-MNIST model is incomplete: {', '.join(missing)} missing in {PRETRAINED_DIR}. "
            "Reinstall the package (in a git clone: `git checkout ssg_engine/assets`), or "
            "train a model into a folder of your own with `ssg-engine train --dataset fashion-mnist --out my_model/` and "
            "pass --var my_model/var.safetensors --vae my_model/vae.safetensors --config my_model/config.json."
        )
    return paths  # type: ignore[return-value]


def load_pretrained(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32):
    """Load the shipped Fashion-MNIST (vae, var), in eval mode on ``device``; the VAR in ``dtype``."""
    from .loading import load_models

    vae_p, var_p, cfg_p = pretrained_files()
    return load_models(var_p, vae_p, config=cfg_p, device=device, dtype=dtype)


def class_names() -> tuple:
    """The ten Fashion-MNIST class names, in label order."""
    from .data import FASHION_MNIST_CLASSES

    return tuple(FASHION_MNIST_CLASSES)
