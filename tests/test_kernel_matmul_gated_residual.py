"""Fused linear + bias + gated residual kernel vs its PyTorch reference (the blocks' eager code), plus
``ops.matmul_gated_residual``.

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
from ssg_engine.kernels import matmul_gated_residual as impl  # noqa: E402
from ssg_engine.kernels.matmul_gated_residual import (  # noqa: E402
    matmul_gated_residual_launch,
    matmul_gated_residual_reference,
    matmul_gated_residual_triton,
)

from conftest import kernel_test_settings, rel_err  # noqa: E402

INTERPRET, DEVICE, requires_gpu = kernel_test_settings()
pytestmark = pytest.mark.usefixtures("one_thread")

# float32 everywhere: max ||kernel - reference|| / ||reference||. Same products, fp32 sums in another order (each
# output's error < K * 2^-24 * sum|x||w|, typically sqrt(K) * 2^-24 ~ 1e-6 of it), then the same two fp32
# roundings of gamma * y and residual + .; 1e-5 is a 10x margin over what the norm sees.
FP32_REL_TOL = 1e-5
# Low-precision x (unit roundoff u_x = 2^-p: 2^-8 bf16, 2^-11 fp16) and output/residual dtype (u_o; 2^-24 for an
# fp32 residual). The eager sequence rounds y to x's dtype (F.linear) and gamma * y again (mul_ in place):
# |round(round(y) g) - g y| <= (2 u_x + u_x^2) |g y|; then residual + . rounds once (u_o |out|). The kernel rounds
# once (u_o |out|). Both sum K products in fp32 (<= K 2^-24 sum|x||w|, times |g|). So elementwise
#     |kernel - eager| <= 2.01 u_x |g y| + 2 u_o |out| + 2 K 2^-24 |g| sum|x||w|       (out, y: fp64 values)
# and the kernel's error to the fp64 result is at most 2x the eager one's, in norm (it skips two of three roundings).
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ERROR_RATIO = 2.0

SHAPES = [(1, 1, 40, 100), (2, 1, 100, 40), (1, 3, 200, 200), (2, 25, 40, 100), (2, 65, 64, 40), (3, 100, 40, 100)]


def make(R, l, K, N, dtype=torch.float32, residual_dtype=None, gamma="unbind", bias=True, seed=0):
    """(residual, x, weight, bias, gamma) on DEVICE; gamma "unbind" (a (R, 1, 6, N) modulation's view), "N" (N,),
    "R1N" (R, 1, N) or "11N" (1, 1, N), in the residual's dtype."""
    g = torch.Generator().manual_seed(seed)
    residual_dtype = residual_dtype or dtype
    residual = torch.randn(R, l, N, generator=g).to(residual_dtype)
    x = torch.randn(R, l, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = (torch.randn(N, generator=g) * 0.5).to(dtype) if bias else None
    shapes = {"unbind": (R, 1, 6, N), "N": (N,), "R1N": (R, 1, N), "11N": (1, 1, N)}
    gam = torch.randn(*shapes[gamma], generator=g).to(residual_dtype)
    gam = gam.unbind(2)[1] if gamma == "unbind" else gam
    return tuple(None if t is None else t.to(DEVICE) for t in (residual, x, w, b, gam))


def check(residual, x, w, b, gamma):
    out = matmul_gated_residual_triton(residual, x, w, b, gamma)
    eager = matmul_gated_residual_reference(residual, x, w, b, gamma)
    assert out.dtype == residual.dtype and out.shape == residual.shape and out.is_contiguous()
    assert out.data_ptr() != residual.data_ptr()
    if x.dtype == torch.float32 and residual.dtype == torch.float32:
        assert rel_err(out, eager) < FP32_REL_TOL
        return out
    u_x, u_o = UNIT_ROUNDOFF[x.dtype], UNIT_ROUNDOFF[residual.dtype]
    y64 = x.double() @ w.double().t() + (0 if b is None else b.to(x.dtype).double())
    gy = gamma.double().broadcast_to(residual.shape[0], 1, w.shape[0]) * y64
    out64 = residual.double() + gy
    accumulation = gamma.double().abs() * (x.double().abs() @ w.double().abs().t())
    bound = 2.01 * u_x * gy.abs() + 2 * u_o * out64.abs() + 2 * x.shape[-1] * 2.0**-24 * accumulation
    assert ((out.double() - eager.double()).abs() <= bound).all()
    assert (out.double() - out64).norm() <= ERROR_RATIO * (eager.double() - out64).norm()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("R,l,K,N", SHAPES, ids=str)
def test_matches_reference(R, l, K, N, dtype):
    check(*make(R, l, K, N, dtype, seed=R * l + K + N))


@pytest.mark.parametrize("gamma", ["unbind", "N", "R1N", "11N"])
def test_gamma_layouts(gamma):
    residual, x, w, b, gam = make(3, 5, 40, 100, gamma=gamma, seed=1)
    out = check(residual, x, w, b, gam)
    full = gam.broadcast_to(3, 1, 100).contiguous()
    torch.testing.assert_close(out, matmul_gated_residual_triton(residual, x, w, b, full), rtol=0, atol=0)


@pytest.mark.parametrize("l", [1, 3, 50])
def test_float32_residual_with_bf16_linear(l):
    """Infinity under autocast: bf16 x/weight/bias, float32 residual and modulation; the output is float32."""
    out = check(*make(2, l, 100, 40, torch.bfloat16, residual_dtype=torch.float32, seed=l))
    assert out.dtype == torch.float32


def test_float16():
    check(*make(2, 25, 40, 100, torch.float16, seed=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_bias(dtype):
    residual, x, w, _, gam = make(2, 3, 40, 100, dtype, seed=3)
    out = check(residual, x, w, None, gam)
    zero = torch.zeros(100, dtype=dtype, device=DEVICE)
    torch.testing.assert_close(out, check(residual, x, w, zero, gam), rtol=0, atol=0)


def test_strided_views():
    """x and residual as sliced views (row and channel strides), weight column-major."""
    residual, x, w, b, gam = make(2, 10, 40, 100, seed=4)
    out = check(residual, x, w, b, gam)
    xs = torch.zeros(2, 30, 90, device=DEVICE)
    xs[:, ::3, 5:45] = x
    rs = torch.zeros(2, 100, 10, device=DEVICE).transpose(1, 2)  # (2, 10, 100), channel stride 10
    rs.copy_(residual)
    strided = check(rs, xs[:, ::3, 5:45], w.t().contiguous().t(), b, gam)
    torch.testing.assert_close(strided, out, rtol=FP32_REL_TOL, atol=FP32_REL_TOL)


def test_inputs_unchanged():
    args = make(2, 25, 100, 40, torch.bfloat16, residual_dtype=torch.float32, seed=5)
    before = [t.clone() for t in args]
    matmul_gated_residual_triton(*args)
    for t, t0 in zip(args, before):
        assert torch.equal(t, t0)


def test_empty_rows():
    launch, out = matmul_gated_residual_launch(*make(2, 0, 40, 100, seed=6))
    assert launch is None and out.shape == (2, 0, 100)


def test_launch_on_meta_tensors():
    """Infinity-2B's fc2 at the last 1M scale, B=1: bf16 linear, fp32 residual and modulation view."""
    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    gamma = t(2, 1, 6, 2048, dtype=torch.float32).unbind(2)[1]
    launch, out = matmul_gated_residual_launch(t(2, 4096, 2048, dtype=torch.float32), t(2, 4096, 8192), t(2048, 8192), t(2048), gamma)
    assert out.shape == (2, 4096, 2048) and out.dtype == torch.float32
    args = {name: (ty, spec) for name, ty, spec in launch_config(launch)["args"]}
    assert args["res_ptr"][0] == "*fp32" and args["x_ptr"][0] == "*bf16" and args["g_ptr"] == ("*fp32", "D")
    assert args["stride_gr"] == ("i32", None) and args["stride_gn"] == ("constexpr", 1)
    c = launch.constexprs
    assert launch.grid == (-(-8192 // c["BLOCK_M"]) * -(-2048 // c["BLOCK_N"]),) and launch.num_stages is not None


def _bad(change):
    def build():
        residual, x, w, b, gam = make(2, 3, 40, 100, seed=7)
        return change(residual, x, w, b, gam)
    return build


BAD_INPUTS = [
    (_bad(lambda r, x, w, b, g: (r, x.reshape(6, 40), w, b, g)), "x must be an (R, l, K) tensor"),
    (_bad(lambda r, x, w, b, g: (r, x.double(), w.double(), b, g)), "x dtype torch.float64 is not supported"),
    (_bad(lambda r, x, w, b, g: (r, x, w.half(), b, g)), "weight dtype torch.float16 must equal x dtype"),
    (_bad(lambda r, x, w, b, g: (r, x[..., :30], w, b, g)), "x has 30 features"),
    (_bad(lambda r, x, w, b, g: (r, x, w, b[:99], g)), "bias must be a floating-point (100,) tensor"),
    (_bad(lambda r, x, w, b, g: (r[:, :2], x, w, b, g)), "residual must be a floating-point (2, 3, 100) tensor"),
    (_bad(lambda r, x, w, b, g: (r.long(), x, w, b, g)), "residual must be a floating-point (2, 3, 100) tensor"),
    (_bad(lambda r, x, w, b, g: (r.bfloat16(), x, w, b, g)), "residual dtype torch.bfloat16 is narrower than x dtype"),
    (_bad(lambda r, x, w, b, g: (r, x, w, b, g.expand(2, 3, 100))), "gamma has shape (2, 3, 100)"),
    (_bad(lambda r, x, w, b, g: (r, x, w, b, g[..., :50])), "gamma has shape (2, 1, 50)"),
    (_bad(lambda r, x, w, b, g: (r, x, w, b, g.long())), "gamma must be a floating-point tensor"),
    (_bad(lambda r, x, w, b, g: (r, x, w, b, 0.5)), "gamma must be a floating-point tensor"),
    (_bad(lambda r, x, w, b, g: (r.to("meta"), x, w, b, g)), "residual is on meta"),
    (_bad(lambda r, x, w, b, g: (r, x, w, b, g.to("meta"))), "gamma is on meta"),
]


@pytest.mark.parametrize("fn", ["reference", "launch"])
@pytest.mark.parametrize("build,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs(build, message, fn):
    call = matmul_gated_residual_reference if fn == "reference" else matmul_gated_residual_launch
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        call(*build())


def test_ops_switch(spy_backends):
    calls = spy_backends(impl, "matmul_gated_residual_triton", "matmul_gated_residual_reference")
    residual, x, w, b, gam = make(2, 3, 40, 100, seed=8)
    out = ops.matmul_gated_residual(residual, x, w, b, gam)
    ref = ops.matmul_gated_residual(residual, x, w, b, gam, backend="reference")
    assert calls == ["triton", "reference"]
    assert rel_err(out, ref) < FP32_REL_TOL
    assert torch.equal(ref, residual + F.linear(x, w, b).mul_(gam))  # the blocks' eager code, bit for bit


@requires_gpu
@pytest.mark.parametrize("dtype,residual_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("R,l,K,N", [(2, 1, 4096, 1024), (2, 25, 1920, 1920), (32, 256, 4096, 1024), (2, 1024, 8192, 2048)],
                         ids=["d16-fc2-first", "d30-proj-scale4", "d16-fc2-last-B16", "inf2b-fc2-32x32"])
def test_real_sizes_gpu(R, l, K, N, dtype, residual_dtype):
    check(*make(R, l, K, N, dtype, residual_dtype=residual_dtype, seed=9))
