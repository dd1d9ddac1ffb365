"""Issue 19 (part B): the Infinity command line checked whole before any model loads, with messages that name the flag
or file; a missing matplotlib found before compute; every ``python -m`` of the package either working or saying where
the command is; and, for users of upstream checkpoints, ``to_uint8`` (upstream's uint8 BGR) and the model card's SSG
beta. (Lost work, unbounded counts, full disks and Ctrl-C at start-up: ``tests/test_faults.py``.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import INFINITY_GOLDEN

import ssg_engine as se
from ssg_engine.cli import main

REPO = Path(__file__).resolve().parents[1]
SQ = ["--family", "infinity", "--var", str(INFINITY_GOLDEN / "sq_d16" / "infinity.pth"), "--vae", str(INFINITY_GOLDEN / "sq_d16" / "vae.pth")]
CT5, TEXT_MAXLEN = 256, 32  # sq_d16's text width and text_maxlen

pytestmark = pytest.mark.usefixtures("one_thread")


def error_line(rc: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def features_file(tmp: Path, lens) -> Path:
    path = tmp / "features.pt"
    torch.save({"kv_compact": torch.randn(sum(lens), CT5, generator=torch.Generator().manual_seed(0)), "lens": list(lens)}, path)
    return path


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a checkpoint is read (what "checked before any model loads" means)."""
    import ssg_engine.loading
    import ssg_engine.pretrained

    def loaded(*args, **kwargs):
        pytest.fail("a model was loaded before the command line was checked")

    for module, name in ((ssg_engine.loading, "load_infinity"), (ssg_engine.loading, "read_state_dict"),
                         (ssg_engine.loading, "load_models"), (ssg_engine.pretrained, "load_infinity_folder")):
        monkeypatch.setattr(module, name, loaded)


# ----------------------------------------------------------------------------- checked too late, or unclear

EARLY = [  # (id, argv after "sample", words of the one line)
    ("pn-superscript", [*SQ, "--text-features", "{feats}", "--pn", "²"], ["--pn ²", "not in Infinity's table"]),
    ("pn-zero", [*SQ, "--text-features", "{feats}", "--pn", "0"], ["--pn 0", "1 to 13"]),
    ("pn-unknown", [*SQ, "--text-features", "{feats}", "--pn", "2M"], ["--pn 2M"]),
    ("h-div-w", [*SQ, "--text-features", "{feats}", "--h-div-w", "0.9"], ["--h-div-w 0.9", "not in Infinity's table"]),
    ("text-features-missing", [*SQ, "--text-features", "{tmp}/nope.pt"], ["--text-features", "nope.pt", "no such file"]),
    ("text-encoder-missing", [*SQ, "--text-encoder", "{tmp}/no_t5"], ["--text-encoder", "no_t5", "folder not found"]),
    ("config-missing", [*SQ, "--text-features", "{feats}", "--config", "nope.json"], ["--config nope.json", "no such file"]),
    ("no-text-source", [*SQ], ["--text-encoder", "--text-features"]),
]


@pytest.mark.parametrize("argv, words", [c[1:] for c in EARLY], ids=[c[0] for c in EARLY])
def test_infinity_command_line_is_checked_before_the_checkpoint(argv, words, tmp_path, capsys, monkeypatch, no_model_loads):
    monkeypatch.chdir(tmp_path)
    places = dict(tmp=tmp_path, feats=features_file(tmp_path, [3]))
    line = error_line(main(["sample", *[a.format(**places) for a in argv], "--out", str(tmp_path / "g.png")]), capsys.readouterr().err)
    for w in words:
        assert w in line, (w, line)
    assert not (tmp_path / "g.png").exists()


def test_eval_infinity_without_text_encoder_is_refused_before_loading(tmp_path, capsys, no_model_loads):
    line = error_line(main(["eval", *SQ, "--out-dir", str(tmp_path / "e")]), capsys.readouterr().err)
    assert "--text-encoder" in line and not (tmp_path / "e").exists()


def test_too_long_text_names_the_cli_flag_not_the_python_keyword(tmp_path, capsys, monkeypatch):
    import ssg_engine.pretrained

    feats = features_file(tmp_path, [TEXT_MAXLEN + 1])
    line = error_line(main(["sample", *SQ, "--text-features", str(feats), "--pn", "3", "--out", str(tmp_path / "g.png")]),
                      capsys.readouterr().err)
    assert "--text-features" in line and f"{TEXT_MAXLEN} (text_maxlen)" in line and "negative=" not in line
    # with a text encoder (one whose prompts can pass text_maxlen, as Flan-T5's) the fix is --negative-prompt
    model, vae, _ = ssg_engine.pretrained.load_pretrained_infinity()
    maxlen = model.config.text_maxlen

    class LongTextEncoder:
        def encode(self, prompts):
            return se.TextFeatures(torch.zeros(len(prompts) * (maxlen + 1), model.Ct5), [maxlen + 1] * len(prompts))

    monkeypatch.setattr(ssg_engine.pretrained, "load_pretrained_infinity", lambda device="cpu": (model, vae, LongTextEncoder()))
    line = error_line(main(["sample", "--family", "infinity", "--prompt", "a bag", "--out", str(tmp_path / "g.png")]),
                      capsys.readouterr().err)
    assert "--prompt" in line and "--negative-prompt" in line and "negative=" not in line
    assert not (tmp_path / "g.png").exists()


def test_damaged_or_nan_eval_runs_file_is_named(tmp_path):
    from ssg_engine.eval.ablation import METRIC_KEYS, load_run

    key = {"seed": 1, "arm": "x"}
    path = tmp_path / "runs" / "x_seed1.json"
    path.parent.mkdir()
    metrics = {k: 0.5 for k in METRIC_KEYS}
    for bad in ("{\"key\": ", json.dumps({"key": key, "metrics": {**metrics, "fd_cls": float("nan")}, "seconds": 1.0})):
        path.write_text(bad)
        with pytest.raises(ValueError, match=f"{path} is damaged.*delete it"):
            load_run(path, key)
    path.write_text(json.dumps({"key": key, "metrics": {**metrics, "fid": None}, "seconds": 1.0}))
    assert load_run(path, key)["metrics"]["fid"] is None  # an unscored metric is fine


# ----------------------------------------------------------------------------- a missing optional extra


def test_spectrum_without_matplotlib_says_so_before_computing(tmp_path, capsys, monkeypatch, no_model_loads):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: find_spec None, import fails
    line = error_line(main(["spectrum", "--out", str(tmp_path / "s.png")]), capsys.readouterr().err)
    assert "matplotlib" in line and "pip install" in line and list(tmp_path.iterdir()) == []


def test_eval_without_matplotlib_skips_the_plot_with_a_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out_dir = tmp_path / "abl"
    argv = ["eval", "--device", "cpu", "--samples", "4", "--batch-size", "4", "--priors", "dse", "--fid-arms", "none",
            "--seeds", "1", "--betas", "0.5", "--out-dir", str(out_dir), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    note = out.splitlines()[0]
    assert note.startswith("note: matplotlib is not installed") and "spectrum.png" in note  # said first, before computing
    assert (out_dir / "ablation.json").is_file() and not (out_dir / "spectrum.png").exists()


# ----------------------------------------------------------------------------- python -m


def _run_module(module: str, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("module, command", [
    ("ssg_engine.eval.fid_sample", "fid-sample"), ("ssg_engine.eval.ablation", "eval"), ("ssg_engine.eval", "fid-sample"),
    ("ssg_engine.training", "train"),
])
def test_old_module_entries_say_where_the_command_is(module, command, tmp_path):
    r = _run_module(module, "--per-class", "1", "--out", str(tmp_path / "s.npz"))
    line = error_line(r.returncode, r.stderr)
    assert f"python -m {module} is not a command" in line and f"ssg-engine {command}" in line
    assert list(tmp_path.iterdir()) == []


def test_python_m_ssg_engine_runs_the_command_line():
    r = _run_module("ssg_engine", "plan", "--batch-size", "2")
    assert r.returncode == 0 and "batch 2" in r.stdout, r.stderr


def test_import_ssg_engine_does_not_import_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, ssg_engine, ssg_engine.cli; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    assert se.SSG is se.guidance.SSG and "to_uint8" in se.__all__ and set(se.__all__) <= set(dir(se))


# ----------------------------------------------------------------------------- users of upstream checkpoints


def test_to_uint8_layouts_and_upstream_bgr():
    images = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    images[0, 0, 0, 0], images[1, 2, 4, 3] = -0.5, 1.5  # clamped
    expected = np.clip(np.rint(images.numpy().astype(np.float64) * 255), 0, 255).astype(np.uint8)  # (B, C, H, W)
    assert np.array_equal(se.to_uint8(images), expected.transpose(0, 2, 3, 1))
    assert np.array_equal(se.to_uint8(images, layout="BCHW"), expected)
    bgr = se.to_uint8(images, layout="BHWC", bgr=False)[..., ::-1]  # upstream Infinity: uint8 BGR (B, H, W, 3)
    assert np.array_equal(se.to_uint8(images, bgr=True), bgr)
    assert np.array_equal(se.to_uint8(images, layout="BCHW", bgr=True), expected[:, ::-1])
    with pytest.raises(ValueError, match="layout"):
        se.to_uint8(images, layout="HWC")
    with pytest.raises(ValueError, match="bgr=True needs 3"):
        se.to_uint8(images[:, :1], bgr=True)
    with pytest.raises(ValueError, match="images must be"):
        se.to_uint8(images[0])


def test_ssg_without_beta_takes_the_model_cards_value():
    from ssg_engine.guidance import DEFAULT_BETA
    from ssg_engine.pretrained import INFINITY_SSG_BETA, load_pretrained_infinity

    model, vae, text_encoder = load_pretrained_infinity()
    assert model.ssg_beta == INFINITY_SSG_BETA != DEFAULT_BETA
    assert se.SSG().for_model(model) == se.SSG(beta=INFINITY_SSG_BETA)
    assert se.SamplingParams(ssg=se.SSG(prior="dse")).for_model(model).ssg.beta == INFINITY_SSG_BETA
    assert se.SSG(beta=0.7).for_model(model).beta == 0.7  # a beta given is kept
    run = dict(cond=["a bag", "a sneaker"], text_encoder=text_encoder, seed=5, cfg=3.0, top_k=0, top_p=0.0)
    default = se.generate(model, vae, ssg=se.SSG(), **run)
    assert torch.equal(default, se.generate(model, vae, ssg=se.SSG(beta=INFINITY_SSG_BETA), **run))
    assert not torch.equal(default, se.generate(model, vae, ssg=se.SSG(beta=DEFAULT_BETA), **run))
