"""The interface between a next-scale model family and the samplers that drive it.

Every sampler (the upstream-exact reference loop, the fast Engine) runs the same four calls per batch,
so no sampler repeats model code:

    state = model.condition(labels)                    # once per batch
    for si in range(model.num_scales):
        logits = model.step(state, si, kv)             # (2B, h*w, C): conditional half, then unconditional
        ... guidance, then one draw per model.draw_width logits: tokens (B, h*w) (C == draw_width, VAR: C = V)
            or (B, h*w, C // draw_width) (Infinity: C = 2d logits, d bits per token) ...
        model.next_input(state, si, tokens)            # accumulate the latent, embed the next scale's input
    images = model.decode(state)                       # (B, 3, H, W) in [0, 1]

``kv`` is the sampler's KV cache: ``kv(layer, k, v, start)`` stores the new tokens' keys/values (2B, H, l, D) at
positions ``[start, start + l)`` and returns all keys/values stored so far, ``(K, V)`` (2B, H, start + l, D). The
reference sampler concatenates (as upstream does); the Engine writes into a static cache.
"""
from __future__ import annotations

from typing import Any, List, Protocol, Tuple, runtime_checkable

import torch


class KVStore(Protocol):
    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` (2B, H, l, D) of ``layer`` at ``[start, start + l)``; return all stored (2B, H, start + l, D)."""


@runtime_checkable
class NextScaleModel(Protocol):
    """What a model family provides to the samplers (see the module docstring)."""

    @property
    def draw_width(self) -> int:
        """Logits per categorical draw (VAR: V; Infinity: 2, one draw per bit); ``C % draw_width == 0``."""

    def scale_sizes(self) -> List[Tuple[int, int]]:
        """(h, w) of every scale, coarsest first."""

    def cache_layout(self) -> Tuple[int, int, int, int]:
        """(layers, heads, total tokens over all scales, head_dim) of the KV cache a sampler must provide."""

    def condition(self, cond: Any) -> Any:
        """Per-batch state from the condition (VAR: labels (B,); Infinity: text features): conditioning computed once,
        the first scale's input, an empty latent."""

    def step(self, state: Any, si: int, kv: KVStore) -> torch.Tensor:
        """Logits (2B, h*w, C) of scale ``si`` (conditional half first), ready for guidance, from the state's input."""

    def next_input(self, state: Any, si: int, tokens: torch.Tensor) -> None:
        """Add scale ``si``'s tokens (B, h*w) or (B, h*w, C // draw_width) to the latent; prepare scale ``si + 1``'s input."""

    def decode(self, state: Any) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] from the accumulated latent."""
