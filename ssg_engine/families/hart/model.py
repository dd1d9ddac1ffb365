"""HART transformer (text-to-image next-scale prediction), state-dict compatible with upstream ``HARTForT2I``.

Upstream: mit-han-lab/hart ``hart/modules/models/transformer/hart_transformer_t2i.py`` and
``hart/modules/networks/basic_hart.py``. Differences from VAR: the first scale's single token is replaced by
``Lc`` text tokens (attended bidirectionally among themselves at scale 0, their last position gives scale 0's
logits); RMSNorm instead of LayerNorm; AdaLN from the context pooled by max (blocks: max or masked mean); 2-D RoPE
on image tokens offset by the last context position id, 1-D RoPE on context tokens; the last scale adds a
continuous residual drawn by a diffusion head (:mod:`.diffusion`) to its codes' embedding.

Shapes: ``B`` images (``R = 2B`` rows under CFG: conditional half first; the unconditional half has an all-zero
context, mask ``[1, 0, ...]`` and position ids 0), ``Lc`` context tokens of width ``Cc``, ``C`` width, ``V``
vocabulary, ``Cvae`` codebook dim, ``S = Lc + sum(pn^2 for pn in patch_nums[1:])`` sequence length.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...models.family import KVStore, cast_copy
from .config import HARTConfig
from .diffusion import DiffusionHead, NoiseSource, TimestepEmbedder, UpstreamGlobalNoise
from .tokenizer import HARTTokenizer

Rope = Tuple[torch.Tensor, torch.Tensor]  # cos, sin (R, l, head_dim)


# ---------------------------------------------------------------------------------------------- layers


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Upstream's fused ``rms_norm`` kernel: float32 sum of squares / C, rsqrt, rounded to x's dtype, times weight."""
    xf = x.float()
    s = torch.rsqrt(xf.square().sum(-1, keepdim=True) / x.shape[-1] + eps)
    return (xf * s).to(x.dtype) * weight.to(x.dtype)


class RMSNorm(nn.Module):
    """Upstream ``LlamaRMSNormFused`` (it always has a weight, even where upstream asks for no affine)."""

    def __init__(self, C: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (-x[D/2:], x[:D/2]): dim i pairs with dim i + D/2."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x (R, H, l, D) with cos/sin (R, l, D): ``x * cos + rotate_half(x) * sin`` (upstream, HF Llama)."""
    cos, sin = rope
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


@functools.lru_cache(maxsize=None)
def _inv_freq(head_dim: int, stride: int, device: torch.device) -> torch.Tensor:
    """RoPE inverse frequencies (head_dim / stride,) float32, computed on the CPU and kept on ``device`` (no host copy
    per call: a captured CUDA graph's warm-up fills this cache; it never evicts)."""
    return (1.0 / (10000 ** (torch.arange(0, head_dim, stride, dtype=torch.int64).float() / head_dim))).to(device)


def context_rope(position_ids: torch.Tensor, head_dim: int) -> Rope:
    """1-D RoPE of the context tokens: position ids (R, Lc) -> cos, sin (R, Lc, D) float32."""
    freqs = position_ids.float()[..., None] * _inv_freq(head_dim, 2, position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@functools.lru_cache(maxsize=None)
def grid_positions(patch_nums: Tuple[int, ...], largest: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Row/column of every token of the scales ``patch_nums`` on the largest grid: (sum pn^2, 2) float32."""
    parts = []
    for pn in patch_nums:
        r = torch.arange(pn)
        grid = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1)
        parts.append((grid / pn * largest).reshape(-1, 2))
    return torch.cat(parts, 0).to(device)


def image_rope(positions: torch.Tensor, offset: torch.Tensor, head_dim: int) -> Rope:
    """2-D RoPE of image tokens at ``positions`` (l, 2) shifted by ``offset`` (R,) (the last context position id):
    cos, sin (R, l, D) laid out [row, row, col, col] over D/4 frequencies each."""
    pos = positions.to(offset.device)[None] + offset[:, None, None]  # (R, l, 2) float32
    inv = _inv_freq(head_dim, 4, offset.device)
    row, col = pos[..., 0:1] * inv, pos[..., 1:2] * inv
    emb = torch.cat((row, row, col, col), dim=-1)
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    """Upstream ``LlamaAttention``: packed qkv without k bias, optional L2-normalised q/k with a learned per-head
    scale (clamped at log 100), then RoPE (after the normalisation), SDPA, ``proj``."""

    def __init__(self, C: int, num_heads: int, attn_l2_norm: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, C // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = torch.log(torch.tensor(100, device="cpu")).item()  # upstream's float32 log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.qkv_proj = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def qkv(self, x: torch.Tensor, rope: Rope) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (R, l, C) -> q, k, v (R, H, l, D): normalised, scaled and rotated as upstream."""
        R, l, C = x.shape
        qkv = F.linear(x, self.qkv_proj.weight, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)))
        q, k, v = qkv.view(R, l, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        return apply_rope(q, rope), apply_rope(k, rope), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """q (R, H, l, D), k/v (R, H, S, D) -> ``proj`` of the attention output (R, l, C)."""
        R, _, l, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(R, l, -1))


class FFN(nn.Module):
    """``mlp_type="gpt2"``: fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, C: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, hidden), nn.Linear(hidden, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class LlamaMLP(nn.Module):
    """``mlp_type="llama"``: down(SiLU(gate(x)) * up(x)), no biases."""

    def __init__(self, C: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(C, hidden, bias=False)
        self.up_proj = nn.Linear(C, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def pool_context(cond: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Context embeddings (R, Lc, D) -> (R, 1, D): max over all tokens (padding included), or the masked mean."""
    if mode == "max":
        return cond.max(1, keepdim=True).values
    c_mask = mask.unsqueeze(-1)
    pooled = cond * c_mask.to(cond.dtype)
    return (pooled / c_mask.sum(1).clamp_(1).unsqueeze(1)).sum(1, keepdim=True)


class Block(nn.Module):
    """Upstream ``AdaLNSelfAttn`` (llama attention, no cross-attention, AdaLN from the pooled context)."""

    def __init__(self, cfg: HARTConfig) -> None:
        super().__init__()
        C = self.C = cfg.embed_dim
        self.attn = Attention(C, cfg.num_heads, cfg.attn_l2_norm)
        if cfg.mlp_type == "gpt2":
            self.ffn: nn.Module = FFN(C, round(C * cfg.mlp_ratio))
        else:
            self.ffn = LlamaMLP(C, int((C * cfg.mlp_ratio * 2) / 3 + 255) // 256 * 256)
        self.ln_wo_grad = RMSNorm(C, cfg.norm_eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def modulation(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled context (R, 1, D) -> (gamma1, gamma2, scale1, scale2, shift1, shift2) as (R, 1, 6, C)."""
        return self.ada_lin(pooled).view(-1, 1, 6, self.C)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, attn_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x (R, l, C); ``attn_fn`` maps the modulated, normalised x to the attention output after ``proj``."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        x = x + attn_fn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1)).mul_(gamma1)
        return x + self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, eps: float) -> None:
        super().__init__()
        self.C = C
        self.ln_wo_grad = RMSNorm(C, eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def scale_shift(self, cond: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Context embeddings (R, Lc, D) (max over all tokens) -> scale, shift (R, 1, C)."""
        scale, shift = self.ada_lin(cond.max(1, keepdim=True).values).view(-1, 1, 2, self.C).unbind(2)
        return scale, shift

    def forward(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


# ---------------------------------------------------------------------------------------------- conditions, state


def maskgit_groups(orders: torch.Tensor, num_iters: int) -> List[torch.Tensor]:
    """Upstream's MaskGIT schedule over the last scale: orders (B, L) (a permutation per row) -> the positions each
    pass predicts, (B, n_it) ascending per row (upstream selects them with a boolean mask). Pass ``it`` keeps
    ``m_it = max(1, min(m_{it-1} - 1, floor(L cos(pi/2 (it+1)/n))))`` masked (counts from row 0, equal in every row)
    and predicts ``orders[:, m_it:m_{it-1}]``; the last pass predicts what is left."""
    B, L = orders.shape
    groups, prev = [], L
    for it in range(num_iters):
        if it == num_iters - 1:
            groups.append(orders[:, :prev])
            break
        m = max(1, min(prev - 1, int(np.floor(L * np.cos(math.pi / 2.0 * (it + 1) / num_iters)))))
        groups.append(orders[:, m:prev])
        prev = m
    return [g.sort(dim=1).values for g in groups]


@dataclasses.dataclass
class HARTCondition:
    """What ``HARTTransformer.condition`` takes: text features ``context`` (B, Lc, Cc) float32 (the text encoder's
    output, upstream ``encode_prompts``), ``context_mask`` (B, Lc) (nonzero = real token), ``context_position_ids``
    (B, Lc) int64 (default ``cumsum(mask) - 1``, upstream's rule). ``diffusion_cfg``: the CFG weight of the last
    scale's diffusion head; ``noise``: its noise source (default: upstream's global generators); ``residual=False``
    skips the head (upstream ``final_stage != 0``: the last scale's codes only). ``num_maskgit_iters``: passes over
    the last scale, each on the tokens :func:`maskgit_groups` picks from ``maskgit_orders`` (B, pn_last^2) (one
    permutation per image; needed when ``num_maskgit_iters > 1``)."""

    context: torch.Tensor
    context_mask: torch.Tensor
    context_position_ids: Optional[torch.Tensor] = None
    diffusion_cfg: float = 1.0
    noise: Optional[NoiseSource] = None
    residual: bool = True
    num_maskgit_iters: int = 1
    maskgit_orders: Optional[torch.Tensor] = None


@dataclasses.dataclass
class HARTState:
    """One batch's sampling state (``R = 2B`` rows). ``x``: the current scale's input (R, l, C); ``f_hat``: the
    accumulated latent (B, Cvae, H, W); ``hidden``: the last scale's final hidden states (R, l, C), kept by ``step``
    for the diffusion head; ``hard_tokens``: the last scale's drawn codes (B, l) (the head's condition, even when
    soft embeddings are fed); ``groups``: the positions of each MaskGIT pass over the last scale; ``residual``: the
    continuous residual once drawn (B, l, Cvae)."""

    batch: int
    modulations: List[torch.Tensor]
    head_scale: torch.Tensor
    head_shift: torch.Tensor
    ropes: List[Rope]  # per scale: cos, sin (R, l, D)
    lvl_pos: torch.Tensor  # (1, S, C)
    x: torch.Tensor
    f_hat: torch.Tensor
    diffusion_cfg: float
    noise: NoiseSource
    groups: List[torch.Tensor]  # the last scale's MaskGIT passes: positions (B, n_it), ascending per row
    use_residual: bool = True
    hidden: Optional[torch.Tensor] = None
    hard_tokens: Optional[torch.Tensor] = None
    residual: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------------------------- the model


class HARTTransformer(nn.Module):
    """Upstream attribute names and state dict (``llm/`` weights); implements
    :class:`ssg_engine.models.family.NextScaleModel`. The tokenizer is attached, not part of the state dict."""

    def __init__(self, cfg: HARTConfig, tokenizer: Optional[HARTTokenizer] = None, Cvae: int = 32, V: int = 4096) -> None:
        super().__init__()
        self.config = cfg
        if tokenizer is not None:
            Cvae, V = tokenizer.Cvae, tokenizer.V
        self.Cvae, self.V, self.C, self.depth, self.num_heads = Cvae, V, cfg.embed_dim, cfg.depth, cfg.num_heads
        self.head_dim = self.C // self.num_heads
        self.patch_nums = tuple(cfg.patch_nums)
        self.context_token = Lc = cfg.context_token
        self.begin_ends: List[Tuple[int, int]] = [(0, Lc)]
        for pn in self.patch_nums[1:]:
            self.begin_ends.append((self.begin_ends[-1][1], self.begin_ends[-1][1] + pn * pn))
        self.S = self.begin_ends[-1][1]
        C = self.C
        self.word_embed = nn.Linear(Cvae, C)
        self.context_embed = nn.Linear(cfg.context_dim, C)
        self.context_norm = RMSNorm(cfg.context_dim, cfg.norm_eps) if cfg.use_context_norm else nn.Identity()
        self.lvl_embed = TimestepEmbedder(C) if cfg.use_timestep_embed else nn.Embedding(len(self.patch_nums), C)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        levels = torch.cat([torch.zeros(Lc, dtype=torch.long)] + [torch.full((pn * pn,), i + 1) for i, pn in enumerate(self.patch_nums[1:])])
        self.register_buffer("lvl_1L", levels.view(1, -1), persistent=False)
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, V)
        self.decoder_norm = RMSNorm(C, cfg.norm_eps)
        self.diffloss = DiffusionHead(Cvae, C, cfg.diff_width, cfg.diff_depth, cfg.num_sampling_steps)
        self.tokenizer_proxy: Tuple[HARTTokenizer, ...] = ()
        if tokenizer is not None:
            self.attach_tokenizer(tokenizer)

    def attach_tokenizer(self, tokenizer: HARTTokenizer) -> None:
        """Link the hybrid tokenizer used for sampling (kept out of this module's state dict, as upstream)."""
        if tokenizer.Cvae != self.Cvae or tokenizer.V != self.V or tokenizer.patch_nums != self.patch_nums:
            raise ValueError("tokenizer does not fit this HART (Cvae, V or patch_nums differ)")
        self.tokenizer_proxy = (tokenizer,)

    def attach_vae(self, vae: HARTTokenizer) -> None:
        """:meth:`attach_tokenizer` under the name the Engine's placement calls (VAR's)."""
        self.attach_tokenizer(vae)

    def inference_copy(self, dtype: torch.dtype, device: Union[str, torch.device]) -> "HARTTransformer":
        """A copy for sampling on ``device`` under ``torch.autocast(dtype)`` (upstream samples under float16 autocast:
        every linear layer runs in it, the head and the diffusion head included): the weights and biases of every
        linear layer cast once to ``dtype`` (the values autocast's cast would give), every other tensor as it is
        (float32). The attached tokenizer is moved to ``device`` (in place) and shared, not copied."""
        tokenizer = (self.tokenizer.to(device=device).eval(),) if self.tokenizer_proxy else ()
        linears = [t for m in self.modules() if isinstance(m, nn.Linear) for t in m.parameters()]
        return cast_copy(self, linears, dtype, device, shared=tokenizer)

    @property
    def tokenizer(self) -> HARTTokenizer:
        if not self.tokenizer_proxy:
            raise RuntimeError("this HART has no tokenizer attached: call attach_tokenizer(tokenizer)")
        return self.tokenizer_proxy[0]

    # ------------------------------------------------------------------ shared pieces
    def lvl_pos(self) -> torch.Tensor:
        """Level embedding of every position (1, S, C)."""
        emb = self.lvl_embed(self.lvl_1L[0]) if isinstance(self.lvl_embed, TimestepEmbedder) else self.lvl_embed(self.lvl_1L)
        return emb.view(1, self.S, self.C)

    def embed_context(self, context: torch.Tensor) -> torch.Tensor:
        """Text features (R, Lc, Cc) -> context embeddings (R, Lc, C) (the first scale's input and the AdaLN source)."""
        return self.context_embed(self.context_norm(context))

    def check_context(self, context: torch.Tensor, mask: torch.Tensor, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Validate; return the position ids (default ``cumsum(mask) - 1``)."""
        shape = (self.context_token, self.context_embed.in_features)
        if context.ndim != 3 or tuple(context.shape[1:]) != shape:
            raise ValueError(f"context must have shape (B, {shape[0]}, {shape[1]}); got {tuple(context.shape)}")
        if mask.shape != context.shape[:2]:
            raise ValueError(f"context_mask must have shape {tuple(context.shape[:2])}; got {tuple(mask.shape)}")
        if position_ids is None:
            return torch.cumsum(mask.long(), dim=1) - 1
        if position_ids.shape != context.shape[:2]:
            raise ValueError(f"context_position_ids must have shape {tuple(context.shape[:2])}; got {tuple(position_ids.shape)}")
        return position_ids

    def get_logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Head AdaLN (max-pooled context) + head in float32: (R, l, C) -> (R, l, V)."""
        scale, shift = self.head_nm.scale_shift(cond)
        return self.head(self.head_nm(h.float(), scale, shift).float()).float()

    # ------------------------------------------------------------------ teacher forcing
    def forward(
        self, context: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, context_position_ids: Optional[torch.Tensor], context_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced logits (B, L, V) (scale 0 from the last context position, then every later token) from
        text features (B, Lc, Cc) and the next-scale inputs (B, L - 1, Cvae); no MaskGIT token dropping (upstream's
        training forward drops a random part of the last scale; with nothing dropped it computes this)."""
        hidden, cond = self.hidden_states(context, x_BLCv_wo_first_l, context_position_ids, context_mask)
        return self.get_logits(hidden, cond)[:, self.context_token - 1 :]

    def hidden_states(
        self, context: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, context_position_ids: Optional[torch.Tensor], context_mask: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The teacher-forced pass of :meth:`forward` up to the head: final hidden states (B, S, C) of every position
        (context first) and the context embeddings (B, Lc, C) (the head's AdaLN source). Training reads the last
        scale's hidden states for the diffusion head's condition."""
        pos_ids = self.check_context(context, context_mask, context_position_ids)
        B, Lc = context.shape[:2]
        if tuple(x_BLCv_wo_first_l.shape[1:]) != (self.S - Lc, self.Cvae):
            raise ValueError(f"x_BLCv_wo_first_l must have shape (B, {self.S - Lc}, {self.Cvae}); got {tuple(x_BLCv_wo_first_l.shape)}")
        cond = self.embed_context(context)
        x = torch.cat((cond, self.word_embed(x_BLCv_wo_first_l.float())), dim=1) + self.lvl_pos()
        levels = self.lvl_1L[0]
        bias = torch.where(levels[:, None] >= levels[None, :], 0.0, -torch.inf).view(1, 1, self.S, self.S)
        c_cos, c_sin = context_rope(pos_ids, self.head_dim)
        positions = grid_positions(self.patch_nums[1:], self.patch_nums[-1])
        i_cos, i_sin = image_rope(positions, pos_ids[:, -1], self.head_dim)
        rope = (torch.cat((c_cos, i_cos), 1), torch.cat((c_sin, i_sin), 1))
        pooled = pool_context(cond, context_mask, self.config.sep_aln_pooling_mode)
        for block in self.blocks:
            x = block(x, block.modulation(pooled), lambda h, a=block.attn: a.attend(*a.qkv(h, rope), bias))
        return x, cond

    # ------------------------------------------------------------------ sampling (the NextScaleModel interface)
    def scale_sizes(self) -> List[Tuple[int, int]]:
        return [(pn, pn) for pn in self.patch_nums]

    def cache_layout(self) -> Tuple[int, int, int, int]:
        return self.depth, self.num_heads, self.S, self.head_dim

    @property
    def draw_width(self) -> int:
        return self.V

    def condition(self, cond: HARTCondition) -> HARTState:
        """State for one batch: context embeddings of the text and of the unconditional branch (zero context, mask
        [1, 0, ...], position ids 0), AdaLN modulations, RoPE tables of every scale, scale 0's input, a zero latent."""
        if not isinstance(cond, HARTCondition):
            raise TypeError(f"cond must be a HARTCondition; got {type(cond).__name__}")
        pos_ids = self.check_context(cond.context, cond.context_mask, cond.context_position_ids)
        B = cond.context.shape[0]
        ctx = self.embed_context(torch.cat((cond.context, torch.zeros_like(cond.context)), dim=0))
        mask = torch.cat((cond.context_mask, torch.zeros_like(cond.context_mask)))
        mask[B:, 0] = 1
        pos_ids = torch.cat((pos_ids, torch.zeros_like(pos_ids)), dim=0)
        pooled = pool_context(ctx, mask, self.config.sep_aln_pooling_mode)
        head_scale, head_shift = self.head_nm.scale_shift(ctx)
        offset = pos_ids[:, -1]
        ropes = [context_rope(pos_ids, self.head_dim)]
        largest = self.patch_nums[-1]
        for pn in self.patch_nums[1:]:
            ropes.append(image_rope(grid_positions((pn,), largest, offset.device), offset, self.head_dim))
        lvl_pos = self.lvl_pos()
        qw = self.tokenizer.quantize.embedding.weight
        last = self.patch_nums[-1] ** 2
        if cond.num_maskgit_iters < 1:
            raise ValueError(f"num_maskgit_iters must be >= 1; got {cond.num_maskgit_iters}")
        if cond.num_maskgit_iters == 1:
            groups = [torch.arange(last, device=ctx.device).expand(B, last)]
        elif cond.maskgit_orders is None or tuple(cond.maskgit_orders.shape) != (B, last):
            raise ValueError(f"maskgit_orders (B, {last}) are required with num_maskgit_iters > 1")
        else:
            groups = maskgit_groups(cond.maskgit_orders.to(ctx.device).long(), cond.num_maskgit_iters)
        return HARTState(
            batch=B, modulations=[block.modulation(pooled) for block in self.blocks], head_scale=head_scale,
            head_shift=head_shift, ropes=ropes, lvl_pos=lvl_pos, x=ctx + lvl_pos[:, : self.context_token],
            f_hat=qw.new_zeros(B, self.Cvae, largest, largest), diffusion_cfg=float(cond.diffusion_cfg),
            noise=cond.noise if cond.noise is not None else UpstreamGlobalNoise(), groups=groups, use_residual=bool(cond.residual),
        )

    def step(self, state: HARTState, si: int, kv: KVStore) -> torch.Tensor:
        """Logits (R, pn*pn, V) of scale ``si`` (scale 0: of the last context position). The last scale runs one pass
        per MaskGIT group (``state.groups``), each on its tokens of the same input map, each appending its keys and
        values; logits and hidden states (``state.hidden``) come back in grid order.

        Keys and values go through ``kv`` already normalised and rotated (HART's RoPE pairs dims half a head apart
        with separate row/column angles, which ``kv``'s pairwise rotation cannot express): ``kv`` gets no
        ``scale_mul``/``rope``."""
        if si < len(self.patch_nums) - 1:
            x = self._blocks(state, state.x, self.begin_ends[si][0], state.ropes[si], kv)
            if si == 0:
                x = x[:, -1:]
            return self.head(self.head_nm(x.float(), state.head_scale, state.head_shift).float()).float()
        start, (cos, sin) = self.begin_ends[si][0], state.ropes[si]
        hidden = torch.empty_like(state.x)
        for group in state.groups:
            index = torch.cat([group, group], dim=0)  # both CFG halves on the conditional rows' positions
            gather = lambda t: t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
            x = self._blocks(state, gather(state.x), start, (gather(cos), gather(sin)), kv)
            hidden.scatter_(1, index[..., None].expand(-1, -1, x.shape[-1]), x)
            start += group.shape[1]
        state.hidden = hidden
        return self.head(self.head_nm(hidden.float(), state.head_scale, state.head_shift).float()).float()

    def _blocks(self, state: HARTState, x: torch.Tensor, start: int, rope: Rope, kv: KVStore) -> torch.Tensor:
        """The blocks over x (R, l, C) at cache positions ``[start, start + l)`` -> final hidden states (R, l, C)."""

        def attention(h: torch.Tensor, layer: int, attn: Attention) -> torch.Tensor:
            q, k, v = attn.qkv(h, rope)
            R, H, l, D = q.shape
            packed = torch.stack((q, k, v), dim=2).permute(0, 3, 2, 1, 4).reshape(R, l, 3 * H * D)
            q, k, v = kv(layer, packed, start, num_heads=H)
            return attn.attend(q, k, v, None)

        for layer, block in enumerate(self.blocks):
            x = block(x, state.modulations[layer], lambda h, i=layer, a=block.attn: attention(h, i, a))
        return x

    def next_input(self, state: HARTState, si: int, tokens: torch.Tensor) -> None:
        """Add scale ``si``'s tokens (B, pn*pn) to the latent; at the last scale also draw the continuous residual."""
        if si == len(self.patch_nums) - 1:
            state.hard_tokens = tokens
        self.next_input_embeddings(state, si, self.tokenizer.quantize.embedding(tokens))

    def next_input_embeddings(self, state: HARTState, si: int, h_BlC: torch.Tensor) -> None:
        """``next_input`` from codebook-space embeddings (B, pn*pn, Cvae) (upstream's ``more_smooth``). At the last
        scale the diffusion head's residual is added (its condition: ``state.hard_tokens``, set by ``next_input`` or
        by the sampler before this call) and the sum enters the latent without the refinement conv."""
        B, pn, K = state.batch, self.patch_nums[si], len(self.patch_nums)
        if si < K - 1:
            h_BChw = h_BlC.transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            state.f_hat, nxt = self.tokenizer.quantize.get_next_autoregressive_input(si, K, state.f_hat, h_BChw)
            begin, end = self.begin_ends[si + 1]
            nxt = nxt.view(B, self.Cvae, -1).transpose(1, 2)
            state.x = (self.word_embed(nxt) + state.lvl_pos[:, begin:end]).repeat(2, 1, 1)
            return
        tokens = h_BlC
        if state.use_residual:
            if state.hard_tokens is None or state.hidden is None:
                raise ValueError("the last scale needs step() and the drawn tokens (state.hard_tokens) before its embeddings")
            state.residual = self.residual(state, state.hidden, state.hard_tokens)
            tokens = h_BlC + state.residual
        state.f_hat = state.f_hat + tokens.transpose(1, 2).reshape(B, self.Cvae, pn, pn)

    def residual(self, state: HARTState, hidden: torch.Tensor, hard_tokens: torch.Tensor) -> torch.Tensor:
        """The diffusion head's continuous residual (B, l, Cvae) for the last scale's hidden states (R, l, C) and
        drawn codes (B, l), one draw per MaskGIT group in order: condition ``decoder_norm(hidden +
        word_embed(codebook[codes]))`` (both halves), CFG ``state.diffusion_cfg`` on epsilon, conditional half kept."""
        out = hidden.new_empty(state.batch, hidden.shape[1], self.Cvae, dtype=torch.float32)  # as upstream's, under autocast too
        for group in state.groups:
            d = self.word_embed(self.tokenizer.quantize.embedding(hard_tokens.gather(1, group)))
            index = torch.cat([group, group], dim=0)[..., None]
            z = self.decoder_norm(hidden.gather(1, index.expand(-1, -1, hidden.shape[-1])) + torch.cat([d, d], dim=0))
            R, n, C = z.shape
            r = self.diffloss.sample(z.reshape(R * n, C), state.diffusion_cfg, state.noise).reshape(R, n, -1)[: state.batch]
            out.scatter_(1, group[..., None].expand(-1, -1, self.Cvae), r.float())
        return out

    def decode(self, state: HARTState, backend: str = "reference") -> torch.Tensor:
        """Images (B, 3, H, W) float32 in [0, 1] from the accumulated latent."""
        return self.tokenizer.fhat_to_img(state.f_hat, backend).float().add_(1).mul_(0.5)
