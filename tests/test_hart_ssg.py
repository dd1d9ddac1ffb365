"""SSG on HART's hybrid tokens (docs/ssg_method.md, "SSG on hybrid tokens") and HART's sampling settings
(``params.HARTParams``, ``params.HART_UPSTREAM``), on the golden tiny models (tests/golden/hart; CPU, float32).

The guided logits are checked against the formula computed here from the model's raw logits with the literal DSE
(``guidance.dse_reference``), not against the guidance op the sampler calls."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from ssg_engine import pipeline
from ssg_engine.families.hart import sampler as hart_sampler
from ssg_engine.families.hart.loading import load_hart
from ssg_engine.families.hart.model import maskgit_groups
from ssg_engine.families.hart.sampler import (
    cfg_weights, resolve_hart_params, sample_hart_reference, seeded_orders, upstream_top_k,
)
from ssg_engine.guidance import PRIORS, SSG, dse_reference
from ssg_engine.kernels.sampling import top_k_top_p_mask_reference
from ssg_engine.params import HART_UPSTREAM, HARTParams

GOLDEN = Path(__file__).parent / "golden" / "hart"
CONFIGS = ("a_d2", "b_d3")
assert all((GOLDEN / name / "golden.safetensors").is_file() for name in CONFIGS), f"HART golden data missing from {GOLDEN}"


def golden(name: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / name / "golden.safetensors"))


def run_args(name: str, n: int) -> dict:
    return json.loads((GOLDEN / name / f"ar{n}.json").read_text())


@pytest.fixture(scope="module")
def models():
    return {name: load_hart(GOLDEN / name)[0] for name in CONFIGS}


@pytest.fixture(scope="module")
def contexts():
    return {name: {k: v for k, v in golden(name).items() if k.startswith("ctx.")} for name in CONFIGS}


@pytest.fixture(scope="module")
def off_runs(models, contexts):
    """SSG-off runs of a golden EMA run's settings with seed 7, made once: ``off_runs(name, n)``."""
    done = {}

    def get(name: str, n: int):
        if (name, n) not in done:
            done[name, n] = sample(models[name], contexts[name], seed=7, **settings(name, n))
        return done[name, n]

    return get


def sample(model, ctx, **kw):
    return sample_hart_reference(model, ctx["ctx.tensor"], ctx["ctx.mask"], ctx["ctx.position_ids"], **kw)


def settings(name: str, n: int) -> dict:
    """The golden run's settings as HARTParams keywords (its EMA runs: ar0, ar1)."""
    r = run_args(name, n)
    assert r["weights"] == "ema"
    return dict(cfg=r["cfg"], top_p=r["top_p"], more_smooth=r["more_smooth"], num_maskgit_iters=r["num_maskgit_iters"])


def same(a, b) -> bool:
    tokens = all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    return tokens and torch.equal(a.residual, b.residual) and torch.equal(a.images, b.images)


class Recorder:
    """Wraps the sampler's guidance op, token draw and Gumbel softmax to record what they get, unchanged otherwise."""

    def __init__(self, monkeypatch) -> None:
        self.raw: List[torch.Tensor] = []  # per scale: the model's logits (2B, l, V)
        self.rows: List[torch.Tensor] = []  # per draw call: the logits drawn from (n, V)
        self.top_ks: List[int] = []
        self.soft_in: List[torch.Tensor] = []  # per Gumbel call: its logits input
        self.hard: List[torch.Tensor] = []  # the diffusion head's condition codes
        op, draw = hart_sampler.ssg_guidance_reference, hart_sampler.sample_logits_reference
        gumbel = pipeline.gumbel_softmax

        def rec_op(logits_2B, *a, **k):
            self.raw.append(logits_2B.clone())
            return op(logits_2B, *a, **k)

        def rec_draw(rows, top_k, *a, **k):
            self.rows.append(rows.clone())
            self.top_ks.append(top_k)
            return draw(rows, top_k, *a, **k)

        def rec_gumbel(logits, *a, **k):
            self.soft_in.append(logits.clone())
            return gumbel(logits, *a, **k)

        monkeypatch.setattr(hart_sampler, "ssg_guidance_reference", rec_op)
        monkeypatch.setattr(hart_sampler, "sample_logits_reference", rec_draw)
        monkeypatch.setattr(pipeline, "gumbel_softmax", rec_gumbel)

    def watch_residual(self, model, monkeypatch) -> None:
        residual = type(model).residual

        def rec_residual(m, state, hidden, hard_tokens):
            self.hard.append(hard_tokens.clone())
            return residual(m, state, hidden, hard_tokens)

        monkeypatch.setattr(type(model), "residual", rec_residual)


def per_scale(calls: List[torch.Tensor], K: int, groups: List[torch.Tensor], B: int) -> List[torch.Tensor]:
    """Per-call tensors (B*n, V) or (B, n, V) -> per scale (B, l, V), the last scale's groups put back in grid order."""
    out = [c.reshape(B, -1, c.shape[-1]) for c in calls[: K - 1]]
    last = calls[K - 1 :]
    assert len(last) == len(groups)
    L = sum(g.shape[1] for g in groups)
    full = last[0].new_full((B, L, last[0].shape[-1]), float("nan"))
    for g, c in zip(groups, last):
        full.scatter_(1, g[..., None].expand(-1, -1, c.shape[-1]), c.reshape(B, -1, c.shape[-1]))
    return out + [full]


def expected_guided(raw: List[torch.Tensor], model, cfg: float, beta: float, prior_source: str = "cfg") -> List[torch.Tensor]:
    """``g_k = c_k + beta (c_k - DSE(p_{k-1}))`` in float64 from the raw logits, ``c_k`` upstream's CFG with its
    per-scale weights, ``p`` the previous scale's CFG (or guided) logits; scale 0 unguided."""
    K, pns, B = len(model.patch_nums), model.patch_nums, raw[0].shape[0] // 2
    out, prev = [], None
    for si, (x, t) in enumerate(zip(raw, cfg_weights(cfg, K))):
        x = x.double()
        c = (1 + t) * x[:B] - t * x[B:]
        g = c if si == 0 or beta == 0 else c + beta * (c - dse_reference(prev, pns[si - 1], pns[si]))
        out.append(g)
        prev = g if prior_source == "guided" else c
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def last_groups(model, B: int, seed: int, iters: int) -> List[torch.Tensor]:
    L = model.patch_nums[-1] ** 2
    return maskgit_groups(seeded_orders(B, L, seed + 2), iters) if iters > 1 else [torch.arange(L).expand(B, L)]


# ------------------------------------------------------------------------------------------ (a) beta = 0 is off


@pytest.mark.parametrize("name,n", [(name, n) for name in CONFIGS for n in (0, 1)])
def test_beta_zero_is_ssg_off(name, n, models, contexts, off_runs):
    """Every EMA golden run's settings (a_d2 ar1: 3 MaskGIT passes; b_d3 ar0: 2), seeded rule."""
    zero = sample(models[name], contexts[name], seed=7, ssg=SSG(beta=0.0), **settings(name, n))
    assert same(off_runs(name, n), zero)


def test_beta_zero_reproduces_upstream(models, contexts):
    """SSG(beta=0) with upstream's draws gives upstream's recorded tokens (a_d2 ar1: 3 MaskGIT passes)."""
    name, n = "a_d2", 1
    g, r = golden(name), run_args(name, n)
    torch.manual_seed(r["torch_seed"])
    np.random.seed(r["np_seed"])
    out = sample(models[name], contexts[name], seed=r["g_seed"], upstream_compat=True, ssg=SSG(beta=0.0), **settings(name, n))
    K = len(models[name].patch_nums)
    assert all(torch.equal(out.tokens[si], g[f"ar{n}.idx.{si}"]) for si in range(K - 1))
    for it, group in enumerate(maskgit_groups(g[f"ar{n}.last.orders"], r["num_maskgit_iters"])):
        assert torch.equal(out.tokens[-1].gather(1, group), g[f"ar{n}.last.idx.{it}"])


# ------------------------------------------------------------------------- (b, c) the guided logits, the residual


@pytest.mark.parametrize("name,n,prior_source", [("a_d2", 1, "cfg"), ("b_d3", 0, "cfg"), ("b_d3", 1, "guided")])
def test_guided_logits_follow_the_formula(name, n, prior_source, models, contexts, off_runs, monkeypatch):
    """The logits every scale draws from are ``c + beta (c - DSE(p))`` (b_d3: the odd 7 -> 8 final step), scale 0's
    are CFG only; the diffusion head is conditioned on the codes drawn from them."""
    model, kw, beta, seed = models[name], settings(name, n), 0.75, 7
    rec = Recorder(monkeypatch)
    rec.watch_residual(model, monkeypatch)
    out = sample(model, contexts[name], seed=seed, ssg=SSG(beta=beta, prior_source=prior_source), **kw)
    K, B = len(model.patch_nums), out.tokens[0].shape[0]
    assert len(rec.raw) == K
    groups = last_groups(model, B, seed, kw["num_maskgit_iters"])
    drawn = per_scale(rec.rows, K, groups, B)
    want = expected_guided(rec.raw, model, kw["cfg"], beta, prior_source)
    for si in range(K):
        assert rel(drawn[si], want[si]) < 1e-5, f"scale {si}"
    cfg0 = expected_guided(rec.raw[:1], model, kw["cfg"], 0.0)[0]
    assert torch.equal(drawn[0].double(), cfg0)  # scale 0 is CFG only
    unguided = expected_guided(rec.raw, model, kw["cfg"], 0.0)
    assert rel(drawn[-1], unguided[-1]) > 1e-2  # the final stage is guided
    assert len(rec.hard) == 1 and torch.equal(rec.hard[0], out.tokens[-1])
    off = off_runs(name, n)
    assert not torch.equal(off.tokens[-1], out.tokens[-1]) and not torch.equal(off.residual, out.residual)


# ------------------------------------------------------------------------------------------------ (d) more_smooth


def test_more_smooth_uses_guided_filtered_logits(models, contexts, monkeypatch):
    """Upstream's Gumbel input ``filter(logits) * (1 + ratio)`` takes the guided logits (b_d3 ar0: 2 passes); the
    diffusion head's condition is still the drawn (guided) hard codes, though soft embeddings are fed."""
    name, beta, seed = "b_d3", 0.75, 5
    model, kw = models[name], settings(name, 0)
    assert kw["more_smooth"] and kw["num_maskgit_iters"] == 2
    rec = Recorder(monkeypatch)
    rec.watch_residual(model, monkeypatch)
    out = sample(model, contexts[name], seed=seed, ssg=SSG(beta=beta), **kw)
    assert len(rec.hard) == 1 and torch.equal(rec.hard[0], out.tokens[-1])
    K, B = len(model.patch_nums), out.tokens[0].shape[0]
    soft = per_scale(rec.soft_in, K, last_groups(model, B, seed, 2), B)
    want = expected_guided(rec.raw, model, kw["cfg"], beta)
    for si in range(K):
        ratio = min(si, K - 2) / (K - 1)
        kept = top_k_top_p_mask_reference(want[si].float().reshape(-1, want[si].shape[-1]), upstream_top_k(si), kw["top_p"], 1.0)
        assert torch.equal(torch.isfinite(soft[si]).reshape(kept.shape), kept), f"scale {si} filter"
        finite = soft[si].reshape(kept.shape)[kept]
        assert rel(finite, want[si].reshape(kept.shape)[kept] * (1 + ratio)) < 1e-5, f"scale {si}"


# ------------------------------------------------------------------------------------ (e) ablation priors, options


@pytest.mark.parametrize("ssg", [SSG(beta=1.0, prior=p) for p in PRIORS] + [SSG(beta=1.0, interp="bicubic"),
                                 SSG(beta=1.0, prior_source="guided"), SSG(beta_start=0.5, beta_end=1.5, first_step=2)])
def test_ssg_options_run_and_change_tokens(ssg, models, contexts, off_runs):
    model, ctx, kw = models["a_d2"], contexts["a_d2"], settings("a_d2", 0)
    off = off_runs("a_d2", 0)
    on = sample(model, ctx, seed=7, ssg=ssg, **kw)
    assert on.images.shape == off.images.shape and torch.isfinite(on.images).all()
    assert any(not torch.equal(a, b) for a, b in zip(on.tokens, off.tokens))
    first = ssg.first_step
    assert all(torch.equal(a, b) for a, b in zip(on.tokens[:first], off.tokens[:first]))  # unguided scales unchanged


# ------------------------------------------------------------------------------------------- HARTParams, top-k


def test_hart_upstream_reproduces_sample_py_run(models, contexts):
    """``HART_UPSTREAM`` is sample.py's settings: a_d2's ar0 (recorded with them) comes back image for image."""
    g, r = golden("a_d2"), run_args("a_d2", 0)
    assert (r["cfg"], r["top_p"], r["more_smooth"], r["num_maskgit_iters"]) == (
        HART_UPSTREAM.cfg, HART_UPSTREAM.top_p, HART_UPSTREAM.more_smooth, HART_UPSTREAM.num_maskgit_iters)
    torch.manual_seed(r["torch_seed"])
    np.random.seed(r["np_seed"])
    out = sample(models["a_d2"], contexts["a_d2"], params=HART_UPSTREAM.replace(seed=r["g_seed"]), upstream_compat=True)
    assert all(torch.equal(out.tokens[si], g[f"ar0.idx.{si}"]) for si in range(len(out.tokens) - 1))
    assert torch.equal(out.tokens[-1], g["ar0.last.idx.0"])
    torch.testing.assert_close(out.images, g["ar0.img"], rtol=1e-6, atol=1e-6)


def test_params_and_keywords_agree(models, contexts):
    model, ctx = models["a_d2"], contexts["a_d2"]
    p = HARTParams(cfg=2.0, top_p=0.9, seed=11, more_smooth=True, num_maskgit_iters=3, ssg=SSG(beta=0.5))
    assert same(sample(model, ctx, params=p), sample(model, ctx, cfg=2.0, top_p=0.9, seed=11, more_smooth=True,
                                                           num_maskgit_iters=3, ssg=SSG(beta=0.5)))
    assert resolve_hart_params(p, {"seed": 1}, model) == p.replace(seed=1)  # keywords override params' fields
    assert resolve_hart_params(None, {}, model) == HARTParams()
    assert resolve_hart_params(HARTParams(ssg=SSG()), {}, model).ssg.beta is not None  # the model's beta filled in


def test_top_k_upstream_rule_or_honoured(models, contexts, monkeypatch):
    """top_k=None: upstream's 600 below scale 7, 300 at b_d3's last scale 7; an integer applies at every scale."""
    model, ctx = models["b_d3"], contexts["b_d3"]
    rec = Recorder(monkeypatch)
    sample(model, ctx, seed=2, num_maskgit_iters=2)
    assert rec.top_ks == [600] * 7 + [300, 300]
    rec.top_ks.clear()
    sample(model, ctx, seed=2, top_k=3)
    assert rec.top_ks == [3] * 8


def test_temperature_divides_guided_logits(models, contexts, monkeypatch):
    model, ctx = models["a_d2"], contexts["a_d2"]
    rec = Recorder(monkeypatch)
    sample(model, ctx, seed=2, ssg=SSG(beta=0.5))
    sample(model, ctx, seed=2, ssg=SSG(beta=0.5), temperature=2.0)
    K = len(model.patch_nums)
    assert torch.equal(rec.rows[K], rec.rows[0] / 2.0)  # scale 0: the same logits, halved
    want = expected_guided(rec.raw[K:], model, HARTParams().cfg, 0.5)
    for si in range(1, K):
        assert rel(rec.rows[K + si], want[si].reshape(rec.rows[K + si].shape) / 2.0) < 1e-5, f"scale {si}"


def test_bad_params(models, contexts):
    model, ctx = models["a_d2"], contexts["a_d2"]
    with pytest.raises(TypeError, match="params must be"):
        sample(model, ctx, params=HARTParams().__dict__)
    with pytest.raises(TypeError):
        sample(model, ctx, seed=1, top_kk=3)
    for bad, field in ((dict(top_k=-1), "top_k"), (dict(num_maskgit_iters=0), "num_maskgit_iters"),
                       (dict(more_smooth="yes"), "more_smooth"), (dict(temperature=0.0), "temperature")):
        with pytest.raises(ValueError, match=field):
            HARTParams(**bad)
