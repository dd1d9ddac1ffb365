"""``OUT/summary.md`` of ``bench/device_check.sh OUT``: every step's status and time, then the measured ratios next
to the cost model's floor (``ssg_engine.costs``, as ``bench/bench_e2e.py`` stores it in its rows) and the targets.

Reads what the steps left in OUT (``steps.tsv``; the JSON Lines ``smoke.jsonl``, ``e2e.jsonl``, ``kernels.jsonl``,
``aot.jsonl``; ``trace.json.gz``) and in the logs folder (``build.log``, ``gpu_tests.log``); a missing file, or a run
without its ``done`` line (a step stopped by its limit keeps the rows it wrote), is said so in its section.
Standard library only, so it runs whatever else failed.

    python bench/device_summary.py [--dry-run] [--logs DIR] OUT      # writes OUT/summary.md and prints it
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import read_rows  # noqa: E402

# the README's targets for the Engine with CUDA graphs vs upstream eager (bf16 autocast)
SPEEDUP_TARGETS = {1: 5.0, 64: 1.5}
SSG_OVERHEAD_TARGET = 0.03


def runs(path: Path) -> List[Tuple[dict, List[dict], Optional[dict]]]:
    """The runs in a JSON Lines file (``bench/rows.py``): (its ``run`` line, its other rows, its ``done`` line or None
    when the run was stopped before the end)."""
    out: List[Tuple[dict, List[dict], Optional[dict]]] = []
    for row in read_rows(path):
        if row["kind"] == "run" or not out:
            out.append((row if row["kind"] == "run" else {}, [], None))
            if row["kind"] == "run":
                continue
        if row["kind"] == "done":
            out[-1] = (out[-1][0], out[-1][1], row)
        else:
            out[-1][1].append(row)
    return out


def fmt(x: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:+.1%}" if abs(x) < 10 else f"{x:+.0%}"


def steps_section(out: Path) -> List[str]:
    lines = ["## Steps", "", "| step | status | seconds | limit (s) | KV cache (or: background) |", "|---|---|---|---|---|"]
    path = out / "steps.tsv"
    if not path.is_file():
        return lines + ["", "(no steps.tsv)"]
    total = 0
    for line in path.read_text().splitlines():
        name, status, seconds, limit, where, *_ = line.split("\t") + [""] * 5
        lines.append(f"| {name} | {status} | {seconds} | {limit} | {where} |")
        total += int(limit) if limit.isdigit() and where != "background" else 0
    budget = os.environ.get("DEVICE_CHECK_BUDGET_S")
    return lines + ["", f"Sum of the step limits: {budget or total} s (the background jobs run beside them)."]


def text_section(title: str, path: Path, pattern: str) -> List[str]:
    """The last line of ``path`` that matches ``pattern``."""
    try:
        hits = [line.strip() for line in path.read_text(errors="replace").splitlines() if re.search(pattern, line)]
    except OSError:
        hits = []
    return [f"## {title}", "", hits[-1] if hits else f"(nothing in {path.name})"]


def short(value: Any) -> str:
    """A row's value in a line: floats (also in lists) to 3 significant digits."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ", ".join(short(v) for v in value) + "]"
    return str(value)


def smoke_section(path: Path) -> List[str]:
    lines = ["## Smoke (`bench/gpu_smoke.py`)", ""]
    found = runs(path)
    if not found:
        return lines + [f"(no {path.name})"]
    head, rows, done = found[-1]
    lines.append(f"{head.get('model')} B={head.get('B')} {head.get('dtype')} on {head.get('device')}: "
                 + ("**partial** (stopped before its end)" if done is None else "ok" if done.get("ok") else "**FAILED**: " + ", ".join(done.get("failed", []))))
    for r in rows:
        details = ", ".join(f"{k} {short(v)}" for k, v in r.items() if k not in ("kind", "check", "ok"))
        lines.append(f"- {r.get('check')}: {'skipped' if r.get('ok') is None else 'ok' if r.get('ok') else 'FAILED'} ({details})")
    return lines


def e2e_report(path: Path) -> Optional[dict]:
    """Every run's rows in one report: the rates and floor GPU of the last run that has them; ``partial`` lists the
    runs (by their models) stopped before their end."""
    found = runs(path)
    if not found:
        return None
    heads = [head for head, _, _ in found]
    last = next((h for h in reversed(heads) if h.get("rates") or h.get("floor_gpu")), heads[-1])
    return {"smoke": last.get("smoke"), "rates": last.get("rates"), "floor_gpu": last.get("floor_gpu"), "environment": last.get("environment"),
            "rows": [r for _, rows, _ in found for r in rows],
            "partial": [sorted({r["model"] for r in rows if "model" in r}) for _, rows, done in found if done is None]}


def e2e_section(report: Optional[dict]) -> List[str]:
    if report is None:
        return ["## End to end", "", "(no e2e.jsonl: no e2e step wrote its first line)"]
    rows = [r for r in report["rows"] if r.get("kind", "row") == "row"]
    rates, gpu = report.get("rates"), report.get("floor_gpu")
    lines = ["## End to end (`bench/bench_e2e.py`)", ""]
    for models in report.get("partial", []):
        lines += [f"**Partial**: a run ({', '.join(models) or 'no rows'}) stopped before its end (timeout or error); "
                  "what it measured is below.", ""]
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
    notes += [f"{r['model']} B={r['B']}: {r['note']}" for r in report["rows"] if r.get("kind") == "skipped"]
    lines += [""] + [f"- {n}" for n in notes] if notes else []

    by = {(r["model"], r["B"], r["ssg"], r["method"]): r for r in rows}
    groups = sorted({(r["model"], r["B"], r["ssg"]) for r in rows}, key=lambda g: (g[0], g[1], g[2] != "off"))
    lines += ["", "### Speedup over upstream (the `upstream_shaped` arm), next to the floor", "",
              "`floor / upstream`: the most the cost model allows (floor img/s over upstream's measured img/s, transformer only).", "",
              "| model | B | SSG | reference eager / upstream | engine eager / upstream | engine graphs / upstream | same, transformer only | floor / upstream | target |",
              "|---|---|---|---|---|---|---|---|---|"]
    for model, B, ssg in groups:
        up = by.get((model, B, ssg, "upstream_shaped"))
        if up is None:
            continue

        def ratio(method: str, key: str) -> Optional[float]:
            r = by.get((model, B, ssg, method))
            return None if r is None or r.get(key) is None or up.get(key) is None else r[key] / up[key]

        floor = up.get("floor_images_per_s")
        ceiling = None if floor is None or up.get("transformer_only_images_per_s") is None else floor / up["transformer_only_images_per_s"]
        target = SPEEDUP_TARGETS.get(B)
        lines.append(f"| {model} | {B} | {ssg} | {fmt(ratio('reference_eager', 'images_per_s'), '.2f', 'x')} | {fmt(ratio('engine_eager', 'images_per_s'), '.2f', 'x')} | "
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


def kernels_section(path: Path) -> List[str]:
    lines = ["## Kernels (`bench/bench_kernels.py`)", ""]
    found = runs(path)
    if not found:
        return lines + [f"(no {path.name})"]
    report, results, done = found[-1]
    if done is None:
        lines += [f"**Partial**: stopped after {len(results)} cases (timeout or error).", ""]
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


def aot_section(path: Path) -> List[str]:
    lines = ["## AOT vs JIT registers (`bench/aot_vs_jit.py`)", ""]
    found = runs(path)
    if not found:
        return lines + [f"(no {path.name})"]
    head, entries, done = found[-1]
    rows = [r for r in entries if r["kind"] == "row"]
    jit = [r for r in entries if r["kind"] == "jit"]
    if done is None:
        return lines + [f"**Partial**: stopped after {len(jit)} JIT configurations, before the comparison (timeout or error)."]
    mode = " (dry run: plumbing only, both sides compiled ahead of time)" if done.get("mode") == "dry-run" else ""
    lines.append(f"{done.get('matched', 0)}/{len(rows)} configurations match on sm_{done.get('arch')}{mode}.")
    for r in rows:
        if not r.get("match"):
            lines.append(f"- {r['kernel']} ({r.get('example')}): {'; '.join(r.get('problems', []))}")
    for e in done.get("errors", []):
        lines.append(f"- error: {e[:500]}")
    return lines


def trace_section(path: Path) -> List[str]:
    lines = ["## Profiler trace", ""]
    try:
        with gzip.open(path, "rt") as f:
            events = len(json.load(f).get("traceEvents", []))
    except (OSError, ValueError, EOFError):
        return lines + [f"(no readable {path.name})"]
    return lines + [f"`{path.name}`: {path.stat().st_size / 1e6:.1f} MB gzipped, {events} events (gunzip, then chrome://tracing or Perfetto)."]


def summary(out: Path, dry: bool = False, logs: Optional[Path] = None) -> str:
    """The text of ``summary.md`` for the device check's ``out`` folder (its logs in ``logs``, default ``out``)."""
    logs = out if logs is None else logs
    e2e = e2e_report(out / "e2e.jsonl")
    env = (e2e or {}).get("environment") or {}
    title = "# Device check" + (": dry run (CPU, Triton interpreter, tiny shapes; plumbing only, no speed claims)" if dry else "")
    lines = [title, ""]
    if env:
        lines += [", ".join(f"{k} {v}" for k, v in env.items() if v), ""]
    lines += steps_section(out) + [""]
    lines += text_section("Build", logs / "build.log", r"C\+\+ extension") + [""]
    lines += smoke_section(out / "smoke.jsonl") + [""]
    lines += text_section("GPU tests (`pytest -m gpu`)", logs / "gpu_tests.log", r"(passed|failed|skipped|error|deselected|no tests ran)") + [""]
    lines += kernels_section(out / "kernels.jsonl") + [""]
    lines += e2e_section(e2e) + [""]
    lines += aot_section(out / "aot.jsonl") + [""]
    lines += trace_section(out / "trace.json.gz")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Write OUT/summary.md of bench/device_check.sh OUT and print it.")
    ap.add_argument("--dry-run", action="store_true", help="the dry run's title (no speed claims)")
    ap.add_argument("--logs", default=None, help="the folder of the steps' logs (default: OUT)")
    ap.add_argument("out", help="the folder of bench/device_check.sh")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        print(f"error: OUT {out} is not a folder: give the folder of bench/device_check.sh", file=sys.stderr)
        return 2
    text = summary(out, args.dry_run, None if args.logs is None else Path(args.logs))
    tmp = out / ".summary.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "summary.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
