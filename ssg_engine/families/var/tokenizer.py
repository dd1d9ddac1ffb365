"""Multi-scale residual VQ-VAE, state-dict compatible with upstream VAR's ``vae_ch160v4096z32.pth``.

Shapes: images ``(B, 3, H, W)`` in [-1, 1]; latent ``f`` ``(B, Cvae, h, w)`` with ``h = H / 16``;
token maps per scale ``(B, pn*pn)`` int64, row-major over the ``pn x pn`` grid.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import ops
from .config import ModelConfig

# ----------------------------------------------------------------------------- conv backbone


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _norm_act(norm: nn.GroupNorm, x: torch.Tensor, backend: str, act: str = "silu") -> torch.Tensor:
    """``F.silu(norm(x))`` (``act="none"``: ``norm(x)``) through ``ops.group_norm_silu``: the reference backend runs
    exactly that eager code, the Triton backend one fused kernel."""
    return ops.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, act=act, backend=backend)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, backend: str = "reference") -> torch.Tensor:
        h = self.conv1(_norm_act(self.norm1, x, backend))
        h = self.conv2(_norm_act(self.norm2, h, backend))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a fused 1x1 qkv conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.C = channels
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, backend: str = "reference") -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(_norm_act(self.norm, x, backend, act="none")).reshape(B, 3, C, H * W).unbind(1)
        w = torch.bmm(q.permute(0, 2, 1), k).mul_(C ** -0.5).softmax(dim=2)  # (B, HW_q, HW_k)
        h = torch.bmm(v, w.permute(0, 2, 1)).view(B, C, H, W)
        return x + self.proj_out(h)


class Downsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _attn_or_identity(channels: int, enabled: bool) -> nn.Module:
    return AttnBlock(channels) if enabled else nn.Identity()


def _attn(attn: nn.Module, h: torch.Tensor, backend: str) -> torch.Tensor:
    """An ``AttnBlock`` with ``backend``, or the ``nn.Identity`` standing in for a disabled one."""
    return attn(h, backend) if isinstance(attn, AttnBlock) else attn(h)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch, mults = cfg.ch, cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(mults):
            last = level == len(mults) - 1
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                if last and cfg.using_sa:
                    stage.attn.append(AttnBlock(block_in))
            if not last:
                stage.downsample = Downsample2x(block_in)
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = _attn_or_identity(block_in, cfg.using_mid_sa)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.Cvae, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch, mults = cfg.ch, cfg.ch_mult
        block_in = ch * mults[-1]
        self.conv_in = nn.Conv2d(cfg.Cvae, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = _attn_or_identity(block_in, cfg.using_mid_sa)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        stages: List[nn.Module] = []
        for level in reversed(range(len(mults))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * mults[level]))
                block_in = ch * mults[level]
                if level == len(mults) - 1 and cfg.using_sa:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample2x(block_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)  # indexed by level, applied from the last level down
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor, backend: str = "reference") -> torch.Tensor:
        """Latent (B, Cvae, h, w) -> image (B, 3, 16h, 16w), not clamped; ``backend`` runs each GroupNorm (+ SiLU)
        through ``ops.group_norm_silu`` ("reference": the eager code, bit for bit; "triton": one kernel each)."""
        h = self.mid.block_1(self.conv_in(z), backend)
        h = self.mid.block_2(_attn(self.mid.attn_1, h, backend), backend)
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h, backend)
                if len(stage.attn):
                    h = stage.attn[i](h, backend)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(_norm_act(self.norm_out, h, backend))


# ----------------------------------------------------------------------------- quantizer


class Phi(nn.Conv2d):
    """Residual refinement ``phi(h) = (1 - r) * h + r * conv3x3(h)`` applied to each scale's upsampled embedding."""

    def __init__(self, channels: int, resi_ratio: float, kernel_size: int = 3) -> None:
        super().__init__(channels, channels, kernel_size, 1, kernel_size // 2)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


def _phi_ticks(k: int) -> np.ndarray:
    return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


class PhiShared(nn.Module):
    def __init__(self, qresi: nn.Module) -> None:
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, _: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """``share_quant_resi = K`` refinements; scale at relative depth ``t`` in [0, 1] uses the nearest tick."""

    def __init__(self, qresi_ls: nn.ModuleList) -> None:
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = _phi_ticks(len(qresi_ls))

    def __getitem__(self, at_0_to_1: float) -> nn.Module:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - at_0_to_1)))]


class PhiNonShared(nn.ModuleList):
    def __init__(self, qresi: List[nn.Module]) -> None:
        super().__init__(qresi)
        self.ticks = _phi_ticks(len(qresi))

    def __getitem__(self, at_0_to_1: float) -> nn.Module:
        return super().__getitem__(int(np.argmin(np.abs(self.ticks - at_0_to_1))))


class VectorQuantizer2(nn.Module):
    """Multi-scale residual quantizer (upstream's ``VectorQuantizer2``; same buffers and method names)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.vocab_size, self.Cvae, self.using_znorm = cfg.V, cfg.Cvae, cfg.using_znorm
        self.v_patch_nums: Tuple[int, ...] = cfg.patch_nums
        self.beta = cfg.beta

        def make_phi() -> nn.Module:
            return Phi(cfg.Cvae, cfg.quant_resi) if abs(cfg.quant_resi) > 1e-6 else nn.Identity()

        if cfg.share_quant_resi == 0:
            self.quant_resi = PhiNonShared([make_phi() for _ in cfg.patch_nums])
        elif cfg.share_quant_resi == 1:
            self.quant_resi = PhiShared(make_phi())
        else:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([make_phi() for _ in range(cfg.share_quant_resi)]))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.V))
        self.embedding = nn.Embedding(cfg.V, cfg.Cvae)

    def phi(self, si: int) -> nn.Module:
        """The refinement used at scale index ``si``."""
        return self.quant_resi[si / (len(self.v_patch_nums) - 1)]

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry for each row of ``z_NC`` (N, Cvae) -> (N,)."""
        codebook = self.embedding.weight.data
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(codebook.T, dim=0), dim=1)
        d = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(codebook.square(), dim=1, keepdim=False)
        d.addmm_(z_NC, codebook.T, alpha=-2, beta=1)
        return torch.argmin(d, dim=1)

    def f_to_idxBl_or_fhat(
        self, f_BChw: torch.Tensor, to_fhat: bool, v_patch_nums: Optional[Sequence[Union[int, Tuple[int, int]]]] = None
    ) -> List[torch.Tensor]:
        """Residual quantization of ``f`` (B, Cvae, H, W): per scale the tokens (B, ph*pw) or the running f_hat."""
        B, C, H, W = f_BChw.shape
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        hws = [(p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in (v_patch_nums or self.v_patch_nums)]
        if hws[-1] != (H, W):
            raise ValueError(f"the last scale {hws[-1]} must equal the latent size {(H, W)}")
        out: List[torch.Tensor] = []
        last = len(hws) - 1
        for si, (ph, pw) in enumerate(hws):
            rest = f_rest if si == last else F.interpolate(f_rest, size=(ph, pw), mode="area")
            idx_N = self.nearest_code(rest.permute(0, 2, 3, 1).reshape(-1, C))
            h = self.embedding(idx_N.view(B, ph, pw)).permute(0, 3, 1, 2)
            h = h.contiguous() if si == last else F.interpolate(h, size=(H, W), mode="bicubic").contiguous()
            h = self.quant_resi[si / last](h)
            f_hat.add_(h)
            f_rest.sub_(h)
            out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, ph * pw))
        return out

    def embed_to_fhat(
        self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool = True, last_one: bool = False
    ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Sum the refined, upsampled per-scale embeddings (B, Cvae, pn, pn) into f_hat (B, Cvae, H, W)."""
        B = ms_h_BChw[0].shape[0]
        H = W = self.v_patch_nums[-1]
        last = len(self.v_patch_nums) - 1
        outs: List[torch.Tensor] = []
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, H, W, dtype=torch.float32)
            for si in range(len(self.v_patch_nums)):
                h = ms_h_BChw[si]
                if si < last:
                    h = F.interpolate(h, size=(H, W), mode="bicubic")
                f_hat.add_(self.quant_resi[si / last](h))
                outs.append(f_hat if last_one else f_hat.clone())
        else:  # experimental upstream mode: grow f_hat scale by scale
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, self.v_patch_nums[0], self.v_patch_nums[0], dtype=torch.float32)
            for si, pn in enumerate(self.v_patch_nums):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic")
                f_hat.add_(self.quant_resi[si / last](ms_h_BChw[si]))
                outs.append(f_hat)
        return outs[-1] if last_one else outs

    def idxBl_to_var_input(self, gt_ms_idx_Bl: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """Teacher-forcing input of VAR: (B, L - first_l, Cvae), each scale's f_hat area-downsampled to the next scale."""
        B, C = gt_ms_idx_Bl[0].shape[0], self.Cvae
        H = W = self.v_patch_nums[-1]
        SN = len(self.v_patch_nums)
        f_hat = gt_ms_idx_Bl[0].new_zeros(B, C, H, W, dtype=torch.float32)
        next_scales = []
        for si in range(SN - 1):
            pn = self.v_patch_nums[si]
            h = F.interpolate(self.embedding(gt_ms_idx_Bl[si]).transpose_(1, 2).view(B, C, pn, pn), size=(H, W), mode="bicubic")
            f_hat.add_(self.quant_resi[si / (SN - 1)](h))
            pn_next = self.v_patch_nums[si + 1]
            next_scales.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").view(B, C, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1) if next_scales else None

    def get_next_autoregressive_input(
        self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add scale ``si``'s embedding (B, Cvae, pn, pn) to ``f_hat`` in place; return f_hat and the next scale's input."""
        HW = self.v_patch_nums[-1]
        if si != SN - 1:
            f_hat.add_(self.quant_resi[si / (SN - 1)](F.interpolate(h_BChw, size=(HW, HW), mode="bicubic")))
            nxt = self.v_patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")
        f_hat.add_(self.quant_resi[si / (SN - 1)](h_BChw))
        return f_hat, f_hat


# ----------------------------------------------------------------------------- VQ-VAE


class VQVAE(nn.Module):
    """Encoder -> quant_conv -> multi-scale residual quantizer -> post_quant_conv -> decoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.V = self.vocab_size = cfg.V
        self.Cvae = cfg.Cvae
        self.downsample = cfg.downsample
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer2(cfg)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(cfg.Cvae, cfg.Cvae, ks, 1, ks // 2)
        self.post_quant_conv = nn.Conv2d(cfg.Cvae, cfg.Cvae, ks, 1, ks // 2)

    def fhat_to_img(self, f_hat: torch.Tensor, backend: str = "reference") -> torch.Tensor:
        """(B, Cvae, h, w) -> image (B, 3, 16h, 16w) in [-1, 1]; ``backend`` as in :meth:`Decoder.forward`."""
        return self.decoder(self.post_quant_conv(f_hat), backend).clamp_(-1, 1)

    def img_to_idxBl(
        self, inp_img_no_grad: torch.Tensor, v_patch_nums: Optional[Sequence[Union[int, Tuple[int, int]]]] = None
    ) -> List[torch.Tensor]:
        """Image (B, 3, H, W) in [-1, 1] -> tokens per scale, each (B, pn*pn) int64."""
        size = self.config.image_size
        if inp_img_no_grad.ndim != 4 or inp_img_no_grad.shape[1] != self.config.in_channels:
            raise ValueError(
                f"img_to_idxBl expects images of shape (B, {self.config.in_channels}, H, W); got {tuple(inp_img_no_grad.shape)}"
            )
        if v_patch_nums is None and tuple(inp_img_no_grad.shape[-2:]) != (size, size):
            raise ValueError(
                f"img_to_idxBl expects {size}x{size} images for patch_nums {self.config.patch_nums}; "
                f"got {tuple(inp_img_no_grad.shape[-2:])}"
            )
        f = self.quant_conv(self.encoder(inp_img_no_grad))
        return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_img(
        self, ms_idx_Bl: List[torch.Tensor], same_shape: bool, last_one: bool = False
    ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Tokens per scale -> image(s) in [-1, 1] (the last one, or one per scale)."""
        B = ms_idx_Bl[0].shape[0]
        ms_h = []
        for idx_Bl in ms_idx_Bl:
            pn = round(idx_Bl.shape[1] ** 0.5)
            ms_h.append(self.quantize.embedding(idx_Bl).transpose(1, 2).view(B, self.Cvae, pn, pn))
        return self.embed_to_img(ms_h, all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(
        self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool, last_one: bool = False
    ) -> Union[List[torch.Tensor], torch.Tensor]:
        f = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=last_one)
        return self.fhat_to_img(f) if last_one else [self.fhat_to_img(x) for x in f]

    def img_to_reconstructed_img(
        self, x: torch.Tensor, v_patch_nums: Optional[Sequence[Union[int, Tuple[int, int]]]] = None, last_one: bool = False
    ) -> Union[List[torch.Tensor], torch.Tensor]:
        f = self.quant_conv(self.encoder(x))
        fhats = self.quantize.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=v_patch_nums)
        return self.fhat_to_img(fhats[-1]) if last_one else [self.fhat_to_img(x) for x in fhats]
