"""Temperature + top-k + top-p + categorical draw per row, without a sort.

Mask semantics are upstream VAR's ``sample_with_top_k_top_p_`` applied to
``x = logits.float() / temperature`` (:func:`top_k_top_p_mask_reference`):

* top-k (``0 < top_k < V``): remove entries strictly less than the k-th largest value,
  so every entry tied with the k-th largest is KEPT (more than k may survive).
* top-p (``0 < top_p``): sort the survivors ascending, softmax, cumsum; remove sorted
  entries whose cumsum is ``<= 1 - top_p``, never the largest one.
* sample from the softmax of the kept entries.

``top_k == 0`` or ``top_k >= V`` disables top-k; ``top_p == 0`` disables top-p.

The kernel (:func:`sample_logits_triton`) works on ``BLOCK_R`` rows per program (fixed per V) and
streams each row in chunks of ``BLOCK_V`` (a row of ``V <= 4096`` stays in registers
for every pass; longer rows are re-read from L2 per pass):

1. one pass for the row max and min;
2. top-k: bisection over the order-preserving int32 keys of the float values for the
   largest threshold with ``count(x >= thr) >= k``. Counts are exact integers and the
   key space has < 2**32 points, so at most 32 passes give the k-th largest value
   itself (the search stops earlier once exactly k entries are ``>= thr``); the mask
   ``x >= thr`` equals the reference's, ties included;
3. ``Z = sum(exp(x - max))`` over the top-k survivors;
4. top-p: the same bisection (at most 32 passes) for the smallest threshold with
   ``mass(x > thr) < top_p * Z``. Keeping ``x >= thr`` is the reference rule "the
   ascending cumsum up to and including x exceeds ``1 - top_p``" written as "the mass
   strictly above x is below ``top_p``". Each pass also counts the entries above the
   threshold (one fused reduction), and the search stops once the bracket holds at most
   one entry: every threshold in it then keeps the same set (about half the passes);
5. inverse CDF: ``u ~ U[0, 1)`` from Philox (key = ``seed[row // rows_per_seed]``, counter =
   ``(row % rows_per_seed, offset_lo, offset_hi, 0)``), then a walk over the row in index
   order picks the first kept index whose running mass exceeds ``u * Z_kept``. ``seed`` (S,)
   holds one key for all R rows (S = 1: counter = row) or one per block of R / S consecutive
   rows (per-row seeding, :mod:`ssg_engine.seeding`: an image's draws then depend only on its
   own key and positions, not on the batch).

Ties and boundaries (the only places the kernel's mask can differ from the reference):

* top-k ties: identical to the reference (all ties at the threshold kept).
* top-p ties: entries with exactly equal values are kept or removed together; the
  reference's sort splits such a tie by position, so on an exact tie at the cut the
  kernel may keep a few more entries than the reference.
* top-p boundary: the kernel sums probability mass in a different order than the
  reference's fp32 cumsum, so an entry whose cumulative mass is within float rounding
  of ``1 - top_p`` may be classified differently (a measure-zero event for continuous
  logits).
* ``top_p >= 1`` disables top-p in the kernel; the reference removes only entries
  whose probability underflows to exactly 0, which can never be drawn anyway.
* ``top_k == 1`` is the argmax; with exactly tied maxima it draws uniformly among them
  (that is what the upstream mask + multinomial does).

Rows must contain at least one finite logit and no NaN. The kernel reads ``seed``
(int64, (S,), S dividing R) and ``offset`` (int64, (1,)) on the device, so it is CUDA-graph
safe; the caller advances ``offset`` (e.g. ``offset += 1`` in place) between draws.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

from . import KernelLaunch, jit, require_kernel_device

try:
    import triton
    import triton.language as tl
except ImportError:  # reference-only install: the launcher below raises instead
    triton = None

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_BLOCK_V = 4096  # the largest row chunk held on chip; also the elements per program
# Rows per program when rows are narrower than a chunk, fixed (not from the row count, so each vocabulary
# compiles one variant for every batch and scale): V = 2 (Infinity's bits) at 256 rows x 8 warps needs 41
# registers and no spill on sm_90; 2048 rows needed 255 registers and spilled 96 B (bench/results/aot/).
_MAX_BLOCK_R = 256


@jit()
def _to_key(x):
    """float32 -> int32 key with the same order; -0.0 and +0.0 share key 0."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


@jit()
def _from_key(key):
    """int64 key -> float32, the inverse of :func:`_to_key` (never returns -0.0)."""
    k = key.to(tl.int32)
    return tl.where(k >= 0, k, (-k) | -2147483648).to(tl.float32, bitcast=True)


@jit()
def philox_uniform(seed_ptr, offset_ptr, counter):
    """One ``u ~ U[0, 1)`` per logical index in ``counter`` (any shape): Philox with key ``seed`` and counter
    ``(counter, offset_lo, offset_hi, 0)``; ``seed``/``offset`` are read on the device (graph-safe). ``seed_ptr``
    is one pointer or a block of pointers shaped like ``counter`` (one key per element: per-row seeds)."""
    seed = tl.load(seed_ptr)
    offset = tl.load(offset_ptr)
    c0 = counter.to(tl.uint32)
    zero = c0 * 0
    off_lo = zero + (offset & 0xFFFFFFFF).to(tl.uint32)
    off_hi = zero + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    bits, _, _, _ = tl.philox(seed, c0, off_lo, off_hi, zero)
    return tl.uint_to_uniform_float(bits)


@jit()
def _chunk(x_first, row_ptr, row_mask, start, cols0, V, stride_v, temperature, ONE_CHUNK: tl.constexpr):
    """Columns ``start + cols0`` of the scaled rows: (BLOCK_R, BLOCK_V) fp32, -inf past V."""
    cols = start + cols0
    if ONE_CHUNK:
        x = x_first
    else:
        mask = row_mask[:, None] & (cols < V)[None, :]
        raw = tl.load(row_ptr[:, None] + cols[None, :] * stride_v, mask=mask, other=float("-inf"))
        x = raw.to(tl.float32)
        x = tl.math.div_rn(x, tl.zeros_like(x) + temperature)  # IEEE division, as torch does
    return x, cols


@jit()
def _mass_and_count(x, kept, mx):
    """Per row: sum of exp(x - mx) over ``kept`` and the number kept, in one reduction (the two
    values travel as a pair; the count is exact in float32 for chunks of < 2**24 entries)."""
    pair = tl.join(tl.where(kept, tl.exp(x - mx[:, None]), 0.0), kept.to(tl.float32))
    mass, count = tl.split(tl.sum(pair, axis=1))
    return mass, count.to(tl.int32)


# R (rows) only bounds the row mask and top_k is only compared with counts: specializing on
# their value (== 1, % 16) would compile several variants per batch bucket for nothing.
@jit(do_not_specialize=["R", "top_k", "rows_per_seed"])
def _sample_kernel(
    logits_ptr, out_ptr, seed_ptr, offset_ptr,
    R, V, stride_r, stride_v, rows_per_seed,
    top_k, top_p, temperature,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    row_ptr = logits_ptr + rows.to(tl.int64) * stride_r
    cols0 = tl.arange(0, BLOCK_V)
    # the whole row when ONE_CHUNK (kept in registers for every pass); unused otherwise
    x_first, _ = _chunk(0.0, row_ptr, row_mask, 0, cols0, V, stride_v, temperature, False)

    # pass 1: row max (softmax shift) and min (bisection bracket)
    mx = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    mn = tl.full((BLOCK_R,), float("inf"), tl.float32)
    for start in range(0, V, BLOCK_V):
        x, cols = _chunk(x_first, row_ptr, row_mask, start, cols0, V, stride_v, temperature, ONE_CHUNK)
        mx = tl.maximum(mx, tl.max(x, axis=1))
        mn = tl.minimum(mn, tl.min(tl.where((cols < V)[None, :], x, float("inf")), axis=1))
    mx = tl.where(row_mask, mx, 0.0)  # padding rows: keep exp(x - mx) finite

    # top-k: the largest key with count(x >= f(key)) >= k. Invariant: count(f(lo)) >= k.
    # Stops early once count == k exactly ({x >= f(lo)} is then the top-k set).
    thr_k = mn
    if HAS_TOP_K:
        lo = _to_key(mn).to(tl.int64)
        hi = _to_key(mx).to(tl.int64)
        active = row_mask & (lo < hi)
        while tl.max(active.to(tl.int32), axis=0) > 0:
            mid = lo + (hi - lo + 1) // 2
            thr = _from_key(mid)
            count = tl.zeros((BLOCK_R,), tl.int32)
            for start in range(0, V, BLOCK_V):
                x, cols = _chunk(x_first, row_ptr, row_mask, start, cols0, V, stride_v, temperature, ONE_CHUNK)
                count += tl.sum((x >= thr[:, None]).to(tl.int32), axis=1)
            ok = count >= top_k
            lo = tl.where(active & ok, mid, lo)
            hi = tl.where(active & (count < top_k), mid - 1, hi)
            active = active & (lo < hi) & (count != top_k)
        thr_k = _from_key(lo)

    # top-p: the smallest key with mass(x > f(key)) < top_p * Z (true at hi, false below lo).
    # n_lo = count(x >= f(lo)), n_hi = count(x > f(hi)); once [lo, hi] holds at most one entry
    # every threshold in it keeps the same set {x >= f(lo)}, so the search stops there.
    thr_p = thr_k
    if HAS_TOP_P:
        z = tl.zeros((BLOCK_R,), tl.float32)
        n_lo = tl.zeros((BLOCK_R,), tl.int32)
        for start in range(0, V, BLOCK_V):
            x, cols = _chunk(x_first, row_ptr, row_mask, start, cols0, V, stride_v, temperature, ONE_CHUNK)
            mass, count = _mass_and_count(x, x >= thr_k[:, None], mx)
            z += mass
            n_lo += count
        budget = top_p * z
        lo = _to_key(thr_k).to(tl.int64)
        hi = _to_key(mx).to(tl.int64)
        n_hi = tl.zeros((BLOCK_R,), tl.int32)
        active = row_mask & (lo < hi) & (n_lo - n_hi > 1)
        while tl.max(active.to(tl.int32), axis=0) > 0:
            mid = lo + (hi - lo) // 2
            thr = _from_key(mid)
            above = tl.zeros((BLOCK_R,), tl.float32)
            n_above = tl.zeros((BLOCK_R,), tl.int32)
            for start in range(0, V, BLOCK_V):
                x, cols = _chunk(x_first, row_ptr, row_mask, start, cols0, V, stride_v, temperature, ONE_CHUNK)
                mass, count = _mass_and_count(x, x > thr[:, None], mx)
                above += mass
                n_above += count
            ok = above < budget
            hi = tl.where(active & ok, mid, hi)
            n_hi = tl.where(active & ok, n_above, n_hi)
            lo = tl.where(active & ~ok, mid + 1, lo)
            n_lo = tl.where(active & ~ok, n_above, n_lo)
            active = active & (lo < hi) & (n_lo - n_hi > 1)
        thr_p = _from_key(lo)

    # kept mass and the last kept column (fallback if rounding leaves the walk short)
    z_kept = tl.zeros((BLOCK_R,), tl.float32)
    last = tl.full((BLOCK_R,), -1, tl.int32)
    for start in range(0, V, BLOCK_V):
        x, cols = _chunk(x_first, row_ptr, row_mask, start, cols0, V, stride_v, temperature, ONE_CHUNK)
        kept = (x >= thr_p[:, None]) & (cols < V)[None, :]
        z_kept += tl.sum(tl.where(kept, tl.exp(x - mx[:, None]), 0.0), axis=1)
        last = tl.maximum(last, tl.max(tl.where(kept, cols[None, :], -1), axis=1))

    # inverse CDF over the kept entries in index order
    seed_row = tl.where(row_mask, rows // rows_per_seed, 0)  # S = 1: key seed[0], counter = row
    target = philox_uniform(seed_ptr + seed_row, offset_ptr, rows - seed_row * rows_per_seed) * z_kept
    token = tl.full((BLOCK_R,), V, tl.int32)
    running = tl.zeros((BLOCK_R,), tl.float32)
    for start in range(0, V, BLOCK_V):
        x, cols = _chunk(x_first, row_ptr, row_mask, start, cols0, V, stride_v, temperature, ONE_CHUNK)
        kept = (x >= thr_p[:, None]) & (cols < V)[None, :]
        p = tl.where(kept, tl.exp(x - mx[:, None]), 0.0)
        hit = (tl.cumsum(p, axis=1) + running[:, None] > target[:, None]) & (p > 0)
        token = tl.minimum(token, tl.min(tl.where(hit, cols[None, :], V), axis=1))
        running += tl.sum(p, axis=1)
    token = tl.where(token < V, token, last)
    tl.store(out_ptr + rows, token.to(tl.int64), mask=row_mask)


def check_sampling_args(top_k: int, top_p: float, temperature: float) -> None:
    """Raise ``ValueError`` naming the bad argument."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables top-k); got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be a number in [0, 1] (0 disables top-p); got {top_p!r}")
    if (
        isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature) or temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")


def check_seed_offset(seed: torch.Tensor, offset: torch.Tensor, device: torch.device, rows: int = 1) -> None:
    """``offset`` must be an int64 tensor of shape (1,) on ``device``, ``seed`` one of shape (1,) or (S,) with S > 0
    dividing ``rows`` (one key per block of ``rows // S`` consecutive rows: per-row seeding)."""
    for name, x in (("seed", seed), ("offset", offset)):
        shape = "(1,) or (S,) with S dividing the rows" if name == "seed" else "(1,)"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be an int64 tensor of shape {shape}; got {type(x).__name__}")
        if x.dtype != torch.int64 or x.ndim != 1 or (name == "offset" and x.shape[0] != 1):
            raise ValueError(f"{name} must be an int64 tensor of shape {shape}; got {x.dtype} {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but logits are on {device}")
    if seed.shape[0] == 0 or (seed.shape[0] != 1 and rows % seed.shape[0]):
        raise ValueError(f"seed has {seed.shape[0]} keys for {rows} rows; give 1, or one per block of rows (S dividing {rows})")


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        got = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating-point (R, V) tensor; got {got}")
    if logits.shape[1] == 0:
        raise ValueError("logits has V=0 columns; nothing to sample")


def top_k_top_p_mask_reference(logits: torch.Tensor, top_k: int, top_p: float, temperature: float) -> torch.Tensor:
    """Upstream VAR's filter on ``logits / temperature``: (R, V) float -> (R, V) bool, True = kept."""
    _check_logits(logits)
    check_sampling_args(top_k, top_p, temperature)
    x = logits.float() / temperature
    removed = torch.zeros_like(x, dtype=torch.bool)
    if 0 < top_k < x.shape[1]:
        removed = x < x.topk(top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(removed, float("-inf"))
    if top_p > 0:
        sorted_x, sorted_idx = x.sort(dim=-1, descending=False)
        sorted_removed = sorted_x.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        sorted_removed[:, -1] = False
        removed = removed | sorted_removed.scatter(1, sorted_idx, sorted_removed)
    return ~removed


def sample_logits_reference(
    logits: torch.Tensor,
    top_k: int,
    top_p: float,
    temperature: float,
    generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
) -> torch.Tensor:
    """(R, V) float -> (R,) int64 tokens drawn from softmax(logits / temperature) over the kept mask.

    ``generator``: one generator for all rows (None: the global one), or S generators (per-row seeding), each
    drawing a block of R / S consecutive rows (one ``torch.multinomial`` per block)."""
    kept = top_k_top_p_mask_reference(logits, top_k, top_p, temperature)
    probs = (logits.float() / temperature).masked_fill(~kept, float("-inf")).softmax(dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if not generator or probs.shape[0] % len(generator):
        raise ValueError(f"generator: {len(generator)} generators for {probs.shape[0]} rows; give one per block of rows")
    blocks = probs.view(len(generator), -1, probs.shape[1])
    return torch.cat([torch.multinomial(block, 1, generator=g).squeeze(1) for block, g in zip(blocks, generator)])


def sample_logits_launch(
    logits: torch.Tensor,
    top_k: int,
    top_p: float,
    temperature: float,
    seed: torch.Tensor,
    offset: torch.Tensor,
) -> Tuple[Optional[KernelLaunch], torch.Tensor]:
    """Validate, allocate the (R,) int64 tokens and choose the kernel configuration.

    The only code that decides rows per program, chunk width and warps:
    :func:`sample_logits_triton` runs the launch, ``bench/aot_compile.py`` compiles it
    (meta tensors work). The launch is None when there are no rows.
    """
    _check_logits(logits)
    check_sampling_args(top_k, top_p, temperature)
    check_seed_offset(seed, offset, logits.device, logits.shape[0])
    if logits.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"logits dtype {logits.dtype} is not supported by the kernel; use float32, bfloat16 or float16")
    rows, vocab = logits.shape
    if vocab >= 2**31 - 1:
        raise ValueError(f"V={vocab} does not fit the kernel's int32 column indices")
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return None, tokens
    block_v = min(triton.next_power_of_2(vocab), _MAX_BLOCK_V)
    block_r = max(1, min(_MAX_BLOCK_R, _MAX_BLOCK_V // block_v))
    args = (
        logits, tokens, seed, offset,
        rows, vocab, logits.stride(0), logits.stride(1), rows // seed.shape[0],
        min(int(top_k), vocab), float(top_p), float(temperature),
    )
    constexprs = dict(
        HAS_TOP_K=0 < top_k < vocab, HAS_TOP_P=0 < top_p < 1,
        BLOCK_R=block_r, BLOCK_V=block_v, ONE_CHUNK=vocab <= block_v,
    )
    num_warps = 8 if block_r * block_v >= 512 else 4
    return KernelLaunch(_sample_kernel, (triton.cdiv(rows, block_r),), args, constexprs, num_warps), tokens


def sample_logits_triton(
    logits: torch.Tensor,
    top_k: int,
    top_p: float,
    temperature: float,
    seed: torch.Tensor,
    offset: torch.Tensor,
) -> torch.Tensor:
    """(R, V) fp32/bf16/fp16 -> (R,) int64; randomness from device tensors ``seed`` (int64, (1,) or (S,): one key per
    R / S rows) and ``offset`` (int64, (1,))."""
    if triton is None:
        raise RuntimeError("sample_logits_triton needs triton; use sample_logits_reference")
    launch, tokens = sample_logits_launch(logits, top_k, top_p, temperature, seed, offset)
    require_kernel_device(logits.device)
    if launch is not None:
        launch.run()
    return tokens
