"""The interface between a next-scale model family and the samplers that drive it.

Every sampler (the upstream-exact reference loop, the fast Engine) runs the same four calls per batch,
so no sampler repeats model code:

    state = model.condition(labels)                    # once per batch
    for si in range(model.num_scales):
        logits = model.step(state, si, attend)         # (2B, h*w, V) float32: conditional half, then unconditional
        ... guidance and sampling pick tokens (B, h*w) ...
        model.next_input(state, si, tokens)            # accumulate the latent, embed the next scale's input
    images = model.decode(state)                       # (B, 3, H, W) in [0, 1]

``attend`` is the sampler's KV cache: ``attend(layer, attn, h, start)`` computes the new tokens' q/k/v with
``attn.qkv(h)``, stores k/v at positions ``[start, start + l)`` and returns ``attn.attend(q, K, V, None)`` over
everything stored so far. The reference sampler concatenates (as upstream does); the Engine writes into a
static cache.
"""
from __future__ import annotations

from typing import Any, List, Protocol, Tuple, runtime_checkable

import torch


class Attend(Protocol):
    def __call__(self, layer: int, attn: Any, h: torch.Tensor, start: int) -> torch.Tensor:
        """Attention of the new tokens ``h`` (2B, l, C) over the cache of ``layer`` after storing them at ``start``."""


@runtime_checkable
class NextScaleModel(Protocol):
    """What a model family provides to the samplers (see the module docstring)."""

    def scale_sizes(self) -> List[Tuple[int, int]]:
        """(h, w) of every scale, coarsest first."""

    def cache_layout(self) -> Tuple[int, int, int, int]:
        """(layers, heads, total tokens over all scales, head_dim) of the KV cache a sampler must provide."""

    def condition(self, labels: torch.Tensor) -> Any:
        """Per-batch state from labels (B,): conditioning computed once, the first scale's input, an empty latent."""

    def step(self, state: Any, si: int, attend: Attend) -> torch.Tensor:
        """Logits (2B, h*w, V) float32 of scale ``si`` (conditional half first) from the state's current input."""

    def next_input(self, state: Any, si: int, tokens: torch.Tensor) -> None:
        """Add scale ``si``'s tokens (B, h*w) to the latent and prepare scale ``si + 1``'s input."""

    def decode(self, state: Any) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] from the accumulated latent."""
