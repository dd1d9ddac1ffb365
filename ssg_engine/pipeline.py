"""The per-scale sampling pipeline that every sampler drives (one implementation of the loop and of guidance).

Per scale: ``model.step`` -> CFG -> SSG -> temperature -> top-k -> top-p -> draw -> ``model.next_input``.
:func:`run_scales` is the loop; :class:`Guidance` is CFG + SSG with the previous scale's logits kept for the
prior. The samplers differ only in the KV cache they pass (``kv``), the guidance op (the PyTorch reference
or the fused kernel, :mod:`ssg_engine.ops`) and how they draw tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from .guidance import SSG, cfg_ratio, prior_operator
from .kernels.qkv_norm_rope_cache import qkv_norm_rope_reference
from .kernels.sampling import top_k_top_p_mask_reference
from .models.family import KVStore, NextScaleModel
from .params import SamplingParams
from .profiling import nvtx_range

Scalar = Union[float, torch.Tensor]
GuidanceOp = Callable[..., Tuple[torch.Tensor, torch.Tensor]]  # (logits_2B, prev, operator, cfg_t, beta) -> (guided, cfg)
# (logits_2B, prev, operator, cfg_t, beta, *, write_cfg, write_guided) -> (tokens, nonfinite, cfg or None, guided or None)
GuideAndDrawOp = Callable[..., Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]


class NonFiniteLogitsError(ValueError, FloatingPointError):
    """The logits of a scale became NaN or infinite; the message names the scale and what to change."""


def nonfinite_logits_error(si: int, size: Tuple[int, int]) -> NonFiniteLogitsError:
    """The error for non-finite logits at scale ``si`` of grid ``size`` (h, w), shared by every sampler."""
    return NonFiniteLogitsError(
        f"non-finite logits at scale {si} ({size[0]}x{size[1]}) after CFG, SSG and temperature; "
        "lower cfg/ssg beta or raise temperature, or check the checkpoint"
    )


@dataclasses.dataclass(frozen=True)
class ScaleGuidance:
    """What guidance applies at one scale: the CFG weight ``t_k``, the SSG ``beta_k`` and the prior operator
    (None: no SSG at this scale). ``cfg_t``/``beta`` are numbers, or device tensors the Engine refills."""

    cfg_t: Scalar
    beta: Scalar
    operator: Optional[torch.Tensor]


def guidance_schedule(
    cfg: float,
    ssg: Optional[SSG],
    sizes: Sequence[Tuple[int, int]],
    device: Union[str, torch.device],
    cfg_ts: Optional[Sequence[float]] = None,
) -> List[ScaleGuidance]:
    """Per-scale CFG weight (VAR's ramp), SSG beta and prior operator (float32 on ``device``) for grids ``sizes``.

    ``cfg_ts``: the CFG weight ``t_k`` of every scale, instead of VAR's ramp of ``cfg`` (then ``cfg`` is unused)."""
    K = len(sizes)
    betas = ssg.step_betas(K) if ssg is not None else [0.0] * K
    if cfg_ts is not None and len(cfg_ts) != K:
        raise ValueError(f"cfg_ts has {len(cfg_ts)} entries but there are {K} scales")
    return [
        ScaleGuidance(
            cfg_ratio(cfg, si, K) if cfg_ts is None else cfg_ts[si],
            betas[si],
            prior_operator(ssg.prior, sizes[si - 1], sizes[si], ssg.interp, device, torch.float32) if betas[si] != 0.0 else None,
        )
        for si in range(K)
    ]


class Guidance:
    """CFG + SSG scale by scale for one batch; keeps the logits the next scale's prior is built from
    (CFG-combined before SSG, or after it with ``prior_source="guided"``)."""

    def __init__(self, schedule: Sequence[ScaleGuidance], ssg: Optional[SSG], op: GuidanceOp) -> None:
        self.schedule, self.op = schedule, op
        self.prior_from_guided = ssg is not None and ssg.prior_source == "guided"
        self.prev: Optional[torch.Tensor] = None

    def __call__(self, si: int, logits_2B: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits (2B, l, V) of scale ``si`` -> (guided, cfg) (B, l, V) float32."""
        g = self.schedule[si]
        guided, cfg = self.op(logits_2B, self.prev if g.operator is not None else None, g.operator, g.cfg_t, g.beta)
        self.prev = guided if self.prior_from_guided else cfg
        return guided, cfg

    def guide_and_draw(
        self, si: int, logits_2B: torch.Tensor, op: GuideAndDrawOp, record: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The same step with an op that also draws (``ops.guide_and_sample_bits``): it writes ``cfg``/``guided``
        only where a later scale's prior or ``record`` needs them. Returns the op's (tokens, nonfinite, cfg, guided)."""
        g = self.schedule[si]
        keep = any(later.operator is not None for later in self.schedule[si + 1 :])
        out = op(
            logits_2B, self.prev if g.operator is not None else None, g.operator, g.cfg_t, g.beta,
            write_cfg=record or (keep and not self.prior_from_guided), write_guided=record or (keep and self.prior_from_guided),
        )
        self.prev = out[3] if self.prior_from_guided else out[2]
        return out


TokenPicker = Callable[[int, torch.Tensor], Tuple[torch.Tensor, Optional[torch.Tensor]]]


@torch.no_grad()
def run_scales(
    model: NextScaleModel, state: Any, kv: KVStore, pick: TokenPicker
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The sampling loop from ``state = model.condition(cond)``: images (B, 3, H, W) in [0, 1] and tokens per scale
    (B, h*w), or (B, h*w, C // draw_width) for models with several draws per token (Infinity's bits).

    ``pick(si, logits_2B)`` does guidance and sampling and returns the tokens, plus optional
    codebook-space embeddings (B, h*w, Cvae) to feed instead of the tokens' (upstream's ``more_smooth``).
    """
    tokens: List[torch.Tensor] = []
    for si, (h, w) in enumerate(model.scale_sizes()):
        with nvtx_range(f"scale {si} ({h}x{w})"):
            idx, embeddings = pick(si, model.step(state, si, kv))
            if embeddings is None:
                model.next_input(state, si, idx)
            else:
                model.next_input_embeddings(state, si, embeddings)
            tokens.append(idx)
    with nvtx_range("vae decode"):
        images = model.decode(state, kv.backend)
    return images, tokens


class ConcatKVCache:
    """Upstream's KV cache: each scale's keys/values concatenated to those cached so far (``torch.cat``); q/k
    normalisation and RoPE in eager PyTorch (the fused kernel's reference); the model's other ops on the reference
    backend (a :class:`ssg_engine.models.family.KVStore`)."""

    backend = "reference"

    def __init__(self, num_layers: int) -> None:
        self.k: List[Optional[torch.Tensor]] = [None] * num_layers
        self.v: List[Optional[torch.Tensor]] = [None] * num_layers

    def __call__(
        self, layer: int, qkv: torch.Tensor, start: int, *, num_heads: int, scale_mul: Optional[torch.Tensor] = None,
        rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv_norm_rope_reference(qkv, num_heads, scale_mul, rope)
        if self.k[layer] is not None:
            k, v = torch.cat((self.k[layer], k), dim=2), torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return q, k, v


def resolve_params(params: Optional[SamplingParams], overrides: dict, model: Any) -> SamplingParams:
    """``params`` (default ``SamplingParams()``) with keyword ``overrides`` applied and validated, for ``model``
    (an SSG without beta takes the model's: ``SamplingParams.for_model``)."""
    if params is not None and not isinstance(params, SamplingParams):
        raise TypeError(f"params must be an ssg_engine.SamplingParams or None, got {type(params).__name__}")
    params = (params or SamplingParams()).replace(**overrides) if overrides else (params or SamplingParams())
    return params.for_model(model)


def gumbel_noise(like: torch.Tensor, rng: Union[None, torch.Generator, Sequence[torch.Generator]]) -> torch.Tensor:
    """Gumbel(0, 1) noise ``-log(E)``, ``E ~ Exp(1)``, of ``like``'s shape (B, ...) from ``rng``: None (the global
    generator, as ``torch.nn.functional.gumbel_softmax`` draws it), one generator, or B generators (per-row seeding:
    row b's noise from ``rng[b]``)."""

    def draw(x: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:
        return -torch.empty_like(x, memory_format=torch.legacy_contiguous_format).exponential_(generator=g).log()

    if rng is None or isinstance(rng, torch.Generator):
        return draw(like, rng)
    if len(rng) != like.shape[0]:
        raise ValueError(f"rng: {len(rng)} generators for {like.shape[0]} rows; give one per image row")
    return torch.stack([draw(x, g) for x, g in zip(like.unbind(0), rng)])


def gumbel_softmax(logits: torch.Tensor, tau: float, gumbels: torch.Tensor) -> torch.Tensor:
    """Soft Gumbel-softmax ``softmax((logits + gumbels) / tau)`` over the last dim, given the noise ``gumbels``."""
    return ((logits + gumbels) / tau).softmax(-1)


def smooth_embeddings(
    logits: torch.Tensor, top_k: int, top_p: float, ratio: float, codebook: torch.Tensor, gumbels: torch.Tensor
) -> torch.Tensor:
    """Upstream's ``more_smooth`` input: logits (B, l, V) (guided, after temperature) filtered by top-k / top-p (at
    temperature 1), times ``1 + ratio``, Gumbel-softmax at ``tau = max(0.27 (1 - 0.95 ratio), 0.005)`` with the noise
    ``gumbels`` (B, l, V), times ``codebook`` (V, Cvae) -> soft embeddings (B, l, Cvae). ``ratio``: the scale's
    ``si / (K - 1)`` (HART: ``min(si, K - 2) / (K - 1)``)."""
    rows = logits.reshape(-1, logits.shape[-1])
    masked = rows.masked_fill(~top_k_top_p_mask_reference(rows, top_k, top_p, 1.0), float("-inf")).view_as(logits)
    soft = gumbel_softmax(masked.mul(1 + ratio), max(0.27 * (1 - ratio * 0.95), 0.005), gumbels)
    return soft @ codebook.unsqueeze(0)
