"""HART bound to one Engine request (:class:`HARTRequest`), as a :class:`ssg_engine.models.family.NextScaleModel`, and
the Engine's seeded randomness besides the token draws: the last scale's MaskGIT orders, the diffusion head's noise and
(``more_smooth``) the Gumbel noise of every scale's soft embeddings.

They come from the Engine's seed tensor (1,) int64 through a counter-based hash (:func:`seeded_uniform`: torch integer
ops on the seed's device, no host read, static shapes), so a captured CUDA graph replays them with a new seed and the
reference and Triton backends draw the same numbers. With per-row seeding (a seed tensor (B,), one key per image row:
:mod:`ssg_engine.seeding`) image row b's orders and noise are hashed from ``seed[b]`` and its own counters only. They are not the reference sampler's ``torch.Generator`` draws:
the same distributions, not the same random numbers (as the Engine's token draws).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, List, Optional, Tuple

import torch

from ...models.family import KVStore
from ...params import HARTParams
from .diffusion import NoiseSource, RowNoise
from .model import HARTCondition, HARTState, HARTTransformer
from ...pipeline import smooth_embeddings
from .sampler import cfg_weights, smooth_ratio, upstream_top_k
from .text import HARTTextFeatures

_MASK32 = 0xFFFFFFFF
# streams of seeded_uniform: the Gumbel noise (one stream, each scale its own counter range), the MaskGIT orders, and
# the diffusion noise (seeded_normal streams NOISE_STREAM + call, call >= 1: uniform streams 6, 7, 8, ...)
GUMBEL_STREAM, ORDERS_STREAM, NOISE_STREAM = 0, 1, 2


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (``lowbias32``) of int64 values in [0, 2^32) -> [0, 2^32), elementwise."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def seeded_uniform(seed: torch.Tensor, stream: int, shape: Tuple[int, ...], offset: int = 0) -> torch.Tensor:
    """``u ~ U(0, 1)`` float32 of ``shape`` from ``seed`` int64 and a stream number, never exactly 0 or 1. ``seed``
    (1,): element ``i`` of the draw is a hash of (seed, stream, offset + i); (S,) with ``shape[0] == S`` (per-row
    seeding): element ``i`` of row s is a hash of (``seed[s]``, stream, offset + i), ``i`` counted within the row.
    Deterministic on every device; no host read of ``seed``."""
    rows = seed.shape[0]
    if rows != 1 and (not shape or shape[0] != rows):
        raise ValueError(f"seeded_uniform: {rows} row seeds for a draw of shape {tuple(shape)}; give 1 or shape[0]")
    key = _hash32((seed & _MASK32) ^ _hash32(((seed >> 32) & _MASK32) + stream * 0x9E3779B9 & _MASK32)).view(rows, 1)
    counter = torch.arange(offset, offset + math.prod(shape) // rows, dtype=torch.int64, device=seed.device).view(1, -1)
    bits = _hash32(_hash32((counter & _MASK32) ^ key) ^ ((counter >> 32) + key * 0x27D4EB2F & _MASK32))
    return ((bits >> 8).float() + 0.5).mul_(1.0 / (1 << 24)).view(shape)


def seeded_normal(seed: torch.Tensor, stream: int, shape: Tuple[int, ...]) -> torch.Tensor:
    """Standard normal float32 of ``shape`` from ``seed`` (Box-Muller on two :func:`seeded_uniform` streams)."""
    u1, u2 = seeded_uniform(seed, 2 * stream, shape), seeded_uniform(seed, 2 * stream + 1, shape)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def seeded_gumbel(seed: torch.Tensor, shape: Tuple[int, ...], offset: int = 0) -> torch.Tensor:
    """Gumbel(0, 1) float32 of ``shape`` (``-log(-log(u))``, finite) from ``seed``'s Gumbel stream at elements
    ``[offset, offset + prod(shape))`` (per-row seeds: at each row's elements ``[offset, offset + prod(shape[1:]))``)."""
    return -torch.log(-torch.log(seeded_uniform(seed, GUMBEL_STREAM, shape, offset)))


class SeededNoise:
    """The diffusion head's :class:`ssg_engine.families.hart.diffusion.NoiseSource` from the Engine's seed tensor: each
    draw its own stream (the starting noise, then one per step), counted on the host (static per request)."""

    def __init__(self, seed: torch.Tensor) -> None:
        self.seed, self.calls = seed, 0

    def draw(self, shape: Tuple[int, ...], device: Optional[torch.device] = None) -> torch.Tensor:
        """The next draw's standard normals of ``shape`` (per-row seeds: ``shape[0]`` rows, one per seed)."""
        self.calls += 1
        return seeded_normal(self.seed, NOISE_STREAM + self.calls, shape).to(device)

    def initial(self, rows: int, channels: int, device: torch.device) -> torch.Tensor:
        return self.draw((rows, channels), device)

    def step(self, like: torch.Tensor) -> torch.Tensor:
        return self.draw(tuple(like.shape), like.device).to(like.dtype)


def seeded_orders(seed: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """MaskGIT orders (batch, length) int64: a uniformly random permutation per row (argsort of seeded uniforms);
    ``seed`` (1,), or (batch,) row seeds (row b's order from ``seed[b]`` only)."""
    return seeded_uniform(seed, ORDERS_STREAM, (batch, length)).argsort(dim=1)


@dataclasses.dataclass
class HARTRequest:
    """A HART model bound to one Engine request: upstream's per-scale CFG weights (``cfg_ts``) and top-k
    (``top_ks``), the diffusion head's CFG weight and switch, the MaskGIT passes, ``more_smooth`` (soft Gumbel-softmax
    embeddings fed instead of the drawn codes', :meth:`soft_embeddings`), and the seed tensor (None until
    :meth:`seeded`) its orders and noise come from. ``condition`` takes :class:`HARTTextFeatures` (B rows)."""

    model: HARTTransformer
    weights: List[float]
    top_ks: List[int]
    residual: bool = True
    num_maskgit_iters: int = 1
    more_smooth: bool = False
    seed: Optional[torch.Tensor] = None

    @property
    def draw_width(self) -> int:
        return self.model.V

    def graph_key(self) -> tuple:
        """What a captured graph bakes in of this request (the CFG weights of the logits are device tensors)."""
        return tuple(self.top_ks), self.residual, self.num_maskgit_iters, self.more_smooth, self.weights[-1]

    def cfg_ts(self) -> List[float]:
        return list(self.weights)

    def seeded(self, seed: torch.Tensor) -> "HARTRequest":
        """This request drawing its MaskGIT orders and diffusion noise from ``seed`` (1,) int64, or (B,) row seeds."""
        return dataclasses.replace(self, seed=seed)

    def scale_sizes(self) -> List[Tuple[int, int]]:
        return self.model.scale_sizes()

    def cache_layout(self) -> Tuple[int, int, int, int]:
        return self.model.cache_layout()

    def condition(self, text: HARTTextFeatures) -> HARTState:
        if self.seed is None:
            raise ValueError("HARTRequest.condition needs a seed tensor: call seeded(seed) first")
        B, last = text.context.shape[0], self.model.patch_nums[-1] ** 2
        orders = seeded_orders(self.seed, B, last) if self.num_maskgit_iters > 1 else None
        noise: NoiseSource = SeededNoise(self.seed)
        if self.seed.shape[0] > 1:  # per-row seeds: each image row's noise from its own key
            noise = RowNoise(B, self.weights[-1], noise.draw)
        return self.model.condition(HARTCondition(
            text.context, text.context_mask, text.context_position_ids, self.weights[-1], noise,
            self.residual, self.num_maskgit_iters, orders,
        ))

    def soft_embeddings(
        self, state: HARTState, si: int, logits: torch.Tensor, tokens: torch.Tensor, top_p: float,
        gumbels: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """The Engine's hook after a scale's draw: None without ``more_smooth`` (the drawn ``tokens`` (B, l) are fed);
        with it the soft embeddings (B, l, Cvae) to feed (:func:`ssg_engine.pipeline.smooth_embeddings` of the scale's
        sampled ``logits`` (B, l, V), guided and divided by the temperature, this request's top-k and ``top_p``, as the
        reference sampler), and at the last scale ``tokens`` become the diffusion head's condition. The Gumbel noise:
        ``gumbels`` (B, l, V) (tests), else the seed's Gumbel stream, each scale its own elements (static shapes, no
        host read: inside a captured graph)."""
        if not self.more_smooth:
            return None
        K = len(self.top_ks)
        if si == K - 1:
            state.hard_tokens = tokens
        if gumbels is None:
            if self.seed is None:
                raise ValueError("HARTRequest.soft_embeddings needs a seed tensor: call seeded(seed) first")
            B, l, V = logits.shape
            before = sum(h * w for h, w in self.scale_sizes()[:si])
            rows = B if self.seed.shape[0] == 1 else 1  # one key for the batch: its elements; per-row keys: a row's
            gumbels = seeded_gumbel(self.seed, (B, l, V), offset=rows * V * before).to(logits.device)
        codebook = self.model.tokenizer.quantize.embedding.weight
        return smooth_embeddings(logits, self.top_ks[si], top_p, smooth_ratio(si, K), codebook, gumbels)

    def step(self, state: HARTState, si: int, kv: KVStore) -> torch.Tensor:
        return self.model.step(state, si, kv)

    def next_input(self, state: HARTState, si: int, tokens: torch.Tensor) -> None:
        self.model.next_input(state, si, tokens)

    def next_input_embeddings(self, state: HARTState, si: int, embeddings: torch.Tensor) -> None:
        self.model.next_input_embeddings(state, si, embeddings)

    def decode(self, state: HARTState, backend: str = "reference") -> torch.Tensor:
        return self.model.decode(state, backend)


def hart_request(model: HARTTransformer, params: HARTParams, *, residual: bool = True, **fields: Any) -> Tuple[HARTRequest, HARTParams]:
    """The Engine's request for ``params`` (``fields``: ``HARTParams`` fields over it, ``more_smooth=``,
    ``num_maskgit_iters=``) and the params its sampler applies (top-k per scale from the request: ``top_k`` 0)."""
    params = params.replace(**fields) if fields else params
    K = len(model.patch_nums)
    top_ks = [upstream_top_k(si) if params.top_k is None else params.top_k for si in range(K)]
    request = HARTRequest(model, cfg_weights(params.cfg, K), top_ks, bool(residual), params.num_maskgit_iters,
                          params.more_smooth)
    return request, params
