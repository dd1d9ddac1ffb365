"""BSQ VQ-VAE of Infinity (binary spherical quantization, multi-scale), state-dict compatible with upstream's
``infinity_vae_d*.pth`` (``{"vae": state_dict}``; FoundationVision/Infinity, ``infinity/models/bsq_vae``, commit 4c27bbb).

Shapes: images ``(B, 3, H, W)`` in [-1, 1]; latent ``(B, d, h, w)`` with ``h = H / patch_size`` and ``d`` bits per token;
a scale schedule is a list of ``(1, h, w)``, the last one the latent size; bits of a scale ``(B, 1, h, w, d)`` in {0, 1};
codes of a scale ``(B, d, 1, h, w)`` with every entry ``±1/sqrt(d)``; summed codes ``(B, d, 1, H', W')`` at the last scale.

Memory formats follow upstream's on purpose: codes are a channels-last view and the summed codes stay channels-last, so
``decode(summed.squeeze(-3))`` runs the same (channels-last) CPU kernels as upstream's sampler.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import ops

Schedule = Sequence[Sequence[int]]
UP_MODE = "trilinear"  # codes and summed codes between scales (upstream's z_interplote_up)
DOWN_MODE = "area"  # residual to a scale when encoding (upstream's z_interplote_down)


@dataclasses.dataclass(frozen=True)
class BSQVAEConfig:
    """Architecture of the BSQ VQ-VAE (upstream ``vae_model`` arguments; defaults: the released ``infinity_vae_d32``)."""

    codebook_dim: int = 32
    base_ch: int = 128
    num_res_blocks: int = 2
    encoder_ch_mult: Tuple[int, ...] = (1, 2, 4, 4, 4)
    decoder_ch_mult: Tuple[int, ...] = (1, 2, 4, 4, 4)
    patch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            object.__setattr__(self, name, tuple(int(m) for m in getattr(self, name)))
        if self.codebook_dim < 1 or self.base_ch < 1 or self.num_res_blocks < 1:
            raise ValueError(f"invalid BSQVAEConfig {self}: codebook_dim, base_ch and num_res_blocks must be positive")
        if self.patch_size < 1 or self.patch_size & (self.patch_size - 1):
            raise ValueError(f"invalid BSQVAEConfig: patch_size must be a power of 2 (got {self.patch_size})")
        for mults in (self.encoder_ch_mult, self.decoder_ch_mult):
            if len(mults) <= self.num_down or any(m < 1 for m in mults):
                raise ValueError(f"invalid BSQVAEConfig: ch_mult {mults} needs more than log2(patch_size) positive levels")

    @property
    def num_down(self) -> int:
        """Number of 2x down/up-sampling stages, ``log2(patch_size)``."""
        return self.patch_size.bit_length() - 1

    @classmethod
    def released(cls, codebook_dim: int, apply_spatial_patchify: bool = False) -> "BSQVAEConfig":
        """The released VAEs' architecture (upstream ``tools/run_infinity.py`` ``load_visual_tokenizer``)."""
        if apply_spatial_patchify:
            return cls(codebook_dim=codebook_dim, encoder_ch_mult=(1, 2, 4, 4), decoder_ch_mult=(1, 2, 4, 4), patch_size=8)
        return cls(codebook_dim=codebook_dim)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> "BSQVAEConfig":
        """The config that the shapes of an upstream state dict determine (all fields are determined)."""
        try:
            base_ch = sd["encoder.conv_in.conv.weight"].shape[0]
            codebook_dim = sd["encoder.conv_out.conv.weight"].shape[0]
        except KeyError as e:
            raise ValueError(f"not a BSQ VAE state dict: {e.args[0]!r} missing") from None
        except IndexError:
            raise ValueError("BSQ VAE state dict: encoder.conv_in / conv_out weights have no channel dimension; the checkpoint is damaged") from None

        def levels(prefix: str) -> List[int]:
            n = 0
            while f"{prefix}.{n}.block.0.conv1.conv.weight" in sd:
                n += 1
            return [sd[f"{prefix}.{i}.block.0.conv1.conv.weight"].shape[0] // base_ch for i in range(n)]

        num_res_blocks = sum(1 for k in sd if k.startswith("encoder.down.0.block.") and k.endswith(".conv1.conv.weight"))
        num_down = sum(1 for k in sd if k.startswith("encoder.down.") and k.endswith(".downsample.conv.conv.weight"))
        try:
            mults = tuple(levels("encoder.down")), tuple(levels("decoder.up"))
        except (IndexError, ZeroDivisionError):  # a 0-d tensor, or zero channels
            raise ValueError("BSQ VAE state dict: a block's conv weight has no channel dimension; the checkpoint is damaged") from None
        return cls(codebook_dim=codebook_dim, base_ch=base_ch, num_res_blocks=num_res_blocks,
                   encoder_ch_mult=mults[0], decoder_ch_mult=mults[1], patch_size=2 ** num_down)


# ----------------------------------------------------------------------------- conv backbone
# Upstream wraps each conv in a module with a ``conv`` attribute and each GroupNorm in one with ``norm``: the key
# names (``*.conv.weight``, ``*.norm.weight``) require the same nesting here.


class Conv(nn.Module):
    """``nn.Conv2d`` under the attribute ``conv``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Normalize(nn.Module):
    """GroupNorm (eps 1e-6) under the attribute ``norm``: 32 groups if they divide the channels, else 24."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        groups = 32 if channels % 32 == 0 else 24 if channels % 24 == 0 else 0
        if not groups:
            raise ValueError(f"BSQ VAE GroupNorm: {channels} channels is a multiple of neither 32 nor 24")
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def swish(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)``, written out as upstream does (``F.silu`` may round differently)."""
    return x * torch.sigmoid(x)


def _norm_swish(norm: Normalize, x: torch.Tensor, backend: str) -> torch.Tensor:
    """``swish(norm(x))`` through ``ops.group_norm_silu(act="swish")``: the reference backend runs exactly that eager
    code (upstream's written-out swish stays this family's; the VQ-VAE uses ``F.silu``), the Triton backend one kernel."""
    gn = norm.norm
    return ops.group_norm_silu(x, gn.weight, gn.bias, gn.num_groups, gn.eps, act="swish", backend=backend)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1 = Normalize(in_ch)
        self.conv1 = Conv(in_ch, out_ch, 3, 1, 1)
        self.norm2 = Normalize(out_ch)
        self.conv2 = Conv(out_ch, out_ch, 3, 1, 1)
        if in_ch != out_ch:
            self.nin_shortcut = Conv(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, backend: str = "reference") -> torch.Tensor:
        h = self.conv1(_norm_swish(self.norm1, x, backend))
        h = self.conv2(_norm_swish(self.norm2, h, backend))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Zero-pad right and bottom by 1, then a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """Nearest 2x, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> latent (B, d, H / patch, W / patch)."""

    def __init__(self, cfg: BSQVAEConfig) -> None:
        super().__init__()
        ch = cfg.base_ch
        self.conv_in = Conv(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(cfg.encoder_ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
            if level < cfg.num_down:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _mid(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = Conv(block_in, cfg.codebook_dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, d, h, w) -> image (B, 3, h * patch, w * patch), not clamped."""

    def __init__(self, cfg: BSQVAEConfig) -> None:
        super().__init__()
        ch, mults = cfg.base_ch, cfg.decoder_ch_mult
        block_in = ch * mults[-1]
        self.conv_in = Conv(cfg.codebook_dim, block_in, 3, 1, 1)
        self.mid = _mid(block_in)
        stages: List[nn.Module] = []
        for level in reversed(range(len(mults))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * mults[level]))
                block_in = ch * mults[level]
            if 1 <= level <= cfg.num_down:
                stage.upsample = Upsample(block_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)  # indexed by level, run from the last level down
        self.norm_out = Normalize(block_in)
        self.conv_out = Conv(block_in, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor, backend: str = "reference") -> torch.Tensor:
        """``backend`` runs each GroupNorm + swish through ``ops.group_norm_silu`` ("reference": the eager code, bit
        for bit; "triton": one kernel each)."""
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z), backend), backend)
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h, backend)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(_norm_swish(self.norm_out, h, backend))


# ----------------------------------------------------------------------------- quantizer


class BSQ(nn.Module):
    """One scale of binary spherical quantization: each token's d-vector is L2-normalised, then snapped to the
    nearest corner ``±1/sqrt(d)`` of the hypercube on the unit sphere; bit k is 1 where component k is positive."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        # bit weights, most significant first (upstream's ``mask``, part of its state dict)
        self.register_buffer("mask", 2 ** torch.arange(dim - 1, -1, -1))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Residual (B, d, 1, h, w) -> (quantized (B, d, 1, h, w), channels-last view; bits (B, 1, h, w, d) int32)."""
        B, d, t, h, w = x.shape
        z = F.normalize(x.permute(0, 2, 3, 4, 1).contiguous().view(B, t * h * w, d), dim=-1)  # tokens (B, n, d)
        one = z.new_ones(())
        corner = torch.where(z > 0, one, -one)
        # upstream's straight-through form z + (corner - z); in float it is not exactly ``corner``
        quantized = z + (corner * (1.0 / d ** 0.5) - z)
        bits = (quantized > 0).int().reshape(B, t, h, w, d)
        return quantized.reshape(B, t, h, w, d).permute(0, 4, 1, 2, 3), bits

    def indices_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """Bit labels (B, 1, h, w, d) -> codes (B, d, 1, h, w) (:func:`bits_to_codes`)."""
        return bits_to_codes(bits)


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """Bit labels (B, 1, h, w, d) (any integer or float dtype) -> codes (B, d, 1, h, w) = ±1/sqrt(d), a channels-last
    view (upstream ``indices_to_codes(bits, 'bit_label')``)."""
    scale = 1.0 / math.sqrt(bits.shape[-1])
    return F.normalize(bits * scale * 2 - scale, dim=-1).permute(0, 4, 1, 2, 3)


def accumulate_codes(
    summed: Optional[torch.Tensor], codes: torch.Tensor, si: int, scale_schedule: Schedule
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Add scale ``si``'s codes (B, d, 1, h, w) to the summed codes (B, d, 1, H', W') (None before scale 0), upsampled
    to the last scale except at the last scale itself, as upstream's sampler does. Returns ``(summed, next_input)``,
    ``next_input`` the next scale's transformer input (B, h' * w', d) row-major, None at the last scale."""
    if si == len(scale_schedule) - 1:
        return (codes.clone() if summed is None else summed + codes), None
    up = F.interpolate(codes, size=tuple(scale_schedule[-1]), mode=UP_MODE)
    summed = up if summed is None else summed + up
    nxt = F.interpolate(summed, size=tuple(scale_schedule[si + 1]), mode=UP_MODE).squeeze(-3)
    return summed, nxt.reshape(*nxt.shape[:2], -1).permute(0, 2, 1)


class MultiScaleBSQ(nn.Module):
    """Residual BSQ over a schedule of scales (upstream's ``MultiScaleBSQ`` with identity projections, no layer norm)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lfq = BSQ(dim)

    def forward(self, h: torch.Tensor, scale_schedule: Schedule) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Latent (B, d, H, W) -> (sum of the quantized scales (B, d, H, W), bits per scale (B, 1, h, w, d) int32).

        Per scale: the residual area-downsampled to (h, w), quantized, upsampled back (trilinear) and subtracted.
        """
        full = (1, h.shape[-2], h.shape[-1])
        _check_schedule(scale_schedule, full[1:])
        residual = h.unsqueeze(2).contiguous()
        out: Union[float, torch.Tensor] = 0.0
        all_bits = []
        for size in scale_schedule:
            size = tuple(int(s) for s in size)
            small = residual if size == full else F.interpolate(residual, size=size, mode=DOWN_MODE)
            quantized, bits = self.lfq(small)
            if size != full:
                quantized = F.interpolate(quantized, size=full, mode=UP_MODE).contiguous()
            residual = residual - quantized
            out = out + quantized
            all_bits.append(bits)
        return out.contiguous().squeeze(2), all_bits


def _check_schedule(scale_schedule: Schedule, latent_hw: Sequence[int]) -> None:
    if not scale_schedule or any(len(s) != 3 or int(s[0]) != 1 for s in scale_schedule):
        raise ValueError(f"scale_schedule must be a non-empty list of (1, h, w); got {scale_schedule!r}")
    if tuple(int(s) for s in scale_schedule[-1][1:]) != tuple(latent_hw):
        raise ValueError(f"the last scale {tuple(scale_schedule[-1])} must be the latent size (1, {latent_hw[0]}, {latent_hw[1]})")


# ----------------------------------------------------------------------------- VAE


class BSQEncoding(NamedTuple):
    """``h``: encoder output (B, d, H, W); ``z``: sum of the quantized scales (B, d, H, W);
    ``bits``: per scale (B, 1, h, w, d) int32."""

    h: torch.Tensor
    z: torch.Tensor
    bits: List[torch.Tensor]


class BSQVAE(nn.Module):
    """Encoder -> multi-scale BSQ -> decoder. Sampling uses ``next_scale`` per scale and ``decode`` at the end."""

    def __init__(self, cfg: BSQVAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.codebook_dim = cfg.codebook_dim
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = MultiScaleBSQ(cfg.codebook_dim)
        # upstream registers the quantizer a second time under this name: its state dict holds both keys
        self.quantize = self.quantizer

    @torch.no_grad()
    def encode(self, x: torch.Tensor, scale_schedule: Schedule) -> BSQEncoding:
        """Image (B, 3, H, W) in [-1, 1] -> encoder output, quantized latent and bits per scale."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encode expects images of shape (B, 3, H, W); got {tuple(x.shape)}")
        h = self.encoder(x)
        z, bits = self.quantizer(h, scale_schedule)
        return BSQEncoding(h, z, bits)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, backend: str = "reference") -> torch.Tensor:
        """Summed codes (B, d, h, w) -> image (B, 3, h * patch, w * patch) clamped to [-1, 1]; ``backend`` as in
        :meth:`Decoder.forward`."""
        return self.decoder(z, backend).clamp(-1, 1)

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """Bits (B, 1, h, w, d) -> codes (B, d, 1, h, w) (upstream ``lfq.indices_to_codes(bits, 'bit_label')``)."""
        return self.quantizer.lfq.indices_to_codes(bits)

    def next_scale(
        self, summed: Optional[torch.Tensor], bits: torch.Tensor, si: int, scale_schedule: Schedule
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Add scale ``si``'s bits to the summed codes; as upstream's sampler does.

        ``summed``: (B, d, 1, H', W') or None before scale 0. Returns ``(codes (B, d, 1, h, w), summed,
        next_input)``, ``next_input`` the next scale's transformer input (B, h' * w', d) row-major, None at the last scale.
        """
        codes = self.bits_to_codes(bits)
        return (codes, *accumulate_codes(summed, codes, si, scale_schedule))

    def bits_to_x_BLC(self, bits: Sequence[torch.Tensor], scale_schedule: Schedule) -> Tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forcing input from all scales' bits: ``(x_BLC_wo_prefix (B, L - 1, d), summed codes (B, d, 1, H', W'))``."""
        if len(bits) != len(scale_schedule):
            raise ValueError(f"{len(bits)} scales of bits for a schedule of {len(scale_schedule)} scales")
        summed, xs = None, []
        for si, b in enumerate(bits):
            _, summed, nxt = self.next_scale(summed, b, si, scale_schedule)
            if nxt is not None:
                xs.append(nxt)
        x = torch.cat(xs, 1) if xs else summed.new_zeros(summed.shape[0], 0, self.codebook_dim)
        return x, summed


# ----------------------------------------------------------------------------- loading

ConfigLike = Union[None, BSQVAEConfig, Mapping[str, object]]


def _vae_state(ckpt: Union[str, Path, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The state dict of an upstream VAE file (``{"vae": sd}``), of such a mapping, or a plain state dict."""
    if isinstance(ckpt, (str, Path)):
        path = Path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"BSQ VAE checkpoint not found: {path}")
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"a BSQ VAE checkpoint must be a mapping, got {type(ckpt).__name__}")
    sd = ckpt.get("vae", ckpt)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError('a BSQ VAE checkpoint must be a state dict or {"vae": state dict}')
    return dict(sd)


def load_bsq_vae(
    path: Union[str, Path, Mapping[str, torch.Tensor]], config: ConfigLike = None, device: Union[str, torch.device] = "cpu"
) -> BSQVAE:
    """Load an upstream BSQ VAE checkpoint into a ``BSQVAE`` in eval mode.

    ``config``: a ``BSQVAEConfig``, a dict of its fields, or None to infer it from the shapes. Every key of the model
    must be in the checkpoint with its shape, except the constant bit masks (``*.lfq.mask``, checked when present).
    """
    sd = _vae_state(path)
    if config is None:
        cfg = BSQVAEConfig.from_state_dict(sd)
    elif isinstance(config, BSQVAEConfig):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = BSQVAEConfig(**config)
    else:
        raise TypeError(f"config must be None, a BSQVAEConfig or a dict; got {type(config).__name__}")
    with torch.device("meta"):
        vae = BSQVAE(cfg)
    expected = vae.state_dict()
    mask = 2 ** torch.arange(cfg.codebook_dim - 1, -1, -1)
    problems = []
    for key, ref in expected.items():
        if key.endswith("lfq.mask"):
            if key in sd and not torch.equal(sd[key].cpu(), mask):
                problems.append(f"{key} is not the bit mask of d = {cfg.codebook_dim}")
            sd[key] = mask.clone()
        elif key not in sd:
            problems.append(f"missing {key}")
        elif tuple(sd[key].shape) != tuple(ref.shape):
            problems.append(f"{key}: shape {tuple(sd[key].shape)}, expected {tuple(ref.shape)} for {cfg}")
    problems += [f"unexpected {k}" for k in sd if k not in expected]
    if problems:
        raise ValueError(f"BSQ VAE checkpoint does not match the model ({len(problems)} problems): " + "; ".join(problems[:5]))
    vae.load_state_dict({k: v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype)
                         for k, v in sd.items()}, strict=True, assign=True)
    return vae.eval().requires_grad_(False)
