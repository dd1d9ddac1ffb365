"""Evaluation tools: metrics on known cases, the FID Inception net, the Fashion-MNIST classifier,
``fid-sample`` (world-size independence under torchrun, resume after SIGKILL) and a tiny ablation run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from ssg_engine.cli import build_parser, main
from ssg_engine.eval import metrics
from ssg_engine.eval.metrics import (
    fid_from_features,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)

# ----------------------------------------------------------------------------- metrics on known cases


def _gauss(n, d, seed, shift=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(size=(n, d)) * scale + shift


@pytest.mark.parametrize("method", ["scipy", "eig"])
def test_fid_self_zero_and_monotone_in_shift(method):
    if method == "scipy":
        pytest.importorskip("scipy", reason="scipy not installed: frechet_distance uses its eigenvalue method (tested too)")
    a, b = _gauss(1500, 12, 0), _gauss(1500, 12, 1)
    assert abs(fid_from_features(a, a, method=method)) < 1e-8
    vals = [fid_from_features(a, b + s, method=method) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert vals[0] < 0.1  # same distribution: only sampling noise
    assert all(x < y for x, y in zip(vals, vals[1:])), vals
    # mean shift s in every one of 12 dims adds about 12 s^2
    assert vals[-1] == pytest.approx(12 * 4.0, rel=0.05)


def test_frechet_distance_closed_form_and_methods_agree():
    # diagonal Gaussians: |mu1 - mu2|^2 + sum (s1 - s2)^2 with standard deviations s
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    expect = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    import importlib.util

    for method in ("scipy", "eig", "auto") if importlib.util.find_spec("scipy") else ("eig", "auto"):
        assert frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2), method=method) == pytest.approx(expect, abs=1e-9)
    # general covariances: the two computations agree
    a, b = _gauss(400, 20, 2), _gauss(400, 20, 3, scale=1.3) @ _gauss(20, 20, 4) * 0.3
    assert fid_from_features(a, b, method="auto") == pytest.approx(fid_from_features(a, b, method="eig"), rel=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(mu1, np.eye(3), mu2[:2], np.eye(2))


def test_fid_lowrank_path_equals_covariance_path():
    # fewer samples than dimensions (as for 1000 samples of 2048-d Inception features)
    a, b = np.abs(_gauss(40, 64, 9)), np.abs(_gauss(30, 64, 10, shift=0.2))
    ref = fid_from_features(a, b, method="eig")
    assert fid_from_features(a, b) == pytest.approx(ref, rel=1e-6)  # auto -> low-rank
    assert fid_from_features(a, b, method="lowrank") == pytest.approx(ref, rel=1e-6)
    big_a, big_b = _gauss(300, 8, 11), _gauss(200, 8, 12, shift=0.5)
    assert fid_from_features(big_a, big_b, method="lowrank") == pytest.approx(fid_from_features(big_a, big_b, method="eig"), rel=1e-6)


def test_kid_zero_for_same_distribution_and_grows_with_shift():
    a, b = _gauss(600, 16, 5), _gauss(600, 16, 6)
    same, same_std = kernel_inception_distance(a, b, num_subsets=20, max_subset_size=300)
    assert abs(same) < max(3 * same_std, 0.01)
    shifted = [kernel_inception_distance(a, b + s, num_subsets=20, max_subset_size=300)[0] for s in (0.5, 1.0, 2.0)]
    assert same < shifted[0] < shifted[1] < shifted[2]


def test_precision_recall_known_cases():
    a, b = _gauss(300, 8, 7), _gauss(300, 8, 8)
    assert precision_recall(a, a, k=3) == (1.0, 1.0)
    p, r = precision_recall(a, b, k=3)
    assert 0.6 < p < 1.0 and 0.6 < r < 1.0
    assert precision_recall(a, b + 20.0, k=3) == (0.0, 0.0)
    # generated set collapsed onto a few real points: high precision, low recall
    p, r = precision_recall(a, np.repeat(a[:5], 60, axis=0) + 1e-6, k=3)
    assert p == 1.0 and r < 0.2


# ----------------------------------------------------------------------------- FID Inception network


@pytest.mark.slow
def test_inception_loads_and_gives_features():
    try:
        path = metrics.inception_path()
    except metrics.InceptionUnavailable as e:
        pytest.fail(f"{e}  (CI: add `{metrics.INCEPTION_INSTALL}` to .ci/run)")
    assert path.name == "default_1.pt"
    x = torch.zeros(3, 3, 32, 32)
    x[1] = 1.0
    x[2, :, 8:24, 8:24] = 0.7
    prep = metrics.prepare_inception_input(x)
    assert prep.shape == (3, 3, 299, 299)
    assert float(prep.min()) == -1.0 and float(prep.max()) == pytest.approx(127 / 128)  # TF range [-1, 0.9921875]
    assert torch.allclose(prep[1], torch.full_like(prep[1], 127 / 128))  # resize keeps constants
    feats = metrics.inception_features(x, batch_size=2, device="cpu")
    assert feats.shape == (3, 2048) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and (feats >= 0).all()  # post-ReLU average pool
    assert np.abs(feats[0] - feats[2]).max() > 1e-3
    # grey (1-channel) input is the same as replicated 3-channel input
    np.testing.assert_allclose(metrics.inception_features(x[2:, :1], device="cpu"), feats[2:], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- classifier


def test_classifier_accuracy_matches_reported_value():
    from ssg_engine.eval.classifier import class_accuracy, dataset_images01, load_classifier

    model, info = load_classifier(train_if_missing=False)
    x, y = dataset_images01("test")
    acc = class_accuracy(model, x, y)
    assert info["test_accuracy"] > 0.88
    assert acc == pytest.approx(info["test_accuracy"], abs=2e-3)
    # 3-channel replicated input (what the samplers return) scores the same
    assert class_accuracy(model, x[:500].expand(-1, 3, -1, -1), y[:500]) == class_accuracy(model, x[:500], y[:500])


@pytest.mark.slow
def test_classifier_training_runs_and_reports_its_accuracy(tmp_path):
    from ssg_engine.eval.classifier import class_accuracy, dataset_images01, load_classifier, save_classifier, train_classifier

    model, info = train_classifier(epochs=1, max_train=2000, max_test=2000, verbose=False)
    assert info["test_accuracy"] > 0.5 and info["test_images"] == 2000
    save_classifier(model, tmp_path / "c.safetensors", info)
    loaded, info2 = load_classifier(tmp_path / "c.safetensors", train_if_missing=False)
    x, y = dataset_images01("test")
    assert class_accuracy(loaded, x[:2000], y[:2000]) == pytest.approx(info2["test_accuracy"], abs=1e-4)


# ----------------------------------------------------------------------------- fid-sample


def _fid_args(out, extra=()):
    """fid-sample on the shipped Fashion-MNIST model (the default when no --var/--vae are given)."""
    return ["--device", "cpu", "--per-class", "3", "--num-classes", "4", "--batch-size", "1", "--out", str(out), *extra]


def _run_in_process(argv):
    assert main(["fid-sample", *argv]) == 0


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def reference_npz(tmp_path_factory):
    out = tmp_path_factory.mktemp("fid_ref") / "ref.npz"
    _run_in_process(_fid_args(out))
    return out


def _load(path):
    with np.load(path) as z:
        return z["arr_0"], z["arr_1"]


def test_fid_sample_layout(reference_npz):
    arr, labels = _load(reference_npz)
    assert arr.dtype == np.uint8 and arr.shape == (12, 32, 32, 3)
    assert labels.tolist() == [c for c in range(4) for _ in range(3)]
    assert len({a.tobytes() for a in arr}) == 12  # every image has its own randomness


def test_fid_sample_shard_seed_rule():
    from ssg_engine.eval.fid_sample import shard_plan, shard_seed

    plan = shard_plan(3, 5, 2)
    assert [(s.cls, s.start, s.n) for s in plan[:3]] == [(0, 0, 2), (0, 2, 2), (0, 4, 1)]
    seeds = {shard_seed(0, s.cls, s.start) for s in plan}
    assert len(seeds) == len(plan) and shard_seed(0, 1, 2) == shard_seed(0, 1, 2) != shard_seed(1, 1, 2)


@pytest.mark.slow
def test_fid_sample_torchrun_two_processes_bit_identical(tmp_path, reference_npz):
    out = tmp_path / "two.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ssg_engine.cli", "fid-sample", *_fid_args(out)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "on 2 process(es)" in r.stderr
    a, la = _load(out)
    b, lb = _load(reference_npz)
    assert np.array_equal(a, b) and np.array_equal(la, lb)


@pytest.mark.slow
def test_fid_sample_resumes_after_sigkill(tmp_path, reference_npz, capsys):
    from ssg_engine.eval.fid_sample import STALL_ENV

    out = tmp_path / "resumed.npz"
    shard_dir = tmp_path / "resumed.npz.shards"
    cmd = [sys.executable, "-m", "ssg_engine.cli", "fid-sample", *_fid_args(out)]
    p = subprocess.Popen(cmd, env=dict(_env(), **{STALL_ENV: "2"}), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(240, p.kill)
    watchdog.start()
    try:
        log = []
        for line in p.stderr:
            log.append(line)
            if "stalling" in line:
                break
        assert any("stalling" in l for l in log), "".join(log)
        os.kill(p.pid, signal.SIGKILL)  # a hard kill mid-run
        p.wait(timeout=30)
    finally:
        watchdog.cancel()
        if p.poll() is None:
            p.kill()
        p.stderr.close()
        p.stdout.close()
    done = sorted(f.name for f in shard_dir.glob("c*.npy"))
    assert len(done) == 2 and not out.exists()
    mtimes = {n: (shard_dir / n).stat().st_mtime_ns for n in done}
    (shard_dir / f".{done[0]}.tmp999").write_bytes(b"partial write of a killed run")  # leftovers are ignored
    capsys.readouterr()
    _run_in_process(_fid_args(out))
    assert "2 already done, 10 to make" in capsys.readouterr().err
    assert {n: (shard_dir / n).stat().st_mtime_ns for n in done} == mtimes  # finished shards were not redone
    a, la = _load(out)
    b, lb = _load(reference_npz)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    # a restart with settings that change the images is refused
    assert main(["fid-sample", *_fid_args(out, ["--cfg", "3.0"])]) == 2
    assert "other settings" in capsys.readouterr().err


# ----------------------------------------------------------------------------- ablation


def _fake_inception(images01, batch_size=50, device=None, progress=False):
    """Cheap stand-in for Inception (the real net is tested above): 64 fixed random projections of 16x16 pixels."""
    x = torch.nn.functional.interpolate(images01.float().mean(1, keepdim=True), size=(16, 16), mode="area").flatten(1)
    w = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    return torch.relu(x.double() @ w.double()).numpy()


def test_radial_spectrum():
    from ssg_engine.eval.ablation import radial_amplitude_spectrum

    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 32, 32, generator=g)
    s = radial_amplitude_spectrum(x)
    assert s.shape == (17,) and s[0] == pytest.approx(0.0, abs=1e-12)  # mean removed
    assert s[1:].std() / s[1:].mean() < 0.15  # white noise is flat
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    sb = radial_amplitude_spectrum(blurred)
    assert sb[-1] / s[-1] < 0.3 and sb[1] / s[1] > 0.8  # blur removes high frequencies only


@pytest.mark.slow
def test_ablation_tiny_run(tiny_models, tmp_path, monkeypatch):
    from ssg_engine.eval import ablation

    monkeypatch.setattr(metrics, "inception_features", _fake_inception)
    vae, var = tiny_models
    kw = dict(samples=4, seeds=2, betas=[0.5], temperatures=[1.2], priors=["nearest"], top_k=64, batch_size=4,
              fid_arms="main", inception_ref_n=16, cache=str(tmp_path / "cache"), log=lambda m: None)
    res = ablation.run_ablation(var, vae, tmp_path / "abl", **kw)
    names = [a["name"] for a in res["arms"]]
    assert names == ["baseline T=1.2", "nearest b=0.5 T=1.2"]
    for a in res["arms"]:
        assert len(a["per_seed"]) == 2
        for k in ("acc", "fd_cls", "precision", "recall"):
            assert np.isfinite(a[k]["mean"]) and np.isfinite(a[k]["std"])
        assert (a["fid"]["mean"] is not None) == (a["prior"] != "nearest")  # Inception only for the main arms
    base = res["arms"][0]["per_seed"]
    assert base[0]["fd_cls"] != base[1]["fd_cls"]  # seeds differ
    saved = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert [a["name"] for a in saved["arms"]] == names
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "| nearest b=0.5 T=1.2 |" in md and "FD-cls" in md
    assert (tmp_path / "abl" / "spectrum.png").stat().st_size > 1000
    # --resume with the same settings keeps the finished arms
    res2 = ablation.run_ablation(var, vae, tmp_path / "abl", resume=True, **kw)
    assert res2["arms"] == res["arms"]


def test_arms_share_one_temperature_grid():
    from ssg_engine.eval.ablation import build_arms

    arms = build_arms([0.25, 1.0], [0.9, 1.0], ["dse", "area"])
    assert len(arms) == 2 * (1 + 2 * 2)
    for t in (0.9, 1.0):
        at_t = [(a.prior, a.beta) for a in arms if a.temperature == t]
        assert at_t == [(None, 0.0), ("dse", 0.25), ("dse", 1.0), ("area", 0.25), ("area", 1.0)]
    assert [a.main for a in arms[:5]] == [True, True, True, False, False]
    with pytest.raises(ValueError):
        build_arms([0.5], [1.0], ["dct"])


def test_cli_subcommands_parse():
    parser = build_parser()
    a = parser.parse_args(["eval", "--samples", "20", "--seeds", "1", "--betas", "0.25", "0.5,1", "--temperatures", "1", "1.2",
                           "--priors", "dse", "area", "--out-dir", "x"])
    assert a.samples == 20 and a.seeds == 1 and a.betas == ["0.25", "0.5,1"] and a.priors == ["dse", "area"] and callable(a.func)
    f = parser.parse_args(["fid-sample", "--per-class", "3", "--out", "s.npz", "--shard-dir", "d", "--num-classes", "2", "--ssg-beta", "0.5"])
    assert f.per_class == 3 and f.shard_dir == "d" and f.num_classes == 2 and f.ssg_beta == 0.5 and callable(f.func)


# ----------------------------------------------------------------------------- shipped model


@pytest.fixture(scope="module")
def shipped_models():
    from ssg_engine.pretrained import load_pretrained

    return load_pretrained()


def test_shipped_model_samples_are_recognised_by_the_classifier(shipped_models):
    from ssg_engine.eval.ablation import Arm, sample_arm
    from ssg_engine.eval.classifier import class_accuracy, load_classifier

    vae, var = shipped_models
    images, labels = sample_arm(var, vae, Arm(1.0), 20, seed=0, batch_size=20, cfg=2.0, top_k=128, top_p=0.95)
    assert images.shape[-1] == 32
    model, _ = load_classifier(train_if_missing=False)
    acc = class_accuracy(model, images, labels)
    assert acc > 0.4, f"classifier accuracy on class-conditional samples of the shipped model: {acc:.3f}"


def test_fid_sample_defaults_to_shipped_model(shipped_models, tmp_path):
    out = tmp_path / "s.npz"
    _run_in_process(["--device", "cpu", "--per-class", "2", "--num-classes", "2", "--batch-size", "2", "--out", str(out)])
    arr, labels = _load(out)
    assert arr.shape == (4, 32, 32, 3) and labels.tolist() == [0, 0, 1, 1]
