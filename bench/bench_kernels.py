"""Kernel benchmarks at VAR-d16 shapes: fused CFG+SSG guidance and the top-k/top-p sampler; at Infinity-2B shapes:
guidance fused with the bit draw.

* guidance: ``ssg_guidance_triton`` (one pass, prior tile in registers) vs the unfused
  PyTorch path (upstream CFG ``(1+t)*l[:B] - t*l[B:]``, a ``torch.matmul`` prior, SSG);
* sampler: ``sample_logits_triton`` vs upstream VAR's sampler written inline below
  (``topk`` threshold mask, ascending sort / softmax / cumsum top-p mask, softmax,
  ``torch.multinomial``);
* bits: ``guide_sample_bits_triton`` (guidance + one Bernoulli draw per bit, uint8 bits) vs the Engine's path before
  the fusion (``ssg_guidance_triton``, the non-finite flag, ``sample_logits_triton`` on 2-way rows, int64 tokens) on
  Infinity-2B's 1M schedule (d = 32 bits, V = 64 channels), bf16 logits and an fp32 prev as under the Engine's autocast;

at every scale of patch_nums (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), V=4096, B in {1, 16, 64},
plus a 4096 x 4096 sampler case; and the block GEMMs with fused epilogues:

* matmul_gelu: ``matmul_gelu_triton`` (fc1 + bias + tanh-GELU, one launch) vs the eager FFN ``F.gelu(F.linear(...))``;
* matmul_gated_residual: ``matmul_gated_residual_triton`` (out-projection / fc2 + bias + ``residual + gamma * y``) vs
  the blocks' eager ``residual + F.linear(...).mul_(gamma)``;

each also against the same cuBLAS matmul without bias or epilogue (``matmul_ms``; the target is
``fused_ms / matmul_ms`` ~ 1.0), with TFLOP/s (2 M N K) and kernel launches per call (``torch.profiler``), at
VAR-d16 / d30 (fp32 and bf16) and Infinity-2B (bf16 linears, fp32 residual) at a middle and the last scale,
B in {1, 16, 64} (2B rows; cases over 128 Ki rows are skipped). CUDA-event timing, median of ``--reps`` after
``--warmup``, warm L2, eager launches.

Byte model (the minimum each op must move; used for GB/s of both implementations):
  guidance = logits (2B*N*V*s) + prev (B*M*V*s) + operator (N*M*4) + guided and cfg (2*B*N*V*4)
  sampler  = logits (R*V*s) + tokens (R*8)
  bits     = logits (2B*N*V*s) + prev (B*M*V*4) + operator (N*M*4) + cfg (B*N*V*4) + bits (B*N*V/2)
  gemm     = x (M*K*s) + weight (N*K*s) + bias (N*s) + out (M*N*o) [+ residual (M*N*o) + gamma (2B*N*o)]
where s is the input element size. %copy compares with a measured 1 GiB device-to-device
copy (2 bytes moved per byte copied).

    python bench/bench_kernels.py --out bench/results/kernels.json          # on a GPU
    TRITON_INTERPRET=1 python bench/bench_kernels.py --smoke --out /tmp/k.json  # CPU: correctness only

``--smoke`` (the default without CUDA) runs tiny shapes on the Triton interpreter and
checks the kernels against the baselines; it records no timings. ``--rows`` appends JSON Lines
(``bench/rows.py``): the run's settings first, then each case's row as soon as it is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Callable, Dict, List, Optional

import torch

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VOCAB = 4096
BATCHES = (1, 16, 64)
CFG_T, BETA = 4.0, 0.5
TOP_K, TOP_P, TEMPERATURE = 900, 0.95, 1.0
BITS_D, BITS_BATCHES = 32, (16,)  # Infinity-2B: d = 32 bits per token; one batch keeps the device step short
# (preset, C, FFN hidden, (middle, last) scale tokens, x dtype, residual dtype): VAR's patch_nums 8 and 16,
# Infinity-2B's 1M schedule at 21 x 21 (scale 7) and 64 x 64 (scale 12)
GEMM_MODELS = (
    ("d16", 1024, 4096, (64, 256), torch.float32, torch.float32),
    ("d16", 1024, 4096, (64, 256), torch.bfloat16, torch.bfloat16),
    ("d30", 1920, 7680, (64, 256), torch.bfloat16, torch.bfloat16),
    ("infinity_2b", 2048, 8192, (441, 4096), torch.bfloat16, torch.float32),
)
GEMM_MAX_ROWS = 128 * 1024


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write results as JSON here (at the end)")
    p.add_argument("--rows", default=None, help="append JSON Lines here: the run, then each row as it is measured")
    p.add_argument("--smoke", action="store_true", default=None, help="interpreter, tiny shapes, no timings")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    if args.smoke is None:
        args.smoke = not torch.cuda.is_available()
    return args


# ---- baselines ------------------------------------------------------------------------


def guidance_unfused(logits_2B, prev, operator, t: float, beta: float):
    """Upstream CFG, then a separate prior matmul and the SSG update (each a kernel)."""
    B = logits_2B.shape[0] // 2
    cfg = (1 + t) * logits_2B[:B] - t * logits_2B[B:]
    if prev is None:
        return cfg.clone(), cfg
    prior = torch.matmul(operator, prev)
    return cfg + beta * (cfg - prior), cfg


def sample_upstream(logits, top_k: int, top_p: float, temperature: float, generator: torch.Generator):
    """Upstream VAR ``sample_with_top_k_top_p_`` on ``logits / temperature`` (one sample per row)."""
    logits = logits.float() / temperature
    if top_k > 0:
        idx_to_remove = logits < logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(idx_to_remove, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        sorted_idx_to_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_idx_to_remove[..., -1:] = False
        logits.masked_fill_(sorted_idx_to_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_idx_to_remove), -torch.inf)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, replacement=True, generator=generator)[:, 0]


# ---- timing ---------------------------------------------------------------------------


def cuda_time_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbps(warmup: int, reps: int) -> float:
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup, reps)
    return 2 * src.numel() * 4 / ms / 1e6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# ---- cases ----------------------------------------------------------------------------


def guidance_cases(smoke: bool) -> List[Dict]:
    patch_nums, batches, vocab = ((1, 2, 3), (1, 3), 67) if smoke else (PATCH_NUMS, BATCHES, VOCAB)
    cases = []
    for B in batches:
        for i, pn in enumerate(patch_nums):
            cases.append(dict(B=B, pn_prev=patch_nums[i - 1] if i else None, pn=pn, V=vocab))
    return cases


def sampler_cases(smoke: bool) -> List[Dict]:
    if smoke:
        return [dict(rows=r, V=v, label=f"{r}x{v}") for r, v in ((4, 67), (9, 300), (1, 4096))]
    cases = [dict(rows=B * pn * pn, V=VOCAB, label=f"B={B} pn={pn}") for B in BATCHES for pn in PATCH_NUMS]
    return cases + [dict(rows=4096, V=VOCAB, label="4096x4096")]


def bits_cases(smoke: bool) -> List[Dict]:
    from ssg_engine.models.infinity import scale_schedule

    schedule, batches, d = (scale_schedule(1.0, 3), (1, 2), 8) if smoke else (scale_schedule(1.0, "1M"), BITS_BATCHES, BITS_D)
    return [dict(B=B, hw_prev=schedule[i - 1] if i else None, hw=hw, V=2 * d) for B in batches for i, hw in enumerate(schedule)]


def run_guidance(case: Dict, args, device: str, copy_gbps: Optional[float]) -> Dict:
    from ssg_engine.kernels.ssg_guidance import ssg_guidance_triton

    B, pn, pn_prev, V = case["B"], case["pn"], case["pn_prev"], case["V"]
    N, M = pn * pn, (pn_prev * pn_prev if pn_prev else 0)
    g = torch.Generator(device=device).manual_seed(B * 100 + pn)
    logits = torch.randn(2 * B, N, V, generator=g, device=device)
    prev = torch.randn(B, M, V, generator=g, device=device) if M else None
    operator = torch.rand(N, M, generator=g, device=device) if M else None
    if operator is not None:
        operator /= operator.sum(1, keepdim=True)
    n_bytes = logits.numel() * 4 + 2 * B * N * V * 4 + ((prev.numel() + operator.numel()) * 4 if M else 0)

    fused = lambda: ssg_guidance_triton(logits, prev, operator, CFG_T, BETA)  # noqa: E731
    fused_tf32 = lambda: ssg_guidance_triton(logits, prev, operator, CFG_T, BETA, allow_tf32=True)  # noqa: E731
    unfused = lambda: guidance_unfused(logits, prev, operator, CFG_T, BETA)  # noqa: E731
    (g_fused, c_fused), (g_ref, c_ref) = fused(), unfused()
    row = dict(op="guidance", **case, N=N, M=M, bytes=n_bytes,
               rel_err_guided=rel_err(g_fused, g_ref), rel_err_cfg=rel_err(c_fused, c_ref))
    if not args.smoke:
        row["rel_err_guided_tf32"] = rel_err(fused_tf32()[0], g_ref)
        for name, fn in (("fused", fused), ("fused_tf32", fused_tf32), ("baseline", unfused)):
            row[f"{name}_ms"] = cuda_time_ms(fn, args.warmup, args.reps)
        add_rates(row, copy_gbps)
    return row


def run_sampler(case: Dict, args, device: str, copy_gbps: Optional[float]) -> Dict:
    from ssg_engine.kernels.sampling import sample_logits_triton, top_k_top_p_mask_reference

    rows, V = case["rows"], case["V"]
    g = torch.Generator(device=device).manual_seed(rows + V)
    logits = torch.randn(rows, V, generator=g, device=device) * 3
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    offset = torch.zeros(1, dtype=torch.int64, device=device)
    generator = torch.Generator(device=device).manual_seed(1234)
    top_k = min(TOP_K, V // 2)
    fused = lambda: sample_logits_triton(logits, top_k, TOP_P, TEMPERATURE, seed, offset)  # noqa: E731
    upstream = lambda: sample_upstream(logits, top_k, TOP_P, TEMPERATURE, generator)  # noqa: E731
    kept = top_k_top_p_mask_reference(logits, top_k, TOP_P, TEMPERATURE)
    row = dict(op="sampler", **case, top_k=top_k, top_p=TOP_P, bytes=rows * V * 4 + rows * 8,
               kernel_in_mask=bool(kept.gather(1, fused()[:, None]).all()),
               baseline_in_mask=bool(kept.gather(1, upstream()[:, None]).all()))
    if not args.smoke:
        row["fused_ms"] = cuda_time_ms(fused, args.warmup, args.reps)
        row["baseline_ms"] = cuda_time_ms(upstream, args.warmup, args.reps)
        add_rates(row, copy_gbps)
    return row


def bits_unfused(logits_2B, prev, operator, seed, offset):
    """The Engine's Infinity pick before the fusion: guidance, the non-finite flag, a 2-way sampler, int64 tokens."""
    from ssg_engine.kernels.sampling import sample_logits_triton
    from ssg_engine.kernels.ssg_guidance import ssg_guidance_triton

    guided, cfg = ssg_guidance_triton(logits_2B, prev, operator, CFG_T, BETA)
    nonfinite = ~torch.isfinite(torch.linalg.vector_norm(guided, float("inf")) / TEMPERATURE)
    B, N, V = guided.shape
    tokens = sample_logits_triton(guided.view(-1, 2), TOP_K, TOP_P, TEMPERATURE, seed, offset).clamp_(0, 1)
    return tokens.view(B, N, V // 2), nonfinite, cfg


def gemm_cases(smoke: bool) -> List[Dict]:
    """fc1 (matmul_gelu), out-projection and fc2 (matmul_gated_residual) per model, scale and batch."""
    models = (("tiny", 40, 100, (1, 5), torch.float32, torch.float32),
              ("tiny", 40, 100, (1, 5), torch.bfloat16, torch.float32)) if smoke else GEMM_MODELS
    cases = []
    for preset, C, hidden, scales, dtype, residual_dtype in models:
        for tokens in scales:
            for B in ((1, 2) if smoke else BATCHES):
                if 2 * B * tokens > GEMM_MAX_ROWS:
                    continue
                common = dict(preset=preset, tokens=tokens, B=B, M=2 * B * tokens, dtype=str(dtype).removeprefix("torch."),
                              residual_dtype=str(residual_dtype).removeprefix("torch."))
                cases.append(dict(op="matmul_gelu", layer="fc1", K=C, N=hidden, **common))
                cases.append(dict(op="matmul_gated_residual", layer="proj", K=C, N=C, **common))
                cases.append(dict(op="matmul_gated_residual", layer="fc2", K=hidden, N=C, **common))
    return cases


def count_launches(fn: Callable[[], object]) -> int:
    """CUDA kernels one call of ``fn`` launches (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run_gemm(case: Dict, args, device: str, copy_gbps: Optional[float]) -> Dict:
    import torch.nn.functional as F

    from ssg_engine.kernels.matmul_gated_residual import matmul_gated_residual_triton
    from ssg_engine.kernels.matmul_gelu import matmul_gelu_triton

    R, l, K, N = 2 * case["B"], case["tokens"], case["K"], case["N"]
    dtype, residual_dtype = getattr(torch, case["dtype"]), getattr(torch, case["residual_dtype"])
    g = torch.Generator(device=device).manual_seed(R * l + K + N)
    x = torch.randn(R, l, K, generator=g, device=device).to(dtype)
    w = (torch.randn(N, K, generator=g, device=device) / K**0.5).to(dtype)
    b = (torch.randn(N, generator=g, device=device) * 0.1).to(dtype)
    out_size = torch.tensor([], dtype=dtype if case["op"] == "matmul_gelu" else residual_dtype).element_size()
    n_bytes = (x.numel() + w.numel() + b.numel()) * x.element_size() + R * l * N * out_size
    if case["op"] == "matmul_gelu":
        fused = lambda: matmul_gelu_triton(x, w, b)  # noqa: E731
        unfused = lambda: F.gelu(F.linear(x, w, b), approximate="tanh")  # noqa: E731
    else:
        residual = torch.randn(R, l, N, generator=g, device=device).to(residual_dtype)
        gamma = (torch.randn(R, 1, 6, N, generator=g, device=device) * 0.2).to(residual_dtype).unbind(2)[1]
        n_bytes += R * l * N * out_size + R * N * out_size
        fused = lambda: matmul_gated_residual_triton(residual, x, w, b, gamma)  # noqa: E731
        unfused = lambda: residual + F.linear(x, w, b).mul_(gamma)  # noqa: E731
    matmul = lambda: torch.matmul(x, w.t())  # noqa: E731
    out, ref = fused(), unfused()
    diff = (out.double() - ref.double()).abs()
    row = dict(case, bytes=n_bytes, flops=2 * R * l * N * K, max_abs_err=diff.max().item(), rel_err=rel_err(out, ref))
    if not args.smoke:
        for name, fn in (("fused", fused), ("baseline", unfused), ("matmul", matmul)):
            row[f"{name}_ms"] = cuda_time_ms(fn, args.warmup, args.reps)
            row[f"{name}_launches"] = count_launches(fn)
        add_rates(row, copy_gbps)
        row["fused_TFLOPs"] = row["flops"] / row["fused_ms"] / 1e9
        row["matmul_TFLOPs"] = row["flops"] / row["matmul_ms"] / 1e9
        row["vs_matmul"] = row["fused_ms"] / row["matmul_ms"]
    return row


def run_bits(case: Dict, args, device: str, copy_gbps: Optional[float]) -> Dict:
    from ssg_engine.kernels.guide_sample_bits import guide_sample_bits_triton

    B, (h, w), V = case["B"], case["hw"], case["V"]
    N, M = h * w, (case["hw_prev"][0] * case["hw_prev"][1] if case["hw_prev"] else 0)
    g = torch.Generator(device=device).manual_seed(B * 100 + N)
    logits = (torch.randn(2 * B, N, V, generator=g, device=device) * 2).to(torch.bfloat16)
    prev = torch.randn(B, M, V, generator=g, device=device) if M else None
    operator = torch.rand(N, M, generator=g, device=device) if M else None
    if operator is not None:
        operator /= operator.sum(1, keepdim=True)
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    offset = torch.zeros(1, dtype=torch.int64, device=device)
    n_bytes = 2 * B * N * V * 2 + B * N * V * 4 + B * N * V // 2 + ((prev.numel() + operator.numel()) * 4 if M else 0)

    fused = lambda: guide_sample_bits_triton(logits, prev, operator, CFG_T, BETA, TOP_K, TOP_P, TEMPERATURE, seed, offset)  # noqa: E731
    unfused = lambda: bits_unfused(logits, prev, operator, seed, offset)  # noqa: E731
    (bits, _, cfg, _), (tokens, _, cfg_ref) = fused(), unfused()
    # same Philox counters and draw rule: equal bits but where one rounding puts a bit across the top-p cut
    row = dict(op="bits", **case, N=N, M=M, bytes=n_bytes, rel_err_cfg=rel_err(cfg, cfg_ref),
               bits_agree=(bits.long() == tokens).float().mean().item())
    if not args.smoke:
        row["fused_ms"] = cuda_time_ms(fused, args.warmup, args.reps)
        row["baseline_ms"] = cuda_time_ms(unfused, args.warmup, args.reps)
        add_rates(row, copy_gbps)
    return row


def add_rates(row: Dict, copy_gbps: float) -> None:
    row["fused_GBps"] = row["bytes"] / row["fused_ms"] / 1e6
    row["fused_pct_copy"] = 100 * row["fused_GBps"] / copy_gbps
    row["baseline_GBps"] = row["bytes"] / row["baseline_ms"] / 1e6
    row["speedup"] = row["baseline_ms"] / row["fused_ms"]


def print_table(results: List[Dict], smoke: bool) -> None:
    if smoke:
        head = f"{'op':9} {'case':26} {'check':>40}"
        print(head)
        for r in results:
            check = (f"rel_err guided {r['rel_err_guided']:.1e} cfg {r['rel_err_cfg']:.1e}" if r["op"] == "guidance"
                     else f"rel_err cfg {r['rel_err_cfg']:.1e} bits agree {r['bits_agree']:.4f}" if r["op"] == "bits"
                     else f"rel_err {r['rel_err']:.1e} max abs {r['max_abs_err']:.1e}" if r["op"].startswith("matmul")
                     else f"in mask: kernel {r['kernel_in_mask']} upstream {r['baseline_in_mask']}")
            print(f"{r['op']:9} {case_label(r):26} {check:>40}")
        return
    print(f"{'op':9} {'case':26} {'fused ms':>9} {'tf32 ms':>8} {'base ms':>9} {'speedup':>8} {'GB/s':>7} {'%copy':>6}")
    for r in results:
        tf32 = f"{r['fused_tf32_ms']:8.3f}" if "fused_tf32_ms" in r else f"{'':8}"
        gemm = (f" {r['fused_TFLOPs']:6.1f} TFLOP/s, {r['vs_matmul']:.2f}x matmul, launches "
                f"{r['fused_launches']}/{r['baseline_launches']}" if "vs_matmul" in r else "")
        print(f"{r['op']:9} {case_label(r):26} {r['fused_ms']:9.3f} {tf32} {r['baseline_ms']:9.3f} "
              f"{r['speedup']:7.2f}x {r['fused_GBps']:7.0f} {r['fused_pct_copy']:5.1f}%{gemm}")


def case_label(r: Dict) -> str:
    if r["op"].startswith("matmul"):
        return f"{r['preset']} {r['layer']} B={r['B']} l={r['tokens']} {r['dtype']}"
    if r["op"] == "guidance":
        scale = f"pn {r['pn_prev']}->{r['pn']}" if r["pn_prev"] else f"pn {r['pn']} no prior"
        return f"B={r['B']} {scale} N={r['N']} M={r['M']}"
    if r["op"] == "bits":
        scale = f"{tuple(r['hw_prev'])}->{tuple(r['hw'])}" if r["hw_prev"] else f"{tuple(r['hw'])} no prior"
        return f"B={r['B']} {scale} d={r['V'] // 2}"
    return f"{r['label']} V={r['V']}"


def main() -> None:
    args = parse_args()
    # interpreter for smoke runs, compiled kernels for timings; set before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1" if args.smoke else "0"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from env_info import environment
    from rows import RowWriter

    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke (interpreter, no timings)")
    copy_gbps = None if args.smoke else copy_bandwidth_gbps(args.warmup, args.reps)
    if copy_gbps is not None:
        print(f"device copy bandwidth: {copy_gbps:.0f} GB/s", flush=True)
    report = dict(
        smoke=args.smoke,
        env=dict(environment(), interpreter=os.environ.get("TRITON_INTERPRET") == "1"),
        settings=dict(cfg_t=CFG_T, beta=BETA, top_k=TOP_K, top_p=TOP_P, temperature=TEMPERATURE,
                      warmup=args.warmup, reps=args.reps, dtype="float32 (bits: bfloat16 logits, float32 prev)"),
        byte_model=dict(
            guidance="2B*N*V*s logits + B*M*V*s prev + N*M*4 operator + 2*B*N*V*4 outputs",
            sampler="R*V*s logits + R*8 tokens",
            bits="2B*N*V*2 bf16 logits + B*M*V*4 prev + N*M*4 operator + B*N*V*4 cfg + B*N*V/2 uint8 bits",
            gemm="M*K*s x + N*K*s weight + N*s bias + M*N*o out [+ M*N*o residual + 2B*N*o gamma]; TFLOP/s = 2*M*N*K",
            copy="2 * 1 GiB per device-to-device copy",
        ),
        copy_bandwidth_GBps=copy_gbps,
    )
    lines = RowWriter(args.rows)
    lines.write("run", **report)
    results = []
    for run, cases in ((run_guidance, guidance_cases(args.smoke)), (run_sampler, sampler_cases(args.smoke)),
                       (run_bits, bits_cases(args.smoke)), (run_gemm, gemm_cases(args.smoke))):
        for case in cases:
            results.append(run(case, args, device, copy_gbps))
            lines.write("row", **results[-1])
    print_table(results, args.smoke)
    report["results"] = results
    lines.write("done")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
