"""Issue 19 (part A): the Infinity CLI and API on bad input and damaged files. No silent wrong results (assumed
settings are said, partial configs override, unknown schedules are refused, NaN/inf and empty values never pass),
and one line (CLI: ``error: ...``, exit 2; API: ``ValueError``/``TypeError`` naming the argument) where a traceback
used to be. One test per cause."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from conftest import INFINITY_GOLDEN, TINY

import ssg_engine as se
from ssg_engine.cli import main
from ssg_engine.loading import CheckpointError, load_infinity, load_models, read_state_dict
from ssg_engine.pretrained import INFINITY_DIR, load_pretrained_infinity

SQ_DIR = INFINITY_GOLDEN / "sq_d16"
SQ = ["--family", "infinity", "--var", str(SQ_DIR / "infinity.pth"), "--vae", str(SQ_DIR / "vae.pth")]
CT5 = 256  # sq_d16's text width

pytestmark = pytest.mark.usefixtures("one_thread")


def features_file(tmp: Path, obj: object, name: str = "feats.pt") -> str:
    torch.save(obj, tmp / name)
    return str(tmp / name)


def good_features(tmp: Path) -> str:
    return features_file(tmp, {"kv_compact": torch.randn(7, CT5, generator=torch.Generator().manual_seed(0)), "lens": [4, 3]})


def run(argv: List[str], capsys) -> tuple:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.strip() and "%|" not in line]


def error_line(argv: List[str], capsys) -> str:
    rc, _, lines = run(argv, capsys)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def shipped():
    return load_pretrained_infinity()


# ----------------------------------------------------------------------------- silent wrong results


def test_assumed_fused_norm_is_said_and_a_partial_config_overrides_it(tmp_path, capsys):
    """fused_norm cannot be read from a checkpoint: one AssumedSettingWarning naming it and the fix; a partial config
    ({"fused_norm": false}) is merged over the shapes (API dict and CLI --config file)."""
    with pytest.warns(se.AssumedSettingWarning, match=r"assumed fused_norm=True .*config=\{'fused_norm': False\}"):
        model, _ = load_infinity(SQ_DIR / "infinity.pth", SQ_DIR / "vae.pth")
    assert model.config.fused_norm
    with warnings.catch_warnings():
        warnings.simplefilter("error", se.AssumedSettingWarning)
        partial, _ = load_infinity(SQ_DIR / "infinity.pth", SQ_DIR / "vae.pth", config={"fused_norm": False, "num_scales": 3})
    assert not partial.config.fused_norm and partial.config.num_scales == 3
    assert partial.config == se.InfinityTransformer(partial.config).config  # the rest from the shapes
    assert (partial.config.depth, partial.config.embed_dim) == (model.config.depth, model.config.embed_dim)

    feats = good_features(tmp_path)
    out = str(tmp_path / "o.png")
    rc, _, lines = run(["sample", *SQ, "--text-features", feats, "--pn", "2", "--upscale", "1", "--out", out], capsys)
    assert rc == 0 and len(lines) == 1 and lines[0].startswith("warning: ") and "fused_norm=True" in lines[0] and "--config" in lines[0]
    cfg = tmp_path / "partial.json"
    cfg.write_text(json.dumps({"fused_norm": False}))
    rc, _, lines = run(["sample", *SQ, "--config", str(cfg), "--text-features", feats, "--pn", "2", "--upscale", "1", "--out", out], capsys)
    assert rc == 0 and lines == []


def test_var_partial_config_is_merged_over_the_shapes(tiny_dir, tmp_path):
    full = load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=tiny_dir / "config.json")[1]
    given = json.loads((tiny_dir / "config.json").read_text())
    partial = {"patch_nums": given["patch_nums"]}  # the tiny model's 155 tokens match no preset's scales
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    for config in (partial, tmp_path / "partial.json"):
        assert load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=config)[1].config == full.config
    with pytest.raises(ValueError, match=r"missing required field.*shapes cannot fill them in: cannot infer patch_nums"):
        load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config={"depth": given["depth"]})
    with pytest.raises(ValueError, match=r"missing required field"):  # no checkpoints to infer from: the file must be whole
        se.ModelConfig.from_json(tmp_path / "partial.json")


def test_unknown_schedule_is_refused_not_assumed(tmp_path, capsys):
    """A checkpoint's shapes do not tell its number of scales: sampling without pn says what to give (no 13-scale
    default for a 5-scale model)."""
    with pytest.warns(se.AssumedSettingWarning):
        model, vae = load_infinity(SQ_DIR / "infinity.pth", SQ_DIR / "vae.pth")
    assert model.config.num_scales is None
    text = se.TextFeatures(torch.randn(4, CT5), [4])
    with pytest.raises(ValueError, match=r"pn: this model's number of scales is unknown.*pass pn="):
        se.generate(model, vae, text)
    assert len(se.generate(model, vae, text, pn=2, seed=0)) == 1
    line = error_line(["sample", *SQ, "--text-features", good_features(tmp_path), "--out", str(tmp_path / "o.png")], capsys)
    assert "--pn is required" in line and "num_scales" in line
    assert not (tmp_path / "o.png").exists()


NONFINITE = [
    ("h_div_w", dict(h_div_w=float("nan"))),
    ("h_div_w", dict(h_div_w=float("inf"))),
    ("tau_list", dict(tau_list=[float("inf")] * 5)),
    ("tau_list", dict(tau_list=[float("nan")] * 5)),
    ("cfg_list", dict(cfg_list=[3.0, float("nan"), 3.0, 3.0, 3.0])),
    ("cfg", dict(cfg=float("nan"))),
    ("temperature", dict(temperature=float("inf"))),
    ("top_p", dict(top_p=float("nan"))),
    ("cfg_insertion_layer", dict(cfg_insertion_layer=[0.5])),
    ("schedule", dict(schedule=[(1, float("nan"))])),
    ("text: the features hold NaN", dict(cond=se.TextFeatures(torch.full((3, 128), float("nan")), [3]))),
]


@pytest.mark.parametrize("name, kwargs", NONFINITE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(NONFINITE)])
def test_nonfinite_float_arguments_are_refused_before_compute(name, kwargs, shipped, monkeypatch):
    model, vae, enc = shipped

    def no_compute(*args, **kw):
        raise AssertionError("sampling ran")

    monkeypatch.setattr(type(model), "step", no_compute)
    cond = kwargs.pop("cond", None)
    call = (lambda: se.generate(model, vae, cond, **kwargs)) if cond is not None else \
        (lambda: se.generate(model, vae, ["a shirt"], text_encoder=enc, **kwargs))
    with pytest.raises(ValueError, match=name):
        call()


EMPTY = [
    ("negative-prompt", ["sample", "--family", "infinity", "--negative-prompt", ""], "--negative-prompt"),
    ("prompt", ["sample", "--family", "infinity", "--prompt", ""], "--prompt"),
    ("pn-zero", ["sample", *SQ, "--text-features", "{feats}", "--pn", "0"], "--pn"),
    ("pn-empty", ["sample", *SQ, "--text-features", "{feats}", "--pn", ""], "--pn is empty"),
    ("config", ["sample", *SQ, "--config", "", "--text-features", "{feats}", "--pn", "2"], "--config is empty"),
    ("text-encoder", ["sample", *SQ, "--text-encoder", "", "--pn", "2"], "--text-encoder is empty"),
    ("text-features", ["sample", *SQ, "--text-features", "", "--pn", "2"], "--text-features is empty"),
    ("var-vae", ["sample", "--family", "infinity", "--var", "", "--vae", ""], "--var is empty"),
]


@pytest.mark.parametrize("argv, words", [(a, w) for _, a, w in EMPTY], ids=[n for n, _, _ in EMPTY])
def test_empty_and_zero_values_are_never_dropped(argv, words, tmp_path, capsys):
    feats = good_features(tmp_path)
    out = tmp_path / "o.png"
    line = error_line([a.replace("{feats}", feats) for a in argv] + ["--out", str(out)], capsys)
    assert words in line and not out.exists()


# ----------------------------------------------------------------------------- one line, not a traceback


def _damaged() -> Dict[str, Dict[str, torch.Tensor]]:
    sd = read_state_dict(SQ_DIR / "infinity.pth")
    return {
        "missing-head": ({k: v for k, v in sd.items() if k != "head.weight"}, "'head.weight' missing"),
        "missing-ffn": ({k: v for k, v in sd.items() if "ffn.fc1.weight" not in k}, "ffn.fc1.weight' is missing"),
        "missing-text-norm": ({k: v for k, v in sd.items() if not k.startswith("text_norm")}, "text_norm.weight"),
        "rank-pos-start": ({**sd, "pos_start": sd["pos_start"].flatten()}, "'pos_start' has shape"),
        "rank-cfg-uncond": ({**sd, "cfg_uncond": sd["cfg_uncond"].flatten()}, "'cfg_uncond' has shape"),
        "rank-scale-mul": ({**sd, **{k: v.flatten() for k, v in sd.items() if "scale_mul" in k}}, "scale_mul_1H11' has shape"),
        "zero-heads": ({**sd, **{k: v[:, :0] for k, v in sd.items() if "scale_mul" in k}}, "num_heads must be > 0"),
    }


DAMAGED = list(_damaged())


@pytest.mark.parametrize("kind", DAMAGED)
def test_damaged_infinity_checkpoint_is_one_line(kind, tmp_path, capsys):
    sd, words = _damaged()[kind]
    path = tmp_path / "damaged.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=words):
        load_infinity(path, SQ_DIR / "vae.pth")
    assert words in error_line(["info", str(path)], capsys)
    line = error_line(["sample", "--family", "infinity", "--var", str(path), "--vae", str(SQ_DIR / "vae.pth"),
                       "--text-features", good_features(tmp_path), "--pn", "2", "--out", str(tmp_path / "o.png")], capsys)
    assert words in line and str(path) in line


BAD_CONFIGS = [
    ("list", "[1, 2]", "must be a JSON object"),
    ("number", "3", "must be a JSON object"),
    ("null", "null", "must be a JSON object"),
    ("zero-heads", '{"num_heads": 0}', "num_heads must be > 0"),
    ("wrong-type", '{"depth": "two"}', "depth must be an integer"),
    ("nan", '{"mlp_ratio": NaN}', "mlp_ratio must be a finite number"),
    ("typo", '{"fused_nrom": false}', "unknown"),
    ("scales", '{"num_scales": 0}', "num_scales must be 1 to 13"),
    ("codebook-dim", '{"codebook_dim": 8}', "but the VAE has codebook_dim 16"),
]


@pytest.mark.parametrize("text, words", [(t, w) for _, t, w in BAD_CONFIGS], ids=[n for n, _, _ in BAD_CONFIGS])
def test_bad_config_content_is_one_line_for_both_families(text, words, tmp_path, capsys):
    cfg = tmp_path / "bad.json"
    cfg.write_text(text)
    infinity = ["sample", *SQ, "--config", str(cfg), "--text-features", good_features(tmp_path), "--pn", "2", "--out", str(tmp_path / "o.png")]
    line = error_line(infinity, capsys)
    assert str(cfg) in line and words in line
    var = ["sample", "--var", str(TINY / "var.pth"), "--vae", str(TINY / "vae.pth"), "--config", str(cfg), "--out", str(tmp_path / "o.png")]
    assert str(cfg) in error_line(var, capsys)


def _text_encoder_folder(tmp: Path, damage: str) -> Path:
    folder = tmp / damage
    folder.mkdir()
    config = json.loads((INFINITY_DIR / "config.json").read_text())
    weights = INFINITY_DIR / ("vae.safetensors" if damage == "foreign-weights" else "text_encoder.safetensors")
    shutil.copy(weights, folder / "text_encoder.safetensors")
    if damage == "missing-key":
        del config["text_encoder"]["vocab"]
    elif damage == "no-text-encoder":
        del config["text_encoder"]
    elif damage == "truncated-weights":
        (folder / "text_encoder.safetensors").write_bytes(weights.read_bytes()[:1000])
    elif damage == "wrong-vocabulary":
        config["text_encoder"]["vocab"] = config["text_encoder"]["vocab"][:-1]
    elif damage == "vocabulary-not-words":
        config["text_encoder"]["vocab"] = 7
    (folder / "config.json").write_text(json.dumps(config))
    return folder


TEXT_ENCODERS = [
    ("missing-key", "missing field vocab"), ("no-text-encoder", 'no "text_encoder" object'),
    ("truncated-weights", "not a readable safetensors file"), ("foreign-weights", "do not fit its config"),
    ("wrong-vocabulary", "do not fit its config"), ("vocabulary-not-words", "vocab must be a list of words"),
]


@pytest.mark.parametrize("damage, words", TEXT_ENCODERS, ids=[d for d, _ in TEXT_ENCODERS])
def test_bad_text_encoder_folder_is_one_line(damage, words, tmp_path, capsys):
    folder = _text_encoder_folder(tmp_path, damage)
    argv = ["sample", "--family", "infinity", "--var", str(INFINITY_DIR / "infinity.safetensors"), "--vae", str(INFINITY_DIR / "vae.safetensors"),
            "--config", str(INFINITY_DIR / "config.json"), "--text-encoder", str(folder), "--out", str(tmp_path / "o.png")]
    line = error_line(argv, capsys)
    assert line.startswith("error: --text-encoder") and words in line


KV = torch.randn(7, CT5)
BAD_FEATURES = [
    ("lens-int", {"kv_compact": KV, "lens": 7}, "lens must be a list"),
    ("lens-none", {"kv_compact": KV, "lens": None}, "lens must be a list"),
    ("lens-str", {"kv_compact": KV, "lens": "43"}, "lens must be a list"),
    ("lens-nan", {"kv_compact": KV, "lens": [float("nan"), 3]}, "lens[0] must be a prompt length"),
    ("lens-key-mask", {"kv_compact": KV, "lens": torch.ones(7, dtype=torch.bool)}, "not a key mask"),
    ("kv-list", {"kv_compact": KV.tolist(), "lens": [4, 3]}, "kv_compact must be a torch.Tensor"),
    ("mask-list", {"features": torch.randn(2, 4, CT5), "mask": [[1, 1, 0, 0], [1, 0, 0, 0]]}, "mask must be a dense torch.Tensor"),
    ("meta", {"kv_compact": KV.to("meta"), "lens": [4, 3]}, "dense tensor with data"),
    ("sparse", {"kv_compact": KV.to_sparse(), "lens": [4, 3]}, "dense tensor with data"),
    ("complex", {"kv_compact": KV.to(torch.complex64), "lens": [4, 3]}, "real floating-point"),
    ("nan", {"kv_compact": KV * float("nan"), "lens": [4, 3]}, "NaN or inf"),
    ("cu-seqlens", (KV, [4, 3], [0, 1], 4), "cu_seqlens_k does not match"),
]


@pytest.mark.parametrize("obj, words", [(o, w) for _, o, w in BAD_FEATURES], ids=[n for n, _, _ in BAD_FEATURES])
def test_malformed_text_features_file_is_one_line(obj, words, tmp_path, capsys):
    feats = features_file(tmp_path, obj)
    line = error_line(["sample", *SQ, "--config", json_file(tmp_path), "--text-features", feats, "--out", str(tmp_path / "o.png")], capsys)
    assert line.startswith(f"error: --text-features {feats}") and words in line


def json_file(tmp: Path) -> str:
    (tmp / "c.json").write_text(json.dumps({"fused_norm": True, "num_scales": 2}))
    return str(tmp / "c.json")


def test_eval_classifier_not_safetensors_is_one_line(tmp_path, capsys):
    from ssg_engine.eval.classifier import load_classifier

    bad = tmp_path / "cls.safetensors"
    bad.write_text("not weights")
    with pytest.raises(ValueError, match=r"classifier weights .*cls.safetensors are not a safetensors file"):
        load_classifier(bad)
    line = error_line(["eval", "--classifier", str(bad), "--out-dir", str(tmp_path / "ev"), "--samples", "4"], capsys)
    assert "cls.safetensors" in line and "--classifier" in line


def _bad_conditions(enc) -> list:
    kv = torch.randn(8, 128)
    mask = [[True, True, False], [True, False, False]]
    return [
        ("mixed-prompts", dict(cond=["a shirt", 3]), TypeError, "cond"),
        ("mixed-prompts-encoder", dict(cond=["a shirt", 3], text_encoder=enc), TypeError, "cond must be a list of strings"),
        ("ints-with-encoder", dict(cond=[1, 2], text_encoder=enc), TypeError, "cond must be a list of strings"),
        ("not-an-encoder", dict(cond=["a shirt"], text_encoder=object()), TypeError, "text_encoder must have encode"),
        ("list-negative-no-encoder", dict(cond=(kv, [5, 3], torch.tensor([0, 5, 8]), 5), negative=["blur"]), TypeError, "negative"),
        ("empty-negative", dict(cond=["a shirt"], text_encoder=enc, negative=""), ValueError, "negative"),
        ("nested-list-mask", dict(cond=(torch.randn(2, 3, 128), mask)), TypeError, "mask"),
        ("numpy-mask", dict(cond=(torch.randn(2, 3, 128), np.array(mask))), TypeError, "mask"),
        ("tensor-lens-pair", dict(cond=(kv, torch.tensor([5, 3]))), ValueError, "lens"),
        ("meta-features", dict(cond=(kv.to("meta"), [5, 3], torch.tensor([0, 5, 8]), 5)), ValueError, "kv_compact"),
    ]


def test_generate_bad_conditions_name_the_argument(shipped, monkeypatch):
    model, vae, enc = shipped
    monkeypatch.setattr(type(model), "step", lambda *a, **k: pytest.fail("sampling ran"))
    for name, kwargs, error, words in _bad_conditions(enc):
        cond = kwargs.pop("cond")
        with pytest.raises(error, match=words):
            se.generate(model, vae, cond, **kwargs)
    with pytest.raises(ValueError, match="not a key mask"):  # a bool tensor given as lens
        se.TextFeatures(torch.randn(8, 128), torch.ones(8, dtype=torch.bool))
