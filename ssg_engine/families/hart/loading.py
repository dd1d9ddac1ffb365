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
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from ...checkpoints import CheckpointError, expect_family, read_state_dict

from .config import HARTConfig, HARTTokenizerConfig
from .sampler import HART
from .tokenizer import HARTTokenizer

PathLike = Union[str, Path]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def weights_in(folder: Path, prefer_ema: bool) -> Path:
    """The weights file of a released ``llm/`` or ``tokenizer/`` folder (``ema_model.bin`` first when ``prefer_ema``)."""
    if prefer_ema and (folder / "ema_model.bin").is_file():
        return folder / "ema_model.bin"
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    looked_for = (("ema_model.bin",) if prefer_ema else ()) + WEIGHT_FILES
    raise CheckpointError(f"checkpoint {folder} is a directory holding none of {', '.join(looked_for)} (not a "
                          "released HART llm/ or tokenizer/ folder); pass the checkpoint file inside it, or such a folder")


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
        raise CheckpointError(f"{what}: missing keys {sorted(missing)[:8]}, unexpected keys {sorted(unexpected)[:8]}")


def _read_config(folder: Path, what: str, flag: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {folder}: the {what} needs upstream's config.json next to its weights "
                              f"(or give {flag}=, a config dict or the path of a config.json)")
    return json.loads(path.read_text())


def _config(given: Union[None, PathLike, Mapping[str, Any]], folder: Path, what: str, flag: str) -> dict:
    """``given`` (a dict, or the path of a config.json), else ``folder``'s config.json."""
    if given is None:
        return _read_config(folder, what, flag)
    if isinstance(given, Mapping):
        return dict(given)
    if isinstance(given, (str, Path)) and Path(given).is_file():
        return json.loads(Path(given).read_text())
    raise ValueError(f"{flag} must be a dict of config.json's keys or the path of a config.json; got {given!r}")


def _checked(sd: Dict[str, torch.Tensor], kind: str, what: str) -> Dict[str, torch.Tensor]:
    """``sd`` unless it is another family's (or the other part's) checkpoint: ``CheckpointError`` naming ``what``."""
    expect_family(sd, kind, what)
    return sd


def load_hart(
    llm: PathLike,
    tokenizer: Optional[PathLike] = None,
    *,
    config: Union[None, PathLike, Mapping[str, Any]] = None,
    tokenizer_config: Union[None, PathLike, Mapping[str, Any]] = None,
    prefer_ema: bool = True,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tuple[HART, HARTTokenizer]:
    """(model, tokenizer) of HART (the tokenizer is also attached to the model), in eval mode on ``device``.

    ``llm``: upstream's released ``llm/`` folder (``config.json`` and ``ema_model.bin`` (used when ``prefer_ema``),
    ``model.safetensors`` or ``pytorch_model.bin``) or one weights file (``.pth``/``.bin``/``.safetensors``) next to
    its ``config.json``; ``tokenizer``: the ``tokenizer/`` folder or file likewise. ``tokenizer=None``: ``llm`` is a
    released root holding both folders. ``config`` / ``tokenizer_config``: the configs instead of the config.json
    files (a dict of their keys, or a path). ``dtype``: float32 only (HART's reference sampler runs in float32).
    A checkpoint of another family, or the two parts swapped, is one ``CheckpointError``."""
    if dtype != torch.float32:
        raise ValueError(f"dtype must be torch.float32 (HART's reference sampler runs in float32); got {dtype}")
    if tokenizer is None:
        llm, tokenizer = Path(llm) / "llm", Path(llm) / "tokenizer"
    for name, value in (("llm", llm), ("tokenizer", tokenizer)):
        if not isinstance(value, (str, Path)):
            raise TypeError(f"load_hart: {name} must be a folder or file path, got {type(value).__name__}")
        if not Path(value).exists():
            raise FileNotFoundError(f"load_hart: {name} {value} does not exist")
    llm, tokenizer = Path(llm), Path(tokenizer)
    llm_dir, tok_dir = (llm if llm.is_dir() else llm.parent), (tokenizer if tokenizer.is_dir() else tokenizer.parent)
    llm_file = weights_in(llm_dir, prefer_ema) if llm.is_dir() else llm
    tok_file = weights_in(tok_dir, prefer_ema=False) if tokenizer.is_dir() else tokenizer
    llm_sd = _checked(read_state_dict(llm_file), "hart", str(llm_file))  # another family's files: before their configs
    tok_sd = _checked(read_state_dict(tok_file), "hart_tokenizer", str(tok_file))
    cfg = HARTConfig.from_dict(_config(config, llm_dir, "HART transformer", "config"))
    tok_cfg = HARTTokenizerConfig.from_dict(_config(tokenizer_config, tok_dir, "HART tokenizer", "tokenizer_config"))
    tok = HARTTokenizer(tok_cfg, cfg.patch_nums)
    _load_strict(tok, tokenizer_state_dict(tok_sd, tok), f"tokenizer {tok_file}")
    model = HART(cfg, tok)
    _load_strict(model, transformer_state_dict(llm_sd, model), f"HART {llm_file}")
    tok.to(device=device).eval()
    return model.to(device=device).eval(), tok
