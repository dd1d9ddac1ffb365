"""Training of the BSQ VQ-VAE (Infinity's tokenizer): multi-scale residual binary spherical quantization.

Per scale of the schedule the residual (B, d, 1, H, W) is area-downsampled to (h, w), each token's d-vector is
L2-normalised (``z``) and snapped to ``sign(z) / sqrt(d)`` with upstream's straight-through estimator
``z + (sign(z) / sqrt(d) - z).detach()`` (the same arithmetic as :class:`ssg_engine.models.bsq_vae.BSQ`, so training
and ``BSQVAE.encode`` give the same bits), upsampled back (trilinear) and subtracted from the residual.

Loss = L1 + L2 reconstruction + ``commit_weight`` * commitment (MSE of ``z`` to its detached corner) + upstream's
entropy penalty ``entropy_weight / inv_temperature * (H(per token) - H(bit means))`` with the per-bit soft
assignment ``p = sigmoid(-4 z / sqrt(d) * inv_temperature)``: confident bits, each bit used half the time.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..families.infinity.tokenizer import DOWN_MODE, UP_MODE, BSQVAE
from .vqvae_trainer import cosine_lr, psnr, set_lr, shuffled_batches


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of Bernoulli probabilities ``p`` (elementwise), as upstream (``p log p`` both sides)."""
    return -(p * torch.log(p + 1e-8) + (1 - p) * torch.log(1 - p + 1e-8))


def quantize_train(
    h: torch.Tensor, schedule: Sequence[Sequence[int]], inv_temperature: float = 100.0
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], List[torch.Tensor]]:
    """Differentiable multi-scale BSQ of the encoder output ``h`` (B, d, H, W) over ``schedule`` ((1, h, w) entries).

    Returns (straight-through sum of the quantized scales (B, d, H, W), {"commit", "entropy"} losses averaged over
    scales, bits per scale (B, 1, h, w, d) int32: the same as ``MultiScaleBSQ.forward`` on the same ``h``).
    """
    B, d, H, W = h.shape
    full = (1, H, W)
    residual = h.unsqueeze(2).contiguous()  # memory formats as MultiScaleBSQ.forward's (the kernels round alike)
    out = torch.zeros_like(residual)
    commit, entropy = h.new_zeros(()), h.new_zeros(())
    bits = []
    for size in schedule:
        size = tuple(int(s) for s in size)
        small = residual if size == full else F.interpolate(residual, size=size, mode=DOWN_MODE)
        t, sh, sw = small.shape[2:]
        z = F.normalize(small.permute(0, 2, 3, 4, 1).contiguous().view(B, t * sh * sw, d), dim=-1)
        corner = torch.where(z > 0, 1.0, -1.0).to(z) * (1.0 / d ** 0.5)
        q = z + (corner - z).detach()
        bits.append((q > 0).int().reshape(B, t, sh, sw, d))
        commit = commit + F.mse_loss(z, q.detach())
        p = torch.sigmoid(-4 * z / d ** 0.5 * inv_temperature)
        entropy = entropy + _entropy(p).sum(-1).mean() - _entropy(p.reshape(-1, d).mean(0)).sum()
        quantized = q.reshape(B, t, sh, sw, d).permute(0, 4, 1, 2, 3)
        if size != full:
            quantized = F.interpolate(quantized, size=full, mode=UP_MODE).contiguous()
        residual = residual - quantized
        out = out + quantized
    n = len(schedule)
    return out.squeeze(2), {"commit": commit / n, "entropy": entropy / (n * inv_temperature)}, bits


def bit_usage(bits: Sequence[torch.Tensor]) -> Dict[str, object]:
    """Per-bit fraction of ones and Bernoulli entropy (bits, max 1) over all tokens of all scales (each (..., d))."""
    d = bits[0].shape[-1]
    ones = torch.cat([b.reshape(-1, d).float() for b in bits]).mean(0)
    ent = _entropy(ones) / math.log(2)
    return {
        "ones_per_bit": [round(float(v), 4) for v in ones],
        "entropy_per_bit": [round(float(v), 4) for v in ent],
        "mean_entropy": round(float(ent.mean()), 4),
    }


@torch.no_grad()
def evaluate_bsq_vae(vae: BSQVAE, images: torch.Tensor, schedule: Sequence[Sequence[int]], batch_size: int = 500) -> Dict[str, object]:
    """Reconstruction PSNR / L1 / L2 through ``encode`` + ``decode`` (the inference path) and bit usage over
    ``images`` (N, 3, S, S) in [-1, 1]."""
    was = vae.training
    vae.eval()
    ps, l1, l2, bits = [], [], [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        enc = vae.encode(x, schedule)
        rec = vae.decode(enc.z)
        ps.append(psnr(rec, x))
        l1.append((rec - x).abs().flatten(1).mean(1))
        l2.append((rec - x).square().flatten(1).mean(1))
        bits.extend(enc.bits)
    vae.train(was)
    return {
        "psnr": round(float(torch.cat(ps).mean()), 3),
        "l1": round(float(torch.cat(l1).mean()), 5),
        "l2": round(float(torch.cat(l2).mean()), 5),
        "bit_usage": bit_usage(bits),
    }


def train_bsq_vae(
    vae: BSQVAE,
    images: torch.Tensor,
    schedule: Sequence[Sequence[int]],
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 100,
    commit_weight: float = 0.25,
    entropy_weight: float = 0.1,
    inv_temperature: float = 100.0,
    grad_clip: float = 1.0,
    hflip: bool = True,
    seed: int = 0,
    progress: bool = True,
    log_every: int = 25,
) -> Dict[str, object]:
    """Train ``vae`` in place on ``images`` (N, 3, S, S) in [-1, 1] over ``schedule``; returns the loss history."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    hist: Dict[str, list] = {"step": [], "loss": [], "rec_l1": [], "rec_l2": [], "commit": [], "entropy": [], "lr": []}
    ema: Optional[Dict[str, float]] = None
    t0 = time.perf_counter()
    batches = shuffled_batches(images.shape[0], batch_size, gen)
    bar = tqdm(range(steps), desc="bsq-vae", disable=not progress, mininterval=2.0)
    for step in bar:
        x = images[next(batches)]
        if hflip:
            flip = torch.rand(x.shape[0], generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        cur_lr = cosine_lr(step, steps, warmup, lr)
        set_lr(opt, cur_lr)
        z, aux, _ = quantize_train(vae.encoder(x), schedule, inv_temperature)
        rec = vae.decoder(z)
        l1, l2 = (rec - x).abs().mean(), (rec - x).square().mean()
        loss = l1 + l2 + commit_weight * aux["commit"] + entropy_weight * aux["entropy"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), grad_clip)
        opt.step()
        vals = {"loss": loss.item(), "rec_l1": l1.item(), "rec_l2": l2.item(), "commit": aux["commit"].item(), "entropy": aux["entropy"].item()}
        ema = vals if ema is None else {k: 0.9 * ema[k] + 0.1 * v for k, v in vals.items()}
        if step % log_every == 0 or step == steps - 1:
            hist["step"].append(step)
            for k, v in vals.items():
                hist[k].append(round(v, 6))
            hist["lr"].append(cur_lr)
            bar.set_postfix(loss=f"{ema['loss']:.4f}", l1=f"{ema['rec_l1']:.4f}", ent=f"{ema['entropy']:.4f}")
    vae.eval()
    return {"history": hist, "steps_done": steps, "final_ema": ema, "wall_s": round(time.perf_counter() - t0, 2)}
