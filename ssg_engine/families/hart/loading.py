"""Load HART from upstream's released layout: ``<root>/llm/`` (``config.json``, ``model.safetensors`` or
``pytorch_model.bin``, and ``ema_model.bin``, preferred when present, as upstream's ``sample.py --use_ema``) and
``<root>/tokenizer/`` (``config.json`` and the ``HARTAutoEncoderWithDisc`` weights, names under ``vae.``).
Single ``.pth``/``.bin``/``.safetensors`` files work too.

Upstream names are kept (no renaming); only upstream's derived buffers are dropped: ``lvl_1L`` and
``attn_bias_for_masking`` (recomputed and checked), the discriminator (``disc.``), the unused second decoder
(``decoder2.``, ``post_quant_conv2.``: upstream replaces it with a copy of the first at load) and a usage counter
of another scale count (``quantize.ema_vocab_hit_SV``, as upstream's ``load_state_dict``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from .config import HARTConfig, HARTTokenizerConfig
from .sampler import HART
from .tokenizer import HARTTokenizer

PathLike = Union[str, Path]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``d dict (``.pth``/``.bin``), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return sd


def _weights_in(folder: Path, prefer_ema: bool) -> Path:
    if prefer_ema and (folder / "ema_model.bin").is_file():
        return folder / "ema_model.bin"
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{folder} holds none of {WEIGHT_FILES}")


def transformer_state_dict(sd: Dict[str, torch.Tensor], model: HART) -> Dict[str, torch.Tensor]:
    """Upstream ``HARTForT2I`` tensors -> this model's, checking the dropped level buffer against the config."""
    sd = dict(sd)
    levels = sd.pop("lvl_1L", None)
    sd.pop("attn_bias_for_masking", None)
    if levels is not None and not torch.equal(levels.long().cpu(), model.lvl_1L.cpu()):
        raise ValueError("the checkpoint's lvl_1L does not match config.json's patch_nums/context_token")
    return sd


def tokenizer_state_dict(sd: Dict[str, torch.Tensor], tokenizer: HARTTokenizer) -> Dict[str, torch.Tensor]:
    """Upstream tokenizer tensors (``vae.`` prefix or none) -> this tokenizer's."""
    out = {}
    for k, v in sd.items():
        k = k[len("vae."):] if k.startswith("vae.") else k
        if k.startswith(("disc.", "decoder2.", "post_quant_conv2.")):
            continue
        out[k] = v
    hits = out.get("quantize.ema_vocab_hit_SV")
    if hits is not None and hits.shape != tokenizer.quantize.ema_vocab_hit_SV.shape:
        out["quantize.ema_vocab_hit_SV"] = tokenizer.quantize.ema_vocab_hit_SV
    return out


def _load_strict(module: torch.nn.Module, sd: Dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {sorted(missing)[:8]}, unexpected keys {sorted(unexpected)[:8]}")


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"no config.json in {folder}")
    return json.loads(path.read_text())


def load_hart(
    root: Optional[PathLike] = None,
    *,
    llm: Optional[PathLike] = None,
    tokenizer: Optional[PathLike] = None,
    prefer_ema: bool = True,
    device: Union[str, torch.device] = "cpu",
) -> HART:
    """HART (with its tokenizer attached) in float32, eval mode, on ``device``.

    ``root``: a released folder with ``llm/`` and ``tokenizer/``; or ``llm``/``tokenizer``: those folders, or files
    (a weights file next to its ``config.json``). ``prefer_ema``: use ``llm/ema_model.bin`` when present."""
    if root is not None:
        llm, tokenizer = Path(root) / "llm", Path(root) / "tokenizer"
    if llm is None or tokenizer is None:
        raise ValueError("load_hart needs root, or both llm and tokenizer")
    llm, tokenizer = Path(llm), Path(tokenizer)
    llm_is_file, tok_is_file = llm.suffix in WEIGHT_SUFFIXES, tokenizer.suffix in WEIGHT_SUFFIXES
    llm_dir, tok_dir = (llm.parent if llm_is_file else llm), (tokenizer.parent if tok_is_file else tokenizer)
    cfg = HARTConfig.from_dict(_read_config(llm_dir))
    tok_cfg = HARTTokenizerConfig.from_dict(_read_config(tok_dir))
    tok = HARTTokenizer(tok_cfg, cfg.patch_nums)
    tok_file = tokenizer if tok_is_file else _weights_in(tok_dir, prefer_ema=False)
    _load_strict(tok, tokenizer_state_dict(read_state_dict(tok_file), tok), f"tokenizer {tok_file}")
    model = HART(cfg, tok)
    llm_file = llm if llm_is_file else _weights_in(llm_dir, prefer_ema)
    _load_strict(model, transformer_state_dict(read_state_dict(llm_file), model), f"HART {llm_file}")
    return model.to(device).eval()
