"""``ssg_engine.Pipeline``: from_pretrained (shipped names, saved folders, released layouts) and save_pretrained for
every family, ``pipe(...)`` equal to ``generate(...)`` for the same settings and seed (per family), images that do not
depend on ``batch_size`` or ``num_images_per_prompt``, a ``torch.Generator`` mapped to the seed, output types, the
one-line errors (before any compute), and the labelled comparison grid."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import INFINITY_GOLDEN, TINY
from PIL import Image

import ssg_engine as se
from ssg_engine import pretrained
from ssg_engine import pretrained_pipeline as pp
from ssg_engine.imaging import labelled_grid, make_grid, side_by_side, to_pil
from ssg_engine.params import HART_UPSTREAM, INFINITY_UPSTREAM

HART_DIR = Path(__file__).resolve().parent / "golden" / "hart" / "a_d2"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def var_pipe():
    pipe = se.Pipeline.from_pretrained("fashion-mnist")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def t2i_pipe():
    pipe = se.Pipeline.from_pretrained("fashion-mnist-t2i")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def hart_pipe():
    pipe = se.Pipeline.from_pretrained(HART_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal images up to the float32 rounding of computing them in batches of another size (the same tokens; measured
    <= 1e-6 for VAR and Infinity, 1.3e-5 for HART; a uint8 level is 3.9e-3)."""
    return a.shape == b.shape and float((a - b).abs().max()) <= 1e-4


def hart_features(pipe, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    Lc, Cc = pipe.model.context_token, pipe.model.context_embed.weight.shape[1]
    lens = torch.tensor([3 + 4 * i for i in range(n)])
    return se.HARTTextFeatures(torch.randn(n, Lc, Cc, generator=g), torch.arange(Lc)[None] < lens[:, None])


# ----------------------------------------------------------------------------- pipe(...) == generate(...)


def test_var_pipe_equals_generate_and_ignores_batching(var_pipe):
    got = var_pipe(class_labels=["sneaker", 8], seed=5, output_type="pt").images
    want = se.generate(var_pipe.model, var_pipe.vae, [7, 8], pretrained.SAMPLING, seed=5)
    assert torch.equal(got, want)
    # batch_size and num_images_per_prompt change neither the images nor their order (the same tokens; the VAE's
    # float32 convolutions of another batch size sum in another order: CLOSE)
    split = var_pipe(class_labels=[7, 8], seed=5, batch_size=1, output_type="pt").images
    assert close(split, want)
    per = var_pipe(class_labels=[7, 8], seed=5, num_images_per_prompt=2, batch_size=3, output_type="pt").images
    assert close(per, se.generate(var_pipe.model, var_pipe.vae, [7, 7, 8, 8], pretrained.SAMPLING, seed=5))
    assert not close(per[0], per[1])  # two images of one class are two draws


def test_var_pipe_arguments_map_to_sampling_params(var_pipe):
    ssg = se.SSG(beta=0.7, prior="bilinear")
    got = var_pipe(class_labels=[1, 2], seed=3, guidance_scale=1.5, top_k=50, top_p=0.9, temperature=0.8, ssg=ssg,
                   output_type="pt").images
    params = pretrained.SAMPLING.replace(cfg=1.5, top_k=50, top_p=0.9, temperature=0.8, seed=3, ssg=ssg)
    assert torch.equal(got, se.generate(var_pipe.model, var_pipe.vae, [1, 2], params))
    scaled = var_pipe(class_labels=[1, 2], seed=3, ssg_scale=0.7, output_type="pt").images
    assert torch.equal(scaled, se.generate(var_pipe.model, var_pipe.vae, [1, 2], pretrained.SAMPLING.replace(seed=3, ssg=se.SSG(beta=0.7))))


def test_generator_maps_to_seed_deterministically(var_pipe):
    a = var_pipe(class_labels=[0], generator=torch.Generator().manual_seed(11), output_type="pt").images
    b = var_pipe(class_labels=[0], generator=torch.Generator().manual_seed(11), output_type="pt").images
    seed = pp.seed_from_generator(torch.Generator().manual_seed(11))
    assert torch.equal(a, b) and torch.equal(a, var_pipe(class_labels=[0], seed=seed, output_type="pt").images)
    g = torch.Generator().manual_seed(11)
    first, second = (var_pipe(class_labels=[0], generator=g, output_type="pt").images for _ in range(2))
    assert torch.equal(first, a) and not torch.equal(first, second)  # the generator advances, as in diffusers


def test_infinity_pipe_equals_generate_and_ignores_batching(t2i_pipe):
    prompts = ["a sneaker", "a photo of a bag"]
    got = t2i_pipe(prompts, seed=2, num_images_per_prompt=2, batch_size=3, output_type="pt").images
    rows = [p for p in prompts for _ in range(2)]
    rows_want = se.generate(t2i_pipe.model, t2i_pipe.vae, rows, pretrained.INFINITY_SAMPLING, seed=2, text_encoder=t2i_pipe.text_encoder)
    assert got.shape == (4, 3, 32, 32) and close(got, rows_want)  # batch_size 3: two generate calls
    neg = t2i_pipe("a sneaker", negative_prompt="a bag", seed=2, guidance_scale=2.0, output_type="pt").images
    want = se.generate(t2i_pipe.model, t2i_pipe.vae, ["a sneaker"], pretrained.INFINITY_SAMPLING, seed=2, cfg=2.0,
                       negative="a bag", text_encoder=t2i_pipe.text_encoder)
    assert torch.equal(neg, want)
    feats = t2i_pipe.text_encoder.encode(prompts)
    embeds = t2i_pipe(prompt_embeds=feats, seed=2, num_images_per_prompt=2, output_type="pt").images
    assert torch.equal(embeds, rows_want)  # one batch, as generate's
    card = t2i_pipe("a sneaker", ssg=se.SSG(), seed=2, output_type="pt").images  # SSG(): the card's beta (0.15)
    assert torch.equal(card, t2i_pipe("a sneaker", ssg_scale=pretrained.INFINITY_SSG_BETA, seed=2, output_type="pt").images)


def test_hart_pipe_equals_generate_and_ignores_batching(hart_pipe):
    feats = hart_features(hart_pipe)
    got = hart_pipe(prompt_embeds=feats, seed=4, guidance_scale=2.0, num_images_per_prompt=2, batch_size=1, output_type="pt").images
    want = se.generate(hart_pipe.model, hart_pipe.vae, feats[torch.tensor([0, 0, 1, 1])], HART_UPSTREAM.replace(cfg=2.0, seed=4))
    assert hart_pipe.sampling == HART_UPSTREAM and close(got, want)  # batch_size 1: four generate calls
    one = hart_pipe(prompt_embeds=feats, seed=4, guidance_scale=2.0, num_images_per_prompt=2, output_type="pt").images
    assert torch.equal(one, want)


def test_shipped_hart_pipe_takes_prompts_and_its_card():
    pipe = se.Pipeline.from_pretrained("fashion-mnist-hart")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.sampling == pretrained.HART_SAMPLING and pipe.model.ssg_beta == pretrained.HART_SSG_BETA
    got = pipe(["a sneaker", "a bag"], seed=3, output_type="pt").images
    want = se.generate(pipe.model, pipe.vae, ["a sneaker", "a bag"], pretrained.HART_SAMPLING, seed=3, text_encoder=pipe.text_encoder)
    assert got.shape == (2, 3, 32, 32) and torch.equal(got, want)
    with pytest.raises(ValueError, match="unknown word.*'fox'"):
        pipe("a red fox")
    with pytest.raises(ValueError, match="HART runs in float32"):
        se.Pipeline.from_pretrained("fashion-mnist-hart", torch_dtype=torch.float16)


# ----------------------------------------------------------------------------- outputs


def test_output_types_match_diffusers_conventions(var_pipe):
    pt = var_pipe(class_labels=[3, 4], seed=1, output_type="pt").images
    arr = var_pipe(class_labels=[3, 4], seed=1, output_type="np").images
    pil = var_pipe(class_labels=[3, 4], seed=1).images
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 32, 32, 3) and arr.dtype == np.float32
    assert np.array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    assert isinstance(pil, list) and len(pil) == 2 and all(isinstance(p, Image.Image) and p.mode == "RGB" for p in pil)
    assert np.array_equal(np.stack([np.asarray(p) for p in pil]), se.to_uint8(pt))
    (tup,) = var_pipe(class_labels=[3, 4], seed=1, output_type="pt", return_dict=False)
    assert torch.equal(tup, pt)


# ----------------------------------------------------------------------------- save / load


def test_save_pretrained_round_trip_var_and_infinity(var_pipe, t2i_pipe, tmp_path):
    for pipe, kwargs in ((var_pipe, {"class_labels": ["bag", "coat"]}), (t2i_pipe, {"prompt": ["a dress", "a coat"]})):
        folder = pipe.save_pretrained(tmp_path / pipe.family)
        manifest = json.loads((folder / "model_index.json").read_text())
        assert manifest["family"] == pipe.family and all((folder / f).is_file() for f in manifest["files"].values() if f)
        again = se.Pipeline.from_pretrained(folder)
        again.set_progress_bar_config(disable=True)
        assert again.sampling == pipe.sampling and again.class_names == pipe.class_names
        assert getattr(again.model, "ssg_beta", None) == getattr(pipe.model, "ssg_beta", None)
        assert torch.equal(again(**kwargs, seed=9, ssg=se.SSG(), output_type="pt").images,
                           pipe(**kwargs, seed=9, ssg=se.SSG(), output_type="pt").images)
    # saving again over a saved folder replaces it; another non-empty folder is refused, and nothing is written
    var_pipe.save_pretrained(tmp_path / "var")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a folder written by save_pretrained"):
        var_pipe.save_pretrained(tmp_path / "other")
    assert os.listdir(tmp_path / "other") == ["notes.txt"] and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_save_pretrained_round_trip_hart_is_the_released_layout(hart_pipe, tmp_path):
    folder = hart_pipe.save_pretrained(tmp_path / "hart")
    assert (folder / "llm" / "config.json").is_file() and (folder / "tokenizer" / "model.safetensors").is_file()
    model, tokenizer = se.load_hart(folder)  # upstream's layout: the plain loader reads it
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), hart_pipe.model.state_dict().values()))
    again = se.Pipeline.from_pretrained(folder)
    again.set_progress_bar_config(disable=True)
    feats = hart_features(hart_pipe, 1, seed=3)
    assert torch.equal(again(prompt_embeds=feats, seed=1, output_type="pt").images,
                       hart_pipe(prompt_embeds=feats, seed=1, output_type="pt").images)


def test_released_layouts(tmp_path):
    var_dir, inf_dir = tmp_path / "var", tmp_path / "inf"
    for folder, files in ((var_dir, (TINY / "var.pth", TINY / "vae.pth")),
                          (inf_dir, (INFINITY_GOLDEN / "sq_d16" / "infinity.pth", INFINITY_GOLDEN / "sq_d16" / "vae.pth"))):
        folder.mkdir()
        for f in files:
            (folder / f"{folder.name}_{f.name}").symlink_to(f)
    pipe = se.Pipeline.from_pretrained(var_dir, config=TINY / "config.json")
    pipe.set_progress_bar_config(disable=True)
    vae, var = se.load_models(TINY / "var.pth", TINY / "vae.pth", config=TINY / "config.json")
    assert pipe.family == "var" and pipe.sampling == se.SamplingParams()
    assert torch.equal(pipe(class_labels=[1, 3], seed=0, output_type="pt").images, se.generate(var, vae, [1, 3], seed=0))
    inf = se.Pipeline.from_pretrained(inf_dir, config={"fused_norm": True, "num_scales": 3})
    assert inf.family == "infinity" and inf.sampling == INFINITY_UPSTREAM and inf.model.config.num_scales == 3
    with pytest.raises(ValueError, match="prompt: this pipeline has no text encoder"):
        inf("a fox")


# ----------------------------------------------------------------------------- errors, before any compute


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt": "a bag"}, "prompt: a class-conditional VAR takes class_labels="),
    ({}, "class_labels is required"),
    ({"class_labels": ["sneakers!"]}, "unknown class 'sneakers!'; the classes are t-shirt"),
    ({"class_labels": [10]}, r"class labels must be in \[0, 10\)"),
    ({"class_labels": [1], "output_type": "latent"}, "output_type must be one of pil, np, pt"),
    ({"class_labels": [1], "seed": 1, "generator": torch.Generator()}, "give seed or generator, not both"),
    ({"class_labels": [1], "generator": [torch.Generator()]}, "generator must be one torch.Generator"),
    ({"class_labels": [1], "ssg_scale": 0.5, "ssg": se.SSG()}, "give ssg_scale or ssg, not both"),
    ({"class_labels": [1], "num_images_per_prompt": 0}, "num_images_per_prompt must be an integer >= 1"),
    ({"class_labels": [1], "batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"class_labels": [1], "guidance_scale": math.nan}, "guidance_scale"),
    ({"class_labels": [1], "temperature": 0}, "temperature must be"),
    ({"class_labels": [1], "seed": -1}, r"seed must be an integer in \[0, 2\*\*63 - 1\]"),
    ({"class_labels": [1], "negative_prompt": "x"}, "negative_prompt is for Infinity models"),
    ({"class_labels": [1], "h_div_w": 1.0}, "h_div_w is for Infinity models"),
])
def test_bad_call_is_one_error_before_any_compute(var_pipe, monkeypatch, kwargs, match):
    monkeypatch.setattr(pp, "generate", lambda *a, **k: pytest.fail("generate ran"))
    with pytest.raises((ValueError, TypeError), match=match):
        var_pipe(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"class_labels": [1]}, "class_labels: a text-to-image infinity model takes prompt="),
    ({}, "give prompt= .* or prompt_embeds="),
    ({"prompt": "a red fox"}, "red"),
    ({"prompt": ["a bag", "a coat"], "negative_prompt": ["a", "b", "c"]}, "negative_prompt: one for all prompts, or one per prompt"),
    ({"prompt": "a bag", "h_div_w": 0.123}, "h_div_w"),
])
def test_bad_text_call_is_one_error(t2i_pipe, monkeypatch, kwargs, match):
    monkeypatch.setattr(pp, "generate", lambda *a, **k: pytest.fail("generate ran"))
    with pytest.raises((ValueError, TypeError), match=match):
        t2i_pipe(**kwargs)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="'nope' does not exist; give a shipped model's name \\(fashion-mnist, fashion-mnist-t2i, fashion-mnist-hart\\)"):
        se.Pipeline.from_pretrained("nope")
    (tmp_path / "f.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        se.Pipeline.from_pretrained(tmp_path / "f.pth")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no single released checkpoint pair \\(no checkpoint files\\)"):
        se.Pipeline.from_pretrained(empty)
    with pytest.raises(ValueError, match="torch_dtype must be None or one of"):
        se.Pipeline.from_pretrained("fashion-mnist", torch_dtype=torch.int8)
    with pytest.raises(ValueError, match="torch_dtype: HART runs in float32"):
        se.Pipeline.from_pretrained(HART_DIR, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda"):
        se.Pipeline.from_pretrained("fashion-mnist", device="tpu")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="model_index.json is not a manifest written by ssg_engine's save_pretrained"):
        se.Pipeline.from_pretrained(bad)


# ----------------------------------------------------------------------------- labelled grids


def test_labelled_grid_keeps_cells_and_draws_labels():
    g = torch.Generator().manual_seed(0)
    base, guided = torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8, generator=g)
    img = np.asarray(labelled_grid([base, guided], ["baseline", "SSG beta=0.5, prior dse"], ["sneaker", "bag"], 2, upscale=3))
    cells = np.asarray(to_pil(side_by_side([make_grid(base, 2), make_grid(guided, 2)]), 3))
    H, W = cells.shape[:2]
    assert img.shape[0] > H and img.shape[1] > W and np.array_equal(img[-H:, -W:], cells)
    header, column = img[: img.shape[0] - H], img[:, : img.shape[1] - W]
    assert (header < 128).any() and (column < 128).any()  # text drawn in both
    plain = np.asarray(labelled_grid([base, guided], ["", ""], ["", ""], 2, upscale=3))
    assert (plain[: plain.shape[0] - H] == 255).all()  # an empty label draws nothing: the marks above are the text
    with pytest.raises(ValueError, match="row_labels: one per grid row \\(2\\), got 3"):
        labelled_grid([base, guided], ["a", "b"], ["x", "y", "z"], 2)


def test_pipeline_compare_is_labelled_and_holds_the_same_images(var_pipe):
    grid = np.asarray(var_pipe.compare(class_labels=["sneaker", "bag"], num_images_per_prompt=2, seed=6, upscale=1))
    base = var_pipe(class_labels=["sneaker", "bag"], num_images_per_prompt=2, seed=6, output_type="pt").images
    guided = var_pipe(class_labels=["sneaker", "bag"], num_images_per_prompt=2, seed=6, ssg=se.SSG(), output_type="pt").images
    cells = np.asarray(to_pil(side_by_side([make_grid(base, 2), make_grid(guided, 2)])).convert("RGB"))
    H, W = cells.shape[:2]
    assert np.array_equal(grid[-H:, -W:], cells)
    assert (grid[: grid.shape[0] - H] < 128).any() and (grid[:, : grid.shape[1] - W] < 128).any()
    assert se.SSG().for_model(var_pipe.model).title() == "SSG beta=0.5, prior dse"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run by bench/device_check.sh")
@pytest.mark.parametrize("name, kwargs", [("fashion-mnist", {"class_labels": [7, 8, 0]}),
                                          ("fashion-mnist-t2i", {"prompt": ["a sneaker", "a bag", "a coat"]})])
def test_pipe_on_cuda_runs_the_engine_and_ignores_batching(name, kwargs):
    pipe = se.Pipeline.from_pretrained(name, device="cuda")
    pipe.set_progress_bar_config(disable=True)
    whole = pipe(**kwargs, seed=3, num_images_per_prompt=2, output_type="pt").images
    assert whole.device.type == "cuda" and whole.shape == (6, 3, 32, 32)
    cond = kwargs.get("class_labels") or pipe.text_encoder.encode(kwargs["prompt"])
    rows = pp.repeat_rows(cond, 2)
    want = se.generate(pipe.model, pipe.vae, rows, pipe.sampling, seed=3)  # the Engine, one batch
    assert close(whole, want)
    split = pipe(**kwargs, seed=3, num_images_per_prompt=2, batch_size=4, output_type="pt").images
    assert close(split, whole)  # another Engine bucket, the same rows' streams
