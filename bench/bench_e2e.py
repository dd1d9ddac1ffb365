"""End-to-end sampling throughput of four methods, side by side:

* ``upstream_shaped``: shaped like upstream VAR's inference (its demo): float32 weights under float16 autocast with
  the cast cache on (the demo freezes its weights, and autocast caches only casts of weights that require grad, so
  every use re-casts, as there), the AdaLN conditioning recomputed at every scale, a ``torch.cat`` KV cache
  (``sample_reference(per_scale_conditioning=True)`` on a float32 copy of the model). "x upstream" means this arm.
* ``reference_eager``: our reference loop (``sample_reference``: conditioning once per batch, ``torch.cat`` cache) on
  the bf16 weights, under bf16 autocast;
* ``compiled_reference`` (GPU only): what a user would pick instead of the Engine: the reference loop with every
  transformer block under ``torch.compile(mode="max-autotune-no-cudagraphs", dynamic=True)`` (``--compile-mode``;
  one compiled function shared by the blocks, called by a ``step`` that replaces the model's, over the same
  ``torch.cat`` KV cache; head, guidance, sampling and decode eager as in ``reference_eager``), bf16 weights
  without autocast (its VQ-VAE float32). Each (B, SSG) set first calls it once untimed (compile or recompile +
  run: ``first_call_seconds`` of its rows);
  on CPU (``--cpu``, ``--smoke``) the arm is skipped (Inductor's C++ compile of the block takes minutes there);
* ``engine_eager`` / ``engine_graphs``: the Engine without / with CUDA graphs.

GPU: VAR-d16 and VAR-d30 shapes with random bf16 weights, B in {1, 16, 64}, cfg 1.5, top-k 900,
top-p 0.96, SSG off and on (the summary: each arm's speed-up vs upstream_shaped, and the Engine's vs
compiled_reference); images/s end to end (transformer + VAE decode) and transformer only
(end to end minus the method's own VQ-VAE decode time), against the analytic floor
(``ssg_engine.costs``: per-stage roofline at the measured bf16 matmul rate and copy bandwidth).
The decode is timed per method in that method's dtype, on the same random latent: the two eager loops decode
a float32 VQ-VAE under their autocast, the Engine in ``engine.vae_dtype`` (its decoder, channels-last).
A transformer-only time that would be zero or negative (decode measured longer than the whole run: noise) is
reported as null with a ``note``. A batch size that runs out of device memory is a ``"skipped"`` row (with the
error), and the next model still runs.
CPU (``--cpu``): the shipped Fashion-MNIST model in float32, the eager loops vs Engine (no graphs) side by
side in one run, B in {1, 4, 16, 64}, no autocast; the summary holds the throughput ratios.
``--smoke``: the golden tiny model, no speed claims (its floor is the H200 datasheet's, to exercise the code).

Each row is written as soon as it is measured: to ``--out`` (atomically: the file is always complete JSON,
``"complete": false`` until the end) and appended to ``--rows`` (JSON Lines, ``bench/rows.py``: a ``run`` line with
the settings, rates and floor GPU, one ``row`` per measurement, ``done`` at the end), so a run stopped by a
timeout keeps what it measured.

    python bench/bench_e2e.py --out bench/results/e2e.json                 # GPU
    python bench/bench_e2e.py --models d16 --rows OUT/e2e.jsonl            # GPU, one model, rows as they come
    python bench/bench_e2e.py --cpu --out bench/results/e2e_cpu.json       # CPU: Engine vs reference sampler
    python bench/bench_e2e.py --smoke --out /tmp/e2e_smoke.json            # CPU smoke test
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env_info import environment  # noqa: E402
from rows import RowWriter  # noqa: E402

from ssg_engine import SSG, ModelConfig, costs, load_models, random_models, sample_reference  # noqa: E402
from ssg_engine.engine import Engine  # noqa: E402
from ssg_engine.files import atomic_write_json  # noqa: E402
from ssg_engine.kernels.qkv_norm_rope_cache import qkv_norm_rope_reference  # noqa: E402
from ssg_engine.pretrained import SAMPLING, load_pretrained  # noqa: E402

GOLDEN_TINY = Path(__file__).resolve().parents[1] / "tests" / "golden" / "var_tiny"
UPSTREAM = "upstream_shaped"  # the method "x upstream" ratios divide by
# autocast of each eager loop on CUDA (upstream's demo: float16; our reference loop: bf16); the Engine runs without
AUTOCAST = {"upstream_shaped": torch.float16, "reference_eager": torch.bfloat16}


COMPILED = "compiled_reference"
ENGINES = ("engine_eager", "engine_graphs")


def compiled_reference(var, mode: Optional[str], backend: str = "inductor"):
    """A shallow copy of ``var`` whose ``step`` runs each block through one ``torch.compile``'d function (shared by
    the blocks: their weights are its inputs, ``dynamic=True`` over batch, scale and cache length), with upstream's
    ``torch.cat`` KV cache (the reference sampler's ``ConcatKVCache``, whose lists it reads and sets); for
    ``sample_reference``. The first calls compile (``backend``, ``mode``; the tests trace with ``backend="eager"``)."""
    import torch._dynamo

    # one graph per (cache empty / one token / longer) specialisation, a few batch sizes: stay below the limit
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    @torch.compile(mode=mode, backend=backend, dynamic=True)
    def block_fn(block, x, mod, constants, k_past, v_past):
        new = []

        def attend(h):
            bias, scale_mul = constants
            q, k, v = qkv_norm_rope_reference(block.attn.qkv_linear(h, bias), block.attn.num_heads, scale_mul)
            if k_past is not None:
                k, v = torch.cat((k_past, k), dim=2), torch.cat((v_past, v), dim=2)
            new.append((k, v))
            return block.attn.attend(q, k, v, None)

        x = block.forward_modulated(x, mod, attend)
        return x, *new[0]

    def step(self, state, si: int, kv) -> torch.Tensor:
        x = state.x
        for layer, block in enumerate(self.blocks):
            x, kv.k[layer], kv.v[layer] = block_fn(block, x, state.modulations[layer], state.attn_constants[layer], kv.k[layer], kv.v[layer])
        return self.head(self.head_nm.ln_wo_grad(x).mul(state.head_scale.add(1)).add_(state.head_shift))

    model = copy.copy(var)  # shares the modules and weights; its own ``step`` and VQ-VAE link
    model.step = types.MethodType(step, model)
    return model


def timed(fn: Callable[[], object], repeats: int, warmup: int, cuda: bool) -> float:
    """Median wall seconds of ``fn``, synchronising the GPU around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timed_side_by_side(runs: Dict[str, Callable[[], object]], repeats: int, warmup: int, cuda: bool) -> Dict[str, float]:
    """Median seconds of each run, the runs interleaved repeat by repeat so that they share the machine's noise
    (each eager loop under its ``AUTOCAST`` dtype on CUDA, the cast cache on as in upstream's demo)."""
    def run(method: str) -> float:
        dtype = AUTOCAST.get(method, torch.bfloat16)
        with torch.autocast("cuda", dtype=dtype, enabled=cuda and method in AUTOCAST, cache_enabled=True):
            return timed(runs[method], 1, 0, cuda)

    for method in runs:
        for _ in range(warmup):
            run(method)
    times: Dict[str, List[float]] = {method: [] for method in runs}
    for _ in range(repeats):
        for method in runs:
            times[method].append(run(method))
    return {method: statistics.median(t) for method, t in times.items()}


def analytic_floor(cfg: ModelConfig, B: int, gpu: costs.GPU, ssg: bool = False, vae_dtype: torch.dtype = torch.bfloat16) -> Dict[str, float]:
    """Lower bound on the time per batch: ``ssg_engine.costs``' roofline (per stage max(FLOPs / peak,
    bytes / bandwidth), summed) of the bf16 transformer on ``gpu``; ``seconds`` without the VQ-VAE decode,
    ``decode_seconds`` the decode's floor in ``vae_dtype``."""
    stages = costs.stage_costs(cfg, B, torch.bfloat16, ssg=ssg, vae_dtype=vae_dtype)
    floor = costs.roofline([s for s in stages if s.stage != "decode"], gpu)
    decode = costs.roofline([s for s in stages if s.stage == "decode"], gpu)
    return {
        "seconds": floor.seconds, "decode_seconds": decode.seconds, "images_per_s": B / floor.seconds,
        "images_per_s_with_decode": B / (floor.seconds + decode.seconds), "tflop": floor.flops / 1e12, "gbytes": floor.bytes / 1e9,
    }


def measured_gpu(rates: Dict[str, float]) -> costs.GPU:
    """The roofline GPU at the measured bf16 matmul rate and copy bandwidth, the other peaks (TF32, fp32) scaled in
    proportion from the H100's."""
    return costs.GPUS["h100"].scaled(rates["bf16_matmul_tflops"] * 1e12, rates["copy_gbytes_per_s"] * 1e9)


def measure_rates(device: str) -> Dict[str, float]:
    """Measured bf16 matmul FLOP/s and device copy bandwidth (bytes read + written per second)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = timed(lambda: a @ a, 10, 3, True)
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    tc = timed(lambda: y.copy_(x), 10, 3, True)
    return {"bf16_matmul_tflops": 2 * 8192**3 / t / 1e12, "copy_gbytes_per_s": 2 * x.numel() / tc / 1e9}


def bench_model(
    name: str, vae, var, batches: List[int], device: str, repeats: int, warmup: int, floor_gpu: Optional[costs.GPU],
    top_k: int = 900, on_row: Callable[[dict], None] = lambda row: None, compile_mode: Optional[str] = None,
) -> List[dict]:
    """Rows (model, B, SSG off/on, method) of end-to-end and transformer-only throughput; each row is handed to
    ``on_row`` as soon as it is measured. A batch size that runs out of device memory is handed over as a
    ``"skipped"`` row instead (``kind`` key) and the larger ones are not tried. ``compile_mode`` (CUDA only) adds
    the ``compiled_reference`` arm with that ``torch.compile`` mode."""
    cuda = device.startswith("cuda")
    rows = []
    compiled = compiled_reference(var, compile_mode) if cuda and compile_mode else None
    # the eager loops decode their own VQ-VAE as loaded (float32; under autocast on CUDA): copied before the Engines
    # cast the shared one's decoder to their vae dtype
    upstream_vae = copy.deepcopy(vae)
    upstream_var = copy.deepcopy(var).float()  # upstream's float32 weights (frozen, as its demo freezes them)
    engines = {
        "engine_eager": Engine(var, vae, max_batch=max(batches), device=device, dtype=var.head.weight.dtype, cuda_graphs=False),
    }
    if cuda:
        engines["engine_graphs"] = Engine(var, vae, max_batch=max(batches), device=device, dtype=var.head.weight.dtype, cuda_graphs=True)
    vaes = {UPSTREAM: upstream_vae, "reference_eager": upstream_vae, **{ename: eng.vae for ename, eng in engines.items()}}
    models = {UPSTREAM: upstream_var}
    if compiled is not None:
        vaes[COMPILED], models[COMPILED] = upstream_vae, compiled
    decode_dtype = {method: f"{str(AUTOCAST[method]).removeprefix('torch.')} (autocast)" if cuda
                    else str(upstream_vae.post_quant_conv.weight.dtype).removeprefix("torch.") for method in AUTOCAST}
    engine_vae_dtype = torch.float32
    for ename, eng in engines.items():
        engine_vae_dtype = getattr(eng, "vae_dtype", torch.float32)
        decode_dtype[ename] = str(engine_vae_dtype).removeprefix("torch.")
    if compiled is not None:
        decode_dtype[COMPILED] = str(upstream_vae.post_quant_conv.weight.dtype).removeprefix("torch.")

    def with_vae(method: str, fn: Callable[[], object]) -> Callable[[], object]:
        """``fn`` with the method's VQ-VAE attached to the method's VAR (its decode step uses it)."""
        def run():
            models.get(method, var).attach_vae(vaes[method])
            return fn()
        return run

    def decode(method: str, f_hat: torch.Tensor) -> Callable[[], object]:
        """The method's decode step (``VARTransformer.decode``) on a latent: in its VQ-VAE's dtype."""
        model = vaes[method]
        f_in = f_hat.to(model.post_quant_conv.weight.dtype)
        return lambda: model.fhat_to_img(f_in).float().add_(1).mul_(0.5)

    top_k = min(top_k, var.V)

    def sample(B: int, labels: torch.Tensor, ssg: Optional[SSG]) -> Dict[str, Callable[[], object]]:
        settings = dict(seed=0, cfg=1.5, top_k=top_k, top_p=0.96, ssg=ssg)
        runs = {
            UPSTREAM: lambda: sample_reference(upstream_var, B, labels, per_scale_conditioning=True, **settings),
            "reference_eager": lambda: sample_reference(var, B, labels, **settings),
        }
        if compiled is not None:
            runs[COMPILED] = lambda: sample_reference(compiled, B, labels, **settings)
        for ename, eng in engines.items():
            runs[ename] = lambda eng=eng: eng.generate(labels, **settings)
        return {method: with_vae(method, fn) for method, fn in runs.items()}

    def measure(B: int) -> None:
        labels = torch.arange(B, device=device) % var.num_classes
        f_hat = torch.randn(B, var.Cvae, var.patch_nums[-1], var.patch_nums[-1], device=device)
        with torch.inference_mode():
            decode_s = timed_side_by_side({method: decode(method, f_hat) for method in vaes}, repeats, warmup, cuda)
        for ssg_name, ssg in (("off", None), ("on", SSG(beta=0.5))):
            runs = sample(B, labels, ssg)
            compile_s = None
            if COMPILED in runs:  # compiles (or recompiles for a new shape) before the timed set, untimed there
                compile_s = timed(runs[COMPILED], 1, 0, cuda)
            seconds = timed_side_by_side(runs, repeats, warmup, cuda)
            floor = analytic_floor(var.config, B, floor_gpu, ssg is not None, engine_vae_dtype) if floor_gpu else None
            for method, s in seconds.items():
                row = measured_row(name, B, ssg_name, method, s, decode_s[method], decode_dtype[method], floor)
                if method == COMPILED:
                    row["compile_mode"], row["first_call_seconds"] = compile_mode, compile_s  # the first call: compile + run
                rows.append(row)
                on_row(row)
                print(row_line(row), flush=True)

    try:
        for B in batches:
            try:
                measure(B)
                continue
            except torch.cuda.OutOfMemoryError as error:
                note = f"out of device memory at B={B} ({str(error).splitlines()[0][:200]}); larger batches not tried"
            torch.cuda.empty_cache()  # after the except block, whose traceback held the failed run's tensors
            on_row({"kind": "skipped", "model": name, "B": B, "note": note})
            print(f"{name} B={B}: {note}", flush=True)
            break
    finally:
        var.attach_vae(vae)
    return rows


def measured_row(model: str, B: int, ssg: str, method: str, seconds: float, decode_s: float, decode_dtype: str,
                 floor: Optional[Dict[str, float]]) -> dict:
    """One result row: end to end, the method's decode, transformer only (null, with a note, when the decode
    measured as long as the whole run), and the floor with the fractions of it reached."""
    transformer_s = seconds - decode_s
    row = {
        "kind": "row", "model": model, "B": B, "ssg": ssg, "method": method, "seconds": seconds, "images_per_s": B / seconds,
        "decode_seconds": decode_s, "decode_dtype": decode_dtype,
        "transformer_only_seconds": transformer_s if transformer_s > 0 else None,
        "transformer_only_images_per_s": B / transformer_s if transformer_s > 0 else None,
    }
    if transformer_s <= 0:
        row["note"] = (f"decode ({decode_s * 1e3:.3f} ms) measured as long as the whole run ({seconds * 1e3:.3f} ms): "
                       "timing noise, no transformer-only figure")
    if floor:
        row["floor_images_per_s"] = floor["images_per_s"]
        row["floor_images_per_s_with_decode"] = floor["images_per_s_with_decode"]
        row["fraction_of_floor"] = row["transformer_only_images_per_s"] / floor["images_per_s"] if transformer_s > 0 else None
        row["fraction_of_floor_with_decode"] = row["images_per_s"] / floor["images_per_s_with_decode"]
    return row


def row_line(row: dict) -> str:
    t = row["transformer_only_images_per_s"]
    line = (f"{row['model']:6s} B={row['B']:3d} ssg={row['ssg']:3s} {row['method']:15s} {row['seconds'] * 1e3:10.2f} ms "
            f"{row['images_per_s']:10.2f} img/s  decode {row['decode_seconds'] * 1e3:8.2f} ms ({row['decode_dtype']})  "
            f"transformer only {'-' if t is None else f'{t:.2f}'} img/s")
    if "floor_images_per_s" in row:
        frac = row["fraction_of_floor"]
        line += f"  floor {row['floor_images_per_s']:.1f} img/s ({'-' if frac is None else f'{frac:.1%}'})"
    return line


def summarize(rows: List[dict]) -> Dict[str, float]:
    """Speedups of the other methods vs the upstream-shaped loop, and SSG overhead, per (model, B)."""
    out = {}
    get = {(r["model"], r["B"], r["ssg"], r["method"]): r["seconds"] for r in rows if r.get("kind", "row") == "row"}
    for (model, B, ssg, method), s in get.items():
        if method == UPSTREAM and ssg == "off":
            for m in ("reference_eager", COMPILED, *ENGINES):
                for setting in ("off", "on"):
                    if (model, B, setting, m) in get and (model, B, setting, UPSTREAM) in get:
                        suffix = "" if setting == "off" else "_ssg"
                        out[f"{model}_B{B}_{m}{suffix}_speedup_vs_upstream"] = get[(model, B, setting, UPSTREAM)] / get[(model, B, setting, m)]
        if method == COMPILED:
            for m in ENGINES:
                if (model, B, ssg, m) in get:
                    suffix = "" if ssg == "off" else "_ssg"
                    out[f"{model}_B{B}_{m}{suffix}_speedup_vs_{COMPILED}"] = s / get[(model, B, ssg, m)]
        if ssg == "off" and (model, B, "on", method) in get:
            out[f"{model}_B{B}_{method}_ssg_overhead"] = get[(model, B, "on", method)] / s - 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="d16,d30", help="GPU: presets to run (random bf16 weights)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: GPU 1,16,64; --cpu 1,4,16,64; --smoke 1,4)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 5; --smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs per method first (default 2; --smoke 1)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test on the golden tiny model (no speed claims)")
    ap.add_argument("--cpu", action="store_true", help="CPU: the shipped model, reference sampler vs Engine, B 1/4/16/64")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                    help=f"torch.compile mode of the {COMPILED} arm (GPU only); 'off' drops the arm")
    ap.add_argument("--warm-compiled", type=float, default=None, metavar="SECONDS",
                    help=f"only fill Inductor's on-disk caches: call the {COMPILED} arm once per model and batch (no rows), "
                    "stopping before a call that would start after SECONDS (device_check.sh runs this in the background)")
    ap.add_argument("--out", default=None, help="JSON, rewritten (atomically) after every measured row")
    ap.add_argument("--rows", default=None, help="JSON Lines (bench/rows.py), appended: the run, then each row as it is measured")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not (args.smoke or args.cpu)
    device = "cuda" if cuda else "cpu"
    default_batches, default_repeats, default_warmup = ("1,4", 2, 1) if args.smoke and not args.cpu else ("1,4,16,64" if args.cpu else "1,16,64", 5, 2)
    batches = [int(b) for b in (args.batches or default_batches).split(",")]
    repeats = default_repeats if args.repeats is None else args.repeats
    warmup = default_warmup if args.warmup is None else args.warmup
    compile_mode = None if args.compile_mode == "off" else args.compile_mode
    if compile_mode and not cuda:
        print(f"{COMPILED}: skipped (GPU only: Inductor's CPU compile of a block takes minutes)")
    if args.warm_compiled is not None:
        if cuda and compile_mode:
            warm_compiled(args.models.split(","), batches, compile_mode, args.warm_compiled)
        return
    rates, floor_gpu = None, None
    if cuda:
        rates = measure_rates(device)
        print(f"measured: {rates}")
        floor_gpu = measured_gpu(rates)
    elif args.smoke and not args.cpu:
        floor_gpu = costs.GPUS["h200"]  # no speed claim: exercises the floor columns
    report = {
        "smoke": args.smoke, "cpu": not cuda, "complete": False, "environment": environment(), "rates": rates,
        "floor_gpu": None if floor_gpu is None else gpu_dict(floor_gpu),
        "settings": {"batches": batches, "repeats": repeats, "warmup": warmup, "cfg": 1.5, "top_p": 0.96,
                     "compile_mode": compile_mode if cuda else None},
        "rows": [], "summary": {},
    }
    lines = RowWriter(args.rows)
    lines.write("run", **{k: v for k, v in report.items() if k not in ("rows", "summary", "complete")})

    def write() -> None:
        if args.out:
            atomic_write_json(args.out, report)

    def on_row(row: dict) -> None:
        report["rows"].append(row)
        report["summary"] = summarize(report["rows"])
        lines.write(**row)
        write()

    write()
    if cuda:
        for name in args.models.split(","):
            vae, var = random_models(ModelConfig.preset(name), device, torch.bfloat16)
            bench_model(name, vae, var, batches, device, repeats, warmup, floor_gpu, on_row=on_row, compile_mode=compile_mode)
            del vae, var
            torch.cuda.empty_cache()
    elif args.cpu:
        vae, var = load_pretrained()
        bench_model("fmnist", vae, var, batches, device, repeats, warmup, None, top_k=SAMPLING.top_k, on_row=on_row)
    else:
        vae, var = load_models(GOLDEN_TINY / "var.pth", GOLDEN_TINY / "vae.pth", config=GOLDEN_TINY / "config.json")
        bench_model("tiny", vae, var, batches, device, repeats, warmup, floor_gpu, on_row=on_row)
    report["complete"] = True
    write()
    lines.write("done", summary=report["summary"])
    print(json.dumps(report["summary"], indent=1))
    if args.out:
        print(f"wrote {args.out}")


def warm_compiled(models: List[str], batches: List[int], mode: str, seconds: float) -> None:
    """One call of the compiled arm per model and batch size (random bf16 weights, SSG off), so that the timed run
    finds its compiled graphs and autotuning results in Inductor's on-disk caches; stops before a call that would
    start after ``seconds``."""
    start = time.perf_counter()
    for name in models:
        vae, var = random_models(ModelConfig.preset(name), "cuda", torch.bfloat16)
        model = compiled_reference(var, mode)
        model.attach_vae(vae)
        for B in batches:
            if time.perf_counter() - start > seconds:
                print(f"warm {COMPILED}: stopped at {name} B={B} after {seconds:g} s")
                return
            t = time.perf_counter()
            labels = torch.arange(B, device="cuda") % var.num_classes
            sample_reference(model, B, labels, seed=0, cfg=1.5, top_k=min(900, var.V), top_p=0.96)
            torch.cuda.synchronize()
            print(f"warm {COMPILED}: {name} B={B} first call {time.perf_counter() - t:.1f} s", flush=True)
        del vae, var, model
        torch.cuda.empty_cache()


def gpu_dict(gpu: costs.GPU) -> dict:
    return {"name": gpu.name, "bf16_tflops": gpu.bf16_flops / 1e12, "tf32_tflops": gpu.tf32_flops / 1e12,
            "fp32_tflops": gpu.fp32_flops / 1e12, "gbytes_per_s": gpu.bytes_per_s / 1e9}


if __name__ == "__main__":
    main()
