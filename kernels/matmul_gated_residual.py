"""A linear layer with its bias and the gated residual in the epilogue: attention out-projection / FFN fc2.

Specification (:func:`matmul_gated_residual_reference`, the eager code of ``AdaLNSelfAttn.forward_modulated`` in
``ssg_engine/models/var.py`` and ``CrossAttnBlock.forward`` in ``ssg_engine/models/infinity.py``)::

    out = residual + (x @ weight^T + bias) * gamma        # residual + F.linear(x, weight, bias).mul_(gamma)

with residual (R, l, N), x (R, l, K), weight (N, K) as nn.Linear stores it, bias (N,) or None, gamma broadcastable
to (R, 1, N) with any strides (a ``mod.unbind(2)`` view of the (R, 1, 6, N) modulation, a (N,) layer scale).

Dtypes: x and weight one of float32 / bfloat16 / float16 (equal); bias any floating dtype, rounded to x's dtype
first (a no-op in the models; what autocast does otherwise); gamma and residual any floating dtype; out a new
contiguous (R, l, N) tensor in residual's dtype, which must be the promoted dtype of residual and x (Infinity
keeps a float32 residual stream around bf16 linears; a bf16 residual with fp32 x is refused). Never aliases an
input; no value is baked in.

:func:`matmul_gated_residual_triton` does it in one launch: a float32 (BLOCK_M, BLOCK_N) tile of ``x @ weight^T``
(:func:`ssg_engine.kernels.gemm_tile.matmul_tile`), then bias, gamma and residual loaded as float32, and one
rounding on the store. Deviations from the eager sequence: the K sum runs in another order, and the eager rounds
of ``y`` and ``y * gamma`` to x's dtype (F.linear, then ``mul_`` in place) do not happen (fewer roundings with
low-precision x).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import KernelLaunch, jit, require_kernel_device
from .gemm_tile import cast_rtne, check_linear, describe, gemm_config, grouped_tile, linear_reference, matmul_tile

try:
    import triton
    import triton.language as tl
except ImportError:  # reference-only install: the launcher below raises instead
    triton = None


def check_matmul_gated_residual_inputs(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    gamma: torch.Tensor,
    kernel: bool = True,
) -> torch.Tensor:
    """Validate (ValueErrors name the argument): x (R, l, K) and weight (N, K) of one dtype among float32, bfloat16,
    float16; bias (N,) floating or None; residual (R, l, N) floating, of the promoted dtype of residual and x;
    gamma floating and broadcastable to (R, 1, N); one device. With ``kernel=False`` (the reference) under autocast,
    weight and residual dtypes follow eager's casts instead. Returns gamma broadcast to (R, 1, N) (a view)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise ValueError(f"x must be an (R, l, K) tensor; got {describe(x)}")
    _, n = check_linear(x, weight, bias, kernel)
    r, l, _ = x.shape
    if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != (r, l, n) or not residual.is_floating_point():
        raise ValueError(f"residual must be a floating-point ({r}, {l}, {n}) tensor (x's rows, weight's N); got {describe(residual)}")
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    if torch.promote_types(residual.dtype, x.dtype) != residual.dtype and (kernel or not torch.is_autocast_enabled(x.device.type)):
        raise ValueError(f"residual dtype {residual.dtype} is narrower than x dtype {x.dtype}: the output (residual's dtype) "
                         "would round the eager result")
    if not isinstance(gamma, torch.Tensor) or not gamma.is_floating_point():
        raise ValueError(f"gamma must be a floating-point tensor broadcastable to ({r}, 1, {n}); got {describe(gamma)}")
    if gamma.device != x.device:
        raise ValueError(f"gamma is on {gamma.device} but x is on {x.device}")
    try:
        return gamma.broadcast_to((r, 1, n))
    except RuntimeError:
        raise ValueError(f"gamma has shape {tuple(gamma.shape)}; expected one broadcastable to ({r}, 1, {n})") from None


def matmul_gated_residual_reference(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    gamma: torch.Tensor,
    round_gated: bool = True,
) -> torch.Tensor:
    """PyTorch specification: residual + gamma * (x @ weight^T + bias), (R, l, N) in residual.dtype. The eager blocks
    round ``gamma * y`` to y's dtype (``y.mul_(gamma)``: VAR; Infinity's attention) or not (``round_gated=False``,
    ``y.mul(gamma)``: Infinity's FFN, whose float32 gamma promotes the product); the kernel never rounds it."""
    check_matmul_gated_residual_inputs(residual, x, weight, bias, gamma, kernel=False)
    y = linear_reference(x, weight, bias)
    return residual + (y.mul_(gamma) if round_gated else y.mul(gamma))


# M and L (rows, rows per image) change with every scale and batch: specializing on them (== 1, % 16) would compile
# several variants per model for nothing. stride_gr is 0 for a (N,) gamma and 6N for a modulation view: one compile.
@jit(do_not_specialize=["M", "L", "stride_gr"])
def _matmul_gated_residual_kernel(
    res_ptr, x_ptr, w_ptr, b_ptr, g_ptr, out_ptr,
    M, N, K, L,
    stride_rr, stride_rl, stride_rn,
    stride_xr, stride_xl, stride_xk, stride_wn, stride_wk, stride_b, stride_gr, stride_gn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    y = matmul_tile(
        x_ptr, w_ptr, offs_m, offs_n, M, N, K, L,
        stride_xr, stride_xl, stride_xk, stride_wn, stride_wk,
        PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0)
        y += cast_rtne(bias.to(tl.float32), x_ptr).to(tl.float32)[None, :]  # bias in x's dtype, as F.linear
    rows = offs_m.to(tl.int64)
    image, token = rows // L, rows % L
    gamma = tl.load(g_ptr + image[:, None] * stride_gr + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
    residual = tl.load(
        res_ptr + (image * stride_rr + token * stride_rl)[:, None] + offs_n[None, :] * stride_rn, mask=mask, other=0.0
    )
    out = residual.to(tl.float32) + gamma.to(tl.float32) * y
    tl.store(out_ptr + rows[:, None] * N + offs_n[None, :], cast_rtne(out, out_ptr), mask=mask)


def matmul_gated_residual_launch(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    gamma: torch.Tensor,
) -> Tuple[Optional[KernelLaunch], torch.Tensor]:
    """Validate, allocate ``out`` (R, l, N) in residual.dtype and choose the configuration (:func:`gemm_config` by
    M = R * l and x's dtype); works on meta tensors. The launch is None when M or N is 0."""
    gamma3 = check_matmul_gated_residual_inputs(residual, x, weight, bias, gamma)
    r, l, k = x.shape
    n = weight.shape[0]
    out = torch.empty((r, l, n), dtype=residual.dtype, device=x.device)
    m = r * l
    if m == 0 or n == 0:
        return None, out
    config = gemm_config(m, x.dtype)
    warps, stages = config.pop("num_warps"), config.pop("num_stages")
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    args = (
        residual, x, weight, bias if bias is not None else weight, gamma3, out,  # weight: never read without bias
        m, n, k, l,
        *residual.stride(), *x.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0,
        gamma3.stride(0), gamma3.stride(2),
    )
    constexprs = dict(HAS_BIAS=bias is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **config)
    return KernelLaunch(_matmul_gated_residual_kernel, grid, args, constexprs, num_warps=warps, num_stages=stages), out


def matmul_gated_residual_triton(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    gamma: torch.Tensor,
) -> torch.Tensor:
    """Triton launcher with the reference's contract."""
    if triton is None:
        raise RuntimeError("matmul_gated_residual_triton needs triton; use matmul_gated_residual_reference")
    launch, out = matmul_gated_residual_launch(residual, x, weight, bias, gamma)
    require_kernel_device(x.device)
    if launch is not None:
        launch.run()
    return out
