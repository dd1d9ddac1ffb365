"""AOT vs JIT: the kernels the Triton JIT compiles on this GPU use the registers, spills and shared memory that
``bench/aot_compile.py`` reports for the same configurations and arch.

It runs ``bench/aot_compile.py --arch <this GPU's compute capability>`` in a subprocess (every launch
configuration of the public models, or ``--quick``: one per kernel; each row carries its compile key) and,
meanwhile, launches each distinct configuration once through the kernel's JIT: the launcher's own
``KernelLaunch`` of the smallest launch with that compile key, its meta tensors replaced by real tensors of
the same shapes, dtypes and strides (so ``JITFunction.run`` specializes it to the same key, which is checked).
From the compiled kernel it reads the driver's ``n_regs`` and ``n_spills`` (local memory bytes / 4) and
``metadata.shared``. A configuration matches when the registers and shared memory are equal and both sides
spill or neither does (both byte counts are recorded). ``TRITON_ALWAYS_COMPILE=1`` (set by ``aot_compile``):
the JIT compiles every configuration now, never reusing a cached binary.

``--dry-run`` (no GPU; the plumbing only): the same enumeration, materialisation (on the CPU), key check and
comparison, but the "JIT" side compiles the materialised launch with ``triton.compile`` for sm_90 and reads
its cubin with ``cuobjdump`` instead of loading it on a device.

    python bench/aot_vs_jit.py --out-dir OUT/aot                  # on a GPU, every configuration
    python bench/aot_vs_jit.py --dtypes bfloat16 float32 --out-dir OUT/aot   # the device check's subset
    python bench/aot_vs_jit.py --dry-run --quick --out-dir /tmp/aot   # CPU: plumbing only
    python bench/aot_vs_jit.py --aot-dir PRE --jobs 16 --rows OUT/aot.jsonl   # AOT rows compiled earlier

Writes ``aot_vs_jit.json`` (and ``aot_compile.py``'s ``aot_kernels.json`` / ``.md``) into ``--out-dir``; exits 1
when a configuration differs or fails on either side. ``--jobs`` runs ``aot_compile.py --jobs``; ``--aot-dir``
takes an ``aot_kernels.json`` compiled earlier for this arch and flags (``bench/device_check.sh`` precompiles
while other steps run) instead of compiling again. ``--rows`` appends JSON Lines (``bench/rows.py``): each JIT
configuration as it is compiled (``jit``), then each comparison (``row``) and the counts (``done``).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels (the interpreter's kernel objects cannot be compiled)

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional, Sequence, Tuple  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import aot_compile  # noqa: E402  (sets TRITON_ALWAYS_COMPILE=1)
from env_info import environment  # noqa: E402
from rows import RowWriter  # noqa: E402

from ssg_engine.files import atomic_write_json  # noqa: E402
from ssg_engine.kernels import KernelLaunch, launch_config  # noqa: E402

DRY_RUN_ARCH = 90


def device_arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def launch_cases(quick: bool, dtypes: Optional[Sequence[str]] = None) -> List["aot_compile.Case"]:
    """The launches ``aot_compile.py`` enumerates with the same flags."""
    if quick:
        return aot_compile.quick_cases()
    dtypes = aot_compile.DTYPES if dtypes is None else [getattr(torch, d) for d in dtypes]
    return [*aot_compile.guidance_cases(aot_compile.PRESETS, aot_compile.BATCHES, dtypes),
            *aot_compile.sampling_cases(aot_compile.PRESETS, aot_compile.BATCHES, dtypes)]


def small_cases() -> List["aot_compile.Case"]:
    """d16 at B=1 in float32, and the QKV epilogue of every preset at B=1 with a 2-layer cache: the same compile keys
    as ``--quick``'s B=64 launches (neither the batch size nor the layer index is specialized), on far smaller
    tensors."""
    f32 = [torch.float32]
    return [*aot_compile.guidance_cases(["d16"], [1], f32), *aot_compile.sampling_cases(["d16"], [1], f32),
            *aot_compile.qkv_norm_rope_cache_cases(aot_compile.PRESETS, [1], aot_compile.DTYPES, cache_layers=2)]


def footprint(launch: KernelLaunch) -> int:
    """Bytes of the launch's distinct tensor arguments."""
    tensors = {id(a): a for a in launch.args if isinstance(a, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def representatives(cases: Sequence["aot_compile.Case"], arch: int) -> Dict[str, Tuple["aot_compile.Case", int]]:
    """Compile key -> (its smallest launch, number of launches with that key)."""
    out: Dict[str, Tuple["aot_compile.Case", int]] = {}
    for case in cases:
        key = aot_compile.launch_key(case.launch)
        best, count = out.get(key, (case, 0))
        if footprint(case.launch) < footprint(best.launch):
            best = case
        out[key] = (best, count + 1)
    return out


def materialize(launch: KernelLaunch, device: str, seed: int = 0) -> KernelLaunch:
    """The launch with every tensor argument replaced by a real one on ``device`` (same shape, strides, dtype;
    floats N(0, 1), integers 0; arguments that alias stay aliased)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    real: Dict[int, torch.Tensor] = {}

    def convert(a):
        if not isinstance(a, torch.Tensor):
            return a
        if id(a) not in real:
            t = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=device)
            if t.dtype.is_floating_point:
                t.copy_(torch.randn(t.shape, generator=gen))
            else:
                t.zero_()
            real[id(a)] = t
        return real[id(a)]

    return KernelLaunch(launch.kernel, launch.grid, tuple(convert(a) for a in launch.args), dict(launch.constexprs), launch.num_warps, launch.num_stages)


def jit_resources(launch: KernelLaunch) -> dict:
    """Launch once through ``JITFunction.run`` (it compiles for this GPU) and read the compiled kernel."""
    compiled = launch.kernel[launch.grid](*launch.args, **launch.constexprs, **launch.options)
    torch.cuda.synchronize()
    if getattr(compiled, "n_regs", None) is None:
        compiled._init_handles()
    row = {"registers": int(compiled.n_regs), "spill_bytes": 4 * int(compiled.n_spills),
           "shared_bytes": int(compiled.metadata.shared), "source": "JITFunction.run on the device (driver n_regs / n_spills)"}
    cubin = getattr(compiled, "asm", {}).get("cubin")
    if cubin is not None:  # the same binary read the way aot_compile reads its own
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "jit.cubin"
            path.write_bytes(cubin)
            try:
                usage = aot_compile.resource_usage(path)
                row["cubin_registers"] = usage["REG"]
                row["cubin_spill_bytes"] = usage["STACK"] + usage["LOCAL"]
            except (OSError, subprocess.SubprocessError, KeyError) as error:
                row["cubin_error"] = f"{type(error).__name__}: {error}"
    return row


def dry_run_resources(launch: KernelLaunch, arch: int) -> dict:
    """No device: compile the materialised launch's specialization ahead of time and read its cubin."""
    row = aot_compile.compile_row((aot_compile.launch_key(launch), launch_config(launch), arch))
    if not row["compiled"]:
        raise RuntimeError(row["error"])
    return {"registers": row["registers"], "spill_bytes": row["spill_bytes"], "shared_bytes": row["shared_bytes"],
            "source": "dry run: triton.compile of the materialised launch + cuobjdump (no device)"}


def compare(aot: dict, jit: dict) -> List[str]:
    """Why the two differ (empty when they match)."""
    problems = []
    if aot["registers"] != jit["registers"]:
        problems.append(f"registers AOT {aot['registers']} vs JIT {jit['registers']}")
    if (aot["spill_bytes"] > 0) != (jit["spill_bytes"] > 0):
        problems.append(f"spills AOT {aot['spill_bytes']} B vs JIT {jit['spill_bytes']} B")
    if aot["shared_bytes"] != jit["shared_bytes"]:
        problems.append(f"shared memory AOT {aot['shared_bytes']} B vs JIT {jit['shared_bytes']} B")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default="aot_vs_jit", help="writes aot_vs_jit.json, aot_kernels.json and aot_kernels.md here")
    ap.add_argument("--quick", action="store_true", help="one configuration per kernel (aot_compile.py --quick)")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], default=None,
                    help="input dtypes of the full set (aot_compile.py --dtypes; default: all)")
    ap.add_argument("--dry-run", action="store_true", help=f"no GPU: check the plumbing (sm_{DRY_RUN_ARCH}, AOT on both sides)")
    ap.add_argument("--jobs", type=int, default=1, help="compiles at a time on the AOT side (aot_compile.py --jobs)")
    ap.add_argument("--aot-dir", default=None, help="use this aot_compile.py output (same arch and flags) instead of compiling")
    ap.add_argument("--rows", default=None, help="append JSON Lines here as configurations are compiled and compared")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run (plumbing only)", file=sys.stderr)
        return 2
    arch = DRY_RUN_ARCH if args.dry_run else device_arch()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"mode": "dry-run" if args.dry_run else "device", "arch": arch, "quick": args.quick, "dtypes": args.dtypes,
              "environment": environment(),
              "rows": [], "matched": 0, "mismatched": 0, "errors": []}
    lines = RowWriter(args.rows)
    lines.write("run", **{k: v for k, v in report.items() if k not in ("rows", "matched", "mismatched", "errors")})
    start = time.perf_counter()
    aot_dir = out if args.aot_dir is None else Path(args.aot_dir)
    cmd = [sys.executable, str(HERE / "aot_compile.py"), "--arch", str(arch), "--out", str(out), "--ranges-only",
           "--jobs", str(args.jobs)]
    cmd += ["--quick"] if args.quick else ["--dtypes", *args.dtypes] if args.dtypes else []
    aot_log_file = tempfile.TemporaryFile(mode="w+")  # not a pipe: nobody reads it until the JIT side is done
    aot_proc = None
    if args.aot_dir is None:
        print(f"AOT: {' '.join(cmd[1:])} (in the background)", flush=True)
        aot_proc = subprocess.Popen(cmd, stdout=aot_log_file, stderr=subprocess.STDOUT, text=True)
    else:
        print(f"AOT: the rows in {aot_dir / 'aot_kernels.json'} (compiled earlier)", flush=True)

    jit: Dict[str, dict] = {}
    device = "cpu" if args.dry_run else "cuda"
    cases = launch_cases(args.quick, args.dtypes)
    reps = representatives(cases + (small_cases() if args.quick else []), arch)
    if args.quick:  # the smallest launch of each of aot_compile.py --quick's keys
        keys = {aot_compile.launch_key(case.launch) for case in cases}
        reps = {key: rep for key, rep in reps.items() if key in keys}
    print(f"JIT: {len(reps)} configurations on {device} (sm_{arch})", flush=True)
    for i, (key, (case, count)) in enumerate(reps.items()):
        entry = {"example": case.describe(), "kernel": case.kernel, "launches": count}
        try:
            launch = materialize(case.launch, device, seed=i)
            real_key = aot_compile.launch_key(launch)
            if real_key != key:
                raise RuntimeError(f"real tensors specialize differently from meta tensors ({real_key} vs {key})")
            entry.update(dry_run_resources(launch, arch) if args.dry_run else jit_resources(launch))
        except Exception as error:  # noqa: BLE001 - every failure is reported, the others still run
            entry["error"] = f"{type(error).__name__}: {str(error)[:1000]}"
        jit[key] = entry
        lines.write("jit", key=key, **entry)
        print(f"  [{i + 1}/{len(reps)}] {case.kernel} {case.describe()}: "
              + (entry.get("error") or f"{entry['registers']} regs, {entry['spill_bytes']} B spill, {entry['shared_bytes']} B shared"), flush=True)

    aot_returncode = 0 if aot_proc is None else aot_proc.wait()
    aot_log_file.seek(0)
    aot_log = aot_log_file.read()
    report["aot_returncode"] = aot_returncode
    aot_json = aot_dir / "aot_kernels.json"
    if not aot_json.is_file():
        report["errors"].append(f"aot_compile.py wrote no {aot_json} (exit {aot_returncode}): {aot_log[-2000:]}")
        aot_rows = []
    else:
        aot_rows = [r for r in json.loads(aot_json.read_text()) if r["arch"] == arch]
        if args.aot_dir is not None:  # compiled earlier, perhaps for more flags (all dtypes): this run's configurations
            aot_rows = [r for r in aot_rows if r.get("key") in reps]
    if aot_returncode:
        print(aot_log[-3000:], file=sys.stderr)
    for aot in aot_rows:
        key = aot.get("key")
        row = {"kernel": aot["kernel"], "constexprs": aot["constexprs"], "num_warps": aot["num_warps"], "example": aot["example"],
               "aot": {k: aot.get(k) for k in ("registers", "spill_bytes", "shared_bytes")}, "jit": jit.pop(key, None)}
        if not aot["compiled"]:
            row["problems"] = [f"AOT compile failed: {aot['error'].splitlines()[0]}"]
        elif row["jit"] is None:
            row["problems"] = ["no JIT launch has this compile key" + ("" if key else " (aot_compile.py wrote no keys)")]
        elif "error" in row["jit"]:
            row["problems"] = [f"JIT: {row['jit']['error'].splitlines()[0]}"]
        else:
            row["problems"] = compare(row["aot"], row["jit"])
        row["match"] = not row["problems"]
        report["rows"].append(row)
        lines.write("row", **row)
    for key, entry in jit.items():  # JIT configurations the AOT run did not have
        report["rows"].append({"kernel": entry["kernel"], "example": entry["example"], "aot": None, "jit": entry,
                               "problems": ["not among aot_compile.py's configurations"], "match": False})
        lines.write("row", **report["rows"][-1])
    report["matched"] = sum(r["match"] for r in report["rows"])
    report["mismatched"] = len(report["rows"]) - report["matched"]
    report["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(out / "aot_vs_jit.json", report)
    lines.write("done", **{k: report[k] for k in ("mode", "arch", "matched", "mismatched", "errors", "seconds")})

    print(f"{'kernel':20} {'example':45} {'AOT regs':>8} {'JIT regs':>8} {'spill A/J':>11} {'shared A/J':>13}  result")
    for r in report["rows"]:
        a, j = r["aot"] or {}, r["jit"] or {}
        print(f"{r['kernel']:20} {r['example']:45} {a.get('registers', '-')!s:>8} {j.get('registers', '-')!s:>8} "
              f"{a.get('spill_bytes', '-')!s:>5}/{j.get('spill_bytes', '-')!s:<5} {a.get('shared_bytes', '-')!s:>6}/{j.get('shared_bytes', '-')!s:<6}  "
              + ("match" if r["match"] else "; ".join(r["problems"])))
    for e in report["errors"]:
        print(f"error: {e}", file=sys.stderr)
    ok = report["mismatched"] == 0 and not report["errors"] and report["rows"]
    print(f"{report['matched']}/{len(report['rows'])} configurations match on sm_{arch} ({report['mode']}, {report['seconds']} s); "
          f"wrote {out / 'aot_vs_jit.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
