"""Loading public-format checkpoints, and every bad-input error of the foundation."""
from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from ssg_engine import CheckpointError, ModelConfig, build_models, load_models, sample_reference


def test_load_safetensors_equals_pth(tiny_dir, tmp_path, golden):
    from safetensors.torch import save_file

    for name in ("var", "vae"):
        sd = torch.load(tiny_dir / f"{name}.pth", weights_only=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / f"{name}.safetensors"))
    vae, var = load_models(tmp_path / "var.safetensors", tmp_path / "vae.safetensors", config=tiny_dir / "config.json")
    assert rel_err(var(golden["tf.label"], golden["tf.x_BLCv"]), golden["tf.logits"]) < 1e-5


def test_loaded_models_are_eval_and_frozen(tiny_models):
    vae, var = tiny_models
    assert not var.training and not vae.training
    assert not any(p.requires_grad for p in var.parameters())
    assert all(p.device.type == "cpu" for p in var.parameters())


def test_dtype_argument(tiny_dir):
    vae, var = load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=tiny_dir / "config.json", dtype=torch.bfloat16)
    assert var.head.weight.dtype == torch.bfloat16 and vae.decoder.conv_in.weight.dtype == torch.float32


def test_missing_checkpoint(tiny_dir):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pth"):
        load_models(tiny_dir / "nope.pth", tiny_dir / "vae.pth")


def test_not_a_state_dict(tiny_dir, tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_models(tmp_path / "list.pth", tiny_dir / "vae.pth", config=tiny_dir / "config.json")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_models(tmp_path / "junk.pth", tiny_dir / "vae.pth", config=tiny_dir / "config.json")


def test_missing_and_unexpected_keys(tiny_dir):
    sd = torch.load(tiny_dir / "var.pth", weights_only=True)
    vae_sd = torch.load(tiny_dir / "vae.pth", weights_only=True)
    broken = dict(sd)
    del broken["head.weight"]
    broken["extra.thing"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\), first: \['head.weight'\]; 1 unexpected key\(s\), first: \['extra.thing'\]"):
        load_models(broken, vae_sd, config=tiny_dir / "config.json")


def test_shape_mismatch(tiny_dir):
    sd = torch.load(tiny_dir / "var.pth", weights_only=True)
    vae_sd = torch.load(tiny_dir / "vae.pth", weights_only=True)
    sd["head.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match=r"shape mismatch at 'head.bias': expected \(256,\), found \(7,\)"):
        load_models(sd, vae_sd, config=tiny_dir / "config.json")


def test_checkpoint_fits_another_preset(tmp_path):
    # a d16-shaped VAR state dict (meta tensors carry the shapes) asked to load as d20
    _, var = build_models(ModelConfig.preset("d16"), "meta")
    vae, _ = build_models(ModelConfig.preset("d16"), "meta")
    with pytest.raises(CheckpointError, match="fits preset d16, not 'd20'"):
        load_models(var.state_dict(), vae.state_dict(), config="d20")


def test_bad_labels(tiny_models):
    _, var = tiny_models
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\); got \[10\]"):
        sample_reference(var, 2, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match=r"got 3 labels for batch size B=2"):
        sample_reference(var, 2, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="class labels must be in"):
        sample_reference(var, 2, torch.tensor([-3, 1]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(top_p=1.5), r"top_p must be in \[0, 1\]"),
        (dict(top_p=-0.1), r"top_p must be in \[0, 1\]"),
        (dict(cfg=float("nan")), "cfg must be a finite number"),
        (dict(cfg=float("inf")), "cfg must be a finite number"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
    ],
)
def test_bad_sampling_parameters(tiny_models, kwargs, match):
    _, var = tiny_models
    with pytest.raises(ValueError, match=match):
        sample_reference(var, 1, torch.tensor([1]), **kwargs)


def test_wrong_image_size(tiny_models):
    vae, _ = tiny_models
    with pytest.raises(ValueError, match=r"expects 128x128 images .* got \(64, 64\)"):
        vae.img_to_idxBl(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        vae.img_to_idxBl(torch.zeros(3, 128, 128))


def test_wrong_teacher_forcing_shape(tiny_models):
    _, var = tiny_models
    with pytest.raises(ValueError, match=r"x_BLCv_wo_first_l must have shape \(B, 154, 8\)"):
        var(torch.tensor([1]), torch.zeros(1, 10, 8))
