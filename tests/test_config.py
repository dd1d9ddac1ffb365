"""Presets against the public checkpoints' key/shape lists, and config inference."""
from __future__ import annotations

import json

import pytest
import torch

from ssg_engine import ModelConfig, build_models
from ssg_engine.families.var.config import PATCH_NUMS_512, infer_config, matching_presets

PRESET_TO_CKPT = {"d16": "var_d16", "d20": "var_d20", "d24": "var_d24", "d30": "var_d30", "d36": "var_d36_512"}


@pytest.fixture(scope="module")
def official(tiny_dir):
    return json.loads((tiny_dir.parent / "official_state_dict_shapes.json").read_text())


def _shapes(module: torch.nn.Module) -> dict:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", list(PRESET_TO_CKPT))
def test_preset_matches_official_shapes(official, name):
    vae, var = build_models(ModelConfig.preset(name), "meta")
    assert _shapes(var) == official[PRESET_TO_CKPT[name]]
    assert _shapes(vae) == official["vae_ch160v4096z32"]


def test_d36_preset():
    cfg = ModelConfig.preset("d36")
    assert cfg.shared_aln and cfg.patch_nums == PATCH_NUMS_512 and cfg.image_size == 512 and cfg.embed_dim == 2304


@pytest.mark.parametrize("name", list(PRESET_TO_CKPT))
def test_infer_config_from_official_shapes(official, name):
    meta = {k: torch.empty(v, device="meta") for k, v in official[PRESET_TO_CKPT[name]].items()}
    vae_meta = {k: torch.empty(v, device="meta") for k, v in official["vae_ch160v4096z32"].items()}
    cfg = infer_config(meta, vae_meta)
    assert cfg == ModelConfig.preset(name)
    assert matching_presets(meta) == [name]


def test_from_json_roundtrip(tiny_dir, tmp_path):
    cfg = ModelConfig.from_json(tiny_dir / "config.json")
    assert cfg.patch_nums == (1, 2, 3, 4, 5, 6, 8) and cfg.V == 256 and cfg.image_size == 128
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg


def test_unknown_token_count_asks_for_patch_nums(tiny_dir):
    sd = torch.load(tiny_dir / "var.pth", weights_only=True)
    with pytest.raises(ValueError, match="cannot infer patch_nums.*155 tokens.*pass patch_nums"):
        infer_config(sd)
    assert infer_config(sd, patch_nums=(1, 2, 3, 4, 5, 6, 8)).depth == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embed_dim=100, num_heads=3), "not divisible"),
        (dict(patch_nums=(1, 3, 2)), "strictly increasing"),
        (dict(V=0), "V must be positive"),
        (dict(bogus=1), "unknown ModelConfig field"),
    ],
)
def test_bad_config(tiny_dir, kwargs, match):
    complete = json.loads((tiny_dir / "config.json").read_text())  # from_dict requires the architecture fields
    with pytest.raises((ValueError, TypeError), match=match):
        ModelConfig.from_dict({**complete, **kwargs})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'd99'.*d16"):
        ModelConfig.preset("d99")
