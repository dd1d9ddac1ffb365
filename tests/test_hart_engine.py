"""The HART Engine against the reference loop (CPU, float32, the golden tiny models a_d2 and b_d3).

The oracle is the reference sampler's loop (``run_scales`` with upstream's ``ConcatKVCache``, the reference guidance
op and ``HARTTransformer`` as is) given the Engine's tokens, MaskGIT orders and diffusion noise source: the logits
agree to float32 summation order (< 1e-5 norm-relative, on the reference and the Triton backend), the last scale's
diffusion residual and the images too; greedy (top-k 1) tokens are identical; SSG on every scale >= 1 included.
``more_smooth``: given forced tokens and forced Gumbel noise, the Engine's logits and soft embeddings are the reference
sampler's (``sample_hart_reference``, its draws replaced by the same tokens and noise); the seeded Gumbel draw is
checked for its distribution (moments, Gumbel-max frequencies).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

import ssg_engine as se
from ssg_engine import SSG
from ssg_engine.engine import Engine, _request_key, _StaticBatch
from ssg_engine.families.hart.loading import load_hart
from ssg_engine.families.hart.model import HARTCondition
from ssg_engine.families.hart import sampler as hart_sampler
from ssg_engine.families.hart.request import SeededNoise, seeded_gumbel, seeded_normal, seeded_orders, seeded_uniform
from ssg_engine.families.hart.sampler import cfg_weights, sample_hart_reference
from ssg_engine.families.hart.text import HARTTextFeatures
from ssg_engine.kernels.ssg_guidance import ssg_guidance_reference
from ssg_engine.params import HARTParams
from ssg_engine.pipeline import ConcatKVCache, Guidance, guidance_schedule, run_scales
from ssg_engine.seeding import row_seeds

GOLDEN = Path(__file__).parent / "golden" / "hart"
TOL = 1e-5
TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


@pytest.fixture(scope="module")
def pairs():
    return {name: load_hart(GOLDEN / name) for name in ("a_d2", "b_d3")}


def features(name: str) -> HARTTextFeatures:
    from safetensors.torch import load_file

    g = load_file(str(GOLDEN / name / "golden.safetensors"))
    return HARTTextFeatures(g["ctx.tensor"], g["ctx.mask"], g["ctx.position_ids"])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def reference(model, text: HARTTextFeatures, params: HARTParams, seed: int, tokens: List[torch.Tensor]) -> Tuple[list, object, torch.Tensor]:
    """The reference loop given ``tokens`` and the Engine's seeded orders/noise: (guided logits per scale, state, images)."""
    K, B = len(model.patch_nums), text.batch
    weights = cfg_weights(params.cfg, K)
    guide = Guidance(guidance_schedule(params.cfg, params.ssg, model.scale_sizes(), "cpu", cfg_ts=weights), params.ssg, ssg_guidance_reference)
    seed_t = torch.tensor([seed])
    orders = seeded_orders(seed_t, B, model.patch_nums[-1] ** 2) if params.num_maskgit_iters > 1 else None
    state = model.condition(HARTCondition(text.context, text.context_mask, text.context_position_ids, weights[-1],
                                          SeededNoise(seed_t), True, params.num_maskgit_iters, orders))
    logits = []

    def pick(si, logits_2B):
        guided, _ = guide(si, logits_2B)
        logits.append(guided / params.temperature)
        return tokens[si], None

    images, _ = run_scales(model, state, ConcatKVCache(model.depth), pick)
    return logits, state, images


def watch_inputs(monkeypatch, model) -> dict:
    """Record what ``model``'s class gets fed: ``"state"`` (the last), ``"inputs"`` (the embeddings (B, l, Cvae) per scale)."""
    captured = {"inputs": []}
    step = type(model).next_input_embeddings

    def spy(m, state, si, h):  # keep the state to read the residual
        captured["state"] = state
        captured["inputs"].append(h.clone())
        return step(m, state, si, h)

    monkeypatch.setattr(type(model), "next_input_embeddings", spy)
    return captured


def engine_run(engine: Engine, text: HARTTextFeatures, params: HARTParams, seed: int, forced=None, gumbels=None):
    request, cond, params = engine.bind(text, params)
    with pytest.MonkeyPatch.context() as mp:
        captured = watch_inputs(mp, request.model)
        images, tokens, bad = engine.run_batch(cond, torch.tensor([seed]), params, model=request, forced_tokens=forced,
                                               forced_gumbels=gumbels, record_logits=True)
    return images, tokens, bad, [g for _, g in engine.last_logits], captured["state"]


# the Triton kernels on the CPU interpreter: 40-60 s a case
BACKENDS = ["reference"] + ([pytest.param("triton", marks=pytest.mark.slow)] if TRITON else [])
CASES = [("a_d2", 1), ("b_d3", 1), ("a_d2", 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,iters", CASES)
def test_logits_residual_images_match_reference_given_tokens(name, iters, backend, pairs):
    model, tok = pairs[name]
    text = features(name)
    params = HARTParams(cfg=3.0, top_k=None, top_p=0.9, temperature=1.5, seed=5, num_maskgit_iters=iters,
                        ssg=SSG(beta=0.4))
    engine = Engine(model, tok, max_batch=4, device="cpu", dtype=torch.float32, backend=backend)
    images, tokens, bad, logits, state = engine_run(engine, text, params, 5)
    assert not bad.any()
    ref_logits, ref_state, ref_images = reference(model, text, params, 5, tokens)
    assert len(logits) == len(ref_logits) == len(model.patch_nums)
    for si, (a, b) in enumerate(zip(logits, ref_logits)):
        assert rel(a, b) < TOL, f"scale {si}: {rel(a, b):.2e}"
    assert rel(state.residual, ref_state.residual) < TOL
    assert rel(images, ref_images) < TOL


@pytest.mark.parametrize("name,iters", CASES)
def test_greedy_tokens_identical(name, iters, pairs):
    backend = "reference"  # the Triton path: logits above; its greedy draw is the kernel's (tests/test_fused_engine.py)
    model, tok = pairs[name]
    text = features(name)
    params = HARTParams(cfg=2.0, top_k=1, seed=3, num_maskgit_iters=iters, ssg=SSG(beta=0.3))
    engine = Engine(model, tok, max_batch=4, device="cpu", dtype=torch.float32, backend=backend)
    _, tokens, _, _, _ = engine_run(engine, text, params, 3)
    ref_logits, _, _ = reference(model, text, params, 3, tokens)
    for si, (t, g) in enumerate(zip(tokens, ref_logits)):
        assert torch.equal(t, g.argmax(-1)), f"scale {si}"


def test_generate_with_engine_is_seeded_and_padded(pairs):
    model, tok = pairs["a_d2"]
    text = features("a_d2")
    engine = Engine(model, tok, max_batch=4, device="cpu", dtype=torch.float32, backend="reference")
    images, tokens = se.generate(model, tok, text, engine=engine, seed=11, cfg=2.0, return_tokens=True)
    again = engine.generate(text, HARTParams(cfg=2.0), row_seeds=row_seeds(11, text.batch))  # generate's per-row keys
    assert images.shape[0] == text.batch and torch.equal(images, again[0])
    assert all(torch.equal(a, b) for a, b in zip(tokens, again[1]))
    other = engine.generate(text, HARTParams(seed=12, cfg=2.0))
    assert not torch.equal(images, other[0]) and not torch.equal(other[0], engine.generate(text, HARTParams(seed=11, cfg=2.0))[0])
    # one prompt alone (bucket 1) gives what it gives in the batch of two (bucket 2): the padded row changes nothing
    # for the others but the seeded draws are per row index, so compare the first row only
    first = engine.generate(text[:1], HARTParams(seed=11, cfg=2.0, top_k=1))
    both = engine.generate(text, HARTParams(seed=11, cfg=2.0, top_k=1))
    assert torch.equal(first[1][0], both[1][0][:1])


def test_seeded_draws():
    seed = torch.tensor([123])
    u = seeded_uniform(seed, 0, (4096,))
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.03
    assert torch.equal(u, seeded_uniform(seed, 0, (4096,)))
    assert not torch.equal(u, seeded_uniform(seed, 1, (4096,))) and not torch.equal(u, seeded_uniform(torch.tensor([124]), 0, (4096,)))
    z = seeded_normal(seed, 3, (8192,))
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
    orders = seeded_orders(seed, 3, 16)
    assert torch.equal(orders.sort(1).values, torch.arange(16).expand(3, 16)) and not torch.equal(orders[0], orders[1])


SMOOTH_CASES = [("a_d2", dict(top_k=None, top_p=0.9, temperature=1.5)), ("b_d3", dict(top_k=50, top_p=0.0, temperature=0.8))]


@pytest.mark.parametrize("name,sampling", SMOOTH_CASES)
def test_more_smooth_logits_and_soft_embeddings_match_reference(name, sampling, pairs, monkeypatch):
    """Forced tokens and forced Gumbel noise in both: the sampled logits and the soft embeddings fed at every scale
    agree (< TOL); the diffusion head is conditioned on the hard codes. The reference is ``sample_hart_reference``
    itself (one MaskGIT pass: its one draw per scale in grid order), its token draw and Gumbel noise replaced."""
    model, tok = pairs[name]
    text = features(name)
    B, V, sizes = text.batch, model.V, model.scale_sizes()
    params = HARTParams(cfg=3.0, seed=5, more_smooth=True, ssg=SSG(beta=0.4), **sampling)
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(V, (B, h * w), generator=gen) for h, w in sizes]
    gumbels = [-torch.empty(B, h * w, V).exponential_(generator=gen).log() for h, w in sizes]

    engine = Engine(model, tok, max_batch=4, device="cpu", dtype=torch.float32, backend="reference")
    request, cond, bound = engine.bind(text, params)
    captured = watch_inputs(monkeypatch, model)
    engine.run_batch(cond, torch.tensor([5]), bound, model=request, forced_tokens=tokens, forced_gumbels=gumbels, record_logits=True)
    logits, soft, state = [g for _, g in engine.last_logits], list(captured["inputs"]), captured["state"]
    assert torch.equal(state.hard_tokens, tokens[-1])

    captured["inputs"].clear()
    ref_logits = []

    def draw(rows, top_k, top_p, temperature, rng):
        ref_logits.append(rows.clone().view(B, -1, V))
        return tokens[len(ref_logits) - 1].reshape(-1)

    monkeypatch.setattr(hart_sampler, "sample_logits_reference", draw)
    monkeypatch.setattr(hart_sampler, "gumbel_noise", lambda like, rng: gumbels[len(ref_logits) - 1].view_as(like))
    sample_hart_reference(model, text.context, text.context_mask, text.context_position_ids, params)
    ref_soft = captured["inputs"]
    assert len(logits) == len(ref_logits) == len(soft) == len(ref_soft) == len(sizes)
    for si in range(len(sizes)):
        assert rel(logits[si], ref_logits[si]) < TOL, f"scale {si} logits: {rel(logits[si], ref_logits[si]):.2e}"
        assert rel(soft[si], ref_soft[si]) < TOL, f"scale {si} soft embeddings: {rel(soft[si], ref_soft[si]):.2e}"
    hard = model.tokenizer.quantize.embedding.weight.detach()[tokens[-1]]
    assert rel(soft[-1], hard) > 1e-3  # the soft embeddings were fed, not the codes'


def test_seeded_gumbel_distribution():
    """Gumbel(0, 1) moments (mean = Euler's gamma, std = pi / sqrt(6)), Gumbel-max draws with softmax frequencies, and
    the counter ranges (an offset picks later elements of the same stream; another seed: other numbers)."""
    seed = torch.tensor([7])
    g = seeded_gumbel(seed, (200_000,))
    assert torch.isfinite(g).all()
    assert abs(float(g.mean()) - 0.5772157) < 0.01 and abs(float(g.std()) - math.pi / math.sqrt(6)) < 0.01
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    n = 50_000
    picks = (logits + seeded_gumbel(seed, (n, 5), offset=1_000_000)).argmax(-1)
    freq = torch.bincount(picks, minlength=5).double() / n
    assert (freq - logits.double().softmax(-1)).abs().max() < 0.01  # ~5 standard deviations
    assert torch.equal(seeded_gumbel(seed, (2, 3), offset=4), seeded_gumbel(seed, (10,))[4:].view(2, 3))
    assert not torch.equal(g[:100], seeded_gumbel(torch.tensor([8]), (100,)))


def test_more_smooth_generate_is_seeded(pairs):
    """``more_smooth`` in the Engine (``generate`` with ``engine=``): the same seed gives the same images (eager, and
    through the static-batch path to float32 rounding), another seed others, and the soft inputs change the images."""
    model, tok = pairs["b_d3"]
    text = features("b_d3")
    engine = Engine(model, tok, max_batch=4, device="cpu", dtype=torch.float32, backend="reference")
    smooth = se.generate(model, tok, text, engine=engine, seed=2, cfg=2.0, more_smooth=True)  # per-row seeds (2, b)
    keys = row_seeds(2, text.context.shape[0])
    assert torch.equal(smooth, engine.generate(text, HARTParams(seed=2, cfg=2.0, more_smooth=True), row_seeds=keys)[0])
    assert torch.equal(engine.generate(text, HARTParams(seed=2, cfg=2.0, more_smooth=True))[0],
                       se.generate(model, tok, text, engine=engine, seed=2, cfg=2.0, more_smooth=True, seeding="batch"))
    assert not torch.equal(smooth, engine.generate(text, HARTParams(seed=3, cfg=2.0, more_smooth=True))[0])
    assert not torch.equal(smooth, engine.generate(text, HARTParams(seed=2, cfg=2.0))[0])
    params = HARTParams(seed=2, cfg=2.0, more_smooth=True, num_maskgit_iters=2)
    request, cond, bound = engine.bind(text.pad_rows(4), params)
    batch = _StaticBatch(engine, request, cond, bound)
    replayed = batch.replay(request, cond, 2, bound)[0].clone()
    # the soft inputs carry the logits' rounding: the graph's CFG weights are device tensors, eager's Python floats
    assert rel(replayed, engine.run_batch(cond, torch.tensor([2]), bound, model=request)[0]) < TOL
    assert _request_key(request) != _request_key(engine.bind(cond, params.replace(more_smooth=False))[0])


def test_more_smooth_row_seeds_alone_equal_batched(pairs):
    """Per-row seeding with ``more_smooth``: an image's Gumbel noise (and tokens, orders, residual noise) comes from its own
    key and its own counters, so a row sampled alone equals the same row inside a batch with other keys."""
    model, tok = pairs["a_d2"]
    text = features("a_d2")
    engine = Engine(model, tok, max_batch=4, device="cpu", dtype=torch.float32, backend="reference")
    params = HARTParams(cfg=2.0, more_smooth=True, num_maskgit_iters=2)
    keys = torch.tensor([11, 12345, 99])
    batch = text[torch.tensor([0, 1, 0])]
    images, tokens = engine.generate(batch, params, row_seeds=keys)
    alone, alone_tokens = engine.generate(batch[2:3], params, row_seeds=keys[2:])
    assert all(torch.equal(t[2:3], a) for t, a in zip(tokens, alone_tokens))
    assert rel(images[2:3], alone) < 1e-4  # float32 rounding differs with the batch size (CPU BLAS)
    assert not all(torch.equal(t[0:1], t[2:3]) for t in tokens)  # the same text, another key: other draws


# The Engine at float16 / bfloat16 autocast (upstream samples under float16 autocast) against the float32 reference
# loop, given the float32 Engine's tokens and the same orders and noise (CPU, reference backend). Measured on a_d2 / b_d3 with 1 and 3 MaskGIT
# passes: float16 logits <= 1.6e-3, residual <= 7.7e-3, images <= 4.9e-3; bfloat16 logits <= 1.1e-2, residual <= 0.10
# (the diffusion head's 8 CFG steps amplify bf16's 2^-8 roundoff), images <= 4.5e-2. Bounds: about twice those.
LOW_TOL = {torch.float16: {"logits": 5e-3, "residual": 2e-2, "images": 1e-2},
           torch.bfloat16: {"logits": 3e-2, "residual": 0.2, "images": 8e-2}}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name,iters", [("a_d2", 1), ("b_d3", 3)])
def test_low_precision_close_to_float32_reference(name, iters, dtype, pairs):
    model, tok = pairs[name]
    text = features(name)
    params = HARTParams(cfg=3.0, top_k=None, top_p=0.9, temperature=1.5, seed=5, num_maskgit_iters=iters, ssg=SSG(beta=0.4))
    low = Engine(model, tok, max_batch=4, device="cpu", dtype=dtype, backend="reference")
    assert low.source_model is model and low.model is not model  # a copy with its linear weights in dtype
    assert low.model.head.weight.dtype == dtype and model.head.weight.dtype == torch.float32
    # the tokens the float32 Engine draws (arbitrary codes make larger residual errors: 4e-2 at float16 for a_d2)
    forced = engine_run(Engine(model, tok, max_batch=4, device="cpu", dtype=torch.float32, backend="reference"), text, params, 5)[1]
    images, _, bad, logits, state = engine_run(low, text, params, 5, forced=forced)
    assert not bad.any() and images.dtype == torch.float32
    ref_logits, ref_state, ref_images = reference(model, text, params, 5, forced)
    tol = LOW_TOL[dtype]
    for si, (a, b) in enumerate(zip(logits, ref_logits)):
        assert rel(a, b) < tol["logits"], f"scale {si}: {rel(a, b):.2e}"
    assert rel(state.residual, ref_state.residual) < tol["residual"]
    assert rel(images, ref_images) < tol["images"]


def test_bad_inputs(pairs):
    model, tok = pairs["a_d2"]
    text = features("a_d2")
    engine = Engine(model, tok, max_batch=4, device="cpu", dtype=torch.float32, backend="reference")
    with pytest.raises(ValueError, match="upstream_compat"):
        engine.generate(text, upstream_compat=True)
    with pytest.raises(TypeError, match="cond"):
        engine.generate(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="params"):
        engine.generate(text, se.SamplingParams())
    with pytest.raises(TypeError, match="request"):
        engine.run_batch(text, torch.tensor([0]), HARTParams())
    with pytest.raises(TypeError, match="h_div_w"):
        engine.generate(text, h_div_w=1.0)
    with pytest.raises(ValueError, match="dtype: the HART Engine runs at float32, float16, bfloat16"):
        Engine(model, tok, device="cpu", dtype=torch.float64)
    with pytest.raises(ValueError, match="vae_dtype applies to VAR"):
        Engine(model, tok, device="cpu", dtype=torch.float16, vae_dtype=torch.float32)


def test_static_batch_replays_refill_condition_and_seed(pairs):
    """The captured-graph path's buffers (CPU: the loop on them): each replay reads the new features and seed, and
    gives what an eager run of the same request gives. The diffusion head's CFG weight is baked into a graph (part of
    its key: another cfg captures another graph)."""
    model, tok = pairs["a_d2"]
    text = features("a_d2")
    engine = Engine(model, tok, max_batch=4, device="cpu", dtype=torch.float32, backend="reference")
    params = HARTParams(cfg=2.0, top_k=50, seed=0, num_maskgit_iters=2, ssg=SSG(beta=0.3))
    request, cond, bound = engine.bind(text.pad_rows(4), params)
    batch = _StaticBatch(engine, request, cond, bound)
    assert batch.cond.context.data_ptr() != cond.context.data_ptr()
    flipped = HARTTextFeatures(cond.context.flip(0), cond.context_mask.flip(0), cond.context_position_ids.flip(0))
    for c, seed in ((cond, 3), (flipped, 4)):
        r, c_b, p = engine.bind(c, params)
        images, tokens, _ = batch.replay(r, c_b, seed, p)
        images, tokens = images.clone(), [t.clone() for t in tokens]
        eager = engine.run_batch(c_b, torch.tensor([seed]), p, model=r)
        assert torch.equal(images, eager[0]) and all(torch.equal(a, b) for a, b in zip(tokens, eager[1]))
    assert _request_key(request) != _request_key(engine.bind(cond, params.replace(cfg=1.5))[0])


# ----------------------------------------------------------------------------- GPU only (bench/device_check.sh)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run by bench/device_check.sh")


@pytest.mark.gpu
@gpu
def test_graph_replay_agrees_with_eager():
    """One CUDA graph per bucket holds the loop, the MaskGIT passes, the diffusion steps and the decode: replays with
    new features and seeds give the eager Engine's tokens (greedy and sampled) and images (float32)."""
    model, tok = load_hart(GOLDEN / "b_d3")
    model, text = model.cuda(), features("b_d3")
    eager = Engine(model, tok, max_batch=4, device="cuda", dtype=torch.float32, cuda_graphs=False)
    graphs = Engine(model, tok, max_batch=4, device="cuda", dtype=torch.float32, cuda_graphs=True)
    assert graphs.cuda_graphs
    for rows, seed, top_k in ((slice(0, 2), 0, 1), (slice(0, 2), 1, 50), (slice(1, 2), 2, 50)):
        params = HARTParams(cfg=3.0, top_k=top_k, seed=seed, num_maskgit_iters=3, ssg=SSG(beta=0.4))
        a_img, a_tok = eager.generate(text[rows], params)
        b_img, b_tok = graphs.generate(text[rows], params)
        assert all(torch.equal(a, b) for a, b in zip(a_tok, b_tok)), (rows, seed)
        assert rel(b_img, a_img) < TOL
    assert len(graphs._graphs) == 3  # (bucket 2, greedy), (bucket 2, top-k 50), (bucket 1, top-k 50)


@pytest.mark.gpu
@gpu
def test_more_smooth_in_the_graph():
    """``more_smooth`` inside the CUDA graph (the Gumbel noise from the seed buffer): a replay with the same seed gives
    the same images and tokens, another seed other images, and scale 0 (before any soft input) draws eager's tokens."""
    model, tok = load_hart(GOLDEN / "b_d3")
    model, text = model.cuda(), features("b_d3")
    eager = Engine(model, tok, max_batch=4, device="cuda", dtype=torch.float32, cuda_graphs=False)
    graphs = Engine(model, tok, max_batch=4, device="cuda", dtype=torch.float32, cuda_graphs=True)
    params = HARTParams(cfg=3.0, top_k=50, seed=1, more_smooth=True, num_maskgit_iters=2, ssg=SSG(beta=0.4))
    a_img, a_tok = graphs.generate(text, params)
    b_img, b_tok = graphs.generate(text, params)
    assert torch.equal(a_img, b_img) and all(torch.equal(a, b) for a, b in zip(a_tok, b_tok))
    assert not torch.equal(a_img, graphs.generate(text, params.replace(seed=2))[0])
    assert torch.equal(a_tok[0], eager.generate(text, params)[1][0])
    assert len(graphs._graphs) == 1
