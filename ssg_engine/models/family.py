"""The interface between a next-scale model family and the samplers that drive it.

Every sampler (the upstream-exact reference loop, the fast Engine) runs the same four calls per batch,
so no sampler repeats model code:

    state = model.condition(labels)                    # once per batch
    for si in range(model.num_scales):
        logits = model.step(state, si, kv)             # (2B, h*w, C): conditional half, then unconditional
        ... guidance, then one draw per model.draw_width logits: tokens (B, h*w) (C == draw_width, VAR: C = V)
            or (B, h*w, C // draw_width) (Infinity: C = 2d logits, d bits per token) ...
        model.next_input(state, si, tokens)            # accumulate the latent, embed the next scale's input
    images = model.decode(state, kv.backend)           # (B, 3, H, W) in [0, 1]

``kv`` is the sampler's KV cache and its choice of ops: ``kv(layer, qkv, start, num_heads=, scale_mul=, rope=)`` takes
a layer's packed QKV projection (2B, l, 3C) of the tokens at positions ``[start, start + l)``, splits it, normalises
q/k (when ``scale_mul`` is given, q times it), rotates them (``rope``), stores the keys/values, and returns q
(2B, H, l, D) with all keys/values stored so far (2B, H, start + l, D). The reference sampler does it in eager PyTorch
and concatenates (as upstream does); the Engine runs one fused kernel that writes into its static cache.
``kv.backend`` is the backend of the other fused ops the step runs (:mod:`ssg_engine.ops`): the sampler's, never a global.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any, Dict, Iterable, List, Optional, Protocol, Tuple, TypeVar, Union, runtime_checkable

import torch
import torch.nn as nn

M = TypeVar("M", bound=nn.Module)


class KVStore(Protocol):
    backend: str  # "reference" | "triton": the ops backend of the sampler that owns this cache

    def __call__(
        self, layer: int, qkv: torch.Tensor, start: int, *, num_heads: int, scale_mul: Optional[torch.Tensor] = None,
        rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv (2B, l, 3C) of ``layer`` at ``[start, start + l)`` -> q (2B, H, l, D), all keys and values (2B, H, start + l, D)."""


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

    def decode(self, state: Any, backend: str = "reference") -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] from the accumulated latent; the decoder's fused ops on ``backend``."""


def cast_copy(module: M, cast: Iterable[torch.Tensor], dtype: torch.dtype, device: Union[str, torch.device],
              shared: Iterable[Any] = ()) -> M:
    """A copy of ``module`` for sampling under ``torch.autocast(dtype)`` on ``device``, in eval mode without gradients:
    the tensors ``cast`` (those autocast would cast at every use) cast once to ``dtype``, every other parameter and
    buffer moved to ``device`` as it is (shared with ``module`` where it is there already); the objects ``shared``
    (e.g. an attached tokenizer) are referenced, not copied. A snapshot: later changes to ``module`` do not reach it."""
    device = torch.device(device)
    ids = {id(t) for t in cast}
    memo: Dict[int, Any] = {id(obj): obj for obj in shared}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        moved = tensor.detach().to(device=device, dtype=dtype if id(tensor) in ids and tensor.is_floating_point() else None)
        memo[id(tensor)] = nn.Parameter(moved, requires_grad=False) if isinstance(tensor, nn.Parameter) else moved
    return copy.deepcopy(module, memo).eval()
