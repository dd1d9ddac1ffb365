"""The reference sampler of the Infinity family: upstream Infinity's ``autoregressive_infer_cfg``, step for step, plus SSG.

On CPU in float32 with SSG off it makes the same calls in the same order as upstream (commit 4c27bbb): per scale the
KV-cached blocks (CFG inserted at layer outputs inside :meth:`InfinityTransformer.step`), ``logits.mul(1 / tau_k)``,
CFG on the logits ``w_k * cond + (1 - w_k) * uncond`` where ``0`` is in ``cfg_insertion_layer`` and ``w_k != 1``, then
top-k / top-p on each bit's 2 logits and one ``torch.multinomial`` over the (B * h*w * d) bit rows in (batch, token,
bit) order from one ``torch.Generator`` seeded with ``seed`` (used by the draws only). So the same seed gives the
same bits at every scale (``tests/test_infinity_sampler.py`` checks this against ``tests/golden/infinity``).

Infinity's CFG ``w * c + (1 - w) * u`` is VAR's ``(1 + t) * c - t * u`` with ``t = w - 1`` (bit-identical in
float32: ``w - 1`` and ``1 + t`` are exact for ``w >= 1``), so the loop and guidance are the pipeline's
(:func:`ssg_engine.pipeline.run_scales`, :class:`ssg_engine.pipeline.Guidance` with per-scale ``cfg_ts``). Where the
logits are not mixed (``w_k == 1``, or CFG only at layers) the model returns the conditional rows only and the
guidance op gets them twice with ``t = 0`` (``(1 + 0) * x - 0 * x == x`` exactly).

SSG on bit logits (see docs/ssg_method.md, "SSG on bitwise tokens"): the logits of a scale (B, h*w, d, 2) are
flattened to (B, h*w, 2d) and guided as VAR's (B, h*w, V): the prior operator acts on the spatial grid, for every
(bit, side) channel, from the previous scale's CFG-combined logits (as handed to the sampler: upstream divides by the
temperature ``tau_k`` before CFG).
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .guidance import SSG
from .kernels.sampling import sample_logits_reference
from .kernels.ssg_guidance import ssg_guidance_reference
from .models.infinity import InfinityState, InfinityTransformer, as_schedule
from .pipeline import Guidance, guidance_schedule, nonfinite_logits_error, run_scales
from .sampler import ConcatKVCache


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


class _BoundInfinity:
    """An Infinity model bound to one call's schedule, negative prompt, CFG settings and VAE, so that it offers the
    :class:`ssg_engine.models.family.NextScaleModel` calls :func:`run_scales` makes."""

    def __init__(self, model: InfinityTransformer, vae: Any, schedule, negative: Any, cfg_list, cfg_insertion_layer) -> None:
        self.model, self.vae, self.schedule = model, vae, schedule
        self.negative, self.cfg_list, self.cfg_insertion_layer = negative, cfg_list, cfg_insertion_layer
        self.state: Optional[InfinityState] = None

    def scale_sizes(self) -> List[Tuple[int, int]]:
        return list(self.schedule)

    def condition(self, text: Any) -> InfinityState:
        self.state = self.model.condition(
            text, self.schedule, negative=self.negative, cfg_list=self.cfg_list, cfg_insertion_layer=self.cfg_insertion_layer
        )
        return self.state

    def step(self, state: InfinityState, si: int, kv: Any) -> torch.Tensor:
        return self.model.step(state, si, kv)

    def next_input(self, state: InfinityState, si: int, bits: torch.Tensor) -> None:
        self.model.next_input(state, si, bits)

    def decode(self, state: InfinityState) -> Optional[torch.Tensor]:
        return None if self.vae is None else self.model.decode(state, self.vae)


def _per_scale(values: Sequence[float], name: str, K: int) -> List[float]:
    values = [float(v) for v in values]
    if len(values) < K:  # upstream asserts len(cfg_list) >= len(scale_schedule)
        raise ValueError(f"{name} has {len(values)} entries; the schedule has {K} scales")
    return values[:K]


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
) -> InfinitySampleOutput:
    """Sample one image per prompt of ``text`` (see :meth:`TextFeatures.coerce`) on ``schedule`` (a table schedule,
    (h, w) or upstream's (1, h, w) entries), upstream's ``autoregressive_infer_cfg`` arguments otherwise
    (``seed`` = ``g_seed``; ``negative`` = ``negative_label_B_or_BLT``); ``ssg`` adds SSG on the bit logits.
    ``vae``: the BSQ VAE (anything with ``decode(z)``), or None to skip decoding (``images`` is None)."""
    sched = as_schedule(schedule)
    K = len(sched)
    cfg_list, tau_list = _per_scale(cfg_list, "cfg_list", K), _per_scale(tau_list, "tau_list", K)
    if min(tau_list) <= 0:
        raise ValueError(f"tau_list entries must be > 0; got {tau_list}")
    top_k = max(int(top_k), 0)
    device = model.pos_start.device
    rng = None
    if seed is not None:
        rng = torch.Generator(device=device)
        rng.manual_seed(int(seed))
    on_logits = 0 in cfg_insertion_layer
    cfg_ts = [(w - 1.0) if (on_logits and w != 1) else 0.0 for w in cfg_list]
    guide = Guidance(guidance_schedule(0.0, ssg, sched, device, cfg_ts=cfg_ts), ssg, ssg_guidance_reference)
    bound = _BoundInfinity(model, vae, sched, negative, cfg_list, tuple(cfg_insertion_layer))
    logits_rec: List[torch.Tensor] = []
    cfg_rec: List[torch.Tensor] = []

    def pick(si: int, logits: torch.Tensor):
        B = bound.state.batch
        rows, hw, d, _ = logits.shape
        x = logits.mul(1 / tau_list[si]).reshape(rows, hw, 2 * d)
        if rows == B:  # not mixed on logits at this scale: t = 0 on the conditional rows twice
            x = torch.cat((x, x))
        guided, cfg = guide(si, x)
        if not torch.isfinite(guided).all():
            raise nonfinite_logits_error(si, sched[si])
        if record_logits:
            logits_rec.append(guided.view(B, hw, d, 2).clone())
            cfg_rec.append(cfg.view(B, hw, d, 2).clone())
        bits = sample_logits_reference(guided.reshape(-1, 2), top_k, float(top_p), 1.0, rng)
        return bits.view(B, hw, d), None

    images, bits = run_scales(bound, text, ConcatKVCache(model.depth), pick)
    return InfinitySampleOutput(
        images=images, bits=bits, summed_codes=bound.state.summed_codes,
        logits=logits_rec if record_logits else None, cfg_logits=cfg_rec if record_logits else None,
    )
