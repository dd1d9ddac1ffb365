"""Top-k / top-p sampler kernel vs the upstream-VAR mask reference, plus ``ops.sample_logits``.

Statistical tests use fixed seeds (deterministic runs) and state their thresholds.
Logits are continuous random values, so exact float ties (where the kernel's top-p
mask may keep a few more tied entries than the reference's sort) have probability 0.
"""
import functools
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'ssg-engine[triton]')")

from ssg_engine import ops  # noqa: E402
from ssg_engine.kernels import sampling as impl  # noqa: E402
from ssg_engine.kernels.sampling import (  # noqa: E402
    sample_logits_reference,
    sample_logits_triton,
    top_k_top_p_mask_reference,
)

from conftest import kernel_test_settings  # noqa: E402

INTERPRET, DEVICE, requires_gpu = kernel_test_settings()

# chi-square goodness of fit: reject when the statistic exceeds the quantile for p = 1e-4
CHI2_Z = 3.719  # standard normal quantile of 1 - 1e-4


def chi2_critical(df: int, z: float = CHI2_Z) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_statistic(counts: torch.Tensor, probs: torch.Tensor) -> tuple:
    """Pearson's statistic over bins with expected count >= 5 (the rest pooled); returns (stat, df)."""
    expected = probs.double() * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    return stat, int(keep.sum()) - 1


def seeds(seed: int, offset: int = 0):
    return (torch.tensor([seed], dtype=torch.int64, device=DEVICE), torch.tensor([offset], dtype=torch.int64, device=DEVICE))


def rand_logits(R, V, seed=0, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(R, V, generator=g) * scale).to(dtype).to(DEVICE)


def reference_probs(logits, top_k, top_p, temperature):
    kept = top_k_top_p_mask_reference(logits, top_k, top_p, temperature)
    return (logits.float() / temperature).masked_fill(~kept, float("-inf")).softmax(-1), kept


def in_mask(tokens, kept):
    return kept.gather(1, tokens[:, None]).squeeze(1)


def with_boundary_ties(logits, kept, temperature):
    """``kept`` plus entries exactly tied with a row's smallest kept value.

    The reference's sort splits an exact tie at the top-p cut by position; the kernel
    keeps or removes tied values together. Only low-precision inputs produce such ties.
    """
    x = logits.float() / temperature
    boundary = x.masked_fill(~kept, float("inf")).min(dim=1, keepdim=True).values
    return kept | (x == boundary)


# ---- the reference is upstream VAR's filter -------------------------------------------


def test_reference_top_k_keeps_ties():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    kept = top_k_top_p_mask_reference(logits, 2, 0.0, 1.0)
    assert kept.tolist() == [[True, False, True, True, False]]  # both entries tied at the 2nd value


def test_reference_top_p_rule():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # ascending cumsum 0.05, 0.2, 0.5, 1.0; remove <= 1 - 0.6 = 0.4 -> remove 0.05 and 0.15
    assert top_k_top_p_mask_reference(probs.log(), 0, 0.6, 1.0).tolist() == [[True, True, False, False]]
    # top_p tiny: only the largest survives (it is never removed)
    assert top_k_top_p_mask_reference(probs.log(), 0, 1e-6, 1.0).tolist() == [[True, False, False, False]]


def test_reference_disabled_filters():
    logits = rand_logits(4, 37, seed=1, dtype=torch.float32).cpu()
    for top_k in (0, 37, 100):
        assert top_k_top_p_mask_reference(logits, top_k, 0.0, 1.0).all()


# ---- kernel draws stay inside the reference mask --------------------------------------


@pytest.mark.parametrize(
    "R,V,top_k,top_p,temperature,dtype",
    [
        (256, 67, 5, 0.0, 1.0, torch.float32),
        (256, 67, 0, 0.8, 0.7, torch.float32),
        (256, 67, 20, 0.9, 1.3, torch.float32),
        (128, 300, 50, 0.95, 1.0, torch.bfloat16),
        (128, 300, 300, 0.5, 2.0, torch.float16),
        (8, 5000, 900, 0.95, 1.0, torch.float32),  # two chunks per row
    ],
    ids=str,
)
def test_draws_inside_mask(R, V, top_k, top_p, temperature, dtype):
    logits = rand_logits(R, V, seed=V + top_k, dtype=dtype)
    kept = top_k_top_p_mask_reference(logits, top_k, top_p, temperature)
    if dtype != torch.float32:
        kept = with_boundary_ties(logits, kept, temperature)
    for seed in range(3):
        tokens = sample_logits_triton(logits, top_k, top_p, temperature, *seeds(seed, offset=seed * 7))
        assert tokens.dtype == torch.int64 and tokens.shape == (R,)
        assert ((tokens >= 0) & (tokens < V)).all()
        assert in_mask(tokens, kept).all()


def test_vocab_65536_single_row():
    logits = rand_logits(2, 65536, seed=3)
    kept = top_k_top_p_mask_reference(logits, 900, 0.95, 1.0)
    tokens = sample_logits_triton(logits, 900, 0.95, 1.0, *seeds(0))
    assert in_mask(tokens, kept).all()


def test_top_k_1_is_argmax():
    logits = rand_logits(256, 300, seed=4)
    for temperature in (0.5, 1.0, 3.0):
        tokens = sample_logits_triton(logits, 1, 0.0, temperature, *seeds(1))
        assert torch.equal(tokens, logits.argmax(-1))


def test_top_k_1_tied_maxima_draws_all_of_them():
    """Upstream keeps every entry tied with the k-th value, so ties at the max are drawn uniformly."""
    logits = rand_logits(1, 40, seed=5).repeat(512, 1)
    logits[:, 7] = logits[:, 30] = logits.max() + 1.0
    tokens = sample_logits_triton(logits, 1, 0.0, 1.0, *seeds(2))
    assert set(tokens.tolist()) == {7, 30}
    assert 0.4 < (tokens == 7).float().mean().item() < 0.6  # 512 fair draws: 6 sigma band is +-0.13


# ---- distribution -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "top_k,top_p,temperature", [(0, 0.0, 1.0), (20, 0.9, 0.8), (0, 0.7, 1.5)], ids=["plain", "top-k+top-p", "top-p"]
)
def test_frequencies_match_renormalised_probs(top_k, top_p, temperature):
    """20480 draws of one V=32 row; chi-square test at p = 1e-4 against the reference probs."""
    V, draws = 32, 20480
    row = rand_logits(1, V, seed=6, scale=1.5)
    probs, kept = reference_probs(row, top_k, top_p, temperature)
    tokens = sample_logits_triton(row.expand(draws, V), top_k, top_p, temperature, *seeds(11))
    counts = torch.bincount(tokens.cpu(), minlength=V)
    assert (counts[~kept[0].cpu()] == 0).all()
    stat, df = chi2_statistic(counts, probs[0].cpu())
    assert df >= 2
    assert stat < chi2_critical(df), f"chi2={stat:.1f} with df={df}"
    # every kept entry with an expected count >= 20 shows up (the top-p boundary entry included)
    assert (counts[probs[0].cpu() * draws >= 20] > 0).all()


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9, 0.99])
def test_top_p_early_stop_keeps_exactly_the_reference_set(top_p):
    """The top-p search stops once its bracket holds one entry; the kept set is still the reference's:
    8192 draws of one V=32 row hit every kept entry (each expected >= 20 times) and nothing else."""
    V, draws = 32, 8192
    row = rand_logits(1, V, seed=14, scale=1.5)
    probs, kept = reference_probs(row, 0, top_p, 1.0)
    assert probs[0][kept[0]].min() * draws >= 20  # the boundary entry is visible at this many draws
    tokens = sample_logits_triton(row.expand(draws, V), 0, top_p, 1.0, *seeds(4))
    assert set(tokens.tolist()) == set(kept[0].nonzero().flatten().tolist())


def test_chi2_check_detects_a_wrong_distribution():
    """The statistic above is not vacuous: draws at the wrong temperature fail it."""
    V, draws = 32, 20480
    row = rand_logits(1, V, seed=6, scale=1.5)
    probs, _ = reference_probs(row, 0, 0.0, 1.0)
    tokens = sample_logits_triton(row.expand(draws, V), 0, 0.0, 1.2, *seeds(11))
    stat, df = chi2_statistic(torch.bincount(tokens.cpu(), minlength=V), probs[0].cpu())
    assert stat > chi2_critical(df)


def test_temperature_effect():
    logits = rand_logits(1, 64, seed=8).expand(2048, 64)
    cold = sample_logits_triton(logits, 0, 0.0, 0.02, *seeds(3))
    hot = sample_logits_triton(logits, 0, 0.0, 1000.0, *seeds(3))
    assert (cold == logits[0].argmax()).float().mean() > 0.99
    # near uniform: each of 64 tokens expected 32 times; all appear and none dominates
    counts = torch.bincount(hot.cpu(), minlength=64)
    assert (counts > 0).all() and counts.max() < 70


# ---- randomness: seed / offset -------------------------------------------------------------


def test_same_seed_and_offset_same_tokens_different_offset_new_stream():
    logits = rand_logits(1, 32, seed=9, scale=0.1).expand(512, 32)  # close to uniform
    a = sample_logits_triton(logits, 0, 0.0, 1.0, *seeds(5, offset=3))
    b = sample_logits_triton(logits, 0, 0.0, 1.0, *seeds(5, offset=3))
    c = sample_logits_triton(logits, 0, 0.0, 1.0, *seeds(5, offset=4))
    d = sample_logits_triton(logits, 0, 0.0, 1.0, *seeds(6, offset=3))
    e = sample_logits_triton(logits, 0, 0.0, 1.0, *seeds(5, offset=3 + 2**32))  # high word of the offset
    assert torch.equal(a, b)
    # independent streams agree on a row with probability ~1/32: expect ~16 of 512
    for other in (c, d, e):
        assert (a == other).sum() < 48
    assert len(set(a.tolist())) > 25  # rows of one call use different counters


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_per_row_seeds_draw_each_block_from_its_own_key(backend):
    """seed (S,): block s of R / S rows draws from key seed[s] with counters from 0, so a block's tokens do not depend on
    the other blocks, their number or its place (per-row seeding). S = 1 is the batch rule (counter = row)."""
    V, n = 32, 64  # 4 images of 64 draws each
    logits = rand_logits(1, V, seed=9, scale=0.1).expand(4 * n, V)
    keys = torch.tensor([11, 2**62 + 5, 7, 11], dtype=torch.int64, device=DEVICE)
    offset = torch.tensor([3], dtype=torch.int64, device=DEVICE)
    draw = functools.partial(ops.sample_logits, top_k=0, top_p=0.0, temperature=1.0, offset=offset, backend=backend)
    together = draw(logits, seed=keys).view(4, n)
    for b in range(4):  # each block alone, and block b second in a batch of two with another key
        assert torch.equal(draw(logits[:n], seed=keys[b : b + 1]), together[b])
        pair = draw(logits[: 2 * n], seed=torch.stack((keys[(b + 1) % 4] + 1, keys[b]))).view(2, n)
        assert torch.equal(pair[1], together[b])
    assert torch.equal(together[0], together[3])  # same key, same draws
    assert (together[0] == together[1]).sum() < 12 and (together[0] == together[2]).sum() < 12  # ~2 of 64 by chance
    batch = draw(logits, seed=keys[:1]).view(4, n)  # S = 1: one stream over all rows
    assert torch.equal(batch[0], together[0]) and (batch[3] == together[3]).sum() < 12


# ---- input validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(top_k=-1), "top_k must be an int >= 0"),
        (dict(top_k=2.5), "top_k must be an int >= 0"),
        (dict(top_p=1.5), "top_p must be a number in [0, 1]"),
        (dict(top_p=-0.1), "top_p must be a number in [0, 1]"),
        (dict(top_p=float("nan")), "top_p must be a number in [0, 1]"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(temperature=-1.0), "temperature must be a finite number > 0"),
        (dict(temperature=float("inf")), "temperature must be a finite number > 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
        (dict(seed=torch.tensor([1], dtype=torch.int32)), "seed must be an int64 tensor of shape (1,)"),
        (dict(seed=torch.tensor([1, 2, 3])), "seed has 3 keys for 4 rows"),
        (dict(seed=torch.zeros(2, 1, dtype=torch.int64)), "seed must be an int64 tensor of shape (1,) or (S,)"),
        (dict(offset=torch.tensor(0)), "offset must be an int64 tensor of shape (1,)"),
        (dict(offset=5), "offset must be an int64 tensor of shape (1,); got int"),
        (dict(seed=torch.zeros(1, dtype=torch.int64, device="meta")), "seed is on meta"),
        (dict(logits=torch.zeros(32)), "logits must be a floating-point (R, V) tensor"),
        (dict(logits=torch.zeros(4, 32, dtype=torch.int64)), "logits must be a floating-point (R, V) tensor"),
        (dict(logits=torch.zeros(4, 32, dtype=torch.float64)), "torch.float64 is not supported by the kernel"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_inputs(kwargs, message):
    args = dict(logits=torch.zeros(4, 32), top_k=5, top_p=0.9, temperature=1.0,
                seed=torch.tensor([1]), offset=torch.tensor([0]))
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        sample_logits_triton(**args)
    assert message in str(info.value)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU-without-interpreter error")
def test_kernel_needs_cuda_unless_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        sample_logits_triton(rand_logits(2, 16), 0, 0.0, 1.0, *seeds(0))


# ---- ops.sample_logits: the backend switch --------------------------------------------------


@pytest.fixture
def recorded(spy_backends):
    return spy_backends(impl, "sample_logits_reference", "sample_logits_triton")


@pytest.mark.parametrize("backend,expected", [("reference", "reference"), ("triton", "triton"), ("auto", "triton")])
def test_ops_dispatch_and_shapes(recorded, backend, expected):
    logits = rand_logits(6, 67, seed=10).reshape(2, 3, 67)
    kept = top_k_top_p_mask_reference(logits.reshape(6, 67), 10, 0.9, 1.0)
    tokens = ops.sample_logits(logits, 10, 0.9, 1.0, *seeds(1), backend=backend)
    assert recorded == [expected]
    assert tokens.shape == (2, 3) and tokens.dtype == torch.int64
    assert in_mask(tokens.reshape(6), kept).all()


def test_ops_reference_backend_is_seeded_by_seed_and_offset(recorded):
    logits = rand_logits(1, 32, seed=9, scale=0.1).expand(256, 32)
    a = ops.sample_logits(logits, 0, 0.0, 1.0, *seeds(5, 3), backend="reference")
    b = ops.sample_logits(logits, 0, 0.0, 1.0, *seeds(5, 3), backend="reference")
    c = ops.sample_logits(logits, 0, 0.0, 1.0, *seeds(5, 4), backend="reference")
    generator = torch.Generator(device=logits.device).manual_seed(5 * 1_000_003 + 3)
    assert torch.equal(a, sample_logits_reference(logits, 0, 0.0, 1.0, generator))
    assert torch.equal(a, b) and (a == c).sum() < 32


def test_ops_env_override_and_invalid_backend(recorded, monkeypatch):
    logits = rand_logits(2, 16)
    monkeypatch.setenv("SSG_ENGINE_BACKEND", "reference")
    ops.sample_logits(logits, 0, 0.0, 1.0, *seeds(0), backend="triton")
    assert recorded == ["reference"]
    monkeypatch.setenv("SSG_ENGINE_BACKEND", "nope")
    with pytest.raises(ValueError, match="environment variable SSG_ENGINE_BACKEND 'nope'"):
        ops.sample_logits(logits, 0, 0.0, 1.0, *seeds(0))
    monkeypatch.delenv("SSG_ENGINE_BACKEND")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ops.sample_logits(logits, 0, 0.0, 1.0, *seeds(0), backend="gpu")


# ---- compiled kernel on a GPU -------------------------------------------------------------


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_var_shape_in_mask(dtype):
    logits = rand_logits(4096, 4096, seed=12, dtype=dtype)
    kept = top_k_top_p_mask_reference(logits, 900, 0.95, 1.0)
    if dtype != torch.float32:
        kept = with_boundary_ties(logits, kept, 1.0)
    for seed in range(3):
        assert in_mask(sample_logits_triton(logits, 900, 0.95, 1.0, *seeds(seed)), kept).all()


@pytest.mark.gpu
@requires_gpu
def test_gpu_frequencies():
    """200000 draws of one V=32 row on the compiled kernel; chi-square at p = 1e-4."""
    row = rand_logits(1, 32, seed=6, scale=1.5)
    probs, _ = reference_probs(row, 20, 0.9, 0.8)
    tokens = sample_logits_triton(row.expand(200_000, 32), 20, 0.9, 0.8, *seeds(2))
    stat, df = chi2_statistic(torch.bincount(tokens.cpu(), minlength=32), probs[0].cpu())
    assert stat < chi2_critical(df), f"chi2={stat:.1f} with df={df}"


@pytest.mark.gpu
@requires_gpu
def test_gpu_per_row_seeds_in_a_cuda_graph():
    """The compiled kernel reads seed[block] on the device: a captured graph replays new row seeds, and a block's draws
    equal the same key's draws alone."""
    logits = rand_logits(4 * 256, 4096, seed=14)
    seed, offset = torch.tensor([1, 2, 3, 4], device=DEVICE), torch.tensor([5], device=DEVICE)
    sample_logits_triton(logits, 900, 0.95, 1.0, seed, offset)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = sample_logits_triton(logits, 900, 0.95, 1.0, seed, offset)
    seed.copy_(torch.tensor([9, 8, 7, 6]))
    graph.replay()
    alone = sample_logits_triton(logits[512:768], 900, 0.95, 1.0, seed[2:3], offset)
    assert torch.equal(tokens[512:768], alone)


@pytest.mark.gpu
@requires_gpu
def test_gpu_cuda_graph_replay_advances_with_offset():
    logits = rand_logits(64, 4096, seed=13)
    seed, offset = seeds(7, 0)
    sample_logits_triton(logits, 900, 0.95, 1.0, seed, offset)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = sample_logits_triton(logits, 900, 0.95, 1.0, seed, offset)
    draws = []
    for step in range(3):
        offset.fill_(step)
        graph.replay()
        draws.append(tokens.clone())
        assert torch.equal(draws[-1], sample_logits_triton(logits, 900, 0.95, 1.0, seed, offset))
    assert not torch.equal(draws[0], draws[1])
