"""The Infinity reference sampler vs upstream's ``autoregressive_infer_cfg`` (tests/golden/infinity), and SSG on bit logits."""
from __future__ import annotations

import json
from typing import Any, Dict, Tuple

import pytest
import torch
from conftest import INFINITY_CONFIGS as CONFIGS
from conftest import INFINITY_GOLDEN as INF
from conftest import load_golden_infinity, packed, rel_err

from ssg_engine.guidance import SSG, dse_reference, prior_operator
from ssg_engine.families.infinity.sampler import sample_infinity_reference
from ssg_engine.kernels.ssg_guidance import ssg_guidance_reference
from ssg_engine.families.infinity.tokenizer import load_bsq_vae
from ssg_engine.families.infinity.model import InfinityTransformer

TOL = 1e-5


@pytest.fixture(scope="module")
def models() -> Dict[str, Tuple[InfinityTransformer, Dict[str, torch.Tensor]]]:
    return {name: load_golden_infinity(name) for name in CONFIGS}


def run_args(T: Dict[str, torch.Tensor], name: str, run: int) -> Dict[str, Any]:
    """``sample_infinity_reference`` keywords of the recorded upstream call ``ar{run}``."""
    a = json.loads((INF / name / f"ar{run}.json").read_text())
    return dict(
        text=packed(T, "text"), schedule=a["scale_schedule"], cfg_list=a["cfg_list"], tau_list=a["tau_list"],
        top_k=a["top_k"], top_p=a["top_p"], seed=a["g_seed"], cfg_insertion_layer=a["cfg_insertion_layer"],
        negative=packed(T, "neg") if a["negative_label_B_or_BLT"] else None,
    )


@torch.no_grad()
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("run", [0, 1, 2])
def test_golden_runs(models, name, run):
    """Same seed, same bits at every scale, the same guided logits and decoder input (and image for ar0) as upstream."""
    model, T = models[name]
    vae = load_bsq_vae(INF / name / "vae.pth") if run == 0 else None  # only ar0 keeps its image
    out = sample_infinity_reference(model, vae, **run_args(T, name, run), record_logits=True)
    B = T[f"ar{run}.bits.0"].shape[0]
    for si, bits in enumerate(out.bits):
        assert torch.equal(bits, T[f"ar{run}.bits.{si}"].reshape(B, bits.shape[1], -1).long()), f"scale {si}"
        assert rel_err(out.logits[si], T[f"ar{run}.logits.{si}"]) < TOL, f"scale {si}"
    assert rel_err(out.summed_codes, T[f"ar{run}.summed_codes"]) < TOL
    if run == 0:
        assert rel_err(out.images, T["ar0.img"].add(1).mul(0.5)) < TOL
    else:
        assert out.images is None


@torch.no_grad()
def test_ssg_beta_zero_is_upstream(models):
    model, T = models["sq_d16"]
    vae = load_bsq_vae(INF / "sq_d16" / "vae.pth")
    args = run_args(T, "sq_d16", 0)
    base = sample_infinity_reference(model, vae, **args)
    off = sample_infinity_reference(model, vae, **args, ssg=SSG(beta=0.0))
    assert all(torch.equal(a, b) for a, b in zip(base.bits, off.bits))
    assert torch.equal(base.images, off.images)


@torch.no_grad()
def test_ssg_on_bit_logits_by_hand(models):
    """Non-square scales (wide_d8: (2, 4) -> (3, 6) -> ...), CFG on logits and at a layer, a negative prompt: each
    scale's guided logits are DSE computed literally per (bit, side) map of the previous CFG-combined logits, and
    top_k=1 draws the larger logit of each bit."""
    model, T = models["wide_d8"]
    beta = 1.5
    out = sample_infinity_reference(model, None, **dict(run_args(T, "wide_d8", 1), top_k=1, top_p=0.0),
                                    ssg=SSG(beta=beta), record_logits=True)
    sched = [tuple(s[1:]) for s in run_args(T, "wide_d8", 1)["schedule"]]
    assert torch.equal(out.logits[0], out.cfg_logits[0])  # no prior at scale 0
    for si in range(1, len(sched)):
        (h, w), (H, W) = sched[si - 1], sched[si]
        prev, cfg = out.cfg_logits[si - 1], out.cfg_logits[si]  # (B, h*w, d, 2)
        B, _, d, _ = prev.shape
        expected = torch.empty_like(cfg)
        for k in range(d):
            for s in range(2):
                prior = dse_reference(prev[:, :, k, s].double().unsqueeze(-1), (h, w), (H, W)).squeeze(-1)
                expected[:, :, k, s] = (cfg[:, :, k, s] + beta * (cfg[:, :, k, s] - prior)).float()
        assert rel_err(out.logits[si], expected) < 1e-5, f"scale {si}"
        greedy = (out.logits[si][..., 1] > out.logits[si][..., 0]).long()
        tie = out.logits[si][..., 1] == out.logits[si][..., 0]
        assert torch.equal(out.bits[si][~tie], greedy[~tie])


def test_ssg_on_the_pair_is_ssg_on_the_difference():
    """A bit's probability is sigmoid(l1 - l0), and SSG is linear: guiding both logits and then taking the difference
    equals guiding the difference (with the differences of the previous scale as the prior's input)."""
    g = torch.Generator().manual_seed(0)
    B, (h, w), (H, W), d = 2, (3, 6), (5, 10), 8
    cur = torch.randn(2 * B, H * W, d, 2, generator=g, dtype=torch.float64) * 3
    prev = torch.randn(B, h * w, d, 2, generator=g, dtype=torch.float64) * 3
    op = prior_operator("dse", (h, w), (H, W), dtype=torch.float64)
    t, beta = 1.5, 2.0
    pair, _ = ssg_guidance_reference(cur.reshape(2 * B, H * W, 2 * d), prev.reshape(B, h * w, 2 * d), op, t, beta)
    pair = pair.double().view(B, H * W, d, 2)
    diff_cur, diff_prev = cur[..., 1] - cur[..., 0], prev[..., 1] - prev[..., 0]
    cfg = (1 + t) * diff_cur[:B] - t * diff_cur[B:]
    diff = cfg + beta * (cfg - op @ diff_prev)
    assert torch.allclose(pair[..., 1] - pair[..., 0], diff, rtol=1e-5, atol=1e-4)
    assert torch.allclose(pair.softmax(-1)[..., 1], torch.sigmoid(diff), atol=1e-5)


@torch.no_grad()
def test_ssg_changes_greedy_bits(models):
    model, T = models["sq_d16"]
    args = dict(run_args(T, "sq_d16", 1), top_k=1)  # greedy per bit
    base = sample_infinity_reference(model, None, **args)
    guided = sample_infinity_reference(model, None, **args, ssg=SSG(beta=4.0))
    assert torch.equal(base.bits[0], guided.bits[0])  # no prior at scale 0
    changed = sum(int((a != b).sum()) for a, b in zip(base.bits[1:], guided.bits[1:]))
    assert changed > 0


def test_bad_lists_are_clear_errors(models):
    model, T = models["sq_d16"]
    args = run_args(T, "sq_d16", 2)
    with pytest.raises(ValueError, match="cfg_list"):
        sample_infinity_reference(model, None, **dict(args, cfg_list=[1.0, 1.0]))
    with pytest.raises(ValueError, match="tau_list"):
        sample_infinity_reference(model, None, **dict(args, tau_list=[0.0] * 7))


def test_prompt_longer_than_the_unconditional_text_is_a_clear_error(models):
    """CFG pairs each prompt with ``cfg_uncond[:len]``: a longer prompt is one ValueError line, not a shape traceback."""
    from ssg_engine.families.infinity.model import TextFeatures

    model, _ = models["sq_d16"]
    n = model.config.text_maxlen + 8
    text = TextFeatures(torch.randn(n, model.Ct5), [n])
    with pytest.raises(ValueError, match=rf"^text: a prompt has {n} tokens.*text_maxlen={n - 8}; shorten the prompt[^\n]*$"):
        sample_infinity_reference(model, None, text, [(1, 1), (2, 2)], cfg_list=[3.0] * 2, tau_list=[1.0] * 2, seed=0)
    out = sample_infinity_reference(model, None, text, [(1, 1), (2, 2)], cfg_list=[1.0] * 2, tau_list=[1.0] * 2, seed=0)
    assert out.bits[1].shape == (1, 4, model.d)  # without CFG no unconditional text is needed (as upstream)
