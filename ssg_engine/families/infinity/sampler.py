"""The reference sampler of the Infinity family: upstream Infinity's ``autoregressive_infer_cfg``, step for step, plus SSG.

On CPU in float32 with SSG off it makes the same calls in the same order as upstream (commit 4c27bbb): per scale the
KV-cached blocks (CFG inserted at layer outputs inside :meth:`InfinityTransformer.step`), ``logits.mul(1 / tau_k)``,
CFG on the logits ``w_k * cond + (1 - w_k) * uncond`` where ``0`` is in ``cfg_insertion_layer`` and ``w_k != 1``, then
top-k / top-p on each bit's 2 logits and one ``torch.multinomial`` over the (B * h*w * d) bit rows in (batch, token,
bit) order from one ``torch.Generator`` seeded with ``seed`` (used by the draws only). So the same seed gives the
same bits at every scale (``tests/test_infinity_sampler.py`` checks this against ``tests/golden/infinity``).

Infinity's CFG ``w * c + (1 - w) * u`` is VAR's ``(1 + t) * c - t * u`` with ``t = w - 1`` (bit-identical in
float32: ``w - 1`` and ``1 + t`` are exact for ``w >= 1``), so the loop and guidance are the pipeline's
(:func:`ssg_engine.pipeline.run_scales` over an :class:`ssg_engine.families.infinity.model.InfinityRequest`,
:class:`ssg_engine.pipeline.Guidance` with per-scale ``cfg_ts``). Where the
logits are not mixed (``w_k == 1``, or CFG only at layers) the model returns the conditional rows only and the
guidance op gets them twice with ``t = 0`` (``(1 + 0) * x - 0 * x == x`` exactly).

SSG on bit logits (see docs/ssg_method.md, "SSG on bitwise tokens"): the logits of a scale (B, h*w, d, 2) are
flattened to (B, h*w, 2d) and guided as VAR's (B, h*w, V): the prior operator acts on the spatial grid, for every
(bit, side) channel, from the previous scale's CFG-combined logits (as handed to the sampler: upstream divides by the
temperature ``tau_k`` before CFG).

``ssg_engine.infinity_sampler`` is this module, kept for compatibility.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

import torch

from ...guidance import SSG
from ...kernels.sampling import sample_logits_reference
from ...kernels.ssg_guidance import ssg_guidance_reference
from ...params import SamplingParams
from ...pipeline import ConcatKVCache, Guidance, guidance_schedule, nonfinite_logits_error, run_scales
from ...seeding import RowSeeds, check_row_seeds, row_generators
from .model import InfinityRequest, InfinityTransformer, PaddedText, TextFeatures, scale_schedule

@dataclasses.dataclass
class InfinitySampleOutput:
    """``images`` (B, 3, H, W) in [0, 1] (None without a VAE); ``bits[k]`` (B, h_k*w_k, d) int64 in {0, 1}; ``summed_codes`` the decoder
    input (B, d, 1, H/16, W/16); with ``record_logits``, ``logits[k]`` (B, h_k*w_k, d, 2): what each scale hands to
    the draw (after temperature, CFG and SSG, before top-k / top-p) and ``cfg_logits[k]`` the same before SSG."""

    images: Optional[torch.Tensor]
    bits: List[torch.Tensor]
    summed_codes: torch.Tensor
    logits: Optional[List[torch.Tensor]] = None
    cfg_logits: Optional[List[torch.Tensor]] = None


def infinity_request(
    model: InfinityTransformer,
    vae: Any,
    params: SamplingParams,
    *,
    h_div_w: float = 1.0,
    pn: Any = None,
    schedule: Optional[Sequence[Sequence[int]]] = None,
    negative: Any = None,
    cfg_insertion_layer: Sequence[int] = (0,),
    cfg_list: Optional[Sequence[float]] = None,
    tau_list: Optional[Sequence[float]] = None,
) -> InfinityRequest:
    """The request of ``params`` and the Infinity keywords: ``schedule`` (explicit), else ``scale_schedule(h_div_w,
    pn)`` with ``pn`` defaulting to ``model.config.num_scales``; upstream's CFG weight ``w_k = params.cfg`` and
    temperature ``tau_k = params.temperature`` at every scale unless ``cfg_list`` / ``tau_list`` are given."""
    if schedule is None and pn is None and model.config.num_scales is None:
        raise ValueError("pn: this model's number of scales is unknown (its config has num_scales=None: a checkpoint's shapes "
                         "cannot tell it); pass pn= (the number of scales it was trained on, or 0.06M | 0.25M | 0.60M | 1M) or "
                         "schedule=, or load it with config={'num_scales': N}")
    sched = schedule if schedule is not None else scale_schedule(h_div_w, model.config.num_scales if pn is None else pn)
    K = len(sched)
    return InfinityRequest(
        model, vae, sched,
        cfg_list=[params.cfg] * K if cfg_list is None else cfg_list,
        tau_list=[params.temperature] * K if tau_list is None else tau_list,
        negative=negative, cfg_insertion_layer=cfg_insertion_layer,
    )


@torch.no_grad()
def sample_infinity_reference(
    model: InfinityTransformer,
    vae: Any,
    text: Any,
    schedule: Sequence[Sequence[int]],
    *,
    cfg_list: Sequence[float],
    tau_list: Sequence[float],
    top_k: int = 0,
    top_p: float = 0.0,
    seed: Optional[int] = None,
    cfg_insertion_layer: Sequence[int] = (0,),
    negative: Any = None,
    ssg: Optional[SSG] = None,
    record_logits: bool = False,
    row_seeds: Optional[RowSeeds] = None,
) -> InfinitySampleOutput:
    """Sample one image per prompt of ``text`` (see :meth:`TextFeatures.coerce`) on ``schedule`` (a table schedule,
    (h, w) or upstream's (1, h, w) entries), upstream's ``autoregressive_infer_cfg`` arguments otherwise
    (``seed`` = ``g_seed``; ``negative`` = ``negative_label_B_or_BLT``); ``ssg`` adds SSG on the bit logits.
    ``vae``: the BSQ VAE (anything with ``decode(z)``), or None to skip decoding (``images`` is None).
    ``row_seeds`` (one int64 per prompt, e.g. ``ssg_engine.seeding.row_seeds(seed, B)``): per-row seeding, prompt
    b's bits from its own ``torch.Generator`` seeded with ``row_seeds[b]`` (``seed`` unused); None: upstream's draws."""
    request = InfinityRequest(model, vae, schedule, cfg_list, tau_list, negative, cfg_insertion_layer)
    sched = request.schedule
    top_k = max(int(top_k), 0)
    device = model.pos_start.device
    text = text if isinstance(text, PaddedText) else TextFeatures.coerce(text)
    keys = check_row_seeds(row_seeds, text.batch)
    rng: Any = None if keys is None else row_generators(keys, device)
    if keys is None and seed is not None:
        rng = torch.Generator(device=device)
        rng.manual_seed(int(seed))
    ssg = None if ssg is None else ssg.for_model(model)  # an SSG without beta takes the model card's
    guide = Guidance(guidance_schedule(0.0, ssg, sched, device, cfg_ts=request.cfg_ts()), ssg, ssg_guidance_reference)
    logits_rec: List[torch.Tensor] = []
    cfg_rec: List[torch.Tensor] = []

    def pick(si: int, logits_2B: torch.Tensor) -> Tuple[torch.Tensor, None]:
        guided, cfg = guide(si, logits_2B)
        if not torch.isfinite(guided).all():
            raise nonfinite_logits_error(si, sched[si])
        B, hw, C = guided.shape
        if record_logits:
            logits_rec.append(guided.view(B, hw, C // 2, 2).clone())
            cfg_rec.append(cfg.view(B, hw, C // 2, 2).clone())
        bits = sample_logits_reference(guided.reshape(-1, 2), top_k, float(top_p), 1.0, rng)
        return bits.view(B, hw, C // 2), None

    state = request.condition(text)  # the values checked once
    images, bits = run_scales(request, state, ConcatKVCache(model.depth), pick)
    return InfinitySampleOutput(
        images=images, bits=bits, summed_codes=state.summed_codes,
        logits=logits_rec if record_logits else None, cfg_logits=cfg_rec if record_logits else None,
    )


def generate_reference(
    model: InfinityTransformer, vae: Any, cond: Any, params: SamplingParams, *, row_seeds: Optional[RowSeeds] = None, **keywords: Any
) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
    """``generate``'s path off CUDA for Infinity: one image per prompt of ``cond`` (text features) from
    :func:`sample_infinity_reference` with ``params`` (resolved), ``row_seeds`` (None: per-batch draws) and the
    Infinity ``keywords`` (see :func:`infinity_request`); (images (B, 3, H, W), bits per scale (B, h*w, d) int64)."""
    request = infinity_request(model, vae, params, **keywords)
    out = sample_infinity_reference(
        model, vae, cond, request.schedule, cfg_list=request.cfg_list, tau_list=request.tau_list,
        top_k=params.top_k, top_p=params.top_p, seed=params.seed, cfg_insertion_layer=request.cfg_insertion_layer,
        negative=request.negative, ssg=params.ssg, row_seeds=row_seeds,
    )
    return out.images, out.bits
