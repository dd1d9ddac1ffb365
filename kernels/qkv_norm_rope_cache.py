"""QKV epilogue for one attention layer at one scale: split, L2 norm, q scale, 2-D RoPE, KV-cache write.

Specification (:func:`qkv_norm_rope_cache_reference`, the eager code of ``SelfAttention.qkv`` in
``ssg_engine/models/var.py`` and ``ssg_engine/models/infinity.py`` followed by the cache write of
``PyStaticKVCache.write`` in ``ssg_engine/kv_cache.py``)::

    q, k, v = qkv.view(R, l, 3, H, D).permute(2, 0, 3, 1, 4)        # each (R, H, l, D)
    if scale_mul is not None:                                        # cosine attention (VAR attn_l2_norm, Infinity)
        q = q / max(||q||_2, 1e-12) * scale_mul[h]                   # norms over D
        k = k / max(||k||_2, 1e-12)
    if rope is not None:                                             # Infinity: rotate adjacent pairs
        (q[2i], q[2i+1]) = (cos[t, i] q[2i] - sin[t, i] q[2i+1], sin[t, i] q[2i] + cos[t, i] q[2i+1])
        (k[2i], k[2i+1]) likewise
    k_cache[layer, :R, :, start:start + l] = k                       # rounded to the cache dtype
    v_cache[layer, :R, :, start:start + l] = v
    return q                                                         # (R, H, l, D) view of (R, l, H, D) storage

Tensors: ``qkv`` (R, l, 3*H*D) float32/bfloat16/float16, the QKV linear's output (bias included), last dim
contiguous (any other strides); ``k_cache``/``v_cache`` (layers, rows >= R, H, S >= start + l, D), same dtype
(float32/bfloat16/float16) and shape, two distinct tensors, any strides; ``scale_mul`` (H,) or (1, H, 1, 1) float;
``rope`` = (cos, sin), each (l, D/2) float32. ``k_cache``/``v_cache`` are written in place, only at
``[layer, :R, :, start:start + l]``; ``qkv``, ``scale_mul`` and ``rope`` are only read and must not overlap the
caches; ``q`` is a new tensor.

Device memory (graph-safe: a replay reads the current values): ``qkv``, ``scale_mul``, ``cos``/``sin``, the
caches. Baked into a launch (a captured graph replays them as captured): ``layer`` and ``start`` (host ints; one
graph holds the whole scale loop, so each layer and scale has its own launch), ``num_heads`` and the shapes.

:func:`qkv_norm_rope_cache_triton` does it in one pass: one program per (token block, head, row) loads the q, k and
v head vectors of ``BLOCK_L`` tokens, upcasts to float32, computes the norms, the scale and the rotation in
float32 and rounds once to the cache dtype on store. Deviations from the reference: the reference runs in the
input dtype (a bfloat16 ``qkv`` is normalised in bfloat16: ``F.normalize`` rounds the norm and the quotient, then
``* scale_mul`` promotes to float32 for a float32 ``scale_mul``); the kernel rounds only its outputs, so it is
closer to the exact result (``tests/test_kernel_qkv_norm_rope_cache.py`` bounds both). The sum of squares is a
tree reduction over D, not PyTorch's order. Without normalisation and RoPE the values are copied: ``v`` (and
``k``, ``q`` without normalisation) equal the reference bit for bit (float32 -> bfloat16/float16 rounds to nearest
even in both; bfloat16 by bit arithmetic, :func:`_round_to`, so the interpreter rounds as the GPU does); NaN payloads
are not specified.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ssg_engine.kv_cache import write_and_read

from . import KernelLaunch, interpreter_tiles, jit, require_kernel_device

try:
    import triton
    import triton.language as tl
except ImportError:  # reference-only install: the launcher below raises instead
    triton = None

Rope = Tuple[torch.Tensor, torch.Tensor]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NORM_EPS = 1e-12  # F.normalize's default, and what both models pass
# Elements of one (BLOCK_L, BLOCK_D) tile: 3 such fp32 tiles (q, k, v) plus cos/sin half tiles stay in registers
# at 8 elements per thread with 4 warps (no spills on sm_80/sm_90: bench/aot_compile.py qkv_norm_rope_cache_cases).
_TILE_ELEMENTS = 1024
_INTERPRETER_TILE_ELEMENTS = 1 << 16  # the CPU interpreter pays per program and op, not per element (never compiled)
_THREADS_PER_WARP = 32


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x (..., l, D) by cos/sin (l, D/2): ``apply_rope`` of
    ``ssg_engine/models/infinity.py``, the same operations (kernels sit above the models in the import layers)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1).reshape(x.shape)


def _shape(x: torch.Tensor) -> tuple:
    return tuple(x.shape)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_qkv_inputs(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    start: int,
    num_heads: int,
    scale_mul: Optional[torch.Tensor],
    rope: Optional[Rope],
) -> Tuple[int, int, int]:
    """Validate everything (shared by reference and launcher); return ``(R, l, D)``."""
    if not _is_int(num_heads) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
    if not isinstance(qkv, torch.Tensor) or qkv.ndim != 3 or not qkv.is_floating_point():
        got = f"{_shape(qkv)} {qkv.dtype}" if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must be a floating-point (R, l, 3*H*D) tensor; got {got}")
    rows, l, width = _shape(qkv)
    if rows < 1 or l < 1 or width < 1 or width % (3 * num_heads):
        raise ValueError(
            f"qkv has shape {_shape(qkv)}; expected (R >= 1, l >= 1, 3*H*D) with H = num_heads = {num_heads}"
        )
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv must have a contiguous last dim; got strides {qkv.stride()}")
    dim = width // (3 * num_heads)
    device = qkv.device
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(cache, torch.Tensor) or cache.ndim != 5:
            got = _shape(cache) if isinstance(cache, torch.Tensor) else type(cache).__name__
            raise ValueError(f"{name} must be a (layers, rows, H, S, D) tensor; got {got}")
        if cache.device != device:
            raise ValueError(f"{name} is on {cache.device} but qkv is on {device}")
        if not cache.is_floating_point():
            raise ValueError(f"{name} must be floating point; got {cache.dtype}")
        layers, cache_rows, heads, length, cache_dim = _shape(cache)
        if heads != num_heads or cache_dim != dim or cache_rows < rows:
            raise ValueError(
                f"{name} has shape {_shape(cache)}; qkv {_shape(qkv)} with num_heads={num_heads} needs "
                f"(layers, rows >= {rows}, {num_heads}, S, {dim})"
            )
    if k_cache is v_cache:
        raise ValueError("k_cache and v_cache must be two distinct tensors")
    if _shape(k_cache) != _shape(v_cache) or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"v_cache is {_shape(v_cache)} {v_cache.dtype} but k_cache is {_shape(k_cache)} {k_cache.dtype}"
        )
    layers, length = k_cache.shape[0], k_cache.shape[3]
    if not _is_int(layer) or not 0 <= layer < layers:
        raise ValueError(f"layer must be an int in [0, {layers}); got {layer!r}")
    if not _is_int(start) or start < 0 or start + l > length:
        raise ValueError(f"start must be an int with 0 <= start and start + l = start + {l} <= S = {length}; got {start!r}")
    if scale_mul is not None:
        if not isinstance(scale_mul, torch.Tensor) or not scale_mul.is_floating_point() or _shape(scale_mul) not in (
            (num_heads,), (1, num_heads, 1, 1)
        ):
            got = f"{_shape(scale_mul)} {scale_mul.dtype}" if isinstance(scale_mul, torch.Tensor) else type(scale_mul).__name__
            raise ValueError(f"scale_mul must be a float ({num_heads},) or (1, {num_heads}, 1, 1) tensor; got {got}")
        if scale_mul.device != device:
            raise ValueError(f"scale_mul is on {scale_mul.device} but qkv is on {device}")
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise ValueError(f"rope must be a (cos, sin) pair of tensors; got {type(rope).__name__}")
        if dim % 2:
            raise ValueError(f"rope needs an even head dim; qkv has D = {dim}")
        for name, table in zip(("cos", "sin"), rope):
            if not isinstance(table, torch.Tensor) or table.dtype != torch.float32 or _shape(table) != (l, dim // 2):
                got = f"{_shape(table)} {table.dtype}" if isinstance(table, torch.Tensor) else type(table).__name__
                raise ValueError(f"rope {name} must be a float32 ({l}, {dim // 2}) tensor (l, D/2); got {got}")
            if table.device != device:
                raise ValueError(f"rope {name} is on {table.device} but qkv is on {device}")
    return rows, l, dim


def qkv_norm_rope_reference(
    qkv: torch.Tensor, num_heads: int, scale_mul: Optional[torch.Tensor] = None, rope: Optional[Rope] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The models' eager attention prologue without the cache: qkv (R, l, 3*H*D) -> q, k, v (R, H, l, D) views or new
    tensors in the computed dtype (teacher forcing and the reference sampler's concatenating cache use it as it is)."""
    R, l, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    q, k, v = qkv.view(R, l, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    if scale_mul is not None:
        q = _normalize(q).mul(scale_mul.view(1, num_heads, 1, 1))
        k = _normalize(k)
    if rope is not None:
        qk = rotate_pairs(torch.stack((q, k)), *rope)
        q, k = qk[0], qk[1]
    return q, k, v


def qkv_norm_rope_cache_reference(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    start: int,
    *,
    num_heads: int,
    scale_mul: Optional[torch.Tensor] = None,
    rope: Optional[Rope] = None,
) -> torch.Tensor:
    """PyTorch specification (the models' eager code): qkv (R, l, 3*H*D) -> q (R, H, l, D) in the cache dtype
    (not necessarily contiguous); writes k, v into ``k_cache``/``v_cache[layer, :R, :, start:start + l]``."""
    check_qkv_inputs(qkv, k_cache, v_cache, layer, start, num_heads, scale_mul, rope)
    q, k, v = qkv_norm_rope_reference(qkv, num_heads, scale_mul, rope)
    write_and_read(k_cache, v_cache, layer, start, k.to(k_cache.dtype), v.to(v_cache.dtype))  # the cache's kv_write_ op
    return q.to(k_cache.dtype)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=-1, eps=1e-12)`` (VAR calls it with the default eps, Infinity with 1e-12: the same)."""
    return torch.nn.functional.normalize(x, dim=-1, eps=_NORM_EPS)


@jit()
def _round_to(x, dtype: tl.constexpr):
    """float32 ``x`` rounded to nearest even in ``dtype``. bfloat16 by bit arithmetic: the interpreter's float32 ->
    bfloat16 cast truncates (``cast_impl`` in triton/runtime/interpreter.py, triton 3.9), and this gives what the
    GPU's cvt.rn.bf16.f32 and torch's ``copy_`` give, NaN kept NaN, on both; a few integer ops per element."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # a NaN whose payload sits in the low half stays NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@jit()
def _head_tile(
    src_ptr, offs_l, offs_d, mask, stride_ql, cos, sin, scale, EPS,
    NORMALIZE: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (BLOCK_L, BLOCK_D) head tile of q or k from ``src_ptr`` (head start of token 0), in float32:
    normalised and times ``scale`` if NORMALIZE, then rotated by the (BLOCK_L, BLOCK_D/2) cos/sin if HAS_ROPE."""
    x = tl.load(src_ptr + offs_l[:, None] * stride_ql + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        norm = tl.sqrt(tl.sum(x * x, axis=1))
        x = x / tl.maximum(norm, EPS)[:, None] * scale
    if HAS_ROPE:
        x0, x1 = tl.split(tl.reshape(x, (BLOCK_L, BLOCK_D // 2, 2)))
        x = tl.reshape(tl.join(cos * x0 - sin * x1, sin * x0 + cos * x1), (BLOCK_L, BLOCK_D))
    return x


# layer and start are host ints that change every launch of a captured loop (each layer, each scale): specializing
# on their value (== 1, % 16) would compile up to three variants of one configuration for nothing. l and R only
# bound masks and the grid. The strides stay specialized: a contiguous last dim (stride 1) gives vector accesses.
@jit(do_not_specialize=["R", "l", "layer", "start"])
def _qkv_norm_rope_cache_kernel(
    qkv_ptr, k_cache_ptr, v_cache_ptr, q_ptr, scale_ptr, cos_ptr, sin_ptr,
    R, l, H, D, layer, start,
    stride_qr, stride_ql,
    stride_kl, stride_kr, stride_kh, stride_ks, stride_kd,
    stride_vl, stride_vr, stride_vh, stride_vs, stride_vd,
    stride_scale, stride_cos_l, stride_cos_d, stride_sin_l, stride_sin_d,
    EPS,
    NORMALIZE: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.program_id(2).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_l < l)[:, None] & (offs_d < D)[None, :]
    src = qkv_ptr + r * stride_qr + h * D  # q of head h; k at + H*D, v at + 2*H*D
    pos = (start + offs_l)[:, None].to(tl.int64)
    layer64 = layer.to(tl.int64)
    k_off = layer64 * stride_kl + r * stride_kr + h * stride_kh + pos * stride_ks + offs_d[None, :] * stride_kd
    v_off = layer64 * stride_vl + r * stride_vr + h * stride_vh + pos * stride_vs + offs_d[None, :] * stride_vd

    v = tl.load(src + 2 * H * D + offs_l[:, None] * stride_ql + offs_d[None, :], mask=mask, other=0.0)
    if v.dtype != v_cache_ptr.dtype.element_ty:  # a copy; float32 is exact for every input dtype
        v = _round_to(v.to(tl.float32), v_cache_ptr.dtype.element_ty)
    tl.store(v_cache_ptr + v_off, v, mask=mask)

    cos = tl.zeros((BLOCK_L, BLOCK_D // 2), dtype=tl.float32)
    sin = tl.zeros((BLOCK_L, BLOCK_D // 2), dtype=tl.float32)
    if HAS_ROPE:
        offs_half = tl.arange(0, BLOCK_D // 2)
        rope_mask = (offs_l < l)[:, None] & (offs_half < D // 2)[None, :]
        cos = tl.load(cos_ptr + offs_l[:, None] * stride_cos_l + offs_half[None, :] * stride_cos_d,
                      mask=rope_mask, other=0.0)
        sin = tl.load(sin_ptr + offs_l[:, None] * stride_sin_l + offs_half[None, :] * stride_sin_d,
                      mask=rope_mask, other=0.0)
    scale = 1.0
    if NORMALIZE:
        scale = tl.load(scale_ptr + h * stride_scale).to(tl.float32)

    k = _head_tile(src + H * D, offs_l, offs_d, mask, stride_ql, cos, sin, 1.0, EPS,
                   NORMALIZE, HAS_ROPE, BLOCK_L, BLOCK_D)
    tl.store(k_cache_ptr + k_off, _round_to(k, k_cache_ptr.dtype.element_ty), mask=mask)
    q = _head_tile(src, offs_l, offs_d, mask, stride_ql, cos, sin, scale, EPS,
                   NORMALIZE, HAS_ROPE, BLOCK_L, BLOCK_D)
    q_off = ((r * l + offs_l[:, None]) * H + h) * D + offs_d[None, :]  # q's storage is (R, l, H, D)
    tl.store(q_ptr + q_off, _round_to(q, q_ptr.dtype.element_ty), mask=mask)


def check_kernel_dtypes(**tensors: Optional[torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the first given tensor whose dtype the kernel does not read (None: not read)."""
    for name, x in tensors.items():
        if x is not None and x.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} is not supported by the kernel; use float32, bfloat16 or float16")


def qkv_norm_rope_cache_launch(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    start: int,
    *,
    num_heads: int,
    scale_mul: Optional[torch.Tensor] = None,
    rope: Optional[Rope] = None,
) -> Tuple[KernelLaunch, torch.Tensor]:
    """Validate, allocate ``q`` (R, H, l, D) in the cache dtype, a transposed view of (R, l, H, D) storage (the
    attention's output then comes back in (R, l, H, D) order, so its (R, l, C) reshape for the out-projection copies
    nothing, on CUDA's flash kernels as on the CPU), and choose the kernel configuration.

    The only code that decides grid, tiles and warps: :func:`qkv_norm_rope_cache_triton` runs the launch,
    ``bench/aot_compile.py`` compiles it (meta tensors work). Table: ``BLOCK_D`` = D rounded up to a power of two;
    ``BLOCK_L`` tokens (a power of two, at most ``_TILE_ELEMENTS // BLOCK_D``) so a tile holds up to 1024 elements;
    one warp per 256 tile elements (8 per thread), at most 4.
    """
    rows, l, dim = check_qkv_inputs(qkv, k_cache, v_cache, layer, start, num_heads, scale_mul, rope)
    check_kernel_dtypes(qkv=qkv, k_cache=k_cache, scale_mul=scale_mul)
    q = torch.empty((rows, l, num_heads, dim), dtype=k_cache.dtype, device=qkv.device).transpose(1, 2)
    block_d = triton.next_power_of_2(dim)
    tile = _INTERPRETER_TILE_ELEMENTS if interpreter_tiles() else _TILE_ELEMENTS
    block_l = max(1, min(triton.next_power_of_2(l), tile // block_d))
    num_warps = max(1, min(4, block_l * block_d // (8 * _THREADS_PER_WARP)))
    scale = scale_mul.reshape(num_heads) if scale_mul is not None else qkv  # a dummy pointer when not read
    cos, sin = rope if rope is not None else (qkv, qkv)
    args = (
        qkv, k_cache, v_cache, q, scale, cos, sin,
        rows, l, num_heads, dim, layer, start,
        qkv.stride(0), qkv.stride(1),
        *k_cache.stride(), *v_cache.stride(),
        scale.stride(0) if scale_mul is not None else 0,
        *(cos.stride() if rope is not None else (0, 0)),
        *(sin.stride() if rope is not None else (0, 0)),
        _NORM_EPS,
    )
    constexprs = dict(NORMALIZE=scale_mul is not None, HAS_ROPE=rope is not None, BLOCK_L=block_l, BLOCK_D=block_d)
    grid = (triton.cdiv(l, block_l), num_heads, rows)
    return KernelLaunch(_qkv_norm_rope_cache_kernel, grid, args, constexprs, num_warps=num_warps), q


def qkv_norm_rope_cache_triton(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    start: int,
    *,
    num_heads: int,
    scale_mul: Optional[torch.Tensor] = None,
    rope: Optional[Rope] = None,
) -> torch.Tensor:
    """Triton launcher with the reference's contract (``q`` a transposed view of (R, l, H, D) storage)."""
    if triton is None:
        raise RuntimeError("qkv_norm_rope_cache_triton needs triton; use qkv_norm_rope_cache_reference")
    launch, q = qkv_norm_rope_cache_launch(
        qkv, k_cache, v_cache, layer, start, num_heads=num_heads, scale_mul=scale_mul, rope=rope,
    )
    require_kernel_device(qkv.device)
    launch.run()
    return q
