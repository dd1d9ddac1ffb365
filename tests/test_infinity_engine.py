"""The Engine on the Infinity family against the reference sampler (tests/golden/infinity models; CPU, float32, no
graphs): the same logits given the same bits, the same greedy bits, the padded text path, the KV cache, bad input."""
from __future__ import annotations

import json
import dataclasses
from typing import Any, Dict, List

import pytest
import torch
from conftest import INFINITY_CONFIGS as CONFIGS
from conftest import INFINITY_GOLDEN as INF
from conftest import GRAPH_LOGITS_REL_TOL, GREEDY_AGREEMENT, agreement, load_golden_infinity, packed, rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from ssg_engine import SSG, SamplingParams, generate
from ssg_engine.engine import Engine
from ssg_engine.families.infinity.sampler import sample_infinity_reference
from ssg_engine.families.infinity.tokenizer import load_bsq_vae
from ssg_engine.families.infinity.model import (
    PaddedText, TextFeatures, masked_cross_attention, scale_schedule,
    varlen_cross_attention,
)


# Engine in bfloat16 (linear weights cast once, autocast) vs the float32 reference sampler given the same bits,
# norm-relative error (rel_err). bfloat16 keeps 8 significant bits (unit roundoff 2^-9 = 2.0e-3); each block rounds
# its linear inputs, weights and outputs, and the errors add over the blocks and scales: measured on the golden
# models at most 6.7e-3 (logits) and 8.7e-3 (images, decoded under bf16 autocast); the bounds leave about 3x.
BF16_TOLERANCE = {"logits": 2e-2, "images": 3e-2}


class CastSpy(TorchDispatchMode):
    """Counts copies that cast one of ``tensors`` (``aten.to`` / ``aten._to_copy`` returning new storage), e.g. the
    casts autocast makes of float32 weights at every use."""

    def __init__(self, tensors: List[torch.Tensor]) -> None:
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in tensors}
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[0].untyped_storage().data_ptr() if args and torch.is_tensor(args[0]) else None
        if func.overloadpacket in (torch.ops.aten.to, torch.ops.aten._to_copy) and source in self.storages:
            self.casts += out.untyped_storage().data_ptr() != source
        return out



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


@pytest.fixture(scope="module")
def bf16_engines(setups) -> Dict[str, Engine]:
    """Per golden config: a bfloat16 CPU Engine (autocast, as on CUDA) on the float32 golden model."""
    return {name: Engine(s["model"], s["vae"], max_batch=4, device="cpu", dtype=torch.bfloat16, cuda_graphs=False, backend="reference")
            for name, s in setups.items()}


@torch.no_grad()
@pytest.mark.parametrize("name,run", RUNS)
def test_bf16_engine_logits_close_to_reference_and_equal_to_autocast_of_source(setups, bf16_engines, name, run):
    """The bfloat16 Engine samples with its copy (linear weights cast once): its logits given the reference's bits
    are within BF16_TOLERANCE of the float32 reference, and bit-identical to the model given run under autocast
    (which re-casts every weight at every use): casting once changes no value. The model given is left as it was."""
    s, engine = setups[name], bf16_engines[name]
    assert engine.source_model is s["model"] and engine.model is not s["model"]
    assert engine.model.block_list()[0].sa.mat_qkv.weight.dtype == torch.bfloat16
    assert engine.model.head.weight.dtype == engine.model.block_list()[0].ada_gss.dtype == torch.float32
    assert s["model"].block_list()[0].sa.mat_qkv.weight.dtype == torch.float32
    kw = request_of(s["T"], name, run)
    text = packed(s["T"], "text")
    ref = sample_infinity_reference(s["model"], s["vae"], text, top_k=0, top_p=0.9, seed=3, record_logits=True, **kw)
    request, cond, params = engine.bind(text, SamplingParams(top_k=0, top_p=0.9), **kw)
    runs = []
    for model in (engine.model, engine.source_model):
        images, _, bad = engine.run_batch(cond, torch.tensor([0]), params, model=dataclasses.replace(request, model=model),
                                          forced_tokens=ref.bits, record_logits=True)
        runs.append((images.clone(), [sampled.clone() for _, sampled in engine.last_logits]))
    (images, logits), (src_images, src_logits) = runs
    assert not bad.any()
    for si, (got, expected) in enumerate(zip(logits, ref.logits)):
        assert rel_err(got.view_as(expected), expected) < BF16_TOLERANCE["logits"], f"scale {si}"
        assert torch.equal(got, src_logits[si]), f"scale {si}: casting once changed a value"
    assert rel_err(images.float(), ref.images) < BF16_TOLERANCE["images"]
    assert torch.equal(images, src_images)


@torch.no_grad()
@pytest.mark.parametrize("name,run", [("sq_d16", 1), ("wide_d8", 0)])
def test_bf16_engine_padded_text_close_to_reference(setups, bf16_engines, name, run):
    """The graphs' text path in bfloat16 (padded text, masked SDPA cross-attention on bfloat16 q, k, v) given the
    reference's bits: within BF16_TOLERANCE of the float32 reference."""
    s, engine = setups[name], bf16_engines[name]
    kw = request_of(s["T"], name, run)
    text = packed(s["T"], "text")
    ref = sample_infinity_reference(s["model"], s["vae"], text, top_k=0, top_p=0.9, seed=3, record_logits=True, **kw)
    pad = lambda t: PaddedText.pad(TextFeatures.coerce(t), s["model"].config.text_maxlen)  # noqa: E731
    request, _, params = engine.bind(text, SamplingParams(top_k=0, top_p=0.9), **kw)
    request.negative = None if kw["negative"] is None else pad(kw["negative"])
    images, _, bad = engine.run_batch(pad(text), torch.tensor([0]), params, model=request, forced_tokens=ref.bits, record_logits=True)
    assert not bad.any()
    for si, (_, sampled_l) in enumerate(engine.last_logits):
        assert rel_err(sampled_l.view_as(ref.logits[si]), ref.logits[si]) < BF16_TOLERANCE["logits"], f"scale {si}"
    assert rel_err(images.float(), ref.images) < BF16_TOLERANCE["images"]


@torch.no_grad()
def test_bf16_engine_casts_no_weight_per_batch(setups, bf16_engines):
    """Weight casts in one batch: none with the Engine's copy; with the float32 model under autocast (the negative
    control) at least one per block and scale (the QKV weight), every batch."""
    s, engine = setups["sq_d16"], bf16_engines["sq_d16"]
    request, cond, params = engine.bind(packed(s["T"], "text"), SamplingParams(top_k=1), pn=5)
    casts = {}
    for label, model in (("copy", engine.model), ("source", engine.source_model)):
        spy = CastSpy(list(model.parameters()) + list(model.buffers()))
        with spy:
            engine.run_batch(cond, torch.tensor([0]), params, model=dataclasses.replace(request, model=model))
        casts[label] = spy.casts
    assert casts["copy"] == 0
    assert casts["source"] >= s["model"].depth * 5, casts


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


class OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.update(tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else (out,)) if torch.is_tensor(t))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_cross_attention_materializes_no_scores(dtype):
    """One SDPA with a boolean key mask: no (B, H, Lq, T) score tensor; bfloat16 inputs (the Engine's, under autocast)
    give the varlen result within one bfloat16 rounding of the output (2^-8 relative, norm-wise well below it)."""
    g = torch.Generator().manual_seed(2)
    lens, T, H, hd, Lq = [2, 11, 6], 16, 4, 24, 7
    q = torch.randn(len(lens), Lq, H, hd, generator=g)
    k, v = torch.randn(sum(lens), H, hd, generator=g), torch.randn(sum(lens), H, hd, generator=g)
    mask = torch.arange(T)[None] < torch.tensor(lens)[:, None]
    kp, vp = (torch.zeros(len(lens), T, H, hd).masked_scatter(mask[..., None, None], t) for t in (k, v))
    spy = OutputShapes()
    with torch.inference_mode(), spy:
        out = masked_cross_attention(q.to(dtype), kp.to(dtype), vp.to(dtype), mask, hd**-0.5)
    assert (len(lens), H, Lq, T) not in spy.shapes
    assert rel_err(out, varlen_cross_attention(q, k, v, lens, hd**-0.5)) < 2**-8


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


def _gpu_engines(s: Dict[str, Any], dtype: torch.dtype, **kw: Any):
    """An eager and a graph Engine in ``dtype`` on copies of the setup's models (an Engine moves and casts its models)."""
    import copy

    return tuple(
        Engine(copy.deepcopy(s["model"]), copy.deepcopy(s["vae"]), max_batch=4, device="cuda", dtype=dtype, cuda_graphs=graphs, **kw)
        for graphs in (False, True)
    )


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.gpu
@gpu
@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES)
def test_infinity_graph_text_path_logits_close(setups, dtype):
    """The graphs' text path (padded text, masked cross-attention) against eager's (packed) on the GPU, given the same
    bits: per-scale logits within GRAPH_LOGITS_REL_TOL."""
    s = setups["wide_d8"]
    engine, _ = _gpu_engines(s, dtype)
    kw = dict(h_div_w=0.5, pn=5, cfg_insertion_layer=(0, -1))
    text = packed(s["T"], "text")
    request, cond, params = engine.bind(text, SamplingParams(cfg=3.0, top_k=0, top_p=0.9, ssg=SSG(beta=0.5)), **kw)
    seed = torch.tensor([0], device="cuda")
    _, bits, _ = engine.run_batch(cond, seed, params, model=request, record_logits=True)
    eager_logits = [l.clone() for _, l in engine.last_logits]
    padded = PaddedText.pad(TextFeatures.coerce(cond), s["model"].config.text_maxlen)
    engine.run_batch(padded, seed, params, model=request, forced_tokens=bits, record_logits=True)
    for si, (_, logits) in enumerate(engine.last_logits):
        assert rel_err(logits, eager_logits[si]) < GRAPH_LOGITS_REL_TOL[dtype], f"scale {si}"


@pytest.mark.gpu
@gpu
@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES)
def test_infinity_graph_replay_agrees_with_eager(setups, dtype):
    """CUDA graphs per (bucket, schedule, where CFG applies): replays with new prompts, a new seed and a cfg and tau
    sweep use one graph, their greedy bits agreeing with eager's (packed text); another schedule captures a new graph."""
    s = setups["wide_d8"]
    eager, graphs = _gpu_engines(s, dtype)
    text = TextFeatures.coerce(packed(s["T"], "text"))
    other = TextFeatures(text.kv_compact.flip(0), text.lens[::-1])
    kw = dict(h_div_w=0.5, pn=5, top_k=1, top_p=0.0, ssg=SSG(beta=0.5), cfg_insertion_layer=(0, -1))
    for t, seed, cfg, tau in ((text, 0, 3.0, 1.0), (other, 1, 3.0, 1.0), (text, 0, 1.5, 1.0), (text, 0, 4.0, 1.0), (text, 0, 3.0, 0.5), (text, 0, 3.0, 2.0)):
        _, a_bits = eager.generate(t, seed=seed, cfg=cfg, temperature=tau, **kw)
        _, b_bits = graphs.generate(t, seed=seed, cfg=cfg, temperature=tau, **kw)
        assert agreement(a_bits, b_bits) >= GREEDY_AGREEMENT[dtype], (seed, cfg, tau)
    assert len(graphs._graphs) == 1
    graphs.generate(text, seed=0, **dict(kw, pn=4))  # a shorter schedule: the KV cache stays, a second graph
    assert len(graphs._graphs) == 2


@pytest.mark.gpu
@gpu
@torch.no_grad()
def test_infinity_graph_owns_what_it_reads(setups):
    """Clearing the RoPE and prior-operator caches, returning freed memory to the driver and scribbling NaN over fresh
    allocations between two replays changes nothing: the graph holds every tensor it reads."""
    import gc

    from ssg_engine import guidance
    from ssg_engine.families.infinity import model as infinity

    _, graphs = _gpu_engines(setups["wide_d8"], torch.bfloat16)
    kw = dict(h_div_w=0.5, pn=5, cfg=3.0, top_k=0, top_p=0.9, seed=0, ssg=SSG(beta=0.5, prior="dse"))
    text = packed(setups["wide_d8"]["T"], "text")
    first_img, first_bits = graphs.generate(text, **kw)
    infinity.device_rope_tables.cache_clear()
    guidance._cached_operator.cache_clear()
    guidance._prior_matrix_f64.cache_clear()
    gc.collect()
    torch.cuda.empty_cache()
    scribble = [torch.full((1 << n,), float("nan"), device="cuda") for n in range(8, 24)]  # reuse freed addresses
    second_img, second_bits = graphs.generate(text, **kw)
    del scribble
    assert len(graphs._graphs) == 1
    assert torch.equal(first_img, second_img) and all(torch.equal(a, b) for a, b in zip(first_bits, second_bits))
