"""VAR transformer (next-scale prediction), state-dict compatible with upstream ``var_d16.pth`` ... ``var_d30.pth``.

Shapes: ``B`` images, ``L`` tokens over all scales (680 for VAR-256), ``C`` width, ``V`` vocabulary,
``Cvae`` codebook dim. Sampling doubles the batch for classifier-free guidance (conditional half first).

``ssg_engine.models.var`` is this module, kept for compatibility.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import ops
from ...kernels.qkv_norm_rope_cache import qkv_norm_rope_reference
from ...models.family import KVStore
from ...models.layers import FFN
from .config import ModelConfig
from .tokenizer import VQVAE


class SelfAttention(nn.Module):
    """Multi-head attention with optional L2-normalised q/k and a learned per-head scale.

    ``forward`` is teacher forcing over a whole sequence; samplers call ``qkv_linear``, their KV store (which
    normalises q/k and caches k/v, see :mod:`ssg_engine.models.family`) and ``attend``. Both return the attention
    output before ``proj``: the block applies ``proj`` fused with its gate and residual.
    """

    def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def constants(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What ``qkv`` derives from the weights alone: the packed (q, 0, v) bias and the per-head q scale (or None);
        samplers compute them once per batch instead of once per call."""
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        return bias, self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp() if self.attn_l2_norm else None

    def qkv_linear(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(B, l, C) -> the packed q, k, v (B, l, 3C), bias (3C,) from :meth:`constants` included."""
        return F.linear(x, self.mat_qkv.weight, bias)

    def qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, l, C) -> q, k, v each (B, H, l, head_dim), with q/k normalisation and q scaling applied."""
        bias, scale_mul = self.constants()
        return qkv_norm_rope_reference(self.qkv_linear(x, bias), self.num_heads, scale_mul, None)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """q (B, H, l, d), k/v (B, H, S, d) -> attention output before ``proj`` (B, l, C)."""
        B, _, l, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return out.transpose(1, 2).reshape(B, l, -1)

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        return self.attend(*self.qkv(x), attn_bias)


class AdaLNSelfAttn(nn.Module):
    """Transformer block with adaptive LayerNorm (scale, shift, gate per sub-layer) from the class condition."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.C = C
        self.shared_aln = cfg.shared_aln
        self.attn = SelfAttention(C, cfg.num_heads, cfg.attn_l2_norm)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        if self.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """(gamma1, gamma2, scale1, scale2, shift1, shift2) stacked as (B, 1, 6, C).

        ``cond_BD`` is the class embedding (B, D), or with shared AdaLN the shared projection (B, 1, 6, C).
        """
        if self.shared_aln:
            return self.ada_gss + cond_BD
        return self.ada_lin(cond_BD).view(-1, 1, 6, self.C)

    def forward_modulated(self, x: torch.Tensor, mod: torch.Tensor, attn_fn: Any, backend: str = "reference") -> torch.Tensor:
        """Block body given the modulation ``mod`` (B, 1, 6, C); ``attn_fn`` maps normalised x (B, l, C) to the
        attention output before ``proj``. Five fused ops around the attention (``backend``: the sampler's; their
        references are upstream's eager sequence): LN + modulate, proj + gate + residual, LN + modulate, fc1 + GELU,
        fc2 + gate + residual."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        eps, attn, ffn = self.ln_wo_grad.eps, self.attn, self.ffn
        h = attn_fn(ops.ada_ln_modulate(x, scale1, shift1, eps, backend=backend))
        x = ops.matmul_gated_residual(x, h, attn.proj.weight, attn.proj.bias, gamma1, backend=backend)
        h = ops.matmul_gelu(ops.ada_ln_modulate(x, scale2, shift2, eps, backend=backend), ffn.fc1.weight, ffn.fc1.bias, backend=backend)
        return ops.matmul_gated_residual(x, h, ffn.fc2.weight, ffn.fc2.bias, gamma2, backend=backend)

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        return self.forward_modulated(x, self.modulation(cond_BD), lambda h: self.attn(h, attn_bias=attn_bias))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, eps: float) -> None:
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return ops.ada_ln_modulate(x_BLC, scale, shift, self.ln_wo_grad.eps, backend="reference")


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.weight.shape[0] // 6)


def level_buffers(patch_nums: Tuple[int, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``lvl_1L`` (1, L): each token's scale index; ``attn_bias_for_masking`` (1, 1, L, L): 0 where a token
    may attend (same or coarser scale), -inf elsewhere (the block-causal training mask)."""
    L = sum(pn * pn for pn in patch_nums)
    d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)]).view(1, L, 1)
    dT = d.transpose(1, 2)
    return dT[:, 0].contiguous(), torch.where(d >= dT, 0.0, -torch.inf).reshape(1, 1, L, L).contiguous()


@dataclasses.dataclass
class VARState:
    """One batch's sampling state (B images, 2B rows with the unconditional half for CFG).

    Conditioning is computed once per batch (AdaLN modulations of every block and of the head); ``x`` is the
    current scale's input (2B, h*w, C) and ``f_hat`` the accumulated latent (B, Cvae, H, W) in the VQ-VAE's dtype.
    """

    batch: int
    modulations: List[torch.Tensor]
    attn_constants: List[Tuple[torch.Tensor, Optional[torch.Tensor]]]  # per block: SelfAttention.constants()
    head_scale: torch.Tensor  # scale of the head's AdaLN, (2B, 1, C)
    head_shift: torch.Tensor
    lvl_pos: torch.Tensor  # (1, L, C)
    x: torch.Tensor
    f_hat: torch.Tensor


class VARTransformer(nn.Module):
    """Class-conditional next-scale-prediction transformer; upstream attribute names and state dict.

    It implements :class:`ssg_engine.models.family.NextScaleModel` (``condition``, ``step``, ``next_input``,
    ``decode``); upstream's drop-in ``autoregressive_infer_cfg`` is on :class:`ssg_engine.VAR`.
    """

    # The model card's SSG strength where it sets one (``SSG.for_model``: what ``SSG()`` without beta uses); None: 0.5.
    ssg_beta: Optional[float] = None

    def __init__(self, cfg: ModelConfig, vae: Optional[VQVAE] = None) -> None:
        super().__init__()
        self.config = cfg
        self.Cvae, self.V = cfg.Cvae, cfg.V
        self.depth, self.C, self.D, self.num_heads = cfg.depth, cfg.embed_dim, cfg.embed_dim, cfg.num_heads
        self.num_classes = cfg.num_classes
        self.cond_drop_rate = cfg.cond_drop_rate
        self.patch_nums: Tuple[int, ...] = cfg.patch_nums
        self.L = cfg.L
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends: List[Tuple[int, int]] = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        self.num_stages_minus_1 = len(self.patch_nums) - 1
        self.vae_proxy: Tuple[VQVAE, ...] = ()
        self.vae_quant_proxy: tuple = ()
        if vae is not None:
            self.attach_vae(vae)

        C = self.C
        self.word_embed = nn.Linear(self.Cvae, C)
        self.class_emb = nn.Embedding(self.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if cfg.shared_aln else nn.Identity()
        self.blocks = nn.ModuleList([AdaLNSelfAttn(cfg) for _ in range(cfg.depth)])

        lvl_1L, attn_bias = level_buffers(self.patch_nums)
        self.register_buffer("lvl_1L", lvl_1L)
        self.register_buffer("attn_bias_for_masking", attn_bias)

        self.head_nm = AdaLNBeforeHead(C, self.D, cfg.norm_eps)
        self.head = nn.Linear(C, self.V)

    def attach_vae(self, vae: VQVAE) -> None:
        """Link the tokenizer used for sampling (kept out of this module's state dict, as upstream)."""
        if vae.Cvae != self.Cvae or vae.V != self.V:
            raise ValueError(f"VQ-VAE (V={vae.V}, Cvae={vae.Cvae}) does not fit this VAR (V={self.V}, Cvae={self.Cvae})")
        self.vae_proxy = (vae,)
        self.vae_quant_proxy = (vae.quantize,)

    # ------------------------------------------------------------------ pieces shared by every sampler
    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Final AdaLN + head, in float32: (B, l, C) -> (B, l, V)."""
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    @property
    def vae(self) -> VQVAE:
        if not self.vae_proxy:
            raise RuntimeError("this VAR has no VQ-VAE attached: build it with VAR(cfg, vae) or call var.attach_vae(vae)")
        return self.vae_proxy[0]

    def lvl_pos(self) -> torch.Tensor:
        """Level + absolute position embedding (1, L, C)."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    # ------------------------------------------------------------------ teacher forcing
    def forward(self, label_B: torch.LongTensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, L, V) from labels (B,) and the next-scale inputs (B, L - first_l, Cvae).

        Label dropout (``cond_drop_rate``, label -> ``num_classes``) applies in training mode only.
        """
        B = x_BLCv_wo_first_l.shape[0]
        if tuple(x_BLCv_wo_first_l.shape[1:]) != (self.L - self.first_l, self.Cvae):
            raise ValueError(
                f"x_BLCv_wo_first_l must have shape (B, {self.L - self.first_l}, {self.Cvae}); got {tuple(x_BLCv_wo_first_l.shape)}"
            )
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(B, device=label_B.device) < self.cond_drop_rate
            label_B = torch.where(drop, self.num_classes, label_B)
        sos = cond_BD = self.class_emb(label_B)
        sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        x_BLC = x_BLC + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)
        attn_bias = self.attn_bias_for_masking.to(x_BLC.dtype)
        cond = self.shared_ada_lin(cond_BD)
        for block in self.blocks:
            x_BLC = block(x_BLC, cond, attn_bias)
        return self.get_logits(x_BLC, cond_BD)

    # ------------------------------------------------------------------ sampling (the NextScaleModel interface)
    def scale_sizes(self) -> List[Tuple[int, int]]:
        return [(pn, pn) for pn in self.patch_nums]

    def cache_layout(self) -> Tuple[int, int, int, int]:
        return self.depth, self.num_heads, self.L, self.C // self.num_heads

    @property
    def draw_width(self) -> int:
        """Logits per categorical draw: one draw over the V codebook entries per token."""
        return self.V

    def class_embeddings(self, labels: torch.Tensor) -> torch.Tensor:
        """Class embeddings (2B, C) of labels (B,) int64, then of the unconditional class (CFG's second half)."""
        return self.class_emb(torch.cat((labels, torch.full_like(labels, self.num_classes)), dim=0))

    def adaln_conditioning(self, cond_BD: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
        """AdaLN conditioning from class embeddings (2B, C): every block's modulation (2B, 1, 6, C), the head's
        ``scale`` and ``shift`` (2B, 1, C). :meth:`condition` computes it once per batch; upstream recomputes it
        at every scale (``sample_reference(per_scale_conditioning=True)`` does the same, to bench that cost)."""
        shared = self.shared_ada_lin(cond_BD)
        head_scale, head_shift = self.head_nm.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return [block.modulation(shared) for block in self.blocks], head_scale, head_shift

    def condition(self, labels: torch.Tensor) -> VARState:
        """State for labels (B,) int64: class embeddings of the labels and of the unconditional class, their
        AdaLN modulations (once per batch, not per scale), the first scale's input, a zero latent."""
        B = labels.shape[0]
        cond_BD = self.class_embeddings(labels)
        modulations, head_scale, head_shift = self.adaln_conditioning(cond_BD)
        lvl_pos = self.lvl_pos()
        x = cond_BD.unsqueeze(1).expand(2 * B, self.first_l, -1) + self.pos_start.expand(2 * B, self.first_l, -1)
        side = self.patch_nums[-1]
        vae_weight = self.vae.quantize.embedding.weight
        return VARState(
            batch=B,
            modulations=modulations,
            attn_constants=[block.attn.constants() for block in self.blocks],
            head_scale=head_scale,
            head_shift=head_shift,
            lvl_pos=lvl_pos,
            x=x + lvl_pos[:, : self.first_l],
            f_hat=torch.zeros(B, self.Cvae, side, side, device=vae_weight.device, dtype=vae_weight.dtype),
        )

    def step(self, state: VARState, si: int, kv: KVStore) -> torch.Tensor:
        """Logits (2B, pn*pn, V) of scale ``si`` in the model's dtype: the blocks over the state's input (keys and
        values go through the sampler's ``kv``), then the head."""
        start = self.begin_ends[si][0]

        def attention(h: torch.Tensor, layer: int, attn: SelfAttention) -> torch.Tensor:
            bias, scale_mul = state.attn_constants[layer]
            q, k, v = kv(layer, attn.qkv_linear(h, bias), start, num_heads=self.num_heads, scale_mul=scale_mul)
            return attn.attend(q, k, v, None)

        x = state.x
        for layer, block in enumerate(self.blocks):
            x = block.forward_modulated(x, state.modulations[layer], lambda h, i=layer, a=block.attn: attention(h, i, a), kv.backend)
        return self.head(ops.ada_ln_modulate(x, state.head_scale, state.head_shift, self.head_nm.ln_wo_grad.eps, backend=kv.backend))

    def next_input(self, state: VARState, si: int, tokens: torch.Tensor) -> None:
        """Add scale ``si``'s tokens (B, pn*pn) to the latent and embed the next scale's input."""
        self.next_input_embeddings(state, si, self.vae.quantize.embedding(tokens))

    def next_input_embeddings(self, state: VARState, si: int, h_BlC: torch.Tensor) -> None:
        """``next_input`` from codebook-space embeddings (B, pn*pn, Cvae) (upstream's ``more_smooth`` mode)."""
        B, pn, K = state.batch, self.patch_nums[si], len(self.patch_nums)
        h_BChw = h_BlC.transpose(1, 2).reshape(B, self.Cvae, pn, pn)
        state.f_hat, nxt = self.vae.quantize.get_next_autoregressive_input(si, K, state.f_hat, h_BChw)
        if si != K - 1:
            begin, end = self.begin_ends[si + 1]
            nxt = nxt.view(B, self.Cvae, -1).transpose(1, 2).to(self.word_embed.weight.dtype)
            state.x = (self.word_embed(nxt) + state.lvl_pos[:, begin:end]).repeat(2, 1, 1)

    def decode(self, state: VARState, backend: str = "reference") -> torch.Tensor:
        """Images (B, 3, H, W) float32 in [0, 1] from the accumulated latent (decoded in the decoder's dtype; the
        latent itself accumulates in the quantizer's, float32)."""
        f_hat = state.f_hat.to(self.vae.post_quant_conv.weight.dtype)
        return self.vae.fhat_to_img(f_hat, backend).float().add_(1).mul_(0.5)
