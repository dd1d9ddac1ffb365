"""HART's residual diffusion head: an AdaLN MLP denoiser (upstream ``DiffLoss.net``, ``SimpleMLPAdaLN``) and its
iDDPM sampler (cosine schedule over 1000 steps, respaced to ``num_sampling_steps``, learned-range variance,
epsilon prediction, ``clip_denoised``), in upstream's order of operations.

Upstream: mit-han-lab/hart ``hart/modules/diffusion/{diffloss,gaussian_diffusion,respace}.py``. The sampler has
static shapes (every row is at the same step: no boolean indexing). Noise comes from a :class:`NoiseSource`.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, List, Optional, Protocol, Tuple

import numpy as np
import torch
import torch.nn as nn

VAE_SCALE = 0.6  # upstream DiffLoss.vae_scale: the head denoises residual / 0.6
TRAIN_STEPS = 1000


@functools.lru_cache(maxsize=None)
def _frequencies(half: int, max_period: float, device: torch.device) -> torch.Tensor:
    """(half,) float32 computed on the CPU (upstream's order), kept on ``device`` (never evicted: no host copy per call,
    so a captured CUDA graph reads it)."""
    return torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(device)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim) float32, [cos, sin] halves (GLIDE/DiT)."""
    half = dim // 2
    freqs = _frequencies(half, max_period, t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoid (256) -> Linear -> SiLU -> Linear (upstream names ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, C: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(C, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(C, C), nn.SiLU(), nn.Linear(C, C))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 3 * C))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, C: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(C, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """Denoiser: x (N, Cvae), original timesteps t (N,), condition c (N, Cz) -> (N, 2 Cvae) = [eps, variance logits]."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int, num_res_blocks: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """CFG on epsilon only; both branches denoise the conditional half's x (upstream ``forward_with_cfg``)."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = cond_eps * (1 + cfg_scale) - cfg_scale * uncond_eps
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def space_timesteps(num_timesteps: int, section_counts: str) -> List[int]:
    """Upstream's respacing (sections of equal length, Python ``round``: ties to even), sorted."""
    if section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim"):])
        for i in range(1, num_timesteps):
            if len(range(0, num_timesteps, i)) == desired:
                return list(range(0, num_timesteps, i))
        raise ValueError(f"num_sampling_steps: cannot create exactly {desired} steps with an integer stride")
    counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"num_sampling_steps: cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


class SpacedSchedule:
    """Float64 tables of the respaced cosine schedule (upstream ``SpacedDiffusion`` fields)."""

    def __init__(self, num_sampling_steps: str) -> None:
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        base = np.array([min(1 - alpha_bar((i + 1) / TRAIN_STEPS) / alpha_bar(i / TRAIN_STEPS), 0.999) for i in range(TRAIN_STEPS)])
        base_cum = np.cumprod(1.0 - base)
        self.timestep_map = space_timesteps(TRAIN_STEPS, str(num_sampling_steps))
        last, betas = 1.0, []
        for i in self.timestep_map:
            betas.append(1 - base_cum[i] / last)
            last = base_cum[i]
        betas = np.array(betas, dtype=np.float64)
        cum = np.cumprod(1.0 - betas)
        cum_prev = np.append(1.0, cum[:-1])
        self.num_steps = len(betas)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / cum)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / cum - 1)
        post_var = betas * (1.0 - cum_prev) / (1.0 - cum)
        self.posterior_log_variance_clipped = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.array([])
        self.log_betas = np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(cum_prev) / (1.0 - cum)
        self.posterior_mean_coef2 = (1.0 - cum_prev) * np.sqrt(1.0 - betas) / (1.0 - cum)

    def coef(self, name: str, i: int, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at step ``i`` as upstream's ``_extract_into_tensor``: float64 -> float32, broadcast to ``like``
        (a fill: no host-to-device copy, so a captured CUDA graph holds it)."""
        return torch.full_like(like, float(np.float32(getattr(self, name)[i])), dtype=torch.float32)


class NoiseSource(Protocol):
    def initial(self, rows: int, channels: int, device: torch.device) -> torch.Tensor:
        """The starting noise (rows, channels) float32."""

    def step(self, like: torch.Tensor) -> torch.Tensor:
        """Per-step noise shaped like ``like``."""


class GeneratorNoise:
    """Both draws from one ``torch.Generator`` (on the device of the rows): the documented seeded rule."""

    def __init__(self, generator: Optional[torch.Generator]) -> None:
        self.generator = generator

    def initial(self, rows: int, channels: int, device: torch.device) -> torch.Tensor:
        return torch.randn(rows, channels, generator=self.generator, device=device)

    def step(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)


class RowNoise:
    """Per-row seeding's noise source: image row b's noise from its own stream only. The rows of a draw are the head's
    layout (halves, batch, n): the conditional half first, n tokens per image row (the starting noise has one half
    when ``cfg != 1``, both are copied; every other draw has two); the unconditional half's rows use their image row's
    stream. ``draw(shape, device)`` returns (batch, halves, n, channels) float32, row b from stream b."""

    def __init__(self, batch: int, cfg: float, draw: Callable[[Tuple[int, ...], torch.device], torch.Tensor]) -> None:
        self.batch, self.cfg, self.draw = batch, cfg, draw

    def _rows(self, rows: int, halves: int, channels: int, device: torch.device) -> torch.Tensor:
        if rows % (halves * self.batch):
            raise ValueError(f"RowNoise: {rows} rows are not {halves} halves of {self.batch} image rows")
        x = self.draw((self.batch, halves, rows // (halves * self.batch), channels), device)
        return x.transpose(0, 1).reshape(rows, channels)

    def initial(self, rows: int, channels: int, device: torch.device) -> torch.Tensor:
        return self._rows(rows, 2 if self.cfg == 1.0 else 1, channels, device)

    def step(self, like: torch.Tensor) -> torch.Tensor:
        return self._rows(like.shape[0], 2, like.shape[1], like.device).to(like.dtype)


class UpstreamGlobalNoise:
    """Upstream's draws: the starting noise from the global CPU generator (``torch.randn(...).cuda()``), the per-step
    noise from the global generator of the rows' device (``torch.randn_like``)."""

    def initial(self, rows: int, channels: int, device: torch.device) -> torch.Tensor:
        return torch.randn(rows, channels).to(device)

    def step(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(like)


class DiffusionHead(nn.Module):
    """Upstream ``DiffLoss`` at inference (state-dict prefix ``diffloss.``): ``net`` and the respaced sampler."""

    def __init__(self, target_channels: int, z_channels: int, width: int, depth: int, num_sampling_steps: str) -> None:
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth)
        self.schedule = SpacedSchedule(num_sampling_steps)

    def p_sample_step(self, x: torch.Tensor, i: int, c: torch.Tensor, cfg: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of x_{i-1} given x_i (N, C) at respaced step ``i`` (upstream ``p_mean_variance``)."""
        s, N, C = self.schedule, x.shape[0], x.shape[1]
        t = torch.full((N,), s.timestep_map[i], dtype=torch.long, device=x.device)  # the network sees the original step
        out = self.net(x, t, c) if cfg is None else self.net.forward_with_cfg(x, t, c, cfg)
        eps, var_values = torch.split(out, C, dim=1)
        min_log = s.coef("posterior_log_variance_clipped", i, x)
        max_log = s.coef("log_betas", i, x)
        frac = (var_values + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = (s.coef("sqrt_recip_alphas_cumprod", i, x) * x - s.coef("sqrt_recipm1_alphas_cumprod", i, x) * eps).clamp(-1, 1)
        mean = s.coef("posterior_mean_coef1", i, x) * x0 + s.coef("posterior_mean_coef2", i, x) * x
        return mean, log_var

    @torch.no_grad()
    def sample(self, z: torch.Tensor, cfg: float, noise: NoiseSource, temperature: float = 1.0) -> torch.Tensor:
        """Residuals (N, Cvae) for conditions z (N, Cz) (N = 2 x rows: conditional half first), times ``vae_scale``.

        ``cfg != 1``: both halves start from the same noise (N/2 draws) and use the CFG'd epsilon; ``cfg == 1``: N
        draws and no CFG (upstream's branch on ``cfg == 1.0``)."""
        if cfg != 1.0:
            x = noise.initial(z.shape[0] // 2, self.in_channels, z.device)
            x = torch.cat([x, x], dim=0)
        else:
            x = noise.initial(z.shape[0], self.in_channels, z.device)
        guidance = None if cfg == 1.0 else cfg
        for i in reversed(range(self.schedule.num_steps)):
            mean, log_var = self.p_sample_step(x, i, z, guidance)
            eps = noise.step(x)
            nonzero = float(i != 0)
            x = mean + nonzero * torch.exp(0.5 * log_var) * eps * temperature
        return x * VAE_SCALE
