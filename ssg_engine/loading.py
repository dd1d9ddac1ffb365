"""Loading the public checkpoints (``.pth`` plain state dicts, or ``.safetensors``) without random init."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .config import ModelConfig, infer_config, matching_presets
from .models.var import VAR, level_buffers
from .models.vqvae import VQVAE

ConfigLike = Union[None, str, Path, ModelConfig]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model asked for; the message says why."""


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read a plain state dict from ``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from e
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path} does not hold a state dict (a flat mapping from names to tensors)")
    return dict(sd)


def resolve_config(config: ConfigLike, var_state: Optional[Mapping[str, torch.Tensor]], vae_state: Optional[Mapping[str, torch.Tensor]]) -> ModelConfig:
    """A ``ModelConfig`` from a preset name, a JSON path, a config object, or (None) the checkpoints' shapes."""
    if isinstance(config, ModelConfig):
        cfg = config
    elif config is None:
        return infer_config(var_state, vae_state)
    elif isinstance(config, Path) or str(config).endswith(".json"):
        cfg = ModelConfig.from_json(config)
    else:
        cfg = ModelConfig.preset(str(config))
        if var_state is not None:
            fits = matching_presets(var_state)
            key = str(config).lower().removeprefix("var_").removesuffix("_512")
            if fits and key not in fits:
                raise CheckpointError(f"the VAR checkpoint fits preset {' / '.join(fits)}, not {config!r}")
    return cfg


def _check_and_load(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), first: {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[:5]}")
        raise CheckpointError(f"{what} checkpoint does not match the model: " + "; ".join(parts))
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{what} checkpoint: shape mismatch at {k!r}: expected {tuple(v.shape)}, found {tuple(state[k].shape)}")
    model.load_state_dict(state, strict=True, assign=True)


def build_models(cfg: ModelConfig, device: Union[str, torch.device] = "meta") -> Tuple[VQVAE, VAR]:
    """Construct (vae, var) on ``device`` (default ``meta``: no memory, no init)."""
    with torch.device(device):
        vae = VQVAE(cfg)
        var = VAR(cfg, vae)
    return vae, var


def load_models(
    var_ckpt: Union[str, Path, Mapping[str, torch.Tensor]],
    vae_ckpt: Union[str, Path, Mapping[str, torch.Tensor]],
    config: ConfigLike = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tuple[VQVAE, VAR]:
    """Load (vae, var) from checkpoint paths (or state dicts), built on the meta device and filled by assignment.

    ``config``: None (inferred from the tensor shapes), a preset name (``d16`` ... ``d36``), a JSON path, or a ``ModelConfig``.
    The VQ-VAE stays float32 (it decodes in float32); the VAR is cast to ``dtype``. Both are in eval mode.
    """
    var_state = var_ckpt if isinstance(var_ckpt, Mapping) else read_state_dict(var_ckpt)
    vae_state = vae_ckpt if isinstance(vae_ckpt, Mapping) else read_state_dict(vae_ckpt)
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
