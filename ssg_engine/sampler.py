"""The reference sampler: upstream VAR's ``autoregressive_infer_cfg``, step for step, plus SSG and temperature.

This path is the specification every fast path is tested against: on CPU in float32 with
``ssg=None`` and ``temperature=1`` it makes the same calls in the same order as upstream, so the
same ``g_seed`` gives the same tokens at every scale. Per step:
CFG combine -> SSG -> temperature -> top-k -> top-p -> sample.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple, Union

import torch

from .guidance import SSG, apply_operator, as_number, cfg_combine, prior_operator
from .profiling import nvtx_range

if TYPE_CHECKING:
    from .models.var import VAR
    from .models.vqvae import VQVAE


@dataclasses.dataclass
class SampleOutput:
    """``images`` (B, 3, H, W) in [0, 1]; ``tokens[k]`` (B, pn_k^2); optional per-step logits (B, pn_k^2, V)."""

    images: torch.Tensor
    tokens: List[torch.Tensor]
    cfg_logits: Optional[List[torch.Tensor]] = None  # CFG-combined, before SSG
    sampled_logits: Optional[List[torch.Tensor]] = None  # after SSG and temperature, before top-k/top-p


class NonFiniteLogitsError(ValueError, FloatingPointError):
    """The logits of a scale became NaN or infinite; the message names the scale and what to change."""


def nonfinite_logits_error(si: int, pn: int) -> NonFiniteLogitsError:
    """The error for non-finite logits at scale ``si`` (a ``pn`` x ``pn`` grid), shared by every sampler."""
    return NonFiniteLogitsError(
        f"non-finite logits at scale {si} ({pn}x{pn}) after CFG, SSG and temperature; "
        "lower cfg/ssg beta or raise temperature, or check the checkpoint"
    )


def check_sampling_args(
    cfg: float, top_k: int, top_p: float, temperature: float, ssg: Optional[SSG] = None
) -> Tuple[float, int, float, float]:
    """``(cfg, top_k, top_p, temperature)`` as Python numbers; ``ValueError`` naming the first bad parameter
    (``TypeError`` when ``ssg`` is neither an ``SSG`` nor None)."""
    if ssg is not None and not isinstance(ssg, SSG):
        raise TypeError(f"ssg must be an ssg_engine.SSG or None, got {type(ssg).__name__}")
    return (
        as_number(cfg, "cfg", "a finite number"),
        as_number(top_k, "top_k", "an integer >= 0 (0 disables it)", integer=True, valid=lambda v: v >= 0),
        as_number(top_p, "top_p", "in [0, 1] (0 disables it)", valid=lambda v: 0.0 <= v <= 1.0),
        as_number(temperature, "temperature", "a finite number > 0", valid=lambda v: math.isfinite(v) and v > 0),
    )


def check_seed(seed: Any, name: str = "seed", count: int = 1) -> Optional[int]:
    """``seed`` as a Python int (None stays None); the ``count`` seeds ``seed .. seed + count - 1`` must fit int64."""
    if seed is None:
        return None
    return as_number(
        seed, name, f"an integer in [-2**63, 2**63 - {count}] or None", integer=True, valid=lambda v: -(2**63) <= v <= 2**63 - count
    )


def filter_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Upstream's top-k / top-p masking, in place (removed entries -> -inf).

    top-k removes entries strictly below the k-th largest (ties at the threshold are kept);
    top-p sorts ascending and removes entries whose cumulative softmax is <= 1 - top_p, never the largest.
    """
    V = logits_BlV.shape[-1]
    if top_k > 0:
        kth = logits_BlV.topk(min(top_k, V), largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        sorted_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_remove[..., -1:] = False
        logits_BlV.masked_fill_(sorted_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_remove), -torch.inf)
    return logits_BlV


def sample_with_top_k_top_p_(
    logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0, rng: Optional[torch.Generator] = None, num_samples: int = 1
) -> torch.Tensor:
    """Upstream's sampler: mask in place, then one ``torch.multinomial`` call. Returns (B, l, num_samples)."""
    B, l, V = logits_BlV.shape
    filter_top_k_top_p_(logits_BlV, top_k, top_p)
    probs = logits_BlV.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=abs(num_samples), replacement=num_samples >= 0, generator=rng).view(B, l, abs(num_samples))


def gumbel_softmax_with_rng(logits: torch.Tensor, tau: float, rng: Optional[torch.Generator]) -> torch.Tensor:
    """Soft Gumbel-softmax drawing its noise from ``rng`` (upstream's ``more_smooth`` visualisation mode)."""
    if rng is None:
        return torch.nn.functional.gumbel_softmax(logits, tau=tau, hard=False, dim=-1)
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=rng).log()
    return ((logits + gumbels) / tau).softmax(-1)


def resolve_labels(var: "VAR", B: int, label_B: Union[None, int, Sequence[int], torch.Tensor], rng: Optional[torch.Generator]) -> torch.Tensor:
    """Upstream's label rules: None -> random classes from ``rng``; int -> same class (negative = unconditional);
    otherwise ``B`` labels (checked by ``var.check_labels``)."""
    device = var.lvl_1L.device
    if label_B is None:
        uniform = torch.full((1, var.num_classes), 1.0 / var.num_classes, device=device)
        return torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).reshape(B)
    if isinstance(label_B, numbers.Number) or (isinstance(label_B, torch.Tensor) and label_B.ndim == 0):
        label = as_number(
            label_B, "label_B", f"an integer class index < {var.num_classes} (negative: unconditional)",
            integer=True, valid=lambda v: v < var.num_classes,
        )
        return torch.full((B,), var.num_classes if label < 0 else label, device=device)
    labels = var.check_labels(label_B, "label_B")
    if labels.shape[0] != B:
        raise ValueError(f"got {labels.shape[0]} labels for batch size B={B}")
    return labels


def check_models(var: Any, vae: Any, where: str) -> None:
    """``TypeError`` unless ``var`` is a VAR and ``vae`` a VQVAE (``load_models`` returns them as ``(vae, var)``)."""
    from .models.var import VAR
    from .models.vqvae import VQVAE

    if not isinstance(var, VAR) or not isinstance(vae, VQVAE):
        raise TypeError(
            f"{where} takes the VAR, then the VQVAE (load_models returns (vae, var)); got {type(var).__name__}, {type(vae).__name__}"
        )


def _check_vae(var: "VAR") -> "VQVAE":
    if not var.vae_proxy:
        raise RuntimeError("this VAR has no VQ-VAE attached: build it with VAR(cfg, vae) or call var.attach_vae(vae)")
    return var.vae_proxy[0]


@torch.no_grad()
def sample_reference(
    var: "VAR",
    B: int,
    label_B: Union[None, int, Sequence[int], torch.Tensor],
    *,
    g_seed: Optional[int] = None,
    cfg: float = 1.5,
    top_k: int = 0,
    top_p: float = 0.0,
    temperature: float = 1.0,
    ssg: Optional[SSG] = None,
    more_smooth: bool = False,
    forced_tokens: Optional[List[torch.Tensor]] = None,
    record_logits: bool = False,
) -> SampleOutput:
    """Run VAR's sampling loop with an upstream-style (``torch.cat``) KV cache.

    ``forced_tokens``: tokens per scale (B, pn^2) to feed instead of sampling (for comparing logits
    between implementations). ``record_logits`` keeps each step's logits in the output.
    """
    cfg, top_k, top_p, temperature = check_sampling_args(cfg, top_k, top_p, temperature, ssg)
    g_seed = check_seed(g_seed, "g_seed")
    B = as_number(B, "batch size B", "a positive integer", integer=True, valid=lambda v: v > 0)
    vae = _check_vae(var)
    quant = vae.quantize
    device = var.lvl_1L.device
    rng = None
    if g_seed is not None:
        rng = torch.Generator(device=device)
        rng.manual_seed(g_seed)
    label_B = resolve_labels(var, B, label_B, rng)
    K = len(var.patch_nums)
    betas = ssg.step_betas(K) if ssg is not None else [0.0] * K

    sos = cond_BD = var.class_emb(torch.cat((label_B, torch.full_like(label_B, var.num_classes)), dim=0))
    lvl_pos = var.lvl_pos()
    next_token_map = (
        sos.unsqueeze(1).expand(2 * B, var.first_l, -1) + var.pos_start.expand(2 * B, var.first_l, -1) + lvl_pos[:, : var.first_l]
    )
    f_hat = sos.new_zeros(B, var.Cvae, var.patch_nums[-1], var.patch_nums[-1])
    tokens: List[torch.Tensor] = []
    cfg_logits: List[torch.Tensor] = []
    sampled_logits: List[torch.Tensor] = []
    prev_logits: Optional[torch.Tensor] = None
    cur_L = 0

    for block in var.blocks:
        block.attn.kv_caching(True)
    try:
        for si, pn in enumerate(var.patch_nums):
            with nvtx_range(f"scale {si} ({pn}x{pn})"):
                ratio = si / var.num_stages_minus_1
                cur_L += pn * pn
                cond = var.shared_ada_lin(cond_BD)
                x = next_token_map
                for block in var.blocks:
                    x = block(x=x, cond_BD=cond, attn_bias=None)
                logits = cfg_combine(var.get_logits(x, cond_BD), cfg * ratio)
                cfg_out = logits
                if betas[si] != 0.0:
                    src = var.patch_nums[si - 1]
                    op = prior_operator(ssg.prior, src, pn, ssg.interp, logits.device, logits.dtype)
                    logits = logits + betas[si] * (logits - apply_operator(op, prev_logits))
                prev_logits = logits if ssg is not None and ssg.prior_source == "guided" else cfg_out
                if temperature != 1.0:
                    logits = logits / temperature
                if not torch.isfinite(logits).all():
                    raise nonfinite_logits_error(si, pn)
                if record_logits:
                    cfg_logits.append(cfg_out.clone())
                    sampled_logits.append(logits.clone())

                masked = logits.clone()  # upstream masks in place; later steps still need the unmasked logits
                if forced_tokens is not None:
                    idx_Bl = forced_tokens[si].to(device)
                else:
                    idx_Bl = sample_with_top_k_top_p_(masked, top_k=top_k, top_p=top_p, rng=rng)[:, :, 0]
                if not more_smooth:
                    h_BlC = quant.embedding(idx_Bl)
                else:
                    gum_t = max(0.27 * (1 - ratio * 0.95), 0.005)
                    h_BlC = gumbel_softmax_with_rng(masked.mul(1 + ratio), tau=gum_t, rng=rng) @ quant.embedding.weight.unsqueeze(0)
                tokens.append(idx_Bl)
                h_BChw = h_BlC.transpose(1, 2).reshape(B, var.Cvae, pn, pn)
                f_hat, next_token_map = quant.get_next_autoregressive_input(si, K, f_hat, h_BChw)
                if si != var.num_stages_minus_1:
                    nxt = var.patch_nums[si + 1]
                    next_token_map = next_token_map.view(B, var.Cvae, -1).transpose(1, 2)
                    next_token_map = var.word_embed(next_token_map) + lvl_pos[:, cur_L : cur_L + nxt * nxt]
                    next_token_map = next_token_map.repeat(2, 1, 1)
    finally:
        for block in var.blocks:
            block.attn.kv_caching(False)
    with nvtx_range("vae decode"):
        images = vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
    return SampleOutput(
        images=images,
        tokens=tokens,
        cfg_logits=cfg_logits if record_logits else None,
        sampled_logits=sampled_logits if record_logits else None,
    )


@torch.no_grad()
def generate(
    var: "VAR",
    vae: "VQVAE",
    labels: Union[Sequence[int], torch.Tensor],
    *,
    cfg: float = 1.5,
    top_k: int = 900,
    top_p: float = 0.96,
    temperature: float = 1.0,
    seed: Optional[int] = 0,
    ssg: Optional[SSG] = None,
    return_tokens: bool = False,
):
    """Sample one image per label: images (B, 3, H, W) in [0, 1], and the tokens per scale if ``return_tokens``.

    On CUDA this runs the fast ``Engine`` (kept on ``var`` and reused; Philox sampling from ``seed``);
    elsewhere the reference sampler (a ``torch.Generator`` seeded with ``seed``). The two draw from the
    same distributions but not the same random numbers.
    """
    check_models(var, vae, "generate(var, vae, labels)")
    labels_t = var.check_labels(labels)
    cfg, top_k, top_p, temperature = check_sampling_args(cfg, top_k, top_p, temperature, ssg)
    seed = check_seed(seed)
    if not var.vae_proxy or var.vae_proxy[0] is not vae:
        var.attach_vae(vae)
    if labels_t.device.type == "cuda":
        from .engine import Engine

        engine = getattr(var, "_ssg_engine", None)
        if engine is None or engine.vae is not vae:
            engine = Engine(var, vae, max_batch=64, device=labels_t.device, dtype=var.head.weight.dtype)
            var._ssg_engine = engine
        images, tokens = engine.generate(
            labels_t, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed, ssg=ssg
        )
        return (images, tokens) if return_tokens else images
    out = sample_reference(
        var, int(labels_t.shape[0]), labels_t, g_seed=seed, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature, ssg=ssg
    )
    return (out.images, out.tokens) if return_tokens else out.images
