"""The Engine's fused path (issue #20) against the reference sampler, on the CPU interpreter (``TRITON_INTERPRET=1``).

With ``backend="triton"`` every transformer block runs five fused kernels around the attention (LayerNorm + AdaLN
modulate, the QKV epilogue writing the static cache, out-projection + gate + residual, LayerNorm + modulate, fc1 +
GELU, fc2 + gate + residual), the head's AdaLN is one kernel and the VAE decoders' GroupNorm + SiLU pairs are one
kernel each; the reference sampler keeps the eager PyTorch sequence (the oracle). Given the reference's tokens, the
logits agree to float32 summation order (< 1e-5 norm-relative, the bound of tests/test_engine.py), on VAR's golden
model, a shared-AdaLN VAR without L2-normalised attention, and both Infinity golden configurations; greedy tokens
are identical; bfloat16 stays within the bf16 bounds of the existing Engine tests. A spy checks that the fused
kernels are what runs: so many launches of each per batch, and no eager LayerNorm or GELU.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Dict

import pytest
import torch
from conftest import INFINITY_GOLDEN as INF
from conftest import load_golden_infinity, packed, rel_err

from ssg_engine import SSG, SamplingParams
from ssg_engine.families.var.config import ModelConfig
from ssg_engine.engine import Engine
from ssg_engine.families.infinity.sampler import sample_infinity_reference
from ssg_engine.kernels import KernelLaunch
from ssg_engine.loading import build_models, load_models
from ssg_engine.families.infinity.tokenizer import load_bsq_vae
from ssg_engine.families.var.sampler import sample_reference

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the fused path needs TRITON_INTERPRET=1 on CPU (set by the README test command) or a GPU",
)
pytest.importorskip("triton", reason="the fused path runs Triton kernels")

LABELS = torch.tensor([1, 7, 3])
FP32_TOL = 1e-5  # VAR, float32: the kernels sum in another order than PyTorch's eager ops (measured <= 1e-6 here)
# Infinity, float32: the golden models amplify summation-order differences (cosine attention with per-head scales up
# to 100): the fused path measures 3.0e-5 at sq_d16's scale 2 whichever single op is swapped back to its reference,
# and the Engine's own padded-vs-packed text path differs by up to 2e-4 (conftest.GRAPH_LOGITS_REL_TOL); 3x margin
INFINITY_FP32_TOL = 1e-4
# bfloat16 Engine vs the float32 reference (tests/test_engine.py and tests/test_infinity_engine.py bounds); the
# interpreter truncates float32 -> bfloat16 stores where a GPU rounds to nearest, which doubles the unit roundoff
BF16_TOL = {"logits": 3e-2, "images": 3e-2}


def var_shared_aln_no_l2() -> tuple:
    """A random tiny VAR with shared AdaLN and plain (not L2-normalised) attention: the other switches' fused path."""
    cfg = ModelConfig(V=64, Cvae=8, ch=32, patch_nums=(1, 2, 3, 5), depth=3, embed_dim=96, num_heads=3, num_classes=10,
                      attn_l2_norm=False, shared_aln=True, ch_mult=(1, 2), num_res_blocks=1)
    torch.manual_seed(0)
    vae, var = build_models(cfg, "cpu")
    for p in var.parameters():  # non-trivial modulation, gates and biases
        torch.nn.init.normal_(p, 0.0, 0.05)
    return vae.eval(), var.eval()


@pytest.fixture(scope="module")
def var_models(tiny_dir) -> Dict[str, tuple]:
    golden = load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=tiny_dir / "config.json")
    return {"golden": golden, "shared_aln_no_l2": var_shared_aln_no_l2()}


class KernelSpy:
    """Counts Triton launches per kernel name (``KernelLaunch.run`` patched) and eager LayerNorm / GELU / GroupNorm
    calls (``torch.nn.functional`` patched)."""

    def __init__(self, monkeypatch) -> None:
        self.kernels: collections.Counter = collections.Counter()
        self.eager: collections.Counter = collections.Counter()
        run = KernelLaunch.run

        def spy_run(launch: KernelLaunch) -> None:
            self.kernels[(getattr(launch.kernel, "__name__", None) or launch.kernel.fn.__name__).lstrip("_")] += 1
            run(launch)

        monkeypatch.setattr(KernelLaunch, "run", spy_run)
        for name in ("layer_norm", "gelu", "group_norm"):
            original = getattr(torch.nn.functional, name)

            def eager(*args, _original=original, _name=name, **kwargs):
                self.eager[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(torch.nn.functional, name, eager)


@torch.no_grad()
@pytest.mark.parametrize("name", ["golden", "shared_aln_no_l2"])
def test_var_fused_logits_match_reference(var_models, name):
    vae, var = var_models[name]
    params = SamplingParams(cfg=2.0, top_k=40, top_p=0.9, temperature=0.9, seed=3, ssg=SSG(beta=0.8))
    ref = sample_reference(var, 3, LABELS % var.num_classes, params, record_logits=True)
    engine = Engine(var, vae, max_batch=4, device="cpu", dtype=torch.float32, cuda_graphs=False, backend="triton")
    images, _, bad = engine.run_batch(LABELS % var.num_classes, torch.tensor([0]), params, forced_tokens=ref.tokens, record_logits=True)
    assert not bad.any()
    for si, (cfg_l, sampled_l) in enumerate(engine.last_logits):
        assert rel_err(cfg_l, ref.cfg_logits[si]) < FP32_TOL, f"cfg logits at scale {si}"
        assert rel_err(sampled_l, ref.sampled_logits[si]) < FP32_TOL, f"sampled logits at scale {si}"
    assert rel_err(images, ref.images) < FP32_TOL


@torch.no_grad()
def test_var_fused_kernels_are_what_runs(var_models, monkeypatch):
    """One batch of the golden VAR on the fused path: per block and scale one launch of each LN/QKV kernel pair and
    of the GEMM epilogues, the head's AdaLN once per scale, GroupNorm + SiLU in the decoder, and no eager LayerNorm,
    GELU or GroupNorm anywhere."""
    vae, var = var_models["golden"]
    engine = Engine(var, vae, max_batch=2, device="cpu", dtype=torch.float32, cuda_graphs=False, backend="triton")
    spy = KernelSpy(monkeypatch)
    engine.generate([1, 2], top_k=1, top_p=0.0, seed=0)
    K, depth = len(var.patch_nums), var.depth
    assert spy.kernels["ada_ln_modulate_kernel"] == K * (2 * depth + 1)
    assert spy.kernels["qkv_norm_rope_cache_kernel"] == K * depth
    assert spy.kernels["matmul_gated_residual_kernel"] == K * 2 * depth
    assert spy.kernels["matmul_gelu_kernel"] == K * depth
    assert spy.kernels["group_norm_silu_kernel"] > 0
    assert not spy.eager, f"eager ops on the fused path: {dict(spy.eager)}"


@torch.no_grad()
def test_var_fused_greedy_tokens_identical(var_models):
    """Greedy tokens of the fused float32 Engine equal the reference's (golden VAR, SSG on)."""
    vae, var = var_models["golden"]
    ref = sample_reference(var, 3, LABELS, seed=0, cfg=1.5, top_k=1, ssg=SSG(beta=0.8))
    engine = Engine(var, vae, max_batch=4, device="cpu", dtype=torch.float32, cuda_graphs=False, backend="triton")
    _, tokens = engine.generate(LABELS, cfg=1.5, top_k=1, top_p=0.0, seed=5, ssg=SSG(beta=0.8))
    assert all(torch.equal(a, b) for a, b in zip(tokens, ref.tokens))


@torch.no_grad()
def test_var_fused_bf16_close_to_reference():
    """The bfloat16 fused Engine (every kernel storing bf16) given the float32 reference's tokens: within the bf16
    bounds (the small shared-AdaLN model: the interpreter's bf16 GEMMs are slow)."""
    vae, var = var_shared_aln_no_l2()
    params = SamplingParams(cfg=1.5, top_k=1, ssg=SSG(beta=0.8))
    ref = sample_reference(var, 3, LABELS, params, record_logits=True)
    vae16, var16 = var_shared_aln_no_l2()  # an Engine casts the models it is given in place: its own copy
    bf16 = Engine(var16, vae16, max_batch=4, device="cpu", dtype=torch.bfloat16, cuda_graphs=False, backend="triton")
    images, _, _ = bf16.run_batch(LABELS, torch.tensor([0]), params, forced_tokens=ref.tokens, record_logits=True)
    for si, (cfg_l, _) in enumerate(bf16.last_logits):
        assert rel_err(cfg_l, ref.cfg_logits[si]) < BF16_TOL["logits"], f"scale {si}"
    assert rel_err(images.float(), ref.images) < BF16_TOL["images"]


# ------------------------------------------------------------------------------------------------ Infinity


@pytest.fixture(scope="module")
def infinity_setups() -> Dict[str, dict]:
    out = {}
    for name in ("sq_d16", "wide_d8"):
        model, T = load_golden_infinity(name)
        out[name] = dict(model=model, vae=load_bsq_vae(INF / name / "vae.pth"), T=T)
    return out


def _request(T, name: str, run: int) -> dict:
    a = json.loads((INF / name / f"ar{run}.json").read_text())
    return dict(schedule=a["scale_schedule"], cfg_list=a["cfg_list"], tau_list=a["tau_list"],
                cfg_insertion_layer=a["cfg_insertion_layer"], negative=packed(T, "neg") if a["negative_label_B_or_BLT"] else None)


@torch.no_grad()
@pytest.mark.parametrize("name,run,dtype", [("sq_d16", 0, torch.float32), ("wide_d8", 1, torch.float32), ("sq_d16", 1, torch.bfloat16)],
                         ids=["sq_d16-fp32", "wide_d8-fp32", "sq_d16-bf16"])
def test_infinity_fused_logits_match_reference(infinity_setups, name, run, dtype):
    """Both golden configurations (CFG on logits and at a layer, negative text, RoPE) on the fused path, given the
    reference's bits: float32 within INFINITY_FP32_TOL, bfloat16 (autocast, the kernels writing bf16) within BF16_TOL."""
    s = infinity_setups[name]
    kw = _request(s["T"], name, run)
    text = packed(s["T"], "text")
    ssg = SSG(beta=0.8)
    ref = sample_infinity_reference(s["model"], s["vae"], text, top_k=0, top_p=0.9, seed=3, ssg=ssg, record_logits=True, **kw)
    engine = Engine(s["model"], s["vae"], max_batch=4, device="cpu", dtype=dtype, cuda_graphs=False, backend="triton")
    request, cond, params = engine.bind(text, SamplingParams(top_k=0, top_p=0.9, ssg=ssg), **kw)
    images, _, bad = engine.run_batch(cond, torch.tensor([0]), params, model=request, forced_tokens=ref.bits, record_logits=True)
    assert not bad.any()
    tol = INFINITY_FP32_TOL if dtype == torch.float32 else BF16_TOL["logits"]
    for si, (cfg_l, sampled_l) in enumerate(engine.last_logits):
        assert rel_err(cfg_l.view_as(ref.cfg_logits[si]), ref.cfg_logits[si]) < tol, f"cfg logits at scale {si}"
        assert rel_err(sampled_l.view_as(ref.logits[si]), ref.logits[si]) < tol, f"sampled logits at scale {si}"
    assert rel_err(images.float(), ref.images) < (FP32_TOL if dtype == torch.float32 else BF16_TOL["images"])
