"""Fused CFG + SSG kernel vs its PyTorch reference, plus the ``ops.ssg_guidance`` switch.

Runs on the Triton CPU interpreter by default; with ``TRITON_INTERPRET=0`` on a CUDA
machine the same tests run the compiled kernel on the GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'ssg-engine[triton]')")

from ssg_engine import ops  # noqa: E402
from ssg_engine.kernels import ssg_guidance as impl  # noqa: E402
from ssg_engine.kernels.ssg_guidance import ssg_guidance_reference, ssg_guidance_triton  # noqa: E402

from conftest import kernel_test_settings  # noqa: E402

INTERPRET, DEVICE, requires_gpu = kernel_test_settings()

# Max relative error ||kernel - reference|| / ||reference|| per (input dtype, dot precision).
# The reference is fp32 PyTorch on the *same* inputs: low-precision inputs are rounded
# once by the caller and both sides upcast those rounded values, so with fp32 math
# and fp32 accumulation only summation order differs.
TOLERANCE = {
    (torch.float32, "ieee"): 1e-5,
    (torch.bfloat16, "ieee"): 1e-5,
    (torch.float16, "ieee"): 1e-5,
    # TF32 keeps 10 mantissa bits and Triton truncates fp32 operands to it
    # (error < 2**-10 per operand); GPU only, the interpreter computes fp32 exactly.
    (torch.float32, "tf32"): 2e-3,
}

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8)
SCALE_PAIRS = list(zip(PATCH_NUMS[:-1], PATCH_NUMS[1:]))  # (prev pn, current pn)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(B, N, M, V, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * B, N, V, generator=g).to(dtype)
    prev = torch.randn(B, M, V, generator=g).to(dtype)
    operator = torch.randn(N, M, generator=g) / M**0.5
    return logits.to(device), prev.to(device), operator.to(device)


def check_close(inputs, cfg_t, beta, dtype=torch.float32, precision="ieee"):
    logits, prev, operator = inputs
    guided, cfg = ssg_guidance_triton(logits, prev, operator, cfg_t, beta, allow_tf32=precision == "tf32")
    guided_ref, cfg_ref = ssg_guidance_reference(logits, prev, operator, cfg_t, beta)
    tol = TOLERANCE[(dtype, precision)]
    assert guided.dtype == cfg.dtype == torch.float32
    assert guided.shape == cfg.shape == guided_ref.shape
    assert guided.data_ptr() != cfg.data_ptr()
    assert rel_err(cfg, cfg_ref) < tol
    assert rel_err(guided, guided_ref) < tol
    return guided, cfg


@pytest.mark.parametrize("pn_prev,pn", SCALE_PAIRS)
def test_every_scale_pair(pn_prev, pn):
    B, V = 3, 67
    inputs = make_inputs(B, pn * pn, pn_prev * pn_prev, V, seed=pn)
    guided, cfg = check_close(inputs, cfg_t=1.5, beta=0.8)
    # the prior is really in there: guided differs from cfg by beta * (cfg - prior)
    assert rel_err(guided, cfg) > 0.1


@pytest.mark.parametrize(
    "B,N,M,V",
    [(1, 1, 1, 16), (3, 1, 1, 300), (2, 9, 4, 300), (3, 17, 33, 67), (1, 64, 36, 131)],
    ids=lambda x: str(x),
)
def test_odd_shapes(B, N, M, V):
    check_close(make_inputs(B, N, M, V, seed=B * N + M), cfg_t=2.0, beta=0.5)


@pytest.mark.parametrize(
    "cfg_t,beta",
    [
        (torch.tensor([0.0, 1.5, 4.0]), torch.tensor([0.25, 0.0, 1.0])),
        (torch.tensor(3.0), torch.tensor(0.7)),
        (1.25, torch.tensor([0.5, 1.0, 2.0])),
        (torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), -0.3),
    ],
    ids=["per-batch", "0-d", "float-t,per-batch-beta", "fp64-tensor-t,float-beta"],
)
def test_scalar_and_tensor_params(cfg_t, beta):
    move = lambda x: x.to(DEVICE) if isinstance(x, torch.Tensor) else x  # noqa: E731
    guided, cfg = check_close(make_inputs(3, 16, 9, 67, seed=7), move(cfg_t), move(beta))
    if isinstance(beta, torch.Tensor) and beta.ndim == 1 and beta[1] == 0:
        torch.testing.assert_close(guided[1], cfg[1], rtol=0, atol=0)  # beta = 0 for image 1


def test_per_batch_params_match_separate_calls():
    logits, prev, operator = make_inputs(3, 9, 4, 67, seed=3)
    t = torch.tensor([0.5, 1.0, 3.0], device=DEVICE)
    beta = torch.tensor([0.1, 0.6, 1.2], device=DEVICE)
    guided, cfg = ssg_guidance_triton(logits, prev, operator, t, beta)
    for b in range(3):
        one = torch.stack([logits[b], logits[3 + b]])
        g1, c1 = ssg_guidance_triton(one, prev[b : b + 1], operator, float(t[b]), float(beta[b]))
        assert rel_err(g1[0], guided[b]) < 1e-6 and rel_err(c1[0], cfg[b]) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    check_close(make_inputs(3, 16, 9, 300, dtype=dtype, seed=11), 1.5, 0.8, dtype=dtype)


def test_mixed_dtypes_and_strided_views():
    logits, prev, operator = make_inputs(2, 9, 4, 300, seed=5)
    logits = torch.cat([logits, logits], dim=2)[:, :, ::2]  # non-unit V stride
    prev = prev.to(torch.bfloat16)
    operator = operator.t().contiguous().t()  # column-major operator
    check_close((logits, prev, operator), 1.0, 0.5)


@pytest.mark.parametrize(
    "prev_none,operator_none,beta", [(True, False, 0.5), (False, True, 0.5), (True, True, 0.5), (False, False, 0.0)]
)
def test_no_prior_is_plain_cfg(prev_none, operator_none, beta):
    logits, prev, operator = make_inputs(3, 4, 1, 67, seed=2)
    prev = None if prev_none else prev
    operator = None if operator_none else operator
    guided, cfg = ssg_guidance_triton(logits, prev, operator, 2.5, beta)
    expected = 3.5 * logits[:3].float() - 2.5 * logits[3:].float()
    torch.testing.assert_close(cfg, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(guided, cfg, rtol=0, atol=0)
    assert guided.data_ptr() != cfg.data_ptr()
    ref_guided, ref_cfg = ssg_guidance_reference(logits, prev, operator, 2.5, beta)
    torch.testing.assert_close(ref_guided, guided, rtol=1e-6, atol=1e-6)


def test_reference_matches_per_image_formula():
    """The reference itself, against the formula written out per image."""
    logits, prev, operator = make_inputs(3, 9, 4, 67, seed=9, device="cpu")
    t, beta = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.2, 0.4, 0.8])
    guided, cfg = ssg_guidance_reference(logits, prev, operator, t, beta)
    for b in range(3):
        c = (1 + t[b]) * logits[b] - t[b] * logits[3 + b]
        prior = operator @ prev[b]
        torch.testing.assert_close(cfg[b], c)
        torch.testing.assert_close(guided[b], c + beta[b] * (c - prior))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(operator=torch.zeros(5, 4)), "operator has shape (5, 4) but logits have N=9 tokens and prev has M=4"),
        (dict(prev=torch.zeros(2, 4, 67)), "prev has shape (2, 4, 67)"),
        (dict(prev=torch.zeros(3, 4, 66)), "V=67"),
        (dict(logits_2B=torch.zeros(5, 9, 67)), "expected 2B > 0"),
        (dict(logits_2B=torch.zeros(6, 67)), "(2B, N, V)"),
        (dict(logits_2B=torch.zeros(6, 9, 67, dtype=torch.int64)), "floating point"),
        (dict(cfg_t=torch.zeros(2)), "cfg_t has shape (2,)"),
        (dict(beta=torch.zeros(3, 1)), "beta has shape (3, 1)"),
        (dict(beta="0.5"), "beta must be a real number"),
        (dict(cfg_t=torch.zeros(3, device="meta")), "cfg_t is on meta"),
        (dict(prev=torch.zeros(3, 4, 67, device="meta")), "prev is on meta"),
        (dict(operator=torch.zeros(9, 4, dtype=torch.int32)), "operator must be a floating-point (N, M)"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
@pytest.mark.parametrize("fn", [ssg_guidance_triton, ssg_guidance_reference], ids=["triton", "reference"])
def test_bad_inputs(fn, kwargs, message):
    args = dict(
        logits_2B=torch.zeros(6, 9, 67), prev=torch.zeros(3, 4, 67), operator=torch.zeros(9, 4), cfg_t=1.0, beta=0.5
    )
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        fn(**args)
    assert message in str(info.value)


def test_kernel_rejects_float64_reference_accepts_it():
    logits, prev, operator = (x.double() for x in make_inputs(1, 4, 1, 16, device="cpu"))
    with pytest.raises(ValueError, match="torch.float64 is not supported by the kernel"):
        ssg_guidance_triton(logits, prev, operator, 1.0, 0.5)
    guided, cfg = ssg_guidance_reference(logits, prev, operator, 1.0, 0.5)
    assert guided.dtype == torch.float32


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU-without-interpreter error")
def test_kernel_needs_cuda_unless_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        ssg_guidance_triton(*make_inputs(1, 4, 1, 16), 1.0, 0.5)


# ---- ops.ssg_guidance: the backend switch -------------------------------------------


@pytest.fixture
def recorded(spy_backends):
    """Record which implementation ops.ssg_guidance calls."""
    return spy_backends(impl, "ssg_guidance_reference", "ssg_guidance_triton")


@pytest.mark.parametrize("backend,expected", [("reference", "reference"), ("triton", "triton"), ("auto", "triton")])
def test_ops_dispatch(recorded, backend, expected):
    logits, prev, operator = make_inputs(2, 4, 1, 67)
    guided, cfg = ops.ssg_guidance(logits, prev, operator, 1.5, 0.5, backend=backend)
    assert recorded == [expected]  # auto picks triton under TRITON_INTERPRET=1 or on CUDA
    ref_guided, ref_cfg = ssg_guidance_reference(logits, prev, operator, 1.5, 0.5)
    assert rel_err(guided, ref_guided) < 1e-5 and rel_err(cfg, ref_cfg) < 1e-5


def test_ops_env_override(recorded, monkeypatch):
    monkeypatch.setenv("SSG_ENGINE_BACKEND", "reference")
    ops.ssg_guidance(*make_inputs(1, 4, 1, 16), 1.0, 0.5, backend="triton")
    assert recorded == ["reference"]


def test_ops_invalid_backend(recorded, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.ssg_guidance(*make_inputs(1, 4, 1, 16), 1.0, 0.5, backend="cuda")
    monkeypatch.setenv("SSG_ENGINE_BACKEND", "fast")
    with pytest.raises(ValueError, match="environment variable SSG_ENGINE_BACKEND 'fast'"):
        ops.ssg_guidance(*make_inputs(1, 4, 1, 16), 1.0, 0.5)
    assert recorded == []


def test_ops_reference_backend_works_without_triton():
    """``import ssg_engine.ops`` and the reference backend must not need triton."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        from ssg_engine import ops
        guided, cfg = ops.ssg_guidance(torch.randn(4, 9, 32), torch.randn(2, 4, 32), torch.randn(9, 4), 1.0, 0.5)
        tokens = ops.sample_logits(guided, 5, 0.9, 1.0, torch.tensor([1]), torch.tensor([0]))
        assert guided.shape == cfg.shape == (2, 9, 32) and tokens.shape == (2, 9)
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("SSG_ENGINE_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---- compiled kernel on a GPU ----------------------------------------------------------


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pn_prev,pn", [(8, 10), (13, 16)])
def test_gpu_var_shapes(dtype, pn_prev, pn):
    check_close(make_inputs(4, pn * pn, pn_prev * pn_prev, 4096, dtype=dtype, device="cuda"), 2.0, 0.6, dtype=dtype)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("pn_prev,pn", [(8, 10), (13, 16)])
def test_gpu_tf32(pn_prev, pn):
    logits, prev, _ = make_inputs(4, pn * pn, pn_prev * pn_prev, 4096, device="cuda")
    operator = torch.rand(pn * pn, pn_prev * pn_prev, device="cuda")
    operator /= operator.sum(1, keepdim=True)  # an averaging prior like an upsampling operator
    check_close((logits, prev, operator), 2.0, 0.6, precision="tf32")
