"""Fused QKV epilogue (split, L2 norm, q scale, 2-D RoPE, KV-cache write) vs its PyTorch reference.

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
from ssg_engine.kernels import config_key, launch_config  # noqa: E402
from ssg_engine.kernels import qkv_norm_rope_cache as impl  # noqa: E402
from ssg_engine.kernels.qkv_norm_rope_cache import (  # noqa: E402
    qkv_norm_rope_cache_launch,
    qkv_norm_rope_cache_reference,
    qkv_norm_rope_cache_triton,
)
from ssg_engine.families.infinity import model as infinity  # noqa: E402
from ssg_engine.families.var import model as var  # noqa: E402

from conftest import kernel_test_settings  # noqa: E402

INTERPRET, DEVICE, requires_gpu = kernel_test_settings()
pytestmark = pytest.mark.usefixtures("one_thread")

# Bounds per output precision. "exact" is the reference run in float64 on the same (rounded) inputs.
#  - float32 outputs: norm-relative error to the float32 reference. Each output element is a few float32 roundings
#    (sqrt, division, scale, 2 products + 1 sum of the rotation: <= 6 u) after a sum of D <= 128 squares (relative
#    error <= D u, any order), u = 2**-24: (128 + 6) * 2**-24 = 8.0e-6 < 1e-5.
#  - bfloat16/float16 outputs, element-wise: the kernel rounds once at the store (<= u |exact|, u = 2**-8 / 2**-11)
#    after float32 math (the 1e-5 above, relative to the row's norm: ||q_row|| = scale, ||k_row|| = 1 when normalised).
#    Norm-wise: its error to exact is at most 2x the error of the eager sequence it replaces (the reference in the low
#    dtype, which rounds the norm, the quotient and, for a low-precision scale_mul, the product as well).
FP32_REL = 1e-5
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FP32_ROW_REL = 1e-5
EAGER_RATIO = 2.0

SCHEDULE = infinity.scale_schedule(1.25, 4)  # (1, 1), (2, 2), (3, 3), (5, 4): l = 1 at 0, l = 20 at 14; S = 34
SCALE_START = {1: 0, 20: 14}
MODES = {"none": (False, False), "norm": (True, False), "norm+rope": (True, True)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make_inputs(R, rows, H, l, D, mode, dtype, cache_dtype, *, layers=2, seed=0, device=DEVICE):
    """(qkv, k_cache, v_cache, layer, start, kwargs) with NaN-filled caches and, for RoPE, the real tables of
    ``SCHEDULE``'s scale with l tokens (its start is also the cache position)."""
    normalize, rope = MODES[mode]
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(R, l, 3 * H * D, generator=g) * 3).to(dtype).to(device)
    start = SCALE_START[l]
    length = sum(h * w for h, w in SCHEDULE)
    k_cache = torch.full((layers, rows, H, length, D), float("nan"), dtype=cache_dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    kwargs = dict(num_heads=H)
    if normalize:  # upstream's init is log(4) clamped at log(100), exp'd: spread the heads over [1, 100]
        kwargs["scale_mul"] = torch.logspace(0, 2, H).to(device)
    if rope:
        cos, sin = infinity.rope_tables(SCHEDULE, D)
        kwargs["rope"] = (cos[start:start + l].to(device), sin[start:start + l].to(device))
    return qkv, k_cache, v_cache, layers - 1, start, kwargs


def exact(qkv, k_cache, layer, start, kwargs):
    """The reference in float64 on the same inputs: (q, k, v) each (R, H, l, D) float64 (float64 products with the
    float32 RoPE tables: type promotion)."""
    R, l = qkv.shape[:2]
    k64 = torch.zeros(k_cache.shape, dtype=torch.float64, device=qkv.device)
    v64 = torch.zeros_like(k64)
    kw = dict(kwargs)
    if "scale_mul" in kw:
        kw["scale_mul"] = kw["scale_mul"].double()
    q = qkv_norm_rope_cache_reference(qkv.double(), k64, v64, layer, start, **kw)
    window = (layer, slice(None, R), slice(None), slice(start, start + l))
    return q, k64[window], v64[window]


def check_values(got, ref, qkv, k_cache, layer, start, kwargs):
    """The tolerance table applied to (q, k, v) of the kernel and of the reference."""
    # v (and q, k without normalisation) is a copy: rounded to the cache dtype the same way, bit for bit
    assert torch.equal(got[2], ref[2])
    if "scale_mul" not in kwargs and "rope" not in kwargs:
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        return
    if k_cache.dtype == torch.float32:
        for name, a, b in zip("qk", got, ref):
            assert rel_err(a, b) < FP32_REL, name
        return
    u = UNIT_ROUNDOFF[k_cache.dtype]
    for name, a, b, e in zip("qk", got, ref, exact(qkv, k_cache, layer, start, kwargs)):
        bound = u * e.abs() + FP32_ROW_REL * e.norm(dim=-1, keepdim=True)
        assert ((a.double() - e).abs() <= bound).all(), f"{name}: element-wise bound"
        assert rel_err(a, e) <= EAGER_RATIO * rel_err(b, e), f"{name}: kernel vs eager error to exact"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN included)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def check_window(cache, before, ref_cache, layer, R, start, l):
    """Outside ``[layer, :R, :, start:start + l]`` the cache is bit for bit what it was; inside, NaN exactly where
    the reference wrote NaN (nowhere for finite inputs: with NaN-filled caches, the whole window was written)."""
    inside = torch.zeros(cache.shape, dtype=torch.bool, device=cache.device)
    inside[layer, :R, :, start:start + l] = True
    assert same_bits(cache[~inside], before[~inside]), "the kernel wrote outside the declared window"
    assert torch.equal(cache[inside].isnan(), ref_cache[inside].isnan()), "NaN left or written in the window"


def run_both(qkv, k_cache, v_cache, layer, start, kwargs):
    """(q, k window, v window) of the kernel and of the reference, on two copies of the caches."""
    R, l = qkv.shape[:2]
    qkv_before = qkv.clone()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q = qkv_norm_rope_cache_triton(qkv, k_cache, v_cache, layer, start, **kwargs)
    q_ref = qkv_norm_rope_cache_reference(qkv, k_ref, v_ref, layer, start, **kwargs)
    assert same_bits(qkv, qkv_before), "qkv changed"
    for cache, before, ref in ((k_cache, k_before, k_ref), (v_cache, v_before, v_ref)):
        check_window(cache, before, ref, layer, R, start, l)
    H, D = k_cache.shape[2], k_cache.shape[4]
    assert q.shape == (R, H, l, D) and q.dtype == k_cache.dtype and q.transpose(1, 2).is_contiguous()
    window = (layer, slice(None, R), slice(None), slice(start, start + l))
    return (q, k_cache[window], v_cache[window]), (q_ref, k_ref[window], v_ref[window])


CASES = [  # (R, rows, H, l, D, mode, qkv dtype, cache dtype)
    (3, 3, 2, 20, 8, "none", torch.float32, torch.float32),
    (3, 5, 2, 1, 24, "norm", torch.float32, torch.float32),
    (3, 3, 2, 20, 24, "norm+rope", torch.float32, torch.float32),
    (1, 4, 3, 20, 64, "norm", torch.float32, torch.float32),
    (3, 3, 1, 20, 96, "norm+rope", torch.float32, torch.float32),
    (2, 3, 1, 1, 104, "norm+rope", torch.float32, torch.float32),
    (1, 2, 1, 20, 128, "norm+rope", torch.float32, torch.float32),
    (3, 3, 2, 20, 8, "norm+rope", torch.bfloat16, torch.bfloat16),
    (3, 5, 2, 20, 24, "none", torch.bfloat16, torch.bfloat16),
    (3, 3, 3, 1, 64, "norm", torch.bfloat16, torch.bfloat16),
    (5, 6, 3, 20, 64, "norm", torch.bfloat16, torch.bfloat16),
    (3, 3, 1, 20, 96, "norm+rope", torch.bfloat16, torch.bfloat16),
    (1, 1, 1, 20, 104, "norm+rope", torch.bfloat16, torch.bfloat16),
    (3, 4, 1, 1, 128, "norm+rope", torch.bfloat16, torch.bfloat16),
    (3, 3, 2, 20, 64, "norm", torch.float16, torch.float16),
    (3, 4, 2, 20, 24, "norm+rope", torch.float32, torch.bfloat16),  # float32 activations, bfloat16 cache
]


@pytest.mark.parametrize("R,rows,H,l,D,mode,dtype,cache_dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_matches_reference(R, rows, H, l, D, mode, dtype, cache_dtype):
    qkv, k_cache, v_cache, layer, start, kwargs = make_inputs(R, rows, H, l, D, mode, dtype, cache_dtype, seed=D + l)
    got, ref = run_both(qkv, k_cache, v_cache, layer, start, kwargs)
    check_values(got, ref, qkv, k_cache, layer, start, kwargs)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's numpy cast of 3.4e38 to fp16
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
def test_copies_round_like_torch(cache_dtype):
    """float32 -> low-precision copies (q, k, v without normalisation) equal torch's ``copy_`` bit for bit on exact
    ties (even and odd last kept bit), carries into the exponent, overflow, subnormals, signed zeros, inf; NaN stays NaN."""
    bits16 = torch.tensor([0x3F80, 0x3F81, 0x3FFF, 0x7F7F, 0x0001, 0x8001, 0x4049], dtype=torch.int32)
    ties = ((bits16 << 16) | 0x8000).view(torch.float32)  # exactly halfway between two bfloat16 values
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65519.0, 65520.0, 1e-8, 3.4e38])
    values = torch.cat((ties, -ties, special, torch.randn(48 - 2 * len(ties) - len(special))))
    qkv = values.repeat(4).view(1, 4, 48).to(DEVICE)  # H = 2, D = 8
    k_cache = torch.full((1, 1, 2, 4, 8), 7.0, dtype=cache_dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, 7.0)
    got, ref = run_both(qkv, k_cache, v_cache, 0, 0, dict(num_heads=2))
    for a, b in zip(got, ref):  # NaN payloads are not specified (torch's CPU copy gives 0xFFFF, its GPU copy 0x7FFF)
        nan = b.isnan()
        assert torch.equal(a.isnan(), nan) and same_bits(a[~nan], b[~nan])


def test_reference_is_the_models_code():
    """The reference gives the models' ``SelfAttention.qkv`` bit for bit (the golden tests keep covering it)."""
    torch.manual_seed(0)
    B, l, C, H = 3, 20, 96, 4
    x = torch.randn(B, l, C)
    attn = infinity.SelfAttention(C, H)
    for p in (attn.q_bias, attn.v_bias, attn.scale_mul_1H11):
        torch.nn.init.normal_(p)
    cos, sin = (t[14:34] for t in infinity.rope_tables(SCHEDULE, C // H))
    q_m, k_m, v_m = attn.qkv(x, cos, sin)
    bias = torch.cat((attn.q_bias, attn.zero_k_bias, attn.v_bias))
    scale_mul = attn.scale_mul_1H11.clamp_max(attn.max_scale_mul).exp()
    k_cache, v_cache = torch.zeros(2, B, H, 40, C // H), torch.zeros(2, B, H, 40, C // H)
    with torch.no_grad():
        qkv = F.linear(x, attn.mat_qkv.weight, bias)
        q = qkv_norm_rope_cache_reference(qkv, k_cache, v_cache, 1, 5, num_heads=H, scale_mul=scale_mul, rope=(cos, sin))
    assert torch.equal(q, q_m) and torch.equal(k_cache[1, :, :, 5:25], k_m) and torch.equal(v_cache[1, :, :, 5:25], v_m)

    for l2 in (True, False):
        attn = var.SelfAttention(C, H, attn_l2_norm=l2)
        bias, scale_mul = attn.constants()
        with torch.no_grad():
            q_m, k_m, v_m = attn.qkv(x)
            qkv = F.linear(x, attn.mat_qkv.weight, bias)
            q = qkv_norm_rope_cache_reference(qkv, k_cache, v_cache, 0, 0, num_heads=H, scale_mul=scale_mul)
        assert torch.equal(q, q_m) and torch.equal(k_cache[0, :, :, :l], k_m) and torch.equal(v_cache[0, :, :, :l], v_m)


def test_rotation_is_apply_rope():
    x, angles = torch.randn(2, 3, 4, 20, 24), torch.randn(20, 12)
    assert torch.equal(impl.rotate_pairs(x, angles.cos(), angles.sin()), infinity.apply_rope(x, angles.cos(), angles.sin()))


def test_strided_views_and_scale_shapes():
    """qkv a slice of a wider buffer (row and token strides not R-contiguous), caches views of bigger buffers with
    non-standard strides, scale_mul (1, H, 1, 1) in bfloat16: same values as the reference."""
    R, H, l, D = 3, 2, 20, 24
    wide = torch.randn(l, R, 3 * H * D + 5, device=DEVICE)
    qkv = wide[..., : 3 * H * D].transpose(0, 1)  # (R, l, 3HD), strides (3HD + 5, R (3HD + 5), 1)
    k_big = torch.full((2, 4, H, 40, D + 8), float("nan"), device=DEVICE)
    v_big = torch.full((3, 4, H, 40, D), float("nan"), device=DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
    k_cache, v_cache = k_big[..., :D], v_big[1:]
    cos, sin = (t[14:34].to(DEVICE) for t in infinity.rope_tables(SCHEDULE, D))
    scale_mul = torch.tensor([2.0, 30.0], device=DEVICE).bfloat16().view(1, H, 1, 1)
    kwargs = dict(num_heads=H, scale_mul=scale_mul, rope=(cos, sin))
    got, ref = run_both(qkv, k_cache, v_cache, 1, 14, kwargs)
    assert torch.equal(got[2], ref[2])
    assert rel_err(got[0], ref[0]) < FP32_REL and rel_err(got[1], ref[1]) < FP32_REL
    assert k_big[..., D:].isnan().all()


def test_layer_and_start_are_not_specialized():
    """Every (layer, start) of a loop compiles to one binary (meta tensors: the launcher alone, no data)."""
    qkv = torch.empty(4, 20, 3 * 16 * 64, dtype=torch.bfloat16, device="meta")
    cache = torch.empty(30, 4, 16, 680, 64, dtype=torch.bfloat16, device="meta")
    scale = torch.empty(16, device="meta")
    keys = set()
    for layer, start in ((0, 0), (1, 1), (16, 16), (29, 35)):
        launch, q = qkv_norm_rope_cache_launch(qkv, cache, torch.empty_like(cache), layer, start, num_heads=16, scale_mul=scale)
        assert q.shape == (4, 16, 20, 64) and q.dtype == torch.bfloat16
        keys.add(config_key(launch_config(launch)))
    assert len(keys) == 1


def _bad_args():
    H, D = 2, 8
    return dict(
        qkv=torch.zeros(3, 4, 3 * H * D), k_cache=torch.zeros(2, 3, H, 10, D), v_cache=torch.zeros(2, 3, H, 10, D),
        layer=1, start=2, num_heads=H, scale_mul=torch.ones(H), rope=(torch.ones(4, D // 2), torch.zeros(4, D // 2)),
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_heads=0), "num_heads must be a positive int"),
        (dict(num_heads=5), "qkv has shape (3, 4, 48); expected (R >= 1, l >= 1, 3*H*D) with H = num_heads = 5"),
        (dict(qkv=torch.zeros(3, 48)), "qkv must be a floating-point (R, l, 3*H*D)"),
        (dict(qkv=torch.zeros(3, 4, 48, dtype=torch.int32)), "qkv must be a floating-point"),
        (dict(qkv=torch.zeros(3, 0, 48)), "qkv has shape (3, 0, 48)"),
        (dict(qkv=torch.zeros(3, 48, 4).transpose(1, 2)), "qkv must have a contiguous last dim"),
        (dict(k_cache=torch.zeros(3, 2, 10, 8)), "k_cache must be a (layers, rows, H, S, D)"),
        (dict(v_cache=torch.zeros(2, 2, 2, 10, 8)), "v_cache has shape (2, 2, 2, 10, 8)"),
        (dict(k_cache=torch.zeros(2, 3, 2, 10, 16)), "(layers, rows >= 3, 2, S, 8)"),
        (dict(v_cache=torch.zeros(2, 3, 2, 10, 8, dtype=torch.bfloat16)), "v_cache is (2, 3, 2, 10, 8) torch.bfloat16"),
        (dict(v_cache=torch.zeros(2, 3, 2, 10, 8, device="meta")), "v_cache is on meta"),
        (dict(k_cache=torch.zeros(2, 3, 2, 10, 8, dtype=torch.int64)), "k_cache must be floating point"),
        (dict(layer=2), "layer must be an int in [0, 2)"),
        (dict(layer=True), "layer must be an int"),
        (dict(start=7), "start + l = start + 4 <= S = 10; got 7"),
        (dict(start=-1), "start must be an int"),
        (dict(scale_mul=torch.ones(3)), "scale_mul must be a float (2,) or (1, 2, 1, 1) tensor; got (3,)"),
        (dict(scale_mul=torch.ones(2, dtype=torch.int64)), "scale_mul must be a float"),
        (dict(scale_mul=torch.ones(2, device="meta")), "scale_mul is on meta"),
        (dict(rope=torch.ones(4, 4)), "rope must be a (cos, sin) pair"),
        (dict(rope=(torch.ones(4, 4), torch.ones(4, 4, dtype=torch.float64))), "rope sin must be a float32 (4, 4)"),
        (dict(rope=(torch.ones(20, 4), torch.ones(4, 4))), "rope cos must be a float32 (4, 4) tensor (l, D/2); got (20, 4)"),
        (dict(rope=(torch.ones(4, 4, device="meta"), torch.ones(4, 4))), "rope cos is on meta"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
@pytest.mark.parametrize("fn", [qkv_norm_rope_cache_triton, qkv_norm_rope_cache_reference], ids=["triton", "reference"])
def test_bad_inputs(fn, kwargs, message):
    args = _bad_args()
    args.update(kwargs)
    qkv, k_cache, v_cache, layer, start = (args.pop(n) for n in ("qkv", "k_cache", "v_cache", "layer", "start"))
    with pytest.raises(ValueError) as info:
        fn(qkv, k_cache, v_cache, layer, start, **args)
    assert message in str(info.value)


def test_same_cache_twice_and_odd_head_dim_with_rope():
    args = _bad_args()
    cache = args.pop("k_cache")
    args.pop("v_cache")
    with pytest.raises(ValueError, match="two distinct tensors"):
        qkv_norm_rope_cache_reference(args.pop("qkv"), cache, cache, args.pop("layer"), args.pop("start"), **args)
    qkv, cache = torch.zeros(1, 4, 3 * 7), torch.zeros(1, 1, 1, 4, 7)
    with pytest.raises(ValueError, match="rope needs an even head dim; qkv has D = 7"):
        qkv_norm_rope_cache_reference(qkv, cache, cache.clone(), 0, 0, num_heads=1, rope=(torch.ones(4, 3),) * 2)


def test_kernel_rejects_float64_reference_accepts_it():
    args = _bad_args()
    qkv, k_cache, v_cache = (args.pop(n).double() for n in ("qkv", "k_cache", "v_cache"))
    layer, start = args.pop("layer"), args.pop("start")
    with pytest.raises(ValueError, match="qkv dtype torch.float64 is not supported by the kernel"):
        qkv_norm_rope_cache_triton(qkv, k_cache, v_cache, layer, start, **args)
    assert qkv_norm_rope_cache_reference(qkv, k_cache, v_cache, layer, start, **args).dtype == torch.float64


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU-without-interpreter error")
def test_kernel_needs_cuda_unless_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = _bad_args()
    with pytest.raises(ValueError, match="need CUDA tensors"):
        qkv_norm_rope_cache_triton(*[args.pop(n) for n in ("qkv", "k_cache", "v_cache", "layer", "start")], **args)


# ---- ops.qkv_norm_rope_cache_: the backend switch ---------------------------------------


@pytest.fixture
def recorded(spy_backends):
    return spy_backends(impl, "qkv_norm_rope_reference", "qkv_norm_rope_cache_triton")  # ops: the eager prologue + kv_write_


@pytest.mark.parametrize("backend,expected", [("reference", "reference"), ("triton", "triton"), ("auto", "triton")])
def test_ops_dispatch(recorded, backend, expected):
    qkv, k_cache, v_cache, layer, start, kwargs = make_inputs(2, 2, 2, 1, 8, "norm+rope", torch.float32, torch.float32)
    q = ops.qkv_norm_rope_cache_(qkv, k_cache, v_cache, layer, start, backend=backend, **kwargs)
    assert recorded == [expected]  # auto picks triton under TRITON_INTERPRET=1 or on CUDA
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = qkv_norm_rope_cache_reference(qkv, k_ref, v_ref, layer, start, **kwargs)
    assert rel_err(q, q_ref) < FP32_REL and torch.equal(v_cache.isnan(), v_ref.isnan())


def test_ops_env_override(recorded, monkeypatch):
    monkeypatch.setenv("SSG_ENGINE_BACKEND", "reference")
    qkv, k_cache, v_cache, layer, start, kwargs = make_inputs(1, 1, 1, 1, 8, "none", torch.float32, torch.float32)
    ops.qkv_norm_rope_cache_(qkv, k_cache, v_cache, layer, start, backend="triton", **kwargs)
    assert recorded == ["reference"]


# ---- compiled kernel at real sizes -------------------------------------------------------


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,D,rope", [(16, 64, False), (30, 64, False), (16, 128, True), (20, 104, True)])
def test_gpu_real_sizes(dtype, H, D, rope):
    """VAR d16/d30 last scale (l = 256) and Infinity-2B / layer32 at a 32x32 scale, 2B = 32 rows of 40."""
    R, l, start = 32, 256 if not rope else 1024, 424
    g = torch.Generator().manual_seed(H)
    qkv = (torch.randn(R, l, 3 * H * D, generator=g) * 3).to(dtype).cuda()
    k_cache = torch.full((2, 40, H, start + l + 3, D), float("nan"), dtype=dtype, device="cuda")
    v_cache = torch.full_like(k_cache, float("nan"))
    kwargs = dict(num_heads=H, scale_mul=torch.logspace(0, 2, H, device="cuda"))
    if rope:
        angles = torch.rand(l, D // 2, generator=g) * 100
        kwargs["rope"] = (angles.cos().cuda(), angles.sin().cuda())
    got, ref = run_both(qkv, k_cache, v_cache, 1, start, kwargs)
    check_values(got, ref, qkv, k_cache, 1, start, kwargs)
