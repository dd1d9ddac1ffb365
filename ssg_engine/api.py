"""The functional API: ``generate`` picks the sampler for the model's device (the Engine on CUDA, the
reference loop elsewhere) and reuses engines through an explicit, bounded cache."""
from __future__ import annotations

import collections
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from .engine import Engine
from .models.var import VARTransformer
from .models.vqvae import VQVAE
from .params import SamplingParams
from .sampler import check_models, resolve_params, sample_reference
from .validation import class_labels


class EngineCache:
    """Engines kept for reuse by :func:`generate`, keyed by (var, vae, device, dtype); at most ``max_engines``, least
    recently used dropped. An engine holds its models, so they stay alive until dropped or ``clear()``-ed.
    ``ssg_engine.api.ENGINE_CACHE`` is the one ``generate`` uses."""

    def __init__(self, max_engines: int = 2) -> None:
        self.max_engines = max_engines
        self._engines: "collections.OrderedDict[tuple, Engine]" = collections.OrderedDict()

    def get(self, var: VARTransformer, vae: VQVAE, max_batch: int = 64) -> Engine:
        """The engine for ``var``/``vae`` on their device and dtype (built on first use)."""
        device, dtype = var.lvl_1L.device, var.head.weight.dtype
        key = (id(var), id(vae), str(device), dtype)
        engine = self._engines.pop(key, None)
        if engine is None or engine.var is not var or engine.vae is not vae:
            engine = Engine(var, vae, max_batch=max_batch, device=device, dtype=dtype)
        self._engines[key] = engine
        while len(self._engines) > self.max_engines:
            self._engines.popitem(last=False)
        return engine

    def clear(self) -> None:
        self._engines.clear()

    def __len__(self) -> int:
        return len(self._engines)


ENGINE_CACHE = EngineCache()


@torch.no_grad()
def generate(
    var: VARTransformer,
    vae: VQVAE,
    labels: Union[Sequence[int], torch.Tensor],
    params: Optional[SamplingParams] = None,
    *,
    return_tokens: bool = False,
    engine: Optional[Engine] = None,
    **overrides: Any,
) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
    """Sample one image per label: images (B, 3, H, W) in [0, 1], and the tokens per scale if ``return_tokens``.

    ``params`` (default ``SamplingParams()``, upstream's protocol) with keyword ``overrides`` (``cfg=``,
    ``top_k=``, ``top_p=``, ``temperature=``, ``seed=``, ``ssg=``). On CUDA this runs an ``Engine`` (``engine``,
    else one from ``ENGINE_CACHE``; Philox draws from ``seed``), elsewhere the reference sampler (a
    ``torch.Generator`` seeded with ``seed``): the same distributions, not the same random numbers.
    """
    check_models(var, vae, "generate(var, vae, labels)")
    params = resolve_params(params, overrides)
    labels_t = class_labels(labels, var.num_classes, var.lvl_1L.device)
    if not var.vae_proxy or var.vae_proxy[0] is not vae:
        var.attach_vae(vae)
    if engine is not None or labels_t.device.type == "cuda":
        engine = engine or ENGINE_CACHE.get(var, vae)
        images, tokens = engine.generate(labels_t, params)
    else:
        out = sample_reference(var, int(labels_t.shape[0]), labels_t, params)
        images, tokens = out.images, out.tokens
    return (images, tokens) if return_tokens else images
