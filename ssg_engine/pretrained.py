"""The small Fashion-MNIST models shipped with the package: the class-conditional VQ-VAE + VAR
(assets/fashion_mnist/MODEL_CARD.md), the text-to-image BSQ VAE + Infinity + text encoder
(assets/fashion_mnist_infinity/MODEL_CARD.md) and the text-to-image hybrid tokenizer + HART + text encoder
(assets/fashion_mnist_hart/MODEL_CARD.md)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence, Tuple, Union

import torch

from .params import HARTParams, SamplingParams

PRETRAINED_DIR = Path(__file__).resolve().parent / "assets" / "fashion_mnist"
_FILES = ("vae.safetensors", "var.safetensors", "config.json")
# The model card's sampling settings (MODEL_CARD.md: they looked best on this model); the CLI's defaults for it.
SAMPLING = SamplingParams(cfg=2.0, top_k=128, top_p=0.95)


INFINITY_DIR = Path(__file__).resolve().parent / "assets" / "fashion_mnist_infinity"
_INFINITY_FILES = ("vae.safetensors", "infinity.safetensors", "text_encoder.safetensors", "config.json")
# The Infinity model card's sampling settings: ``cfg`` is Infinity's CFG weight w (the same on every scale; 1 = off),
# ``temperature`` its tau; no top-k / top-p. The CLI's defaults for that model.
INFINITY_SAMPLING = SamplingParams(cfg=3.0, top_k=0, top_p=0.0, temperature=1.0)
# The SSG strength measured best on that model (DSE prior, lowest classifier Frechet distance at tau 1 among betas
# 0.1 ... 1: bench/results/quality/infinity/README.md); the default beta (0.5) hurts it. The CLI's beta for it.
INFINITY_SSG_BETA = 0.15

HART_DIR = Path(__file__).resolve().parent / "assets" / "fashion_mnist_hart"
_HART_FILES = ("llm/config.json", "llm/model.safetensors", "tokenizer/config.json", "tokenizer/model.safetensors",
               "text_encoder.safetensors", "config.json")
# The HART model card's sampling settings: ``cfg`` the end of upstream's ramp ``cfg * k / (K - 1)`` (the diffusion
# head's CFG too), no top-k / top-p (upstream's hard-coded 600/300 exceed this model's 512 codes), one MaskGIT pass
# (upstream's release setting; the model was trained without MaskGIT masking); cfg 4.5 and more_smooth are upstream's
# release values, kept because no CFG / more_smooth setting measured better (MODEL_CARD.md). The CLI's defaults.
HART_SAMPLING = HARTParams(cfg=4.5, top_k=0, top_p=0.0, more_smooth=True, num_maskgit_iters=1)
# The least harmful SSG strength measured on that model: no beta helped it (bench/results/quality/hart/README.md);
# 0.1 had the lowest FD-cls of the DSE arms, level with the baseline. The CLI's beta for it.
HART_SSG_BETA = 0.1


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


def check_model_folder(folder: Union[str, Path], files: Sequence[str], shipped: Path, family: str) -> Path:
    """``folder`` as a Path when it holds every one of ``files``, else FileNotFoundError naming the missing ones and
    how to get them back (``shipped``: the package's folder of that model; ``family``: the ``train --family``)."""
    folder = Path(folder)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        name = {"infinity": "Infinity", "hart": "HART"}.get(family, family)
        raise FileNotFoundError(
            f"the {name} model folder {folder} is incomplete: {', '.join(missing)} missing. "
            + ("Reinstall the package (in a git clone: `git checkout ssg_engine/assets`), or train" if folder == shipped else "Train")
            + f" a model with `ssg-engine train --family {family} --dataset fashion-mnist --out my_model/`."
        )
    return folder


def load_infinity_folder(folder: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Tuple[Any, Any, Any]:
    """(InfinityTransformer, BSQVAE, TextEncoder) from a folder written by ``train_fashion_mnist_infinity``, in float32
    and eval mode on ``device``; FileNotFoundError naming the missing files."""
    from safetensors.torch import load_file

    from .families.infinity.model import InfinityConfig, InfinityTransformer
    from .families.infinity.tokenizer import BSQVAEConfig, load_bsq_vae

    folder = check_model_folder(folder, _INFINITY_FILES, INFINITY_DIR, "infinity")
    cfg = json.loads((folder / "config.json").read_text())
    vae = load_bsq_vae(load_file(str(folder / "vae.safetensors")), BSQVAEConfig(**cfg["vae"]), device=device)
    model = InfinityTransformer(InfinityConfig(**cfg["infinity"]))
    model.load_upstream({k: v.float() for k, v in load_file(str(folder / "infinity.safetensors")).items()})
    return model.to(device).eval().requires_grad_(False), vae, folder_text_encoder(folder, device)


def folder_text_encoder(folder: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Any:
    """The small text encoder of a folder written by ``train_fashion_mnist_infinity`` (float32, eval mode)."""
    from .families.infinity.text import TextEncoderConfig, load_text_encoder

    from .families.var.config import read_config_file

    folder = Path(folder)
    spec = read_config_file(folder / "config.json").get("text_encoder")
    if not isinstance(spec, dict):
        raise ValueError(f"{folder / 'config.json'} has no \"text_encoder\" object; give a folder written by "
                         "`ssg-engine train --family infinity` (or a Flan-T5 folder)")
    try:
        config = TextEncoderConfig.from_dict(spec)
    except ValueError as e:
        raise ValueError(f"{folder / 'config.json'}: {e}") from None
    return load_text_encoder(folder / "text_encoder.safetensors", config, device)


def text_encoder_from_folder(folder: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Any:
    """An Infinity text encoder from a local folder: one written by ``train_fashion_mnist_infinity`` (its small encoder,
    ``text_encoder.safetensors``), else a Flan-T5 folder (``T5TextEncoder``); errors as those raise them."""
    folder = Path(folder)
    if (folder / "text_encoder.safetensors").is_file():
        return folder_text_encoder(folder, device)
    from .families.infinity.text import T5TextEncoder

    return T5TextEncoder(folder, device=device)


def infinity_folder_schedule(folder: Union[str, Path] = INFINITY_DIR) -> Tuple[Tuple[int, int], ...]:
    """The scale schedule ((h, w) per scale) of an Infinity model folder (its config.json's ``schedule``)."""
    from .families.infinity.model import scale_schedule

    sched = json.loads((Path(folder) / "config.json").read_text())["schedule"]
    return scale_schedule(sched["h_div_w"], sched["num_scales"])


def load_pretrained_infinity(device: Union[str, torch.device] = "cpu") -> Tuple[Any, Any, Any]:
    """The shipped Fashion-MNIST text-to-image model: (InfinityTransformer, BSQVAE, TextEncoder), float32, eval mode;
    its schedule is ``infinity_folder_schedule()``, its sampling settings ``INFINITY_SAMPLING``, and its card's SSG
    beta ``INFINITY_SSG_BETA`` is ``model.ssg_beta`` (what ``SSG()`` without beta uses on it)."""
    model, vae, text_encoder = load_infinity_folder(INFINITY_DIR, device)
    model.ssg_beta = INFINITY_SSG_BETA
    return model, vae, text_encoder


def load_hart_folder(folder: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Tuple[Any, Any, Any]:
    """(HARTTransformer, HARTTokenizer, WordTextEncoder) from a folder written by ``train_fashion_mnist_hart``
    (upstream's ``llm/`` + ``tokenizer/`` layout, loaded by ``load_hart``, plus the small text encoder), float32, eval
    mode on ``device``; FileNotFoundError naming the missing files."""
    from .families.hart.loading import load_hart
    from .families.hart.text import WordTextEncoder

    folder = check_model_folder(folder, _HART_FILES, HART_DIR, "hart")
    model, tokenizer = load_hart(folder, device=device)
    text = WordTextEncoder(folder_text_encoder(folder, device), model.context_token)
    return model.requires_grad_(False), tokenizer.requires_grad_(False), text


def load_pretrained_hart(device: Union[str, torch.device] = "cpu") -> Tuple[Any, Any, Any]:
    """The shipped Fashion-MNIST HART model: (HARTTransformer, HARTTokenizer, WordTextEncoder), float32, eval mode;
    its sampling settings are ``HART_SAMPLING``, and its card's SSG beta ``HART_SSG_BETA`` is ``model.ssg_beta``."""
    model, tokenizer, text_encoder = load_hart_folder(HART_DIR, device)
    model.ssg_beta = HART_SSG_BETA
    return model, tokenizer, text_encoder
