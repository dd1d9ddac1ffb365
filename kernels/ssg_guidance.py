"""Fused classifier-free guidance + Scaled Spatial Guidance for one VAR scale.

Specification (:func:`ssg_guidance_reference`)::

    cfg    = (1 + t) * logits_2B[:B] - t * logits_2B[B:]          # fp32
    prior  = operator @ prev                                       # (N, M) @ (B, M, V)
    guided = cfg + beta * (cfg - prior)                            # or cfg when there is no prior

There is no prior when ``operator`` or ``prev`` is ``None`` or ``beta`` is the Python
number 0. A tensor ``beta`` never skips the prior (that would need a host sync); with
``beta == 0`` it still gives ``guided == cfg`` for a finite prior. ``t`` and ``beta``
are each a Python number, a 0-d tensor or a ``(B,)`` tensor (one value per image).

:func:`ssg_guidance_triton` does it in one pass: the grid covers (V tiles, N tiles,
batch); each program computes its prior tile as a ``tl.dot`` of operator tiles
``(BLOCK_N, BLOCK_M)`` with prev tiles ``(BLOCK_M, BLOCK_V)`` over M in fp32, then
applies CFG and SSG in the epilogue. The prior never goes to memory. Both outputs are
float32 ``(B, N, V)`` and always distinct tensors (``cfg`` is what the caller caches
as the next scale's ``prev``).
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch

from . import KernelLaunch, jit, require_kernel_device

try:
    import triton
    import triton.language as tl
except ImportError:  # reference-only install: the launcher below raises instead
    triton = None

Scalar = Union[float, torch.Tensor]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_DOT_BLOCK = 16  # tl.dot needs every tile dimension >= 16


@jit()
def guide_tile(
    logits_ptr, prev_ptr, op_ptr, t_ptr, beta_ptr,
    b, B, M, offs_n, offs_v, mask_n, mask_v,
    stride_lb, stride_ln, stride_lv,
    stride_pb, stride_pm, stride_pv,
    stride_on, stride_om,
    stride_t, stride_beta,
    t_val, beta_val,
    HAS_PRIOR: tl.constexpr, T_IS_TENSOR: tl.constexpr, BETA_IS_TENSOR: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """(cfg, guided) float32 (BLOCK_N, BLOCK_V) tiles of image ``b`` at tokens ``offs_n`` and channels ``offs_v``
    (the spec's formula; every kernel that guides a scale computes its tile here)."""
    # prior tile first, so the logits tiles are not held live across the M loop
    prior = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if HAS_PRIOR:
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            op = tl.load(
                op_ptr + offs_n[:, None] * stride_on + offs_m[None, :] * stride_om,
                mask=mask_n[:, None] & mask_m[None, :], other=0.0,
            ).to(tl.float32)
            prev = tl.load(
                prev_ptr + b * stride_pb + offs_m[:, None] * stride_pm + offs_v[None, :] * stride_pv,
                mask=mask_m[:, None] & mask_v[None, :], other=0.0,
            ).to(tl.float32)
            prior = tl.dot(op, prev, prior, input_precision=PRECISION)

    if T_IS_TENSOR:
        t = tl.load(t_ptr + b * stride_t)
    else:
        t = t_val
    mask = mask_n[:, None] & mask_v[None, :]
    tile = offs_n[:, None] * stride_ln + offs_v[None, :] * stride_lv
    cond = tl.load(logits_ptr + b * stride_lb + tile, mask=mask, other=0.0).to(tl.float32)
    uncond = tl.load(logits_ptr + (b + B) * stride_lb + tile, mask=mask, other=0.0).to(tl.float32)
    cfg = (1.0 + t) * cond - t * uncond

    guided = cfg
    if HAS_PRIOR:
        if BETA_IS_TENSOR:
            beta = tl.load(beta_ptr + b * stride_beta)
        else:
            beta = beta_val
        guided = cfg + beta * (cfg - prior)
    return cfg, guided


# B, N and M only bound masks and loops: specializing on their value (== 1, % 16) would compile
# several variants per batch bucket for nothing. stride_on is M (the operator is contiguous): its
# % 16 specialization applies to 2 of 9 prior scales, each at the price of a compile. stride_t and
# stride_beta are 0 (one value for the batch) or 1 (one per image) and t_ptr/beta_ptr point at
# cfg_t[si] / beta[si] of a captured graph's (K,) buffers, at byte offset 4 * si: specializing on
# either would compile one variant per scale. The strides of the big tensors stay specialized
# (contiguity, vector loads). bench/results/aot/README.md.
@jit(do_not_specialize=["B", "N", "M", "stride_on", "stride_t", "stride_beta"],
     do_not_specialize_on_alignment=["t_ptr", "beta_ptr"])
def _ssg_guidance_kernel(
    logits_ptr, prev_ptr, op_ptr, t_ptr, beta_ptr, guided_ptr, cfg_ptr,
    B, N, M, V,
    stride_lb, stride_ln, stride_lv,
    stride_pb, stride_pm, stride_pv,
    stride_on, stride_om,
    stride_t, stride_beta,
    t_val, beta_val,
    HAS_PRIOR: tl.constexpr, T_IS_TENSOR: tl.constexpr, BETA_IS_TENSOR: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    cfg, guided = guide_tile(
        logits_ptr, prev_ptr, op_ptr, t_ptr, beta_ptr,
        b, B, M, offs_n, offs_v, mask_n, mask_v,
        stride_lb, stride_ln, stride_lv,
        stride_pb, stride_pm, stride_pv,
        stride_on, stride_om,
        stride_t, stride_beta,
        t_val, beta_val,
        HAS_PRIOR, T_IS_TENSOR, BETA_IS_TENSOR, PRECISION, BLOCK_N, BLOCK_M, BLOCK_V,
    )
    mask = mask_n[:, None] & mask_v[None, :]
    out = b * N * V + offs_n[:, None] * V + offs_v[None, :]
    tl.store(cfg_ptr + out, cfg, mask=mask)
    tl.store(guided_ptr + out, guided, mask=mask)


def _shape(x: torch.Tensor) -> tuple:
    return tuple(x.shape)


def _check_scalar(name: str, value: Scalar, batch: int, device: torch.device) -> Optional[torch.Tensor]:
    """Validate ``t``/``beta``; return it as a float32 ``(B,)`` view (stride 0 for 0-d) or None."""
    if isinstance(value, torch.Tensor):
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but logits_2B is on {device}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got {value.dtype}")
        if value.ndim == 0:
            return value.to(torch.float32).reshape(1).expand(batch)
        if _shape(value) != (batch,):
            raise ValueError(
                f"{name} has shape {_shape(value)}; expected a number, a 0-d tensor or shape ({batch},)"
            )
        return value.to(torch.float32)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return None
    raise ValueError(f"{name} must be a real number or a tensor; got {type(value).__name__}")


def check_guidance_inputs(
    logits_2B: torch.Tensor,
    prev: Optional[torch.Tensor],
    operator: Optional[torch.Tensor],
    cfg_t: Scalar,
    beta: Scalar,
) -> Tuple[int, bool, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Validate everything; return ``(B, has_prior, t_tensor_or_None, beta_tensor_or_None)``."""
    if not isinstance(logits_2B, torch.Tensor) or logits_2B.ndim != 3:
        got = _shape(logits_2B) if isinstance(logits_2B, torch.Tensor) else type(logits_2B).__name__
        raise ValueError(f"logits_2B must be a (2B, N, V) tensor; got {got}")
    if not logits_2B.is_floating_point():
        raise ValueError(f"logits_2B must be floating point; got {logits_2B.dtype}")
    two_b, n, v = _shape(logits_2B)
    if two_b == 0 or two_b % 2:
        raise ValueError(
            f"logits_2B has {two_b} rows in dim 0; expected 2B > 0 (conditional half first, then unconditional)"
        )
    batch, device = two_b // 2, logits_2B.device
    t_tensor = _check_scalar("cfg_t", cfg_t, batch, device)
    beta_tensor = _check_scalar("beta", beta, batch, device)
    beta_is_zero = beta_tensor is None and float(beta) == 0.0
    has_prior = operator is not None and prev is not None and not beta_is_zero
    if has_prior:
        for name, x, ndim in (("prev", prev, 3), ("operator", operator, 2)):
            if not isinstance(x, torch.Tensor) or x.ndim != ndim or not x.is_floating_point():
                want = "(B, M, V)" if ndim == 3 else "(N, M)"
                got = f"{_shape(x)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} must be a floating-point {want} tensor; got {got}")
            if x.device != device:
                raise ValueError(f"{name} is on {x.device} but logits_2B is on {device}")
        if prev.shape[0] != batch or prev.shape[2] != v:
            raise ValueError(
                f"prev has shape {_shape(prev)} but logits_2B {_shape(logits_2B)} needs (B={batch}, M, V={v})"
            )
        m = prev.shape[1]
        if _shape(operator) != (n, m):
            raise ValueError(
                f"operator has shape {_shape(operator)} but logits have N={n} tokens and prev has M={m}"
            )
    return batch, has_prior, t_tensor, beta_tensor


def ssg_guidance_reference(
    logits_2B: torch.Tensor,
    prev: Optional[torch.Tensor],
    operator: Optional[torch.Tensor],
    cfg_t: Scalar,
    beta: Scalar,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """PyTorch specification. logits_2B (2B, N, V), prev (B, M, V), operator (N, M) -> (guided, cfg), (B, N, V) fp32."""
    batch, has_prior, t_tensor, beta_tensor = check_guidance_inputs(logits_2B, prev, operator, cfg_t, beta)
    t = t_tensor.reshape(batch, 1, 1) if t_tensor is not None else float(cfg_t)
    logits = logits_2B.float()
    cfg = (1 + t) * logits[:batch] - t * logits[batch:]
    if not has_prior:
        return cfg.clone(), cfg
    prior = torch.matmul(operator.float(), prev.float())
    b = beta_tensor.reshape(batch, 1, 1) if beta_tensor is not None else float(beta)
    return cfg + b * (cfg - prior), cfg


def pow2_clamp(x: int, lo: int, hi: int) -> int:
    """The power of two >= ``x``, clamped to [lo, hi] (tile sizes)."""
    return max(lo, min(hi, triton.next_power_of_2(x)))


def check_kernel_dtypes(**tensors: Optional[torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the first given tensor whose dtype the kernels do not read (None: not read)."""
    for name, x in tensors.items():
        if x is not None and x.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} is not supported by the kernel; use float32, bfloat16 or float16")


def guide_tile_args(
    logits_2B: torch.Tensor,
    prev: Optional[torch.Tensor],
    operator: Optional[torch.Tensor],
    cfg_t: Scalar,
    beta: Scalar,
    allow_tf32: bool = False,
) -> Tuple[Tuple[torch.Tensor, ...], Tuple[Union[int, float], ...], dict]:
    """Validate the guidance inputs and choose the tiles of :func:`guide_tile` (the one place that does, for every
    kernel guiding a scale). Returns ``(pointers, sizes, constexprs)``: ``logits, prev, op, t, beta``; ``B, N, M, V``,
    the strides, ``t_val, beta_val``; the ``HAS_*``/``*_IS_TENSOR`` switches, ``PRECISION`` and ``BLOCK_N/M/V``."""
    batch, has_prior, t_tensor, beta_tensor = check_guidance_inputs(logits_2B, prev, operator, cfg_t, beta)
    check_kernel_dtypes(logits_2B=logits_2B, prev=prev if has_prior else None, operator=operator if has_prior else None)
    _, n, v = _shape(logits_2B)
    if has_prior:
        m = prev.shape[1]
        # 32x16x64 fp32 tiles with 4 warps: no spills on sm_80/sm_90 (bench/results/aot/)
        block_n = pow2_clamp(n, _MIN_DOT_BLOCK, 32)
        block_m = _MIN_DOT_BLOCK
        block_v = pow2_clamp(v, _MIN_DOT_BLOCK, 64)
        prev_arg, op_arg = prev, operator
        prev_strides, op_strides = prev.stride(), operator.stride()
    else:  # elementwise only: no dot-shape constraint, wide V tiles
        m, block_m = 0, 1
        block_n = pow2_clamp(n, 1, 16)
        block_v = pow2_clamp(v, 16, 2048 // block_n)
        prev_arg, op_arg = logits_2B, logits_2B  # never read
        prev_strides, op_strides = (0, 0, 0), (0, 0)
    pointers = (
        logits_2B, prev_arg, op_arg,
        t_tensor if t_tensor is not None else logits_2B,  # a dummy pointer when t is a number (never read)
        beta_tensor if beta_tensor is not None else logits_2B,
    )
    sizes = (
        batch, n, m, v,
        *logits_2B.stride(),
        *prev_strides,
        *op_strides,
        t_tensor.stride(0) if t_tensor is not None else 0,
        beta_tensor.stride(0) if beta_tensor is not None else 0,
        float(cfg_t) if t_tensor is None else 0.0,
        float(beta) if beta_tensor is None else 0.0,
    )
    constexprs = dict(
        HAS_PRIOR=has_prior, T_IS_TENSOR=t_tensor is not None, BETA_IS_TENSOR=beta_tensor is not None,
        PRECISION="tf32" if allow_tf32 else "ieee",
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_V=block_v,
    )
    return pointers, sizes, constexprs


def ssg_guidance_launch(
    logits_2B: torch.Tensor,
    prev: Optional[torch.Tensor],
    operator: Optional[torch.Tensor],
    cfg_t: Scalar,
    beta: Scalar,
    allow_tf32: bool = False,
) -> Tuple[Optional[KernelLaunch], torch.Tensor, torch.Tensor]:
    """Validate, allocate ``(guided, cfg)`` (B, N, V) fp32 and choose the kernel configuration.

    The only code that decides the grid and warps (tiles: :func:`guide_tile_args`): :func:`ssg_guidance_triton`
    runs the launch, ``bench/aot_compile.py`` compiles it (meta tensors work). The launch is None when
    N or V is 0 (nothing to compute).
    """
    pointers, sizes, constexprs = guide_tile_args(logits_2B, prev, operator, cfg_t, beta, allow_tf32)
    batch, n, _, v = sizes[:4]
    guided = torch.empty((batch, n, v), dtype=torch.float32, device=logits_2B.device)
    cfg = torch.empty_like(guided)
    if n == 0 or v == 0:
        return None, guided, cfg
    grid = (triton.cdiv(v, constexprs["BLOCK_V"]), triton.cdiv(n, constexprs["BLOCK_N"]), batch)
    return KernelLaunch(_ssg_guidance_kernel, grid, (*pointers, guided, cfg, *sizes), constexprs, num_warps=4), guided, cfg


def ssg_guidance_triton(
    logits_2B: torch.Tensor,
    prev: Optional[torch.Tensor],
    operator: Optional[torch.Tensor],
    cfg_t: Scalar,
    beta: Scalar,
    allow_tf32: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher with the reference's contract; ``allow_tf32`` runs the prior dot in TF32."""
    if triton is None:
        raise RuntimeError("ssg_guidance_triton needs triton; use ssg_guidance_reference")
    launch, guided, cfg = ssg_guidance_launch(logits_2B, prev, operator, cfg_t, beta, allow_tf32)
    require_kernel_device(logits_2B.device)
    if launch is not None:
        launch.run()
    return guided, cfg
