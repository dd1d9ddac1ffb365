"""Fused LayerNorm + AdaLN modulation kernel vs its PyTorch reference (the models' eager chain), plus
``ops.ada_ln_modulate``.

Runs on the Triton CPU interpreter by default; with ``TRITON_INTERPRET=0`` on a CUDA machine the same tests run the
compiled kernel on the GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'ssg-engine[triton]')")

from ssg_engine import ops  # noqa: E402
from ssg_engine.kernels import ada_ln_modulate as impl  # noqa: E402
from ssg_engine.kernels.ada_ln_modulate import (  # noqa: E402
    MAX_C,
    ada_ln_modulate_launch,
    ada_ln_modulate_reference,
    ada_ln_modulate_triton,
    launch_settings,
)

from conftest import kernel_test_settings, rel_err  # noqa: E402

INTERPRET, DEVICE, requires_gpu = kernel_test_settings()
pytestmark = pytest.mark.usefixtures("one_thread")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
EPS = 1e-6  # VAR's and Infinity's norm_eps

# Unit roundoff u = 2**-p of a float format with p significand bits (round to nearest: relative error <= u).
UNIT = {F32: 2.0**-24, BF16: 2.0**-8, F16: 2.0**-11}
# The kernel's store rounding: to nearest on a GPU (cvt.rn); the interpreter truncates float32 -> bfloat16
# (triton/runtime/interpreter.py: cast_impl's _convert_float without a rounding mode), relative error < 2 u.
STORE_UNIT = {**UNIT, BF16: 2 * UNIT[BF16] if INTERPRET else UNIT[BF16]}

# Bound per (x dtype, out dtype).
# float32 outputs: ||kernel - reference|| / ||reference||, both on the same (already rounded) inputs, float32
#   scale/shift. x is upcast exactly on both sides and all math is float32, so only the summation order of mean and
#   variance (a tree of depth log2(C) <= 11: <= 11 u32 ~ 7e-7 relative) and 1/sqrt vs rsqrt (2 ulp) differ: 1e-6,
#   10x margin. With low-precision scale/shift the reference rounds 1 + scale to scale's dtype (Infinity's chain)
#   and the kernel does not: + UNIT[scale dtype] (``fp32_bound``).
# bfloat16/float16 outputs: element-wise |kernel - exact| <= u_store |exact| + 2 FP32_SLACK (|n (1 + scale)| + |shift|)
#   + the format's subnormal spacing: one rounding of a float32 result that is within FP32_SLACK of exact (the
#   float32 bound above, relative to the size of the terms, since n (1 + scale) + shift may cancel). And the
#   kernel's norm error to the exact (float64) result is at most 2x that of the eager chain in the engine's dtype
#   (4 roundings in bf16/fp16; one when only the output is narrow), with the GPU's store rounding (``as_on_gpu``).
TOLERANCE = {
    (F32, F32): 1e-5, (BF16, F32): 1e-5, (F16, F32): 1e-5,
    (F32, BF16): STORE_UNIT[BF16], (BF16, BF16): STORE_UNIT[BF16], (F16, BF16): STORE_UNIT[BF16],
    (F32, F16): STORE_UNIT[F16], (BF16, F16): STORE_UNIT[F16], (F16, F16): STORE_UNIT[F16],
}
FP32_SLACK = 1e-5
EAGER_RATIO = 2.0


def make_inputs(R, l, C, dtype=F32, mod_dtype=None, seed=0, device=DEVICE):
    """x (R, l, C) with a per-row offset (a mean the kernel must remove) and (scale, shift) as the models pass them:
    views ``mod.unbind(2)[2]`` / ``[4]`` of a (R, 1, 6, C) modulation tensor (row stride 6C)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, l, C, generator=g) * 1.5 + torch.randn(R, l, 1, generator=g) * 3
    mod = torch.randn(R, 1, 6, C, generator=g) * 0.5
    mod = mod.to(mod_dtype or dtype).to(device)
    _, _, scale, _, shift, _ = mod.unbind(2)
    return x.to(dtype).to(device), scale, shift


def exact(x, scale, shift, eps=EPS):
    """The float64 result on the same inputs."""
    xd = x.double()
    n = F.layer_norm(xd, (x.shape[-1],), eps=eps)
    return n * (1 + scale.double()) + shift.double(), n


def fp32_bound(x_dtype, scale_dtype, shift_dtype):
    return TOLERANCE[(x_dtype, F32)] + max(UNIT[scale_dtype] if scale_dtype != F32 else 0.0,
                                           UNIT[shift_dtype] if shift_dtype != F32 else 0.0)


def truncate_to_bf16(y: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 rounding toward zero (what the interpreter's store does)."""
    return (y.view(torch.int32) & -65536).view(F32).to(BF16)  # low 16 bits cleared: exact in bf16


def as_on_gpu(out, x, scale, shift, eps=EPS):
    """The kernel's output with a GPU's store rounding. Under the interpreter a bfloat16 output is truncated: check
    that it is exactly the truncation of the kernel's float32 result, and return that result rounded to nearest."""
    if not (INTERPRET and out.dtype == BF16):
        return out
    out32 = ada_ln_modulate_triton(x, scale, shift, eps, F32)
    assert torch.equal(out, truncate_to_bf16(out32))
    return out32.to(BF16)


def check(x, scale, shift, out_dtype=None, eps=EPS):
    """Run the kernel and check it against the reference (and the float64 result); return the output."""
    before = [t.clone() for t in (x, scale, shift)]
    out = ada_ln_modulate_triton(x, scale, shift, eps, out_dtype)
    for t, b in zip((x, scale, shift), before):
        assert torch.equal(t, b)  # inputs untouched
    want_dtype = out_dtype or x.dtype
    assert out.dtype == want_dtype and out.shape == x.shape and out.is_contiguous()
    assert all(out.data_ptr() != t.data_ptr() for t in (x, scale, shift))
    ref = ada_ln_modulate_reference(x, scale, shift, eps, out_dtype)
    assert ref.dtype == want_dtype
    assert torch.isfinite(out).all()
    if want_dtype == F32:
        assert rel_err(out, ref) < fp32_bound(x.dtype, scale.dtype, shift.dtype)
        return out
    y64, n64 = exact(x, scale, shift, eps)
    u, tiny = TOLERANCE[(x.dtype, want_dtype)], torch.finfo(want_dtype).smallest_normal * torch.finfo(want_dtype).eps
    size = (n64 * (1 + scale.double())).abs() + shift.double().abs()
    excess = (out.double() - y64).abs() - (u * y64.abs() + 2 * FP32_SLACK * size + tiny)
    assert excess.max() <= 0, f"element-wise bound exceeded by {excess.max().item():.3g}"
    err_kernel, err_eager = (as_on_gpu(out, x, scale, shift, eps).double() - y64).norm(), (ref.double() - y64).norm()
    assert err_kernel <= EAGER_RATIO * err_eager, (err_kernel.item(), err_eager.item())
    return out


# ---- shapes, dtypes, layouts --------------------------------------------------------------


@pytest.mark.parametrize(
    "R,l,C",
    [(1, 1, 32), (2, 1, 256), (3, 20, 96), (1, 20, 100), (3, 5, 1000), (2, 4, 1920), (1, 3, 3360)],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("dtype,out_dtype", [(F32, None), (BF16, None), (BF16, F32)], ids=["fp32", "bf16", "bf16->fp32"])
def test_odd_shapes(R, l, C, dtype, out_dtype):
    """l = 1 (first scale), l = 20 (a 5 x 4 scale), C not a power of two / not a multiple of the block, R = 1 or 3,
    several rows per program crossing batch rows (C <= 256), C = 1920 (VAR d30) and 3360 (Infinity layer48)."""
    check(*make_inputs(R, l, C, dtype, seed=R * l + C), out_dtype)


@pytest.mark.parametrize("x_dtype,out_dtype", sorted(TOLERANCE, key=str), ids=lambda d: str(d).removeprefix("torch."))
def test_every_dtype_pair(x_dtype, out_dtype):
    """x and out in every kernel dtype; scale/shift in x's dtype (as the models make them)."""
    check(*make_inputs(3, 20, 100, x_dtype, seed=7), out_dtype)


@pytest.mark.parametrize("mod_dtype", [F32, BF16, F16])
def test_modulation_dtype_independent_of_x(mod_dtype):
    """Infinity's case: bf16 x and modulation of any float dtype, float32 output."""
    check(*make_inputs(2, 20, 96, BF16, mod_dtype=mod_dtype, seed=3), F32)


def test_low_precision_kernel_beats_eager_chain():
    """The 2x-eager rule is not vacuous: on bf16 the kernel's single rounding is clearly better than the chain's four."""
    x, scale, shift = make_inputs(3, 20, 1000, BF16, seed=5)
    y64, _ = exact(x, scale, shift)
    out = as_on_gpu(ada_ln_modulate_triton(x, scale, shift, EPS), x, scale, shift)
    eager = ada_ln_modulate_reference(x, scale, shift, EPS)
    assert (out.double() - y64).norm() < 0.8 * (eager.double() - y64).norm()


@pytest.mark.parametrize(
    "layout", ["tokens-strided", "channels-strided", "batch-major-transposed", "modulation-shapes"]
)
def test_strided_views(layout):
    R, l, C = 3, 5, 96
    x, scale, shift = make_inputs(R, l, C, BF16, seed=11)
    if layout == "tokens-strided":  # every other token of a longer sequence, C a slice of a wider row
        big = torch.randn(R, 2 * l, C + 32, device=DEVICE).to(BF16)
        big[:, ::2, :C] = x
        x = big[:, ::2, :C]
    elif layout == "channels-strided":  # channel stride 2: no vector loads, same result
        big = torch.zeros(R, l, 2 * C, device=DEVICE, dtype=BF16)
        big[..., ::2] = x
        x = big[..., ::2]
    elif layout == "batch-major-transposed":  # (l, R, C) storage viewed as (R, l, C)
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    else:  # (C,), (1, 1, C) and a (R, 1, C) scale expanded from (R, 1, 1) x (C,)
        scale, shift = scale[1, 0].clone(), shift[:1].clone()
    out = check(x, scale, shift)
    torch.testing.assert_close(out, ada_ln_modulate_triton(x.contiguous(), scale.contiguous(), shift.contiguous(), EPS),
                               rtol=0, atol=0)


def test_out_dtype_omitted_equals_given():
    x, scale, shift = make_inputs(2, 5, 100, F16, seed=2)
    omitted = ada_ln_modulate_triton(x, scale, shift, EPS)
    torch.testing.assert_close(omitted, ada_ln_modulate_triton(x, scale, shift, EPS, F16), rtol=0, atol=0)
    assert not torch.equal(omitted.float(), ada_ln_modulate_triton(x, scale, shift, EPS, F32))  # out_dtype is honoured


def test_modulation_rows_follow_batch_rows():
    """Row r of the output uses scale[r]/shift[r], also when one program holds rows of two batch rows."""
    x, scale, shift = make_inputs(3, 5, 32, F32, seed=4)  # C = 32: 16 rows per program, 5 tokens per batch row
    out = ada_ln_modulate_triton(x, scale, shift, EPS)
    for r in range(3):
        one = ada_ln_modulate_triton(x[r : r + 1], scale[r : r + 1], shift[r : r + 1], EPS)
        torch.testing.assert_close(out[r : r + 1], one, rtol=0, atol=0)


def test_constant_rows_give_shift_and_eps_matters():
    """var = 0: n = 0 whatever eps, so out = shift; elsewhere a large eps shrinks n as in the reference."""
    x, scale, shift = make_inputs(2, 3, 100, F32, seed=8)
    const = torch.full_like(x, 2.5)
    torch.testing.assert_close(ada_ln_modulate_triton(const, scale, shift, EPS), shift.expand_as(x), rtol=0, atol=1e-6)
    big_eps = ada_ln_modulate_triton(x, scale, shift, 10.0)
    assert rel_err(big_eps, ada_ln_modulate_reference(x, scale, shift, 10.0)) < 1e-5
    assert rel_err(big_eps, ada_ln_modulate_triton(x, scale, shift, EPS)) > 0.1


def test_no_rows():
    x, scale, shift = make_inputs(2, 0, 64, BF16)
    out = ada_ln_modulate_triton(x, scale, shift, EPS, F32)
    assert out.shape == (2, 0, 64) and out.dtype == F32


# ---- the reference is the models' eager code --------------------------------------------


def test_reference_is_var_chain_bit_for_bit():
    x, scale, shift = make_inputs(2, 5, 96, BF16, seed=6, device="cpu")
    ln_wo_grad = torch.nn.LayerNorm(96, eps=EPS, elementwise_affine=False)
    want = ln_wo_grad(x).mul(scale.add(1)).add_(shift)
    assert torch.equal(ada_ln_modulate_reference(x, scale, shift, EPS), want)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_reference_is_infinity_ada_layer_norm_bit_for_bit(dtype):
    from ssg_engine.families.infinity.model import ada_layer_norm

    x, scale, shift = make_inputs(2, 5, 96, dtype, mod_dtype=BF16, seed=9, device="cpu")
    assert torch.equal(ada_ln_modulate_reference(x, scale, shift, EPS, F32), ada_layer_norm(x, scale, shift, EPS))


# ---- launcher ------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [32, 96, 100, 256, 1000, 1024, 1920, 2304, 3360, MAX_C])
def test_launch_table(C):
    """The fixed table covers the row, and holds <= 16 fp32 values of x per thread; works on meta tensors."""
    block_c, rows, warps = launch_settings(C)
    assert block_c >= C and block_c & (block_c - 1) == 0 and rows >= 1
    assert rows * block_c <= 16 * 32 * warps
    x = torch.empty(128, 256, C, dtype=BF16, device="meta")
    mod = torch.empty(128, 1, 6, C, dtype=BF16, device="meta")
    launch, out = ada_ln_modulate_launch(x, mod[:, :, 2], mod[:, :, 4], EPS)
    assert launch.constexprs == dict(ROWS=rows, BLOCK_C=block_c) and launch.num_warps == warps
    assert launch.grid == (-(-128 * 256 // rows),) and out.shape == x.shape and out.device.type == "meta"


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(x=torch.zeros(6, 64)), "x must be a floating-point (R, l, C) tensor; got (6, 64)"),
        (dict(x=torch.zeros(3, 5, 64, dtype=torch.int32)), "x must be a floating-point (R, l, C)"),
        (dict(x=torch.zeros(3, 5, 0)), "C must be > 0"),
        (dict(scale=torch.zeros(3, 1, 65)), "scale has shape (3, 1, 65)"),
        (dict(scale=torch.zeros(3, 5, 64)), "scale has shape (3, 5, 64); expected one broadcastable to (R, 1, C)"),
        (dict(shift=torch.zeros(2, 1, 64)), "shift has shape (2, 1, 64)"),
        (dict(shift=torch.zeros(3, 1, 64, dtype=torch.int64)), "shift must be a floating-point tensor"),
        (dict(scale=[0.0] * 64), "scale must be a floating-point tensor"),
        (dict(scale=torch.zeros(3, 1, 64, device="meta")), "scale is on meta"),
        (dict(eps=-1.0), "eps must be a number >= 0"),
        (dict(eps="1e-6"), "eps must be a number >= 0"),
        (dict(out_dtype=torch.int8), "out_dtype must be a floating-point torch.dtype"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
@pytest.mark.parametrize("fn", [ada_ln_modulate_triton, ada_ln_modulate_reference], ids=["triton", "reference"])
def test_bad_inputs(fn, kwargs, message):
    args = dict(x=torch.zeros(3, 5, 64), scale=torch.zeros(3, 1, 64), shift=torch.zeros(64), eps=EPS, out_dtype=None)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        fn(**args)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(x=torch.zeros(3, 5, 64, dtype=torch.float64)), "x dtype torch.float64 is not supported by the kernel"),
        (dict(shift=torch.zeros(64, dtype=torch.float64)), "shift dtype torch.float64 is not supported"),
        (dict(out_dtype=torch.float64), "out_dtype dtype torch.float64 is not supported"),
        (dict(x=torch.zeros(1, 1, MAX_C + 1), scale=torch.zeros(MAX_C + 1), shift=torch.zeros(MAX_C + 1)),
         f"x has C = {MAX_C + 1} channels; the kernel holds a row in registers and takes C <= {MAX_C}"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_kernel_only_limits(kwargs, message):
    """What only the kernel rejects; the reference computes it."""
    args = dict(x=torch.zeros(3, 5, 64), scale=torch.zeros(3, 1, 64), shift=torch.zeros(64), eps=EPS, out_dtype=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ada_ln_modulate_triton(**args)
    assert ada_ln_modulate_reference(**args).shape == args["x"].shape


# ---- ops.ada_ln_modulate: the backend switch --------------------------------------------


@pytest.mark.parametrize("backend,expected", [("reference", "reference"), ("triton", "triton"), ("auto", "triton")])
def test_ops_dispatch(spy_backends, backend, expected):
    recorded = spy_backends(impl, "ada_ln_modulate_reference", "ada_ln_modulate_triton")
    x, scale, shift = make_inputs(2, 4, 96, BF16, seed=1)
    out = ops.ada_ln_modulate(x, scale, shift, EPS, out_dtype=F32, backend=backend)
    assert recorded == [expected]  # auto picks triton under TRITON_INTERPRET=1 or on CUDA
    assert out.dtype == F32 and rel_err(out, ada_ln_modulate_reference(x, scale, shift, EPS, F32)) < fp32_bound(BF16, BF16, BF16)
    assert ops.ada_ln_modulate(x, scale, shift, EPS, backend=backend).dtype == BF16


# ---- compiled kernel on a GPU ------------------------------------------------------------


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("C,l,dtype,out_dtype", [(1024, 100, BF16, None), (1920, 256, BF16, None), (1920, 256, F32, None),
                                                 (2048, 4096, BF16, F32), (3360, 1024, F16, F32)], ids=str)
def test_gpu_real_shapes(C, l, dtype, out_dtype):
    """VAR d16 / d30 (B = 16: 32 rows) at a middle and the last scale; Infinity-2B and layer48 widths, last scales."""
    check(*make_inputs(32 if l < 4096 else 2, l, C, dtype, seed=C, device="cuda"), out_dtype)
