"""Memory plan of one Engine batch, before loading anything: does ``d30`` at ``B=64`` fit a 24 GB card?

``plan(config, batch, dtype)`` returns the bytes the Engine holds for one batch:

- weights: every parameter and buffer of the VAR (in ``dtype``) and of the VQ-VAE (its decoder in ``vae_dtype``,
  the rest in float32), counted on the meta device;
- KV cache: K and V for every layer, ``2 * batch`` rows (CFG doubles the batch), all ``L`` tokens (exact: the
  Engine's static cache has this shape);
- logits: at the last (largest) scale, the head's output ``(2B, l, V)`` in float32, the guided and CFG logits
  ``(B, l, V)`` float32 each, and the previous scale's ``(B, l_prev, V)`` kept for the prior (exact sizes);
- activations: the live tensors of one transformer block at the last scale (residual, normed input, q/k/v,
  attention output, the MLP's hidden layer before and after GELU: ``2B * l * (6 + 2 * mlp_ratio) * C``
  elements, an estimate; attention scores are not stored by the fused SDPA kernels);
- decode: the VQ-VAE decoder's peak, about four feature maps of the full-resolution level alive at once
  (``4 * B * ch * ch_mult[0] * H * W`` elements in ``vae_dtype``, default ``dtype``, an estimate).

``fits(gpu_bytes)`` leaves ``CONTEXT_BYTES`` for the CUDA context and the allocator's slack. Infinity presets and
configs (``plan("infinity_2b", 8, pn="1M", h_div_w=1.0)``) get :func:`ssg_engine.memory.infinity_plan`'s lines (its
docstring says what they count: the Engine's weight copy, the KV cache of the schedule, the text keys/values ...),
HART presets and configs (``plan("hart_0.7b_1024px", 8)``: float16 by default, its Engine's on CUDA; float32 and
bfloat16 too, the dtypes its Engine runs at) :func:`ssg_engine.memory.hart_plan`'s (the context tokens and every
scale in the KV cache, ``more_smooth``'s Gumbel scratch, the diffusion head's buffers ...).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .families.hart.config import PRESETS as HART_PRESETS
from .families.hart.config import HARTConfig
from .families.infinity.model import INFINITY_PRESETS, UNSUPPORTED_PRESETS, InfinityConfig, scale_schedule
from .families.var.config import ModelConfig
from .loading import build_models
from .memory import CONTEXT_BYTES, GiB, MemoryPlan, hart_plan, infinity_plan, itemsize, module_bytes
from .params import HART_UPSTREAM

__all__ = ["CONTEXT_BYTES", "GiB", "MemoryPlan", "plan"]


def plan(
    config: Union[str, ModelConfig, InfinityConfig, HARTConfig], batch: int, dtype: Optional[torch.dtype] = None,
    vae_dtype: Optional[torch.dtype] = None, *, pn: Union[str, int, None] = None, h_div_w: float = 1.0,
    more_smooth: Optional[bool] = None,
) -> MemoryPlan:
    """The memory plan of ``batch`` images of ``config`` in ``dtype`` (default: the family Engine's, bfloat16 for VAR
    and Infinity, float16 for HART, its Engine's on CUDA): a VAR preset name such as ``"d30"`` or a ``ModelConfig`` (the VQ-VAE decoder in
    ``vae_dtype``, default ``dtype`` as the Engine does, the rest of the VQ-VAE in float32), an Infinity preset such as
    ``"infinity_2b"`` or an ``InfinityConfig``, sampled at the schedule of ``h_div_w`` and ``pn`` (default: the
    config's ``num_scales``, 13 = ``"1M"``; see ``scale_schedule``), or a HART preset such as ``"hart_0.7b_1024px"``
    or a ``HARTConfig`` (its scales are its config's; ``dtype`` one of its Engine's, float16, bfloat16, float32;
    ``more_smooth``: count the soft inputs' Gumbel scratch, default ``HART_UPSTREAM.more_smooth``: on)."""
    if isinstance(config, HARTConfig) or (isinstance(config, str) and config in HART_PRESETS):
        if vae_dtype is not None or pn is not None:
            raise ValueError("vae_dtype and pn apply to VAR and Infinity; leave them None for HART (its scales are in its config)")
        return hart_plan(config, batch, dtype, more_smooth=HART_UPSTREAM.more_smooth if more_smooth is None else more_smooth)
    if more_smooth is not None:
        raise ValueError("more_smooth applies to HART; leave it None for VAR and Infinity")
    dtype = torch.bfloat16 if dtype is None else dtype
    if isinstance(config, InfinityConfig) or (isinstance(config, str) and (config in INFINITY_PRESETS or config in UNSUPPORTED_PRESETS)):
        if vae_dtype is not None:
            raise ValueError("vae_dtype applies to VAR's VQ-VAE; leave it None for Infinity (its VAE runs under autocast to dtype)")
        cfg = InfinityConfig.preset(config) if isinstance(config, str) else config
        return infinity_plan(cfg, scale_schedule(h_div_w, cfg.num_scales if pn is None else pn), dtype, batch)
    if pn is not None:
        raise ValueError(f"pn={pn!r} applies to Infinity presets ({', '.join(INFINITY_PRESETS)}); VAR's scales are in its config")
    vae_dtype = dtype if vae_dtype is None else vae_dtype
    cfg = ModelConfig.preset(config) if isinstance(config, str) else config
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    vae, var = build_models(cfg, "meta")
    size, vae_size = itemsize(dtype), itemsize(vae_dtype)
    decoder_f32 = module_bytes(vae.decoder, torch.float32) + module_bytes(vae.post_quant_conv, torch.float32)
    rows, C = 2 * batch, cfg.embed_dim
    last, prev = cfg.patch_nums[-1] ** 2, (cfg.patch_nums[-2] ** 2 if len(cfg.patch_nums) > 1 else 0)
    return MemoryPlan(
        batch=batch,
        dtype=dtype,
        weights=module_bytes(var, dtype) + module_bytes(vae, torch.float32) - decoder_f32 + decoder_f32 // 4 * vae_size,
        kv_cache=2 * cfg.depth * rows * cfg.L * C * size,
        logits=(rows * last + 2 * batch * last + batch * prev) * cfg.V * 4,
        activations=int(rows * last * (6 + 2 * cfg.mlp_ratio) * C * size),
        decode=4 * batch * cfg.ch * cfg.ch_mult[0] * cfg.image_size**2 * vae_size,
    )
