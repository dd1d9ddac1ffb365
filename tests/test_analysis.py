"""Latent spectral analysis and the ``spectrum`` subcommand."""
from __future__ import annotations

import json
import math

import torch

from ssg_engine import SSG
from ssg_engine.analysis import radial_log_spectrum, spectra_for
from ssg_engine.cli import main
from ssg_engine.guidance import dct_matrix


def test_radial_spectrum_of_known_maps():
    const = torch.full((1, 6, 6), 3.0)
    spec = radial_log_spectrum(const)
    assert math.isclose(spec[0].item(), math.log(3.0 * 6), rel_tol=1e-9)  # DC of an orthonormal DCT = mean * sqrt(HW)
    assert (spec[1:] < -20).all()  # nothing else (clamped at 1e-12)
    # a single high-frequency DCT basis function lands at its radius only
    H = 6
    basis = dct_matrix(H).T[:, 5:6] @ dct_matrix(H).T[:, 5:6].T  # (u, v) = (5, 5)
    spec = radial_log_spectrum(basis.unsqueeze(0).float())
    assert spec.argmax().item() == round(math.sqrt(50))


def test_spectra_per_scale(tiny_models):
    _, var = tiny_models
    labels = torch.tensor([1, 2])
    base = spectra_for(var, labels, 0, None, top_k=64)
    ssg = spectra_for(var, labels, 0, SSG(beta=1.0), top_k=64)
    assert [s.size for s in base] == list(var.patch_nums[1:])
    assert [s.prev_nyquist for s in base] == list(var.patch_nums[:-1])
    # same seed and step 1 history: the step-1 residual (from CFG logits) is identical, tokens may differ
    assert base[0].residual_log_mag == ssg[0].residual_log_mag


def test_spectrum_cli(tiny_dir, tmp_path):
    args = ["--var", str(tiny_dir / "var.pth"), "--vae", str(tiny_dir / "vae.pth"), "--config", str(tiny_dir / "config.json")]
    rc = main(["spectrum", *args, "--classes", "1", "2", "--out", str(tmp_path / "s.png"), "--json", str(tmp_path / "s.json")])
    assert rc == 0 and (tmp_path / "s.png").stat().st_size > 1000
    data = json.loads((tmp_path / "s.json").read_text())
    assert set(data) == {"baseline", "SSG beta=0.5"} and len(data["baseline"]) == 6
