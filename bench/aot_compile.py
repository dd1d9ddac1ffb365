"""Ahead-of-time compile gate for the Triton kernels, on a CPU (the triton wheel ships ptxas).

Every launch configuration the launchers choose for the public models (VAR d16/d20/d24/d30 at
256 px, d36 at 512 px, V = 4096; B in {1, 16, 64}; every scale; fp32/bf16/fp16 inputs; SSG prior
on/off; top-k/top-p on/off) is derived by the launchers' own ``*_launch`` functions on meta
tensors, specialized exactly as ``JITFunction.run`` would (do_not_specialize included), deduped by
compile key and compiled to cubin for each ``--arch``. Per compiled configuration it records the
registers, local memory (spills; ptxas puts them in the stack frame), shared memory, SASS
instruction count and compile seconds, and how many engine launches share it. Exits 1 when a configuration fails to compile, spills, or needs
more shared memory than the arch has.

    python bench/aot_compile.py --arch 80 90 --out bench/results/aot      # everything (minutes)
    python bench/aot_compile.py --arch 90 --quick --out /tmp/aot          # one configuration per kernel
    python bench/aot_compile.py --arch 90 --jobs 16 --out /tmp/aot        # 16 compiles at a time

Each compile also lands in Triton's cache, so a JIT launch with the same compile key on that arch loads it
(``bench/device_check.sh`` precompiles this way before timing).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # the interpreter's kernel objects cannot be compiled
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # honest compile seconds, never a cache hit

import argparse  # noqa: E402
import itertools  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import queue  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, Iterator, List, Optional, Sequence, Tuple  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from ssg_engine.config import ModelConfig  # noqa: E402
from ssg_engine.guidance import cfg_ratio  # noqa: E402
from ssg_engine.kernels import KernelLaunch  # noqa: E402
from ssg_engine.kernels.sampling import sample_logits_launch  # noqa: E402
from ssg_engine.kernels.ssg_guidance import ssg_guidance_launch  # noqa: E402

PRESETS = ("d16", "d20", "d24", "d30", "d36")
BATCHES = (1, 16, 64)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# Max shared memory per thread block (bytes), CUDA C++ Programming Guide, "Technical Specifications
# per Compute Capability": https://docs.nvidia.com/cuda/cuda-c-programming-guide/#features-and-technical-specifications
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclasses.dataclass(frozen=True)
class Case:
    """One launch the engine makes: a kernel at one scale of one model, batch, dtype and setting."""

    kernel: str
    preset: str
    batch: int
    dtype: str
    setting: str  # "ssg" / "no ssg" (guidance), "top-k+top-p" ... (sampling)
    scale: int
    launch: KernelLaunch

    @property
    def bucket(self) -> Tuple[str, str, int, str, str]:
        """The launches one CUDA graph of the engine holds (all scales of one batch bucket)."""
        return self.kernel, self.preset, self.batch, self.dtype, self.setting

    def describe(self) -> str:
        return f"{self.preset} B={self.batch} scale {self.scale} {self.dtype} {self.setting}"


def guidance_cases(presets: Sequence[str], batches: Sequence[int], dtypes: Sequence[torch.dtype]) -> Iterator[Case]:
    """``ssg_guidance`` as the engine calls it: prior from scale 1 on when SSG is on, never when off; cfg and beta
    as numbers (eager) or as 0-d device tensors (what a captured graph passes, so a cfg/beta change replays it)."""
    scalar = torch.empty((), dtype=torch.float32, device="meta")
    for preset in presets:
        cfg = ModelConfig.preset(preset)
        pns = cfg.patch_nums
        for batch in batches:
            for dtype in dtypes:
                for ssg, graph in itertools.product((False, True), (False, True)):
                    setting = ("ssg" if ssg else "no ssg") + (" graph" if graph else "")
                    for si, pn in enumerate(pns):
                        logits = torch.empty(2 * batch, pn * pn, cfg.V, dtype=dtype, device="meta")
                        prev = operator = None
                        if ssg and si > 0:
                            prev = torch.empty(batch, pns[si - 1] ** 2, cfg.V, dtype=dtype, device="meta")
                            operator = torch.empty(pn * pn, pns[si - 1] ** 2, device="meta")
                        t, beta = (scalar, scalar if operator is not None else 0.0) if graph else (cfg_ratio(1.5, si, len(pns)), 0.5)
                        launch, _, _ = ssg_guidance_launch(logits, prev, operator, t, beta)
                        yield Case("ssg_guidance", preset, batch, str(dtype).removeprefix("torch."), setting, si, launch)


def sampling_cases(presets: Sequence[str], batches: Sequence[int], dtypes: Sequence[torch.dtype]) -> Iterator[Case]:
    """``sample_logits`` on each scale's (B * pn^2, V) logits, with top-k 900 / top-p 0.96 on or off."""
    seed = torch.zeros(1, dtype=torch.int64, device="meta")
    for preset in presets:
        cfg = ModelConfig.preset(preset)
        for batch in batches:
            for dtype in dtypes:
                for top_k, top_p in ((0, 0.0), (900, 0.0), (0, 0.96), (900, 0.96)):
                    setting = "+".join(name for name, on in (("top-k", top_k), ("top-p", top_p)) if on) or "plain"
                    for si, pn in enumerate(cfg.patch_nums):
                        logits = torch.empty(batch * pn * pn, cfg.V, dtype=dtype, device="meta")
                        launch, _ = sample_logits_launch(logits, top_k, top_p, 1.0, seed, seed)
                        yield Case("sample_logits", preset, batch, str(dtype).removeprefix("torch."), setting, si, launch)


def quick_cases() -> List[Case]:
    """One configuration per kernel: d16's last scale at B=64, fp32, prior and top-k + top-p on."""
    guidance = [c for c in guidance_cases(["d16"], [64], [torch.float32]) if c.setting == "ssg"]
    sampling = [c for c in sampling_cases(["d16"], [64], [torch.float32]) if c.setting == "top-k+top-p"]
    return [guidance[-1], sampling[-1]]


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """What ``JITFunction.run`` hands to ``triton.compile`` for a launch."""

    kernel: JITFunction
    signature: Dict[str, str]
    constexprs: Dict[Tuple[int, ...], object]
    attrs: Dict[Tuple[int, ...], list]
    options: Dict[str, object]

    @property
    def key(self) -> str:
        """Equal for launches that compile to the same binary (per arch)."""
        src = ASTSource(self.kernel, self.signature, self.constexprs, self.attrs)
        return f"{src.hash()}-{self.options['num_warps']}"


def compile_spec(launch: KernelLaunch, arch: int) -> CompileSpec:
    """Specialize the launch's arguments as the JIT does at run time.

    Uses triton's own binder (``create_function_from_signature``) and ``JITFunction._pack_args``,
    internals of triton 3.x (checked with 3.9.0), so ``do_not_specialize`` is honoured exactly.
    """
    kernel = launch.kernel
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{kernel!r} is not a JITFunction: import triton with TRITON_INTERPRET=0 (run this script as its own process)")
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, kwargs = binder(*launch.args, **launch.constexprs, num_warps=launch.num_warps)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, kwargs)
    return CompileSpec(kernel, signature, constexprs, attrs, options.__dict__)


def resource_usage(cubin: Path) -> Dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's kernel (``cuobjdump -res-usage``)."""
    text = subprocess.run([str(TOOLS / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def sass_instructions(cubin: Path) -> int:
    """Number of SASS instructions (``nvdisasm`` lines with an address)."""
    text = subprocess.run([str(TOOLS / "nvdisasm"), str(cubin)], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", text, flags=re.M))


def compile_row(spec: CompileSpec, arch: int, workdir: Path) -> dict:
    """Compile for ``sm_<arch>`` and measure; ``compiled`` is False (with ``error``) on a compile failure."""
    constexprs = {spec.kernel.arg_names[k[0]]: v for k, v in spec.constexprs.items()}
    ints = {name: ty + ("/16" if spec.attrs.get((i,)) else "") for i, (name, ty) in enumerate(spec.signature.items()) if ty[0] == "i"}
    row = {
        "kernel": spec.kernel.__name__.strip("_"), "arch": arch, "num_warps": spec.options["num_warps"],
        "pointers": {name: ty for name, ty in spec.signature.items() if ty.startswith("*")},
        "constexprs": {k: v for k, v in constexprs.items() if k.isupper()},
        "specialized_to_constant": {k: v for k, v in constexprs.items() if not k.isupper()},
        "int_args": ints,
    }
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs),
                                  target=GPUTarget("cuda", arch, 32), options=spec.options)
    except Exception as error:  # noqa: BLE001 - the gate reports every failure
        return {**row, "compiled": False, "error": f"{type(error).__name__}: {str(error)[:2000]}"}
    seconds = round(time.perf_counter() - start, 2)
    cubin = workdir / f"{row['kernel']}_{arch}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = resource_usage(cubin)
    return {
        **row, "compiled": True, "registers": usage["REG"],
        "spill_bytes": usage["STACK"] + usage["LOCAL"], "stack_bytes": usage["STACK"],
        "shared_bytes": compiled.metadata.shared, "shared_limit": SHARED_LIMIT.get(arch),
        "sass_instructions": sass_instructions(cubin), "compile_seconds": seconds,
    }


def problems(row: dict) -> List[str]:
    """Why a row fails the gate (empty when it passes)."""
    if not row["compiled"]:
        return [row["error"].splitlines()[0]]
    out = []
    if row["spill_bytes"]:
        out.append(f"{row['spill_bytes']} bytes of local memory (stack frame: spills) per thread")
    if row["shared_limit"] is not None and row["shared_bytes"] > row["shared_limit"]:
        out.append(f"{row['shared_bytes']} bytes of shared memory > {row['shared_limit']}")
    return out


def _compile_share(specs: Sequence[Tuple[int, CompileSpec, int]], results: "multiprocessing.Queue") -> None:
    """A forked worker: compile its share of (index, spec, arch) and put (index, row) on ``results``."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec, arch in specs:
            results.put((i, compile_row(spec, arch, Path(tmp))))


def compile_rows(specs: Sequence[Tuple[CompileSpec, int]], jobs: int) -> Iterator[Tuple[int, dict]]:
    """(index, ``compile_row``) of every (spec, arch) in completion order, ``jobs`` forked processes compiling at
    once (1: in this process, in order). A worker that dies loses its remaining specs: they come back as failed rows."""
    if jobs <= 1:
        with tempfile.TemporaryDirectory() as tmp:
            for i, (spec, arch) in enumerate(specs):
                yield i, compile_row(spec, arch, Path(tmp))
        return
    ctx = multiprocessing.get_context("fork")  # forked: the workers inherit the specs, nothing is pickled but rows
    results = ctx.Queue()
    workers = [ctx.Process(target=_compile_share, args=([(i, *specs[i]) for i in range(j, len(specs), jobs)], results), daemon=True)
               for j in range(min(jobs, len(specs)))]
    for w in workers:
        w.start()
    pending = set(range(len(specs)))
    while pending:
        try:
            i, row = results.get(timeout=1)
        except queue.Empty:
            if any(w.is_alive() for w in workers):
                continue
            break
        pending.discard(i)
        yield i, row
    for w in workers:
        w.join()
    for i in sorted(pending):
        spec, arch = specs[i]
        yield i, {"kernel": spec.kernel.__name__.strip("_"), "arch": arch, "num_warps": spec.options["num_warps"],
                  "pointers": {n: t for n, t in spec.signature.items() if t.startswith("*")}, "constexprs": {},
                  "specialized_to_constant": {}, "int_args": {}, "compiled": False, "error": "compile worker died (see its output above)"}


def compile_all(cases: Sequence[Case], archs: Sequence[int], log=print, jobs: int = 1) -> List[dict]:
    """One row per distinct compile key and arch, with the launches that share it; ``jobs`` compiles at a time."""
    groups: Dict[Tuple[int, str], Tuple[CompileSpec, List[Case]]] = {}
    per_bucket: Dict[tuple, set] = defaultdict(set)  # (bucket, arch) -> compile keys
    for case in cases:
        for arch in archs:
            spec = compile_spec(case.launch, arch)
            groups.setdefault((arch, spec.key), (spec, []))[1].append(case)
            per_bucket[case.bucket, arch].add(spec.key)
    entries = list(groups.items())
    rows: List[Optional[dict]] = [None] * len(entries)
    for done, (i, row) in enumerate(compile_rows([(spec, arch) for (arch, _), (spec, _) in entries], jobs)):
        (arch, _), (spec, members) = entries[i]
        row.update(
            key=spec.key, launches=len(members), example=members[0].describe(),
            presets=sorted({c.preset for c in members}, key=PRESETS.index),
            max_variants_per_bucket=max(len(per_bucket[c.bucket, arch]) for c in members),
        )
        rows[i] = row
        state = "; ".join(problems(row)) or f"{row['registers']} regs, {row['sass_instructions']} SASS"
        log(f"[{done + 1}/{len(groups)}] sm_{arch} {row['kernel']} {row['constexprs']} w{row['num_warps']}: {state}")
    return rows


def markdown(rows: Sequence[dict]) -> str:
    """Summary per kernel and arch, then one line per compiled configuration."""
    lines = ["# AOT compile of the Triton kernels", "",
             "Generated by `python bench/aot_compile.py --arch 80 90 --out bench/results/aot` (CPU, triton "
             f"{triton.__version__}); spill = local memory bytes per thread, stack frame included (`cuobjdump -res-usage` "
             "STACK + LOCAL; ptxas puts spills in the stack frame), shared = Triton's shared memory per block.", "",
             "| kernel | arch | configs | failed | max registers | spilling | max shared (B) | max SASS | max compiles per bucket |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kernel in sorted({r["kernel"] for r in rows}):
        for arch in sorted({r["arch"] for r in rows}):
            sel = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch]
            ok = [r for r in sel if r["compiled"]]
            if not sel:
                continue
            lines.append(
                f"| {kernel} | sm_{arch} | {len(sel)} | {len(sel) - len(ok)} | {max((r['registers'] for r in ok), default='-')} | "
                f"{sum(1 for r in ok if r['spill_bytes'])} | {max((r['shared_bytes'] for r in ok), default='-')} | "
                f"{max((r['sass_instructions'] for r in ok), default='-')} | {max(r['max_variants_per_bucket'] for r in sel)} |"
            )
    lines += ["", "| kernel | arch | input | constexprs | warps | int args (/16 = divisible) | regs | spill | shared | SASS | compile s | launches | example |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        ints = ", ".join(f"{k}:{v}" for k, v in r["int_args"].items())
        ones = ", ".join(f"{k}={v}" for k, v in r["specialized_to_constant"].items())
        if r["compiled"]:
            res = f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | {r['sass_instructions']} | {r['compile_seconds']}"
        else:
            res = "FAILED | | | |"
        lines.append(f"| {r['kernel']} | sm_{r['arch']} | {next(iter(r['pointers'].values()))} | {consts} | {r['num_warps']} | {ints}; const {ones} | {res} | {r['launches']} | {r['example']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    ap.add_argument("--out", default="bench/results/aot", help="writes aot_kernels.json and aot_kernels.md here")
    ap.add_argument("--quick", action="store_true", help="one configuration per kernel (the CI test)")
    ap.add_argument("--dtypes", nargs="+", choices=[str(d).removeprefix("torch.") for d in DTYPES], default=None,
                    help="input dtypes of the full set (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="compiles at a time, in forked processes (default 1)")
    args = ap.parse_args(argv)
    dtypes = DTYPES if args.dtypes is None else [getattr(torch, d) for d in args.dtypes]
    cases = quick_cases() if args.quick else [
        *guidance_cases(PRESETS, BATCHES, dtypes), *sampling_cases(PRESETS, BATCHES, dtypes)
    ]
    print(f"{len(cases)} launches -> compiling for sm_{', sm_'.join(map(str, args.arch))}", flush=True)
    rows = compile_all(cases, args.arch, log=lambda line: print(line, flush=True), jobs=args.jobs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aot_kernels.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "aot_kernels.md").write_text(markdown(rows))
    failures = [(r, p) for r in rows for p in problems(r)]
    for r, p in failures:
        print(f"FAIL sm_{r['arch']} {r['kernel']} {r['constexprs']} ({r['example']}): {p}", file=sys.stderr)
    print(f"{len(rows)} configurations, {len(failures)} problems; wrote {out}/aot_kernels.json and .md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
