"""Loading VAR's public checkpoints (``.pth`` plain state dicts, or ``.safetensors``) without random init: the
transformer with its VQ-VAE (``load_models``), a config from a preset, a file or the checkpoints' shapes
(``resolve_config``), and random-weight pairs for benchmarks (``random_models``). Reading and checking a checkpoint
file is shared (:mod:`ssg_engine.checkpoints`); ``ssg_engine.loading`` re-exports these names."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Tuple, Union

import torch

from ...checkpoints import CheckpointError, StateLike, _check_and_load, _state
from .config import ARCH_FIELDS, PRESET_DEPTHS, ModelConfig, infer_config, matching_presets, preset_key, read_config_file
from .model import level_buffers
from .sampler import VAR
from .tokenizer import VQVAE

ConfigLike = Union[None, str, Path, ModelConfig, Mapping[str, object]]


def resolve_config(config: ConfigLike, var_state: Optional[Mapping[str, torch.Tensor]], vae_state: Optional[Mapping[str, torch.Tensor]]) -> ModelConfig:
    """A ``ModelConfig`` from a preset name, a JSON path, a dict, a config object, or (None) the checkpoints' shapes."""
    if isinstance(config, ModelConfig):
        cfg = config
    elif config is None:
        return infer_config(var_state, vae_state)
    elif isinstance(config, Mapping):
        cfg = _config_over_shapes(config, "config", var_state, vae_state)
    elif not isinstance(config, (str, Path)):
        raise TypeError(f"config must be None, a preset name, a JSON path, a dict or a ModelConfig; got {type(config).__name__}")
    elif isinstance(config, str) and preset_key(config) in PRESET_DEPTHS:
        cfg = ModelConfig.preset(config)
        if var_state is not None:
            fits = matching_presets(var_state)
            if fits and preset_key(config) not in fits:
                raise CheckpointError(f"the VAR checkpoint fits preset {' / '.join(fits)}, not {config!r}")
    elif Path(config).exists() or str(config).lower().endswith(".json"):
        cfg = _config_over_shapes(read_config_file(config), f"config file {config}", var_state, vae_state)
    else:
        raise ValueError(f"config {str(config)!r} is neither a preset ({', '.join(PRESET_DEPTHS)}) nor an existing JSON file")
    return cfg


def _config_over_shapes(given: Mapping[str, Any], source: str, var_state: Optional[Mapping[str, torch.Tensor]],
                        vae_state: Optional[Mapping[str, torch.Tensor]]) -> ModelConfig:
    """``given`` config fields (``source`` names them in errors) over the config the checkpoints' shapes determine: a
    partial config gives only what the shapes cannot tell (or overrides them); without both checkpoints, or where the
    shapes tell too little, every ``ARCH_FIELDS`` entry must be given."""
    if var_state is None or vae_state is None or all(k in given for k in ARCH_FIELDS):
        return ModelConfig.from_dict(given, source)
    try:
        inferred = infer_config(var_state, vae_state, given.get("patch_nums"))
    except (TypeError, ValueError) as why:
        try:
            return ModelConfig.from_dict(given, source)
        except ValueError as e:  # which required fields are missing, and why the shapes cannot tell them
            raise ValueError(f"{e} (the checkpoints' shapes cannot fill them in: {why})") from None
    return ModelConfig.from_dict({**inferred.to_dict(), **given}, source)


def build_models(cfg: ModelConfig, device: Union[str, torch.device] = "meta") -> Tuple[VQVAE, VAR]:
    """Construct (vae, var) on ``device`` (default ``meta``: no memory, no init)."""
    with torch.device(device):
        vae = VQVAE(cfg)
        var = VAR(cfg, vae)
    return vae, var


def load_models(
    var_ckpt: StateLike,
    vae_ckpt: StateLike,
    config: ConfigLike = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tuple[VQVAE, VAR]:
    """Load (vae, var) from checkpoint paths (or state dicts), built on the meta device and filled by assignment.

    ``config``: None (inferred from the tensor shapes), a preset name (``d16`` ... ``d36``), a JSON path, a dict of
    ``ModelConfig`` fields, or a ``ModelConfig``.
    The VQ-VAE stays float32 (it decodes in float32); the VAR is cast to ``dtype``. Both are in eval mode.
    """
    var_state, vae_state = _state(var_ckpt, "var_ckpt", "var"), _state(vae_ckpt, "vae_ckpt", "vqvae")
    cfg = resolve_config(config, var_state, vae_state)
    vae, var = build_models(cfg, "meta")
    vae_state = dict(vae_state)
    ema = vae_state.get("quantize.ema_vocab_hit_SV")
    if ema is not None and ema.shape[0] != len(cfg.patch_nums):  # upstream tolerates a different scale count here
        vae_state["quantize.ema_vocab_hit_SV"] = torch.zeros(len(cfg.patch_nums), ema.shape[1], dtype=ema.dtype)
    _check_and_load(vae, vae_state, "VQ-VAE")
    _check_and_load(var, var_state, "VAR")
    vae = vae.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    var = var.to(device=device, dtype=dtype).eval().requires_grad_(False)
    var.attach_vae(vae)
    return vae, var


def random_models(
    cfg: ModelConfig, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 0.02
) -> Tuple[VQVAE, VAR]:
    """(vae, var) of ``cfg`` with random N(0, std) weights, initialised directly on ``device`` (for benchmarks).

    The VQ-VAE is float32, the VAR ``dtype``; both in eval mode. The masking buffers are the real ones.
    """
    vae, var = build_models(cfg, "meta")
    gen = torch.Generator(device=device).manual_seed(seed)
    lvl_1L, attn_bias = level_buffers(cfg.patch_nums)
    exact = {"lvl_1L": lvl_1L, "attn_bias_for_masking": attn_bias}
    for model, dt in ((vae, torch.float32), (var, dtype)):
        model.to_empty(device=device)
        with torch.no_grad():
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                if model is var and name in exact:
                    t.copy_(exact[name])
                elif name.endswith("zero_k_bias"):
                    t.zero_()
                elif t.dtype.is_floating_point:
                    t.normal_(0.0, std, generator=gen)
        model.to(dtype=dt).eval().requires_grad_(False)
    var.attach_vae(vae)
    return vae, var
