"""``OUT/summary.md`` of ``bench/device_check.sh OUT``: every step's status and time, then the measured ratios next
to the cost model's floor (``ssg_engine.costs``, as ``bench/bench_e2e.py`` stores it in its rows) and the targets.

Reads what the steps left in OUT (``steps.tsv``, ``extension.log``, ``gpu_tests.log``, ``aot/aot_vs_jit.json``,
``kernels.json``, ``e2e.json``, ``trace.json``); a missing or partial file is said so in its section (a step that
timed out keeps the rows it wrote). Standard library only, so it runs whatever else failed.

    python bench/device_summary.py [--dry-run] OUT      # writes OUT/summary.md and prints it
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import List, Optional

# the README's targets for the Engine with CUDA graphs vs upstream eager (bf16 autocast)
SPEEDUP_TARGETS = {1: 5.0, 64: 1.5}
SSG_OVERHEAD_TARGET = 0.03


def load_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt(x: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:+.1%}" if abs(x) < 10 else f"{x:+.0%}"


def steps_section(out: Path) -> List[str]:
    lines = ["## Steps", "", "| step | status | seconds | limit (s) |", "|---|---|---|---|"]
    path = out / "steps.tsv"
    if not path.is_file():
        return lines + ["", "(no steps.tsv)"]
    total = 0
    for line in path.read_text().splitlines():
        name, status, seconds, limit, *_ = line.split("\t") + [""] * 4
        lines.append(f"| {name} | {status} | {seconds} | {limit} |")
        total += int(limit) if limit.isdigit() else 0
    budget = os.environ.get("DEVICE_CHECK_BUDGET_S")
    return lines + ["", f"Sum of the step limits: {budget or total} s."]


def text_section(title: str, path: Path, pattern: str) -> List[str]:
    """The last line of ``path`` that matches ``pattern``."""
    try:
        hits = [line.strip() for line in path.read_text(errors="replace").splitlines() if re.search(pattern, line)]
    except OSError:
        hits = []
    return [f"## {title}", "", hits[-1] if hits else f"(nothing in {path.name})"]


def e2e_section(report: Optional[dict]) -> List[str]:
    if report is None:
        return ["## End to end", "", "(no e2e.json: the step failed before its first row)"]
    rows = report.get("rows", [])
    rates, gpu = report.get("rates"), report.get("floor_gpu")
    lines = ["## End to end (`bench/bench_e2e.py`)", ""]
    if not report.get("complete"):
        lines += [f"**Partial**: the run stopped after {len(rows)} rows (timeout or error); what it measured is below.", ""]
    if rates:
        lines.append(f"Measured: bf16 matmul {rates['bf16_matmul_tflops']:.0f} TFLOP/s, device copy {rates['copy_gbytes_per_s']:.0f} GB/s.")
    if gpu:
        lines.append(f"Floor: `ssg_engine.costs` roofline of the bf16 transformer (and, with decode, the Engine's VQ-VAE decode) on "
                     f"{gpu['name']} ({gpu['bf16_tflops']:.0f} TFLOP/s bf16, {gpu['gbytes_per_s']:.0f} GB/s)"
                     + (" -- smoke run: no speed claim, the columns only exercise the code." if report.get("smoke") else "."))
    lines += ["", "| model | B | SSG | method | ms | img/s | decode ms (dtype) | transformer-only img/s | floor img/s | % of floor | "
              "with decode: floor img/s | % of floor |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['B']} | {r['ssg']} | {r['method']} | {r['seconds'] * 1e3:.2f} | {r['images_per_s']:.2f} | "
            f"{r['decode_seconds'] * 1e3:.2f} ({r.get('decode_dtype', '?')}) | {fmt(r.get('transformer_only_images_per_s'))} | "
            f"{fmt(r.get('floor_images_per_s'), '.1f')} | {fmt(None if r.get('fraction_of_floor') is None else 100 * r['fraction_of_floor'], '.1f', '%')} | "
            f"{fmt(r.get('floor_images_per_s_with_decode'), '.1f')} | "
            f"{fmt(None if r.get('fraction_of_floor_with_decode') is None else 100 * r['fraction_of_floor_with_decode'], '.1f', '%')} |"
        )
    notes = [f"{r['model']} B={r['B']} SSG {r['ssg']} {r['method']}: {r['note']}" for r in rows if r.get("note")]
    lines += [""] + [f"- {n}" for n in notes] if notes else []

    by = {(r["model"], r["B"], r["ssg"], r["method"]): r for r in rows}
    groups = sorted({(r["model"], r["B"], r["ssg"]) for r in rows}, key=lambda g: (g[0], g[1], g[2] != "off"))
    lines += ["", "### Speedup over upstream eager, next to the floor", "",
              "`floor / upstream`: the most the cost model allows (floor img/s over upstream's measured img/s, transformer only).", "",
              "| model | B | SSG | engine eager / upstream | engine graphs / upstream | same, transformer only | floor / upstream | target |",
              "|---|---|---|---|---|---|---|---|"]
    for model, B, ssg in groups:
        up = by.get((model, B, ssg, "upstream_eager"))
        if up is None:
            continue

        def ratio(method: str, key: str) -> Optional[float]:
            r = by.get((model, B, ssg, method))
            return None if r is None or r.get(key) is None or up.get(key) is None else r[key] / up[key]

        floor = up.get("floor_images_per_s")
        ceiling = None if floor is None or up.get("transformer_only_images_per_s") is None else floor / up["transformer_only_images_per_s"]
        target = SPEEDUP_TARGETS.get(B)
        lines.append(f"| {model} | {B} | {ssg} | {fmt(ratio('engine_eager', 'images_per_s'), '.2f', 'x')} | "
                     f"{fmt(ratio('engine_graphs', 'images_per_s'), '.2f', 'x')} | {fmt(ratio('engine_graphs', 'transformer_only_images_per_s'), '.2f', 'x')} | "
                     f"{fmt(ceiling, '.2f', 'x')} | {'-' if target is None or ssg != 'off' else f'>= {target:g}x (graphs)'} |")

    lines += ["", "### SSG overhead (time with SSG / without - 1), next to the floor's", "",
              "| model | B | method | measured, end to end | measured, transformer only | floor (cost model) | target |", "|---|---|---|---|---|---|---|"]
    for model, B, method in sorted({(r["model"], r["B"], r["method"]) for r in rows}):
        off, on = by.get((model, B, "off", method)), by.get((model, B, "on", method))
        if off is None or on is None:
            continue
        t_off, t_on = off.get("transformer_only_seconds"), on.get("transformer_only_seconds")
        f_off, f_on = off.get("floor_images_per_s"), on.get("floor_images_per_s")
        lines.append(f"| {model} | {B} | {method} | {pct(on['seconds'] / off['seconds'] - 1)} | "
                     f"{pct(None if not t_off or not t_on else t_on / t_off - 1)} | {pct(None if not f_off or not f_on else f_off / f_on - 1)} | "
                     f"{'<= ' + format(SSG_OVERHEAD_TARGET, '.0%') if method == 'engine_graphs' else '-'} |")
    return lines


def kernels_section(report: Optional[dict]) -> List[str]:
    lines = ["## Kernels (`bench/bench_kernels.py`)", ""]
    if report is None:
        return lines + ["(no kernels.json)"]
    results = report.get("results", [])
    if report.get("smoke"):
        ok = sum(1 for r in results if (r["op"] == "guidance" and max(r["rel_err_guided"], r["rel_err_cfg"]) < 1e-4)
                 or (r["op"] == "sampler" and r["kernel_in_mask"])
                 or (r["op"] == "bits" and r["rel_err_cfg"] < 1e-4 and r["bits_agree"] > 0.99))
        return lines + [f"Smoke run (interpreter, no timings): {ok}/{len(results)} cases agree with the baselines."]
    if report.get("copy_bandwidth_GBps"):
        lines.append(f"Device copy bandwidth {report['copy_bandwidth_GBps']:.0f} GB/s (the floor of a memory-bound kernel).")
    lines += ["", "| op | cases | speedup vs baseline: median (min - max) | fused kernel, % of copy bandwidth: median (max) |", "|---|---|---|---|"]
    for op in ("guidance", "sampler", "bits"):
        sel = [r for r in results if r["op"] == op and "speedup" in r]
        if sel:
            sp, cp = [r["speedup"] for r in sel], [r["fused_pct_copy"] for r in sel]
            lines.append(f"| {op} | {len(sel)} | {statistics.median(sp):.2f}x ({min(sp):.2f}x - {max(sp):.2f}x) | "
                         f"{statistics.median(cp):.1f}% ({max(cp):.1f}%) |")
    return lines


def aot_section(report: Optional[dict]) -> List[str]:
    lines = ["## AOT vs JIT registers (`bench/aot_vs_jit.py`)", ""]
    if report is None:
        return lines + ["(no aot/aot_vs_jit.json)"]
    rows = report.get("rows", [])
    mode = " (dry run: plumbing only, both sides compiled ahead of time)" if report.get("mode") == "dry-run" else ""
    lines.append(f"{report.get('matched', 0)}/{len(rows)} configurations match on sm_{report.get('arch')}{mode}.")
    for r in rows:
        if not r.get("match"):
            lines.append(f"- {r['kernel']} ({r.get('example')}): {'; '.join(r.get('problems', []))}")
    for e in report.get("errors", []):
        lines.append(f"- error: {e[:500]}")
    return lines


def summary(out: Path, dry: bool = False) -> str:
    e2e = load_json(out / "e2e.json")
    env = (e2e or {}).get("environment") or {}
    title = "# Device check" + (": dry run (CPU, Triton interpreter, tiny shapes; plumbing only, no speed claims)" if dry else "")
    lines = [title, ""]
    if env:
        lines += [", ".join(f"{k} {v}" for k, v in env.items() if v), ""]
    lines += steps_section(out) + [""]
    lines += text_section("Build", out / "extension.log", r"C\+\+ extension") + [""]
    lines += text_section("GPU tests (`pytest -m gpu`)", out / "gpu_tests.log", r"(passed|failed|skipped|error|deselected|no tests ran)") + [""]
    lines += aot_section(load_json(out / "aot" / "aot_vs_jit.json")) + [""]
    lines += kernels_section(load_json(out / "kernels.json")) + [""]
    lines += e2e_section(e2e) + [""]
    trace = out / "trace.json"
    lines += ["## Profiler trace", "", f"`trace.json`: {trace.stat().st_size / 1e6:.1f} MB (open in chrome://tracing or Perfetto)."
              if trace.is_file() else "(no trace.json)"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    dry = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"]
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python bench/device_summary.py [--dry-run] OUT (the folder of bench/device_check.sh)", file=sys.stderr)
        return 2
    out = Path(args[0])
    text = summary(out, dry)
    tmp = out / ".summary.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "summary.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
