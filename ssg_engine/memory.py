"""Memory plans: the bytes one Engine batch holds, computed from a config before loading anything, and the largest
batch that fits a device. :class:`MemoryPlan` is shared by the families (VAR's plan is ``ssg_engine.plan.plan``);
:func:`infinity_plan` is Infinity's, used by ``ssg_engine.plan`` and by the Engine's guard (it refuses a batch the
plan says will not fit, before allocating); :func:`hart_plan` is HART's (its docstring says what its lines count).

Infinity, ``B`` images (``2B`` rows: the Engine always runs CFG's two halves), schedule with ``L`` tokens, last scale
``l`` tokens (``H x W`` latent), width ``C``, ``d`` bits, text padded to ``T = text_maxlen``:

- weights: the Engine's copy (``InfinityTransformer.inference_copy``: linear weights in ``dtype``, the rest float32)
  and the BSQ VAE (float32), counted on the meta device; a float32 model given on the same device adds its own;
- KV cache: K and V for every layer, ``2B`` rows, ``L`` tokens, ``C`` (exact: the Engine's static cache);
- condition: the cross-attention keys and values of every block, ``2 * depth * 2B * T * C`` in ``dtype`` (padded
  text, as with CUDA graphs; exact), and the AdaLN modulations ``depth * 2B * 6C`` float32;
- logits: at the last scale the head's ``(2B, l, 2d)`` float32 output, its temperature-scaled copy, the guided and
  CFG logits ``(B, l, 2d)`` and the previous scale's ``(B, l_prev, 2d)`` kept for the prior;
- activations: one block at the last scale, ``2B * l * (6 + 2 * mlp_ratio) * C`` elements in ``dtype`` (an estimate,
  as VAR's; no attention scores: self- and cross-attention run as SDPA);
- decode: the VAE decoder's peak, about four feature maps of the full-resolution level (``4 * B * base_ch *
  decoder_ch_mult[0] * (16H) * (16W)`` elements in ``dtype``, an estimate).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from .families.hart.config import PRESETS as HART_PRESETS
from .families import family
from .families.hart.config import ENGINE_CUDA_DTYPE, HARTConfig, HARTTokenizerConfig
from .families.hart.model import HARTTransformer, LlamaMLP
from .families.hart.tokenizer import HARTTokenizer
from .families.infinity.model import INFINITY_PRESETS, InfinityConfig, InfinityTransformer, as_schedule
from .families.infinity.tokenizer import BSQVAE, BSQVAEConfig

GiB = 1 << 30
CONTEXT_BYTES = 1 * GiB  # CUDA context, cuBLAS workspaces, allocator fragmentation


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def module_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Parameters and buffers of ``module`` with its floating-point tensors in ``dtype`` (integer buffers as they are)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * (itemsize(dtype) if t.is_floating_point() else t.element_size()) for t in tensors)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes held by the Engine for one batch (see ``ssg_engine.plan`` and this module's docstring for what each line
    counts); ``condition`` is what the batch's conditioning holds for the whole loop (Infinity's text keys/values,
    HART's modulations and RoPE tables); ``diffusion`` is the peak of HART's diffusion head at the last scale;
    ``gumbel`` is the scratch of HART's ``more_smooth`` Gumbel draw at the last scale (0 without it)."""

    batch: int
    dtype: torch.dtype
    weights: int
    kv_cache: int
    logits: int
    activations: int
    decode: int
    condition: int = 0
    diffusion: int = 0
    gumbel: int = 0

    @property
    def total(self) -> int:
        """Peak: weights + KV cache + condition + the largest of (last-scale logits + the larger of the activations and
        the Gumbel scratch), the diffusion head and the decode (they run one after the other)."""
        last_scale = self.logits + max(self.activations, self.gumbel)
        return self.weights + self.kv_cache + self.condition + max(last_scale, self.diffusion, self.decode)

    def fits(self, gpu_bytes: int) -> bool:
        return self.total + CONTEXT_BYTES <= gpu_bytes

    def table(self, gpu_bytes: Union[int, None] = None) -> str:
        rows = [("weights", self.weights), ("KV cache", self.kv_cache)]
        rows += [("condition (text, modulations, RoPE)", self.condition)] if self.condition else []
        rows += [("logits (last scale)", self.logits), ("activations (one block, last scale)", self.activations)]
        rows += [("more_smooth Gumbel draw (last scale)", self.gumbel)] if self.gumbel else []
        rows += [("diffusion head (last scale)", self.diffusion)] if self.diffusion else []
        rows += [("VAE decode", self.decode), ("peak total", self.total)]
        lines = [f"batch {self.batch}, {str(self.dtype).removeprefix('torch.')}"]
        lines += [f"  {name:<38} {value / GiB:8.2f} GiB" for name, value in rows]
        if gpu_bytes is not None:
            verdict = "fits" if self.fits(gpu_bytes) else "does NOT fit"
            lines.append(f"  {verdict} in {gpu_bytes / GiB:.1f} GiB (keeping {CONTEXT_BYTES / GiB:.0f} GiB for the CUDA context)")
        return "\n".join(lines)


def infinity_plan(
    config: Union[str, InfinityConfig], schedule: Sequence[Sequence[int]], dtype: torch.dtype = torch.bfloat16, batch: int = 1,
    vae: Optional[BSQVAEConfig] = None,
) -> MemoryPlan:
    """The memory plan of ``batch`` images of Infinity ``config`` (a preset name such as ``"infinity_2b"`` or an
    ``InfinityConfig``) sampled at ``schedule`` ((h, w) per scale, e.g. ``scale_schedule(1.0, "1M")``) by an Engine in
    ``dtype``, with the BSQ VAE ``vae`` (default: the released one for the config's ``codebook_dim``)."""
    cfg = InfinityConfig.preset(config) if isinstance(config, str) else config
    if not isinstance(cfg, InfinityConfig):
        raise TypeError(f"config must be an Infinity preset name ({', '.join(INFINITY_PRESETS)}) or an InfinityConfig; got {type(config).__name__}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    sched = as_schedule(schedule)
    vae_cfg = BSQVAEConfig.released(cfg.codebook_dim) if vae is None else vae
    with torch.device("meta"):
        model, vae_model = InfinityTransformer(cfg), BSQVAE(vae_cfg)
    low = model.low_precision_tensors()
    weights = module_bytes(model, torch.float32) - sum(t.numel() for t in low) * (4 - itemsize(dtype))
    size, rows, C, two_d = itemsize(dtype), 2 * batch, cfg.embed_dim, 2 * cfg.codebook_dim
    L = sum(h * w for h, w in sched)
    last = sched[-1][0] * sched[-1][1]
    prev = sched[-2][0] * sched[-2][1] if len(sched) > 1 else 0
    H, W = (n * vae_cfg.patch_size for n in sched[-1])
    return MemoryPlan(
        batch=batch,
        dtype=dtype,
        weights=weights + module_bytes(vae_model, torch.float32),
        kv_cache=2 * cfg.depth * rows * L * C * size,
        condition=2 * cfg.depth * rows * cfg.text_maxlen * C * size + cfg.depth * rows * 6 * C * 4,
        logits=(2 * rows * last + 2 * batch * last + batch * prev) * two_d * 4,
        activations=int(rows * last * (6 + 2 * cfg.mlp_ratio) * C * size),
        decode=4 * batch * vae_cfg.base_ch * vae_cfg.decoder_ch_mult[0] * H * W * size,
    )


@functools.lru_cache(maxsize=16)
def _hart_layout(cfg: HARTConfig, tokenizer: HARTTokenizerConfig, dtype: torch.dtype) -> Tuple[int, int, int, int, int]:
    """(weight bytes of the Engine's copy in ``dtype`` (``HARTTransformer.inference_copy``: linear weights and biases
    in ``dtype``, every other tensor float32) and of the float32 tokenizer, the MLP's hidden width, its hidden tensors
    per token (2 GELU, 3 SwiGLU), vocabulary, codebook channels), counted on the meta device (cached: a bisection over
    the batch asks for the same config many times)."""
    with torch.device("meta"):
        tok = HARTTokenizer(tokenizer, cfg.patch_nums)
        model = HARTTransformer(cfg, tok)
    ffn = model.blocks[0].ffn
    hidden, k = (ffn.gate_proj.out_features, 3) if isinstance(ffn, LlamaMLP) else (ffn.fc1.out_features, 2)
    linear = sum(t.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for t in m.parameters())
    weights = module_bytes(model, torch.float32) - linear * (4 - itemsize(dtype)) + module_bytes(tok, torch.float32)
    return weights, hidden, k, model.V, model.Cvae


def hart_plan(
    config: Union[str, HARTConfig], batch: int, dtype: Optional[torch.dtype] = None, tokenizer: Optional[HARTTokenizerConfig] = None,
    *, more_smooth: bool,
) -> MemoryPlan:
    """The memory plan of ``batch`` images of HART ``config`` (a preset name such as ``"hart_0.7b_1024px"`` or a
    ``HARTConfig``) by an Engine in ``dtype`` (one of the HART registry entry's ``engine_dtypes``; default
    ``ENGINE_CUDA_DTYPE``, float16, what the Engine runs at on CUDA), with the hybrid tokenizer ``tokenizer`` (default:
    ``HARTTokenizerConfig()``, the released layout), ``more_smooth`` (soft Gumbel-softmax inputs; ``HART_UPSTREAM``
    has it on) counted or not. ``B`` images, ``2B`` rows (CFG), ``S`` = context tokens plus every scale after the
    first (``config.seq_len``; the MaskGIT passes fill the last scale's positions), last scale ``l`` tokens, width
    ``C``, vocabulary ``V``, diffusion width ``W``, codebook channels ``Cvae``; "in ``dtype``" is what autocast makes
    (outputs of linear layers), the rest float32:

    - weights: the Engine's copy (``HARTTransformer.inference_copy``: the weights and biases of every linear layer in
      ``dtype``, every other tensor float32) and the float32 tokenizer, counted on the meta device;
    - KV cache: K and V for every layer, ``2B`` rows, ``S`` tokens, ``C``, in ``dtype`` (exact: the Engine's static cache);
    - condition: what the batch's state (``HARTTransformer.condition``) holds for the whole loop: the AdaLN
      modulations ``depth * 2B * 6C`` and the head's scale and shift ``2 * 2B * C`` (in ``dtype``), the level
      embeddings ``S * C`` (in ``dtype`` from the timestep embedder, float32 from an embedding table), the RoPE cos/sin
      tables of every position ``2 * 2B * S * head_dim`` and the latent ``B * Cvae * pn_last^2`` (float32) (exact);
    - logits: at the last scale the head's ``(2B, l, V)`` float32 output, the guided and CFG logits ``(B, l, V)`` and
      the previous scale's ``(B, l_prev, V)`` kept for the prior (as VAR's);
    - activations: one block over the last scale, ``2B * l * (6C + k * hidden)`` elements (``k`` = 2 for the GELU
      MLP, 3 for SwiGLU's gate, up and product), plus the scale's input and hidden states ``2 * 2B * l * C`` kept by
      the state, in ``dtype`` (an estimate, as VAR's);
    - gumbel (``more_smooth`` only): the last scale's Gumbel draw (``request.seeded_gumbel`` over ``(B, l, V)``): its
      int64 counter and the hash's live int64 intermediates, four tensors of ``B * l * V`` elements (the draw's peak
      measured on the CPU: 32 bytes per element with one seed, 28 with per-row seeds; more than the soft embeddings'
      float32 tensors after it; 0.5 GiB per image at 64x64, V = 4096);
    - diffusion: the head over the last scale's ``N = 2B * l`` rows: the hidden states, their condition and its norm
      (``3C``) and one res-block's live tensors (``x``, the step's condition, the AdaLN output ``3W``, the modulated
      input, the MLP's hidden layer and its SiLU: ``8W``) in ``dtype``, and the sampling loop's float32 latents (the
      sample, its noise, the step's mean and log-variance: ``4 Cvae``), ``N * ((3C + 8W) * size + 16 Cvae)`` bytes
      (an estimate);
    - decode: the tokenizer decoder's peak, four feature maps of its full-resolution level (``4 * B * ch * ch_mult[0] *
      (16 pn_last)^2`` elements in ``dtype``, an estimate as VAR's).
    """
    cfg = HART_PRESETS[config] if isinstance(config, str) and config in HART_PRESETS else config
    if not isinstance(cfg, HARTConfig):
        raise TypeError(f"config must be a HART preset name ({', '.join(HART_PRESETS)}) or a HARTConfig; got {config!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    dtype = getattr(torch, ENGINE_CUDA_DTYPE) if dtype is None else dtype
    names = family("hart").engine_dtypes
    if str(dtype).removeprefix("torch.") not in names:
        raise ValueError(f"dtype: the HART Engine runs at {', '.join(names)}; got {dtype}")
    tok_cfg = HARTTokenizerConfig() if tokenizer is None else tokenizer
    weights, hidden, k, V, Cvae = _hart_layout(cfg, tok_cfg, dtype)
    size, B, rows, C, S, D = itemsize(dtype), batch, 2 * batch, cfg.embed_dim, cfg.seq_len, cfg.embed_dim // cfg.num_heads
    last, prev = cfg.patch_nums[-1] ** 2, cfg.patch_nums[-2] ** 2
    side = cfg.patch_nums[-1] * 2 ** (len(tok_cfg.ch_mult) - 1)
    lvl_size = size if cfg.use_timestep_embed else 4
    return MemoryPlan(
        batch=batch,
        dtype=dtype,
        weights=weights,
        kv_cache=2 * cfg.depth * rows * S * C * size,
        condition=(cfg.depth * rows * 6 * C + 2 * rows * C) * size + S * C * lvl_size + (2 * rows * S * D + B * Cvae * last) * 4,
        logits=(rows * last + 2 * B * last + B * prev) * V * 4,
        activations=rows * last * (6 * C + k * hidden + 2 * C) * size,
        gumbel=4 * B * last * V * 8 if more_smooth else 0,
        diffusion=rows * last * ((3 * C + 8 * cfg.diff_width) * size + 4 * Cvae * 4),
        decode=4 * B * tok_cfg.ch * tok_cfg.ch_mult[0] * side * side * size,
    )


def largest_batch(plan_of: Callable[[int], MemoryPlan], gpu_bytes: int, limit: int = 4096) -> int:
    """The largest batch ``b <= limit`` whose plan ``plan_of(b)`` fits ``gpu_bytes`` (0 if not even one image does);
    plans grow with the batch, so a bisection."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan_of(mid).fits(gpu_bytes):
            lo = mid
        else:
            hi = mid - 1
    return lo
