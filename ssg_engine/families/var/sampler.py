"""The reference sampler: upstream VAR's ``autoregressive_infer_cfg``, step for step, plus SSG and temperature.

This path is the specification every fast path is tested against: on CPU in float32 with SSG off and
temperature 1 it makes the same calls in the same order as upstream (a ``torch.cat`` KV cache, one
``torch.Generator`` used only by the draws), so the same seed gives the same tokens at every scale. It drives
the model through :func:`ssg_engine.pipeline.run_scales` with the kernels' PyTorch references as its ops
(``ssg_engine.sampler`` is this module, kept for compatibility; it re-exports the pipeline's ``ConcatKVCache``,
``resolve_params``, ``gumbel_noise`` and ``smooth_embeddings``, which the other families' samplers share).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from ...guidance import SSG
from ...kernels.sampling import sample_logits_reference
from ...kernels.ssg_guidance import ssg_guidance_reference
from ...params import SamplingParams
from ...pipeline import (
    ConcatKVCache, Guidance, guidance_schedule, gumbel_noise, nonfinite_logits_error, resolve_params, run_scales,
    smooth_embeddings,
)
from ...seeding import RowSeeds, check_row_seeds, row_generators
from ...validation import as_number, class_labels
from .model import VARTransformer
from .tokenizer import VQVAE

__all__ = ["ConcatKVCache", "LabelsLike", "SampleOutput", "VAR", "check_models", "generate_reference", "gumbel_noise", "resolve_labels",
           "resolve_params", "sample_reference", "smooth_embeddings"]

LabelsLike = Union[None, int, Sequence[int], torch.Tensor]


@dataclasses.dataclass
class SampleOutput:
    """``images`` (B, 3, H, W) in [0, 1]; ``tokens[k]`` (B, pn_k^2); optional per-step logits (B, pn_k^2, V)."""

    images: torch.Tensor
    tokens: List[torch.Tensor]
    cfg_logits: Optional[List[torch.Tensor]] = None  # CFG-combined, before SSG
    sampled_logits: Optional[List[torch.Tensor]] = None  # after SSG and temperature, before top-k/top-p


def check_models(var: Any, vae: Any, where: str) -> None:
    """``TypeError`` unless ``var`` is a VAR and ``vae`` a VQVAE (``load_models`` returns them as ``(vae, var)``)."""
    if not isinstance(var, VARTransformer) or not isinstance(vae, VQVAE):
        raise TypeError(
            f"{where} takes the VAR, then the VQVAE (load_models returns (vae, var)); got {type(var).__name__}, {type(vae).__name__}"
        )


def resolve_labels(var: VARTransformer, B: int, label_B: LabelsLike, rng: Union[None, torch.Generator, Sequence[torch.Generator]]) -> torch.Tensor:
    """Upstream's label rules: None -> random classes from ``rng`` (B generators: row b's from ``rng[b]``); int -> same
    class (negative = unconditional); otherwise ``B`` labels (checked by ``class_labels``)."""
    device = var.lvl_1L.device
    if label_B is None:
        uniform = torch.full((1, var.num_classes), 1.0 / var.num_classes, device=device)
        if rng is None or isinstance(rng, torch.Generator):
            return torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).reshape(B)
        return torch.cat([torch.multinomial(uniform, num_samples=1, generator=g).reshape(1) for g in rng])
    if isinstance(label_B, numbers.Number) or (isinstance(label_B, torch.Tensor) and label_B.ndim == 0):
        label = as_number(
            label_B, "label_B", f"an integer class index < {var.num_classes} (negative: unconditional)",
            integer=True, valid=lambda v: v < var.num_classes,
        )
        return torch.full((B,), var.num_classes if label < 0 else label, device=device)
    labels = class_labels(label_B, var.num_classes, device, "label_B")
    if labels.shape[0] != B:
        raise ValueError(f"got {labels.shape[0]} labels for batch size B={B}")
    return labels


@torch.no_grad()
def sample_reference(
    var: VARTransformer,
    B: int,
    label_B: LabelsLike,
    params: Optional[SamplingParams] = None,
    *,
    more_smooth: bool = False,
    forced_tokens: Optional[List[torch.Tensor]] = None,
    record_logits: bool = False,
    per_scale_conditioning: bool = False,
    row_seeds: Optional[RowSeeds] = None,
    **overrides: Any,
) -> SampleOutput:
    """Sample ``B`` images with the upstream-exact loop; ``params`` (or keyword overrides such as ``seed=``,
    ``cfg=``, ``ssg=``) give the settings; ``seed=None`` draws from the global generator, as upstream.

    ``row_seeds`` ((B,) int64 tensor or B ints, e.g. ``ssg_engine.seeding.row_seeds(seed, B)``): per-row seeding,
    row b's draws (label when ``label_B`` is None, tokens, ``more_smooth``'s Gumbel noise) from its own
    ``torch.Generator`` seeded with ``row_seeds[b]`` (``params.seed`` unused), so a row does not depend on the batch;
    None: upstream's draws from one generator seeded with ``params.seed``.

    ``forced_tokens``: tokens per scale (B, pn^2) to feed instead of sampling (to compare logits between
    implementations). ``record_logits`` keeps each step's logits in the output. ``per_scale_conditioning``
    recomputes the AdaLN conditioning at every scale, as upstream's blocks do (same numbers, upstream's cost; for
    ``bench/bench_e2e.py``'s upstream-shaped arm).
    """
    params = resolve_params(params, overrides, var)
    B = as_number(B, "batch size B", "a positive integer", integer=True, valid=lambda v: v > 0)
    device = var.lvl_1L.device
    keys = check_row_seeds(row_seeds, B)
    rng: Union[None, torch.Generator, List[torch.Generator]] = None if keys is None else row_generators(keys, device)
    if keys is None and params.seed is not None:
        rng = torch.Generator(device=device)
        rng.manual_seed(params.seed)
    labels = resolve_labels(var, B, label_B, rng)
    sizes = var.scale_sizes()
    guide = Guidance(guidance_schedule(params.cfg, params.ssg, sizes, device), params.ssg, ssg_guidance_reference)
    cfg_logits: List[torch.Tensor] = []
    sampled_logits: List[torch.Tensor] = []

    state = var.condition(labels)
    cond_BD = var.class_embeddings(labels) if per_scale_conditioning else None

    def pick(si: int, logits_2B: torch.Tensor):
        if cond_BD is not None and si + 1 < len(sizes):  # the next scale's conditioning, recomputed as upstream does
            state.modulations, state.head_scale, state.head_shift = var.adaln_conditioning(cond_BD)
        guided, cfg = guide(si, logits_2B)
        if params.temperature != 1.0:
            guided = guided / params.temperature
        if not torch.isfinite(guided).all():
            raise nonfinite_logits_error(si, sizes[si])
        if record_logits:
            cfg_logits.append(cfg.clone())
            sampled_logits.append(guided.clone())
        rows = guided.reshape(-1, guided.shape[-1])
        if forced_tokens is not None:
            idx = forced_tokens[si].to(device)
        else:
            idx = sample_logits_reference(rows, params.top_k, params.top_p, 1.0, rng).view(B, -1)
        if not more_smooth:
            return idx, None
        codebook = var.vae.quantize.embedding.weight
        return idx, smooth_embeddings(guided, params.top_k, params.top_p, si / (len(sizes) - 1), codebook, gumbel_noise(guided, rng))

    images, tokens = run_scales(var, state, ConcatKVCache(var.depth), pick)
    return SampleOutput(
        images=images,
        tokens=tokens,
        cfg_logits=cfg_logits if record_logits else None,
        sampled_logits=sampled_logits if record_logits else None,
    )


def generate_reference(var: VARTransformer, vae: VQVAE, cond: Any, params: SamplingParams, *,
                       row_seeds: Optional[RowSeeds] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``generate``'s path off CUDA for VAR: one image per class label of ``cond`` from :func:`sample_reference` with
    ``params`` (resolved) and ``row_seeds`` (None: per-batch draws), ``vae`` attached; (images (B, 3, H, W), tokens per
    scale (B, pn^2))."""
    labels = class_labels(cond, var.num_classes, next(var.parameters()).device)
    if not var.vae_proxy or var.vae_proxy[0] is not vae:
        var.attach_vae(vae)
    out = sample_reference(var, int(labels.shape[0]), labels, params, row_seeds=row_seeds)
    return out.images, out.tokens


class VAR(VARTransformer):
    """The VAR transformer with upstream's sampling method, for drop-in use (``load_models`` returns this)."""

    @torch.no_grad()
    def autoregressive_infer_cfg(
        self,
        B: int,
        label_B: LabelsLike,
        g_seed: Optional[int] = None,
        cfg: float = 1.5,
        top_k: int = 0,
        top_p: float = 0.0,
        more_smooth: bool = False,
        ssg: Optional[SSG] = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Upstream's signature and defaults: ``B`` images (B, 3, H, W) in [0, 1], upstream-exact when ``ssg`` is
        None and ``temperature`` is 1. ``label_B``: None (random classes), an int (same class for all;
        negative = unconditional) or (B,) labels."""
        params = SamplingParams(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature, seed=g_seed, ssg=ssg)
        return sample_reference(self, B, label_B, params, more_smooth=more_smooth).images
