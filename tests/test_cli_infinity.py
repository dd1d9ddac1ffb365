"""``ssg-engine sample/eval --family infinity``: text-to-image sampling from the command line, on upstream's tiny golden
checkpoints with precomputed text features, and the one-line errors of its flags."""
from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
import torch
from conftest import INFINITY_GOLDEN
from PIL import Image

from ssg_engine.cli import main

SQ = ["--family", "infinity", "--var", str(INFINITY_GOLDEN / "sq_d16" / "infinity.pth"), "--vae", str(INFINITY_GOLDEN / "sq_d16" / "vae.pth")]
CT5 = 256  # sq_d16's text width


pytestmark = pytest.mark.usefixtures("one_thread")


def features_file(tmp: Path, lens: List[int], width: int = CT5, padded: bool = False) -> Path:
    """A --text-features file of ``len(lens)`` prompts (packed, or padded with a mask)."""
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(sum(lens), width, generator=g)
    path = tmp / ("padded.pt" if padded else "packed.pt")
    if padded:
        T = max(lens)
        feats, mask = torch.zeros(len(lens), T, width), torch.zeros(len(lens), T, dtype=torch.bool)
        start = 0
        for b, n in enumerate(lens):
            feats[b, :n], mask[b, :n] = kv[start : start + n], True
            start += n
        torch.save({"features": feats, "mask": mask}, path)
    else:
        torch.save({"kv_compact": kv, "lens": lens}, path)
    return path


def error_line(rc: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("padded", [False, True])
def test_sample_from_text_features(tmp_path, capsys, padded):
    """Two prompts x 2 images, baseline and SSG side by side, on the 4-scale square schedule (6 x 6 latent -> 96 px)."""
    feats = features_file(tmp_path, [5, 3], padded=padded)
    out = tmp_path / "cmp.png"
    rc = main(["sample", *SQ, "--text-features", str(feats), "--per-prompt", "2", "--pn", "4", "--compare",
               "--cfg", "2", "--temperature", "0.8", "--upscale", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    w, h = Image.open(out).size
    assert w > 2 * 2 * 96 and 2 * 96 <= h < 3 * 96  # two grids of 2 x 2 images of 96 px, side by side


def test_sample_text_features_ssg_beta_zero_equals_baseline(tmp_path, capsys):
    feats = features_file(tmp_path, [4])
    base, zero = tmp_path / "base.png", tmp_path / "zero.png"
    common = ["sample", *SQ, "--text-features", str(feats), "--pn", "3", "--upscale", "1", "--seed", "3"]
    assert main([*common, "--out", str(base)]) == 0
    assert main([*common, "--ssg-beta", "0", "--out", str(zero)]) == 0
    assert base.read_bytes() == zero.read_bytes()


BAD = [
    ("prompt-without-family", ["sample", "--prompt", "a fox"], ["--prompt", "--family infinity"]),
    ("classes-with-infinity", ["sample", "--family", "infinity", "--classes", "1"], ["--classes", "--prompt"]),
    ("text-encoder-with-var", ["sample", "--var", "{file}", "--vae", "{file}", "--text-encoder", "{tmp}"], ["--text-encoder", "--family infinity"]),
    ("no-text-source", ["sample", *SQ], ["--text-encoder", "--text-features"]),
    ("features-missing", ["sample", *SQ, "--text-features", "{tmp}/nope.pt"], ["--text-features", "no such file"]),
    ("features-not-torch", ["sample", *SQ, "--text-features", "{file}"], ["--text-features", "not a torch.save file"]),
    ("features-wrong-width", ["sample", *SQ, "--text-features", "{narrow}"], ["--text-features", "width 64", "256"]),
    ("h-div-w-not-in-table", ["sample", *SQ, "--text-features", "{feats}", "--h-div-w", "0.9"], ["--h-div-w", "not in Infinity's table"]),
    ("pn-unknown", ["sample", *SQ, "--text-features", "{feats}", "--pn", "2M"], ["--pn", "2M"]),
    ("negative-with-features", ["sample", *SQ, "--text-features", "{feats}", "--negative-prompt", "blur"], ["--negative-prompt", "text encoder"]),
    ("prompt-and-features", ["sample", *SQ, "--text-features", "{feats}", "--prompt", "x"], ["--prompt or --text-features"]),
    ("infinity-ckpt-as-var", ["sample", *SQ[2:]],
     ["Infinity", "--family infinity"]),
    ("patch-nums-with-infinity", ["sample", *SQ, "--patch-nums", "1,2"], ["--patch-nums", "--h-div-w"]),
    ("text-encoder-missing-folder", ["sample", *SQ, "--text-encoder", "{tmp}/no_t5"], ["text encoder folder not found", "flan-t5-xl"]),
    ("eval-infinity-no-encoder", ["eval", *SQ, "--out-dir", "{tmp}/e"], ["--text-encoder"]),
]


@pytest.mark.parametrize("argv, words", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_infinity_command_lines(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file.txt").write_text("not a checkpoint\n")
    places = dict(tmp=tmp_path, file=tmp_path / "a_file.txt", feats=features_file(tmp_path, [3]),
                  narrow=features_file(tmp_path, [3], width=64, padded=True))
    rc = main([a.format(**places) for a in argv])
    line = error_line(rc, capsys.readouterr().err)
    for w in words:
        assert w in line, (w, line)
    assert not list(tmp_path.glob("*.png"))


# ----------------------------------------------------------------------------- the shipped text-to-image model


def test_shipped_model_runs_with_no_other_argument(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--family", "infinity", "--prompt", "a sneaker", "--per-prompt", "3", "--compare", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()


def test_shipped_model_unknown_word_lists_the_vocabulary(tmp_path, capsys):
    rc = main(["sample", "--family", "infinity", "--prompt", "a red fox", "--out", str(tmp_path / "g.png")])
    line = error_line(rc, capsys.readouterr().err)
    assert "--prompt" in line and "red" in line and "sneaker" in line and "ankle" in line
    assert not (tmp_path / "g.png").exists()


def test_trained_folder_through_var_vae_config_and_text_encoder_flags(tmp_path, capsys):
    """A folder written by ``train --family infinity`` (here the shipped one): --var/--vae/--config/--text-encoder give
    the same images as the shipped default."""
    from ssg_engine.pretrained import INFINITY_DIR

    common = ["sample", "--family", "infinity", "--prompt", "a bag", "--prompt", "one coat", "--upscale", "1",
              "--cfg", "3", "--temperature", "1", "--top-k", "0", "--top-p", "0"]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main([*common, "--out", str(a)]) == 0
    assert main([*common, "--var", str(INFINITY_DIR / "infinity.safetensors"), "--vae", str(INFINITY_DIR / "vae.safetensors"),
                 "--config", str(INFINITY_DIR / "config.json"), "--text-encoder", str(INFINITY_DIR), "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
