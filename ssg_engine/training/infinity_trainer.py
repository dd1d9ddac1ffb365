"""Infinity (bitwise next-scale prediction, text-conditional) training, jointly with a small text encoder.

The frozen BSQ VAE turns each image into bits per scale; the teacher-forcing input is ``vae.bits_to_x_BLC``; the
transformer's ``forward(text, x_BLC_wo_prefix, schedule)`` gives 2 logits per bit (B, L, 2d), trained by
cross-entropy over every bit of every token (upstream ``trainer.py`` with ``use_bit_label``, mean over bits and
tokens). Each image gets a prompt of its class in a random training template every step; with probability
``cond_drop_rate`` a prompt's features are replaced by the model's learned ``cfg_uncond[:len]`` (upstream's label
dropout, which classifier-free guidance needs at sampling time).
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import make_prompt
from ..families.infinity.model import InfinityTransformer, TextFeatures
from ..families.infinity.text import TextEncoder
from ..families.infinity.tokenizer import BSQVAE
from .vqvae_trainer import adamw_decay_groups, cosine_lr, set_lr, shuffled_batches

Schedule3 = Sequence[Sequence[int]]  # (1, h, w) entries


@torch.no_grad()
def init_infinity_weights(model: InfinityTransformer, init_head: float = 0.02, init_adaln: float = 0.5) -> None:
    """Upstream-style initialisation: truncated normal (std sqrt(1/3C)), ``cfg_uncond`` std 1.2/sqrt(Ct5), a small
    head, residual projections scaled by 1/sqrt(2 depth)."""
    std = math.sqrt(1 / model.C / 3)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    nn.init.trunc_normal_(model.cfg_uncond, std=1.2)
    model.cfg_uncond.div_(model.Ct5 ** 0.5)
    nn.init.trunc_normal_(model.pos_start, std=std)
    model.head.weight.mul_(init_head)
    model.head_nm.ada_lin[-1].weight.mul_(init_adaln)
    for blk in model.block_list():
        blk.sa.proj.weight.div_(math.sqrt(2 * model.depth))
        blk.ffn.fc2.weight.div_(math.sqrt(2 * model.depth))


@torch.no_grad()
def encode_bits(vae: BSQVAE, images: torch.Tensor, schedule: Schedule3, batch_size: int = 500) -> torch.Tensor:
    """All scales' bits of ``images`` (N, 3, S, S), token by token: (N, L, d) uint8."""
    vae.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        bits = vae.encode(images[i : i + batch_size], schedule).bits
        out.append(torch.cat([b.reshape(b.shape[0], -1, b.shape[-1]) for b in bits], 1).to(torch.uint8))
    return torch.cat(out)


def split_bits(bits_BLd: torch.Tensor, schedule: Schedule3) -> List[torch.Tensor]:
    """(B, L, d) -> per scale (B, 1, h, w, d)."""
    out, cur = [], 0
    for t, h, w in schedule:
        out.append(bits_BLd[:, cur : cur + t * h * w].reshape(-1, t, h, w, bits_BLd.shape[-1]))
        cur += t * h * w
    return out


def drop_text(model: InfinityTransformer, text: TextFeatures, drop: torch.Tensor) -> TextFeatures:
    """Replace prompt ``b``'s features by ``model.cfg_uncond[:len_b]`` where ``drop[b]`` (B,) is True."""
    parts, start = [], 0
    for b, n in enumerate(text.lens):
        parts.append(model.cfg_uncond[:n] if drop[b] else text.kv_compact[start : start + n])
        start += n
    return TextFeatures(torch.cat(parts), text.lens)


def bit_loss(model: InfinityTransformer, vae: BSQVAE, text: TextFeatures, bits_BLd: torch.Tensor, schedule: Schedule3):
    """Teacher-forced logits (B, L, d, 2) and the mean cross-entropy over all bits."""
    x, _ = vae.bits_to_x_BLC(split_bits(bits_BLd, schedule), schedule)
    logits = model(text, x, schedule).view(*bits_BLd.shape, 2)
    return logits, F.cross_entropy(logits.reshape(-1, 2), bits_BLd.reshape(-1).long())


def prompts_for(labels: torch.Tensor, templates: Sequence[str], gen: Optional[torch.Generator] = None) -> List[str]:
    """One prompt per label: a random template (from ``gen``), or template ``i % len(templates)`` without ``gen``."""
    if gen is None:
        pick = torch.arange(len(labels)) % len(templates)
    else:
        pick = torch.randint(0, len(templates), (len(labels),), generator=gen)
    return [make_prompt(int(y), templates[int(t)]) for y, t in zip(labels, pick)]


@torch.no_grad()
def evaluate_infinity(
    model: InfinityTransformer, text_encoder: TextEncoder, vae: BSQVAE, bits: torch.Tensor, labels: torch.Tensor,
    templates: Sequence[str], schedule: Schedule3, batch_size: int = 250,
) -> Dict[str, float]:
    """Teacher-forced bit cross-entropy and bit accuracy (conditional, no dropout), prompts cycling ``templates``."""
    was = model.training, text_encoder.training
    model.eval()
    text_encoder.eval()
    tot, acc, n = 0.0, 0.0, 0
    for i in range(0, bits.shape[0], batch_size):
        b = bits[i : i + batch_size]
        logits, _ = bit_loss(model, vae, text_encoder.encode(prompts_for(labels[i : i + batch_size], templates)), b, schedule)
        tgt = b.long()
        tot += float(F.cross_entropy(logits.reshape(-1, 2), tgt.reshape(-1), reduction="sum"))
        acc += float((logits.argmax(-1) == tgt).sum())
        n += tgt.numel()
    model.train(was[0])
    text_encoder.train(was[1])
    return {"ce": round(tot / n, 5), "bit_acc": round(acc / n, 5)}


def train_infinity(
    model: InfinityTransformer,
    text_encoder: TextEncoder,
    vae: BSQVAE,
    bits: torch.Tensor,
    labels: torch.Tensor,
    templates: Sequence[str],
    schedule: Schedule3,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 100,
    grad_clip: float = 2.0,
    cond_drop_rate: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    log_every: int = 25,
) -> Dict[str, object]:
    """Train ``model`` and ``text_encoder`` in place on pre-computed ``bits`` (N, L, d) of images of class ``labels``
    (N,), prompts from ``templates``; the VAE stays frozen."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    vae.eval().requires_grad_(False)
    model.train()
    text_encoder.train()
    opt = adamw_decay_groups(
        [*model.named_parameters(), *(("text." + n, p) for n, p in text_encoder.named_parameters())], lr, weight_decay,
        lambda n, p: p.ndim < 2 or "embed" in n or "pos_" in n or "cfg_uncond" in n or "ada_gss" in n,
    )
    params = [p for g in opt.param_groups for p in g["params"]]
    hist: Dict[str, list] = {"step": [], "loss": [], "bit_acc": [], "lr": []}
    ema: Optional[float] = None
    t0 = time.perf_counter()
    batches = shuffled_batches(bits.shape[0], batch_size, gen)
    bar = tqdm(range(steps), desc="infinity", disable=not progress, mininterval=2.0)
    for step in bar:
        idx = next(batches)
        cur_lr = cosine_lr(step, steps, warmup, lr)
        set_lr(opt, cur_lr)
        text = text_encoder.encode(prompts_for(labels[idx], templates, gen))
        text = drop_text(model, text, torch.rand(len(idx), generator=gen) < cond_drop_rate)
        logits, loss = bit_loss(model, vae, text, bits[idx], schedule)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        v = loss.item()
        ema = v if ema is None else 0.95 * ema + 0.05 * v
        if step % log_every == 0 or step == steps - 1:
            hist["step"].append(step)
            hist["loss"].append(round(v, 5))
            hist["bit_acc"].append(round(float((logits.argmax(-1) == bits[idx].long()).float().mean()), 5))
            hist["lr"].append(cur_lr)
            bar.set_postfix(ce=f"{ema:.4f}", lr=f"{cur_lr:.2e}")
    model.eval()
    text_encoder.eval()
    return {"history": hist, "steps_done": steps, "final_ema_ce": ema, "wall_s": round(time.perf_counter() - t0, 2)}
