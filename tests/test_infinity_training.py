"""Training of the Fashion-MNIST text-to-image model (BSQ VAE + Infinity + text encoder), on tiny settings."""
from __future__ import annotations

import json

import pytest
import torch

from ssg_engine.data import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, dataset_dir, make_prompt, prompt_vocabulary

pytestmark = pytest.mark.skipif(not dataset_dir().is_dir(), reason="Fashion-MNIST not installed")

TINY = dict(vae_steps=3, infinity_steps=3, batch_size=4, infinity_batch_size=4, train_limit=64, eval_limit=16,
            progress=False, num_threads=None)


def _recipe():
    from ssg_engine.training import InfinityRecipe

    return InfinityRecipe(bits=8, vae_base_ch=32, embed_dim=64, depth=1, num_heads=2, text_layers=1, text_heads=2)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    from ssg_engine.training import train_fashion_mnist_infinity

    root = tmp_path_factory.mktemp("inf")
    metrics = [train_fashion_mnist_infinity(root / f"run{i}", seed=0, recipe=_recipe(), **TINY) for i in range(2)]
    return root, metrics


def test_prompts_articles_and_vocabulary():
    assert make_prompt(9, "a {}") == "an ankle boot"
    assert make_prompt(7, "an image of a {}") == "an image of a sneaker"
    assert make_prompt(0, "a photo of a {}") == "a photo of a t-shirt"
    assert not set(TRAIN_TEMPLATES) & set(HELD_OUT_TEMPLATES)
    assert {"picture", "grayscale", "one"} <= set(prompt_vocabulary())


def test_text_encoder_errors_and_config_round_trip(tmp_path):
    from ssg_engine.families.infinity.text import TextEncoder, TextEncoderConfig

    cfg = TextEncoderConfig(prompt_vocabulary(), width=128, layers=1, heads=2, max_len=12)
    cfg.to_json(tmp_path / "t.json")
    assert TextEncoderConfig.from_json(tmp_path / "t.json") == cfg
    enc = TextEncoder(cfg)
    feats = enc.encode(["a sneaker", "An ankle-boot on a dark background!"])
    assert feats.lens == [2, 7] and tuple(feats.kv_compact.shape) == (9, 128)
    with pytest.raises(ValueError, match="unknown word.*'fox'.*vocabulary is: a an and ankle"):
        enc.encode(["a red fox"])
    with pytest.raises(ValueError, match="no words"):
        enc.encode(["  !"])
    with pytest.raises(ValueError, match="non-empty list"):
        enc.encode([])


def test_straight_through_bits_equal_inference_bits():
    from ssg_engine.data import load_fashion_mnist, prepare_images
    from ssg_engine.families.infinity.tokenizer import BSQVAE
    from ssg_engine.training.bsq_trainer import quantize_train

    recipe = _recipe()
    torch.manual_seed(0)
    vae = BSQVAE(recipe.vae_config())
    x = prepare_images(load_fashion_mnist("test")[0][:8])
    z, aux, bits = quantize_train(vae.encoder(x), recipe.schedule())
    enc = vae.encode(x, recipe.schedule())
    assert all(torch.equal(a, b) for a, b in zip(bits, enc.bits))
    assert torch.equal(z.detach(), enc.z)
    z.sum().backward()  # straight-through: the encoder gets gradients
    assert vae.encoder.conv_out.conv.weight.grad.abs().sum() > 0
    assert set(aux) == {"commit", "entropy"}


def test_tiny_run_writes_a_loadable_deterministic_folder(tiny_runs):
    from safetensors.torch import load_file

    from ssg_engine.families.infinity.sampler import sample_infinity_reference
    from ssg_engine.pretrained import infinity_folder_schedule, load_infinity_folder

    root, metrics = tiny_runs
    folder = root / "run0"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "infinity.safetensors", "metrics.json", "text_encoder.safetensors", "vae.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["schedule"] == {"h_div_w": 1.0, "num_scales": 5} and cfg["infinity"]["num_scales"] == 5
    assert cfg["infinity"]["codebook_dim"] == 8
    for k in ("train", "val", "val_held_out_templates"):
        assert 0.0 <= metrics[0]["infinity"][k]["bit_acc"] <= 1.0
    for name in ("vae", "infinity", "text_encoder"):
        a, b = load_file(str(folder / f"{name}.safetensors")), load_file(str(root / "run1" / f"{name}.safetensors"))
        assert all(v.dtype != torch.float32 for v in a.values())
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs between two runs"
    model, vae, text_encoder = load_infinity_folder(folder)
    prompts = [make_prompt(y, HELD_OUT_TEMPLATES[0]) for y in (7, 9)]
    out = sample_infinity_reference(model, vae, text_encoder.encode(prompts), infinity_folder_schedule(folder),
                                    cfg_list=[3.0] * 5, tau_list=[1.0] * 5, seed=0)
    assert tuple(out.images.shape) == (2, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="infinity.safetensors missing"):
        (folder / "infinity.safetensors").unlink()
        load_infinity_folder(folder)


def test_cli_train_infinity_flags():
    from ssg_engine.cli import build_parser

    args = build_parser().parse_args(["train", "--family", "infinity", "--out", "x", "--var-steps", "2"])
    assert args.family == "infinity" and args.var_steps == 2 and args.vae_steps is None
    assert build_parser().parse_args(["train", "--out", "x"]).family == "var"


# ----------------------------------------------------------------------------- shipped model


def test_shipped_infinity_model_loads_fits_and_samples_its_classes():
    from ssg_engine.eval.classifier import class_accuracy, load_classifier
    from ssg_engine.families.infinity.sampler import sample_infinity_reference
    from ssg_engine.pretrained import INFINITY_DIR, INFINITY_SAMPLING, PRETRAINED_DIR, infinity_folder_schedule, load_pretrained_infinity

    weights = [*PRETRAINED_DIR.glob("*.safetensors"), *INFINITY_DIR.glob("*.safetensors")]
    assert len(weights) == 5 and sum(p.stat().st_size for p in weights) <= 25e6
    cfg = json.loads((INFINITY_DIR / "config.json").read_text())
    assert cfg["sampling"] == {"cfg": INFINITY_SAMPLING.cfg, "temperature": INFINITY_SAMPLING.temperature,
                               "top_k": INFINITY_SAMPLING.top_k, "top_p": INFINITY_SAMPLING.top_p}
    model, vae, text_encoder = load_pretrained_infinity()
    sched = infinity_folder_schedule()
    assert len(sched) == model.config.num_scales == 5 and next(model.parameters()).dtype == torch.float32
    labels = [y for y in range(10) for _ in range(3)]
    prompts = [make_prompt(y, HELD_OUT_TEMPLATES[i % 3]) for i, y in enumerate(labels)]
    w, tau = INFINITY_SAMPLING.cfg, INFINITY_SAMPLING.temperature
    out = sample_infinity_reference(model, vae, text_encoder.encode(prompts), sched, cfg_list=[w] * 5, tau_list=[tau] * 5, seed=0)
    clf, _ = load_classifier(train_if_missing=False)
    assert class_accuracy(clf, out.images, labels) >= 0.6  # the model card: 0.827 on 900 held-out-template prompts
