"""LayerNorm without affine, then AdaLN modulation, in one pass over ``x``.

Specification (:func:`ada_ln_modulate_reference`)::

    n   = (x - mean_C(x)) / sqrt(var_C(x) + eps)      # biased variance over C, no weight, no bias
    out = n * (1 + scale[r]) + shift[r]               # scale/shift of row r broadcast over the l tokens

Shapes: ``x`` (R, l, C) (R = rows of the batch, 2B under CFG; l tokens of the scale; C channels), any strides;
``scale`` and ``shift`` broadcastable to (R, 1, C), any strides (the views ``mod.unbind(2)`` of a (R, 1, 6, C)
modulation tensor, or (R, 1, C), (1, 1, C), (C,)); ``eps`` a Python number (a model constant, baked into the launch).
Output: a fresh contiguous (R, l, C) tensor in ``out_dtype`` (default ``x.dtype``); nothing is written in place and
the output never aliases an input.

The reference is the eager code the models run, moved here: VAR ``ln_wo_grad(x).mul(scale.add(1)).add_(shift)`` in
x's dtype, Infinity ``ada_layer_norm``, the same chain on ``x.float()`` (out_dtype float32). Both are: compute in the
wider of x's dtype and ``out_dtype`` (``torch.promote_types``), round to ``out_dtype`` at the end if that differs.

:func:`ada_ln_modulate_triton` reads x once: each program holds ``ROWS`` whole rows of C channels in registers
(``BLOCK_C`` = the power of two >= C, masked), converts them to float32 on load, computes the mean, then the
variance as the mean of squared deviations (two passes over the registers, no cancellation), loads its rows'
scale/shift (any float dtype, converted to float32) and stores ``out`` with one rounding to ``out_dtype``. x may be
float32/bfloat16/float16, scale/shift any of those, out_dtype any of those. C is limited to ``MAX_C`` (the row must fit in registers; VAR d36 has C = 2304,
the widest supported Infinity preset 3360); a wider x raises ``ValueError``.

Deviations from the reference: statistics and modulation are float32 with one final rounding, where the eager chain
in a low-precision dtype rounds ``n``, ``1 + scale``, the product and the sum each to that dtype (and Infinity's
rounds ``1 + scale`` to scale's dtype before the float32 product); the summation order of mean and variance (a
tree over ``BLOCK_C``); ``1 / sqrt`` instead of ATen's ``rsqrt``. So the kernel is at least as close to the exact
result as the eager chain (``tests/test_kernel_ada_ln_modulate.py``), not bit-identical to it.
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
# One row lives in registers: BLOCK_C <= 8192 fp32 values over 16 warps is 16 per thread (no spills on sm_80/sm_90,
# bench/aot_compile.py). Wider than every supported model (VAR d36: 2304; Infinity up to 3360 -> BLOCK_C 4096).
MAX_C = 8192
_MIN_BLOCK_C = 16
# Elements of x one program holds (ROWS x BLOCK_C): narrow rows (the tiny models' C = 32..256) get several rows per
# program, so that a program still moves >= 2048 elements; wide rows get one row and more warps. At most 16 values
# per thread for every entry (warps = tile / 512). Not tuned on a GPU yet (bench/bench_kernels.py's adaln rows).
_TILE = 2048
_MAX_ROWS = 16


# n_rows (R * l) and l only bound the row mask and split a row index into (r, token): their values change with every
# scale and batch, and specializing on them (== 1 at the first scale, % 16) would compile variants for nothing. C, the
# strides and the pointers stay specialized: C is a model constant, and C % 16 == 0 / unit channel strides are what
# allow vector loads and stores.
@jit(do_not_specialize=["n_rows", "l"])
def _ada_ln_modulate_kernel(
    x_ptr, scale_ptr, shift_ptr, out_ptr,
    n_rows, l, C,
    stride_xr, stride_xl, stride_xc,
    stride_sr, stride_sc,
    stride_hr, stride_hc,
    eps,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # int64: R * l * C reaches 2**31
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (rows < n_rows)[:, None] & mask_c[None, :]
    r = rows // l
    token = rows - r * l

    x = tl.load(
        x_ptr + (r * stride_xr + token * stride_xl)[:, None] + offs_c[None, :] * stride_xc, mask=mask, other=0.0
    ).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    diff = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)

    scale = tl.load(scale_ptr + (r * stride_sr)[:, None] + offs_c[None, :] * stride_sc, mask=mask, other=0.0)
    shift = tl.load(shift_ptr + (r * stride_hr)[:, None] + offs_c[None, :] * stride_hc, mask=mask, other=0.0)
    out = diff * rstd[:, None] * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * C + offs_c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _describe(x: object) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def _modulation_view(name: str, t: object, x: torch.Tensor) -> torch.Tensor:
    """``t`` validated and broadcast to (R, 1, C) (an ``expand`` view: stride 0 where it broadcasts)."""
    R, _, C = x.shape
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor broadcastable to (R, 1, C) = ({R}, 1, {C}); "
                         f"got {_describe(t)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    try:
        shape = torch.broadcast_shapes(t.shape, (R, 1, C))
    except RuntimeError:
        shape = None
    if shape != (R, 1, C):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected one broadcastable to (R, 1, C) = ({R}, 1, {C}) "
                         "(one modulation row per batch row, shared by its l tokens)")
    return t.expand(R, 1, C)


def check_inputs(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, out_dtype: Optional[torch.dtype]
) -> Tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """Validate everything; return ``(scale, shift)`` as (R, 1, C) views and the output dtype."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (R, l, C) tensor; got {_describe(x)}")
    if x.shape[2] == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}; C must be > 0 (LayerNorm over the channels)")
    scale_view = _modulation_view("scale", scale, x)
    shift_view = _modulation_view("shift", shift, x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0; got {eps!r}")
    if out_dtype is None:
        out_dtype = x.dtype
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise ValueError(f"out_dtype must be a floating-point torch.dtype or None; got {out_dtype!r}")
    return scale_view, shift_view, out_dtype


def ada_ln_modulate_reference(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """PyTorch specification (the models' eager chain). x (R, l, C), scale/shift broadcastable to (R, 1, C) ->
    (R, l, C) in ``out_dtype`` (default x.dtype), computed in ``promote_types(x.dtype, out_dtype)``."""
    _, _, out_dtype = check_inputs(x, scale, shift, eps, out_dtype)
    y = F.layer_norm(x.to(torch.promote_types(x.dtype, out_dtype)), (x.shape[-1],), eps=eps).mul(scale.add(1)).add_(shift)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def check_kernel_dtypes(**tensors: object) -> None:
    """Raise ``ValueError`` naming the first argument whose dtype the kernel does not read or write."""
    for name, dtype in tensors.items():
        if dtype not in _KERNEL_DTYPES:
            raise ValueError(f"{name} dtype {dtype} is not supported by the kernel; use float32, bfloat16 or float16")


def launch_settings(C: int) -> Tuple[int, int, int]:
    """``(BLOCK_C, ROWS, num_warps)`` for rows of C channels (the fixed table above ``_TILE``)."""
    block_c = max(_MIN_BLOCK_C, triton.next_power_of_2(C))
    rows = max(1, min(_MAX_ROWS, _TILE // block_c))
    if interpreter_tiles():  # the CPU interpreter pays per program and op, not per element (never compiled)
        rows = max(1, (1 << 16) // block_c)
    num_warps = max(4, rows * block_c // 512)  # <= 16 fp32 values of x per thread
    return block_c, rows, num_warps


def ada_ln_modulate_launch(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, out_dtype: Optional[torch.dtype] = None
) -> Tuple[Optional[KernelLaunch], torch.Tensor]:
    """Validate, allocate ``out`` (R, l, C) contiguous in ``out_dtype`` and choose the kernel configuration.

    The only code that decides the grid, tiles and warps (:func:`launch_settings`); works on meta tensors
    (``bench/aot_compile.py``). The launch is None when x has no rows (nothing to compute).
    """
    scale_view, shift_view, out_dtype = check_inputs(x, scale, shift, eps, out_dtype)
    check_kernel_dtypes(x=x.dtype, scale=scale.dtype, shift=shift.dtype, out_dtype=out_dtype)
    R, l, C = x.shape
    if C > MAX_C:
        raise ValueError(f"x has C = {C} channels; the kernel holds a row in registers and takes C <= {MAX_C}")
    out = torch.empty((R, l, C), dtype=out_dtype, device=x.device)
    n_rows = R * l
    if n_rows == 0:
        return None, out
    block_c, rows, num_warps = launch_settings(C)
    args = (
        x, scale_view, shift_view, out,
        n_rows, l, C,
        *x.stride(),
        scale_view.stride(0), scale_view.stride(2),
        shift_view.stride(0), shift_view.stride(2),
        float(eps),
    )
    grid = (triton.cdiv(n_rows, rows),)
    return KernelLaunch(_ada_ln_modulate_kernel, grid, args, dict(ROWS=rows, BLOCK_C=block_c), num_warps=num_warps), out


def ada_ln_modulate_triton(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Triton launcher with the reference's contract (float32 math, one rounding to ``out_dtype``)."""
    if triton is None:
        raise RuntimeError("ada_ln_modulate_triton needs triton; use ada_ln_modulate_reference")
    launch, out = ada_ln_modulate_launch(x, scale, shift, eps, out_dtype)
    require_kernel_device(x.device)
    if launch is not None:
        launch.run()
    return out
