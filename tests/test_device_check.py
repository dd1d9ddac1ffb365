"""``bench/device_check.sh``: its step budget, its dry run (every step's plumbing on the CPU: Triton interpreter,
tiny shapes), and the pieces the dry run cannot reach (the summary of a GPU run, a partial run, a negative
transformer-only time)."""
from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "device_check.sh"
STEPS = ["setup", "smoke", "e2e_d16", "gpu_tests", "kernels", "e2e_d30", "profile", "aot_vs_jit", "summary"]  # by information per second
OUT_FILES = {"steps.tsv", "summary.md", "logs.tar.gz", "smoke.jsonl", "e2e.jsonl", "kernels.jsonl", "aot.jsonl", "trace.json.gz"}
BUDGET_S = 480  # one run, its setup included, fits in 9 minutes of a device command's 10 with no rerun assumed

sys.path.insert(0, str(REPO / "bench"))
from rows import RowWriter, read_rows  # noqa: E402


def script_timeouts() -> dict:
    return {name: int(s) for name, s in re.findall(r"^TIMEOUT_(\w+)=(\d+)", SCRIPT.read_text(), flags=re.M)}


def test_every_step_has_a_time_limit_and_they_fit_the_budget():
    timeouts = script_timeouts()
    called = re.findall(r"^\s*(?:\w+=\S+ )?(?:killed_)?step (\w+) ", SCRIPT.read_text(), flags=re.M)  # the step calls
    assert sorted(set(called)) == sorted(STEPS) == sorted(timeouts), (called, timeouts)
    assert list(timeouts) == STEPS  # declared in the order they run
    assert sum(timeouts.values()) <= BUDGET_S, timeouts


def run_script(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_usage_errors_exit_2(tmp_path):
    proc = run_script()
    assert proc.returncode == 2 and "usage: bash bench/device_check.sh [--dry-run] [--budget SECONDS] OUT" in proc.stderr
    for bad in ("10", "soon"):
        proc = run_script("--budget", bad, str(tmp_path / "out"))
        assert proc.returncode == 2 and proc.stderr.strip() == "error: --budget takes whole seconds >= 60, e.g. --budget 480"
    if not torch.cuda.is_available():
        proc = run_script(str(tmp_path / "out"))
        assert proc.returncode == 2 and "run with --dry-run" in proc.stderr, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script would run")
def test_budget_scales_every_limit(tmp_path):
    """``--budget`` scales each step's limit by SECONDS / 480 (the limits are printed before the GPU check fails)."""
    limits = {}
    for budget in ("480", "240"):
        proc = run_script("--budget", budget, str(tmp_path / "out"))
        line = next(line for line in proc.stdout.splitlines() if line.startswith("limits (s): "))
        limits[budget] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
    assert {k: v for k, v in limits["480"].items() if k != "build"} == script_timeouts()
    assert all(limits["240"][k] == max(5, v // 2) for k, v in limits["480"].items())
    assert sum(v for k, v in limits["240"].items() if k != "build") <= 240


def test_rows_survive_a_kill(tmp_path):
    """A process killed mid-line leaves every complete row readable (the cut line is skipped)."""
    path = tmp_path / "rows.jsonl"
    code = (f"import os, sys; sys.path.insert(0, {str(REPO / 'bench')!r}); from rows import RowWriter; "
            f"w = RowWriter({str(path)!r}); w.write('run', n=2); w.write('row', i=0, x=float('nan')); "
            f"open({str(path)!r}, 'a').write('{{\"kind\": \"row\", \"i\"'); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -9
    assert read_rows(path) == [{"kind": "run", "n": 2}, {"kind": "row", "i": 0, "x": None}]
    assert read_rows(path, "row") == [{"kind": "row", "i": 0, "x": None}]
    assert read_rows(tmp_path / "missing.jsonl") == []


@pytest.mark.slow
def test_dry_run_runs_every_step_in_order_and_returns_at_most_8_files(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("SSG_ENGINE_BACKEND", "PYTEST_ADDOPTS")}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, env=env, timeout=600)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    lines = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    steps = [s for s in lines if s[4] != "background"]
    assert [s[0] for s in steps] == STEPS, log
    assert {s[0]: s[1] for s in steps if s[0] != "e2e_d30"} == {name: "ok" for name in STEPS if name != "e2e_d30"}, (steps, log)
    assert dict((s[0], s[1]) for s in steps)["e2e_d30"] == "killed after its first row (dry run)"
    assert sorted((s[0], s[1]) for s in lines if s[4] == "background") == [("build", "ok"), ("precompile", "ok"), ("warm_compile", "ok")], lines
    assert [int(s[3]) for s in steps] == [script_timeouts()[name] for name in STEPS]
    assert proc.returncode == 0, log
    assert "the killed step kept its" in proc.stdout, log
    assert {p.name for p in out.iterdir()} == OUT_FILES  # what a device command returns: 8 files, none in a folder

    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    assert {f"{name}.log" for name in STEPS + ["build", "precompile", "warm_compile"]} <= set(logs), sorted(logs)
    assert re.search(r"\d+ skipped", logs["gpu_tests.log"]) and "needs a CUDA GPU" in logs["gpu_tests.log"]

    summary = (out / "summary.md").read_text()
    for heading in ("# Device check: dry run", "## Steps", "## Build", "## Smoke", "## GPU tests", "## Kernels",
                    "## End to end", "### Speedup over upstream", "### SSG overhead", "## AOT vs JIT", "## Profiler trace"):
        assert heading in summary, heading
    assert "C++ extension: available" in summary or "C++ extension: NOT available" in summary
    assert "**Partial**: a run (tiny) stopped before its end" in summary  # the killed e2e_d30

    smoke = read_rows(out / "smoke.jsonl")
    assert [r.get("check") for r in smoke if r["kind"] == "row"] == ["engine_eager", "graphs_vs_eager", "engine_vs_reference"]
    assert smoke[-1] == {"kind": "done", "ok": True, "failed": []}
    aot = read_rows(out / "aot.jsonl")
    done = aot[-1]
    compared = [r for r in aot if r["kind"] == "row"]  # one per kernel (bench/aot_compile.py --quick)
    assert done["kind"] == "done" and done["mode"] == "dry-run" and not done["errors"]
    assert len(compared) >= 3 and done["matched"] == len(compared) and done["mismatched"] == 0
    assert all(r["jit"]["registers"] == r["aot"]["registers"] > 0 for r in aot if r["kind"] == "row")
    kernels = read_rows(out / "kernels.jsonl")
    assert kernels[0]["smoke"] and kernels[0]["env"]["interpreter"] and kernels[-1]["kind"] == "done"
    e2e = read_rows(out / "e2e.jsonl")
    runs = [i for i, r in enumerate(e2e) if r["kind"] == "run"]
    assert len(runs) == 2  # e2e_d16, then the killed e2e_d30
    first, killed = e2e[runs[0] + 1:runs[1]], e2e[runs[1] + 1:]
    assert first[-1]["kind"] == "done" and "done" not in {r["kind"] for r in killed} and killed
    rows = [r for r in first if r["kind"] == "row"]
    assert {r["method"] for r in rows} == {"upstream_shaped", "reference_eager", "engine_eager"}
    assert {(r["B"], r["ssg"]) for r in rows} == {(2, "off"), (2, "on")}
    for r in rows:
        assert r["decode_seconds"] > 0 and r["decode_dtype"] == "float32" and r["floor_images_per_s"] > 0
        assert (r["transformer_only_images_per_s"] is None) == ("note" in r)
    with gzip.open(out / "trace.json.gz", "rt") as f:
        assert json.load(f)["traceEvents"]


def gpu_row(B, ssg, method, seconds, decode, floor):
    from bench_e2e import measured_row

    return measured_row("d16", B, ssg, method, seconds, decode, "bfloat16",
                        {"images_per_s": floor, "images_per_s_with_decode": floor / 2})


def test_transformer_only_time_is_null_with_a_note_when_decode_is_not_shorter():
    row = gpu_row(16, "off", "engine_graphs", 0.010, 0.012, 5000.0)
    assert row["transformer_only_images_per_s"] is None and row["transformer_only_seconds"] is None
    assert row["fraction_of_floor"] is None and "timing noise" in row["note"]
    assert row["images_per_s"] == pytest.approx(1600) and row["fraction_of_floor_with_decode"] == pytest.approx(1600 / 2500)
    row = gpu_row(16, "off", "engine_graphs", 0.010, 0.002, 5000.0)
    assert row["transformer_only_images_per_s"] == pytest.approx(2000) and "note" not in row
    assert row["fraction_of_floor"] == pytest.approx(0.4)


def test_summary_of_a_partial_gpu_run(tmp_path, monkeypatch):
    """What the dry run cannot produce: rates, CUDA-graph rows, a failed graphs check, an OOM row, timed kernels, a
    mismatch, a timed-out step whose run has no done line."""
    from device_summary import summary

    e2e = RowWriter(tmp_path / "e2e.jsonl")
    e2e.write("run", smoke=False, environment={"gpu": "NVIDIA H200"}, rates={"bf16_matmul_tflops": 780.0, "copy_gbytes_per_s": 4300.0},
              floor_gpu={"name": "measured", "bf16_tflops": 780.0, "gbytes_per_s": 4300.0})
    for ssg, m, s in (("off", "upstream_shaped", 0.200), ("off", "reference_eager", 0.160), ("off", "engine_eager", 0.100),
                      ("off", "engine_graphs", 0.040), ("on", "upstream_shaped", 0.210), ("on", "reference_eager", 0.170),
                      ("on", "engine_eager", 0.104), ("on", "engine_graphs", 0.041)):
        e2e.write(**gpu_row(1, ssg, m, s, 0.001, 400.0))
    e2e.write("skipped", model="d16", B=64, note="out of device memory at B=64; larger batches not tried")
    smoke = RowWriter(tmp_path / "smoke.jsonl")
    smoke.write("run", model="d16", B=16, dtype="bfloat16", device="cuda")
    smoke.write("row", check="graphs_vs_eager", ok=False, token_agreement=[1.0, 0.5], seconds=0.0123456)
    smoke.write("done", ok=False, failed=["graphs_vs_eager"])
    kernels = RowWriter(tmp_path / "kernels.jsonl")
    kernels.write("run", smoke=False, copy_bandwidth_GBps=4300.0)
    kernels.write("row", op="guidance", speedup=3.0, fused_pct_copy=80.0)
    kernels.write("row", op="sampler", speedup=5.0, fused_pct_copy=60.0)
    kernels.write("done")
    aot = RowWriter(tmp_path / "aot.jsonl")
    aot.write("run", mode="device", arch=90)
    aot.write("row", kernel="sample_kernel", example="d16", match=True, problems=[])
    aot.write("row", kernel="ssg_guidance_kernel", example="d30", match=False, problems=["registers AOT 80 vs JIT 96"])
    aot.write("done", mode="device", arch=90, matched=1, mismatched=1, errors=[])
    (tmp_path / "steps.tsv").write_text("setup\tok\t8\t30\tpytorch\nbuild\tok\t95\t240\tbackground\ne2e_d16\ttimeout\t90\t90\tpytorch\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "gpu_tests.log").write_text("....\n16 passed in 31.20s\n")
    (logs / "build.log").write_text("C++ extension: available (built with ninja)\n")
    monkeypatch.delenv("DEVICE_CHECK_BUDGET_S", raising=False)
    text = summary(tmp_path, logs=logs)
    assert "**Partial**: a run (d16) stopped before its end" in text
    assert "| e2e_d16 | timeout | 90 | 90 | pytorch |" in text and "| build | ok | 95 | 240 | background |" in text
    assert "Sum of the step limits: 120 s" in text  # the foreground steps' (30 + 90)
    assert "16 passed in 31.20s" in text and "C++ extension: available (built with ninja)" in text
    assert "**FAILED**: graphs_vs_eager" in text and "token_agreement [1, 0.5], seconds 0.0123" in text
    assert "d16 B=64: out of device memory at B=64" in text
    assert "1/2 configurations match on sm_90." in text and "registers AOT 80 vs JIT 96" in text
    assert "| guidance | 1 | 3.00x (3.00x - 3.00x) | 80.0% (80.0%) |" in text
    # reference 1.25x and graphs 5.00x the upstream-shaped arm end to end; floor / upstream = 400 / (1 / 0.199) = 79.6x
    assert re.search(r"\| d16 \| 1 \| off \| 1\.25x \| 2\.00x \| 5\.00x \| 5\.10x \| 79\.60x \| >= 5x \(graphs\) \|", text), text
    assert re.search(r"\| d16 \| 1 \| engine_graphs \| \+2\.5% \| \+2\.6% \| \+0\.0% \| <= 3% \|", text), text
    assert "(no readable trace.json.gz)" in text
