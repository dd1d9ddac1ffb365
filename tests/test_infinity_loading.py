"""Infinity checkpoints: presets, config inferred from shapes, ``load_infinity`` on the golden checkpoints (teacher-forced
logits equal upstream's), checkpoint families and their errors, and ``ssg-engine info`` on Infinity / BSQ VAE files."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict

import pytest
import torch
from conftest import INFINITY_CONFIGS as CONFIGS
from conftest import INFINITY_GOLDEN as INF
from conftest import TINY, golden_infinity_config, rel_err

from ssg_engine.cli import main
from ssg_engine.loading import CheckpointError, checkpoint_family, load_infinity, load_models, read_state_dict
from ssg_engine.families.infinity.model import (
    INFINITY_PRESETS,
    INFINITY_SHAPE_FIELDS,
    InfinityConfig,
    InfinityTransformer,
)



def meta_state(cfg: InfinityConfig) -> Dict[str, torch.Tensor]:
    with torch.device("meta"):
        return InfinityTransformer(cfg).state_dict()


# ------------------------------------------------------------------ presets and inference from shapes


@pytest.mark.parametrize("name", list(INFINITY_PRESETS))
def test_preset_round_trips_through_its_state_dict(name):
    cfg = InfinityConfig.preset(name)
    sd = meta_state(cfg)
    assert InfinityConfig.from_state_dict(sd) == dataclasses.replace(cfg, num_scales=None)  # shapes do not tell the schedule
    assert cfg.matching_presets() == [name]
    assert set(meta_state(InfinityConfig.from_state_dict(sd))) == set(sd)


def test_released_2b_preset():
    cfg = InfinityConfig.preset("infinity_2b")
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.block_chunks, cfg.codebook_dim) == (32, 2048, 16, 8, 32)
    assert (cfg.text_channels, cfg.text_maxlen, cfg.shared_aln, cfg.pad_to_multiplier, cfg.num_scales) == (2048, 512, True, 128, 13)
    n = sum(t.numel() for t in meta_state(cfg).values())
    assert 2.1e9 < n < 2.3e9  # "2B"
    assert InfinityConfig.preset("infinity_2b", codebook_dim=16).codebook_dim == 16


def test_unknown_and_unsupported_presets():
    with pytest.raises(ValueError, match=r"unknown Infinity preset 'infinity_3b'; use one of infinity_2b, "):
        InfinityConfig.preset("infinity_3b")
    with pytest.raises(ValueError, match=r"'infinity_8b': .*spatial patchify .*not supported; use one of infinity_2b"):
        InfinityConfig.preset("infinity_8b")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_from_golden_checkpoint(name):
    sd = read_state_dict(INF / name / "infinity.pth")
    cfg = InfinityConfig.from_state_dict(sd)
    assert cfg == dataclasses.replace(golden_infinity_config(name), num_scales=None)  # the shapes do not tell the schedule
    assert cfg.matching_presets() == []
    with pytest.raises(ValueError, match=f"predicts d = {cfg.codebook_dim} bits per token but codebook_dim = 7"):
        InfinityConfig.from_state_dict(sd, codebook_dim=7)


def test_inference_from_both_block_layouts_and_options():
    base = golden_infinity_config("sq_d16")
    for cfg in (dataclasses.replace(base, block_chunks=1), dataclasses.replace(base, shared_aln=False, mlp_ratio=6.0),
                dataclasses.replace(base, cross_attn_layer_scale=1.0, depth=4, block_chunks=2)):
        assert InfinityConfig.from_state_dict(meta_state(cfg)) == dataclasses.replace(cfg, num_scales=None)


def test_inference_errors():
    sd = meta_state(golden_infinity_config("sq_d16"))
    with pytest.raises(ValueError, match=r"not an Infinity state dict: 'cfg_uncond' missing"):
        InfinityConfig.from_state_dict({k: v for k, v in sd.items() if k != "cfg_uncond"})
    with pytest.raises(ValueError, match=r"'blocks.\{i\}.' or 'block_chunks.\{i\}.module.\{j\}.' keys \(found neither\)"):
        InfinityConfig.from_state_dict({k: v for k, v in sd.items() if "block" not in k})
    uneven = {k: v for k, v in meta_state(dataclasses.replace(golden_infinity_config("sq_d16"), depth=4, block_chunks=2)).items()
              if not k.startswith("block_chunks.1.module.1.")}
    with pytest.raises(ValueError, match=r"block chunks must be 2 or more of equal size; found sizes \[2, 1\]"):
        InfinityConfig.from_state_dict(uneven)


# ------------------------------------------------------------------ load_infinity


@torch.no_grad()
@pytest.mark.parametrize("name", CONFIGS)
def test_load_infinity_reproduces_golden_logits(name):
    from safetensors.torch import load_file

    model, vae = load_infinity(INF / name / "infinity.pth", INF / name / "vae.pth")
    assert not model.training and not vae.training and model.config == dataclasses.replace(golden_infinity_config(name), num_scales=None)
    T = load_file(str(INF / name / "golden.safetensors"))
    text = (T["text.kv_compact"], T["text.lens"], T["text.cu_seqlens_k"], int(T["text.lens"].max()))
    schedule = json.loads((INF / name / "config.json").read_text())["scale_schedule"]
    assert rel_err(model(text, T["tf.x_BLC_wo_prefix"], schedule), T["tf.logits"]) < 1e-5


def test_load_infinity_wrapped_safetensors_and_configs(tmp_path: Path):
    from safetensors.torch import save_file

    sd = read_state_dict(INF / "sq_d16" / "infinity.pth")
    torch.save({"trainer": {"gpt_fsdp": sd}}, tmp_path / "train.pth")  # upstream's training checkpoint
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    vae = INF / "sq_d16" / "vae.pth"
    cfg = golden_infinity_config("sq_d16")
    upstream_kwargs = json.loads((INF / "sq_d16" / "config.json").read_text())["infinity"]
    stale = {**sd, "lvl_1L": torch.zeros(1, 5)}  # a buffer of older code, which upstream's load_state_dict drops too
    for model_path, config in ((tmp_path / "train.pth", None), (tmp_path / "m.safetensors", cfg), (sd, dataclasses.asdict(cfg)),
                               (stale, upstream_kwargs)):
        model, _ = load_infinity(model_path, vae, config=config, dtype=torch.bfloat16)
        assert model.config == (dataclasses.replace(cfg, num_scales=None) if config is None else cfg)
        assert model.cfg_uncond.dtype == torch.bfloat16
        assert torch.equal(model.cfg_uncond.float(), sd["cfg_uncond"].bfloat16().float())
    with pytest.raises(CheckpointError, match=r"infinity.pth: not an Infinity state dict for this config .*missing"):
        load_infinity(INF / "sq_d16" / "infinity.pth", vae, config="infinity_2b")


def test_wrong_family_is_one_clear_error():
    var, vqvae = str(TINY / "var.pth"), str(TINY / "vae.pth")
    model, bsq = str(INF / "sq_d16" / "infinity.pth"), str(INF / "sq_d16" / "vae.pth")
    cases = [
        (lambda: load_infinity(var, bsq), f"{var} is a VAR checkpoint, not an Infinity one; load it with load_models (command line: --family var)"),
        (lambda: load_infinity(model, vqvae), f"{vqvae} is a VQ-VAE checkpoint, not a BSQ VAE one; load it with load_models"),
        (lambda: load_infinity(bsq, model), f"{bsq} is a BSQ VAE checkpoint, not an Infinity one; the transformer and the VAE checkpoints are swapped"),
        (lambda: load_models(model, vqvae), f"{model} is an Infinity checkpoint, not a VAR one; load it with load_infinity (command line: --family infinity)"),
        (lambda: load_models(var, bsq), f"{bsq} is a BSQ VAE checkpoint, not a VQ-VAE one; load it with load_infinity"),
    ]
    for load, message in cases:
        with pytest.raises(CheckpointError) as e:
            load()
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_model_and_vae_bits_must_agree():
    with pytest.raises(CheckpointError, match=r"infinity.pth predicts 16 bits per token but the VAE has codebook_dim 8; give the VAE "
                                              r"the model was trained with"):
        load_infinity(INF / "sq_d16" / "infinity.pth", INF / "wide_d8" / "vae.pth")


def test_checkpoint_family():
    assert checkpoint_family(read_state_dict(TINY / "var.pth")) == "var"
    assert checkpoint_family(read_state_dict(TINY / "vae.pth")) == "vqvae"
    assert checkpoint_family(read_state_dict(INF / "wide_d8" / "infinity.pth")) == "infinity"
    assert checkpoint_family(read_state_dict(INF / "wide_d8" / "vae.pth")) == "bsq_vae"  # upstream's {"vae": sd}
    assert checkpoint_family({"x": torch.zeros(1)}) is None
    assert checkpoint_family({"pos_1LC": torch.zeros(1), "cfg_uncond": torch.zeros(1)}) is None


# ------------------------------------------------------------------ ssg-engine info


def test_info_names_infinity_and_its_config(capsys):
    assert main(["info", str(INF / "wide_d8" / "infinity.pth")]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = golden_infinity_config("wide_d8")
    assert info["kind"] == "Infinity" and info["matching_presets"] == []
    assert info["config"] == {f: getattr(cfg, f) for f in INFINITY_SHAPE_FIELDS}
    assert main(["info", str(INF / "wide_d8" / "vae.pth")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "BSQ VAE" and info["config"]["codebook_dim"] == 8


def test_info_matches_a_preset(tmp_path, capsys):
    """A stand-in for a released checkpoint: every key, real shapes only where the config is read from."""
    full = meta_state(InfinityConfig.preset("infinity_layer12"))
    shaped = ("cfg_uncond", "pos_start", "word_embed.weight", "head.weight", "block_chunks.0.module.0.sa.scale_mul_1H11",
              "block_chunks.0.module.0.ffn.fc1.weight")
    torch.save({k: torch.zeros(v.shape if k in shaped else (1,)) for k, v in full.items()}, tmp_path / "l12.pth")
    assert main(["info", str(tmp_path / "l12.pth")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "Infinity" and info["matching_presets"] == ["infinity_layer12"]
    assert info["config"]["depth"] == 12 and info["config"]["codebook_dim"] == 32


@pytest.mark.parametrize("argv, words", [
    (["info", str(INF / "sq_d16" / "infinity.pth"), "--patch-nums", "1,2"], ["error: --patch-nums: only for VAR / VQ-VAE", "is an Infinity checkpoint", "drop --patch-nums"]),
    (["info", str(INF / "sq_d16" / "vae.pth"), "--config", str(TINY / "config.json")], ["error: --config: only for VAR / VQ-VAE", "a BSQ VAE checkpoint"]),
    (["info", "{tmp}/both.pth"], ["is not a VAR, VQ-VAE, Infinity, BSQ VAE, HART or HART tokenizer state dict", "exactly one of the keys", "give one of those checkpoints"]),
    (["sample", "--var", str(INF / "sq_d16" / "infinity.pth"), "--vae", str(INF / "sq_d16" / "vae.pth"), "--out", "{tmp}/x.png"],
     ["infinity.pth is an Infinity checkpoint, not a VAR one", "--family infinity"]),
])
def test_info_bad_input_is_one_line(argv, words, tmp_path, capsys):
    torch.save({"pos_1LC": torch.zeros(1), "cfg_uncond": torch.zeros(1)}, tmp_path / "both.pth")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines
    assert not (tmp_path / "x.png").exists()
