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

``fits(gpu_bytes)`` leaves ``CONTEXT_BYTES`` for the CUDA context and the allocator's slack.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from .config import ModelConfig
from .loading import build_models

GiB = 1 << 30
CONTEXT_BYTES = 1 * GiB  # CUDA context, cuBLAS workspaces, allocator fragmentation


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Parameters and buffers of ``module`` with its floating-point tensors in ``dtype`` (integer buffers as they are)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * (_itemsize(dtype) if t.is_floating_point() else t.element_size()) for t in tensors)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes held by the Engine for one batch (see the module docstring for what each line counts)."""

    batch: int
    dtype: torch.dtype
    weights: int
    kv_cache: int
    logits: int
    activations: int
    decode: int

    @property
    def total(self) -> int:
        """Peak: weights + KV cache + the larger of (last-scale logits + activations) and the decode."""
        return self.weights + self.kv_cache + max(self.logits + self.activations, self.decode)

    def fits(self, gpu_bytes: int) -> bool:
        return self.total + CONTEXT_BYTES <= gpu_bytes

    def table(self, gpu_bytes: Union[int, None] = None) -> str:
        rows = [("weights", self.weights), ("KV cache", self.kv_cache), ("logits (last scale)", self.logits),
                ("activations (one block, last scale)", self.activations), ("VQ-VAE decode", self.decode),
                ("peak total", self.total)]
        lines = [f"batch {self.batch}, {str(self.dtype).removeprefix('torch.')}"]
        lines += [f"  {name:<38} {value / GiB:8.2f} GiB" for name, value in rows]
        if gpu_bytes is not None:
            verdict = "fits" if self.fits(gpu_bytes) else "does NOT fit"
            lines.append(f"  {verdict} in {gpu_bytes / GiB:.1f} GiB (keeping {CONTEXT_BYTES / GiB:.0f} GiB for the CUDA context)")
        return "\n".join(lines)


def plan(
    config: Union[str, ModelConfig], batch: int, dtype: torch.dtype = torch.bfloat16, vae_dtype: Optional[torch.dtype] = None
) -> MemoryPlan:
    """The memory plan of ``batch`` images of ``config`` (a preset name such as ``"d30"`` or a ``ModelConfig``); the
    VQ-VAE decoder in ``vae_dtype`` (default ``dtype``, as the Engine does), the rest of the VQ-VAE in float32."""
    vae_dtype = dtype if vae_dtype is None else vae_dtype
    cfg = ModelConfig.preset(config) if isinstance(config, str) else config
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    vae, var = build_models(cfg, "meta")
    size, vae_size = _itemsize(dtype), _itemsize(vae_dtype)
    decoder_f32 = _bytes(vae.decoder, torch.float32) + _bytes(vae.post_quant_conv, torch.float32)
    rows, C = 2 * batch, cfg.embed_dim
    last, prev = cfg.patch_nums[-1] ** 2, (cfg.patch_nums[-2] ** 2 if len(cfg.patch_nums) > 1 else 0)
    return MemoryPlan(
        batch=batch,
        dtype=dtype,
        weights=_bytes(var, dtype) + _bytes(vae, torch.float32) - decoder_f32 + decoder_f32 // 4 * vae_size,
        kv_cache=2 * cfg.depth * rows * cfg.L * C * size,
        logits=(rows * last + 2 * batch * last + batch * prev) * cfg.V * 4,
        activations=int(rows * last * (6 + 2 * cfg.mlp_ratio) * C * size),
        decode=4 * batch * cfg.ch * cfg.ch_mult[0] * cfg.image_size**2 * vae_size,
    )
