"""Infinity transformer vs upstream: tests/golden/infinity/{sq_d16,wide_d8} (see the README there)."""
from __future__ import annotations

import json
from typing import Any, Dict, Tuple

import pytest
import torch
from conftest import INFINITY_CONFIGS as CONFIGS
from conftest import INFINITY_GOLDEN as INF
from conftest import TINY, golden_infinity_config, load_golden_infinity, packed, rel_err

from ssg_engine.families.infinity.model import (
    InfinityConfig,
    InfinityState,
    InfinityTransformer,
    TextFeatures,
    as_schedule,
    scale_schedule,
)
from ssg_engine.families.infinity.tokenizer import bits_to_codes
from ssg_engine.pipeline import ConcatKVCache

TOL = 1e-5


@pytest.fixture(scope="module", params=CONFIGS)
def case(request) -> Tuple[str, InfinityTransformer, Dict[str, torch.Tensor], Dict[str, Any]]:
    name = request.param
    model, T = load_golden_infinity(name)
    return name, model, T, json.loads((INF / name / "config.json").read_text())


@torch.no_grad()
def test_schedule_and_text_from_golden(case):
    name, model, T, config = case
    assert as_schedule(config["scale_schedule"]) == scale_schedule(config["h_div_w"], config["pn"])
    assert torch.equal(model.cfg_uncond, T["cfg_uncond"])
    cond, ca = model.encode_text(TextFeatures.coerce(packed(T, "text")))
    assert rel_err(cond, T["tf.cond_BD"]) < TOL and rel_err(ca, T["tf.ca_kv"]) < TOL


@torch.no_grad()
def test_teacher_forced_logits(case):
    name, model, T, config = case
    logits = model(packed(T, "text"), T["tf.x_BLC_wo_prefix"], config["scale_schedule"])
    assert logits.shape == T["tf.logits"].shape
    err = rel_err(logits, T["tf.logits"])
    print(f"{name}: tf.logits rel. error {err:.1e}")
    assert err < TOL
    kv, lens, cu, _ = packed(T, "text")
    first = (kv[: lens[0]], lens[:1], cu[:2], int(lens[0]))
    err = rel_err(model(first, T["enc.x_BLC_wo_prefix"], config["scale_schedule"]), T["enc.logits"])
    print(f"{name}: enc.logits rel. error {err:.1e}")
    assert err < TOL


@torch.no_grad()
def test_padded_text_equals_packed(case):
    name, model, T, config = case
    kv, lens, _, _ = packed(T, "text")
    Tmax = int(lens.max()) + 3
    feats = torch.full((len(lens), Tmax, kv.shape[1]), 7.0)
    mask = torch.arange(Tmax)[None] < lens[:, None]
    feats[mask] = kv
    x = T["tf.x_BLC_wo_prefix"]
    assert torch.equal(model((feats, mask), x, config["scale_schedule"]), model(packed(T, "text"), x, config["scale_schedule"]))


def replay(model: InfinityTransformer, T: Dict[str, torch.Tensor], name: str, run: int) -> Tuple[InfinityState, float]:
    """Run ``ar{run}``'s KV-cached steps with the recorded bits forced; the state after the last scale and the worst
    per-scale rel. error of the logits (temperature and logit CFG applied here as upstream does)."""
    a = json.loads((INF / name / f"ar{run}.json").read_text())
    state = model.condition(
        packed(T, "text"), a["scale_schedule"], negative=packed(T, "neg") if a["negative_label_B_or_BLT"] else None,
        cfg_list=a["cfg_list"], cfg_insertion_layer=a["cfg_insertion_layer"],
    )
    B = state.batch
    assert state.rows == (B if all(c == 1 for c in a["cfg_list"]) else 2 * B)
    assert rel_err(state.cond_BD, T[f"ar{run}.cond_BD"]) < TOL
    kv = ConcatKVCache(model.depth)
    worst = 0.0
    for si, (h, w) in enumerate(state.schedule):
        logits = model.step(state, si, kv).mul(1 / a["tau_list"][si])
        cfg = a["cfg_list"][si]
        mixed = cfg != 1 and 0 in a["cfg_insertion_layer"]
        assert logits.shape == ((2 * B if mixed else B), h * w, model.d, 2)
        if mixed:
            logits = cfg * logits[:B] + (1 - cfg) * logits[B:]
        worst = max(worst, rel_err(logits, T[f"ar{run}.logits.{si}"]))
        bits = T[f"ar{run}.bits.{si}"]
        assert (bits_to_codes(bits) - T[f"ar{run}.codes.{si}"]).abs().max() < 1e-6
        model.next_input(state, si, bits.reshape(B, h * w, -1))
    return state, worst


@torch.no_grad()
@pytest.mark.parametrize("run", [0, 1, 2])
def test_cached_steps_with_golden_bits(case, run):
    """ar2: no CFG; ar0/ar1: CFG on logits and/or at a layer's output, negative prompt (see the golden README)."""
    name, model, T, config = case
    state, worst = replay(model, T, name, run)
    print(f"{name} ar{run}: worst per-scale logits rel. error {worst:.1e}")
    assert worst < TOL
    assert rel_err(state.summed_codes, T[f"ar{run}.summed_codes"]) < TOL
    if run == 2:

        class RecordingVAE:
            def decode(self, z: torch.Tensor) -> torch.Tensor:
                self.z = z
                return torch.zeros(z.shape[0], 3, 16 * z.shape[2], 16 * z.shape[3])

        vae = RecordingVAE()
        img = model.decode(state, vae)
        assert vae.z.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(vae.z, T["ar2.summed_codes"].squeeze(2))
        assert torch.equal(img, torch.full_like(img, 0.5))


@torch.no_grad()
def test_decode_with_bsq_vae(case):
    """ar0's image from the replayed state through the BSQ VAE (ssg_engine.models.bsq_vae, when present)."""
    bsq_vae = pytest.importorskip("ssg_engine.families.infinity.tokenizer")
    name, model, T, config = case
    state, _ = replay(model, T, name, 0)
    img = model.decode(state, bsq_vae.load_bsq_vae(INF / name / "vae.pth"))
    err = rel_err(img, T["ar0.img"].add(1).mul(0.5))
    print(f"{name}: ar0 image rel. error {err:.1e}")
    assert err < TOL


def test_wrong_state_dict_is_one_clear_line():
    model = InfinityTransformer(golden_infinity_config("wide_d8")).eval()
    with pytest.raises(ValueError) as e:
        model.load_upstream(torch.load(INF / "sq_d16" / "infinity.pth", weights_only=True))
    assert "\n" not in str(e.value) and "not an Infinity state dict" in str(e.value) and "wrong shapes" in str(e.value)
    var = torch.load(TINY / "var.pth", weights_only=True)
    with pytest.raises(ValueError, match=r"^not an Infinity state dict.*missing.*unexpected[^\n]*$"):
        model.load_upstream(var)


@torch.no_grad()
def test_bad_inputs_are_clear_errors(case):
    name, model, T, config = case
    x, sched = T["tf.x_BLC_wo_prefix"], config["scale_schedule"]
    kv, lens, cu, m = packed(T, "text")
    with pytest.raises(ValueError, match="Ct5"):
        model((kv[:, :-1], lens, cu, m), x, sched)
    with pytest.raises(ValueError, match="at least one prompt"):
        model((kv[:0], [], cu[:1], 0), x[:0], sched)
    with pytest.raises(ValueError, match="not in Infinity's table"):
        scale_schedule(0.9)
    with pytest.raises(ValueError, match="dynamic-resolution table"):
        model(packed(T, "text"), x, [(1, 1), (3, 3)])
    with pytest.raises(ValueError, match="x_BLC_wo_prefix"):
        model(packed(T, "text"), x[:, 1:], sched)
    with pytest.raises(ValueError, match="prefix"):
        TextFeatures.from_padded(torch.zeros(1, 3, kv.shape[1]), torch.tensor([[False, True, True]]))
    with pytest.raises(ValueError, match="not supported"):
        InfinityConfig.from_upstream(dict(config["infinity"], rms_norm=True), 8)


def test_config_from_golden_json():
    for name in CONFIGS:
        c = json.loads((INF / name / "config.json").read_text())
        cfg = InfinityConfig.from_upstream(c["infinity"], c["vae"]["vae_model"]["codebook_dim"])
        assert (cfg.depth, cfg.block_chunks, cfg.fused_norm) == (c["infinity"]["depth"], c["infinity"]["block_chunks"], True)
