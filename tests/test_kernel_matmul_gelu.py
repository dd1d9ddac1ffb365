"""Fused linear + bias + tanh-GELU kernel vs its PyTorch reference (the FFN's eager code), plus ``ops.matmul_gelu``.

Runs on the Triton CPU interpreter by default; with ``TRITON_INTERPRET=0`` on a CUDA machine the same tests run the
compiled kernel on the GPU (and the ``requires_gpu`` test runs VAR-d16 / Infinity-2B sizes).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'ssg-engine[triton]')")

from ssg_engine import ops  # noqa: E402
from ssg_engine.kernels import launch_config  # noqa: E402
from ssg_engine.kernels import matmul_gelu as impl  # noqa: E402
from ssg_engine.kernels.matmul_gelu import matmul_gelu_launch, matmul_gelu_reference, matmul_gelu_triton  # noqa: E402

from conftest import kernel_test_settings, rel_err  # noqa: E402

INTERPRET, DEVICE, requires_gpu = kernel_test_settings()
pytestmark = pytest.mark.usefixtures("one_thread")

# float32: max ||kernel - reference|| / ||reference||. Both are fp32 dots with fp32 sums of the same products
# ("ieee": no TF32), so only the summation order differs: each output's error is below K * 2^-24 * sum|x||w|
# (K <= 200 here: 1.2e-5 of the absolute sum) and its random-walk typical value is ~sqrt(K) * 2^-24 ~ 1e-6 of it;
# the GELU as y * sigmoid(2u) instead of 0.5 * y * (1 + tanh(u)) adds a few ulps (1e-7). 1e-5 leaves a 10x margin
# over the 1e-6 the norm sees.
FP32_REL_TOL = 1e-5
# bfloat16/float16: unit roundoff u = 2^-p (p = 8 / 11 significand bits: |round(v) - v| <= u |v|). The eager sequence rounds y = x w^T + b to x's
# dtype (|dy| <= u |y|, through GELU' <= 1.13: <= 1.13 u |y|) and then the GELU (<= u |out|); the kernel rounds once
# (<= u |out|); both sum in fp32 (<= K 2^-24 sum|x||w|). So elementwise
#     |kernel - eager| <= 2 u |out| + 1.13 u |y| + 2 K 2^-24 sum|x||w|          (out, y: the fp64 values)
# and the kernel's error to the fp64 result (one rounding) is at most 2x the eager one's (two roundings), in norm.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ERROR_RATIO = 2.0

SHAPES = [(1, 40, 100), (2, 100, 40), (3, 200, 200), (50, 40, 100), (130, 64, 40), (300, 40, 100)]  # (M, K, N)


def make(M, K, N, dtype=torch.float32, seed=0, bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * scale).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = (torch.randn(N, generator=g) * 0.5).to(dtype) if bias else None
    return x.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE)


def fp64(x, w, b):
    """(y, GELU_tanh(y)) in float64 from the given (rounded) inputs; the bias rounded to x's dtype as the op does."""
    y = x.double() @ w.double().t()
    if b is not None:
        y = y + b.to(x.dtype).double()
    return y, F.gelu(y, approximate="tanh")


def check(x, w, b):
    out = matmul_gelu_triton(x, w, b)
    eager = matmul_gelu_reference(x, w, b)
    assert out.dtype == x.dtype and out.shape == eager.shape and out.is_contiguous()
    if x.dtype == torch.float32:
        assert rel_err(out, eager) < FP32_REL_TOL
        return out
    u = UNIT_ROUNDOFF[x.dtype]
    y64, out64 = fp64(x, w, b)
    k = x.shape[-1]
    bound = 2 * u * out64.abs() + 1.13 * u * y64.abs() + 2 * k * 2.0**-24 * (x.double().abs() @ w.double().abs().t())
    assert ((out.double() - eager.double()).abs() <= bound).all()
    assert (out.double() - out64).norm() <= ERROR_RATIO * (eager.double() - out64).norm()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES, ids=str)
def test_matches_reference(M, K, N, dtype):
    check(*make(M, K, N, dtype, seed=M + K + N))


@pytest.mark.parametrize("M", [1, 3, 50])
def test_float16(M):
    check(*make(M, 40, 100, torch.float16, seed=M))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_bias(dtype):
    x, w, _ = make(3, 40, 100, dtype, seed=4)
    out = check(x, w, None)
    torch.testing.assert_close(out, check(x, w, torch.zeros(100, dtype=dtype, device=DEVICE)), rtol=0, atol=0)


def test_leading_dims_and_strided_views():
    """x (R, l, K) and (a, b, l, K); a sliced view (row and K strides); x K-major (x.t() of a contiguous (K, M))."""
    x, w, b = make(24, 40, 100, seed=5)
    out = check(x.view(2, 12, 40), w, b)
    assert out.shape == (2, 12, 100)
    torch.testing.assert_close(check(x.view(2, 3, 4, 40), w, b).reshape(24, 100), out.view(24, 100), rtol=0, atol=0)
    big = torch.randn(2, 30, 90, device=DEVICE)
    view = big[:, ::3, 5:45]  # (2, 10, 40): strides (2700, 270, 1), storage offset 5
    check(view, w, b)
    check(torch.randn(40, 7, device=DEVICE).t(), w, b)  # stride_xk = 7, stride_xm = 1
    check(x, w.t().contiguous().t(), b)  # weight column-major


def test_bias_in_another_dtype_is_rounded_to_x_dtype():
    """A float32 bias with bf16 x/weight: rounded to bf16 first (what autocast does to F.linear's bias)."""
    x, w, _ = make(5, 40, 100, torch.bfloat16, seed=6)
    b32 = torch.randn(100, device=DEVICE) * 0.5
    out = check(x, w, b32)
    torch.testing.assert_close(out, matmul_gelu_triton(x, w, b32.bfloat16()), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's exp(-2u) -> inf, by design
def test_large_magnitudes_saturate_like_tanh():
    """|y| up to ~1e4 (exp(-2u) overflows for y < -10): the sigmoid form must give y where y > 10 and |out| < 1e-30
    where y < -10, without inf/NaN, as the tanh form does."""
    x, w, b = make(4, 40, 100, seed=7, scale=2000.0)
    out = check(x, w, b)
    assert torch.isfinite(out).all()
    y64, _ = fp64(x, w, b)
    pos, neg = y64 > 10, y64 < -10
    assert pos.sum() > 50 and neg.sum() > 50
    assert rel_err(out[pos], y64[pos]) < FP32_REL_TOL
    assert out[neg].abs().max() < 1e-30


def test_inputs_unchanged():
    x, w, b = make(50, 100, 40, torch.bfloat16, seed=8)
    before = [t.clone() for t in (x, w, b)]
    matmul_gelu_triton(x, w, b)
    for t, t0 in zip((x, w, b), before):
        assert torch.equal(t, t0)


def test_empty_rows():
    x, w, b = make(0, 40, 100, seed=9)
    launch, out = matmul_gelu_launch(x, w, b)
    assert launch is None and out.shape == (0, 100)


def test_launch_on_meta_tensors_records_num_stages():
    x = torch.empty(2, 256, 1024, dtype=torch.bfloat16, device="meta")
    w = torch.empty(4096, 1024, dtype=torch.bfloat16, device="meta")
    launch, out = matmul_gelu_launch(x, w, torch.empty(4096, dtype=torch.bfloat16, device="meta"))
    assert out.shape == (2, 256, 4096) and out.dtype == torch.bfloat16
    config = launch_config(launch)
    assert config["num_stages"] == launch.num_stages is not None
    args = {name: (ty, spec) for name, ty, spec in config["args"]}
    assert args["M"] == ("i32", None) and args["L"] == ("i32", None)  # do_not_specialize
    assert args["stride_xk"] == ("constexpr", 1) and args["K"] == ("i32", "D")
    c = launch.constexprs
    assert launch.grid == (-(-512 // c["BLOCK_M"]) * -(-4096 // c["BLOCK_N"]),)


BAD_INPUTS = [
    (lambda x, w, b: (x.double(), w.double(), None), "x dtype torch.float64 is not supported"),
    (lambda x, w, b: (x, w.bfloat16(), b), "weight dtype torch.bfloat16 must equal x dtype"),
    (lambda x, w, b: (x[:, :30], w, b), "x has 30 features"),
    (lambda x, w, b: (x, w[None], b), "weight must be an (N, K) tensor"),
    (lambda x, w, b: (x.sum(), w, b), "x must be a (..., K) tensor"),
    (lambda x, w, b: (x, w, b[:50]), "bias must be a floating-point (100,) tensor"),
    (lambda x, w, b: (x, w, b.long()), "bias must be a floating-point (100,) tensor"),
    (lambda x, w, b: (x, w, [0.0] * 100), "bias must be a floating-point (100,) tensor"),
    (lambda x, w, b: (x, w.to("meta"), b), "weight is on meta"),
    (lambda x, w, b: (x, w, b.to("meta")), "bias is on meta"),
]


@pytest.mark.parametrize("fn", ["reference", "launch"])
@pytest.mark.parametrize("bad,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs(bad, message, fn):
    args = bad(*make(3, 40, 100, seed=10))
    call = matmul_gelu_reference if fn == "reference" else matmul_gelu_launch
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        call(*args)


def test_ops_switch(spy_backends):
    calls = spy_backends(impl, "matmul_gelu_triton", "matmul_gelu_reference")
    x, w, b = make(3, 40, 100, seed=11)
    out = ops.matmul_gelu(x, w, b)
    ref = ops.matmul_gelu(x, w, b, backend="reference")
    assert calls == ["triton", "reference"]
    assert rel_err(out, ref) < FP32_REL_TOL
    assert torch.equal(ref, F.gelu(F.linear(x, w, b), approximate="tanh"))  # the FFN's eager code, bit for bit


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,C,hidden", [(2, 1024, 4096), (50, 1920, 7680), (2 * 16 * 256, 1024, 4096), (2 * 1024, 2048, 8192)],
                         ids=["d16-first", "d30-scale2", "d16-last-B16", "inf2b-32x32"])
def test_real_sizes_gpu(M, C, hidden, dtype):
    check(*make(M, C, hidden, dtype, seed=12))
