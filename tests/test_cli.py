"""The ``ssg-engine`` command line on the golden tiny checkpoint."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from ssg_engine.cli import build_parser, main
from ssg_engine.cli.common import model_sampling, resolve_ssg_args, sampling_from_args
from ssg_engine.params import SamplingParams
from ssg_engine.pretrained import SAMPLING


def _model_args(tiny_dir):
    return ["--var", str(tiny_dir / "var.pth"), "--vae", str(tiny_dir / "vae.pth"), "--config", str(tiny_dir / "config.json")]


def test_sample_writes_grid_and_pngs(tiny_dir, tmp_path):
    out = tmp_path / "grid.png"
    rc = main(["sample", *_model_args(tiny_dir), "--classes", "1", "9", "3", "--batch-size", "2", "--top-k", "64",
               "--out", str(out), "--out-dir", str(tmp_path / "imgs")])
    assert rc == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape[2] == 3 and grid.shape[0] > 128 and grid.std() > 0
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert np.asarray(Image.open(tmp_path / "imgs" / "00000.png")).shape == (128, 128, 3)


def test_sample_is_deterministic_per_seed(tiny_dir, tmp_path):
    args = ["sample", *_model_args(tiny_dir), "--classes", "2", "5"]
    main([*args, "--seed", "4", "--out", str(tmp_path / "a.png")])
    main([*args, "--seed", "4", "--out", str(tmp_path / "b.png")])
    main([*args, "--seed", "5", "--out", str(tmp_path / "c.png")])
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_patch_nums_flag_and_clear_error(tiny_dir, tmp_path, capsys):
    base = ["sample", "--var", str(tiny_dir / "var.pth"), "--vae", str(tiny_dir / "vae.pth"), "--classes", "1"]
    assert main([*base, "--out", str(tmp_path / "x.png")]) == 2
    assert "cannot infer patch_nums" in capsys.readouterr().err
    assert main([*base, "--patch-nums", "1,2,3,4,5,6,8", "--out", str(tmp_path / "x.png")]) == 0


def test_bad_class_label(tiny_dir, tmp_path, capsys):
    assert main(["sample", *_model_args(tiny_dir), "--classes", "10", "--out", str(tmp_path / "x.png")]) == 2
    assert "class 10 is outside [0, 10)" in capsys.readouterr().err


def test_info(tiny_dir, capsys):
    assert main(["info", str(tiny_dir / "var.pth"), "--patch-nums", "1,2,3,4,5,6,8"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "VAR" and info["config"]["depth"] == 2 and info["config"]["embed_dim"] == 128
    assert info["parameters_and_buffers"] > 0
    assert main(["info", str(tiny_dir / "vae.pth"), "--patch-nums", "1,2,3,4,5,6,8"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "VQ-VAE" and info["config"]["ch"] == 32 and info["config"]["V"] == 256


def test_main_job_on_shipped_model(tmp_path):
    """The README's main command: shipped model, all classes by default, baseline and SSG side by side."""
    out = tmp_path / "grid.png"
    assert main(["sample", "--compare", "--per-class", "2", "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))
    # 10 rows of 32 px images upscaled 4x, two grids side by side
    assert grid.shape[0] > 10 * 32 * 4 and grid.shape[1] > 2 * 2 * 32 * 4


def test_class_names_with_shipped_model(tmp_path):
    out = tmp_path / "named.png"
    assert main(["sample", "--classes", "sneaker", "bag", "ankle_boot", "--out", str(out), "--upscale", "1"]) == 0
    assert np.asarray(Image.open(out)).shape[:2] == (2 + 2 * 34, 2 + 2 * 34)  # 3 images -> 2x2 grid of 32 px + padding


def test_unknown_class_name(tmp_path, capsys):
    assert main(["sample", "--classes", "jacket", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown class 'jacket'; valid classes: 0=t-shirt" in capsys.readouterr().err


def test_unset_sampling_flags_take_the_models_values(tiny_dir):
    """Flags left unset take the model's SamplingParams: the shipped model's card, upstream's protocol for checkpoints."""

    def params(*argv):
        args = build_parser().parse_args(["sample", *argv])
        resolve_ssg_args(args)
        return sampling_from_args(args, model_sampling(args), args.ssg_beta)

    assert params() == SAMPLING and (SAMPLING.cfg, SAMPLING.top_k, SAMPLING.top_p) == (2.0, 128, 0.95)
    assert params(*_model_args(tiny_dir)) == SamplingParams()
    assert params(*_model_args(tiny_dir), "--top-k", "64", "--seed", "3") == SamplingParams(top_k=64, seed=3)
    guided = params("--cfg", "1.5", "--ssg-beta", "0.25", "--ssg-prior", "area")
    assert guided.replace(ssg=None) == SAMPLING.replace(cfg=1.5) and (guided.ssg.beta, guided.ssg.prior) == (0.25, "area")
