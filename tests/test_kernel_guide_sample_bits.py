"""Fused guidance + Bernoulli bit draw (Infinity) vs its PyTorch reference, plus ``ops.guide_and_sample_bits``.

Runs on the Triton CPU interpreter by default; with ``TRITON_INTERPRET=0`` on a CUDA machine the same tests run the
compiled kernel. Statistical tests use fixed seeds (deterministic runs) and state their thresholds.
"""
import math
import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'ssg-engine[triton]')")

from ssg_engine import ops  # noqa: E402
from ssg_engine.kernels import KernelLaunch  # noqa: E402
from ssg_engine.kernels import guide_sample_bits as impl  # noqa: E402
from ssg_engine.kernels.guide_sample_bits import (  # noqa: E402
    guide_sample_bits_launch,
    guide_sample_bits_reference,
    guide_sample_bits_triton,
)
from ssg_engine.kernels.sampling import sample_logits_reference, sample_logits_triton, top_k_top_p_mask_reference  # noqa: E402
from ssg_engine.kernels.ssg_guidance import ssg_guidance_reference, ssg_guidance_triton  # noqa: E402

from conftest import kernel_test_settings  # noqa: E402

INTERPRET, DEVICE, requires_gpu = kernel_test_settings()

# Max ||kernel - reference|| / ||reference|| of the fp32 cfg / guided outputs per logits dtype. As for ssg_guidance
# (its guide_tile computes them): both sides upcast the same rounded inputs and compute in fp32, so only the prior's
# summation order differs (a few fp32 ulps of the row norm).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}

# one-sided normal / chi-square tests at p = 1e-4 (Wilson-Hilferty for the chi-square quantile)
Z = 3.719


def chi2_critical(df: int, z: float = Z) -> float:
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def seeds(seed: int, offset: int = 0):
    return (torch.tensor([seed], dtype=torch.int64, device=DEVICE), torch.tensor([offset], dtype=torch.int64, device=DEVICE))


def make_inputs(B, N, M, V, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2 * B, N, V, generator=g) * scale).to(dtype).to(DEVICE)
    prev = torch.randn(B, M, V, generator=g).to(dtype).to(DEVICE)
    operator = (torch.randn(N, M, generator=g) / M**0.5).to(DEVICE)
    return logits, prev, operator


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bit_logits(guided: torch.Tensor, temperature: float):
    """(x0, x1) of every bit, (B, N, d) each: the guided channel pairs over the temperature."""
    x = guided.float() / temperature
    return x[..., 0::2], x[..., 1::2]


# ---- the guided outputs and the bits' format --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize(
    "B,N,M,V,prior",
    [(1, 1, 1, 2, True), (3, 1, 1, 64, False), (2, 9, 4, 16, True), (3, 17, 9, 34, True), (1, 20, 12, 66, True), (2, 15, 0, 70, False)],
    ids=str,
)
def test_outputs_match_reference(B, N, M, V, prior, dtype):
    logits, prev, operator = make_inputs(B, N, max(M, 1), V, dtype, seed=N + V)
    if not prior:
        prev = operator = None
    cfg_t = torch.linspace(0.5, 2.0, B, device=DEVICE)  # one CFG weight per image
    bits, nonfinite, cfg, guided = guide_sample_bits_triton(
        logits, prev, operator, cfg_t, 0.7, 0, 0.0, 1.0, *seeds(1), write_cfg=True, write_guided=True
    )
    ref_guided, ref_cfg = ssg_guidance_reference(logits, prev, operator, cfg_t, 0.7)
    assert rel_err(cfg, ref_cfg) < TOLERANCE[dtype] and rel_err(guided, ref_guided) < TOLERANCE[dtype]
    assert bits.dtype == torch.uint8 and bits.shape == (B, N, V // 2) and bool(((bits == 0) | (bits == 1)).all())
    assert nonfinite.dtype == torch.bool and nonfinite.shape == (1,) and not nonfinite.item()
    # both sides of a bit are drawn somewhere (the draw is not constant)
    assert 0 < bits.float().mean().item() < 1 or bits.numel() < 8


def test_outputs_only_where_asked_and_fresh():
    logits, prev, operator = make_inputs(2, 9, 4, 16)
    before = [t.clone() for t in (logits, prev, operator)]
    for write_cfg, write_guided in ((False, False), (True, False), (False, True)):
        bits, nonfinite, cfg, guided = guide_sample_bits_triton(
            logits, prev, operator, 1.5, 0.5, 0, 0.0, 1.0, *seeds(0), write_cfg=write_cfg, write_guided=write_guided
        )
        assert (cfg is not None) == write_cfg and (guided is not None) == write_guided
        ref_bits, *_ = guide_sample_bits_reference(logits, prev, operator, 1.5, 0.5, 0, 0.0, 1.0, write_cfg=write_cfg, write_guided=write_guided)
        assert bits.shape == ref_bits.shape
    assert all(torch.equal(a, b) for a, b in zip(before, (logits, prev, operator)))  # inputs untouched


# ---- deterministic rules: equal to today's sampler ---------------------------------------------------------------


@pytest.mark.parametrize("prior", [True, False])
@pytest.mark.parametrize("top_k", [0, 1, 2])
def test_bits_equal_guidance_then_sampler(prior, top_k):
    """Same counters and draw rule as sample_logits_triton on guided.view(-1, 2): the same bits for the same
    (seed, offset) (exact on the interpreter; on a GPU the separate kernels may round one ulp apart)."""
    logits, prev, operator = make_inputs(2, 12, 6, 18, seed=3)
    if not prior:
        prev = operator = None
    s, o = seeds(7, offset=2)
    bits, _, _, _ = guide_sample_bits_triton(logits, prev, operator, 2.0, 0.6, top_k, 0.0, 0.8, s, o)
    guided, _ = ssg_guidance_triton(logits, prev, operator, 2.0, 0.6)
    tokens = sample_logits_triton(guided.reshape(-1, 2), top_k, 0.0, 0.8, s, o).view_as(bits)
    agree = (tokens == bits.long()).float().mean().item()
    assert agree == 1.0 if INTERPRET else agree > 0.99


@pytest.mark.parametrize("temperature", [0.3, 1.0, 4.0])
def test_greedy_is_argmax_and_equals_reference(temperature):
    logits, prev, operator = make_inputs(3, 17, 9, 34, seed=4)
    bits, _, _, guided = guide_sample_bits_triton(logits, prev, operator, 1.5, 0.8, 1, 0.0, temperature, *seeds(0), write_guided=True)
    x0, x1 = bit_logits(guided, temperature)
    assert torch.equal(bits, (x1 > x0).to(torch.uint8))
    ref, _, _, _ = guide_sample_bits_reference(logits, prev, operator, 1.5, 0.8, 1, 0.0, temperature)
    assert torch.equal(bits, ref)


def test_greedy_tie_draws_both_sides():
    """top-k 1 keeps both sides of an exact tie (upstream's mask), so a tied bit is a fair coin."""
    logits = torch.zeros(2, 512, 2, device=DEVICE)
    bits, *_ = guide_sample_bits_triton(logits, None, None, 1.0, 0.0, 1, 0.0, 1.0, *seeds(3))
    assert abs(bits.float().mean().item() - 0.5) < Z * 0.5 / math.sqrt(512)


@pytest.mark.parametrize("top_p", [0.55, 0.8, 0.95])
def test_top_p_keeps_only_the_larger_side_where_the_reference_does(top_p):
    """Where the reference's top-p mask keeps one side, the bit is that side; elsewhere both sides occur."""
    logits, prev, operator = make_inputs(4, 64, 16, 8, seed=5, scale=0.7)
    bits, _, _, guided = guide_sample_bits_triton(logits, prev, operator, 1.0, 0.5, 0, top_p, 1.0, *seeds(1), write_guided=True)
    kept = top_k_top_p_mask_reference(guided.reshape(-1, 2), 0, top_p, 1.0)
    single = kept.sum(1) == 1
    assert 0 < single.float().mean().item() < 1  # both cases occur at this logit scale
    assert torch.equal(bits.reshape(-1)[single].long(), kept[single].long().argmax(1))
    assert 0 < bits.reshape(-1)[~single].float().mean().item() < 1
    ref, *_ = guide_sample_bits_reference(logits, prev, operator, 1.0, 0.5, 0, top_p, 1.0)
    assert torch.equal(ref.reshape(-1)[single], bits.reshape(-1)[single])


# ---- distribution ------------------------------------------------------------------------------------------------


def bernoulli_chi2(top_k: int, top_p: float, temperature: float, target_temperature: float) -> tuple:
    """Chi-square statistic of 8 bits (d = 8) x 4096 draws each (the same logits at every token) against the
    reference's kept-and-renormalised P(bit = 1) at ``target_temperature``. Returns (statistic, df = random bits)."""
    d, draws = 8, 4096
    pair = torch.tensor([[0.0, 0.1], [0.4, 0.0], [0.0, 0.9], [1.3, 0.0], [0.0, 2.0], [-0.2, 0.3], [0.0, -0.6], [2.5, 0.0]])
    logits = pair.reshape(1, 1, 2 * d).expand(2, draws, 2 * d).contiguous().to(DEVICE)  # B = 1, N = draws
    bits, *_ = guide_sample_bits_triton(logits, None, None, 0.0, 0.0, top_k, top_p, temperature, *seeds(11))
    ones = bits.reshape(-1, d).double().sum(0).cpu()
    kept = top_k_top_p_mask_reference(pair, top_k, top_p, target_temperature)
    p1 = (pair / target_temperature).masked_fill(~kept, float("-inf")).softmax(-1)[:, 1].double()
    n = bits.reshape(-1, d).shape[0]
    random = (p1 > 0) & (p1 < 1)
    assert torch.equal(ones[~random], (p1[~random] * n))  # the cut bits are constant
    var = n * p1[random] * (1 - p1[random])
    return float(((ones[random] - n * p1[random]) ** 2 / var).sum()), int(random.sum())


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 0.0, 1.0), (2, 0.0, 0.7), (0, 0.75, 1.0), (0, 0.9, 1.5)], ids=str)
def test_bit_frequencies_match_reference_probs(top_k, top_p, temperature):
    stat, df = bernoulli_chi2(top_k, top_p, temperature, temperature)
    assert df >= 3
    assert stat < chi2_critical(df), f"chi2={stat:.1f} with df={df}"


def test_chi2_check_detects_a_wrong_distribution():
    """Negative control: the same statistic against the wrong temperature fails."""
    stat, df = bernoulli_chi2(0, 0.0, 1.0, 1.25)
    assert stat > chi2_critical(df)


# ---- randomness: seed / offset / tiling --------------------------------------------------------------------------


def test_same_seed_and_offset_same_bits_other_offset_independent():
    logits = torch.zeros(2, 64, 32, device=DEVICE)  # fair coins: independent streams agree on half the bits
    a = guide_sample_bits_triton(logits, None, None, 1.0, 0.0, 0, 0.0, 1.0, *seeds(5, 3))[0]
    b = guide_sample_bits_triton(logits, None, None, 1.0, 0.0, 0, 0.0, 1.0, *seeds(5, 3))[0]
    assert torch.equal(a, b)
    n = a.numel()  # 1024
    for other in (seeds(5, 4), seeds(6, 3), seeds(5, 3 + 2**32)):
        c = guide_sample_bits_triton(logits, None, None, 1.0, 0.0, 0, 0.0, 1.0, *other)[0]
        assert abs((a == c).float().sum().item() - n / 2) < Z * math.sqrt(n) / 2


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_per_row_seeds_draw_each_image_from_its_own_key(backend):
    """seed (B,): image b's bits from key seed[b] with bit counters from 0 (per-row seeding), so they equal the bits of
    that image alone and do not depend on the other rows; the same guidance and sampler bits as sample_logits with the
    same keys on the bit rows."""
    logits, prev, operator = make_inputs(3, 10, 4, 16, seed=4, scale=0.3)
    keys = torch.tensor([5, 2**62 + 1, 5], dtype=torch.int64, device=DEVICE)
    offset = torch.tensor([2], dtype=torch.int64, device=DEVICE)
    draw = lambda lg, pv, sd: ops.guide_and_sample_bits(lg, pv, operator, 1.5, 0.5, 0, 0.9, 1.0, sd, offset, backend=backend)[0]
    together = draw(logits, prev, keys)
    for b in range(3):
        alone = draw(logits[[b, 3 + b]], prev[b : b + 1], keys[b : b + 1])
        assert torch.equal(alone[0], together[b])
    n = together[0].numel()  # 80 fair-ish bits: the two keys agree on about half of them
    assert (together[0] == together[1]).sum().item() < n * 0.8
    guided, _ = ops.ssg_guidance(logits, prev, operator, 1.5, 0.5, backend=backend)
    tokens = ops.sample_logits(guided.view(3, -1, 2), 0, 0.9, 1.0, keys, offset, backend=backend)
    agree = (tokens.reshape(-1) == together.reshape(-1).long()).float().mean().item()
    assert agree == 1.0 if INTERPRET or backend == "reference" else agree > 0.99  # a GPU's kernels may round one ulp apart


@pytest.mark.parametrize("prior", [True, False])
def test_bits_do_not_depend_on_tiles(prior):
    """Philox counters come from logical bit indices: other BLOCK_N / BLOCK_V give the same bits."""
    logits, prev, operator = make_inputs(2, 40, 16, 36, seed=8)
    if not prior:
        prev = operator = None
    launch, outputs = guide_sample_bits_launch(logits, prev, operator, 1.5, 0.5, 0, 0.0, 1.0, *seeds(2))
    launch.run()
    blocks = dict(BLOCK_N=16, BLOCK_V=16) if prior else dict(BLOCK_N=4, BLOCK_V=32)
    assert any(launch.constexprs[k] != v for k, v in blocks.items())
    other, other_outputs = guide_sample_bits_launch(logits, prev, operator, 1.5, 0.5, 0, 0.0, 1.0, *seeds(2))
    grid = (-(-36 // blocks["BLOCK_V"]), -(-40 // blocks["BLOCK_N"]), 2)
    KernelLaunch(other.kernel, grid, other.args, dict(other.constexprs, **blocks), other.num_warps).run()
    assert torch.equal(outputs[0], other_outputs[0])


# ---- non-finite logits -------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) warns on the inf / NaN arithmetic
@pytest.mark.parametrize("bad,temperature", [(float("nan"), 1.0), (float("inf"), 1.0), (1e37, 0.01)], ids=["nan", "inf", "overflow"])
def test_nonfinite_flag(bad, temperature):
    logits, prev, operator = make_inputs(2, 9, 4, 16)
    logits[1, 8, 15] = bad  # the last token and channel of image 1 (edge of the tile)
    for fn in (guide_sample_bits_triton, guide_sample_bits_reference):
        extra = seeds(0) if fn is guide_sample_bits_triton else ()
        _, nonfinite, _, _ = fn(logits, prev, operator, 0.0, 0.5, 0, 0.0, temperature, *extra)
        assert nonfinite.tolist() == [True], fn.__name__
    logits[1, 8, 15] = 1.0
    _, nonfinite, _, _ = guide_sample_bits_triton(logits, prev, operator, 0.0, 0.5, 0, 0.0, temperature, *seeds(0))
    assert nonfinite.tolist() == [False]


# ---- input validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(logits_2B=torch.zeros(4, 3, 15), prev=None, operator=None), "logits_2B has V=15 channels; expected 2 per bit"),
        (dict(logits_2B=torch.zeros(3, 3, 16)), "logits_2B has 3 rows in dim 0"),
        (dict(logits_2B=torch.zeros(4, 16)), "logits_2B must be a (2B, N, V) tensor"),
        (dict(logits_2B=torch.zeros(4, 3, 16, dtype=torch.float64)), "logits_2B dtype torch.float64 is not supported"),
        (dict(prev=torch.zeros(2, 2, 14)), "prev has shape (2, 2, 14)"),
        (dict(operator=torch.zeros(3, 5)), "operator has shape (3, 5)"),
        (dict(beta=torch.zeros(3)), "beta has shape (3,)"),
        (dict(top_k=-1), "top_k must be an int >= 0"),
        (dict(top_p=1.5), "top_p must be a number in [0, 1]"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(seed=torch.tensor([1], dtype=torch.int32)), "seed must be an int64 tensor of shape (1,)"),
        (dict(offset=5), "offset must be an int64 tensor of shape (1,); got int"),
        (dict(seed=torch.tensor([1, 2, 3, 4])), "seed has 4 keys; give 1, or one per image row (2)"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_inputs(kwargs, message):
    args = dict(logits_2B=torch.zeros(4, 3, 16), prev=torch.zeros(2, 2, 16), operator=torch.zeros(3, 2), cfg_t=1.0, beta=0.5,
                top_k=0, top_p=0.9, temperature=1.0, seed=torch.tensor([1]), offset=torch.tensor([0]))
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        guide_sample_bits_triton(**args)
    assert message in str(info.value)
    if not {"seed", "offset"} & set(kwargs) and "not supported" not in message:  # the reference shares the checker
        with pytest.raises(ValueError, match=re.escape(message)):
            guide_sample_bits_reference(**{k: v for k, v in args.items() if k not in ("seed", "offset")})


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU-without-interpreter error")
def test_kernel_needs_cuda_unless_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        guide_sample_bits_triton(*make_inputs(1, 4, 1, 16), 1.0, 0.5, 0, 0.0, 1.0, *seeds(0))


# ---- ops.guide_and_sample_bits: the backend switch ---------------------------------------------------------------


@pytest.fixture
def recorded(spy_backends):
    return spy_backends(impl, "guide_sample_bits_reference", "guide_sample_bits_triton")


@pytest.mark.parametrize("backend,expected", [("reference", "reference"), ("triton", "triton"), ("auto", "triton")])
def test_ops_dispatch(recorded, backend, expected):
    logits, prev, operator = make_inputs(2, 9, 4, 16)
    bits, nonfinite, cfg, guided = ops.guide_and_sample_bits(logits, prev, operator, 1.5, 0.5, 1, 0.0, 1.0, *seeds(1), backend=backend)
    assert recorded == [expected]  # auto picks triton under TRITON_INTERPRET=1 or on CUDA
    ref_guided, ref_cfg = ssg_guidance_reference(logits, prev, operator, 1.5, 0.5)
    assert guided is None and rel_err(cfg, ref_cfg) < 1e-5 and not nonfinite.item()
    x0, x1 = bit_logits(ref_guided, 1.0)
    assert torch.equal(bits, (x1 > x0).to(torch.uint8))


def test_ops_reference_backend_draws_todays_bits(recorded):
    """The reference backend draws the bits of ops.ssg_guidance then ops.sample_logits (the Engine's path before the
    fusion), from the same seed and offset."""
    logits, prev, operator = make_inputs(2, 9, 4, 16, scale=0.3)
    bits, *_ = ops.guide_and_sample_bits(logits, prev, operator, 1.5, 0.5, 0, 0.9, 1.0, *seeds(5, 3), backend="reference")
    guided, _ = ops.ssg_guidance(logits, prev, operator, 1.5, 0.5, backend="reference")
    tokens = ops.sample_logits(guided.view(2, -1, 2), 0, 0.9, 1.0, *seeds(5, 3), backend="reference")
    assert torch.equal(bits.reshape(-1).long(), tokens.reshape(-1))
    other, *_ = ops.guide_and_sample_bits(logits, prev, operator, 1.5, 0.5, 0, 0.9, 1.0, *seeds(5, 4), backend="reference")
    assert not torch.equal(bits, other)
    generator = torch.Generator(device=logits.device).manual_seed(5 * 1_000_003 + 3)
    assert torch.equal(bits.reshape(-1).long(), sample_logits_reference(guided.reshape(-1, 2), 0, 0.9, 1.0, generator))


def test_ops_env_override_and_invalid_backend(recorded, monkeypatch):
    inputs = make_inputs(1, 4, 1, 16)
    monkeypatch.setenv("SSG_ENGINE_BACKEND", "reference")
    ops.guide_and_sample_bits(*inputs, 1.0, 0.5, 0, 0.0, 1.0, *seeds(0), backend="triton")
    assert recorded == ["reference"]
    monkeypatch.setenv("SSG_ENGINE_BACKEND", "nope")
    with pytest.raises(ValueError, match="environment variable SSG_ENGINE_BACKEND 'nope'"):
        ops.guide_and_sample_bits(*inputs, 1.0, 0.5, 0, 0.0, 1.0, *seeds(0))
    assert recorded == ["reference"]


# ---- compiled kernel on a GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_gpu_infinity_2b_shape(dtype):
    """Infinity-2B's last scale (64x64 tokens, d = 32) at batch 8, prior from the 48x48 scale: outputs within the
    table, greedy bits = argmax, top-p bits inside the reference mask."""
    logits, prev, operator = make_inputs(8, 64 * 64, 48 * 48, 64, dtype, seed=12)
    bits, nonfinite, cfg, guided = guide_sample_bits_triton(logits, prev, operator, 3.0, 0.5, 1, 0.0, 1.0, *seeds(0), write_guided=True)
    ref_guided, ref_cfg = ssg_guidance_reference(logits, prev, operator, 3.0, 0.5)
    assert rel_err(cfg, ref_cfg) < TOLERANCE[dtype] and rel_err(guided, ref_guided) < TOLERANCE[dtype]
    x0, x1 = bit_logits(guided, 1.0)
    assert torch.equal(bits, (x1 > x0).to(torch.uint8)) and not nonfinite.item()
    bits, *_ = guide_sample_bits_triton(logits, prev, operator, 3.0, 0.5, 0, 0.9, 1.0, *seeds(1))
    kept = top_k_top_p_mask_reference(guided.reshape(-1, 2), 0, 0.9, 1.0)
    assert kept.gather(1, bits.reshape(-1, 1).long()).all()


@pytest.mark.gpu
@requires_gpu
def test_gpu_graph_replay_reads_seed_and_offset_on_device():
    logits, prev, operator = make_inputs(4, 256, 144, 64, seed=13)
    seed, offset = seeds(0, 0)
    beta = torch.full((4,), 0.5, device=DEVICE)
    run = lambda: guide_sample_bits_triton(logits, prev, operator, 3.0, beta, 0, 0.9, 1.0, seed, offset)  # noqa: E731
    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for s, o in ((1, 0), (1, 5), (2, 5)):
        seed.fill_(s)
        offset.fill_(o)
        graph.replay()
        eager = run()
        assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
