"""Kernel benchmarks at VAR-d16 shapes: fused CFG+SSG guidance and the top-k/top-p sampler; at Infinity-2B shapes:
guidance fused with the bit draw; at VAR-d16/d30 and Infinity-2B shapes: the QKV epilogue.

* guidance: ``ssg_guidance_triton`` (one pass, prior tile in registers) vs the unfused
  PyTorch path (upstream CFG ``(1+t)*l[:B] - t*l[B:]``, a ``torch.matmul`` prior, SSG);
* sampler: ``sample_logits_triton`` vs upstream VAR's sampler written inline below
  (``topk`` threshold mask, ascending sort / softmax / cumsum top-p mask, softmax,
  ``torch.multinomial``);
* bits: ``guide_sample_bits_triton`` (guidance + one Bernoulli draw per bit, uint8 bits) vs the Engine's path before
  the fusion (``ssg_guidance_triton``, the non-finite flag, ``sample_logits_triton`` on 2-way rows, int64 tokens) on
  Infinity-2B's 1M schedule (d = 32 bits, V = 64 channels), bf16 logits and an fp32 prev as under the Engine's autocast;
* qkv: ``qkv_norm_rope_cache_triton`` (one pass) vs the eager sequence it replaces, ``qkv_norm_rope_cache_reference``
  (the models' code: split views, ``F.normalize`` of q and k, ``* scale_mul``, for Infinity the RoPE stack/rotate,
  two cache ``copy_`` and the cast of q) in the Engine's dtype (bf16 activations and caches, fp32 scale_mul and RoPE
  tables) for VAR d16 (H = 16) / d30 (H = 30), D = 64, L2 norm, and Infinity-2B (H = 16, D = 128, L2 norm + RoPE,
  1M square schedule), at a middle and the last scale, 2B rows; launches counted with ``torch.profiler``; error of q
  and k to the float32 reference on the first two rows;

* group_norm_silu: ``group_norm_silu_triton`` (one kernel) vs the eager ``F.silu(F.group_norm(x))`` it replaces,
  bf16 channels-last as the Engine's VAE runs, at the VQ-VAE decoder's GroupNorm shapes (32 groups; 640 ch at
  16x16, 320 at 64x64, 160 at 256x256) for B in {1, 16, 64} and the BSQ VAE's 1024 px layer (128 ch) at B=1;
* adaln: ``ada_ln_modulate_triton`` (LayerNorm without affine + ``* (1 + scale) + shift``, x read once) vs the eager
  chain it replaces, ``F.layer_norm(x).mul(scale.add(1)).add_(shift)`` (4 kernels) in the engine's dtype: VAR d16
  (C = 1024) and d30 (C = 1920) in bf16 at a middle (pn 8) and the last scale (pn 16), B in {1, 16, 64} (2B rows);
  Infinity-2B (C = 2048, fp32 residual stream and modulation, fp32 out as ``ada_layer_norm``; and bf16 out, what the
  next linear reads under autocast) at a middle (24 x 24) and the last 1M scale (64 x 64), B in {1, 16};

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
  qkv      = qkv (2B*l*3*H*D*s) + q, k, v (3*2B*H*l*D*s) + cos/sin (2*l*D/2*4 with RoPE)
  gn_silu  = x (B*C*H*W*s) + out (B*C*H*W*s) + weight and bias (2*C*s)  (the kernel reads x twice: stats, apply)
  adaln    = x (2B*l*C*s) + scale and shift (2*2B*C*s_mod) + out (2B*l*C*s_out)
  gemm     = x (M*K*s) + weight (N*K*s) + bias (N*s) + out (M*N*o) [+ residual (M*N*o) + gamma (2B*N*o)]
where s is the input element size. %copy compares with a measured 1 GiB device-to-device
copy (2 bytes moved per byte copied).

    python bench/bench_kernels.py --out bench/results/kernels.json          # on a GPU
    TRITON_INTERPRET=1 python bench/bench_kernels.py --smoke --out /tmp/k.json  # CPU: correctness only

``--smoke`` (the default without CUDA) runs tiny shapes on the Triton interpreter and
checks the kernels against the baselines; it records no timings (the interpreter truncates float32 -> bfloat16
stores, so adaln's bf16 error to exact is up to 2x what a GPU's round-to-nearest store gives). ``--rows`` appends JSON Lines
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
# (label, heads, head dim, RoPE): VAR d16 / d30 (L2 norm, no RoPE), Infinity-2B (L2 norm + RoPE)
QKV_MODELS = (("var_d16", 16, 64, False), ("var_d30", 30, 64, False), ("infinity_2b", 16, 128, True))
GN_VQ_SHAPES = ((640, 16), (320, 64), (160, 256))  # VQ-VAE decoder (C, H = W) at 256 px: first, middle, last level
GN_BSQ_1024 = (128, 1024)  # BSQ VAE decoder's last level at 1024 px
GN_GROUPS, GN_EPS = 32, 1e-6
ADALN_VAR = (("d16", 1024), ("d30", 1920))  # (preset, C = 64 * depth)
ADALN_VAR_PNS = (8, 16)  # a middle and the last scale of patch_nums
ADALN_INFINITY_C, ADALN_INFINITY_HW, ADALN_INFINITY_BATCHES = 2048, ((24, 24), (64, 64)), (1, 16)  # Infinity-2B, 1M
EPS = 1e-6  # VAR's and Infinity's norm_eps
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


def adaln_unfused(x, scale, shift, out_dtype):
    """The models' eager chain (VAR's ``ln_wo_grad(x).mul(scale1.add(1)).add_(shift1)``, Infinity's
    ``ada_layer_norm``): ``ada_ln_modulate_reference``, one kernel per op."""
    from ssg_engine.kernels.ada_ln_modulate import ada_ln_modulate_reference

    return ada_ln_modulate_reference(x, scale, shift, EPS, out_dtype)


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
    from ssg_engine.families.infinity.model import scale_schedule

    schedule, batches, d = (scale_schedule(1.0, 3), (1, 2), 8) if smoke else (scale_schedule(1.0, "1M"), BITS_BATCHES, BITS_D)
    return [dict(B=B, hw_prev=schedule[i - 1] if i else None, hw=hw, V=2 * d) for B in batches for i, hw in enumerate(schedule)]


def qkv_cases(smoke: bool) -> List[Dict]:
    """A middle and the last scale of each model in QKV_MODELS (smoke: tiny heads on the first 3 scales)."""
    from ssg_engine.families.infinity.model import scale_schedule

    var_scales = [pn * pn for pn in PATCH_NUMS]
    inf_scales = [h * w for h, w in scale_schedule(1.0, "1M")]
    if smoke:
        models, batches, var_scales, inf_scales = (("var_tiny", 2, 8, False), ("infinity_tiny", 2, 24, True)), (1, 3), var_scales[:3], inf_scales[:3]
    else:
        models, batches = QKV_MODELS, BATCHES
    cases = []
    for model, heads, dim, rope in models:
        scales = inf_scales if rope else var_scales
        for B in batches:
            for si in (len(scales) // 2, len(scales) - 1):
                cases.append(dict(model=model, B=B, si=si, l=scales[si], start=sum(scales[:si]), S=sum(scales),
                                  H=heads, D=dim, rope=rope))
    return cases


def gn_silu_cases(smoke: bool) -> List[Dict]:
    if smoke:
        return [dict(model="vqvae", B=B, C=C, H=H, W=H, G=32) for B, C, H in ((1, 96, 5), (3, 160, 4))] + [
            dict(model="bsq", B=1, C=48, H=6, W=6, G=24)]
    cases = [dict(model="vqvae", B=B, C=C, H=H, W=H, G=GN_GROUPS) for B in BATCHES for C, H in GN_VQ_SHAPES]
    return cases + [dict(model="bsq", B=1, C=GN_BSQ_1024[0], H=GN_BSQ_1024[1], W=GN_BSQ_1024[1], G=GN_GROUPS)]


def count_launches(fn: Callable[[], object]) -> int:
    """Kernels one call of ``fn`` launches on the GPU (``torch.profiler``, after a warm call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run_qkv(case: Dict, args, device: str, copy_gbps: Optional[float]) -> Dict:
    from ssg_engine.kernels.qkv_norm_rope_cache import qkv_norm_rope_cache_reference, qkv_norm_rope_cache_triton
    from ssg_engine.families.infinity.model import rope_tables, scale_schedule

    B, l, H, D, start = case["B"], case["l"], case["H"], case["D"], case["start"]
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(B * 1000 + l)
    qkv = (torch.randn(2 * B, l, 3 * H * D, generator=g, device=device) * 3).to(dtype)
    # one layer: a 2B-row cache of every layer would not fit at B = 64 (the layer only offsets the pointer)
    k_cache = torch.zeros(1, 2 * B, H, case["S"], D, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    kwargs = dict(num_heads=H, scale_mul=torch.logspace(0, 2, H, device=device))
    if case["rope"]:
        cos, sin = rope_tables(scale_schedule(1.0, "1M" if not args.smoke else 3), D)
        kwargs["rope"] = (cos[start:start + l].to(device), sin[start:start + l].to(device))
    n_bytes = 6 * 2 * B * l * H * D * qkv.element_size() + (l * D * 4 if case["rope"] else 0)

    fused = lambda: qkv_norm_rope_cache_triton(qkv, k_cache, v_cache, 0, start, **kwargs)  # noqa: E731
    unfused = lambda: qkv_norm_rope_cache_reference(qkv, k_cache, v_cache, 0, start, **kwargs)  # noqa: E731
    window = (0, slice(0, 2), slice(None), slice(start, start + l))
    q = fused()
    k = k_cache[window].clone()
    q_base = unfused()
    k_base = k_cache[window].clone()
    k32 = torch.zeros(1, 2, H, case["S"], D, device=device)
    q32 = qkv_norm_rope_cache_reference(qkv[:2].float(), k32, torch.zeros_like(k32), 0, start, **kwargs)
    row = dict(op="qkv", **case, rows=2 * B, dtype="bfloat16", bytes=n_bytes,
               rel_err_q=rel_err(q[:2], q32), rel_err_k=rel_err(k, k32[window]),
               baseline_rel_err_q=rel_err(q_base[:2], q32), baseline_rel_err_k=rel_err(k_base, k32[window]))
    if not args.smoke:
        row["fused_launches"], row["baseline_launches"] = count_launches(fused), count_launches(unfused)
        row["fused_ms"] = cuda_time_ms(fused, args.warmup, args.reps)
        row["baseline_ms"] = cuda_time_ms(unfused, args.warmup, args.reps)
        add_rates(row, copy_gbps)
    return row


def adaln_cases(smoke: bool) -> List[Dict]:
    """VAR (bf16 in and out) at a middle and the last scale, then Infinity-2B (fp32 x and modulation; fp32 or bf16 out)."""
    if smoke:
        return [dict(model="tiny", C=96, B=1, hw=(1, 1), dtype="bfloat16", out_dtype="bfloat16"),
                dict(model="tiny", C=100, B=3, hw=(5, 4), dtype="float32", out_dtype="bfloat16")]
    cases = [dict(model=preset, C=C, B=B, hw=(pn, pn), dtype="bfloat16", out_dtype="bfloat16")
             for preset, C in ADALN_VAR for pn in ADALN_VAR_PNS for B in BATCHES]
    return cases + [dict(model="infinity_2b", C=ADALN_INFINITY_C, B=B, hw=hw, dtype="float32", out_dtype=out)
                    for hw in ADALN_INFINITY_HW for B in ADALN_INFINITY_BATCHES for out in ("float32", "bfloat16")]


def run_adaln(case: Dict, args, device: str, copy_gbps: Optional[float]) -> Dict:
    from ssg_engine.kernels.ada_ln_modulate import ada_ln_modulate_triton

    R, l, C = 2 * case["B"], case["hw"][0] * case["hw"][1], case["C"]
    dtype, out_dtype = getattr(torch, case["dtype"]), getattr(torch, case["out_dtype"])
    g = torch.Generator(device=device).manual_seed(R * l + C)
    x = (torch.randn(R, l, C, generator=g, device=device) * 2 + 1).to(dtype)
    _, _, scale, _, shift, _ = (torch.randn(R, 1, 6, C, generator=g, device=device) * 0.3).to(dtype).unbind(2)
    out_size = torch.empty((), dtype=out_dtype).element_size()
    n_bytes = x.numel() * x.element_size() + 2 * R * C * scale.element_size() + x.numel() * out_size

    fused = lambda: ada_ln_modulate_triton(x, scale, shift, EPS, out_dtype)  # noqa: E731
    unfused = lambda: adaln_unfused(x, scale, shift, out_dtype)  # noqa: E731
    out, ref = fused(), unfused()
    exact = torch.nn.functional.layer_norm(x.double(), (C,), eps=EPS) * (1 + scale.double()) + shift.double()
    row = dict(op="adaln", **case, R=R, l=l, bytes=n_bytes, rel_err=rel_err(out, ref),
               max_abs_err=(out.double() - ref.double()).abs().max().item(),
               rel_err_exact=((out.double() - exact).norm() / exact.norm()).item(),
               baseline_rel_err_exact=((ref.double() - exact).norm() / exact.norm()).item())
    if not args.smoke:
        row["fused_launches"], row["baseline_launches"] = count_launches(fused), count_launches(unfused)
        row["fused_ms"] = cuda_time_ms(fused, args.warmup, args.reps)
        row["baseline_ms"] = cuda_time_ms(unfused, args.warmup, args.reps)
        add_rates(row, copy_gbps)
    return row


def run_gn_silu(case: Dict, args, device: str, copy_gbps: Optional[float]) -> Dict:
    import torch.nn.functional as F

    from ssg_engine.kernels import record_launches
    from ssg_engine.kernels.group_norm_silu import group_norm_silu_triton

    B, C, H, W, G = (case[k] for k in ("B", "C", "H", "W", "G"))
    g = torch.Generator(device=device).manual_seed(B * 1000 + C + H)
    dtype = torch.bfloat16
    x = (torch.randn(B, C, H, W, generator=g, device=device) * 2 + 0.5).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.rand(C, generator=g, device=device) + 0.5).to(dtype)
    bias = torch.randn(C, generator=g, device=device).to(dtype)
    fused = lambda: group_norm_silu_triton(x, weight, bias, G, GN_EPS)  # noqa: E731
    eager = lambda: F.silu(F.group_norm(x, G, weight, bias, GN_EPS))  # noqa: E731
    with record_launches() as recorder:
        out = fused()
    want = F.silu(F.group_norm(x.float(), G, weight.float(), bias.float(), GN_EPS))
    base = eager()
    row = dict(op="gn_silu", **case, dtype="bfloat16", layout="channels_last", bytes=2 * x.numel() * 2 + 2 * C * 2,
               fused_launches=len(recorder.configs), channels_last_out=out.is_contiguous(memory_format=torch.channels_last),
               rel_err=rel_err(out, want), max_abs_err=(out.float() - want).abs().max().item(),
               baseline_rel_err=rel_err(base, want))
    del want, base
    if not args.smoke:
        row["baseline_launches"] = count_launches(eager)
        row["fused_ms"] = cuda_time_ms(fused, args.warmup, args.reps)
        row["baseline_ms"] = cuda_time_ms(eager, args.warmup, args.reps)
        add_rates(row, copy_gbps)
    return row


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
        head = f"{'op':9} {'case':36} {'check':>40}"
        print(head)
        for r in results:
            check = (f"rel_err guided {r['rel_err_guided']:.1e} cfg {r['rel_err_cfg']:.1e}" if r["op"] == "guidance"
                     else f"rel_err {r['rel_err']:.1e} (eager {r['baseline_rel_err']:.1e})" if r["op"] == "gn_silu"
                     else f"rel_err cfg {r['rel_err_cfg']:.1e} bits agree {r['bits_agree']:.4f}" if r["op"] == "bits"
                     else f"rel_err q {r['rel_err_q']:.1e} k {r['rel_err_k']:.1e} (eager {r['baseline_rel_err_q']:.1e})"
                     if r["op"] == "qkv"
                     else f"to exact: fused {r['rel_err_exact']:.1e} eager {r['baseline_rel_err_exact']:.1e}"
                     if r["op"] == "adaln"
                     else f"rel_err {r['rel_err']:.1e} max abs {r['max_abs_err']:.1e}" if r["op"].startswith("matmul")
                     else f"in mask: kernel {r['kernel_in_mask']} upstream {r['baseline_in_mask']}")
            print(f"{r['op']:9} {case_label(r):36} {check:>40}")
        return
    print(f"{'op':9} {'case':36} {'fused ms':>9} {'tf32 ms':>8} {'base ms':>9} {'speedup':>8} {'GB/s':>7} {'%copy':>6} "
          f"{'launches':>9}")
    for r in results:
        tf32 = f"{r['fused_tf32_ms']:8.3f}" if "fused_tf32_ms" in r else f"{'':8}"
        launches = f"{r['fused_launches']}/{r['baseline_launches']}" if "baseline_launches" in r else ""
        gemm = f" {r['fused_TFLOPs']:6.1f} TFLOP/s, {r['vs_matmul']:.2f}x matmul" if "vs_matmul" in r else ""
        print(f"{r['op']:9} {case_label(r):36} {r['fused_ms']:9.3f} {tf32} {r['baseline_ms']:9.3f} "
              f"{r['speedup']:7.2f}x {r['fused_GBps']:7.0f} {r['fused_pct_copy']:5.1f}% {launches:>9}{gemm}")


def case_label(r: Dict) -> str:
    if r["op"].startswith("matmul"):
        return f"{r['preset']} {r['layer']} B={r['B']} l={r['tokens']} {r['dtype']}"
    if r["op"] == "guidance":
        scale = f"pn {r['pn_prev']}->{r['pn']}" if r["pn_prev"] else f"pn {r['pn']} no prior"
        return f"B={r['B']} {scale} N={r['N']} M={r['M']}"
    if r["op"] == "qkv":
        return f"{r['model']} B={r['B']} l={r['l']} H={r['H']} D={r['D']}"
    if r["op"] == "bits":
        scale = f"{tuple(r['hw_prev'])}->{tuple(r['hw'])}" if r["hw_prev"] else f"{tuple(r['hw'])} no prior"
        return f"B={r['B']} {scale} d={r['V'] // 2}"
    if r["op"] == "gn_silu":
        return f"{r['model']} B={r['B']} C={r['C']} {r['H']}x{r['W']} G={r['G']}"
    if r["op"] == "adaln":
        dtypes = r["dtype"] if r["dtype"] == r["out_dtype"] else f"{r['dtype']}->{r['out_dtype']}"
        return f"{r['model']} B={r['B']} {r['hw'][0]}x{r['hw'][1]} C={r['C']} {dtypes}"
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
                      warmup=args.warmup, reps=args.reps, eps=EPS,
                      dtype="float32 (bits: bfloat16 logits, float32 prev; adaln: per row)"),
        byte_model=dict(
            guidance="2B*N*V*s logits + B*M*V*s prev + N*M*4 operator + 2*B*N*V*4 outputs",
            sampler="R*V*s logits + R*8 tokens",
            bits="2B*N*V*2 bf16 logits + B*M*V*4 prev + N*M*4 operator + B*N*V*4 cfg + B*N*V/2 uint8 bits",
            qkv="2B*l*3*H*D*2 bf16 qkv + 3*2B*H*l*D*2 bf16 q, k, v + l*D*4 cos/sin (RoPE)",
            gn_silu="B*C*H*W*2 bf16 x + B*C*H*W*2 out + 2*C*2 weight and bias (x is read twice by the kernel)",
            adaln="2B*l*C*s x + 2*2B*C*s_mod scale and shift + 2B*l*C*s_out out",
            gemm="M*K*s x + N*K*s weight + N*s bias + M*N*o out [+ M*N*o residual + 2B*N*o gamma]; TFLOP/s = 2*M*N*K",
            copy="2 * 1 GiB per device-to-device copy",
        ),
        copy_bandwidth_GBps=copy_gbps,
    )
    lines = RowWriter(args.rows)
    lines.write("run", **report)
    results = []
    for run, cases in ((run_guidance, guidance_cases(args.smoke)), (run_sampler, sampler_cases(args.smoke)),
                       (run_bits, bits_cases(args.smoke)), (run_qkv, qkv_cases(args.smoke)),
                       (run_gn_silu, gn_silu_cases(args.smoke)), (run_adaln, adaln_cases(args.smoke)),
                       (run_gemm, gemm_cases(args.smoke))):
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
