"""A linear layer with its bias and tanh-GELU in the epilogue: the first half of the transformer FFN.

Specification (:func:`matmul_gelu_reference`, the eager code of ``FFN`` in ``ssg_engine/models/var.py``, which
Infinity's blocks share)::

    y   = x @ weight^T + bias                      # F.linear: x (..., K), weight (N, K) as nn.Linear stores it
    out = 0.5 * y * (1 + tanh(sqrt(2 / pi) * (y + 0.044715 * y^3)))     # F.gelu(approximate="tanh")

Dtypes: x and weight one of float32 / bfloat16 / float16 (equal); bias (N,) any floating dtype or None, rounded
to x's dtype first (a no-op in the models; what autocast does otherwise); out (..., N) in x's dtype, a new
contiguous tensor (never aliases an input). No value is baked in: every number comes from the tensors.

:func:`matmul_gelu_triton` does it in one launch: each program accumulates a (BLOCK_M, BLOCK_N) float32 tile of
``x @ weight^T`` (:func:`ssg_engine.kernels.gemm_tile.matmul_tile`), adds the bias and applies the GELU in float32,
and rounds once on the store. Deviations from the eager sequence (F.linear rounds y to x's dtype, then the GELU
rounds again): the K sum runs in another order, y is not rounded before the GELU (low-precision outputs carry one
rounding instead of two), and the GELU is computed as ``y * sigmoid(2u)`` (= ``0.5 * y * (1 + tanh(u))``
exactly; Triton has no ``tanh`` outside libdevice, and this form needs only ``exp``, in the interpreter too).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import KernelLaunch, jit, require_kernel_device
from .gemm_tile import cast_rtne, check_linear, gemm_config, grouped_tile, linear_reference, matmul_tile, rows_view

try:
    import triton
    import triton.language as tl
except ImportError:  # reference-only install: the launcher below raises instead
    triton = None

def check_matmul_gelu_inputs(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kernel: bool = True) -> Tuple[int, int]:
    """Validate the operands (ValueErrors name the argument): x (..., K) and weight (N, K) of one dtype among
    float32, bfloat16, float16; bias (N,) floating or None; one device. Returns ``(K, N)``."""
    return check_linear(x, weight, bias, kernel)


def matmul_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """PyTorch specification: GELU_tanh(x @ weight^T + bias), x (..., K), weight (N, K) -> (..., N) in x.dtype."""
    check_matmul_gelu_inputs(x, weight, bias, kernel=False)
    return F.gelu(linear_reference(x, weight, bias), approximate="tanh")


# M and L (rows, rows per leading index) change with every scale and batch: specializing on them (== 1, % 16)
# would compile several variants per model for nothing. N and K are the model's widths (fixed): specialized.
@jit(do_not_specialize=["M", "L"])
def _matmul_gelu_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, N, K, L,
    stride_xr, stride_xl, stride_xk, stride_wn, stride_wk, stride_b,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    y = matmul_tile(
        x_ptr, w_ptr, offs_m, offs_n, M, N, K, L,
        stride_xr, stride_xl, stride_xk, stride_wn, stride_wk,
        PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0)
        y += cast_rtne(bias.to(tl.float32), x_ptr).to(tl.float32)[None, :]  # bias in x's dtype, as F.linear
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)  # sqrt(2 / pi): PyTorch's kBeta for approximate="tanh"
    out = y * tl.sigmoid(2.0 * u)  # 0.5 * y * (1 + tanh(u))
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out_ptr + offs, cast_rtne(out, out_ptr), mask=mask_m[:, None] & mask_n[None, :])


def matmul_gelu_launch(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Tuple[Optional[KernelLaunch], torch.Tensor]:
    """Validate, allocate ``out`` (..., N) in x.dtype and choose the configuration (:func:`gemm_config` by M and
    dtype); works on meta tensors. The launch is None when there is nothing to compute (M or N is 0)."""
    k, n = check_matmul_gelu_inputs(x, weight, bias)
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    x3 = rows_view(x)
    m = x3.shape[0] * x3.shape[1]
    if m == 0 or n == 0:
        return None, out
    config = gemm_config(m, x.dtype)
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    args = (
        x3, weight, bias if bias is not None else weight, out,  # weight: a dummy pointer (never read without bias)
        m, n, k, x3.shape[1],
        *x3.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0,
    )
    constexprs = dict(HAS_BIAS=bias is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **config)
    return KernelLaunch(_matmul_gelu_kernel, grid, args, constexprs, num_warps=warps, num_stages=stages), out


def matmul_gelu_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Triton launcher with the reference's contract."""
    if triton is None:
        raise RuntimeError("matmul_gelu_triton needs triton; use matmul_gelu_reference")
    launch, out = matmul_gelu_launch(x, weight, bias)
    require_kernel_device(x.device)
    if launch is not None:
        launch.run()
    return out
