"""HART (hybrid tokens, text-conditional) training: the transformer, its residual diffusion head and a small
word-level text encoder, jointly, on a frozen hybrid tokenizer.

Per image the frozen tokenizer gives the tokens of every scale and the last scale's continuous latent (what is left
of the latent before the last scale's codes: ``HARTTokenizer.img_to_idxBl_and_frest``). One step, as upstream
``HARTForT2I.forward`` (mit-han-lab/hart e28a41fe; its training script is not released, so the losses are summed
with weight 1):

- teacher forcing (``model.hidden_states``) and cross-entropy over every token of every scale;
- the diffusion head's condition ``decoder_norm(h_last + word_embed(codebook[k]))`` with codes ``k`` drawn from the
  model's own (detached) last-scale logits, as upstream, and its target the continuous latent minus ``codebook[k]``
  (divided by ``VAE_SCALE``), each token repeated ``diffusion_batch_mul`` times with its own timestep and noise;
- the diffusion loss is upstream's iDDPM loss (``GaussianDiffusion.training_losses``, cosine schedule over 1000
  steps, epsilon prediction, learned-range variance): MSE on epsilon plus the variational bound on the variance
  with the mean frozen (bits per dim; the discretized Gaussian decoder NLL at t = 0).

Deliberate differences, each for a reason this model has: no MaskGIT token dropping on the last scale (the model is
sampled with one pass, upstream's release setting ``num_maskgit_iters=1``); a dropped prompt (probability
``cond_drop_rate``, uniform; upstream's ``randn < rate`` drops about 54% at 0.1) becomes exactly the sampler's
unconditional branch: zero context, mask ``[1, 0, ...]``, position ids 0.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..families.hart.diffusion import TRAIN_STEPS, VAE_SCALE, SimpleMLPAdaLN, SpacedSchedule
from ..families.hart.model import HARTTransformer
from ..families.hart.text import HARTTextFeatures, WordTextEncoder
from ..families.hart.tokenizer import HARTTokenizer
from .infinity_trainer import prompts_for
from .var_trainer import split_tokens
from .vqvae_trainer import adamw_decay_groups, codebook_usage, cosine_lr, psnr, set_lr, shuffled_batches


# ---------------------------------------------------------------------------------------------- initialisation


@torch.no_grad()
def init_hart_weights(model: HARTTransformer, init_head: float = 0.02, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-3) -> None:
    """Upstream-style initialisation: truncated normal (std sqrt(1/3C)) for the transformer's linear and embedding
    layers, a small head, residual projections scaled by 1/sqrt(2 depth), AdaLN gammas near zero (blocks start near
    the identity); the diffusion MLP as upstream's ``SimpleMLPAdaLN.initialize_weights`` (Xavier, time MLP std 0.02,
    zero AdaLN modulations and output layer: it starts predicting zero noise)."""
    std = math.sqrt(1 / model.C / 3)
    for name, m in model.named_modules():
        if name.startswith("diffloss"):
            continue
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    model.head.weight.mul_(init_head)
    model.head_nm.ada_lin[-1].weight.mul_(init_adaln)
    C = model.C
    for block in model.blocks:
        proj2 = block.ffn.fc2 if hasattr(block.ffn, "fc2") else block.ffn.down_proj
        block.attn.proj.weight.div_(math.sqrt(2 * model.depth))
        proj2.weight.div_(math.sqrt(2 * model.depth))
        w = block.ada_lin[-1].weight  # rows: gamma1, gamma2, scale1, scale2, shift1, shift2
        w[: 2 * C].mul_(init_adaln_gamma)
        w[2 * C :].mul_(init_adaln)
    init_diffusion_mlp(model.diffloss.net)


@torch.no_grad()
def init_diffusion_mlp(net: SimpleMLPAdaLN) -> None:
    """Upstream ``SimpleMLPAdaLN.initialize_weights``."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                m.bias.zero_()
    nn.init.normal_(net.time_embed.mlp[0].weight, std=0.02)
    nn.init.normal_(net.time_embed.mlp[2].weight, std=0.02)
    for block in net.res_blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for layer in (net.final_layer.adaLN_modulation[-1], net.final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


# ---------------------------------------------------------------------------------------------- the diffusion loss


class DiffusionTrainingLoss:
    """Upstream's training diffusion (``create_diffusion(timestep_respacing="", noise_schedule="cosine")``): the
    loss of ``training_losses`` per row, from float64 tables of the 1000-step cosine schedule."""

    def __init__(self) -> None:
        s = SpacedSchedule(str(TRAIN_STEPS))  # all 1000 steps: the unrespaced schedule
        cum = 1.0 / np.square(s.sqrt_recip_alphas_cumprod)
        self.tables = {
            "sqrt_cum": np.sqrt(cum), "sqrt_one_minus_cum": np.sqrt(1.0 - cum),
            "sqrt_recip_cum": s.sqrt_recip_alphas_cumprod, "sqrt_recipm1_cum": s.sqrt_recipm1_alphas_cumprod,
            "coef1": s.posterior_mean_coef1, "coef2": s.posterior_mean_coef2,
            "post_log_var": s.posterior_log_variance_clipped, "log_betas": s.log_betas,
        }

    def _at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at timesteps ``t`` (N,) as upstream's ``_extract_into_tensor``: (N, 1) float32."""
        return torch.from_numpy(self.tables[name]).to(t.device)[t].float()[:, None]

    def __call__(self, net: SimpleMLPAdaLN, x_start: torch.Tensor, c: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Mean loss over rows: x_start (N, Cvae) targets (already divided by ``VAE_SCALE``), c (N, Cz) conditions."""
        N = x_start.shape[0]
        t = torch.randint(0, TRAIN_STEPS, (N,), generator=gen).to(x_start.device)
        noise = torch.randn(x_start.shape, generator=gen).to(x_start)
        x_t = self._at("sqrt_cum", t) * x_start + self._at("sqrt_one_minus_cum", t) * noise
        eps, var_values = net(x_t, t, c).split(x_start.shape[1], dim=1)
        mse = (noise - eps).square().mean(1)
        # the variational bound on the variance alone (the mean frozen): KL(q(x_{t-1}|x_t,x_0) || p), decoder NLL at t=0
        x0 = self._at("sqrt_recip_cum", t) * x_t - self._at("sqrt_recipm1_cum", t) * eps.detach()
        mean = self._at("coef1", t) * x0 + self._at("coef2", t) * x_t
        frac = (var_values + 1) / 2
        log_var = frac * self._at("log_betas", t) + (1 - frac) * self._at("post_log_var", t)
        true_mean = self._at("coef1", t) * x_start + self._at("coef2", t) * x_t
        true_log_var = self._at("post_log_var", t)
        kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var) + (true_mean - mean).square() * torch.exp(-log_var))
        nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var)
        vb = torch.where(t == 0, nll.mean(1), kl.mean(1)) / math.log(2.0)
        return (mse + vb).mean()


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Upstream's (improved-diffusion's) log-likelihood of a Gaussian discretized to 1/255 bins on [-1, 1], elementwise."""
    def cdf(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v.pow(3))))

    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1.0 / 255.0)), cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ---------------------------------------------------------------------------------------------- data


@torch.no_grad()
def encode_hybrid(tokenizer: HARTTokenizer, images: torch.Tensor, batch_size: int = 500) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tokens of every scale (N, L) int16 and the last scale's continuous latent before its codes (N, pn^2, Cvae)
    float32 (``img_to_idxBl_and_frest``)."""
    tokenizer.eval()
    toks, lasts = [], []
    for i in range(0, images.shape[0], batch_size):
        *ids, last = tokenizer.img_to_idxBl_and_frest(images[i : i + batch_size])
        toks.append(torch.cat(ids, 1).to(torch.int16))
        lasts.append(last.float())
    return torch.cat(toks), torch.cat(lasts)


@torch.no_grad()
def evaluate_hybrid_tokenizer(tokenizer: HARTTokenizer, images: torch.Tensor, batch_size: int = 500) -> Dict[str, object]:
    """Reconstruction PSNR / L1 / L2 of ``images`` (N, 3, S, S) in [-1, 1] through the inference path, from the codes
    alone (``decode_tokens(tokens)``) and from codes plus the continuous residual, and codebook usage per scale."""
    was = tokenizer.training
    tokenizer.eval()
    sums = {k: [] for k in ("psnr", "l1", "l2", "psnr_residual", "l1_residual", "l2_residual")}
    ids: List[List[torch.Tensor]] = [[] for _ in tokenizer.patch_nums]
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size]
        *tokens, last = tokenizer.img_to_idxBl_and_frest(x)
        residual = last - tokenizer.quantize.embedding(tokens[-1])
        for suffix, res in (("", None), ("_residual", residual)):
            rec = tokenizer.decode_tokens(tokens, res)
            sums["psnr" + suffix].append(psnr(rec, x))
            sums["l1" + suffix].append((rec - x).abs().flatten(1).mean(1))
            sums["l2" + suffix].append((rec - x).square().flatten(1).mean(1))
        for si, t in enumerate(tokens):
            ids[si].append(t.flatten())
    tokenizer.train(was)
    out: Dict[str, object] = {k: round(float(torch.cat(v).mean()), 5 if k.startswith("l") else 3) for k, v in sums.items()}
    out["codebook_usage"] = codebook_usage(tokenizer, [torch.cat(t) for t in ids])
    return out


# ---------------------------------------------------------------------------------------------- the step


def drop_prompts(text: HARTTextFeatures, drop: torch.Tensor) -> HARTTextFeatures:
    """Rows where ``drop`` (B,) is True become the sampler's unconditional branch: zero context, mask ``[1, 0, ...]``,
    position ids 0."""
    keep = ~drop
    mask = torch.where(keep[:, None], text.context_mask, torch.zeros_like(text.context_mask))
    mask[:, 0] |= drop
    return HARTTextFeatures(text.context * keep[:, None, None].to(text.context.dtype), mask,
                            torch.where(keep[:, None], text.context_position_ids, torch.zeros_like(text.context_position_ids)))


def hart_losses(
    model: HARTTransformer, tokenizer: HARTTokenizer, text: HARTTextFeatures, tokens_BL: torch.Tensor, last_latent: torch.Tensor,
    diffusion: Optional[DiffusionTrainingLoss], gen: Optional[torch.Generator], diffusion_batch_mul: int = 4,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced logits (B, L, V), the token cross-entropy and the diffusion loss (zero when ``diffusion`` is
    None) for images with tokens (B, L) and last-scale continuous latents (B, pn^2, Cvae) (module docstring)."""
    gt = split_tokens(tokens_BL, model.patch_nums)
    with torch.no_grad():
        x_in = tokenizer.quantize.idxBl_to_var_input(gt)
    hidden, cond = model.hidden_states(text.context, x_in, text.context_position_ids, text.context_mask)
    logits = model.get_logits(hidden, cond)[:, model.context_token - 1 :]
    ce = F.cross_entropy(logits.reshape(-1, model.V), tokens_BL.long().reshape(-1))
    if diffusion is None:
        return logits, ce, ce.new_zeros(())
    n = model.patch_nums[-1] ** 2
    with torch.no_grad():
        probs = logits[:, -n:].detach().float().softmax(-1).reshape(-1, model.V)
        drawn = torch.multinomial(probs, 1, generator=gen).view(-1, n)
        code = tokenizer.quantize.embedding(drawn)
    z = model.decoder_norm(hidden[:, -n:] + model.word_embed(code))
    target = (last_latent - code) / VAE_SCALE
    mul = diffusion_batch_mul
    loss = diffusion(model.diffloss.net, target.reshape(-1, model.Cvae).repeat(mul, 1), z.reshape(-1, model.C).repeat(mul, 1), gen)
    return logits, ce, loss


@torch.no_grad()
def evaluate_hart(
    model: HARTTransformer, text_encoder: WordTextEncoder, tokenizer: HARTTokenizer, tokens: torch.Tensor, last_latent: torch.Tensor,
    labels: torch.Tensor, templates: Sequence[str], batch_size: int = 250, seed: int = 0,
) -> Dict[str, float]:
    """Teacher-forced token cross-entropy and accuracy, and the diffusion loss (seeded), conditional (no dropout),
    prompts cycling ``templates``."""
    was = model.training, text_encoder.module.training
    model.eval()
    text_encoder.module.eval()
    gen = torch.Generator().manual_seed(seed)
    diffusion = DiffusionTrainingLoss()
    ce, acc, diff, n, rows = 0.0, 0.0, 0.0, 0, 0
    for i in range(0, tokens.shape[0], batch_size):
        t = tokens[i : i + batch_size]
        text = text_encoder.features(prompts_for(labels[i : i + batch_size], templates))
        logits, _, d = hart_losses(model, tokenizer, text, t, last_latent[i : i + batch_size], diffusion, gen)
        tgt = t.long()
        ce += float(F.cross_entropy(logits.reshape(-1, model.V), tgt.reshape(-1), reduction="sum"))
        acc += float((logits.argmax(-1) == tgt).sum())
        diff += float(d) * t.shape[0]
        n += tgt.numel()
        rows += t.shape[0]
    model.train(was[0])
    text_encoder.module.train(was[1])
    return {"ce": round(ce / n, 5), "token_acc": round(acc / n, 5), "diffusion_loss": round(diff / rows, 5)}


def train_hart(
    model: HARTTransformer,
    text_encoder: WordTextEncoder,
    tokenizer: HARTTokenizer,
    tokens: torch.Tensor,
    last_latent: torch.Tensor,
    labels: torch.Tensor,
    templates: Sequence[str],
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 100,
    grad_clip: float = 2.0,
    cond_drop_rate: float = 0.1,
    diffusion_batch_mul: int = 4,
    seed: int = 0,
    progress: bool = True,
    log_every: int = 25,
) -> Dict[str, object]:
    """Train ``model`` (transformer and diffusion head) and ``text_encoder`` in place on pre-computed ``tokens``
    (N, L) and ``last_latent`` (N, pn^2, Cvae) of images of class ``labels`` (N,), prompts from ``templates``; the
    tokenizer stays frozen. Loss: token cross-entropy + diffusion loss."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    tokenizer.eval().requires_grad_(False)
    model.train()
    text_encoder.module.train()
    opt = adamw_decay_groups(
        [*model.named_parameters(), *(("text." + n, p) for n, p in text_encoder.module.named_parameters())], lr, weight_decay,
        lambda n, p: p.ndim < 2 or "embed" in n or "scale_mul" in n,
    )
    params = [p for g in opt.param_groups for p in g["params"]]
    diffusion = DiffusionTrainingLoss()
    hist: Dict[str, list] = {"step": [], "ce": [], "diffusion_loss": [], "token_acc": [], "lr": []}
    ema: Optional[Dict[str, float]] = None
    t0 = time.perf_counter()
    batches = shuffled_batches(tokens.shape[0], batch_size, gen)
    bar = tqdm(range(steps), desc="hart", disable=not progress, mininterval=2.0)
    for step in bar:
        idx = next(batches)
        cur_lr = cosine_lr(step, steps, warmup, lr)
        set_lr(opt, cur_lr)
        text = text_encoder.features(prompts_for(labels[idx], templates, gen))
        text = drop_prompts(text, torch.rand(len(idx), generator=gen) < cond_drop_rate)
        logits, ce, diff = hart_losses(model, tokenizer, text, tokens[idx], last_latent[idx], diffusion, gen, diffusion_batch_mul)
        loss = ce + diff
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        vals = {"ce": ce.item(), "diffusion_loss": diff.item()}
        ema = vals if ema is None else {k: 0.95 * ema[k] + 0.05 * v for k, v in vals.items()}
        if step % log_every == 0 or step == steps - 1:
            hist["step"].append(step)
            for k, v in vals.items():
                hist[k].append(round(v, 5))
            hist["token_acc"].append(round(float((logits.argmax(-1) == tokens[idx].long()).float().mean()), 5))
            hist["lr"].append(cur_lr)
            bar.set_postfix(ce=f"{ema['ce']:.4f}", diff=f"{ema['diffusion_loss']:.4f}", lr=f"{cur_lr:.2e}")
    model.eval()
    text_encoder.module.eval()
    return {"history": hist, "steps_done": steps, "final_ema": ema, "wall_s": round(time.perf_counter() - t0, 2)}
