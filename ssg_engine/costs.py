"""Cost model of one batch of VAR sampling (and of HART's, :func:`hart_stage_costs`: its context tokens, MaskGIT
passes and diffusion head): FLOPs and bytes per stage, and the roofline time on a GPU.

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

Paths (``stage_costs(..., path=...)``; FLOPs are the same on every path, bytes and launches differ):

* ``floor`` (the default, the roofline floor): the bytes above, no launches counted;
* ``unfused`` (the reference loop, upstream-shaped): the stage code runs on meta tensors under a
  :class:`~torch.utils._python_dispatch.TorchDispatchMode` that adds the input and output bytes of every aten op
  that is not a view (a broadcast input counts its distinct elements) and counts each as one launch. The block
  is upstream's: LayerNorm, modulate mul/add, the packed qkv bias ``cat`` and q-scale ``exp`` per call, q/k
  normalisation (norm, clamp, div), q scale, the ``torch.cat`` KV cache growing by re-copying the whole cache
  each scale, the attention output's transpose copy, GELU, gamma mul, residual adds; attention itself is
  counted as one flash call (q, K, V in, output out; the meta device would decompose it into the math path).
  Guidance and sampling are the PyTorch references (``ssg_guidance_reference``, ``sample_logits_reference``),
  the decoder's GroupNorm and SiLU separate ops;
* ``fused`` (issue #20's kernels, see :func:`fused_block_kernels`): each fused kernel reads its inputs once
  and writes its outputs once: per block LN+modulate, QKV GEMM, q/k norm + q scale + KV-cache write,
  attention on the cache slice, out-proj GEMM + gated residual, LN+modulate, fc1 GEMM + GELU, fc2 GEMM + gated
  residual (8 launches); the head LN+modulate + GEMM (2); guidance and sampling the Triton kernels (1 each);
  the decoder with every SiLU that follows a GroupNorm fused into it (counted traffic minus those SiLUs).
  Conditioning and next-scale input are the same torch code on both paths (dispatch-counted).

Not counted on the unfused path: upstream's float32 weights re-cast under fp16 autocast at every use and its
AdaLN conditioning recomputed at every scale (``bench/bench_e2e.py``'s upstream_shaped arm has both): it is the
reference loop in the transformer's dtype. VAR and HART: Infinity's blocks (cross-attention) are not modelled.

Launch overhead (:func:`predicted`): ``launches x LAUNCH_US[mode]``, 4 us per launch eagerly (host-bound
PyTorch dispatch + ``cudaLaunchKernel``), 1.5 us inside a CUDA graph (the GPU-side gap between graph nodes);
an assumption, not a measurement, added to the path's roofline (no overlap assumed).

Roofline: a stage takes ``max(FLOPs / peak, bytes / bandwidth)`` with the peak of the precision
it runs in (bf16/fp16 tensor cores for the transformer in half precision, TF32 for the float32
VQ-VAE convolutions, which cuDNN runs in TF32 by default, fp32 CUDA cores for the two Triton
kernels), and the batch takes the sum.

    python -m ssg_engine.costs --preset d16 --batch-size 16 --gpu h200
    python -m ssg_engine.costs --preset hart_0.7b_1024px --batch-size 1 --gpu h100 --path fused
    python -m ssg_engine.costs --report bench/results/cost_model.md
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .families.var.config import ModelConfig, PRESET_DEPTHS
from .kernels.sampling import sample_logits_reference
from .kernels.ssg_guidance import ssg_guidance_reference
from .loading import build_models

if TYPE_CHECKING:
    from .families.hart.config import HARTConfig, HARTTokenizerConfig

# The sampler kernel's passes over a row (kernels/sampling.py) for top-k 900 / top-p 0.96 at
# V = 4096: row max/min, 17 top-k and 12 top-p bisection passes on average (Gaussian logits,
# bench/results/aot/README.md), Z, kept mass, the draw. Each is a compare and an add per logit,
# two instructions that issue like FMAs, which the fp32 peak counts as 2 FLOPs each.
SAMPLING_PASSES = 33

PATHS = ("floor", "fused", "unfused")
# The peak a dtype's matmuls run at (float32 matmuls: CUDA cores, as torch's default allow_tf32=False).
PRECISIONS = {torch.bfloat16: "bf16", torch.float16: "bf16", torch.float32: "fp32"}
# Seconds per kernel launch (module docstring): eager PyTorch dispatch + launch, and a node of a CUDA graph.
LAUNCH_US = {"eager": 4.0, "graph": 1.5}


@dataclasses.dataclass(frozen=True)
class StageCost:
    """FLOPs and bytes of one stage for the whole batch; ``scale`` is None for once-per-batch stages."""

    stage: str
    scale: Optional[int]
    flops: float
    bytes: float
    precision: str  # the peak that applies: "bf16" (bf16/fp16 tensor cores), "tf32" or "fp32"
    launches: int = 0  # kernel launches of the stage (0 on the "floor" path: not counted)


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
    """Bytes read and written by the calls in ``_COUNTED`` (tensor arguments and result), and how many calls."""

    _COUNTED = (F.linear, F.conv2d, F.scaled_dot_product_attention, torch.bmm)

    def __init__(self) -> None:
        super().__init__()
        self.bytes, self.calls = 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self._COUNTED:
            tensors = [a for a in (*args, *(kwargs or {}).values(), out) if isinstance(a, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            self.calls += 1
        return out


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t``: a broadcast (stride-0) dimension counts once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride != 0 else 1
    return n * t.element_size()


class _OpTraffic(TorchDispatchMode):
    """Input + output bytes and launches of every aten op that is not a view or an allocation.

    ``fuse_silu``: a SiLU whose input is the output of the op just before it, a GroupNorm, is fused into it
    (no bytes, no launch), as the fused decoder does.
    """

    _FREE = {
        torch.ops.aten._unsafe_view.default, torch.ops.aten.detach.default, torch.ops.aten.lift_fresh.default,
        torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default, torch.ops.aten.empty_like.default,
        torch.ops.aten.new_empty.default,
    }

    def __init__(self, fuse_silu: bool = False) -> None:
        super().__init__()
        self.bytes, self.launches, self.fuse_silu = 0, 0, fuse_silu
        self._last: Tuple[object, object] = (None, None)  # (op, first output) of the last counted op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func in self._FREE:
            return out
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outs:  # dtype arithmetic (aten.promote_types) and the like: no kernel
            return out
        last_op, last_out = self._last
        self._last = (func.overloadpacket, outs[0])
        if self.fuse_silu and func.overloadpacket is torch.ops.aten.silu and last_op is torch.ops.aten.native_group_norm and args[0] is last_out:
            return out
        ins = [a for a in tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]  # cat's list included
        self.bytes += sum(_distinct_bytes(t) for t in (*ins, *outs))
        self.launches += 1
        return out


class _FlashAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as one flash kernel: q, K, V read, the output written (added to
    ``counter``), instead of the math path the meta device would decompose it into."""

    def __init__(self, counter: _OpTraffic) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        q, k, v = args[:3]
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        self.counter.bytes += sum(_distinct_bytes(t) for t in (q, k, v, out))
        self.counter.launches += 1
        return out


def _traffic(fn, fuse_silu: bool = False) -> Tuple[int, int, object]:
    """(bytes, launches, result) of ``fn()`` run op by op (:class:`_OpTraffic`, attention as flash), without
    autograd (as the samplers run: autograd would add copies for in-place ops on views)."""
    counter = _OpTraffic(fuse_silu)
    with torch.no_grad(), _FlashAttention(counter), counter:
        out = fn()
    return counter.bytes, counter.launches, out


def fused_block_kernels(
    batch2: int, tokens: int, seen: int, C: int, hidden: int, heads: int, elem: int, gated: bool = False,
) -> List[Tuple[str, int]]:
    """(kernel, bytes) of one transformer block over ``tokens`` new tokens of ``batch2`` rows attending to ``seen``
    cached tokens, with issue #20's fused kernels; ``elem`` bytes per element. Weights (C_out, C_in) and biases are
    read once per GEMM; the modulation vectors (scale, shift, gamma: (batch2, C) each) once per kernel. ``gated``: a
    SwiGLU MLP (HART's ``mlp_type="llama"``, no biases): the first GEMM reads the gate and up weights (2 x hidden x C)
    and writes ``silu(gate) * up``."""
    R, vec = batch2 * tokens, batch2 * C
    act = R * C
    fc1 = elem * (act + 2 * hidden * C + R * hidden) if gated else elem * (act + hidden * C + hidden + R * hidden)
    return [
        ("ln_modulate_1", elem * (act + 2 * vec + act)),  # x, scale1, shift1 -> h
        ("qkv_gemm", elem * (act + 3 * C * C + 3 * C + 3 * act)),  # h, W, packed bias -> qkv
        ("qk_norm_rope_kv_write", elem * (3 * act + heads + act + 2 * act)),  # qkv, q scale -> q, K/V cache rows
        ("attention", elem * (act + 2 * batch2 * seen * C + act)),  # q, K/V cache slice -> o
        ("proj_gemm_gated_residual", elem * (act + C * C + C + act + vec + act)),  # o, W, b, x, gamma1 -> x
        ("ln_modulate_2", elem * (act + 2 * vec + act)),
        ("fc1_gemm_gelu", fc1),  # h, W, b -> gelu(.) (gated: h, W_gate, W_up -> silu(.) * .)
        ("fc2_gemm_gated_residual", elem * (R * hidden + C * hidden + C + act + vec + act)),  # a, W, b, x, gamma2 -> x
    ]


def upstream_block(block: torch.nn.Module, x: torch.Tensor, mod: torch.Tensor, past: int, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Upstream's block on x (2B, l, C) with modulation (2B, 1, 6, C): the qkv bias and q scale rebuilt per call,
    a ``torch.cat`` KV cache holding ``past`` tokens that the new keys/values are concatenated to. ``rope``: HART's
    block (cos, sin (2B, l, D), applied by its ``qkv``)."""
    rows, _, C = x.shape
    heads = block.attn.num_heads
    cached = x.new_empty(rows, heads, past, C // heads)

    def attend(h: torch.Tensor) -> torch.Tensor:
        q, k, v = block.attn.qkv(h) if rope is None else block.attn.qkv(h, rope)
        if past:
            k, v = torch.cat((cached, k), dim=2), torch.cat((cached, v), dim=2)
        return block.attn.attend(q, k, v, None)

    return (block if rope is not None else block.forward_modulated)(x, mod, attend)


def _on_path(cost: StageCost, path: str, fn, fused: Optional[Tuple[float, int]] = None, fuse_silu: bool = False) -> StageCost:
    """``cost`` with the path's bytes and launches: counted op by op from ``fn`` on the unfused path, ``fused``
    (bytes, launches) or else ``fn`` counted op by op on the fused path, as measured on the floor."""
    if path == "unfused" or (path == "fused" and fused is None):
        nbytes, launches, _ = _traffic(fn, fuse_silu)
        return dataclasses.replace(cost, bytes=float(nbytes), launches=launches)
    if path == "fused":
        return dataclasses.replace(cost, bytes=float(fused[0]), launches=fused[1])
    return cost


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


def hart_diffusion_cost(cfg: "HARTConfig", batch: int, Cvae: int = 32, dtype: torch.dtype = torch.bfloat16, path: str = "floor") -> StageCost:
    """HART's residual diffusion head for ``batch`` images: ``cfg.num_sampling_steps`` denoiser passes over
    2B x pn_last^2 rows (CFG: both halves denoise the conditional noise), the MLP in ``dtype`` with a codebook of
    ``Cvae`` channels. FLOPs are counted (the head on the meta device under ``FlopCounterMode``); bytes on the
    ``floor`` path are the linears' inputs, weights and outputs, on ``unfused`` every aten op's (upstream's eager
    head: its LayerNorm / modulate / SiLU / gate chains), ``fused`` is not modelled (the floor stands for it)."""
    from .families.hart.diffusion import DiffusionHead, GeneratorNoise  # noqa: PLC0415 (costs sits above the families)

    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    rows = 2 * batch * cfg.patch_nums[-1] ** 2
    with torch.device("meta"):
        head = DiffusionHead(Cvae, cfg.embed_dim, cfg.diff_width, cfg.diff_depth, cfg.num_sampling_steps).to(dtype)
        z = torch.empty(rows, cfg.embed_dim, dtype=dtype)

    def run() -> torch.Tensor:
        return head.sample(z, cfg=4.5, noise=GeneratorNoise(None))

    with torch.no_grad(), _TrafficCounter() as linears:
        cost, _ = _measured("diffusion head", len(cfg.patch_nums) - 1, PRECISIONS[dtype], run)
    if path == "unfused":
        nbytes, launches, _ = _traffic(run)
        cost = dataclasses.replace(cost, bytes=float(nbytes), launches=launches)
    elif path == "fused":  # the floor's bytes; one kernel per GEMM (its elementwise chain fused) + one update per step
        cost = dataclasses.replace(cost, launches=linears.calls + head.schedule.num_steps)
    return cost


@functools.lru_cache(maxsize=16)
def hart_stage_costs(
    cfg: "HARTConfig", batch: int, dtype: torch.dtype = torch.bfloat16, ssg: bool = True, path: str = "floor",
    num_maskgit_iters: int = 1, tokenizer: Optional["HARTTokenizerConfig"] = None,
) -> Tuple[StageCost, ...]:
    """Every stage of one batch of ``batch`` HART images (2B transformer rows), in the HART Engine's order, with the
    tokenizer ``tokenizer`` (default ``HARTTokenizerConfig()``) decoding in ``dtype`` (float32 as TF32):

    * ``conditioning`` (once): the context's RMSNorm and embedding over 2B x ``context_token`` rows, the pooled AdaLN
      modulations of every block and the head's;
    * scale 0: ``blocks`` over the ``context_token`` context tokens (they attend to each other), ``head`` on the last
      context position; every later scale ``k``: ``blocks`` over its ``pn_k^2`` tokens attending to the cache (the
      last scale: one pass per MaskGIT group, ``num_maskgit_iters``, each attending to the context, the earlier scales
      and the groups before it), ``head`` (float32 in the Engine, ``dtype`` here), ``guidance`` (CFG ramp + SSG prior
      from scale 1 on), ``sampling``, ``next input`` (codebook, the tokenizer's refinement, ``word_embed`` + level
      embedding; the last scale: the diffusion head's condition ``decoder_norm(hidden + word_embed(codes))``);
    * ``diffusion head`` (last scale, :func:`hart_diffusion_cost` on the same path), ``decode`` (once).

    FLOPs, bytes and launches per ``path`` as :func:`stage_costs` (the unfused block is upstream's, its ``torch.cat``
    KV cache included; the fused block :func:`fused_block_kernels` with a SwiGLU MLP for ``mlp_type="llama"``).
    The model is built on the meta device (once per arguments: the result is cached)."""
    from .families.hart.config import HARTTokenizerConfig  # noqa: PLC0415 (costs sits above the families)
    from .families.hart.model import HARTCondition, HARTTransformer, LlamaMLP, maskgit_groups  # noqa: PLC0415
    from .families.hart.tokenizer import HARTTokenizer  # noqa: PLC0415

    if not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if not isinstance(num_maskgit_iters, int) or num_maskgit_iters < 1:
        raise ValueError(f"num_maskgit_iters must be a positive integer, got {num_maskgit_iters!r}")
    precision = PRECISIONS[dtype]
    with torch.device("meta"):
        tok = HARTTokenizer(HARTTokenizerConfig() if tokenizer is None else tokenizer, cfg.patch_nums)
        model = HARTTransformer(cfg, tok).to(dtype)
    model.word_embed.float()  # it embeds the float32 latent (the tokenizer stays float32), as in the Engine
    meta = dict(device="meta", dtype=dtype)
    B, rows, C, H, K, Lc, V = batch, 2 * batch, cfg.embed_dim, cfg.num_heads, len(cfg.patch_nums), cfg.context_token, model.V
    D, elem, last = C // H, torch.empty(0, dtype=dtype).element_size(), cfg.patch_nums[-1] ** 2
    ffn = model.blocks[0].ffn
    gated = isinstance(ffn, LlamaMLP)
    hidden = ffn.gate_proj.out_features if gated else ffn.fc1.out_features
    costs: List[StageCost] = []

    def add(cost: StageCost, fn, fused: Optional[Tuple[float, int]] = None, fuse_silu: bool = False) -> None:
        costs.append(_on_path(cost, path, fn, fused, fuse_silu))

    ctx = torch.empty(B, Lc, cfg.context_dim, **meta)
    mask = torch.ones(B, Lc, dtype=torch.bool, device="meta")
    orders = torch.arange(last, device="meta").expand(B, last) if num_maskgit_iters > 1 else None
    condition = lambda: model.condition(HARTCondition(ctx, mask, num_maskgit_iters=num_maskgit_iters, maskgit_orders=orders))  # noqa: E731
    cost, state = _measured("conditioning", None, precision, condition)
    add(cost, condition)
    mod, scale, shift = state.modulations[0], state.head_scale.to(dtype), state.head_shift.to(dtype)
    if num_maskgit_iters > 1:
        passes = [g.shape[1] for g in maskgit_groups(torch.arange(last).expand(1, last), num_maskgit_iters)]
    else:
        passes = [last]
    block = model.blocks[0]
    prev_cfg: Optional[torch.Tensor] = None
    for si, pn in enumerate(cfg.patch_nums):
        begin, end = model.begin_ends[si]
        cos, sin = (t.to(dtype) for t in state.ropes[si])
        parts = [(end - begin, begin)] if si < K - 1 else [(n, begin + sum(passes[:i])) for i, n in enumerate(passes)]
        blocks = StageCost("blocks", si, 0.0, 0.0, precision)
        for tokens, start in parts:  # the blocks are identical in shape: one is measured, counted ``depth`` times
            x = torch.empty(rows, tokens, C, **meta)
            rope = (cos[:, :tokens], sin[:, :tokens])
            seen = start + tokens

            def block_forward(x=x, rope=rope, seen=seen):  # the Engine's block over a static cache of ``seen`` tokens
                def attend(h):
                    q, _, _ = block.attn.qkv(h, rope)
                    cache = torch.empty(rows, H, seen, D, **meta)
                    return block.attn.attend(q, cache, cache, None)

                return block(x, mod, attend)

            cost, _ = _measured("blocks", si, precision, block_forward)
            append = 4 * rows * tokens * C * elem  # k, v read and written into the cache
            nbytes, launches = (cost.bytes + append) * cfg.depth, 0
            if path == "unfused":
                counted, launches, _ = _traffic(lambda x=x, rope=rope, start=start: upstream_block(block, x, mod, start, rope))
                nbytes, launches = counted * cfg.depth, launches * cfg.depth
            elif path == "fused":
                kernels = fused_block_kernels(rows, tokens, seen, C, hidden, H, elem, gated=gated)
                nbytes, launches = sum(b for _, b in kernels) * cfg.depth, len(kernels) * cfg.depth
            blocks = dataclasses.replace(blocks, flops=blocks.flops + cost.flops * cfg.depth, bytes=blocks.bytes + float(nbytes),
                                         launches=blocks.launches + launches)
        costs.append(blocks)
        tokens = 1 if si == 0 else pn * pn
        h = torch.empty(rows, tokens, C, **meta)
        head = lambda h=h: model.head(model.head_nm(h, scale, shift))  # noqa: E731
        act, logits = rows * tokens * C, rows * tokens * V
        head_fused = elem * (act + 2 * rows * C + act) + elem * (act + V * C + V + logits)  # LN+modulate, GEMM
        add(_measured("head", si, precision, head)[0], head, (head_fused, 2))
        prev_tokens = cfg.patch_nums[si - 1] ** 2 if si else 0
        prior = ssg and si > 0
        operator = torch.empty(tokens, prev_tokens, device="meta") if prior else None
        logits_2B = torch.empty(rows, tokens, V, device="meta")
        guided = torch.empty(B, tokens, V, device="meta")

        def guide(logits_2B=logits_2B, prev=prev_cfg, operator=operator):
            return ssg_guidance_reference(logits_2B, prev if operator is not None else None, operator, 4.5, 1.0 if operator is not None else 0.0)

        cost = guidance_cost(B, tokens, prev_tokens, V, si, prior=prior)
        add(cost, guide, (cost.bytes, 1))
        prev_cfg = torch.empty(B, tokens, V, device="meta")
        cost = sampling_cost(B * tokens, V, si)
        add(cost, lambda g=guided: sample_logits_reference(g.view(-1, V), 600, 0.0, 1.0, None), (cost.bytes, 1))
        codes = torch.zeros(B, tokens, dtype=torch.long, device="meta")
        if si == K - 1:
            state.hidden, state.hard_tokens = torch.empty(rows, tokens, C, **meta), codes

            def next_input(state=state, codes=codes):  # the diffusion head's condition, then the latent update
                d = model.word_embed(tok.quantize.embedding(codes))
                z = model.decoder_norm(state.hidden + torch.cat([d, d], dim=0))
                state.f_hat = state.f_hat + tok.quantize.embedding(codes).transpose(1, 2).reshape(B, -1, pn, pn)
                return z
        else:
            def next_input(state=state, si=si, codes=codes):
                model.next_input_embeddings(state, si, tok.quantize.embedding(codes))
                return state.x

        cost, _ = _measured("next input", si, "tf32", next_input)
        add(cost, next_input)
    costs.append(hart_diffusion_cost(cfg, batch, model.Cvae, dtype, path))
    tok.post_quant_conv.to(dtype)
    tok.decoder.to(dtype)
    f_hat = torch.empty(B, model.Cvae, cfg.patch_nums[-1], cfg.patch_nums[-1], **meta)
    decode = lambda: tok.fhat_to_img(f_hat)  # noqa: E731
    cost = _measured("decode", None, "tf32" if dtype == torch.float32 else precision, decode)[0]
    if path == "fused":
        nbytes, launches, _ = _traffic(decode, fuse_silu=True)
        costs.append(dataclasses.replace(cost, bytes=float(nbytes), launches=launches))
    else:
        add(cost, decode)
    return tuple(costs)


@functools.lru_cache(maxsize=64)
def stage_costs(
    cfg: ModelConfig,
    batch: int,
    dtype: torch.dtype = torch.bfloat16,
    ssg: bool = True,
    vae_dtype: Optional[torch.dtype] = None,
    path: str = "floor",
) -> Tuple[StageCost, ...]:
    """Every stage of one batch of ``batch`` images (2B transformer rows), in engine order.

    ``dtype`` is the transformer's; the VQ-VAE decodes in ``vae_dtype`` (default ``dtype``, as the Engine does;
    float32 runs as TF32) while its quantizer keeps the latent in float32; ``ssg`` adds the prior to guidance
    from scale 1 on. ``path`` (one of ``PATHS``, module docstring) picks how bytes and launches are counted;
    FLOPs are the same on every path. The model is built on the meta device each call.
    """
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    precision = PRECISIONS[dtype]
    vae_dtype = dtype if vae_dtype is None else vae_dtype
    vae, var = build_models(cfg, "meta")
    var, quant = var.to(dtype), vae.quantize
    meta = dict(device="meta", dtype=dtype)
    B, rows, C, H, K = batch, 2 * batch, cfg.embed_dim, cfg.num_heads, len(cfg.patch_nums)
    elem = torch.empty(0, dtype=dtype).element_size()
    costs: List[StageCost] = []

    def add(cost: StageCost, fn, fused: Optional[Tuple[float, int]] = None, fuse_silu: bool = False) -> None:
        costs.append(_on_path(cost, path, fn, fused, fuse_silu))

    def conditioning():
        cond = var.class_emb(torch.zeros(rows, dtype=torch.long, device="meta"))
        shared = var.shared_ada_lin(cond)
        return [block.modulation(shared) for block in var.blocks], var.head_nm.ada_lin(cond).view(-1, 1, 2, C).unbind(2)

    cost, (mods, (head_scale, head_shift)) = _measured("conditioning", None, precision, conditioning)
    add(cost, conditioning)
    x = torch.empty(rows, cfg.patch_nums[0] ** 2, C, **meta)
    f_hat = torch.zeros(B, cfg.Cvae, cfg.patch_nums[-1], cfg.patch_nums[-1], device="meta")
    prev_cfg: Optional[torch.Tensor] = None
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
        x_in = x
        cost, x = _measured("blocks", si, precision, block_forward)
        append = 4 * rows * tokens * C * x.element_size()  # k, v read and written into the cache
        cost = dataclasses.replace(cost, flops=cost.flops * cfg.depth, bytes=(cost.bytes + append) * cfg.depth)
        kernels = fused_block_kernels(rows, tokens, seen, C, round(C * cfg.mlp_ratio), H, elem)
        if path == "unfused":
            nbytes, launches, _ = _traffic(lambda: upstream_block(var.blocks[0], x_in, mods[0], seen - tokens))
            cost = dataclasses.replace(cost, bytes=float(nbytes * cfg.depth), launches=launches * cfg.depth)
        elif path == "fused":
            cost = dataclasses.replace(cost, bytes=float(sum(b for _, b in kernels) * cfg.depth), launches=len(kernels) * cfg.depth)
        costs.append(cost)

        def head(x=x):
            h = var.head_nm.ln_wo_grad(x).mul(head_scale.add(1)).add_(head_shift)
            return F.linear(h, var.head.weight, var.head.bias)

        act, logits = rows * tokens * C, rows * tokens * cfg.V
        head_fused = elem * (act + 2 * rows * C + act) + elem * (act + cfg.V * C + cfg.V + logits)  # LN+modulate, GEMM
        add(_measured("head", si, precision, head)[0], head, (head_fused, 2))
        prev_tokens = cfg.patch_nums[si - 1] ** 2 if si else 0
        prior = ssg and si > 0
        operator = torch.empty(tokens, prev_tokens, device="meta") if prior else None
        logits_2B = torch.empty(rows, tokens, cfg.V, **meta)
        guided = torch.empty(B, tokens, cfg.V, device="meta")

        def guide(logits_2B=logits_2B, prev=prev_cfg, operator=operator):
            return ssg_guidance_reference(logits_2B, prev if operator is not None else None, operator, 1.5, 1.0 if operator is not None else 0.0)

        cost = guidance_cost(B, tokens, prev_tokens, cfg.V, si, prior=prior)
        add(cost, guide, (cost.bytes, 1))
        prev_cfg = torch.empty(B, tokens, cfg.V, device="meta")
        cost = sampling_cost(B * tokens, cfg.V, si)
        add(cost, lambda g=guided: sample_logits_reference(g.view(-1, cfg.V), 900, 0.96, 1.0, None), (cost.bytes, 1))

        def next_input(f_hat=f_hat, si=si, pn=pn):
            h_BChw = quant.embedding(torch.zeros(B, tokens, dtype=torch.long, device="meta")).transpose(1, 2).reshape(B, cfg.Cvae, pn, pn)
            f_hat, nxt = quant.get_next_autoregressive_input(si, K, f_hat, h_BChw)
            if si == K - 1:
                return f_hat, None
            nxt = nxt.view(B, cfg.Cvae, -1).transpose(1, 2).to(dtype)
            return f_hat, var.word_embed(nxt).repeat(2, 1, 1)

        cost, (f_hat, x) = _measured("next input", si, "tf32", next_input)
        add(cost, next_input)
    vae.post_quant_conv.to(vae_dtype)
    vae.decoder.to(vae_dtype)
    decode_precision = "tf32" if vae_dtype == torch.float32 else PRECISIONS[vae_dtype]
    decode = lambda: vae.fhat_to_img(f_hat.to(vae_dtype))  # noqa: E731
    cost = _measured("decode", None, decode_precision, decode)[0]
    if path == "fused":
        nbytes, launches, _ = _traffic(decode, fuse_silu=True)
        cost = dataclasses.replace(cost, bytes=float(nbytes), launches=launches)
        costs.append(cost)
    else:
        add(cost, decode)
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


def predicted(stages: Sequence[StageCost], gpu: GPU, launch_mode: Optional[str] = None) -> float:
    """Seconds of one batch: the stages' roofline plus, with ``launch_mode`` ("eager" or "graph"), their launches
    times ``LAUNCH_US[launch_mode]`` (no overlap of launch overhead and GPU work assumed)."""
    launch = 0.0 if launch_mode is None else LAUNCH_US[launch_mode] * 1e-6 * sum(s.launches for s in stages)
    return roofline(stages, gpu).seconds + launch


def _paths_section(presets: Sequence[str], batches: Sequence[int], gpus: Sequence[str]) -> List[str]:
    """Report rows: floor vs fused and unfused paths, with launch overheads, per model, batch and GPU."""
    lines = [
        "",
        "## Fused vs unfused transformer (issue #20)",
        "",
        "Bytes and launches counted per path (`stage_costs(path=...)`, `ssg_engine/costs.py`): `unfused` = the",
        "reference / upstream-shaped loop op by op (every elementwise op reads and writes its tensors, the `torch.cat`",
        "KV cache re-copied each scale, GroupNorm and SiLU separate), `fused` = issue #20's kernels (8 per block, head",
        "LN+modulate fused, GroupNorm+SiLU fused). Same FLOPs on every path. ms = roofline of the path's bytes;",
        f"`+eager` / `+graph` add launches x {LAUNCH_US['eager']:g} us (eager) / {LAUNCH_US['graph']:g} us (CUDA graph),",
        "an assumption, not a measurement. VAR only: the cost model does not cover Infinity yet.",
        "",
        "| model | B | GPU | floor ms | fused ms | fused +graph | fused +eager | unfused ms | unfused +eager | "
        "launches fused / unfused | block GB fused / unfused | unfused +eager / fused +graph |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for preset in presets:
        cfg = ModelConfig.preset(preset)
        for batch in batches:
            floor, fused, unfused = (stage_costs(cfg, batch, path=p) for p in PATHS)
            block_gb = [sum(s.bytes for s in st if s.stage == "blocks") / 1e9 for st in (fused, unfused)]
            launches = [sum(s.launches for s in st) for st in (fused, unfused)]
            for name in gpus:
                gpu = GPUS[name]
                ms = [
                    predicted(floor, gpu), predicted(fused, gpu), predicted(fused, gpu, "graph"), predicted(fused, gpu, "eager"),
                    predicted(unfused, gpu), predicted(unfused, gpu, "eager"),
                ]
                lines.append(
                    f"| {preset} | {batch} | {gpu.name} | " + " | ".join(f"{t * 1e3:.2f}" for t in ms)
                    + f" | {launches[0]} / {launches[1]} | {block_gb[0]:.2f} / {block_gb[1]:.2f} | {ms[5] / ms[2]:.2f}x |"
                )
    return lines


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


# GPU memory of the report's HART plan (datasheet capacity, GiB): H100 SXM 80 GB, H200 SXM 141 GB.
HBM_GIB = {"h100": 80, "h200": 141}


def _hart_section(name: str, gpus: Sequence[str] = ("h100", "h200")) -> List[str]:
    """The report's HART end-to-end section: transformer + diffusion head + decode per path, dtype and batch, the
    memory plan's largest batch (float16 with and without ``more_smooth``, and float32), and what the diffusion head
    weighs."""
    from .families.hart.config import PRESETS as HART_PRESETS  # noqa: PLC0415 (costs sits above the families)
    from .memory import GiB, largest_batch  # noqa: PLC0415
    from .plan import plan  # noqa: PLC0415

    cfg = HART_PRESETS[name]
    lines = [
        "", f"## HART end to end ({name}: {cfg.depth} blocks of width {cfg.embed_dim}, {cfg.context_token} context tokens, "
        f"{len(cfg.patch_nums)} scales to {cfg.patch_nums[-1]}x{cfg.patch_nums[-1]}, one MaskGIT pass)", "",
        "Counted by `hart_stage_costs` (`ssg_engine/costs.py`): the context tokens at scale 0, every scale, the last scale's",
        "MaskGIT passes, CFG's 2B rows, SSG prior on, the diffusion head (8 steps, `hart_diffusion_cost`) and the tokenizer's",
        "decode; paths, launches and ms as in the VAR table above. The HART Engine runs float16 on CUDA (autocast, as",
        "upstream samples; bfloat16 costs the same: one row for both); float32 is its option (matmuls on fp32 CUDA cores,",
        "decode TF32). The preset's depth and MLP are estimates (`families/hart/config.py` says each number's source).",
        "Shares are of the floor.",
        "`fused` is issue #20's block kernels, which the HART Engine does not use yet (its fused ops: q/k norm + RoPE +",
        "KV write, guidance, sampling, the decoder's GroupNorm + SiLU; `bench/launch_count.py`).", "",
        "| dtype | B | GPU | TFLOP / img | floor ms | fused ms | fused +graph | unfused ms | unfused +eager | "
        "launches fused / unfused | blocks | diffusion head | decode | rest |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rest = ("conditioning", "head", "guidance", "sampling", "next input")
    for dtype, batch in ((torch.float16, 1), (torch.float16, 16), (torch.float32, 1)):
        floor, fused, unfused = (hart_stage_costs(cfg, batch, dtype, path=p) for p in PATHS)
        launches = [sum(s.launches for s in st) for st in (fused, unfused)]
        for key in gpus:
            gpu = GPUS[key]
            r = roofline(floor, gpu)
            ms = [predicted(floor, gpu), predicted(fused, gpu), predicted(fused, gpu, "graph"), predicted(unfused, gpu),
                  predicted(unfused, gpu, "eager")]
            shares = " | ".join(f"{_share(r, names)[0]:.0%}" for names in (("blocks",), ("diffusion head",), ("decode",), rest))
            label = "float16 / bfloat16" if dtype == torch.float16 else str(dtype).removeprefix("torch.")
            lines.append(f"| {label} | {batch} | {gpu.name} | {r.flops / batch / 1e12:.1f} | "
                         + " | ".join(f"{t * 1e3:.1f}" for t in ms) + f" | {launches[0]} / {launches[1]} | {shares} |")
    def most(k: str, **kw: Any) -> int:
        return largest_batch(lambda b: plan(cfg, b, **kw), HBM_GIB[k] * GiB)

    fits = ", ".join(f"{most(k)} on {GPUS[k].name} ({HBM_GIB[k]} GiB; {most(k, more_smooth=False)} without more_smooth, "
                     f"{most(k, dtype=torch.float32)} at float32)" for k in gpus)
    one, top = plan(cfg, 1), plan(cfg, most(gpus[0]))
    last_scale = top.logits + max(top.activations, top.gumbel)
    peak = max((last_scale, "the last scale's logits and Gumbel scratch"), (top.diffusion, "the diffusion head"), (top.decode, "the decode"))[1]
    lines += [
        "", f"Memory plan (`ssg-engine plan --preset {name}`, `ssg_engine.memory.hart_plan`), float16 as the Engine on CUDA, "
        f"more_smooth on as upstream: {one.weights / GiB:.2f} GiB of weights (linear layers float16, the rest and the tokenizer "
        f"float32), {one.kv_cache / GiB:.2f} GiB of KV cache per image ({cfg.seq_len} positions x {cfg.depth} layers x 2 rows), "
        f"{one.gumbel / GiB:.2f} GiB of Gumbel scratch per image at the last scale; largest batch per GPU: {fits}; at "
        f"{top.batch} images the largest phase (after the weights, KV cache and condition) is {peak}.",
    ]
    return lines + _hart_diffusion_section(cfg, name, (1, 64), gpus)


def _hart_diffusion_section(cfg: "HARTConfig", name: str, batches: Sequence[int], gpus: Sequence[str]) -> List[str]:
    """The report's section on HART's residual diffusion head (its floor and upstream's eager head)."""
    e2e = roofline(hart_stage_costs(cfg, 1, path="fused"), GPUS["h100"])
    head_share = _share(e2e, ("diffusion head",))
    lines = [
        "", f"## HART's residual diffusion head ({name}: {cfg.diff_depth} blocks of width {cfg.diff_width}, "
        f"{cfg.num_sampling_steps} steps, CFG)", "",
        "Counted by `hart_diffusion_cost` (`ssg_engine/costs.py`): the head on the meta device, bf16, every step over",
        f"2B x {cfg.patch_nums[-1]}^2 rows. `unfused` is upstream's eager head op by op (its LayerNorm, modulate, SiLU and",
        "gate chains around the GEMMs); the fused head would read and write what the floor counts. The head does not",
        "depend on the transformer's depth (its condition is the transformer's width, 1536).", "",
        "| B | GPU | TFLOP / img | floor GB | floor ms | unfused GB | unfused launches | unfused ms (roofline) | unfused / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for batch in batches:
        floor, unfused = hart_diffusion_cost(cfg, batch), hart_diffusion_cost(cfg, batch, path="unfused")
        for key in gpus:
            f, u = roofline([floor], GPUS[key]), roofline([unfused], GPUS[key])
            lines.append(f"| {batch} | {GPUS[key].name} | {floor.flops / batch / 1e12:.2f} | {floor.bytes / 1e9:.1f} | "
                         f"{f.seconds * 1e3:.2f} | {unfused.bytes / 1e9:.1f} | {unfused.launches} | {u.seconds * 1e3:.2f} | "
                         f"{u.seconds / f.seconds:.2f}x |")
    lines += [
        "",
        "Does it need its own kernel? Not a new kind: at the floor the head is compute-bound (large GEMMs, 2B x 4096",
        "rows by 1024 wide, which cuBLAS runs near peak), and what upstream loses to the floor is its elementwise",
        "chains, the same shapes issue #20 fused in the transformer blocks: LayerNorm + modulate (`ada_ln_modulate`,",
        "with the norm's affine folded into the modulation), the second MLP GEMM + gated residual",
        "(`matmul_gated_residual`), and the first MLP GEMM + SiLU (`matmul_gelu`'s tile loop with a SiLU epilogue,",
        "not written yet). Per-token conditioning `cond_embed(z)` is the same at every step (upstream recomputes it:",
        "about 4% of the head's FLOPs) and can be computed once per batch. End to end (bf16, B=1, fused, H100 SXM) the",
        f"head is {head_share[0]:.0%} of the floor ({head_share[1]:.0%} of it compute-bound): the transformer's blocks,",
        "not the head, set HART's time.",
    ]
    return lines


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
    lines += _paths_section([p for p in ("d16", "d30") if p in presets], (1, 64), ("h100", "h200"))
    lines += _hart_section("hart_0.7b_1024px")
    for preset in presets:
        for batch in batches:
            lines += ["", f"## {preset}, B={batch}, {GPUS['h200'].name}", ""]
            lines += _stage_table(roofline(stage_costs(ModelConfig.preset(preset), batch), GPUS["h200"]), batch)
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    from .families.hart.config import PRESETS as HART_PRESETS  # noqa: PLC0415 (costs sits above the families)

    ap = argparse.ArgumentParser(description="Per-stage FLOPs, bytes and roofline time of one batch of VAR or HART sampling.")
    ap.add_argument("--preset", default="d16", choices=list(PRESET_DEPTHS) + list(HART_PRESETS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--gpu", default="h200", choices=list(GPUS))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-ssg", action="store_true", help="guidance without the SSG prior")
    ap.add_argument("--path", default="floor", choices=list(PATHS), help="how bytes and launches are counted (module docstring)")
    ap.add_argument("--report", metavar="PATH", help="write the Markdown report for every preset, B in {1,16,64} and GPU")
    args = ap.parse_args(argv)
    if args.report:
        Path(args.report).write_text(report())
        print(f"wrote {args.report}")
        return
    dtype = getattr(torch, args.dtype)
    if args.preset in HART_PRESETS:
        stages = hart_stage_costs(HART_PRESETS[args.preset], args.batch_size, dtype, ssg=not args.no_ssg, path=args.path)
    else:
        stages = stage_costs(ModelConfig.preset(args.preset), args.batch_size, dtype, ssg=not args.no_ssg, path=args.path)
    r = roofline(stages, GPUS[args.gpu])
    print(f"{args.preset}, B={args.batch_size}, {args.dtype}, SSG {'off' if args.no_ssg else 'on'}, {r.gpu.name}, path {args.path}")
    print("\n".join(_stage_table(r, args.batch_size)))
    if args.path != "floor":
        launches = sum(s.launches for s in stages)
        print(f"launches: {launches}; with launch overhead: {predicted(stages, r.gpu, 'graph') * 1e3:.2f} ms (graph), "
              f"{predicted(stages, r.gpu, 'eager') * 1e3:.2f} ms (eager)")


if __name__ == "__main__":
    main()
