"""The GEMM main loop shared by the fused-epilogue linears (``matmul_gelu``, ``matmul_gated_residual``).

Specification: one program computes the float32 tile ``acc = x[rows] @ weight[cols]^T`` of
``x`` (M, K) and an ``nn.Linear`` weight (N, K) as stored (read transposed through its strides, no copy).
``x`` comes as (R, L, K) with any strides (M = R * L rows; row m is ``x[m // L, m % L]``), so a strided
view of a (R, l, C) activation needs no copy either. Offsets of rows are int64 (M * K reaches 2^31 at
Infinity's last scales); the K loop is masked, so no size needs to be a multiple of a block.

Precision: float32 inputs use ``input_precision="ieee"`` (exact fp32 products, fp32 sums: the result
differs from cuBLAS/CPU fp32 only by summation order); bfloat16/float16 inputs go to the tensor cores
with float32 accumulation (the order of the K sum differs from cuBLAS's; each product is exact).

Program order: grouped by ``GROUP_M`` row tiles (Triton's matmul tutorial, "L2 cache optimizations"):
consecutive programs sweep the columns of a band of ``GROUP_M`` row tiles, so a weight column tile is
reused from L2 by the band and an x row tile by the column sweep.

:func:`gemm_config` is the one table of tiles/warps/stages for both kernels (no autotune: AOT enumerates it).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ssg_engine.backend import triton_interpreting

from . import interpreter_tiles, jit

try:
    import triton.language as tl
except ImportError:  # reference-only install: the launchers raise instead
    tl = None

# Two bfloat16 bugs of Triton 3.9's interpreter, worked around only when interpreting: it multiplies bf16 tiles as
# their uint16 storage (np.matmul in InterpreterBuilder.create_dot), so interpreted dots take float32 operands
# (exact: the product of two bf16/fp16 values fits in fp32); and its float32 -> bf16 cast truncates (cast_impl;
# the GPU rounds to nearest even), so :func:`cast_rtne` rounds by hand. A global constexpr, not a parameter:
# compiled kernels and their launch configurations are unchanged. Fixed at import, as the interpreter switch is.
_INTERPRETED = tl.constexpr(triton_interpreting()) if tl is not None else False


@jit()
def cast_rtne(v, like_ptr):
    """float32 ``v`` in ``like_ptr``'s element type, rounded to nearest even (as the GPU's ``.to`` does)."""
    out = v.to(like_ptr.dtype.element_ty)
    if _INTERPRETED:
        if like_ptr.dtype.element_ty == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return out


@jit()
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row offsets (BLOCK_M,), column offsets (BLOCK_N,)) of this program in the grouped order."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@jit()
def matmul_tile(
    x_ptr, w_ptr, offs_m, offs_n, M, N, K, L,
    stride_xr, stride_xl, stride_xk, stride_wn, stride_wk,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """float32 (BLOCK_M, BLOCK_N) tile of x @ weight^T at rows ``offs_m`` and columns ``offs_n`` (masked)."""
    rows = offs_m.to(tl.int64)
    x_rows = x_ptr + (rows // L) * stride_xr + (rows % L) * stride_xl  # (BLOCK_M,) row starts
    w_cols = w_ptr + offs_n.to(tl.int64) * stride_wn
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_rows[:, None] + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_cols[None, :] + offs_k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if _INTERPRETED:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


# Tiles per (M bucket, input dtype): (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages).
# Small M (the first scales: M = 2B * tokens = 2..50 rows at B = 1) is weight-bandwidth bound: a 16-row tile
# wastes the fewest tensor-core rows and narrow N tiles put more programs on the SMs (N / 32 >= 32 programs at
# C = 1024); large M is compute bound: 128 x 128 tiles, 8 warps, 3 stages (the shape of Triton's matmul tutorial
# configurations for bf16 on A100/H100). fp32 "ieee" dots run on the FMA units (no tensor cores): 64 x 64 tiles
# with 4 warps keep the operand fragments in registers. The gated residual's epilogue holds residual and gamma
# tiles next to the accumulator: 64 x 128 with 4 warps spilled 72 B/thread on sm_90 (fp32 residual, bf16 x), so
# that bucket has 8 warps. Registers (sm_80 / sm_90, gelu / gated residual) and 0 spills: bench/aot_compile.py;
# not yet timed on a GPU (bench/bench_kernels.py rows matmul_*).
_LOW_PRECISION_CONFIGS = (
    (16, (16, 32, 128, 1, 4, 4)),
    (64, (64, 64, 64, 1, 4, 4)),
    (256, (64, 128, 64, 8, 8, 4)),
    (None, (128, 128, 64, 8, 8, 3)),
)
_FP32_CONFIGS = (
    (16, (16, 32, 32, 1, 4, 2)),
    (64, (64, 64, 32, 1, 4, 2)),
    (None, (64, 64, 32, 8, 4, 2)),
)


def gemm_config(m: int, dtype: torch.dtype) -> Dict[str, int]:
    """Tiles and launch options of an (M, K) x (K, N) GEMM with ``dtype`` inputs: ``BLOCK_M, BLOCK_N, BLOCK_K,
    GROUP_M`` (constexprs) and ``num_warps, num_stages``, by M bucket (<= 16, <= 64, <= 256, larger; fp32: <= 16,
    <= 64, larger)."""
    if interpreter_tiles():  # the CPU interpreter pays per program and op: few, large tiles (never compiled)
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1)
    table = _FP32_CONFIGS if dtype == torch.float32 else _LOW_PRECISION_CONFIGS
    for bound, config in table:
        if bound is None or m <= bound:
            break
    block_m, block_n, block_k, group_m, warps, stages = config
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=warps, num_stages=stages)


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # x and weight: the dtypes tl.dot takes


def describe(t: object) -> str:
    """Shape and dtype of a tensor (type name otherwise), for error messages."""
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kernel: bool = True) -> Tuple[int, int]:
    """Validate ``F.linear(x, weight, bias)`` operands as the kernels read them; return ``(K, N)``.

    x (..., K) and weight (N, K) float32, bfloat16 or float16 of one dtype (F.linear's rule outside autocast);
    bias (N,) of any floating dtype or None (rounded to x's dtype first, as autocast does); one device. With
    ``kernel=False`` (the references: eager ``F.linear``) x and weight may differ under autocast, which casts both."""
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        raise ValueError(f"x must be a (..., K) tensor; got {describe(x)}")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"weight must be an (N, K) tensor (nn.Linear.weight); got {describe(weight)}")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; use float32, bfloat16 or float16")
    if weight.dtype != x.dtype and (kernel or not torch.is_autocast_enabled(x.device.type)):
        raise ValueError(f"weight dtype {weight.dtype} must equal x dtype {x.dtype} (cast the weight, as autocast does)")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight {tuple(weight.shape)} needs K={k}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,) or not bias.is_floating_point():
            raise ValueError(f"bias must be a floating-point ({n},) tensor or None; got {describe(bias)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    return k, n


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the bias in x's dtype (a no-op when it already is, as in the models)."""
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) as (R, L, K) for :func:`matmul_tile`: a view for 1-3 dims (and for more when they flatten as one)."""
    if x.ndim == 1:
        return x.view(1, 1, -1)
    if x.ndim == 2:
        return x.unsqueeze(0)
    return x if x.ndim == 3 else x.reshape(-1, x.shape[-2], x.shape[-1])
