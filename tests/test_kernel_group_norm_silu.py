"""Fused GroupNorm + SiLU kernel vs its PyTorch reference, the ``ops.group_norm_silu`` switch, and both VAE decoders
with ``backend="triton"`` vs ``"reference"``.

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
from ssg_engine.kernels import group_norm_silu as impl  # noqa: E402
from ssg_engine.kernels.group_norm_silu import group_norm_silu_reference, group_norm_silu_triton  # noqa: E402

from conftest import kernel_test_settings, rel_err  # noqa: E402

INTERPRET, DEVICE, requires_gpu = kernel_test_settings()
pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 1e-6  # both decoders' GroupNorm eps

# Per input dtype: (norm-relative bound vs the fp32 reference on the same inputs, element-wise rtol vs an fp64
# reference, element-wise atol).
# fp32: only the statistics' summation order differs (tile trees merged by Chan's update vs PyTorch's blocked
#   sums / Welford): a few fp32 ulps (2**-24 = 6e-8) of mean and rstd, times |y| = O(5) here, so 1e-5 norm-relative
#   and 1e-5 absolute leave 10x margin at the shapes below (the largest group: 32 x 1600 values).
# bf16 / fp16: the kernel rounds once to the output dtype: |out - y64| <= u |y64| (u = 2**-8 bf16, 2**-11 fp16,
#   round to nearest) plus the fp32 statistics' error (< 1e-5, above) and fp16's subnormal spacing (6e-8): atol 1e-4.
#   The norm-relative entry is the kernel's error to fp64 (<= u/sqrt(3) RMS for a uniform rounding error; 2x it).
#   Triton's interpreter (3.9.0) converts fp32 -> bf16 by truncation, fp_downcast_rounding="rtne" or not (measured:
#   half of randn values differ from torch's RTNE cast); the compiled kernel rounds to nearest. Truncation errs by
#   < 2**-7 relative, so bf16 under the interpreter gets u = 2**-7.
BF16_U = 2**-7 if INTERPRET else 2**-8
TOLERANCE = {
    torch.float32: (1e-5, 0.0, 1e-5),
    torch.bfloat16: (2 * BF16_U / 3**0.5, BF16_U, 1e-4),
    torch.float16: (2 * 2**-11 / 3**0.5, 2**-11, 1e-4),
}


def make_inputs(B, C, H, W, dtype=torch.float32, channels_last=False, seed=0, offset=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, C, H, W, generator=g) * 2 + offset).to(dtype)
    weight = (torch.rand(C, generator=g) + 0.5).to(dtype)
    bias = torch.randn(C, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE)


def reference64(x, weight, bias, G):
    return F.silu(F.group_norm(x.double(), G, weight.double(), bias.double(), EPS))


def assert_layout(out, x):
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    if x.is_contiguous():
        assert out.is_contiguous()
    else:
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "B,C,H,W,G,channels_last",
    [
        (3, 24, 1, 1, 24, False),  # 24 groups (BSQ Normalize), one value per group: var 0, y = bias
        (1, 96, 3, 5, 32, True),  # Cg = 3, non-square, B = 1
        (3, 96, 3, 5, 32, False),
        (2, 64, 40, 40, 2, True),  # Cg = 32, 1600 positions: 25 tiles per group, merged
        (2, 64, 40, 40, 2, False),
        (1, 160, 8, 8, 32, True),  # VQ-VAE's Cg = 5 (160 channels), channels-last as in the Engine
        (3, 48, 7, 1, 24, True),  # W = 1
    ],
)
def test_fp32_matches_reference(B, C, H, W, G, channels_last):
    x, weight, bias = make_inputs(B, C, H, W, channels_last=channels_last, seed=C + H)
    before = [t.clone() for t in (x, weight, bias)]
    out = group_norm_silu_triton(x, weight, bias, G, EPS)
    # fp64, not PyTorch's fp32 GroupNorm: on a group of one value that computes x * a + (bias - mean * a) with
    # a = rstd = 1000 and is 1e-4 off the exact y = bias, which the kernel returns
    want = reference64(x, weight, bias, G)
    assert rel_err(F.silu(F.group_norm(x, G, weight, bias, EPS)), want) < (1e-3 if H * W == 1 else 1e-5)
    assert_layout(out, x)
    norm_tol, _, atol = TOLERANCE[torch.float32]
    assert rel_err(out, want) < norm_tol
    torch.testing.assert_close(out.double(), want, rtol=0, atol=atol)
    for t, b in zip((x, weight, bias), before):
        assert torch.equal(t, b) and t.stride() == b.stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_low_precision_rounds_once(dtype, channels_last):
    x, weight, bias = make_inputs(2, 96, 5, 4, dtype, channels_last, seed=7)
    out = group_norm_silu_triton(x, weight, bias, 32, EPS)
    assert_layout(out, x)
    want = reference64(x, weight, bias, 32)
    norm_tol, rtol, atol = TOLERANCE[dtype]
    err = (out.double() - want).abs()
    assert (err <= rtol * want.abs() + atol).all(), err.max()
    eager = F.silu(F.group_norm(x, 32, weight, bias, EPS))  # the code it replaces: rounds twice (to nearest)
    assert rel_err(out, want) < norm_tol
    assert rel_err(out, want) <= 2 * rel_err(eager, want) * (2 if INTERPRET and dtype == torch.bfloat16 else 1)


def test_large_mean_no_cancellation():
    """mean 1e3, std 2: E[x^2] - E[x]^2 in fp32 would lose the variance to cancellation (1e6 * 6e-8 = 0.06 of 4)."""
    x, weight, bias = make_inputs(2, 64, 40, 40, offset=1e3, seed=3)
    out = group_norm_silu_triton(x, weight, bias, 2, EPS)
    want = reference64(x, weight, bias, 2)
    assert rel_err(out, want) < 1e-4


def test_activations():
    """"swish" and "silu" are one kernel (one rounding); "none" is the plain GroupNorm; each reference is its
    decoder's eager code, bit for bit."""
    x, weight, bias = make_inputs(2, 96, 3, 5, torch.bfloat16, True, seed=11)
    silu = group_norm_silu_triton(x, weight, bias, 32, EPS, "silu")
    assert torch.equal(group_norm_silu_triton(x, weight, bias, 32, EPS, "swish"), silu)
    plain = group_norm_silu_triton(x, weight, bias, 32, EPS, "none")
    gn64 = F.group_norm(x.double(), 32, weight.double(), bias.double(), EPS)
    _, rtol, atol = TOLERANCE[torch.bfloat16]
    assert ((plain.double() - gn64).abs() <= rtol * gn64.abs() + atol).all() and not torch.equal(plain, silu)
    h = F.group_norm(x, 32, weight, bias, EPS)
    assert torch.equal(group_norm_silu_reference(x, weight, bias, 32, EPS, "silu"), F.silu(h))
    assert torch.equal(group_norm_silu_reference(x, weight, bias, 32, EPS, "swish"), h * torch.sigmoid(h))
    assert torch.equal(group_norm_silu_reference(x, weight, bias, 32, EPS, "none"), h)


def test_empty_batch():
    x, weight, bias = make_inputs(1, 64, 2, 2)
    out = group_norm_silu_triton(x[:0], weight, bias, 32, EPS)
    assert out.shape == (0, 64, 2, 2)


_X = torch.randn(2, 64, 3, 3)
_W = torch.ones(64)


@pytest.mark.parametrize(
    "args,kwargs,fragment",
    [
        ((_X[0], _W, _W, 32, EPS), {}, "x must be a floating-point (B, C, H, W)"),
        ((_X.long(), _W, _W, 32, EPS), {}, "x must be a floating-point"),
        ((_X, _W, _W, 24, EPS), {}, "num_groups 24 does not divide the 64 channels"),
        ((_X, _W, _W, 0, EPS), {}, "num_groups must be a positive int"),
        ((_X, _W, _W, 32.0, EPS), {}, "num_groups must be a positive int"),
        ((_X, _W[:32], _W, 32, EPS), {}, "weight must be a floating-point (64,)"),
        ((_X, _W, _W.long(), 32, EPS), {}, "bias must be a floating-point (64,)"),
        ((_X, _W, _W, 32, 0.0), {}, "eps must be a positive number"),
        ((_X, _W, _W, 32, EPS), {"act": "gelu"}, "act must be one of silu, swish, none"),
        ((_X.transpose(2, 3), _W, _W, 32, EPS), {}, "x must be NCHW-contiguous or channels_last"),
        ((_X[:, :, :, :2], _W, _W, 32, EPS), {}, "x must be NCHW-contiguous or channels_last"),
    ],
)
@pytest.mark.parametrize("fn", [group_norm_silu_reference, group_norm_silu_triton], ids=["reference", "triton"])
def test_bad_inputs(fn, args, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        fn(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args], **kwargs)


def test_kernel_dtypes_only():
    with pytest.raises(ValueError, match="x dtype torch.float64 is not supported by the kernel"):
        group_norm_silu_triton(_X.double().to(DEVICE), _W.double().to(DEVICE), _W.double().to(DEVICE), 32, EPS)


def test_ops_switch(spy_backends):
    calls = spy_backends(impl, "group_norm_silu_reference", "group_norm_silu_triton")
    x, weight, bias = make_inputs(1, 96, 3, 5, channels_last=True)
    ref = ops.group_norm_silu(x, weight, bias, 32, EPS, backend="reference")
    tri = ops.group_norm_silu(x, weight, bias, 32, EPS, act="swish", backend="triton")
    assert calls == ["reference", "triton"]
    assert torch.equal(ref, F.silu(F.group_norm(x, 32, weight, bias, EPS)))
    assert rel_err(tri, ref) < TOLERANCE[torch.float32][0]


# ---- decoders: backend="triton" vs "reference" -------------------------------------------------------------------
# fp32 through a conv stack: each fused norm differs from the eager one by <= 1e-5 relative (above); convs and
# residuals carry such errors forward without growing them by more than the layers' gain (a few per block with these
# random weights), so 1e-4 on the image bounds ~16 norms with margin; an unfused or wrong norm is O(1) off.
DECODER_TOL = 1e-4


def test_vqvae_decoder_backends():
    from ssg_engine.families.var.config import ModelConfig
    from ssg_engine.families.var.tokenizer import VQVAE

    torch.manual_seed(0)
    cfg = ModelConfig(V=16, Cvae=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2), using_sa=False)
    vae = VQVAE(cfg).eval().to(DEVICE).to(memory_format=torch.channels_last)
    f_hat = torch.randn(1, 4, 2, 2, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = vae.fhat_to_img(f_hat)
        tri = vae.fhat_to_img(f_hat, backend="triton")
    assert tri.shape == ref.shape == (1, 3, 4, 4)
    assert rel_err(tri, ref) < DECODER_TOL


def test_bsq_decoder_backends():
    from ssg_engine.families.infinity.tokenizer import BSQVAE, BSQVAEConfig

    torch.manual_seed(0)
    cfg = BSQVAEConfig(codebook_dim=4, base_ch=24, num_res_blocks=1, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                       patch_size=2)
    vae = BSQVAE(cfg).eval().to(DEVICE)
    assert {m.norm.num_groups for m in vae.decoder.modules() if hasattr(m, "norm")} == {24}  # 24 and 48 channels
    z = torch.randn(1, 4, 3, 2, device=DEVICE).contiguous(memory_format=torch.channels_last)
    ref = vae.decode(z)
    tri = vae.decode(z, backend="triton")
    assert tri.shape == ref.shape == (1, 3, 6, 4)
    assert rel_err(tri, ref) < DECODER_TOL


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,G", [((16, 160, 256, 256), 32), ((1, 128, 1024, 1024), 32), ((64, 640, 16, 16), 32)])
def test_real_shapes_gpu(shape, G, dtype):
    """The decoders' real sizes (VQ-VAE at B = 16 / 64, BSQ at 1024 px), channels-last as in the Engine."""
    x, weight, bias = make_inputs(*shape, dtype=dtype, channels_last=True, seed=1)
    out = group_norm_silu_triton(x, weight, bias, G, EPS)
    want = F.silu(F.group_norm(x.float(), G, weight.float(), bias.float(), EPS))
    assert_layout(out, x)
    assert rel_err(out, want) < TOLERANCE[dtype][0]
