"""Per-scale ops behind the one backend switch (:func:`ssg_engine.backend.resolve_backend`).

``backend="auto" | "reference" | "triton"``; ``SSG_ENGINE_BACKEND`` overrides it. The
kernel modules are imported on first use, so ``import ssg_engine.ops`` and the reference
backend work without triton installed.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from ssg_engine.backend import resolve_backend
from ssg_engine.profiling import nvtx_range

Scalar = Union[float, torch.Tensor]

_SEED_MIX = 1_000_003  # reference backend: generator seed = seed * _SEED_MIX + offset (mod 2**64)


def ssg_guidance(
    logits_2B: torch.Tensor,
    prev: Optional[torch.Tensor],
    operator: Optional[torch.Tensor],
    cfg_t: Scalar,
    beta: Scalar,
    *,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """CFG + SSG for one scale: logits_2B (2B, N, V), prev (B, M, V), operator (N, M) -> (guided, cfg), (B, N, V) fp32.

    See :mod:`ssg_engine.kernels.ssg_guidance` for the exact semantics; ``cfg`` is the
    next scale's ``prev``.
    """
    from ssg_engine.kernels import ssg_guidance as impl

    with nvtx_range("ssg_guidance"):
        if resolve_backend(backend, logits_2B.device) == "triton":
            return impl.ssg_guidance_triton(logits_2B, prev, operator, cfg_t, beta)
        return impl.ssg_guidance_reference(logits_2B, prev, operator, cfg_t, beta)


def ada_ln_modulate(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    *,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """x (R, l, C) -> LayerNorm(x, no affine, eps) * (1 + scale) + shift, (R, l, C) in out_dtype (default x.dtype).

    scale/shift: broadcastable to (R, 1, C), any strides (e.g. views ``mod.unbind(2)`` of a (R, 1, 6, C) tensor, or
    (R, 1, C)). See :mod:`ssg_engine.kernels.ada_ln_modulate`: the reference backend is the models' eager chain (in
    the wider of x's dtype and out_dtype), the Triton kernel reads x once and rounds once.
    """
    from ssg_engine.kernels import ada_ln_modulate as impl

    with nvtx_range("ada_ln_modulate"):
        if resolve_backend(backend, x.device) == "triton":
            return impl.ada_ln_modulate_triton(x, scale, shift, eps, out_dtype)
        return impl.ada_ln_modulate_reference(x, scale, shift, eps, out_dtype)


def sample_logits(
    logits: torch.Tensor,
    top_k: int,
    top_p: float,
    temperature: float,
    seed: torch.Tensor,
    offset: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Temperature + top-k + top-p sampling: logits (..., V) -> tokens (...) int64.

    ``seed``/``offset`` are int64 tensors of shape (1,) on the logits' device; ``seed`` may
    instead hold S keys (per-row seeding), one per block of (rows / S) consecutive rows of the
    flattened logits (S = batch: one per image). The Triton backend reads them on the device
    (CUDA-graph safe, no host sync); the reference backend reads them on the host (a device
    sync) to seed a ``torch.Generator`` per key with ``seed * 1_000_003 + offset``, so the two
    backends draw from the same distribution but not the same tokens.
    """
    from ssg_engine.kernels import sampling as impl

    if not isinstance(logits, torch.Tensor) or logits.ndim == 0:
        raise ValueError("logits must be a tensor of shape (..., V)")
    rows = logits.reshape(-1, logits.shape[-1])
    impl.check_seed_offset(seed, offset, logits.device, rows.shape[0])
    with nvtx_range("sample_logits"):
        if resolve_backend(backend, logits.device) == "triton":
            tokens = impl.sample_logits_triton(rows, top_k, top_p, temperature, seed, offset)
        else:
            tokens = impl.sample_logits_reference(rows, top_k, top_p, temperature, _generators(seed, offset))
    return tokens.reshape(logits.shape[:-1])


def guide_and_sample_bits(
    logits_2B: torch.Tensor,
    prev: Optional[torch.Tensor],
    operator: Optional[torch.Tensor],
    cfg_t: Scalar,
    beta: Scalar,
    top_k: int,
    top_p: float,
    temperature: float,
    seed: torch.Tensor,
    offset: torch.Tensor,
    *,
    write_cfg: bool = True,
    write_guided: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """CFG + SSG, then one Bernoulli draw per bit: logits_2B (2B, N, V = 2d) -> (bits (B, N, d) uint8, nonfinite (1,)
    bool, cfg (B, N, V) fp32 if ``write_cfg``, guided (B, N, V) fp32 if ``write_guided``; else None).

    See :mod:`ssg_engine.kernels.guide_sample_bits`. Randomness as :func:`sample_logits` (``seed`` (1,), or (B,): one
    key per image row): the reference backend draws the bits that ``ssg_guidance`` followed by ``sample_logits``
    draws on the bit rows.
    """
    from ssg_engine.kernels import guide_sample_bits as impl

    with nvtx_range("guide_and_sample_bits"):
        if resolve_backend(backend, logits_2B.device) == "triton":
            return impl.guide_sample_bits_triton(
                logits_2B, prev, operator, cfg_t, beta, top_k, top_p, temperature, seed, offset,
                write_cfg=write_cfg, write_guided=write_guided,
            )
        impl.check_bit_seed(seed, offset, logits_2B.device, logits_2B.shape[0] // 2)
        return impl.guide_sample_bits_reference(
            logits_2B, prev, operator, cfg_t, beta, top_k, top_p, temperature, _generators(seed, offset),
            write_cfg=write_cfg, write_guided=write_guided,
        )


def qkv_norm_rope_cache_(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    start: int,
    *,
    num_heads: int,
    scale_mul: Optional[torch.Tensor] = None,
    rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """qkv (R, l, 3*H*D) (the QKV linear's output, bias included; last dim contiguous) -> q (R, H, l, D) in the cache's
    dtype; writes k and v into k_cache/v_cache[layer, :R, :, start:start + l] (caches (layers, rows >= R, H, S, D),
    S >= start + l, same dtype). scale_mul: (H,) or (1, H, 1, 1) float per-head q multiplier, given only with L2 norm
    (None: no normalisation, no scaling: VAR with attn_l2_norm=False). rope: (cos, sin) each (l, D/2) float32,
    rotating adjacent pairs (x[2i], x[2i+1]) of q and k after the normalisation (Infinity), or None.

    See :mod:`ssg_engine.kernels.qkv_norm_rope_cache`; the Triton backend's ``q`` is a transposed view of (R, l, H, D)
    storage, the reference's need not be. ``layer`` and ``start`` are baked into a captured graph.
    """
    from ssg_engine.kernels import qkv_norm_rope_cache as impl

    with nvtx_range("qkv_norm_rope_cache_"):
        if resolve_backend(backend, qkv.device) == "triton":
            return impl.qkv_norm_rope_cache_triton(
                qkv, k_cache, v_cache, layer, start, num_heads=num_heads, scale_mul=scale_mul, rope=rope,
            )
        return impl.qkv_norm_rope_cache_reference(
            qkv, k_cache, v_cache, layer, start, num_heads=num_heads, scale_mul=scale_mul, rope=rope,
        )


def matmul_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *, backend: str = "auto") -> torch.Tensor:
    """x (..., K), weight (N, K), bias (N,) or None -> GELU_tanh(x @ weight^T + bias), (..., N) in x.dtype.

    One launch (GEMM + bias + GELU epilogue) on the Triton backend; see :mod:`ssg_engine.kernels.matmul_gelu`.
    The reference backend is the FFN's eager ``F.gelu(F.linear(x, weight, bias), approximate="tanh")``.
    """
    from ssg_engine.kernels import matmul_gelu as impl

    with nvtx_range("matmul_gelu"):
        if resolve_backend(backend, x.device) == "triton":
            return impl.matmul_gelu_triton(x, weight, bias)
        return impl.matmul_gelu_reference(x, weight, bias)


def matmul_gated_residual(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    gamma: torch.Tensor,
    *,
    round_gated: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """residual (R, l, N), x (R, l, K), weight (N, K), bias (N,) or None, gamma broadcastable to (R, 1, N) (any strides:
    a view ``mod.unbind(2)`` of (R, 1, 6, N), or (N,)) -> residual + gamma * (x @ weight^T + bias), new tensor (R, l, N)
    in residual.dtype (may differ from x's: Infinity keeps an fp32 residual with bf16 linears).

    One launch on the Triton backend; see :mod:`ssg_engine.kernels.matmul_gated_residual`. The reference backend is
    the blocks' eager ``residual + F.linear(x, weight, bias).mul_(gamma)`` (``round_gated=False``: ``.mul(gamma)``, no
    rounding of the gated product to y's dtype; the kernel never rounds it).
    """
    from ssg_engine.kernels import matmul_gated_residual as impl

    with nvtx_range("matmul_gated_residual"):
        if resolve_backend(backend, x.device) == "triton":
            return impl.matmul_gated_residual_triton(residual, x, weight, bias, gamma)
        return impl.matmul_gated_residual_reference(residual, x, weight, bias, gamma, round_gated)


def _generators(seed: torch.Tensor, offset: torch.Tensor) -> Union[torch.Generator, List[torch.Generator]]:
    """The reference backend's generator on ``seed``'s device for a seed (1,), or one per key of a seed (S,), seeded
    with ``key * 1_000_003 + offset`` (a host read)."""
    generators = []
    for key in seed.tolist():
        generator = torch.Generator(device=seed.device)
        generator.manual_seed((key * _SEED_MIX + int(offset)) % 2**64)
        generators.append(generator)
    return generators[0] if seed.shape[0] == 1 else generators


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float,
    *,
    act: str = "silu",
    backend: str = "auto",
) -> torch.Tensor:
    """act(GroupNorm(x)): x (B, C, H, W) NCHW or channels_last, weight/bias (C,) -> (B, C, H, W) in x's dtype and
    memory format; statistics in fp32.

    ``act`` names the eager code the reference runs: ``"silu"`` (``F.silu``, VQ-VAE), ``"swish"`` (upstream BSQ's
    ``h * sigmoid(h)``, which rounds differently), ``"none"`` (the attention blocks' plain GroupNorm). The Triton
    backend computes all of them in one kernel (:mod:`ssg_engine.kernels.group_norm_silu`).
    """
    from ssg_engine.kernels import group_norm_silu as impl

    with nvtx_range("group_norm_silu"):
        if resolve_backend(backend, x.device) == "triton":
            return impl.group_norm_silu_triton(x, weight, bias, num_groups, eps, act)
        return impl.group_norm_silu_reference(x, weight, bias, num_groups, eps, act)
