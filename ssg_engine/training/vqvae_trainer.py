"""Training of the multi-scale residual-quantized VQ-VAE (upstream VAR's ``VectorQuantizer2.forward`` semantics).

Loss = L1 + L2 reconstruction + VQ loss, where per scale ``si`` the residual is area-downsampled,
quantized to its nearest code, the code embedding bicubic-upsampled and refined by ``phi``, and
accumulated into ``f_hat``; ``vq = mean_si[beta * mse(f_hat.detach(), f) + mse(f_hat, f.detach())]``,
and the decoder sees the straight-through ``f_hat.detach() - f.detach() + f``.

Dead-code restart (on by default): every ``restart_every`` steps, codes whose EMA hit rate over all
scales is below ``restart_thresh`` of uniform are re-initialised to randomly chosen residual vectors
of the current batch (plus a little noise). This keeps codebook usage high for small codebooks
trained briefly, as in the Fashion-MNIST model.

HART's hybrid tokenizer (``continuous_prob > 0``, ``refine_last=False``): the last scale's code is added without the
refinement conv (as ``HARTTokenizer`` decodes), and each image's decoder input is, with probability
``continuous_prob``, the continuous latent ``f`` itself (the discrete latent plus the last scale's continuous residual,
which is exactly what is left of ``f``) instead of the discrete ``f_hat``: the decoder learns from both, as upstream's
``HARTHybridQuantizer`` trains it (``skip_continuous_prob``).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..families.var.tokenizer import VQVAE


def quantize_train(
    vae: VQVAE, f: torch.Tensor, refine_last: bool = True
) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """Differentiable multi-scale quantization of ``f`` (B, Cvae, h, w); ``refine_last=False``: the last scale's code
    enters ``f_hat`` without the refinement conv (HART's hybrid tokenizer).

    Returns (straight-through f_hat, vq loss, per-scale token ids (N,), per-scale residual vectors (N, Cvae)).
    Same tokens as ``VectorQuantizer2.f_to_idxBl_or_fhat`` (inference) for the same ``f``.
    """
    q = vae.quantize
    B, C, H, W = f.shape
    pns = q.v_patch_nums
    SN = len(pns)
    f_nograd = f.detach()
    f_rest = f_nograd.clone()
    f_hat = torch.zeros_like(f_rest)
    vq_loss = f.new_zeros(())
    ids: List[torch.Tensor] = []
    rests: List[torch.Tensor] = []
    for si, pn in enumerate(pns):
        rest = f_rest if si == SN - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
        rest_NC = rest.permute(0, 2, 3, 1).reshape(-1, C)
        with torch.no_grad():
            idx = q.nearest_code(rest_NC)
        ids.append(idx)
        rests.append(rest_NC)
        h = q.embedding(idx.view(B, pn, pn)).permute(0, 3, 1, 2)
        h = h.contiguous() if si == SN - 1 else F.interpolate(h, size=(H, W), mode="bicubic").contiguous()
        if refine_last or si != SN - 1:
            h = q.quant_resi[si / (SN - 1)](h)
        f_hat = f_hat + h
        f_rest = f_rest - h.detach()
        vq_loss = vq_loss + q.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_nograd)
    vq_loss = vq_loss / SN
    # straight-through: value f_hat, gradient of the decoder loss goes to the encoder via f;
    # the codebook and phi learn from the vq loss only (as upstream)
    return f_hat.detach() - f_nograd + f, vq_loss, ids, rests


@torch.no_grad()
def update_usage(vae: VQVAE, ids: List[torch.Tensor], momentum: float = 0.99) -> None:
    """EMA of per-scale code hit counts, in ``quantize.ema_vocab_hit_SV`` (as upstream)."""
    buf = vae.quantize.ema_vocab_hit_SV
    for si, idx in enumerate(ids):
        hit = idx.bincount(minlength=buf.shape[1]).float()
        if buf[si].sum() == 0:
            buf[si].copy_(hit)
        else:
            buf[si].mul_(momentum).add_(hit, alpha=1 - momentum)


@torch.no_grad()
def restart_dead_codes(vae: VQVAE, rests: List[torch.Tensor], thresh: float, gen: torch.Generator) -> int:
    """Re-initialise rarely used codes to random residual vectors of the batch; returns how many."""
    buf = vae.quantize.ema_vocab_hit_SV
    V = buf.shape[1]
    rate = buf.sum(0) / buf.sum().clamp_min(1e-8)
    dead = (rate < thresh / V).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    pool = torch.cat(rests, 0)
    pick = torch.randint(0, pool.shape[0], (dead.numel(),), generator=gen)
    emb = vae.quantize.embedding.weight
    new = pool[pick] + 0.01 * pool.std() * torch.randn(dead.numel(), pool.shape[1], generator=gen)
    emb.data[dead] = new.to(emb.dtype)
    buf[:, dead] = buf.sum(1, keepdim=True) / V  # give them a fresh grace period
    return int(dead.numel())


def codebook_usage(vae: VQVAE, ids_per_scale: List[torch.Tensor]) -> Dict[str, object]:
    """Fraction of the codebook used per scale and overall, from token ids collected over a data set."""
    V = vae.V
    per_scale = [float(torch.unique(i).numel()) / V for i in ids_per_scale]
    all_ids = torch.unique(torch.cat([i.flatten() for i in ids_per_scale]))
    return {"per_scale": [round(u, 4) for u in per_scale], "overall": round(float(all_ids.numel()) / V, 4)}


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (computed on [0, 1])."""
    mse = ((x - y) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


@torch.no_grad()
def evaluate_vae(vae: VQVAE, images: torch.Tensor, batch_size: int = 500) -> Dict[str, object]:
    """Reconstruction PSNR / L1 / L2 and per-scale codebook usage over ``images`` (N, 3, S, S) in [-1, 1]."""
    was = vae.training
    vae.eval()
    ps, l1, l2 = [], [], []
    ids: List[List[torch.Tensor]] = [[] for _ in vae.quantize.v_patch_nums]
    for i in range(0, images.shape[0], batch_size):
        x = images[i: i + batch_size]
        f = vae.quant_conv(vae.encoder(x))
        fhats = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)
        toks = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=False)
        rec = vae.fhat_to_img(fhats[-1])
        ps.append(psnr(rec, x))
        l1.append((rec - x).abs().flatten(1).mean(1))
        l2.append((rec - x).square().flatten(1).mean(1))
        for si, t in enumerate(toks):
            ids[si].append(t.flatten())
    vae.train(was)
    usage = codebook_usage(vae, [torch.cat(t) for t in ids])
    return {
        "psnr": round(float(torch.cat(ps).mean()), 3),
        "l1": round(float(torch.cat(l1).mean()), 5),
        "l2": round(float(torch.cat(l2).mean()), 5),
        "codebook_usage": usage,
    }


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches (batch_size,) from a permutation of range(n); a new one when it cannot fill a batch."""
    perm, pos = torch.randperm(n, generator=gen), 0
    while True:
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def cosine_lr(step: int, total: int, warmup: int, base: float, final_ratio: float = 0.05) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to ``lr``."""
    for g in opt.param_groups:
        g["lr"] = lr


def adamw_decay_groups(
    named_parameters: Iterable[Tuple[str, torch.Tensor]], lr: float, weight_decay: float, no_decay: Callable[[str, torch.Tensor], bool]
) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) with ``weight_decay`` on the trainable parameters, except those where ``no_decay(name,
    p)`` holds (weight decay 0); the decayed group first."""
    decay, rest = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (rest if no_decay(name, p) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def _sched_step(step: int, steps: int, t0: float, budget: Optional[float]) -> int:
    """Schedule position: the step, or (with a wall-time budget) the larger of step and elapsed-time progress."""
    if budget is None or budget <= 0:
        return step
    return max(step, int(steps * (time.perf_counter() - t0) / budget))


def train_vqvae(
    vae: VQVAE,
    images: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: int = 100,
    l1_weight: float = 1.0,
    l2_weight: float = 1.0,
    vq_weight: float = 1.0,
    grad_clip: float = 1.0,
    restart_every: int = 100,
    restart_thresh: float = 0.03,
    restart_until: Optional[float] = 0.8,
    seed: int = 0,
    progress: bool = True,
    log_every: int = 25,
    hflip: bool = True,
    channels_last: bool = False,
    callback: Optional[Callable[[int, Dict[str, float]], None]] = None,
    time_budget_s: Optional[float] = None,
    continuous_prob: float = 0.0,
    refine_last: bool = True,
) -> Dict[str, object]:
    """Train ``vae`` in place on ``images`` (N, 3, S, S) in [-1, 1]; returns a history of losses.

    Dead-code restarts happen every ``restart_every`` steps until ``restart_until * steps`` (0 disables).
    ``continuous_prob`` / ``refine_last``: HART's hybrid tokenizer (module docstring); 0 / True: VAR's VQ-VAE.
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    if channels_last:  # about 2x faster conv backward on CPU (oneDNN); weights are made contiguous again at the end
        vae.to(memory_format=torch.channels_last)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    N = images.shape[0]
    hist: Dict[str, list] = {"step": [], "loss": [], "rec_l1": [], "rec_l2": [], "vq": [], "lr": []}
    restarts = 0
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="vqvae", disable=not progress, mininterval=2.0)
    ema = None
    steps_done = 0
    batches = shuffled_batches(N, batch_size, gen)
    for step in bar:
        idx = next(batches)
        x = images[idx]
        if hflip:
            flip = torch.rand(x.shape[0], generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        cur_lr = cosine_lr(_sched_step(step, steps, t0, time_budget_s), steps, warmup, lr)
        set_lr(opt, cur_lr)
        f = vae.quant_conv(vae.encoder(x))
        f_st, vq_loss, ids, rests = quantize_train(vae, f, refine_last)
        if continuous_prob > 0:
            continuous = torch.rand(x.shape[0], generator=gen) < continuous_prob
            f_st = torch.where(continuous.view(-1, 1, 1, 1), f, f_st)
        rec = vae.decoder(vae.post_quant_conv(f_st))
        l1 = (rec - x).abs().mean()
        l2 = (rec - x).square().mean()
        loss = l1_weight * l1 + l2_weight * l2 + vq_weight * vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), grad_clip)
        opt.step()
        update_usage(vae, ids)
        if restart_every > 0 and restart_until and step > 0 and step % restart_every == 0 and step < restart_until * steps:
            restarts += restart_dead_codes(vae, [r.detach() for r in rests], restart_thresh, gen)
        vals = {"loss": loss.item(), "rec_l1": l1.item(), "rec_l2": l2.item(), "vq": vq_loss.item()}
        ema = vals if ema is None else {k: 0.9 * ema[k] + 0.1 * v for k, v in vals.items()}
        if step % log_every == 0 or step == steps - 1:
            hist["step"].append(step)
            for k, v in vals.items():
                hist[k].append(round(v, 6))
            hist["lr"].append(cur_lr)
            bar.set_postfix(loss=f"{ema['loss']:.4f}", l1=f"{ema['rec_l1']:.4f}", vq=f"{ema['vq']:.4f}", restarts=restarts)
        steps_done = step + 1
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            break  # budget reached; with a budget the cosine schedule follows max(step, time) progress
        if callback is not None:
            callback(step, vals)
    if channels_last:
        vae.to(memory_format=torch.contiguous_format)
    vae.eval()
    return {"history": hist, "steps_done": steps_done, "final_ema": ema, "dead_code_restarts": restarts, "wall_s": round(time.perf_counter() - t0, 2)}
