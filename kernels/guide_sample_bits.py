"""CFG + SSG guidance fused with one Bernoulli draw per bit (Infinity's bitwise tokens) for one scale.

Specification (:func:`guide_sample_bits_reference`)::

    guided, cfg = ssg_guidance(logits_2B, prev, operator, cfg_t, beta)     # (B, N, V) fp32, V = 2d
    x0, x1      = guided[..., 0::2] / temperature, guided[..., 1::2] / temperature   # bit j: channels 2j, 2j+1
    p1          = sigmoid(x1 - x0)                                         # P(bit = 1)
    top_k == 1:  keep only the larger side (both on an exact tie); top_k == 0 or >= 2: no-op
    top_p > 0:   drop the smaller side iff its probability e / (1 + e), e = exp(-|x1 - x0|), is <= 1 - top_p
                 (the larger side's probability >= top_p), never on an exact tie
    bits        = Bernoulli draw over the kept sides                       # (B, N, d) uint8 in {0, 1}
    nonfinite   = any(not isfinite(guided / temperature))                  # (1,) bool

That is upstream's ``sample_with_top_k_top_p_`` on each bit's 2 logits, i.e. exactly what
``sample_logits_reference`` does on ``guided.view(-1, 2)`` (the reference calls it). Shapes: ``logits_2B``
(2B, N, V) fp32/bf16/fp16 (conditional rows first), ``prev`` (B, M, V), ``operator`` (N, M); ``cfg_t``/``beta``
numbers, 0-d or (B,) tensors, as in :mod:`ssg_engine.kernels.ssg_guidance`, whose :func:`guide_tile` computes the
guided tile here too. Outputs, all freshly allocated, none aliasing an input: ``bits`` (B, N, d) uint8,
``nonfinite`` (1,) bool, and when asked ``cfg`` (the next scale's prior source) and ``guided`` (B, N, V) fp32
(None otherwise). When ``nonfinite`` is set the bits are unspecified.

:func:`guide_sample_bits_triton` does it in one pass over the logits: the grid covers (V tiles, N tiles, batch);
each program guides a (BLOCK_N, BLOCK_V) tile in registers, splits it into its (BLOCK_N, BLOCK_V / 2) bit pairs and
draws. No fp32 ``guided`` round trip through memory, no int64 tokens. Randomness: ``u ~ U[0, 1)`` from Philox (key
``seed``, counter ``(bit index, offset_lo, offset_hi, 0)``, bit index ``(b * N + n) * d + j``; with per-row seeds,
``seed`` (B,), key ``seed[b]`` and bit index ``n * d + j``: an image's bits depend only on its own key), the counters
and the rule ``bit = u * (m0 + m1) >= m0`` (``m = exp(x - max)`` over the kept sides) of
:func:`ssg_engine.kernels.sampling.sample_logits_triton` on the rows ``guided.view(-1, 2)``: the same seed and
offset draw the same bits as guidance followed by that sampler (with top-p, up to the boundary rounding below).
All math is fp32. ``seed`` (int64, (1,) or (B,)) and ``offset`` (int64, (1,)) are read on the device (CUDA-graph safe); ``temperature``,
``top_k``, ``top_p`` are Python numbers baked into the launch (the Engine's graph key holds them).

Deviations from the reference: the draw (Philox instead of ``torch.multinomial``; the same distribution); on an
exact tie ``x0 == x1`` top-p keeps both sides (the reference's sort drops one of them when ``top_p <= 0.5``, the
sampler kernel's rule); an ``e / (1 + e)`` within float rounding of ``1 - top_p`` may be cut differently (``exp``
differs in the last bit between torch and Triton; measure zero for continuous logits).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from . import KernelLaunch, jit, require_kernel_device
from .sampling import check_sampling_args, check_seed_offset, philox_uniform, sample_logits_reference
from .ssg_guidance import Scalar, check_guidance_inputs, guide_tile, guide_tile_args, ssg_guidance_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # reference-only install: the launcher below raises instead
    triton = None

# (bits, nonfinite, cfg or None, guided or None)
BitsOutputs = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


# As _ssg_guidance_kernel: B, N and M only bound masks and loops, stride_on is M; specializing on their value
# would compile several variants per batch bucket for nothing. t_ptr / beta_ptr (and their strides) point at
# cfg_t[si] / beta[si] of a captured graph's (K,) buffers, at byte offset 4 * si: no alignment specialization, or
# each scale would compile its own variant.
@jit(do_not_specialize=["B", "N", "M", "stride_on", "stride_t", "stride_beta"],
     do_not_specialize_on_alignment=["t_ptr", "beta_ptr"])
def _guide_sample_bits_kernel(
    logits_ptr, prev_ptr, op_ptr, t_ptr, beta_ptr,
    bits_ptr, cfg_ptr, guided_ptr, nonfinite_ptr, seed_ptr, offset_ptr,
    B, N, M, V,
    stride_lb, stride_ln, stride_lv,
    stride_pb, stride_pm, stride_pv,
    stride_on, stride_om,
    stride_t, stride_beta,
    t_val, beta_val,
    temperature, top_p_cut,
    HAS_PRIOR: tl.constexpr, T_IS_TENSOR: tl.constexpr, BETA_IS_TENSOR: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    GREEDY: tl.constexpr, HAS_TOP_P: tl.constexpr, WRITE_CFG: tl.constexpr, WRITE_GUIDED: tl.constexpr,
    PER_ROW_SEED: tl.constexpr,
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
    if WRITE_CFG:
        tl.store(cfg_ptr + out, cfg, mask=mask)
    if WRITE_GUIDED:
        tl.store(guided_ptr + out, guided, mask=mask)

    x = tl.math.div_rn(guided, tl.zeros_like(guided) + temperature)  # IEEE division, as torch does
    bad = mask & ~(tl.abs(x) < float("inf"))  # NaN compares False
    any_bad = tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0) > 0
    tl.store(nonfinite_ptr, any_bad, mask=any_bad)  # every writer stores True: a benign race

    # bit j of a token is the channel pair (2j, 2j + 1); the tile starts at an even channel
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_N, BLOCK_V // 2, 2)))
    mx = tl.maximum(x0, x1)
    m0 = tl.exp(x0 - mx)
    m1 = tl.exp(x1 - mx)
    if GREEDY:  # top-k 1: the larger side; an exact tie keeps both
        m0 = tl.where(x0 >= mx, m0, 0.0)
        m1 = tl.where(x1 >= mx, m1, 0.0)
    if HAS_TOP_P:  # the smaller side goes iff its probability is <= 1 - top_p (never on a tie)
        cut = tl.minimum(m0, m1) / (m0 + m1) <= top_p_cut
        m0 = tl.where(cut & (x0 < x1), 0.0, m0)
        m1 = tl.where(cut & (x1 < x0), 0.0, m1)

    d = V // 2
    offs_j = pid_v * (BLOCK_V // 2) + tl.arange(0, BLOCK_V // 2)
    index = (b * N + offs_n[:, None]) * d + offs_j[None, :]
    if PER_ROW_SEED:  # image b's own key; its bits counted from 0
        u = philox_uniform(seed_ptr + b, offset_ptr, index - b * N * d)
    else:
        u = philox_uniform(seed_ptr, offset_ptr, index)
    bit = u * (m0 + m1) >= m0
    tl.store(bits_ptr + index, bit.to(tl.uint8), mask=mask_n[:, None] & (offs_j < d)[None, :])


def _check_inputs(
    logits_2B: torch.Tensor,
    prev: Optional[torch.Tensor],
    operator: Optional[torch.Tensor],
    cfg_t: Scalar,
    beta: Scalar,
    top_k: int,
    top_p: float,
    temperature: float,
) -> None:
    """Raise ``ValueError`` naming the bad argument (guidance inputs, an odd V, sampling arguments)."""
    check_guidance_inputs(logits_2B, prev, operator, cfg_t, beta)
    if logits_2B.shape[2] % 2:
        raise ValueError(f"logits_2B has V={logits_2B.shape[2]} channels; expected 2 per bit (an even V = 2d)")
    check_sampling_args(top_k, top_p, temperature)


def check_bit_seed(seed: torch.Tensor, offset: torch.Tensor, device: torch.device, batch: int) -> None:
    """``seed`` (1,) or (``batch``,) and ``offset`` (1,), int64 on ``device``; ``ValueError`` naming the bad one."""
    check_seed_offset(seed, offset, device, max(batch, 1))
    if seed.shape[0] not in (1, batch):
        raise ValueError(f"seed has {seed.shape[0]} keys; give 1, or one per image row ({batch})")


def guide_sample_bits_reference(
    logits_2B: torch.Tensor,
    prev: Optional[torch.Tensor],
    operator: Optional[torch.Tensor],
    cfg_t: Scalar,
    beta: Scalar,
    top_k: int,
    top_p: float,
    temperature: float,
    generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
    *,
    write_cfg: bool = True,
    write_guided: bool = False,
) -> BitsOutputs:
    """PyTorch specification: :func:`ssg_guidance_reference`, then ``sample_logits_reference`` on the bit rows.

    logits_2B (2B, N, V = 2d) -> bits (B, N, d) uint8, nonfinite (1,) bool, cfg and guided (B, N, V) fp32 or None.
    ``generator``: one for all bits, or B (per-row seeding: image b's N * d bits from ``generator[b]``).
    """
    _check_inputs(logits_2B, prev, operator, cfg_t, beta, top_k, top_p, temperature)
    guided, cfg = ssg_guidance_reference(logits_2B, prev, operator, cfg_t, beta)
    nonfinite = ~torch.isfinite(torch.linalg.vector_norm(guided, float("inf")) / temperature).reshape(1)
    batch, n, v = guided.shape
    bits = torch.zeros((batch, n, v // 2), dtype=torch.uint8, device=guided.device)
    if guided.numel() and not nonfinite.item():  # a non-finite row cannot be drawn from (unspecified bits)
        bits.copy_(sample_logits_reference(guided.reshape(-1, 2), top_k, top_p, temperature, generator).view_as(bits))
    return bits, nonfinite, cfg if write_cfg else None, guided if write_guided else None


def guide_sample_bits_launch(
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
    allow_tf32: bool = False,
) -> Tuple[Optional[KernelLaunch], BitsOutputs]:
    """Validate, allocate the outputs and choose the kernel configuration (tiles: :func:`guide_tile_args`).

    The only code that decides the grid and warps: :func:`guide_sample_bits_triton` runs the launch,
    ``bench/aot_compile.py`` compiles it (meta tensors work). The launch is None when N or V is 0.
    """
    _check_inputs(logits_2B, prev, operator, cfg_t, beta, top_k, top_p, temperature)
    pointers, sizes, constexprs = guide_tile_args(logits_2B, prev, operator, cfg_t, beta, allow_tf32)
    batch, n, _, v = sizes[:4]
    check_bit_seed(seed, offset, logits_2B.device, batch)
    device = logits_2B.device
    bits = torch.empty((batch, n, v // 2), dtype=torch.uint8, device=device)
    nonfinite = torch.zeros(1, dtype=torch.bool, device=device)
    cfg = torch.empty((batch, n, v), dtype=torch.float32, device=device) if write_cfg else None
    guided = torch.empty((batch, n, v), dtype=torch.float32, device=device) if write_guided else None
    outputs = (bits, nonfinite, cfg, guided)
    if n == 0 or v == 0:
        return None, outputs
    args = (
        *pointers,
        bits, logits_2B if cfg is None else cfg, logits_2B if guided is None else guided,  # dummies: never written
        nonfinite, seed, offset,
        *sizes,
        float(temperature), float(1.0 - top_p),
    )
    constexprs.update(GREEDY=top_k == 1, HAS_TOP_P=0 < top_p < 1, WRITE_CFG=write_cfg, WRITE_GUIDED=write_guided,
                      PER_ROW_SEED=seed.shape[0] > 1)
    grid = (triton.cdiv(v, constexprs["BLOCK_V"]), triton.cdiv(n, constexprs["BLOCK_N"]), batch)
    return KernelLaunch(_guide_sample_bits_kernel, grid, args, constexprs, num_warps=4), outputs


def guide_sample_bits_triton(
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
    allow_tf32: bool = False,
) -> BitsOutputs:
    """Triton launcher with the reference's contract; randomness from device tensors ``seed`` (int64, (1,), or (B,): one
    key per image row) and ``offset`` (int64, (1,))."""
    if triton is None:
        raise RuntimeError("guide_sample_bits_triton needs triton; use guide_sample_bits_reference")
    launch, outputs = guide_sample_bits_launch(
        logits_2B, prev, operator, cfg_t, beta, top_k, top_p, temperature, seed, offset,
        write_cfg=write_cfg, write_guided=write_guided, allow_tf32=allow_tf32,
    )
    require_kernel_device(logits_2B.device)
    if launch is not None:
        launch.run()
    return outputs
