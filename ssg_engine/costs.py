"""Cost model of one batch of VAR sampling: FLOPs and bytes per stage, and the roofline time on a GPU.

Stages, in the order :class:`ssg_engine.engine.Engine` runs them:

* ``conditioning`` (once): class embeddings, AdaLN modulations of every block and of the head;
* per scale ``k``: ``blocks`` (every transformer block over the scale's ``pn_k**2`` new tokens,
  attention over the KV cache; one block is measured, they are identical in shape), ``head``,
  ``guidance`` (CFG + SSG prior), ``sampling``, ``next input`` (codebook lookup, upsampling,
  phi conv, ``word_embed`` of the next scale);
* ``decode`` (once): VQ-VAE ``post_quant_conv`` + decoder on the final ``f_hat``, in float32.

The transformer runs on ``2B`` rows (classifier-free guidance doubles the batch).

FLOPs are counted, not written down: the engine's stage code runs on meta tensors of a model
built with ``build_models(cfg, "meta")`` under :class:`torch.utils.flop_counter.FlopCounterMode`
(matmuls, convolutions, attention; norms and elementwise ops count 0). Guidance and sampling
are Triton kernels, so they use formulas (:func:`guidance_cost`, :func:`sampling_cost`).

Bytes are an estimate of the traffic of a fused implementation: the inputs (weights included)
and outputs of every linear, convolution, batched matmul and attention call (attention reads
q, K, V and writes its output, as flash attention does), plus the KV-cache append (the new
keys and values read and written once more). Norms, activations and other elementwise ops are
taken as fused into their neighbours (no traffic of their own).

Roofline: a stage takes ``max(FLOPs / peak, bytes / bandwidth)`` with the peak of the precision
it runs in (bf16/fp16 tensor cores for the transformer in half precision, TF32 for the float32
VQ-VAE convolutions, which cuDNN runs in TF32 by default, fp32 CUDA cores for the two Triton
kernels), and the batch takes the sum.

    python -m ssg_engine.costs --preset d16 --batch-size 16 --gpu h200
    python -m ssg_engine.costs --report bench/results/cost_model.md
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig, PRESET_DEPTHS
from .loading import build_models

# The sampler kernel's passes over a row (kernels/sampling.py) for top-k 900 / top-p 0.96 at
# V = 4096: row max/min, 17 top-k and 12 top-p bisection passes on average (Gaussian logits,
# bench/results/aot/README.md), Z, kept mass, the draw. Each is a compare and an add per logit,
# two instructions that issue like FMAs, which the fp32 peak counts as 2 FLOPs each.
SAMPLING_PASSES = 33


@dataclasses.dataclass(frozen=True)
class StageCost:
    """FLOPs and bytes of one stage for the whole batch; ``scale`` is None for once-per-batch stages."""

    stage: str
    scale: Optional[int]
    flops: float
    bytes: float
    precision: str  # the peak that applies: "bf16" (bf16/fp16 tensor cores), "tf32" or "fp32"


@dataclasses.dataclass(frozen=True)
class GPU:
    """Dense peak rates (FLOP/s, no 2:4 sparsity) and DRAM bandwidth (bytes/s)."""

    name: str
    bf16_flops: float  # bf16/fp16 tensor cores, fp32 accumulate
    tf32_flops: float
    fp32_flops: float  # CUDA cores
    bytes_per_s: float

    def peak(self, precision: str) -> float:
        return {"bf16": self.bf16_flops, "tf32": self.tf32_flops, "fp32": self.fp32_flops}[precision]

    def scaled(self, bf16_flops: float, bytes_per_s: float, name: str = "measured") -> "GPU":
        """This GPU at a measured bf16 matmul rate and bandwidth; the other peaks scale with bf16."""
        ratio = bf16_flops / self.bf16_flops
        return GPU(name, bf16_flops, self.tf32_flops * ratio, self.fp32_flops * ratio, bytes_per_s)


# Vendor datasheets list tensor-core rates with sparsity; the dense rate is half of that.
GPUS: Dict[str, GPU] = {
    # https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM: BF16 1,979 TFLOPS sparse, TF32 989 sparse,
    # FP32 67 TFLOPS, 4.8 TB/s HBM3e)
    "h200": GPU("H200 SXM", 989.5e12, 494.5e12, 67e12, 4.8e12),
    # https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM: BF16 1,979 TFLOPS sparse, TF32 989 sparse,
    # FP32 67 TFLOPS, 3.35 TB/s HBM3)
    "h100": GPU("H100 SXM", 989.5e12, 494.5e12, 67e12, 3.35e12),
    # https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
    # (A100 80GB SXM: BF16 312 TFLOPS dense, TF32 156 dense, FP32 19.5 TFLOPS, 2,039 GB/s HBM2e)
    "a100": GPU("A100 SXM 80GB", 312e12, 156e12, 19.5e12, 2.039e12),
    # https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf, appendix table
    # (RTX 4090: BF16 with FP32 accumulate 165.2 TFLOPS dense, TF32 82.6 dense, FP32 82.6 TFLOPS, 1,008 GB/s GDDR6X)
    "rtx4090": GPU("RTX 4090", 165.2e12, 82.6e12, 82.6e12, 1.008e12),
}


class _TrafficCounter(TorchFunctionMode):
    """Bytes read and written by the calls in ``_COUNTED`` (tensor arguments and result)."""

    _COUNTED = (F.linear, F.conv2d, F.scaled_dot_product_attention, torch.bmm)

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self._COUNTED:
            tensors = [a for a in (*args, *(kwargs or {}).values(), out) if isinstance(a, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def _measured(stage: str, scale: Optional[int], precision: str, fn) -> Tuple[StageCost, object]:
    """Run ``fn()`` counting FLOPs and traffic; returns the stage's cost and ``fn``'s result."""
    with FlopCounterMode(display=False) as flops, _TrafficCounter() as traffic:
        out = fn()
    return StageCost(stage, scale, float(flops.get_total_flops()), float(traffic.bytes), precision), out


def guidance_cost(batch: int, tokens: int, prev_tokens: int, vocab: int, scale: int, prior: bool) -> StageCost:
    """CFG + SSG kernel on fp32 logits (B, N, V): 3 FLOPs per output for CFG, 3 for SSG and 2*M for the
    prior (fp32 dot); reads both CFG halves (+ prev (B, M, V) and the operator (N, M)), writes guided and cfg."""
    outputs = batch * tokens * vocab
    flops = 3 * outputs
    nbytes = 4 * (2 * outputs + 2 * outputs)
    if prior:
        flops += 3 * outputs + 2 * prev_tokens * outputs
        nbytes += 4 * (batch * prev_tokens * vocab + tokens * prev_tokens)
    return StageCost("guidance", scale, float(flops), float(nbytes), "fp32")


def sampling_cost(rows: int, vocab: int, scale: int) -> StageCost:
    """Sampler kernel on (R, V) fp32 logits: ``SAMPLING_PASSES`` passes of 2 instructions (4 FLOP-equivalents)
    per logit, the row staying on chip; reads the logits once, writes R int64 tokens."""
    flops = 4 * SAMPLING_PASSES * rows * vocab
    return StageCost("sampling", scale, float(flops), float(4 * rows * vocab + 8 * rows), "fp32")


@functools.lru_cache(maxsize=64)
def stage_costs(
    cfg: ModelConfig, batch: int, dtype: torch.dtype = torch.bfloat16, ssg: bool = True, vae_dtype: Optional[torch.dtype] = None
) -> Tuple[StageCost, ...]:
    """Every stage of one batch of ``batch`` images (2B transformer rows), in engine order.

    ``dtype`` is the transformer's; the VQ-VAE decodes in ``vae_dtype`` (default ``dtype``, as the Engine does;
    float32 runs as TF32) while its quantizer keeps the latent in float32; ``ssg`` adds the prior to guidance
    from scale 1 on. The model is built on the meta device each call.
    """
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    precisions = {torch.bfloat16: "bf16", torch.float16: "bf16", torch.float32: "fp32"}
    precision = precisions[dtype]
    vae_dtype = dtype if vae_dtype is None else vae_dtype
    vae, var = build_models(cfg, "meta")
    var, quant = var.to(dtype), vae.quantize
    meta = dict(device="meta", dtype=dtype)
    B, rows, C, H, K = batch, 2 * batch, cfg.embed_dim, cfg.num_heads, len(cfg.patch_nums)
    costs: List[StageCost] = []

    def conditioning():
        cond = var.class_emb(torch.zeros(rows, dtype=torch.long, device="meta"))
        shared = var.shared_ada_lin(cond)
        return [block.modulation(shared) for block in var.blocks], var.head_nm.ada_lin(cond).view(-1, 1, 2, C).unbind(2)

    cost, (mods, (head_scale, head_shift)) = _measured("conditioning", None, precision, conditioning)
    costs.append(cost)
    x = torch.empty(rows, cfg.patch_nums[0] ** 2, C, **meta)
    f_hat = torch.zeros(B, cfg.Cvae, cfg.patch_nums[-1], cfg.patch_nums[-1], device="meta")
    seen = 0
    for si, pn in enumerate(cfg.patch_nums):
        tokens = pn * pn
        seen += tokens

        def block_forward(x=x, block=var.blocks[0], mod=mods[0]):  # Engine._attend over a cache of ``seen`` tokens
            def attend(h):
                q, _, _ = block.attn.qkv(h)
                cache = torch.empty(rows, H, seen, C // H, **meta)
                return block.attn.attend(q, cache, cache, None)

            return block.forward_modulated(x, mod, attend)

        # the blocks are identical in shape: one is measured, then counted ``depth`` times
        cost, x = _measured("blocks", si, precision, block_forward)
        append = 4 * rows * tokens * C * x.element_size()  # k, v read and written into the cache
        costs.append(dataclasses.replace(cost, flops=cost.flops * cfg.depth, bytes=(cost.bytes + append) * cfg.depth))

        def head(x=x):
            h = var.head_nm.ln_wo_grad(x).mul(head_scale.add(1)).add_(head_shift)
            return F.linear(h, var.head.weight, var.head.bias)

        costs.append(_measured("head", si, precision, head)[0])
        prev_tokens = cfg.patch_nums[si - 1] ** 2 if si else 0
        costs.append(guidance_cost(B, tokens, prev_tokens, cfg.V, si, prior=ssg and si > 0))
        costs.append(sampling_cost(B * tokens, cfg.V, si))

        def next_input(f_hat=f_hat, si=si, pn=pn):
            h_BChw = quant.embedding(torch.zeros(B, tokens, dtype=torch.long, device="meta")).transpose(1, 2).reshape(B, cfg.Cvae, pn, pn)
            f_hat, nxt = quant.get_next_autoregressive_input(si, K, f_hat, h_BChw)
            if si == K - 1:
                return f_hat, None
            nxt = nxt.view(B, cfg.Cvae, -1).transpose(1, 2).to(dtype)
            return f_hat, var.word_embed(nxt).repeat(2, 1, 1)

        cost, (f_hat, x) = _measured("next input", si, "tf32", next_input)
        costs.append(cost)
    vae.post_quant_conv.to(vae_dtype)
    vae.decoder.to(vae_dtype)
    decode_precision = "tf32" if vae_dtype == torch.float32 else precisions[vae_dtype]
    costs.append(_measured("decode", None, decode_precision, lambda: vae.fhat_to_img(f_hat.to(vae_dtype)))[0])
    return tuple(costs)


@dataclasses.dataclass(frozen=True)
class StageTime:
    cost: StageCost
    seconds: float
    bound: str  # "compute" or "memory"


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Per-stage roofline times of one batch on one GPU."""

    gpu: GPU
    stages: Tuple[StageTime, ...]

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def flops(self) -> float:
        return sum(s.cost.flops for s in self.stages)

    @property
    def bytes(self) -> float:
        return sum(s.cost.bytes for s in self.stages)

    def by_stage(self) -> Dict[str, Tuple[float, float, float, float]]:
        """Stage name -> (FLOPs, bytes, seconds, seconds of its compute-bound parts), summed over scales."""
        out: Dict[str, Tuple[float, float, float, float]] = {}
        for s in self.stages:
            f, b, t, c = out.get(s.cost.stage, (0.0, 0.0, 0.0, 0.0))
            out[s.cost.stage] = (f + s.cost.flops, b + s.cost.bytes, t + s.seconds, c + (s.seconds if s.bound == "compute" else 0.0))
        return out


def roofline(stages: Sequence[StageCost], gpu: GPU) -> Roofline:
    """Each stage: max(FLOPs / peak of its precision, bytes / bandwidth)."""
    timed = []
    for s in stages:
        compute, memory = s.flops / gpu.peak(s.precision), s.bytes / gpu.bytes_per_s
        timed.append(StageTime(s, max(compute, memory), "compute" if compute >= memory else "memory"))
    return Roofline(gpu, tuple(timed))


def _stage_table(r: Roofline, batch: int) -> List[str]:
    lines = ["| stage | GFLOP | GB | time (us) | share | compute-bound share |", "|---|---|---|---|---|---|"]
    for name, (f, b, t, c) in r.by_stage().items():
        lines.append(f"| {name} | {f / 1e9:.1f} | {b / 1e9:.3f} | {t * 1e6:.1f} | {t / r.seconds:.1%} | {c / t if t else 0:.0%} |")
    compute = sum(s.seconds for s in r.stages if s.bound == "compute") / r.seconds
    lines.append(f"| **total** | {r.flops / 1e9:.1f} | {r.bytes / 1e9:.3f} | {r.seconds * 1e6:.1f} | {batch / r.seconds:.1f} img/s | {compute:.0%} |")
    return lines


def _share(r: Roofline, names: Sequence[str]) -> Tuple[float, float]:
    """(share of the batch's time, compute-bound share of that time) of the named stages."""
    parts = [v for k, v in r.by_stage().items() if k in names]
    t, c = sum(p[2] for p in parts), sum(p[3] for p in parts)
    return t / r.seconds, (c / t if t else 0.0)


def report(presets: Sequence[str] = tuple(PRESET_DEPTHS), batches: Sequence[int] = (1, 16, 64)) -> str:
    """The Markdown report of ``bench/results/cost_model.md`` (bf16 transformer)."""
    lines = [
        "# Cost model: roofline floor of one batch",
        "",
        "Generated by `python -m ssg_engine.costs --report bench/results/cost_model.md` (what is counted and how:",
        "`ssg_engine/costs.py`). bf16 transformer on 2B rows (CFG), SSG prior on, top-k 900 / top-p 0.96, bf16",
        "VQ-VAE decode (the Engine's default). Floor = sum over stages of max(FLOPs / peak, bytes / bandwidth) at dense",
        "datasheet peaks. For a stage group: its share of the floor and the share of its time in compute-bound",
        "stages (`c`); `rest` = conditioning, head, guidance, sampling and next-scale input. `SSG +` = floor with the",
        "SSG prior over the floor without it.",
        "",
        "| model | B | GPU | GFLOP / img | GB / batch | floor ms | img/s | blocks | decode | rest | SSG + |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rest = ("conditioning", "head", "guidance", "sampling", "next input")
    for preset in presets:
        cfg = ModelConfig.preset(preset)
        for batch in batches:
            stages, plain = stage_costs(cfg, batch), stage_costs(cfg, batch, ssg=False)
            for gpu in GPUS.values():
                r = roofline(stages, gpu)
                groups = [_share(r, names) for names in (("blocks",), ("decode",), rest)]
                cells = " | ".join(f"{t:.0%} (c {c:.0%})" for t, c in groups)
                lines.append(
                    f"| {preset} | {batch} | {gpu.name} | {r.flops / batch / 1e9:.0f} | {r.bytes / 1e9:.2f} | {r.seconds * 1e3:.2f} | "
                    f"{batch / r.seconds:.1f} | {cells} | {r.seconds / roofline(plain, gpu).seconds - 1:.2%} |"
                )
    for preset in presets:
        for batch in batches:
            lines += ["", f"## {preset}, B={batch}, {GPUS['h200'].name}", ""]
            lines += _stage_table(roofline(stage_costs(ModelConfig.preset(preset), batch), GPUS["h200"]), batch)
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Per-stage FLOPs, bytes and roofline time of one batch of VAR sampling.")
    ap.add_argument("--preset", default="d16", choices=list(PRESET_DEPTHS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--gpu", default="h200", choices=list(GPUS))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-ssg", action="store_true", help="guidance without the SSG prior")
    ap.add_argument("--report", metavar="PATH", help="write the Markdown report for every preset, B in {1,16,64} and GPU")
    args = ap.parse_args(argv)
    if args.report:
        Path(args.report).write_text(report())
        print(f"wrote {args.report}")
        return
    stages = stage_costs(ModelConfig.preset(args.preset), args.batch_size, getattr(torch, args.dtype), ssg=not args.no_ssg)
    r = roofline(stages, GPUS[args.gpu])
    print(f"{args.preset}, B={args.batch_size}, {args.dtype}, SSG {'off' if args.no_ssg else 'on'}, {r.gpu.name}")
    print("\n".join(_stage_table(r, args.batch_size)))


if __name__ == "__main__":
    main()
