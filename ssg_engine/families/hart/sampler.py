"""HART's reference sampler: upstream ``HARTForT2I.autoregressive_infer_cfg`` step for step, driven through
:func:`ssg_engine.pipeline.run_scales` (the last scale's diffusion residual is the model's ``next_input`` hook).

Upstream's fixed choices, kept: CFG weight ``cfg * si / (K - 1)``, the last scale reusing scale K-2's weight (the
loop variable goes stale) for its logits and for the diffusion head; top-k 600 below scale 7 and 300 from there
on (upstream ignores its ``top_k`` argument: ``HARTParams.top_k=None``; an integer top-k is honoured instead); no
temperature (``HARTParams.temperature`` divides the guided logits, 1 = upstream); ``more_smooth`` Gumbel noise from
the token generator on the filtered logits; the diffusion head conditioned on the hard codes.

Random draws. ``upstream_compat=True`` reproduces upstream's draws when the global generators are seeded as its
caller does: tokens (and Gumbel noise) from a generator seeded with ``seed`` on the model's device (``g_seed``;
None: the global one), the diffusion's starting noise from the global CPU generator and its per-step noise from
the global generator of the device, MaskGIT orders from ``np.random`` (upstream ``sample_orders``; drawn even when
one MaskGIT pass does not use them). ``upstream_compat=False`` (the seeded rule): tokens from
``torch.Generator(device).manual_seed(seed)``, all diffusion noise from ``torch.Generator(device).manual_seed(seed +
1)``, MaskGIT orders ``torch.randperm`` per image from ``torch.Generator().manual_seed(seed + 2)``; no global state
is read or changed. ``row_seeds=`` (per-row seeding, :mod:`ssg_engine.seeding`; not with ``upstream_compat``): the
seeded rule per image row with ``row_seeds[b]`` in place of ``seed``, each row its own generators (tokens and Gumbel
noise: ``key``, diffusion noise: ``key + 1`` for both CFG halves of the row, MaskGIT order: ``key + 2``), so a row does
not depend on the batch. Either way the last scale's tokens are drawn group by group (MaskGIT passes in order, grid order
within a pass), as upstream draws them.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import numpy as np
import torch

from ...guidance import cfg_ratio
from ...kernels.sampling import sample_logits_reference
from ...kernels.ssg_guidance import ssg_guidance_reference
from ...params import HARTParams
from ...pipeline import ConcatKVCache, Guidance, guidance_schedule, gumbel_noise, nonfinite_logits_error, run_scales, smooth_embeddings
from ...seeding import RowSeeds, check_row_seeds, row_generators
from .diffusion import GeneratorNoise, NoiseSource, RowNoise, UpstreamGlobalNoise
from .model import HARTCondition, HARTTransformer

if TYPE_CHECKING:
    from .text import HARTTextFeatures


@dataclasses.dataclass
class HARTSampleOutput:
    """``images`` (B, 3, H, W) in [0, 1]; ``tokens[k]`` (B, pn_k^2); ``residual`` (B, pn_last^2, Cvae) or None."""

    images: torch.Tensor
    tokens: List[torch.Tensor]
    residual: Optional[torch.Tensor]


def cfg_weights(cfg: float, num_scales: int) -> List[float]:
    """Upstream's per-scale CFG weights: the ramp, the last scale with the previous scale's weight."""
    return [cfg_ratio(cfg, si, num_scales) for si in range(num_scales - 1)] + [cfg_ratio(cfg, num_scales - 2, num_scales)]


def smooth_ratio(si: int, num_scales: int) -> float:
    """Upstream's ``more_smooth`` ratio of scale ``si``: ``si / (K - 1)``, the last scale with the previous scale's."""
    return min(si, num_scales - 2) / (num_scales - 1)


def upstream_top_k(si: int) -> int:
    """Upstream's hard-coded top-k of scale ``si``."""
    return 600 if si < 7 else 300


def upstream_orders(B: int, length: int) -> torch.Tensor:
    """Upstream ``sample_orders``: one ``np.random.shuffle``d permutation per image -> (B, length) int64."""
    orders = []
    for _ in range(B):
        order = np.array(list(range(length)))
        np.random.shuffle(order)
        orders.append(order)
    return torch.Tensor(np.array(orders)).long()


def seeded_orders(B: int, length: int, seed: int, row_seeds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The seeded rule's MaskGIT orders (B, length): ``torch.randperm`` per image from ``torch.Generator().manual_seed(seed)``;
    with ``row_seeds`` (B,), image b's from its own CPU generator seeded with ``row_seeds[b] + 2``."""
    if row_seeds is None:
        gen = torch.Generator()
        gen.manual_seed(seed)
        gens = [gen] * B
    else:
        gens = row_generators(row_seeds, "cpu", add=2)
    return torch.stack([torch.randperm(length, generator=g) for g in gens])


def resolve_hart_params(params: Optional[HARTParams], overrides: Dict[str, Any], model: Any) -> HARTParams:
    """``params`` (default ``HARTParams()``) with keyword ``overrides`` applied and validated, for ``model`` (an SSG
    without beta takes the model's)."""
    if params is not None and not isinstance(params, HARTParams):
        raise TypeError(f"params must be an ssg_engine.params.HARTParams or None, got {type(params).__name__}")
    params = params or HARTParams()
    return (params.replace(**overrides) if overrides else params).for_model(model)


@torch.no_grad()
def sample_hart_reference(
    model: HARTTransformer,
    context: torch.Tensor,
    context_mask: torch.Tensor,
    context_position_ids: Optional[torch.Tensor] = None,
    params: Optional[HARTParams] = None,
    *,
    residual: bool = True,
    upstream_compat: bool = False,
    row_seeds: Optional[RowSeeds] = None,
    **overrides: Any,
) -> HARTSampleOutput:
    """Sample B images from text features ``context`` (B, Lc, Cc) float32 with ``context_mask`` (B, Lc) and
    optional position ids (B, Lc) int64 (default ``cumsum(mask) - 1``). ``params`` (default ``HARTParams()``; upstream's
    release settings: ``params.HART_UPSTREAM``) or keyword overrides of its fields (``cfg=``, ``top_k=``, ``top_p=``,
    ``temperature=``, ``seed=``, ``ssg=``, ``more_smooth=``, ``num_maskgit_iters=``) give the settings. See the module
    docstring for the draws (``row_seeds``: one int64 per image row, e.g. ``ssg_engine.seeding.row_seeds(seed, B)``,
    per-row seeding; ``params.seed`` unused). ``residual=False``: upstream ``final_stage != 0`` (no diffusion head).

    SSG (``params.ssg``) guides the CFG-combined logits of every scale >= 1, the last one over its whole grid (prior
    from scale K-2's logits) before the MaskGIT groups draw; the diffusion head is conditioned on the guided draws
    (docs/ssg_method.md, "SSG on hybrid tokens")."""
    params = resolve_hart_params(params, overrides, model)
    seed, more_smooth = params.seed, params.more_smooth
    device = context.device
    B, K = context.shape[0], len(model.patch_nums)
    keys = check_row_seeds(row_seeds, B)
    if keys is not None and upstream_compat:
        raise ValueError("row_seeds: upstream_compat=True draws upstream's per-batch numbers; use one or the other")
    weights = cfg_weights(params.cfg, K)
    rng: Union[None, torch.Generator, List[torch.Generator]] = None
    if keys is not None:
        rng = row_generators(keys, device)
    elif seed is not None:
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
    noise: NoiseSource
    last = model.patch_nums[-1] ** 2
    if upstream_compat:
        noise, orders = UpstreamGlobalNoise(), upstream_orders(B, last)
    elif keys is not None:
        noise_gens = row_generators(keys, device, add=1)
        noise = RowNoise(B, weights[-1], lambda shape, dev: torch.stack(
            [torch.randn(shape[1:], generator=g, device=device) for g in noise_gens]).to(dev))
        orders = seeded_orders(B, last, 0, keys)
    else:
        if seed is None:
            raise ValueError("seed must be an integer unless upstream_compat=True (then None draws from the global generators)")
        noise_rng = torch.Generator(device=device)
        noise_rng.manual_seed(seed + 1)
        noise, orders = GeneratorNoise(noise_rng), seeded_orders(B, last, seed + 2)
    sizes = model.scale_sizes()
    schedule = guidance_schedule(params.cfg, params.ssg, sizes, device, cfg_ts=weights)
    guide = Guidance(schedule, params.ssg, ssg_guidance_reference)
    state = model.condition(HARTCondition(
        context, context_mask, context_position_ids, weights[-1], noise, residual, params.num_maskgit_iters, orders.to(device)
    ))
    codebook = model.tokenizer.quantize.embedding.weight

    def draw(si: int, guided: torch.Tensor):
        """Tokens (B, l) and, with ``more_smooth``, soft embeddings (B, l, Cvae) from guided logits (B, l, V)."""
        rows = guided.reshape(-1, guided.shape[-1])
        top_k, top_p = upstream_top_k(si) if params.top_k is None else params.top_k, params.top_p
        idx = sample_logits_reference(rows, top_k, top_p, 1.0, rng).view(B, -1)
        if not more_smooth:
            return idx, None
        return idx, smooth_embeddings(guided, top_k, top_p, smooth_ratio(si, K), codebook, gumbel_noise(guided, rng))

    def pick(si: int, logits_2B: torch.Tensor):
        guided, _ = guide(si, logits_2B)
        if params.temperature != 1.0:
            guided = guided / params.temperature
        if not torch.isfinite(guided).all():
            raise nonfinite_logits_error(si, sizes[si])
        if si < K - 1:
            return draw(si, guided)
        idx = torch.empty(guided.shape[:2], dtype=torch.long, device=device)
        soft = guided.new_empty(B, guided.shape[1], model.Cvae) if more_smooth else None
        for group in state.groups:
            g_idx, g_soft = draw(si, guided.gather(1, group[..., None].expand(-1, -1, guided.shape[-1])))
            idx.scatter_(1, group, g_idx)
            if soft is not None:
                soft.scatter_(1, group[..., None].expand(-1, -1, model.Cvae), g_soft)
        state.hard_tokens = idx
        return idx, soft

    images, tokens = run_scales(model, state, ConcatKVCache(model.depth), pick)
    return HARTSampleOutput(images=images, tokens=tokens, residual=state.residual)


class HART(HARTTransformer):
    """The HART transformer with upstream's sampling method, for drop-in use."""

    @torch.no_grad()
    def autoregressive_infer_cfg(
        self,
        B: int,
        label_B: torch.Tensor,
        g_seed: Optional[int] = None,
        cfg: float = 1.5,
        top_k: int = 0,
        top_p: float = 0.0,
        more_smooth: bool = False,
        context_position_ids: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
        final_stage: int = 0,
        num_maskgit_iters: int = 1,
    ) -> torch.Tensor:
        """Upstream's signature: images (B, 3, H, W) in [0, 1] from text features ``label_B`` (B, Lc, Cc), with
        upstream's draws (``upstream_compat``). ``top_k`` is accepted and ignored, as upstream does."""
        if label_B is None or context_mask is None or context_position_ids is None:
            raise ValueError("label_B (text features), context_mask and context_position_ids are required, as upstream")
        if label_B.shape[0] != B:
            raise ValueError(f"label_B has {label_B.shape[0]} rows for batch size B={B}")
        params = HARTParams(
            cfg=cfg, top_k=None, top_p=top_p, seed=g_seed, more_smooth=more_smooth, num_maskgit_iters=num_maskgit_iters
        )
        return sample_hart_reference(
            self, label_B, context_mask, context_position_ids, params, residual=final_stage == 0, upstream_compat=True
        ).images


def hart_features(cond: Any) -> "HARTTextFeatures":
    """``cond`` as :class:`HARTTextFeatures`: those, or a tuple ``(context (B, Lc, Cc), mask (B, Lc)[, position_ids
    (B, Lc)])``; ``TypeError`` naming ``cond`` otherwise."""
    from .text import HARTTextFeatures

    if isinstance(cond, HARTTextFeatures):
        return cond
    if isinstance(cond, tuple) and len(cond) in (2, 3):
        return HARTTextFeatures(*cond)
    raise TypeError("cond: a HART model takes HARTTextFeatures or (context, mask[, position_ids]), or prompts with "
                    f"text_encoder= (ssg_engine.families.hart.text.Qwen2TextEncoder); got {type(cond).__name__}")


def generate_reference(model: HARTTransformer, vae: Any, cond: Any, params: HARTParams, *, upstream_compat: bool = False,
                       residual: bool = True, row_seeds: Optional[RowSeeds] = None, **fields: Any) -> Any:
    """(images (B, 3, H, W), tokens per scale) of :func:`sample_hart_reference` for text features ``cond`` (see
    :func:`hart_features`), on the model's device, with ``row_seeds`` (None: per-batch draws); ``fields``:
    ``HARTParams`` fields (``more_smooth=``, ``num_maskgit_iters=``) over ``params``."""
    features = hart_features(cond)
    device = next(model.parameters()).device
    out = sample_hart_reference(model, features.context.to(device), features.context_mask.to(device),
                                features.context_position_ids.to(device), params.replace(**fields) if fields else params,
                                residual=residual, upstream_compat=upstream_compat, row_seeds=row_seeds)
    return out.images, out.tokens
