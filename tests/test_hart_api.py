"""HART as the third registered family: its spec and checkpoint markers, ``se.load_hart`` on upstream's released
layout (the golden tiny a_d2 folders), ``se.generate`` with HART text features, and wrong-family pairs refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import INFINITY_GOLDEN

import ssg_engine as se
from ssg_engine.families import detect_family, family, family_of, split_keywords
from ssg_engine.loading import CheckpointError, read_state_dict
from ssg_engine.seeding import row_seeds

GOLDEN = Path(__file__).resolve().parent / "golden"
A = GOLDEN / "hart" / "a_d2"
TINY = GOLDEN / "var_tiny"
INF = INFINITY_GOLDEN / "sq_d16"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hart():
    return se.load_hart(A / "llm", A / "tokenizer")


@pytest.fixture(scope="module")
def var_pair():
    return se.load_models(TINY / "var.pth", TINY / "vae.pth", TINY / "config.json")  # (vae, var)


@pytest.fixture(scope="module")
def inf_pair():
    with pytest.warns(se.AssumedSettingWarning, match="fused_norm"):
        return se.load_infinity(INF / "infinity.pth", INF / "vae.pth")  # (model, vae)


def features(model, lens=(5, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    Lc, Cc = model.context_token, model.context_embed.weight.shape[1]
    return se.HARTTextFeatures(torch.randn(len(lens), Lc, Cc, generator=g), torch.arange(Lc)[None] < torch.tensor(lens)[:, None])


def test_markers_pick_exactly_one_kind_of_every_family():
    hart = family("hart")
    files = {"hart": A / "llm" / "ema_model.bin", "hart_tokenizer": A / "tokenizer" / "model.safetensors",
             "var": TINY / "var.pth", "vqvae": TINY / "vae.pth", "infinity": INF / "infinity.pth", "bsq_vae": INF / "vae.pth"}
    found = {kind: detect_family(read_state_dict(path)) for kind, path in files.items()}
    assert {k: (spec.name, kind) for k, (spec, kind) in found.items()} == {
        "hart": ("hart", "hart"), "hart_tokenizer": ("hart", "hart_tokenizer"), "var": ("var", "var"),
        "vqvae": ("var", "vqvae"), "infinity": ("infinity", "infinity"), "bsq_vae": ("infinity", "bsq_vae")}
    assert hart.loader_name == "load_hart" and hart.text_conditional and hart.engine and hart.engine_bind is not None


def test_load_hart_prefers_ema_and_takes_files(hart, tmp_path):
    model, tok = hart
    assert model.tokenizer is tok and family_of(model) is family("hart")
    ema = read_state_dict(A / "llm" / "ema_model.bin")
    assert torch.equal(model.state_dict()["word_embed.weight"], ema["word_embed.weight"])
    plain, _ = se.load_hart(A / "llm", A / "tokenizer", prefer_ema=False)
    assert not torch.equal(plain.state_dict()["word_embed.weight"], ema["word_embed.weight"])
    root_model, _ = se.load_hart(A)  # a released root with llm/ and tokenizer/
    assert torch.equal(root_model.state_dict()["word_embed.weight"], ema["word_embed.weight"])
    single, _ = se.load_hart(A / "llm" / "model.safetensors", A / "tokenizer" / "model.safetensors")
    assert torch.equal(single.state_dict()["word_embed.weight"], plain.state_dict()["word_embed.weight"])


def test_load_hart_missing_config_names_what_to_give(tmp_path):
    shutil.copy(A / "llm" / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no config.json in .*give config="):
        se.load_hart(tmp_path, A / "tokenizer")
    cfg = json.loads((A / "llm" / "config.json").read_text())
    model, _ = se.load_hart(tmp_path, A / "tokenizer", config=cfg)
    assert model.context_token == cfg.get("context_token", model.context_token)


@pytest.mark.parametrize("llm, tok, match", [
    (TINY / "var.pth", A / "tokenizer" / "model.safetensors", "load_models"),
    (INF / "infinity.pth", A / "tokenizer" / "model.safetensors", "load_infinity"),
    (A / "llm" / "model.safetensors", TINY / "vae.pth", "load_models"),
    (A / "llm" / "model.safetensors", INF / "vae.pth", "load_infinity"),
    (A / "tokenizer" / "model.safetensors", A / "llm" / "model.safetensors", "swapped"),
])
def test_load_hart_refuses_other_families(tmp_path, llm, tok, match):
    for part, src in (("llm", A / "llm"), ("tok", A / "tokenizer")):
        (tmp_path / part).mkdir()
        shutil.copy(src / "config.json", tmp_path / part / "config.json")
    shutil.copy(llm, tmp_path / "llm" / llm.name)
    shutil.copy(tok, tmp_path / "tok" / tok.name)
    with pytest.raises(CheckpointError, match=match):
        se.load_hart(tmp_path / "llm" / llm.name, tmp_path / "tok" / tok.name)


def test_other_loaders_refuse_hart_checkpoints():
    with pytest.raises(CheckpointError, match="load_hart"):
        se.load_models(A / "llm" / "model.safetensors", TINY / "vae.pth", TINY / "config.json")
    with pytest.raises(CheckpointError, match="load_hart"):
        se.load_infinity(INF / "infinity.pth", A / "tokenizer" / "model.safetensors")


def test_generate_hart_features_and_tuples(hart):
    model, tok = hart
    f = features(model)
    images, tokens = se.generate(model, tok, f, cfg=2.0, seed=3, return_tokens=True)
    assert images.shape == (2, 3, 12, 12) and 0 <= images.min() and images.max() <= 1
    assert [t.shape[1] for t in tokens] == [p * p for p in model.patch_nums]
    keys = row_seeds(3, 2)  # generate's default: image r keyed by (seed, r)
    want = se.sample_hart_reference(model, f.context, f.context_mask, f.context_position_ids, se.HARTParams(cfg=2.0), row_seeds=keys)
    assert torch.equal(images, want.images)
    again = se.generate(model, tok, (f.context, f.context_mask), se.HARTParams(cfg=2.0, seed=3))
    assert torch.equal(again, images)
    guided = se.generate(model, tok, f, cfg=2.0, seed=3, ssg=se.SSG(beta=0.5), more_smooth=True, num_maskgit_iters=2)
    ref = se.sample_hart_reference(model, f.context, f.context_mask, None,
                                   se.HARTParams(cfg=2.0, ssg=se.SSG(beta=0.5), more_smooth=True, num_maskgit_iters=2), row_seeds=keys)
    assert torch.equal(guided, ref.images) and not torch.equal(guided, images)
    batch = se.generate(model, tok, f, cfg=2.0, seed=3, seeding="batch")  # the per-batch rule: one generator from seed
    assert torch.equal(batch, se.sample_hart_reference(model, f.context, f.context_mask, f.context_position_ids,
                                                       se.HARTParams(cfg=2.0, seed=3)).images)


def test_generate_hart_bad_input_is_one_clear_error(hart):
    model, tok = hart
    f = features(model)
    with pytest.raises(TypeError, match="params must be an ssg_engine.params.HARTParams"):
        se.generate(model, tok, f, se.SamplingParams())
    with pytest.raises(ValueError, match="num_maskgit_iters"):
        se.generate(model, tok, f, num_maskgit_iters=0)
    with pytest.raises(TypeError, match="pn= is a text-conditional \\(Infinity\\) keyword"):
        se.generate(model, tok, f, pn=4)
    with pytest.raises(TypeError, match="cond: a HART model takes HARTTextFeatures"):
        se.generate(model, tok, torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="prompts \\(str\\) need text_encoder"):
        se.generate(model, tok, ["a cat"])
    with pytest.raises(ValueError, match="upstream_compat"):
        se.generate(model, tok, f, engine=se.Engine(model, tok, device="cpu", dtype=torch.float32), upstream_compat=True)


def test_wrong_family_pairs_in_every_direction(hart, var_pair, inf_pair):
    model, tok = hart
    vae, var = var_pair
    infinity, bsq = inf_pair
    other_tok = se.load_hart(A / "llm", A / "tokenizer")[1]
    for m, v, match in ((model, vae, "takes its HARTTokenizer"), (model, bsq, "takes its HARTTokenizer"),
                        (model, other_tok, "not the one attached"), (var, tok, "HARTTokenizer is a HART tokenizer"),
                        (infinity, tok, "HARTTokenizer is a HART tokenizer"), (tok, model, "takes the VAR")):
        with pytest.raises(TypeError, match=match):
            se.generate(m, v, features(model))
    with pytest.raises(TypeError, match="more_smooth= is a text-conditional \\(HART\\) keyword"):
        split_keywords({"more_smooth": True}, family("var"))


def test_generate_prompts_with_a_text_encoder(hart):
    """Prompts go through ``text_encoder.encode`` (here a stand-in giving fixed features per prompt)."""
    model, tok = hart
    table = {"a cat": features(model, (5,), seed=1), "a dog": features(model, (9,), seed=2)}

    class Encoder:
        def encode(self, prompts):
            rows = [table[p] for p in prompts]
            return se.HARTTextFeatures(torch.cat([r.context for r in rows]), torch.cat([r.context_mask for r in rows]))

    got = se.generate(model, tok, ["a cat", "a dog"], text_encoder=Encoder(), seed=5)
    f = Encoder().encode(["a cat", "a dog"])
    assert torch.equal(got, se.generate(model, tok, f, seed=5))
