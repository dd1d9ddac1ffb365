"""The Engine on the Infinity family against the reference sampler (tests/golden/infinity models; CPU, float32, no
graphs): the same logits given the same bits, the same greedy bits, the padded text path, the KV cache, bad input."""
from __future__ import annotations

import json
from typing import Any, Dict

import pytest
import torch
from conftest import INFINITY_CONFIGS as CONFIGS
from conftest import INFINITY_GOLDEN as INF
from conftest import load_golden_infinity, packed, rel_err

from ssg_engine import SSG, SamplingParams, generate
from ssg_engine.engine import Engine
from ssg_engine.infinity_sampler import sample_infinity_reference
from ssg_engine.models.bsq_vae import load_bsq_vae
from ssg_engine.models.infinity import (
    PaddedText, TextFeatures, masked_cross_attention, scale_schedule,
    varlen_cross_attention,
)



@pytest.fixture(scope="module")
def setups() -> Dict[str, Dict[str, Any]]:
    """Per golden config: the model, its VAE, the golden tensors and a float32 CPU Engine on them."""
    out = {}
    for name in CONFIGS:
        model, T = load_golden_infinity(name)
        vae = load_bsq_vae(INF / name / "vae.pth")
        engine = Engine(model, vae, max_batch=4, device="cpu", dtype=torch.float32, cuda_graphs=False, backend="reference")
        out[name] = dict(model=model, vae=vae, T=T, engine=engine)
    return out


def request_of(T: Dict[str, torch.Tensor], name: str, run: int) -> Dict[str, Any]:
    """The Infinity keywords of the recorded upstream call ``ar{run}`` (without text and sampling filters)."""
    a = json.loads((INF / name / f"ar{run}.json").read_text())
    return dict(
        schedule=a["scale_schedule"], cfg_list=a["cfg_list"], tau_list=a["tau_list"], cfg_insertion_layer=a["cfg_insertion_layer"],
        negative=packed(T, "neg") if a["negative_label_B_or_BLT"] else None,
    )


# ar0: CFG on logits (sq) / at a layer (wide); ar1: at a layer + negative (sq) / on logits and a layer + negative (wide)
RUNS = [("sq_d16", 0), ("sq_d16", 1), ("wide_d8", 0), ("wide_d8", 1)]


@torch.no_grad()
@pytest.mark.parametrize("name,run", RUNS)
@pytest.mark.parametrize("ssg", [None, SSG(beta=0.8), SSG(beta_start=0.2, beta_end=1.0, prior="bilinear", prior_source="guided")])
def test_logits_match_reference_given_same_bits(setups, name, run, ssg):
    s = setups[name]
    kw = request_of(s["T"], name, run)
    text = packed(s["T"], "text")
    ref = sample_infinity_reference(s["model"], s["vae"], text, top_k=0, top_p=0.9, seed=3, ssg=ssg, record_logits=True, **kw)
    request, padded, params = s["engine"].bind(text, SamplingParams(top_k=0, top_p=0.9, ssg=ssg), **kw)
    images, bits, bad = s["engine"].run_batch(padded, torch.tensor([0]), params, model=request, forced_tokens=ref.bits, record_logits=True)
    assert not bad.any()
    for si, (cfg_l, sampled_l) in enumerate(s["engine"].last_logits):
        assert rel_err(cfg_l.view_as(ref.cfg_logits[si]), ref.cfg_logits[si]) < 1e-5, f"cfg logits at scale {si}"
        assert rel_err(sampled_l.view_as(ref.logits[si]), ref.logits[si]) < 1e-5, f"sampled logits at scale {si}"
    assert rel_err(images, ref.images) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("name,run", RUNS)
def test_padded_text_logits_close_to_reference(setups, name, run):
    """The graphs' text path (PaddedText, masked cross-attention) given the same bits: equal up to float32 summation
    order inside the bfloat16-rounded cross-attention (a rounding moved by one ulp), measured < 2e-5."""
    s = setups[name]
    kw = request_of(s["T"], name, run)
    text = packed(s["T"], "text")
    ssg = SSG(beta=0.8)
    ref = sample_infinity_reference(s["model"], s["vae"], text, top_k=0, top_p=0.9, seed=3, ssg=ssg, record_logits=True, **kw)
    pad = lambda t: PaddedText.pad(TextFeatures.coerce(t), s["model"].config.text_maxlen)  # noqa: E731
    request, _, params = s["engine"].bind(text, SamplingParams(top_k=0, top_p=0.9, ssg=ssg), **kw)
    request.negative = None if kw["negative"] is None else pad(kw["negative"])
    images, _, _ = s["engine"].run_batch(pad(text), torch.tensor([0]), params, model=request, forced_tokens=ref.bits, record_logits=True)
    for si, (_, sampled_l) in enumerate(s["engine"].last_logits):
        assert rel_err(sampled_l.view_as(ref.logits[si]), ref.logits[si]) < 1e-4, f"scale {si}"
    assert rel_err(images, ref.images) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("name,run", RUNS)
@pytest.mark.parametrize("ssg", [None, SSG(beta=0.8)])
def test_greedy_bits_identical(setups, name, run, ssg):
    s = setups[name]
    kw = request_of(s["T"], name, run)
    text = packed(s["T"], "text")
    ref = sample_infinity_reference(s["model"], s["vae"], text, top_k=1, seed=0, ssg=ssg, **kw)
    images, bits = s["engine"].generate(text, top_k=1, top_p=0.0, seed=7, ssg=ssg, **kw)
    for si, (a, b) in enumerate(zip(bits, ref.bits)):
        assert a.shape == b.shape and a.dtype == torch.uint8 and torch.equal(a.long(), b), f"scale {si}"
    assert rel_err(images, ref.images) < 1e-5


@torch.no_grad()
def test_engine_draws_bits_with_the_fused_op(setups, monkeypatch):
    """Every Infinity scale is one ops.guide_and_sample_bits call (guidance + Bernoulli bits), never 2-way rows through
    ops.sample_logits; the bits come back as uint8."""
    from ssg_engine import ops

    fused_calls, sampler_calls = [], []
    for name, calls in (("guide_and_sample_bits", fused_calls), ("sample_logits", sampler_calls)):

        def spy(*args, _original=getattr(ops, name), _calls=calls, **kwargs):
            _calls.append(kwargs["backend"])
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    s = setups["wide_d8"]
    _, bits = s["engine"].generate(packed(s["T"], "text"), h_div_w=0.5, pn=4, top_k=0, top_p=0.9, seed=1, ssg=SSG(beta=0.5))
    assert fused_calls == ["reference"] * 4 and sampler_calls == []
    assert all(b.dtype == torch.uint8 and b.shape[-1] == 8 for b in bits)


@torch.no_grad()
def test_ssg_beta_zero_is_no_ssg_and_params_map_to_lists(setups):
    """SSG(beta=0) gives the bits of ssg=None; cfg/temperature without lists are upstream's w and tau at every scale."""
    s = setups["wide_d8"]
    text = packed(s["T"], "text")
    sched = scale_schedule(0.5, 5)
    base = s["engine"].generate(text, top_k=1, top_p=0.0, h_div_w=0.5, pn=5, cfg=2.5, temperature=0.8, cfg_insertion_layer=(0, -1))
    off = s["engine"].generate(text, top_k=1, top_p=0.0, h_div_w=0.5, pn=5, cfg=2.5, temperature=0.8, cfg_insertion_layer=(0, -1), ssg=SSG(beta=0.0))
    ref = sample_infinity_reference(s["model"], s["vae"], text, sched, cfg_list=[2.5] * 5, tau_list=[0.8] * 5, top_k=1, cfg_insertion_layer=(0, -1))
    assert all(torch.equal(a, b) and torch.equal(a.long(), c) for a, b, c in zip(base[1], off[1], ref.bits))
    assert torch.equal(base[0], off[0])


@torch.no_grad()
def test_padded_text_chunks_and_buckets(setups):
    """Three prompts of odd lengths with max_batch 2 (chunks 2 + 1, the last padded to bucket 1 then 2 for the
    negative): each prompt's greedy bits are those of the reference on that prompt alone."""
    s = setups["sq_d16"]
    g = torch.Generator().manual_seed(0)
    lens = [3, 9, 5]
    features = torch.randn(sum(lens), s["model"].Ct5, generator=g)
    neg = torch.randn(sum(lens), s["model"].Ct5, generator=g)
    engine = Engine(s["model"], s["vae"], max_batch=2, device="cpu", dtype=torch.float32, cuda_graphs=False, backend="reference")
    kw = dict(pn=4, cfg_list=[1, 3, 2, 2], tau_list=[1, 0.8, 0.8, 0.8], cfg_insertion_layer=(0,))
    _, bits = engine.generate(TextFeatures(features, lens), top_k=1, top_p=0.0, negative=TextFeatures(neg, lens), **kw)
    starts = [0, 3, 12]
    for b, (start, n) in enumerate(zip(starts, lens)):
        one = TextFeatures(features[start : start + n], [n])
        ref = sample_infinity_reference(s["model"], None, one, scale_schedule(1.0, 4), top_k=1, negative=TextFeatures(neg[start : start + n], [n]),
                                        **{k: v for k, v in kw.items() if k != "pn"})
        assert all(torch.equal(a[b : b + 1].long(), r) for a, r in zip(bits, ref.bits)), f"prompt {b}"


@torch.no_grad()
def test_masked_cross_attention_equals_varlen():
    g = torch.Generator().manual_seed(1)
    lens, T, H, hd, Lq = [1, 7, 13], 17, 3, 16, 5
    q = torch.randn(len(lens), Lq, H, hd, generator=g)
    k, v = torch.randn(sum(lens), H, hd, generator=g), torch.randn(sum(lens), H, hd, generator=g)
    mask = torch.arange(T)[None] < torch.tensor(lens)[:, None]
    kp, vp = (torch.zeros(len(lens), T, H, hd).masked_scatter(mask[..., None, None], t) for t in (k, v))
    expected = varlen_cross_attention(q, k, v, lens, hd**-0.5)
    assert rel_err(masked_cross_attention(q, kp, vp, mask, hd**-0.5), expected) < 1e-6


@torch.no_grad()
def test_padded_condition_equals_packed(setups):
    """The whole conditioning (text pool, cross-attention keys, cfg_uncond rows) from PaddedText equals the packed one."""
    s = setups["sq_d16"]
    model, T = s["model"], s["T"]
    text = TextFeatures.coerce(packed(T, "text"))
    sched = scale_schedule(1.0, 3)
    for cfg_list in ([1.0] * 3, [1.0, 3.0, 2.0]):
        a = model.condition(text, sched, cfg_list=cfg_list)
        b = model.condition(PaddedText.pad(text, model.config.text_maxlen), sched, cfg_list=cfg_list)
        assert rel_err(b.cond_BD, a.cond_BD) < 1e-6 and rel_err(b.x, a.x) < 1e-6


@torch.no_grad()
def test_kv_cache_grows_with_schedule(setups):
    s = setups["sq_d16"]
    engine = Engine(s["model"], s["vae"], max_batch=4, device="cpu", dtype=torch.float32, cuda_graphs=False, backend="reference")
    text = packed(s["T"], "text")

    def expected(pn: int, rows: int) -> int:
        layers, heads, length, head_dim = s["model"].cache_layout(scale_schedule(1.0, pn))
        return 2 * layers * rows * heads * length * head_dim * 4  # K and V, float32

    assert engine.kv_cache_bytes() == 0
    engine.generate(text, pn=3, top_k=1)
    assert engine.kv_cache_bytes() == expected(3, 4)  # bucket 2, doubled for CFG
    engine.generate(text, pn=5, top_k=1)
    assert engine.kv_cache_bytes() == expected(5, 4)
    engine.generate(text, pn=4, top_k=1)
    assert engine.kv_cache_bytes() == expected(5, 4)  # a shorter schedule reuses it


@torch.no_grad()
def test_generate_one_signature(setups, tiny_models):
    """generate(model, vae, cond, params, **overrides) for both families: Infinity text features, prompts through a
    text encoder, an explicit engine; VAR labels as before."""
    s = setups["wide_d8"]
    text = packed(s["T"], "text")
    kw = dict(h_div_w=0.5, pn=4, cfg=2.0, top_k=1, top_p=0.0, seed=0)
    images, bits = generate(s["model"], s["vae"], text, return_tokens=True, **kw)
    assert images.shape == (2, 3, 3 * 16, 6 * 16) and bits[-1].shape == (2, 3 * 6, 8)  # last scale (3, 6)

    class Encoder:
        def encode(self, prompts):
            assert prompts == ["a red fox", "a cat"]
            return TextFeatures.coerce(text)

    assert torch.equal(generate(s["model"], s["vae"], ["a red fox", "a cat"], text_encoder=Encoder(), **kw), images)
    _, engine_bits = generate(s["model"], s["vae"], text, engine=s["engine"], return_tokens=True, **kw)
    assert all(torch.equal(a.long(), b) for a, b in zip(engine_bits, bits))  # the Engine's bits are uint8
    vae, var = tiny_models
    assert generate(var, vae, [1, 2], top_k=1, seed=0).shape == (2, 3, 128, 128)


def test_bad_input_is_one_clear_error(setups, tiny_models):
    s = setups["sq_d16"]
    engine, model = s["engine"], s["model"]
    text = packed(s["T"], "text")
    vae, var = tiny_models
    with pytest.raises(TypeError, match=r"h_div_w= is a text-conditional \(Infinity\) keyword"):
        generate(var, vae, [1], h_div_w=1.0)
    with pytest.raises(TypeError, match="takes its BSQVAE"):
        Engine(model, vae, device="cpu", dtype=torch.float32)
    with pytest.raises(TypeError, match="unexpected keyword argument 'labels'"):
        engine.generate(text, labels=[1, 2])
    with pytest.raises(ValueError, match="need at least one prompt"):
        engine.generate((torch.zeros(0, model.Ct5), [], torch.zeros(1, dtype=torch.int32), 0))
    with pytest.raises(ValueError, match="text features have width 7; this Infinity expects Ct5=256"):
        engine.generate(TextFeatures(torch.zeros(3, 7), [3]), pn=2)
    with pytest.raises(ValueError, match=r"h_div_w=0.9 is not in Infinity's table"):
        engine.generate(text, h_div_w=0.9)
    with pytest.raises(ValueError, match="a prompt has 40 tokens; this model takes at most text_maxlen=32"):
        engine.generate(TextFeatures(torch.zeros(40, model.Ct5), [40]), pn=2)
    with pytest.raises(ValueError, match="negative has 1 prompts; give one per prompt"):
        engine.generate(text, pn=2, negative=TextFeatures(torch.zeros(3, model.Ct5), [3]))
    with pytest.raises(ValueError, match="cfg_list has 2 entries; the schedule has 3 scales"):
        engine.generate(text, pn=3, cfg_list=[1, 2])
    with pytest.raises(TypeError, match=r"prompts \(str\) need text_encoder="):
        generate(model, s["vae"], ["a red fox"])


@torch.no_grad()
def test_triton_backend_greedy_bits_under_interpreter(setups):
    """The fused guidance + Bernoulli bit draw (ops.guide_and_sample_bits; CPU interpreter in CI) gives the reference's greedy bits."""
    pytest.importorskip("triton", reason="triton not installed")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU (set by the README test command) or a GPU")
    s = setups["wide_d8"]
    text = packed(s["T"], "text")
    kw = dict(cfg_list=[1, 2, 2, 2], tau_list=[1] * 4, cfg_insertion_layer=(0,))
    ref = sample_infinity_reference(s["model"], None, text, scale_schedule(0.5, 4), top_k=1, ssg=SSG(beta=0.8), **kw)
    engine = s["engine"]
    engine.backend = "triton"
    try:
        _, bits = engine.generate(text, h_div_w=0.5, pn=4, top_k=1, top_p=0.0, ssg=SSG(beta=0.8), **kw)
    finally:
        engine.backend = "reference"
    assert all(torch.equal(a.long(), b) for a, b in zip(bits, ref.bits))


# ----------------------------------------------------------------------------- GPU only (bench/device_check.sh)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run by bench/device_check.sh")


@pytest.mark.gpu
@gpu
@torch.no_grad()
def test_infinity_graph_replay_equals_eager(setups):
    """CUDA graphs per (bucket, schedule, lists): a replay with new prompts and a new seed equals eager; a new
    schedule captures a new graph."""
    s = setups["wide_d8"]
    model, vae = s["model"], s["vae"]
    eager = Engine(model, vae, max_batch=4, device="cuda", dtype=torch.float32, cuda_graphs=False)
    graphs = Engine(model, vae, max_batch=4, device="cuda", dtype=torch.float32, cuda_graphs=True)
    text = TextFeatures.coerce(packed(s["T"], "text"))
    other = TextFeatures(text.kv_compact.flip(0), text.lens[::-1])
    kw = dict(h_div_w=0.5, pn=5, cfg=3.0, top_k=0, top_p=0.9, ssg=SSG(beta=0.5), cfg_insertion_layer=(0, -1))
    for t, seed in ((text, 0), (other, 1)):
        a_img, a_bits = eager.generate(t, seed=seed, **kw)
        b_img, b_bits = graphs.generate(t, seed=seed, **kw)
        assert all(torch.equal(x, y) for x, y in zip(a_bits, b_bits)) and torch.equal(a_img, b_img)
    assert len(graphs._graphs) == 1
    graphs.generate(text, seed=0, **dict(kw, pn=6))
    assert len(graphs._graphs) == 2
