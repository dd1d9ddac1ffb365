"""Fused GroupNorm + SiLU of the VAE decoders (VAR's VQ-VAE, Infinity's BSQ VAE).

Specification (:func:`group_norm_silu_reference`)::

    x      (B, C, H, W), NCHW-contiguous or channels_last; C = G * Cg (G = num_groups)
    mean, var over each (b, g) group of Cg * H * W values       # fp32, biased variance
    y      = (x - mean) / sqrt(var + eps) * weight[c] + bias[c] # fp32; weight, bias (C,)
    out    = act(y) in x's dtype and memory format               # act: silu / swish: y * sigmoid(y); none: y

The reference is exactly the eager code each decoder runs: ``F.silu(F.group_norm(...))`` (VQ-VAE, ``act="silu"``),
upstream BSQ's ``h * torch.sigmoid(h)`` written out (``act="swish"``, which rounds differently from ``F.silu``), or the
plain ``F.group_norm`` (the attention blocks' norm, ``act="none"``). In low precision the eager code rounds twice
(GroupNorm's output, then the activation's); the kernel rounds once, at the store: ``silu`` and ``swish`` are the
same kernel.

:func:`group_norm_silu_triton` runs one program per (image, group), grid ``(B, G)``, in two passes over the group in
``(BLOCK_S, BLOCK_C)`` tiles (spatial x channels of the group; a group is never loaded whole: BSQ's 1024 px layers
have 4M values per group):

1. statistics: each tile's exact fp32 mean and sum of squared deviations (``tl.sum`` trees), merged into the
   running ones in tile order with Chan et al.'s pairwise update (``delta = mean_t - mean``,
   ``M2 += M2_t + delta^2 * n * n_t / (n + n_t)``). PyTorch's CUDA kernel runs a per-thread Welford then a warp/
   block tree; its CPU kernel sums blocked partial sums (NCHW) or per-channel moments (channels_last). Both the
   kernel and PyTorch are free of the ``E[x^2] - E[x]^2`` cancellation; the orders differ, so the statistics differ
   by a few fp32 ulps (tests: ``TOLERANCE`` in ``tests/test_kernel_group_norm_silu.py``).
2. apply: ``y = (x - mean) * a + bias`` with ``a = weight * rstd`` per channel (not PyTorch CUDA's folded
   ``x * a + (bias - mean * a)``, which cancels when the group's mean is large against its spread, e.g. a group of
   one value), the activation in fp32, one rounding to x's dtype.

Not yet measured on a GPU (bench/bench_kernels.py has the rows). Two known limits of the (B, G) grid: at B = 1 only
G = 32 programs stream the whole tensor (BSQ's 1024 px layer: 4M values each), and on channels_last a group is rows
of Cg = 4..20 values strided by C, so neighbouring groups' programs share 32-byte sectors through L2. If the rows
show either, the next step is a split over space: per-channel partial (mean, M2) per spatial chunk (coalesced
(BLOCK_S, C) tiles), merged per group with the same Chan update, then the apply pass.

Inputs are read twice and the output written once (eager: GroupNorm reads twice and writes, SiLU reads and writes
again). ``out`` is always a new tensor (never aliases ``x``). Everything is a host number baked into the launch
(``num_groups``, ``eps``, the activation); there are no device-side scalars. Limits: each image's ``C * H * W`` and
the tensor offsets of a group fit in int32 (checked).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import KernelLaunch, interpreter_tiles, jit, require_kernel_device

try:
    import triton
    import triton.language as tl
except ImportError:  # reference-only install: the launcher below raises instead
    triton = None

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTIVATIONS = ("silu", "swish", "none")
# Values per tile: 2048 fp32 over 4 warps is 16 per thread for x and 16 for its deviations (no spills on
# sm_80/sm_90, bench/aot_compile.py); 64 channels per tile bound BLOCK_C (real Cg: 4 to 20).
_TILE = 2048
# The CPU interpreter pays per loop iteration and per op, not per element: one tile covers a whole group there (CI's
# decoders otherwise take minutes). A GPU never sees this size (the AOT gate enumerates the compiled path's).
_INTERPRETER_TILE = 1 << 18
_MAX_BLOCK_C = 64
_NUM_WARPS = 4
_INT32_MAX = 2**31 - 1


# HW and CG only bound loops and masks: specializing on their divisibility would compile a variant per spatial size
# (every decoder level) for nothing. The strides stay specialized: the contiguous one (1) selects vector loads.
@jit(do_not_specialize=["HW", "CG"])
def _group_norm_silu_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    HW, CG, eps,
    stride_xb, stride_xc, stride_xs,
    stride_ob, stride_oc, stride_os,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    c_first = g * CG
    x_base = x_ptr + b * stride_xb + c_first * stride_xc
    o_base = out_ptr + b * stride_ob + c_first * stride_oc

    # pass 1: per-tile exact mean / M2, merged in tile order (Chan et al.)
    count = 0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        n_c = tl.minimum(CG - c0, BLOCK_C)
        for s0 in range(0, HW, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = (offs_s < HW)[:, None] & mask_c[None, :]
            x = tl.load(x_base + offs_s[:, None] * stride_xs + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
            x = x.to(tl.float32)
            n_t = n_c * tl.minimum(HW - s0, BLOCK_S)
            mean_t = tl.sum(tl.sum(x, axis=1), axis=0) / n_t
            d = tl.where(mask, x - mean_t, 0.0)
            m2_t = tl.sum(tl.sum(d * d, axis=1), axis=0)
            total = count + n_t
            delta = mean_t - mean
            w_t = n_t / total  # int / int: fp32 true division
            mean = mean + delta * w_t
            m2 = m2 + m2_t + delta * delta * (count * w_t)
            count = total
    rstd = 1.0 / tl.sqrt(m2 / count + eps)

    # pass 2: y = (x - mean) * a + bias per channel, activation in fp32, one rounding at the store
    for c0 in range(0, CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CG
        weight = tl.load(w_ptr + c_first + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + c_first + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        a = weight * rstd
        for s0 in range(0, HW, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = (offs_s < HW)[:, None] & mask_c[None, :]
            x = tl.load(x_base + offs_s[:, None] * stride_xs + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
            y = (x.to(tl.float32) - mean) * a[None, :] + bias[None, :]
            if ACT:
                y = y * tl.sigmoid(y)
            tl.store(o_base + offs_s[:, None] * stride_os + offs_c[None, :] * stride_oc,
                     y.to(out_ptr.dtype.element_ty), mask=mask)


def _describe(x: object) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def check_group_norm_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float, act: str
) -> torch.memory_format:
    """Validate everything (``ValueError`` naming the argument); return x's memory format (contiguous or
    channels_last; the output keeps it)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (B, C, H, W) tensor; got {_describe(x)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int; got {num_groups!r}")
    channels = x.shape[1]
    if channels % num_groups:
        raise ValueError(f"num_groups {num_groups} does not divide the {channels} channels of x")
    for name, p in (("weight", weight), ("bias", bias)):
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != (channels,) or not p.is_floating_point():
            raise ValueError(f"{name} must be a floating-point ({channels},) tensor; got {_describe(p)}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number; got {eps!r}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {', '.join(ACTIVATIONS)}; got {act!r}")
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    raise ValueError(f"x must be NCHW-contiguous or channels_last; got strides {x.stride()}")


def group_norm_silu_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float, act: str = "silu"
) -> torch.Tensor:
    """The decoders' eager code: x (B, C, H, W), weight/bias (C,) -> act(GroupNorm(x)) (B, C, H, W), x's dtype."""
    check_group_norm_inputs(x, weight, bias, num_groups, eps, act)
    h = F.group_norm(x, num_groups, weight, bias, eps)
    if act == "silu":
        return F.silu(h)
    if act == "swish":
        return h * torch.sigmoid(h)  # upstream BSQ's swish, written out (rounds differently from F.silu)
    return h


def group_norm_silu_launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float, act: str = "silu"
) -> Tuple[Optional[KernelLaunch], torch.Tensor]:
    """Validate, allocate ``out`` (x's shape, dtype and memory format) and choose the configuration (the only code
    that does; meta tensors work). The launch is None when x is empty."""
    memory_format = check_group_norm_inputs(x, weight, bias, num_groups, eps, act)
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} is not supported by the kernel; use float32, bfloat16 or float16")
    B, C, H, W = x.shape
    if C * H * W > _INT32_MAX:
        raise ValueError(f"x has {C * H * W} values per image; the kernel indexes an image with int32 (at most 2**31 - 1)")
    weight, bias = weight.contiguous(), bias.contiguous()  # the kernel reads them at unit stride (no copy when dense)
    out = torch.empty_like(x, memory_format=memory_format)
    if x.numel() == 0:
        return None, out
    hw, cg = H * W, C // num_groups
    block_c = min(triton.next_power_of_2(cg), _MAX_BLOCK_C)
    block_s = min(triton.next_power_of_2(hw), (_INTERPRETER_TILE if interpreter_tiles() else _TILE) // block_c)
    # (H, W) flatten to one spatial index s; both layouts are dense, so the strides follow from the format (a size-1
    # dim's stride in x.stride() is arbitrary): (b, c, s) strides (C*HW, HW, 1) for NCHW, (C*HW, 1, C) channels_last
    strides = (C * hw, hw, 1) if memory_format == torch.contiguous_format else (C * hw, 1, C)
    args = (x, weight, bias, out, hw, cg, float(eps), *strides, *strides)
    constexprs = dict(ACT=act != "none", BLOCK_S=block_s, BLOCK_C=block_c)
    return KernelLaunch(_group_norm_silu_kernel, (B, num_groups), args, constexprs, num_warps=_NUM_WARPS), out


def group_norm_silu_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float, act: str = "silu"
) -> torch.Tensor:
    """Triton launcher with the reference's contract (one rounding instead of the eager code's two)."""
    if triton is None:
        raise RuntimeError("group_norm_silu_triton needs triton; use group_norm_silu_reference")
    launch, out = group_norm_silu_launch(x, weight, bias, num_groups, eps, act)
    require_kernel_device(x.device)
    if launch is not None:
        launch.run()
    return out
