"""VAR next-scale-prediction training (upstream ``VARTrainer.train_step`` semantics).

The frozen VQ-VAE tokenizes each image into per-scale token maps; the teacher-forcing input is
``vae.quantize.idxBl_to_var_input(gt_idx)``; ``var(label, x)`` gives logits (B, L, V) under the
block-causal mask, with class-label dropout (``cond_drop_rate``) in training mode so that
classifier-free guidance works at sampling time. Loss: cross-entropy over all L tokens.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..families.var.model import VARTransformer
from ..families.var.tokenizer import VQVAE
from .vqvae_trainer import _sched_step, adamw_decay_groups, cosine_lr, set_lr, shuffled_batches


@torch.no_grad()
def init_var_weights(var: VARTransformer, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-3, init_head: float = 0.02) -> None:
    """Upstream-style initialisation: truncated normal (std sqrt(1/3C)), small head, near-identity blocks."""
    C = var.C
    std = math.sqrt(1 / C / 3)
    for m in var.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std)
    nn.init.trunc_normal_(var.pos_start, std=std)
    nn.init.trunc_normal_(var.pos_1LC, std=std)
    var.head.weight.mul_(init_head)
    var.head.bias.zero_()
    var.head_nm.ada_lin[-1].weight.mul_(init_adaln)
    var.head_nm.ada_lin[-1].bias.zero_()
    depth = len(var.blocks)
    for blk in var.blocks:
        blk.attn.proj.weight.div_(math.sqrt(2 * depth))
        blk.ffn.fc2.weight.div_(math.sqrt(2 * depth))
        if hasattr(blk, "ada_lin"):
            w = blk.ada_lin[-1].weight
            w[2 * C:].mul_(init_adaln)
            w[: 2 * C].mul_(init_adaln_gamma)
            blk.ada_lin[-1].bias.zero_()


@torch.no_grad()
def tokenize(vae: VQVAE, images: torch.Tensor, batch_size: int = 500, progress: bool = False) -> torch.Tensor:
    """All scales' tokens of ``images`` concatenated: (N, L) int16 (int32 when V > 32767)."""
    from tqdm.auto import tqdm

    vae.eval()
    dtype = torch.int16 if vae.V <= 32767 else torch.int32
    out = []
    for i in tqdm(range(0, images.shape[0], batch_size), desc="tokenize", disable=not progress, mininterval=2.0):
        ids = vae.img_to_idxBl(images[i: i + batch_size])
        out.append(torch.cat(ids, 1).to(dtype))
    return torch.cat(out, 0)


def split_tokens(tokens_NL: torch.Tensor, patch_nums) -> List[torch.Tensor]:
    out, cur = [], 0
    for pn in patch_nums:
        out.append(tokens_NL[:, cur: cur + pn * pn].long())
        cur += pn * pn
    return out


def var_loss(var: VARTransformer, vae: VQVAE, labels: torch.Tensor, tokens_BL: torch.Tensor) -> torch.Tensor:
    gt = split_tokens(tokens_BL, var.patch_nums)
    with torch.no_grad():
        x_in = vae.quantize.idxBl_to_var_input(gt)
    logits = var(labels, x_in)
    return F.cross_entropy(logits.reshape(-1, var.V), tokens_BL.long().reshape(-1))


@torch.no_grad()
def evaluate_var(var: VARTransformer, vae: VQVAE, labels: torch.Tensor, tokens: torch.Tensor, batch_size: int = 250) -> Dict[str, float]:
    """Mean teacher-forced cross-entropy (conditional, no label dropout) and token accuracy."""
    was = var.training
    var.eval()
    tot, acc, n = 0.0, 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        t, y = tokens[i: i + batch_size], labels[i: i + batch_size]
        gt = split_tokens(t, var.patch_nums)
        logits = var(y, vae.quantize.idxBl_to_var_input(gt))
        tgt = t.long()
        tot += float(F.cross_entropy(logits.reshape(-1, var.V), tgt.reshape(-1), reduction="sum"))
        acc += float((logits.argmax(-1) == tgt).float().sum())
        n += tgt.numel()
    var.train(was)
    return {"ce": round(tot / n, 5), "acc": round(acc / n, 5)}


def train_var(
    var: VARTransformer,
    vae: VQVAE,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 6e-4,
    weight_decay: float = 0.05,
    warmup: int = 200,
    grad_clip: float = 2.0,
    seed: int = 0,
    progress: bool = True,
    log_every: int = 25,
    callback: Optional[Callable[[int, Dict[str, float]], None]] = None,
    time_budget_s: Optional[float] = None,
) -> Dict[str, object]:
    """Train ``var`` in place on pre-computed ``tokens`` (N, L) with ``labels`` (N,); the VQ-VAE stays frozen."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    vae.eval().requires_grad_(False)
    var.train()
    opt = adamw_decay_groups(
        var.named_parameters(), lr, weight_decay, lambda n, p: p.ndim < 2 or "pos_" in n or "emb" in n or "scale_mul" in n
    )
    N = tokens.shape[0]
    hist: Dict[str, list] = {"step": [], "loss": [], "lr": []}
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="var", disable=not progress, mininterval=2.0)
    ema = None
    steps_done = 0
    batches = shuffled_batches(N, batch_size, gen)
    for step in bar:
        idx = next(batches)
        cur_lr = cosine_lr(_sched_step(step, steps, t0, time_budget_s), steps, warmup, lr)
        set_lr(opt, cur_lr)
        loss = var_loss(var, vae, labels[idx], tokens[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(var.parameters(), grad_clip)
        opt.step()
        v = loss.item()
        ema = v if ema is None else 0.95 * ema + 0.05 * v
        if step % log_every == 0 or step == steps - 1:
            hist["step"].append(step)
            hist["loss"].append(round(v, 5))
            hist["lr"].append(cur_lr)
            bar.set_postfix(ce=f"{ema:.4f}", lr=f"{cur_lr:.2e}")
        steps_done = step + 1
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            break  # budget reached; with a budget the cosine schedule follows max(step, time) progress
        if callback is not None:
            callback(step, {"loss": v})
    var.eval()
    return {"history": hist, "steps_done": steps_done, "final_ema": ema, "wall_s": round(time.perf_counter() - t0, 2)}
