"""The Engine against the reference sampler on the golden tiny model (CPU, float32, no graphs)."""
from __future__ import annotations

import pytest
import torch
from conftest import GREEDY_AGREEMENT, agreement, rel_err

from ssg_engine import SSG, SamplingParams, load_models, sample_reference
from ssg_engine.engine import Engine

LABELS = torch.tensor([1, 9, 4])


@pytest.fixture(scope="module")
def fresh_models(tiny_dir):
    # the Engine moves/casts the models it is given, so it gets its own copy
    return load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=tiny_dir / "config.json")


@pytest.fixture(scope="module")
def engine(fresh_models):
    vae, var = fresh_models
    return Engine(var, vae, max_batch=4, device="cpu", dtype=torch.float32, cuda_graphs=False, backend="reference")


@pytest.mark.parametrize("ssg", [None, SSG(beta=0.8), SSG(beta_start=0.2, beta_end=1.0, prior="bilinear", prior_source="guided")])
def test_logits_match_reference_given_same_tokens(engine, tiny_models, ssg):
    _, var = tiny_models
    params = SamplingParams(cfg=2.0, top_k=40, top_p=0.9, temperature=0.9, seed=3, ssg=ssg)
    ref = sample_reference(var, 3, LABELS, params, record_logits=True)
    images, tokens, _ = engine.run_batch(LABELS, torch.tensor([0]), params, forced_tokens=ref.tokens, record_logits=True)
    for si, (cfg_l, sampled_l) in enumerate(engine.last_logits):
        assert rel_err(cfg_l, ref.cfg_logits[si]) < 1e-5, f"cfg logits at scale {si}"
        assert rel_err(sampled_l, ref.sampled_logits[si]) < 1e-5, f"sampled logits at scale {si}"
    assert rel_err(images, ref.images) < 1e-5


@pytest.mark.parametrize("ssg", [None, SSG(beta=0.8)])
def test_greedy_tokens_identical(engine, tiny_models, ssg):
    _, var = tiny_models
    ref = sample_reference(var, 3, LABELS, seed=0, cfg=1.5, top_k=1, ssg=ssg)
    images, tokens = engine.generate(LABELS, cfg=1.5, top_k=1, top_p=0.0, seed=123, ssg=ssg)
    for si in range(len(tokens)):
        assert torch.equal(tokens[si], ref.tokens[si]), f"scale {si}"
    assert rel_err(images, ref.images) < 1e-5


def test_split_and_pad(engine):
    labels = list(range(10))  # max_batch=4 -> chunks 4, 4, 2 (the last padded to bucket 2)
    images, tokens = engine.generate(labels, top_k=1, top_p=0.0, seed=0)
    assert images.shape == (10, 3, 128, 128) and tokens[-1].shape == (10, 64)
    single, _ = engine.generate([labels[5]], top_k=1, top_p=0.0)
    assert rel_err(images[5:6], single) < 1e-5  # greedy: padding and chunking change nothing


def test_seeds_and_randomness(engine):
    a, ta = engine.generate([1, 2], top_k=50, top_p=0.95, seed=1)
    b, tb = engine.generate([1, 2], top_k=50, top_p=0.95, seed=1)
    c, tc = engine.generate([1, 2], top_k=50, top_p=0.95, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(ta, tb))
    assert not all(torch.equal(x, y) for x, y in zip(ta, tc))


def test_bad_input(engine):
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\)"):
        engine.generate([3, 11])
    with pytest.raises(ValueError, match="top_p must be in"):
        engine.generate([3], top_p=2.0)
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        Engine(engine.model, engine.vae, max_batch=0, device="cpu")


def test_triton_backend_matches_reference_under_interpreter(engine, tiny_models):
    """The engine with the Triton kernels (CPU interpreter in CI) gives the reference's greedy tokens."""
    pytest.importorskip("triton", reason="triton not installed")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU (set by the README test command) or a GPU")
    _, var = tiny_models
    ssg = SSG(beta=0.8)
    ref = sample_reference(var, 2, LABELS[:2], seed=0, top_k=1, ssg=ssg)
    engine.backend = "triton"
    try:
        _, tokens = engine.generate(LABELS[:2], top_k=1, top_p=0.0, ssg=ssg)
    finally:
        engine.backend = "reference"
    assert all(torch.equal(a, b) for a, b in zip(tokens, ref.tokens))


# ----------------------------------------------------------------------------- GPU only (bench/device_check.sh)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run by bench/device_check.sh")

# bf16 engine vs fp32 reference, per-scale CFG logits given the same tokens: relative error bound
BF16_LOGITS_REL_TOL = 3e-2


def _random_gpu_models(dtype):
    """A small random-weight model built on the GPU (no checkpoint needed)."""
    from ssg_engine import ModelConfig, build_models

    cfg = ModelConfig(V=512, Cvae=8, ch=32, patch_nums=(1, 2, 3, 4, 5, 6, 8), depth=4, embed_dim=256, num_heads=4, num_classes=10)
    torch.manual_seed(0)
    vae, var = build_models(cfg, "cuda")
    for p in list(vae.parameters()) + list(var.parameters()):
        torch.nn.init.normal_(p, 0.0, 0.05)
    vae.eval().requires_grad_(False)
    var.to(dtype).eval().requires_grad_(False)
    return vae, var


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graph_replay_agrees_with_eager(dtype):
    """Greedy tokens of graph replays (new labels each time) agree with eager's; a sampled replay takes its new seed."""
    vae, var = _random_gpu_models(dtype)
    eager = Engine(var, vae, max_batch=8, device="cuda", dtype=dtype, cuda_graphs=False)
    graphs = Engine(var, vae, max_batch=8, device="cuda", dtype=dtype, cuda_graphs=True)
    for labels in ([1, 2, 3], [4, 5, 6]):
        _, a_tok = eager.generate(labels, top_k=1, top_p=0.0, ssg=SSG(beta=0.5))
        _, b_tok = graphs.generate(labels, top_k=1, top_p=0.0, ssg=SSG(beta=0.5))
        assert agreement(a_tok, b_tok) >= GREEDY_AGREEMENT[dtype], labels
    sampled = {seed: graphs.generate([1, 2, 3], top_k=100, top_p=0.95, seed=seed, ssg=SSG(beta=0.5))[1] for seed in (0, 1)}
    _, eager_sampled = eager.generate([1, 2, 3], top_k=100, top_p=0.95, seed=1, ssg=SSG(beta=0.5))
    assert agreement(sampled[1], eager_sampled) >= GREEDY_AGREEMENT[dtype]
    assert agreement(sampled[0], sampled[1]) < 0.5
    assert len(graphs._graphs) == 2  # greedy and sampled filters


@pytest.mark.gpu
@gpu
def test_graph_owns_what_it_reads():
    """Clearing the prior-operator caches, returning freed memory to the driver and scribbling NaN over fresh
    allocations between two replays changes nothing: the graph holds every tensor it reads."""
    import gc

    from ssg_engine import guidance

    vae, var = _random_gpu_models(torch.bfloat16)
    graphs = Engine(var, vae, max_batch=4, device="cuda", cuda_graphs=True)
    kw = dict(top_k=100, top_p=0.95, seed=0, ssg=SSG(beta=0.5, prior="dse"))
    first_img, first_tok = graphs.generate([1, 2], **kw)
    guidance._cached_operator.cache_clear()
    guidance._prior_matrix_f64.cache_clear()
    gc.collect()
    torch.cuda.empty_cache()
    scribble = [torch.full((1 << n,), float("nan"), device="cuda") for n in range(8, 24)]  # reuse freed addresses
    second_img, second_tok = graphs.generate([1, 2], **kw)
    del scribble
    assert len(graphs._graphs) == 1
    assert torch.equal(first_img, second_img) and all(torch.equal(a, b) for a, b in zip(first_tok, second_tok))


@pytest.mark.gpu
@gpu
def test_bf16_engine_logits_close_to_fp32_reference():
    vae, var32 = _random_gpu_models(torch.float32)
    ref = sample_reference(var32, 3, torch.tensor([1, 2, 3], device="cuda"), seed=0, top_k=100, top_p=0.95, record_logits=True, ssg=SSG(beta=0.5))
    import copy

    var16 = copy.deepcopy(var32)
    engine = Engine(var16, vae, max_batch=4, device="cuda", dtype=torch.bfloat16, cuda_graphs=False)
    engine.run_batch(torch.tensor([1, 2, 3], device="cuda"), torch.tensor([0], device="cuda"),
                     SamplingParams(cfg=1.5, top_k=100, top_p=0.95, ssg=SSG(beta=0.5)), forced_tokens=ref.tokens, record_logits=True)
    for si, (cfg_l, _) in enumerate(engine.last_logits):
        assert rel_err(cfg_l, ref.cfg_logits[si]) < BF16_LOGITS_REL_TOL, f"scale {si}"


def test_kv_cache_follows_the_batch_in_use():
    """Engine(max_batch=64) allocates KV cache for the bucket a request uses, not for max_batch."""
    from ssg_engine.pretrained import load_pretrained

    vae, var = load_pretrained()
    engine = Engine(var, vae, max_batch=64, device="cpu", dtype=torch.float32, cuda_graphs=False)
    assert engine.kv_cache_bytes() == 0
    layers, heads, length, head_dim = var.cache_layout()
    per_row = 2 * layers * heads * length * head_dim * 4  # K and V, float32

    engine.generate([1, 2], top_k=1, seed=0)
    assert engine.kv_cache_bytes() == 2 * 2 * per_row  # bucket 2, doubled for CFG
    engine.generate([3], top_k=1, seed=0)
    assert engine.kv_cache_bytes() == 2 * 2 * per_row  # a smaller bucket reuses it
    engine.generate([1, 2, 3], top_k=1, seed=0)
    assert engine.kv_cache_bytes() == 2 * 4 * per_row < 2 * 64 * per_row


@pytest.mark.gpu
@gpu
def test_graphs_reused_across_cfg_and_beta_and_bounded():
    """cfg and the SSG betas are device tensors of the captured graph: changing them replays the same graph with the
    new values (equal to eager); other settings capture new graphs, at most max_graphs of them."""
    vae, var = _random_gpu_models(torch.bfloat16)
    eager = Engine(var, vae, max_batch=4, device="cuda", cuda_graphs=False)
    graphs = Engine(var, vae, max_batch=4, device="cuda", cuda_graphs=True, max_graphs=2)
    for cfg, beta in ((1.5, 0.5), (3.0, 0.9)):
        _, a_tok = eager.generate([1, 2], top_k=1, top_p=0.0, seed=0, cfg=cfg, ssg=SSG(beta=beta))
        _, b_tok = graphs.generate([1, 2], top_k=1, top_p=0.0, seed=0, cfg=cfg, ssg=SSG(beta=beta))
        assert agreement(a_tok, b_tok) >= GREEDY_AGREEMENT[torch.bfloat16] and len(graphs._graphs) == 1
    for top_k in (10, 20, 30):
        graphs.generate([1, 2], top_k=top_k, top_p=0.0, seed=0)
    assert len(graphs._graphs) == 2


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / (a.double() - b.double()).pow(2).mean()))


@pytest.mark.parametrize("model", ["shipped", "golden_tiny"])
def test_bf16_decode_close_to_fp32(model, tiny_dir):
    """The Engine decodes in vae_dtype (default: its dtype); bf16 decode vs float32 decode of the same tokens.
    Acceptance floor 35 dB PSNR (the measured values are printed)."""
    from ssg_engine.pretrained import load_pretrained

    def load():
        if model == "shipped":
            return load_pretrained()
        return load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=tiny_dir / "config.json")

    images = {}
    for vae_dtype in (torch.float32, torch.bfloat16):
        vae, var = load()
        engine = Engine(var, vae, max_batch=4, device="cpu", dtype=torch.float32, cuda_graphs=False, vae_dtype=vae_dtype)
        assert engine.vae.decoder.conv_in.weight.dtype == vae_dtype and engine.vae.quantize.embedding.weight.dtype == torch.float32
        images[vae_dtype], _ = engine.generate([1, 3, 5, 7], top_k=1, top_p=0.0, seed=0)
        assert images[vae_dtype].dtype == torch.float32
    psnr = _psnr(images[torch.bfloat16], images[torch.float32])
    print(f"{model}: bf16 decode vs float32 decode PSNR {psnr:.1f} dB")
    assert psnr > 35.0


def test_engine_cache_reuses_and_is_bounded(tiny_dir):
    """generate's engine cache: the same models give the same Engine; at most max_engines are kept."""
    from ssg_engine.api import EngineCache, generate

    cache = EngineCache(max_engines=2)
    models = [load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=tiny_dir / "config.json") for _ in range(3)]
    first = cache.get(models[0][1], models[0][0])
    assert cache.get(models[0][1], models[0][0]) is first and len(cache) == 1
    cache.get(models[1][1], models[1][0])
    cache.get(models[2][1], models[2][0])
    assert len(cache) == 2 and cache.get(models[0][1], models[0][0]) is not first  # the oldest was dropped
    vae, var = models[1]
    images = generate(var, vae, [1, 2], engine=cache.get(var, vae), top_k=1, seed=0)
    assert images.shape == (2, 3, 128, 128)
    cache.clear()
    assert len(cache) == 0
