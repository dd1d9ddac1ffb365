"""Nothing lost, nothing silently corrupted: ``train`` interrupted or refused, ``eval --resume`` keeping finished
arms, ``fid-sample`` verifying its shards, atomic writes that leave no temporary file, no absolute paths in results."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import pytest

from ssg_engine.cli import main
from ssg_engine.files import atomic_write, portable_path

REPO = Path(__file__).resolve().parents[1]


def _temp_files(folder: Path) -> List[Path]:
    """Temporary files of the atomic writers (``.<name>.tmp<pid>``) anywhere under ``folder``."""
    return [p for p in folder.rglob(".*.tmp*")]


def _strings(obj: object) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _assert_no_absolute_paths(obj: object) -> None:
    absolute = [s for s in _strings(obj) if s.startswith("/") or "/tmp/" in s or "/root/" in s or "/work/" in s]
    assert not absolute, absolute


# ----------------------------------------------------------------------------- atomic writes, paths


def test_atomic_write_leaves_no_temp_file_on_error(tmp_path):
    target = tmp_path / "a.npz"
    target.write_bytes(b"old")

    def fail(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and _temp_files(tmp_path) == []
    atomic_write(target, lambda fh: fh.write(b"new"))
    assert target.read_bytes() == b"new" and _temp_files(tmp_path) == []


def test_portable_path():
    assert portable_path(REPO / "ssg_engine" / "eval" / "assets" / "x.safetensors") == "ssg_engine/eval/assets/x.safetensors"
    assert portable_path("rel/model.pth") == "rel/model.pth"
    assert portable_path(Path.home() / "m" / "var.pth") == "~/m/var.pth"
    assert portable_path("/opt/somewhere/var.pth") == "var.pth"


def test_committed_results_hold_no_absolute_paths():
    for f in sorted((REPO / "bench" / "results").rglob("*.json")):
        _assert_no_absolute_paths(json.loads(f.read_text()))


# ----------------------------------------------------------------------------- train

TINY_TRAIN = ["--vae-steps", "1", "--var-steps", "1", "--batch-size", "2", "--var-batch-size", "2", "--var-train-images", "2",
              "--train-images", "8", "--eval-images", "4"]
# Runs `ssg-engine train` with VAR training replaced by a stall: the VQ-VAE is already written (into the partial folder).
STALLING_TRAIN = """
import signal, sys, time
import ssg_engine.training as training

signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal, even when started in the background

def stall(*args, **kwargs):
    print("stalling before VAR training", flush=True)
    time.sleep(600)

training.train_var = stall
from ssg_engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("flag", ["--vae-steps", "--var-steps", "--batch-size", "--var-batch-size", "--train-images"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_train_refuses_bad_sizes(tmp_path, capsys, flag, value):
    assert main(["train", "--out", str(tmp_path / "m"), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and flag in err
    assert list(tmp_path.iterdir()) == []


def test_train_api_refuses_bad_sizes_before_loading_data(tmp_path, monkeypatch):
    import ssg_engine.data
    from ssg_engine.training import train_fashion_mnist

    monkeypatch.setattr(ssg_engine.data, "load_fashion_mnist", lambda *a, **k: pytest.fail("data loaded"))
    for kwargs, flag in ((dict(vae_steps=0), "--vae-steps"), (dict(var_batch_size=-1), "--var-batch-size"),
                         (dict(eval_limit=0), "--eval-images")):
        with pytest.raises(ValueError, match=flag):
            train_fashion_mnist(tmp_path / "m", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_staged_output_dir(tmp_path):
    from ssg_engine.training import staged_output_dir

    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):  # an interrupted run leaves nothing
        with staged_output_dir(out) as folder:
            assert folder.name == f".m.partial-{os.getpid()}"
            (folder / "vae.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with staged_output_dir(out) as folder:
        (folder / "a").write_text("1")
        assert not out.exists()  # appears only when complete
    assert (out / "a").read_text() == "1"
    with pytest.raises(FileExistsError, match="--force"):
        with staged_output_dir(out):
            pytest.fail("a non-empty --out must be refused before anything runs")
    with staged_output_dir(out, force=True) as folder:
        (folder / "b").write_text("2")
        assert (out / "a").is_file()  # the old folder stays until the new one is complete
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    # partial folders of killed runs are removed by the next run; those of live runs are kept
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / f".m.partial-{dead}").mkdir()
    (tmp_path / f".m.partial-{os.getppid()}").mkdir()
    with staged_output_dir(out, force=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".m.partial-{os.getppid()}", "m"]


def _start_stalling_train(out: Path, log: Path) -> subprocess.Popen:
    """A train run stopped (sleeping) after its VQ-VAE stage; returns once it says so."""
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-c", STALLING_TRAIN, "train", "--out", str(out), *TINY_TRAIN],
                             stdout=subprocess.PIPE, stderr=err, text=True, cwd=out.parent)
    watchdog = threading.Timer(300, p.kill)
    watchdog.start()
    try:
        for line in p.stdout:
            if "stalling" in line:
                return p
    finally:
        watchdog.cancel()
    p.kill()
    pytest.fail(f"train did not reach its VAR stage: {log.read_text()[-2000:]}")


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssg_engine.cli", "train", "--out", str(out), *TINY_TRAIN, *extra],
                          capture_output=True, text=True, timeout=600, cwd=out.parent)


@pytest.mark.slow
def test_train_interrupted_leaves_no_output_then_completes(tmp_path):
    out = tmp_path / "m"
    # SIGKILL mid-run: no --out, only a clearly named partial folder
    p = _start_stalling_train(out, tmp_path / "log1")
    partial = tmp_path / f".m.partial-{p.pid}"
    assert (partial / "vae.safetensors").is_file() and not out.exists()
    p.kill()
    p.wait(timeout=30)
    p.stdout.close()
    assert not out.exists() and partial.is_dir()
    # Ctrl-C mid-run: status 130, no --out, and its partial folder is removed
    p = _start_stalling_train(out, tmp_path / "log2")
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=60) == 130
    p.stdout.close()
    assert "interrupted" in (tmp_path / "log2").read_text()
    assert not out.exists() and not (tmp_path / f".m.partial-{p.pid}").exists()
    # a complete run produces --out and removes the killed run's partial folder
    r = _train(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "metrics.json", "vae.safetensors", "var.safetensors"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["log1", "log2", "m"]
    # a second run is refused without --force (before loading data), and replaces --out with it
    first = (out / "metrics.json").read_text()
    r = _train(out)
    assert r.returncode == 2 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (out / "metrics.json").read_text() == first
    r = _train(out, "--force", "--seed", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["seed"] == 1
    assert sorted(f.name for f in tmp_path.iterdir()) == ["log1", "log2", "m"]


# ----------------------------------------------------------------------------- eval --resume


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval_cache")


def _eval(out_dir: Path, cache: Path, *extra: str) -> List[str]:
    return ["eval", "--device", "cpu", "--samples", "4", "--batch-size", "4", "--priors", "dse", "--fid-arms", "none",
            "--out-dir", str(out_dir), "--cache-dir", str(cache), *extra]


def _runs(out_dir: Path) -> Dict[str, tuple]:
    return {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in (out_dir / "runs").glob("*.json")}


@pytest.mark.slow
def test_eval_resume_keeps_finished_arms_and_adds_new_ones(tmp_path, eval_cache, capsys):
    out_dir = tmp_path / "abl"
    assert main(_eval(out_dir, eval_cache, "--seeds", "1", "--betas", "0.5")) == 0
    first = _runs(out_dir)
    assert len(first) == 2  # baseline and dse b=0.5, seed 0
    res1 = json.loads((out_dir / "ablation.json").read_text())
    _assert_no_absolute_paths(res1)
    assert res1["classifier"]["path"] == "ssg_engine/eval/assets/fmnist_classifier.safetensors"
    capsys.readouterr()
    # a larger grid with --resume: the finished arms are reused as they are (files untouched), the new one is added
    assert main(_eval(out_dir, eval_cache, "--seeds", "1", "--betas", "0.5", "1.0", "--resume")) == 0
    assert capsys.readouterr().out.count("1 of 1 seed(s) reused") == 2
    second = _runs(out_dir)
    assert {k: second[k] for k in first} == first and len(second) == 3
    res2 = json.loads((out_dir / "ablation.json").read_text())
    assert [a["name"] for a in res2["arms"]] == ["baseline T=1", "dse b=0.5 T=1", "dse b=1 T=1"]
    assert res2["arms"][:2] == res1["arms"]
    # a smaller grid never discards stored results
    assert main(_eval(out_dir, eval_cache, "--seeds", "1", "--betas", "1.0", "--resume")) == 0
    assert _runs(out_dir) == second
    # a damaged result is named, with what to do
    damaged = out_dir / "runs" / sorted(first)[0]
    damaged.write_text('{"key": ')
    capsys.readouterr()
    assert main(_eval(out_dir, eval_cache, "--seeds", "1", "--betas", "0.5", "--resume")) == 2
    err = capsys.readouterr().err
    assert f"{damaged} is damaged" in err and "delete it to recompute that arm" in err
    assert _temp_files(out_dir) == []


def test_eval_missing_classifier_is_an_error(tmp_path, eval_cache, capsys):
    missing = tmp_path / "nope.safetensors"
    assert main(_eval(tmp_path / "abl", eval_cache, "--seeds", "1", "--betas", "0.5", "--classifier", str(missing))) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "not found" in err
    assert not missing.exists() and not (tmp_path / "abl" / "runs").exists()


def test_eval_resume_does_not_overwrite_results_it_cannot_reuse(tmp_path, eval_cache, capsys):
    out_dir = tmp_path / "abl"
    out_dir.mkdir()
    (out_dir / "ablation.json").write_text('{"settings": {}, "arms": []}')  # written before results were stored per arm
    assert main(_eval(out_dir, eval_cache, "--seeds", "1", "--betas", "0.5", "--resume")) == 2
    assert "move it away" in capsys.readouterr().err
    assert (out_dir / "ablation.json").read_text() == '{"settings": {}, "arms": []}'


# ----------------------------------------------------------------------------- fid-sample


def _fid(out: Path, *extra: str) -> List[str]:
    return ["fid-sample", "--device", "cpu", "--per-class", "2", "--num-classes", "2", "--batch-size", "2", "--out", str(out), *extra]


def _arrays(path: Path):
    with np.load(path) as z:
        return z["arr_0"].copy(), z["arr_1"].copy()


def test_fid_sample_remakes_a_corrupted_shard(tmp_path, capsys):
    out = tmp_path / "s.npz"
    shards = tmp_path / "s.npz.shards"
    assert main(_fid(out)) == 0
    clean = _arrays(out)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["c00000_i0000000.npy", "c00001_i0000000.npy"]
    _assert_no_absolute_paths(manifest)
    bad = shards / "c00001_i0000000.npy"
    data = bytearray(bad.read_bytes())
    data[-10:] = bytes(255 - b for b in data[-10:])  # pixels changed, the header still valid
    bad.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(_fid(out)) == 0
    err = capsys.readouterr().err
    assert f"{bad} does not match its sha256" in err and "1 already done, 1 to make" in err
    remade = _arrays(out)
    assert np.array_equal(remade[0], clean[0]) and np.array_equal(remade[1], clean[1])
    assert _temp_files(tmp_path) == []


def test_fid_sample_refuses_shards_without_manifest(tmp_path, capsys):
    out = tmp_path / "s.npz"
    shards = tmp_path / "s.npz.shards"
    assert main(_fid(out)) == 0
    (shards / "manifest.json").unlink()
    before = {f.name: f.read_bytes() for f in shards.iterdir()}
    capsys.readouterr()
    assert main(_fid(out, "--cfg", "3.0")) == 2
    err = capsys.readouterr().err
    assert "no manifest.json" in err and f"delete {shards}" in err
    assert {f.name: f.read_bytes() for f in shards.iterdir()} == before


def test_fid_sample_bad_arguments_leave_nothing_behind(tmp_path, capsys):
    out = tmp_path / "s.npz"
    shards = tmp_path / "s.npz.shards"
    # a typo found only once the model is loaded: no manifest is left to block the corrected run
    assert main(_fid(out)[:-2] + ["--num-classes", "11", "--out", str(out)]) == 2
    assert "--num-classes" in capsys.readouterr().err
    assert not (shards / "manifest.json").exists() and not out.exists()
    # --out that is a folder is refused before sampling
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    assert main(_fid(folder)) == 2
    assert "--out" in capsys.readouterr().err
    assert list(folder.iterdir()) == [] and not (tmp_path / "folder.npz.shards").exists()
    # the corrected run works
    assert main(_fid(out)) == 0
    assert _arrays(out)[0].shape == (4, 32, 32, 3)
    assert _temp_files(tmp_path) == []


# ----------------------------------------------------------------------------- lost work, unbounded runs, full disk


def _one_error_line(rc: int, err: str, after_progress: bool = False) -> str:
    """The one ``error: ...`` line of a failed command (status 2, no traceback); ``after_progress``: progress bars
    of the work done before the error may come first."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not (after_progress and "%|" in line)]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_train_out_is_locked_while_another_run_writes_it(tmp_path, capsys, monkeypatch):
    """Two runs on one --out: the second is refused at once (one line), so it can never replace the first's model."""
    import ssg_engine.data
    from ssg_engine.training import staged_output_dir

    monkeypatch.setattr(ssg_engine.data, "load_fashion_mnist", lambda *a, **k: pytest.fail("the second run started training"))
    out = tmp_path / "m"
    with staged_output_dir(out) as folder:  # the first run, still training
        (folder / "vae.safetensors").write_bytes(b"first")
        line = _one_error_line(main(["train", "--out", str(out), *TINY_TRAIN]), capsys.readouterr().err)
        assert "--out" in line and str(out) in line and "another run" in line
        assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", f".m.partial-{os.getpid()}"]
    assert (out / "vae.safetensors").read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


BIG = str(10**12)
UNBOUNDED = [  # (argv, the flag the one line names, what must not run)
    (["sample", "--per-class", BIG], "--per-class", "ssg_engine.api.generate"),
    (["sample", "--family", "infinity", "--per-prompt", BIG], "--per-prompt", "ssg_engine.api.generate"),
    (["sample", "--family", "infinity", "--per-prompt", BIG, "--prompt", "a bag", "--compare"], "--per-prompt", "ssg_engine.api.generate"),
    (["spectrum", "--per-class", BIG], "--per-class", "ssg_engine.analysis.spectra_for"),
    (["fid-sample", "--device", "cpu", "--per-class", BIG, "--out", "{tmp}/s.npz"], "--per-class", "ssg_engine.eval.fid_sample.sample_shard"),
    (["eval", "--device", "cpu", "--samples", BIG, "--out-dir", "{tmp}/e"], "--samples", "ssg_engine.eval.ablation.run_ablation"),
    (["plan", "--batch-size", str(10**15), "--gpu", "h100"], "--batch-size", "ssg_engine.costs.stage_costs"),
    (["train", "--out", "{tmp}/m", "--train-images", "60001"], "--train-images", "ssg_engine.data.load_fashion_mnist"),
    (["train", "--out", "{tmp}/m", "--eval-images", "10001"], "--eval-images", "ssg_engine.data.load_fashion_mnist"),
    (["eval", "--device", "cpu", "--inception-ref-n", "10001", "--out-dir", "{tmp}/e"], "--inception-ref-n", "ssg_engine.eval.ablation.run_ablation"),
]


@pytest.mark.parametrize("argv, flag, compute", UNBOUNDED, ids=[f"{c[0][0]}{c[1]}" + ("-compare" if "--compare" in c[0] else "") for c in UNBOUNDED])
def test_counts_are_bounded_before_compute(argv, flag, compute, tmp_path, capsys, monkeypatch):
    """Every count is bounded by what can be produced (memory, the dataset's split): one line naming the flag before
    any compute, nothing printed or written."""
    monkeypatch.setattr(compute, lambda *a, **k: pytest.fail(f"{compute} ran"))
    rc = main([a.format(tmp=tmp_path) for a in argv])
    captured = capsys.readouterr()
    assert flag in _one_error_line(rc, captured.err) and captured.out == ""
    assert list(tmp_path.iterdir()) == []


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_sample_is_one_line_naming_file_and_flag_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from PIL import Image

    real_save, saved = Image.Image.save, []

    def save_then_fill(self, fp, *args, **kwargs):  # the disk fills up at the third PNG
        if len(saved) == 2:
            _disk_full()
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_fill)
    out_dir, grid = tmp_path / "pngs", tmp_path / "grid.png"
    rc = main(["sample", "--classes", "0", "1", "2", "--out", str(grid), "--out-dir", str(out_dir), "--seed", "1"])
    line = _one_error_line(rc, capsys.readouterr().err, after_progress=True)
    assert line.startswith("error: --out-dir: cannot write ") and str(out_dir / "00002.png") in line and "disk is full" in line
    assert len(saved) == 2 and not grid.exists() and list(out_dir.iterdir()) == [] and _temp_files(tmp_path) == []


@pytest.mark.slow
def test_full_disk_train_after_a_whole_run_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):  # the last file of the run: metrics.json
        if self.name == "metrics.json":
            _disk_full()
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "m"
    line = _one_error_line(main(["train", "--out", str(out), *TINY_TRAIN]), capsys.readouterr().err, after_progress=True)
    assert line.startswith(f"error: --out: cannot write {out}: the disk is full")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_eval_is_one_line_naming_file_and_flag(tmp_path, eval_cache, capsys, monkeypatch):
    import ssg_engine.files

    out_dir = tmp_path / "abl"
    real_replace = os.replace

    def replace(src, dst):  # the disk is full for the results (not for the cache of reference statistics)
        if out_dir in Path(dst).parents:
            _disk_full()
        return real_replace(src, dst)

    monkeypatch.setattr(ssg_engine.files.os, "replace", replace)
    rc = main(_eval(out_dir, eval_cache, "--seeds", "1", "--betas", "0.5"))
    line = _one_error_line(rc, capsys.readouterr().err, after_progress=True)
    assert line.startswith(f"error: --out-dir: cannot write {out_dir / 'runs'}") and "disk is full" in line
    assert _temp_files(tmp_path) == [] and not list((out_dir / "runs").glob("*.json"))


# ----------------------------------------------------------------------------- Ctrl-C while starting


@pytest.mark.parametrize("delay", [0.3, 1.0])
def test_ctrl_c_while_torch_imports_is_one_line(tmp_path, delay):
    """SIGINT in the first second of ``ssg-engine`` (torch still importing): ``interrupted``, status 130, no traceback.
    The child starts with SIGINT at its default (a background shell would hand it down ignored)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-m", "ssg_engine.cli", "plan"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=tmp_path, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip(f"plan finished within {delay}s, before the signal: nothing to test on this machine")
    assert p.returncode == 130 and err.strip() == "interrupted", err[-2000:]
