"""``bench/device_check.sh``: its step budget, its dry run (every step's plumbing on the CPU: Triton interpreter,
tiny shapes), and the pieces the dry run cannot reach (the summary of a GPU run, a partial run, a negative
transformer-only time)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "device_check.sh"
STEPS = ["build", "extension", "gpu_tests", "aot_vs_jit", "kernels", "e2e", "profile", "summary"]
BUDGET_S = 470  # the whole check and a rerun fit in a device session; one run fits a device command's 600 s

sys.path.insert(0, str(REPO / "bench"))


def script_timeouts() -> dict:
    return {name: int(s) for name, s in re.findall(r"^TIMEOUT_(\w+)=(\d+)", SCRIPT.read_text(), flags=re.M)}


def test_every_step_has_a_time_limit_and_they_fit_the_budget():
    timeouts = script_timeouts()
    called = re.findall(r"^\s*(?:\w+=\S+ )?step (\w+) ", SCRIPT.read_text(), flags=re.M)  # the step calls
    assert sorted(set(called)) == sorted(STEPS) == sorted(timeouts), (called, timeouts)
    assert sum(timeouts.values()) <= BUDGET_S, timeouts


def test_usage_errors_exit_2(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage: bash bench/device_check.sh [--dry-run] OUT" in proc.stderr
    if not torch.cuda.is_available():
        proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "run with --dry-run" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("SSG_ENGINE_BACKEND", "PYTEST_ADDOPTS")}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, env=env, timeout=400)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == STEPS, log
    assert all(s[1] == "ok" for s in steps), (steps, log)
    assert proc.returncode == 0, log
    assert [int(s[3]) for s in steps] == [script_timeouts()[name] for name in STEPS]

    summary = (out / "summary.md").read_text()
    for heading in ("# Device check: dry run", "## Steps", "## Build", "## GPU tests", "## AOT vs JIT", "## Kernels",
                    "## End to end", "### Speedup over upstream eager", "### SSG overhead", "## Profiler trace"):
        assert heading in summary, heading
    assert "C++ extension: available" in summary or "C++ extension: NOT available" in summary
    assert re.search(r"\d+ skipped", (out / "gpu_tests.log").read_text())  # collected, skipped with their reason
    assert "needs a CUDA GPU" in (out / "gpu_tests.log").read_text()

    aot = json.loads((out / "aot" / "aot_vs_jit.json").read_text())
    assert aot["mode"] == "dry-run" and aot["matched"] == len(aot["rows"]) == 2 and not aot["errors"]
    assert all(r["jit"]["registers"] == r["aot"]["registers"] > 0 for r in aot["rows"])
    kernels = json.loads((out / "kernels.json").read_text())
    assert kernels["smoke"] and kernels["env"]["interpreter"]
    e2e = json.loads((out / "e2e.json").read_text())
    assert e2e["complete"] and {r["method"] for r in e2e["rows"]} == {"upstream_eager", "engine_eager"}
    assert {(r["B"], r["ssg"]) for r in e2e["rows"]} == {(2, "off"), (2, "on")}
    for r in e2e["rows"]:
        assert r["decode_seconds"] > 0 and r["decode_dtype"] == "float32" and r["floor_images_per_s"] > 0
        assert (r["transformer_only_images_per_s"] is None) == ("note" in r)
    trace = json.loads((out / "trace.json").read_text())
    assert trace["traceEvents"]


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


def test_summary_of_a_partial_gpu_run(tmp_path):
    """What the dry run cannot produce: rates, CUDA-graph rows, timed kernels, a mismatch, a timed-out step."""
    from device_summary import summary

    rows = [gpu_row(1, ssg, m, s, 0.001, 400.0) for ssg, m, s in (
        ("off", "upstream_eager", 0.200), ("off", "engine_eager", 0.100), ("off", "engine_graphs", 0.040),
        ("on", "upstream_eager", 0.210), ("on", "engine_eager", 0.104), ("on", "engine_graphs", 0.041))]
    report = {"smoke": False, "complete": False, "environment": {"gpu": "NVIDIA H200"}, "rows": rows,
              "rates": {"bf16_matmul_tflops": 780.0, "copy_gbytes_per_s": 4300.0},
              "floor_gpu": {"name": "measured", "bf16_tflops": 780.0, "gbytes_per_s": 4300.0}}
    (tmp_path / "e2e.json").write_text(json.dumps(report))
    (tmp_path / "kernels.json").write_text(json.dumps({"smoke": False, "copy_bandwidth_GBps": 4300.0, "results": [
        {"op": "guidance", "speedup": 3.0, "fused_pct_copy": 80.0}, {"op": "sampler", "speedup": 5.0, "fused_pct_copy": 60.0}]}))
    (tmp_path / "aot").mkdir()
    (tmp_path / "aot" / "aot_vs_jit.json").write_text(json.dumps({"mode": "device", "arch": 90, "matched": 1, "errors": [], "rows": [
        {"kernel": "sample_kernel", "example": "d16", "match": True, "problems": []},
        {"kernel": "ssg_guidance_kernel", "example": "d30", "match": False, "problems": ["registers AOT 80 vs JIT 96"]}]}))
    (tmp_path / "steps.tsv").write_text("build\tok\t40\t70\ne2e\ttimeout\t145\t145\n")
    (tmp_path / "gpu_tests.log").write_text("....\n16 passed in 31.20s\n")
    text = summary(tmp_path)
    assert "**Partial**: the run stopped after 6 rows" in text
    assert "| e2e | timeout | 145 | 145 |" in text
    assert "16 passed in 31.20s" in text
    assert "1/2 configurations match on sm_90." in text and "registers AOT 80 vs JIT 96" in text
    assert "| guidance | 1 | 3.00x (3.00x - 3.00x) | 80.0% (80.0%) |" in text
    # graphs vs upstream 5.00x end to end; floor / upstream = 400 / (1 / 0.199) = 79.6x; the B=1 target
    assert re.search(r"\| d16 \| 1 \| off \| 2\.00x \| 5\.00x \| 5\.10x \| 79\.60x \| >= 5x \(graphs\) \|", text), text
    assert re.search(r"\| d16 \| 1 \| engine_graphs \| \+2\.5% \| \+2\.6% \| \+0\.0% \| <= 3% \|", text), text
    assert "(no trace.json)" in text
