"""Bad command lines: every user error is one ``error: ...`` line on stderr with exit status 2, found before any
model loads or sampling starts; Ctrl-C is one ``interrupted`` line with status 130 and leaves no output file."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

from ssg_engine.cli import build_parser, main
from ssg_engine.cli.common import resolve_ssg_args
from ssg_engine.cli.info import VAE_FIELDS, VAR_FIELDS

NO_GPU = not torch.cuda.is_available()
# A command line's {tmp} is a fresh folder, {file} a file in it, {tiny} the golden tiny model's folder.
TINY = ["--var", "{tiny}/var.pth", "--vae", "{tiny}/vae.pth", "--config", "{tiny}/config.json"]
ERROR_CASES: List[Tuple[str, List[str], List[str]]] = [
    # devices and threads
    *[(f"{cmd}-device-banana", [cmd, *extra, "--device", "banana"], ["--device", "'banana' is not a device", "use cpu"])
      for cmd, extra in (("sample", []), ("spectrum", []), ("bench", []), ("eval", ["--out-dir", "{tmp}/e"]), ("fid-sample", []))],
    *[(f"{cmd}-device-cuda", [cmd, *extra, "--device", "cuda"], ["--device", "needs a CUDA GPU", "use --device cpu"])
      for cmd, extra in (("sample", []), ("spectrum", []), ("bench", []), ("eval", ["--out-dir", "{tmp}/e"]), ("fid-sample", []))
      if NO_GPU],
    ("fid-sample-threads-0", ["fid-sample", "--threads", "0"], ["--threads", "0 is out of range"]),
    # numbers
    *[(f"{cmd}-seed-int64", [cmd, *extra, "--seed", str(2**63)], ["--seed", "out of range", "2**63 - 1"])
      for cmd, extra in (("sample", []), ("spectrum", []), ("bench", []), ("fid-sample", []), ("train", ["--out", "{tmp}/t"]))],
    ("seed-negative", ["sample", "--seed", "-1"], ["--seed", "-1 is out of range"]),
    ("cfg-1e300", ["sample", "--cfg", "1e300"], ["--cfg", "out of range", "[-1000, 1000]"]),
    ("cfg-nan", ["sample", "--cfg", "nan"], ["--cfg", "out of range"]),
    ("ssg-beta-1e38", ["sample", "--ssg-beta", "1e38"], ["--ssg-beta", "out of range"]),
    ("temperature-1e-45", ["sample", "--temperature", "1e-45"], ["--temperature", "out of range", "[0.0001, 10000]"]),
    ("temperature-text", ["spectrum", "--temperature", "warm"], ["--temperature", "'warm' is not a number"]),
    ("batch-size-0", ["sample", "--batch-size", "0"], ["--batch-size", "0 is out of range"]),
    ("per-class-0", ["sample", "--per-class", "0"], ["--per-class", "0 is out of range"]),
    ("fid-per-class-0", ["fid-sample", "--per-class", "0"], ["--per-class", "0 is out of range"]),
    ("top-k-negative", ["sample", "--top-k", "-5"], ["--top-k", "-5 is out of range"]),
    ("top-p-1.5", ["sample", "--top-p", "1.5"], ["--top-p", "1.5 is out of range", "[0, 1]"]),
    ("upscale-0", ["sample", "--upscale", "0"], ["--upscale", "out of range", "[1, 64]"]),
    ("upscale-negative", ["sample", "--upscale", "-2"], ["--upscale", "out of range"]),
    ("upscale-huge", ["sample", "--upscale", "100000"], ["--upscale", "out of range"]),
    ("bench-repeats-0", ["bench", "--repeats", "0"], ["--repeats", "0 is out of range"]),
    ("eval-betas", ["eval", "--out-dir", "{tmp}/e", "--betas", "0.5,1e38"], ["--betas", "1e38 is out of range"]),
    ("eval-temperatures", ["eval", "--out-dir", "{tmp}/e", "--temperatures", "1", "0"], ["--temperatures", "0 is out of range"]),
    ("eval-samples", ["eval", "--out-dir", "{tmp}/e", "--samples", "3"], ["--samples", "3 is out of range"]),
    ("train-steps-0", ["train", "--out", "{tmp}/t", "--vae-steps", "0"], ["--vae-steps", "0 is out of range"]),
    ("patch-nums-bad", ["sample", *TINY[:4], "--patch-nums", "1,x"], ["--patch-nums", "not a list of scales"]),
    # output paths
    ("out-txt", ["sample", "--out", "{tmp}/x.txt"], ["--out", "unknown extension", ".png"]),
    ("spectrum-out-txt", ["spectrum", "--out", "{tmp}/x.jpg"], ["--out", "unknown extension", ".png"]),
    ("out-empty", ["sample", "--out", ""], ["--out is empty", ".png"]),
    ("out-proc", ["sample", "--out", "/proc/x.png"], ["--out", "cannot write in /proc"]),
    ("out-sys", ["sample", "--out", "/sys/x.png"], ["--out", "cannot write in /sys"]),
    ("out-is-folder", ["sample", "--out", "{tmp}"], ["--out", "unknown extension"]),
    ("out-parent-is-file", ["sample", "--out", "{file}/x.png"], ["--out", "is a file, so the folder", "cannot be created"]),
    ("out-dir-is-file", ["sample", "--out", "{tmp}/g.png", "--out-dir", "{file}"], ["--out-dir", "is a file, not a folder"]),
    ("spectrum-json-proc", ["spectrum", "--json", "/proc/x/s.json"], ["--json", "cannot write in /proc"]),
    ("spectrum-json-txt", ["spectrum", "--json", "{tmp}/s.txt"], ["--json", "unknown extension", ".json"]),
    ("bench-trace-proc", ["bench", "--profile", "torch", "--trace", "/proc/t.json"], ["--trace", "cannot write in /proc"]),
    ("bench-trace-without-profile", ["bench", "--trace", "{tmp}/t.json"], ["--trace", "add --profile torch"]),
    ("fid-out-txt", ["fid-sample", "--out", "{tmp}/s.txt"], ["--out", "unknown extension", ".npz"]),
    ("fid-shard-dir-is-file", ["fid-sample", "--out", "{tmp}/s.npz", "--shard-dir", "{file}"], ["--shard-dir", "is a file"]),
    ("eval-out-dir-is-file", ["eval", "--out-dir", "{file}"], ["--out-dir", "is a file, not a folder"]),
    ("train-out-is-file", ["train", "--out", "{file}"], ["--out", "is a file, not a folder"]),
    ("train-out-proc", ["train", "--out", "/proc/t"], ["--out", "cannot write in /proc"]),
    # flag combinations
    ("bench-bf16-reference", ["bench", "--dtype", "bfloat16", "--sampler", "reference"], ["--dtype bfloat16", "float32 only"]),
    ("bench-no-graphs-reference", ["bench", "--sampler", "reference", "--no-graphs"], ["--no-graphs", "--sampler engine"]),
    ("bench-random-and-var", ["bench", "--random", "d16", *TINY[:4]], ["--random", "drop --var"]),
    *[(f"shipped-{flag}", ["sample", flag, value], [flag, "shipped model", f"drop {flag}"])
      for flag, value in (("--config", "{tiny}/config.json"), ("--preset", "d16"), ("--patch-nums", "1,2,3"))],
    ("var-without-vae", ["sample", "--var", "{tiny}/var.pth"], ["both --var and --vae"]),
    ("config-and-patch-nums", ["sample", *TINY, "--patch-nums", "1,2"], ["--patch-nums", "not allowed with", "--config"]),
    ("unknown-flag", ["sample", "--per-klass", "2"], ["unrecognized arguments", "--help"]),
    ("unknown-prior", ["sample", "--ssg-prior", "fft"], ["--ssg-prior", "invalid choice"]),
    # labels (these load the model: labels are checked against its classes; test_cli.py has unknown names)
    ("class-label-too-big", ["sample", "--classes", "10", "--out", "{tmp}/g.png"], ["--classes", "class index 10 out of range [0, 10)"]),
    ("tiny-class-out-of-range", ["sample", *TINY, "--classes", "3", "12", "--out", "{tmp}/g.png"], ["--classes", "class 12 is outside [0, 10)"]),
    ("tiny-class-name", ["sample", *TINY, "--classes", "bag", "--out", "{tmp}/g.png"], ["--classes", "'bag' is not an integer label"]),
    ("fid-num-classes", ["fid-sample", "--num-classes", "11", "--per-class", "1", "--out", "{tmp}/s.npz"], ["--num-classes 11", "[1, 10]"]),
    # info
    ("info-folder", ["info", "{tiny}"], ["is a directory", "pass the checkpoint file"]),
    ("info-missing", ["info", "{tmp}/nope.pth"], ["checkpoint not found"]),
    ("info-not-a-checkpoint", ["info", "{file}"], ["not a readable torch checkpoint"]),
    ("info-config-mismatch", ["info", "{tiny}/var.pth", "--config", "{shipped_config}"], ["--config", "does not describe", "missing key"]),
    ("info-config-and-patch-nums", ["info", "{tiny}/var.pth", "--config", "{tiny}/config.json", "--patch-nums", "1"], ["not allowed with"]),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _fill(argv: List[str], tmp: Path, tiny: Path) -> List[str]:
    from ssg_engine.pretrained import PRETRAINED_DIR

    (tmp / "a_file.txt").write_text("not a checkpoint\n")
    places = dict(tmp=tmp, file=tmp / "a_file.txt", tiny=tiny, shipped_config=PRETRAINED_DIR / "config.json")
    return [a.format(**places) for a in argv]


def assert_one_error_line(rc: int, stderr: str, words: List[str]) -> str:
    """Exit status 2 and exactly one non-empty stderr line, ``error: ...``, holding every word of ``words``."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("argv, words", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_user_error_is_one_line(argv, words, tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # defaults such as grid.png land here
    rc = main(_fill(argv, tmp_path, tiny_dir))
    assert_one_error_line(rc, capsys.readouterr().err, words)
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "e").exists() and not (tmp_path / "t").exists()


def test_read_only_folder(tmp_path):
    """An unwritable folder: read-only permissions for a normal user; root ignores those, so as root the folder is a
    read-only tmpfs in a private mount namespace."""
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    cmd = [sys.executable, "-m", "ssg_engine.cli", "sample", "--out", str(folder / "g.png")]
    if os.geteuid() == 0:
        cmd = ["unshare", "--mount", "sh", "-c", f'mount -t tmpfs -o ro none "{folder}" && exec "$@"', "sh", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert_one_error_line(out.returncode, out.stderr, ["--out", "cannot write in"])


def test_missing_folders_are_created(tmp_path, capsys):
    """Missing parent folders of --out, --out-dir and --json are created (and nothing else is left there)."""
    assert main(["sample", "--classes", "1", "--out", str(tmp_path / "a/b/g.png"), "--out-dir", str(tmp_path / "c/d")]) == 0
    assert main(["spectrum", "--classes", "1", "--out", str(tmp_path / "e/s.png"), "--json", str(tmp_path / "f/g/s.json")]) == 0
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "a/b/g.png", "c/d/00000.png", "e/s.png", "f/g/s.json"]
    assert json.loads((tmp_path / "f/g/s.json").read_text())["baseline"]
    capsys.readouterr()


def test_bench_trace_and_dtype(tmp_path, capsys, monkeypatch):
    """The trace lands where asked (folder created); the JSON records the dtype; a trace torch fails to write is an error."""
    argv = ["bench", "--device", "cpu", "--sampler", "reference", "--batch-size", "1", "--repeats", "1",
            "--profile", "torch", "--trace", str(tmp_path / "traces/t.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[-1])["dtype"] == "float32"
    assert (tmp_path / "traces/t.json").stat().st_size > 0

    from torch.profiler import profile

    monkeypatch.setattr(profile, "export_chrome_trace", lambda self, path: None)  # what torch does when it cannot write
    argv[-1] = str(tmp_path / "traces/u.json")
    assert_one_error_line(main(argv), capsys.readouterr().err, ["--trace", "wrote no trace"])
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["t.json"]


def test_info_prints_only_known_fields(tiny_dir, capsys):
    assert main(["info", str(tiny_dir / "vae.pth")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "VQ-VAE" and info["config_source"] == "checkpoint shapes"
    assert list(info["config"]) == list(VAE_FIELDS) and info["config"]["ch_mult"] == [1, 1, 2, 2, 4]
    config = str(tiny_dir / "config.json")
    assert main(["info", str(tiny_dir / "vae.pth"), "--config", config]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config_source"] == config and info["config"]["patch_nums"] == [1, 2, 3, 4, 5, 6, 8]
    assert main(["info", str(tiny_dir / "var.pth"), "--config", config]) == 0
    info = json.loads(capsys.readouterr().out)
    assert list(info["config"]) == list(VAR_FIELDS) and info["config"]["depth"] == 2


@pytest.mark.parametrize("given", [["--ssg-prior", "bilinear"], ["--ssg-interp", "bicubic"]])
def test_ssg_prior_without_beta_uses_default_beta(given, capsys):
    from ssg_engine.guidance import DEFAULT_BETA

    args = build_parser().parse_args(["sample", *given])
    resolve_ssg_args(args)
    assert args.ssg_beta == DEFAULT_BETA
    assert capsys.readouterr().err.strip() == f"note: {given[0]} without --ssg-beta: SSG on with the default beta {DEFAULT_BETA:g}"
    args = build_parser().parse_args(["sample"])
    resolve_ssg_args(args)
    assert (args.ssg_beta, args.ssg_prior, args.ssg_interp) == (None, "dse", "bilinear") and not capsys.readouterr().err


# ----------------------------------------------------------------------------- real processes: nothing reaches the terminal


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.mark.parametrize("argv, words", [
    (["sample", "--device", "banana"], ["--device", "not a device"]),
    (["fid-sample", "--threads", "0"], ["--threads", "out of range"]),
    (["eval", "--out-dir", "/proc/e"], ["--out-dir", "cannot write in /proc"]),
], ids=["sample", "fid-sample", "eval"])
def test_module_entry_point_prints_one_line(argv, words, tmp_path):
    """``python -m ssg_engine.cli`` (what ``torchrun -m ssg_engine.cli fid-sample`` runs) reports like ``ssg-engine``."""
    proc = subprocess.run([sys.executable, "-m", "ssg_engine.cli", *argv], capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
    assert_one_error_line(proc.returncode, proc.stderr, words)


def test_ctrl_c_is_one_line_and_leaves_no_file(tmp_path):
    out = tmp_path / "grid.png"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssg_engine.cli", "sample", "--device", "cpu", "--per-class", "50", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
        # Ctrl-C as in a terminal: a job started in the background inherits SIGINT ignored, and Python keeps it so
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen, deadline = b"", time.monotonic() + 120
    while b"sampling:" not in seen and time.monotonic() < deadline:  # tqdm's first bar: sampling has started
        if select.select([proc.stderr], [], [], 1.0)[0]:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    assert b"sampling:" in seen, seen.decode(errors="replace")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    stderr = (seen + rest).decode(errors="replace")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.rstrip().splitlines()[-1] == "interrupted"
    assert list(tmp_path.iterdir()) == []
