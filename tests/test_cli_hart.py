"""``ssg-engine sample/info --family hart``: text-to-image sampling from the command line on upstream's golden tiny
HART (a_d2: released llm/ + tokenizer/ layout) with precomputed text features, and the one-line errors of its flags."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ssg_engine as se
from ssg_engine.cli import main
from ssg_engine.imaging import make_grid, side_by_side, to_pil

GOLDEN = Path(__file__).resolve().parent / "golden"
A = GOLDEN / "hart" / "a_d2"
QWEN = GOLDEN / "hart" / "text" / "qwen2"
TINY = GOLDEN / "var_tiny"
HART = ["--family", "hart", "--var", str(A / "llm"), "--vae", str(A / "tokenizer"), "--device", "cpu"]
LC, CC, PX = 12, 48, 12  # a_d2: context_token, context_dim, image side

pytestmark = pytest.mark.usefixtures("one_thread")


def features_file(tmp: Path, lens, width: int = CC) -> Path:
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(LC)[None] < torch.tensor(lens)[:, None]
    path = tmp / "hart_features.pt"
    se.HARTTextFeatures(torch.randn(len(lens), LC, width, generator=g), mask).save(path)
    return path


def error_line(rc: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_sample_compare_writes_both_grids_and_matches_generate(tmp_path, capsys):
    feats = features_file(tmp_path, [5, 9])
    out, per = tmp_path / "cmp.png", tmp_path / "each"
    rc = main(["sample", *HART, "--text-features", str(feats), "--per-prompt", "2", "--compare", "--cfg", "2",
               "--seed", "7", "--upscale", "1", "--out", str(out), "--out-dir", str(per)])
    assert rc == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    # two grids of 2 x 2 images side by side (the per-image PNGs: baseline 0-3, SSG 4-7), under a header band
    each = torch.stack([torch.from_numpy(np.array(Image.open(per / f"{i:05d}.png"))).permute(2, 0, 1).float() / 255 for i in range(8)])
    cells = np.asarray(to_pil(side_by_side([make_grid(each[:4], 2), make_grid(each[4:], 2)])))
    grid = np.asarray(Image.open(out))
    assert grid.shape[0] > cells.shape[0] and grid.shape[1] > cells.shape[1]
    assert np.array_equal(grid[-cells.shape[0]:, -cells.shape[1]:], cells)
    assert (grid[: grid.shape[0] - cells.shape[0]] < 128).any()  # the header's text
    model, tok = se.load_hart(A / "llm", A / "tokenizer")
    f = se.HARTTextFeatures.load(feats)[torch.tensor([0, 0, 1, 1])]
    want = se.generate(model, tok, f, se.params.HART_UPSTREAM.replace(cfg=2.0, seed=7))  # image j keyed by (7, j)
    got = torch.from_numpy(np.array(Image.open(per / "00001.png"))).permute(2, 0, 1).float() / 255
    assert (got - want[1]).abs().max() <= 1 / 255 + 1e-6  # the baseline's second image, as generate gives it


def test_info_names_the_family(capsys):
    for path, kind in ((A / "llm", "HART transformer"), (A / "llm" / "model.safetensors", "HART transformer"),
                       (A / "tokenizer", "HART tokenizer")):
        assert main(["info", str(path)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["kind"] == kind and info["config_source"].endswith("config.json")
    assert info["config"]["vocab_size"] == 768


@pytest.mark.parametrize("extra, match", [
    (["--pn", "3"], "--pn is for --family infinity"),
    (["--negative-prompt", "x"], "--negative-prompt"),
    (["--classes", "1"], "--classes/--per-class are for class-conditional models; with --family hart"),
    (["--preset", "d16"], "--preset is not for HART"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, extra, match):
    rc = main(["sample", *HART, "--text-features", str(features_file(tmp_path, [3])), *extra, "--out", str(tmp_path / "g.png")])
    assert match in error_line(rc, capsys.readouterr().err)


def test_bad_inputs_are_one_line(tmp_path, capsys):
    feats = features_file(tmp_path, [3])
    cases = [
        (["sample", "--family", "hart", "--var", str(A / "llm"), "--vae", str(A / "tokenizer"), "--prompt", "a cat"],
         "needs --text-encoder FOLDER (Qwen2) or --text-features"),
        (["sample", *HART], "needs --text-encoder FOLDER (Qwen2) or --text-features"),
        (["sample", *HART, "--text-features", str(features_file(tmp_path, [3], width=CC + 1))], "this HART takes (B, 12, 48)"),
        (["sample", *HART, "--prompt", "a cat", "--text-encoder", str(QWEN)], "--text-encoder gives features of shape (B, 12, 64)"),
        (["sample", "--family", "hart", "--var", str(TINY / "var.pth"), "--vae", str(A / "tokenizer"), "--text-features", str(feats)],
         "is a VAR checkpoint, not a HART transformer one; load it with load_models"),
        (["sample", "--family", "hart", "--var", str(A / "llm"), "--vae", str(TINY / "vae.pth"), "--text-features", str(feats)],
         "load it with load_models"),
        (["sample", "--family", "var", "--var", str(A / "llm" / "model.safetensors"), "--vae", str(TINY / "vae.pth")], "load_hart"),
    ]
    for argv, match in cases:
        rc = main([*argv, "--out", str(tmp_path / "g.png")])
        assert match in error_line(rc, capsys.readouterr().err), argv
