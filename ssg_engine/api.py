"""The functional API: ``generate`` picks the sampler for the model's device (the Engine on CUDA, the
reference loop elsewhere) and reuses engines through an explicit, bounded cache. One signature for both model
families: class labels for VAR, text features (or prompts with ``text_encoder=``) for Infinity."""
from __future__ import annotations

import collections
from typing import Any, List, Optional, Tuple, Union

import torch

from .engine import Engine, check_family
from .infinity_sampler import family_keywords, infinity_request, sample_infinity_reference
from .models.infinity import InfinityTransformer
from .params import SamplingParams
from .sampler import resolve_params, sample_reference
from .text import check_prompts
from .validation import class_labels


def _placement(model: torch.nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Where an engine for ``model`` runs: its device, and the dtype (VAR: its weights'; Infinity: bfloat16
    autocast on CUDA as upstream, else float32)."""
    device = next(model.parameters()).device
    if isinstance(model, InfinityTransformer):
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, model.head.weight.dtype


class EngineCache:
    """Engines kept for reuse by :func:`generate`, keyed by (model, vae, device, dtype); at most ``max_engines``, least
    recently used dropped. An engine holds its models, so they stay alive until dropped or ``clear()``-ed.
    ``ssg_engine.api.ENGINE_CACHE`` is the one ``generate`` uses."""

    def __init__(self, max_engines: int = 2) -> None:
        self.max_engines = max_engines
        self._engines: "collections.OrderedDict[tuple, Engine]" = collections.OrderedDict()

    def get(self, model: torch.nn.Module, vae: torch.nn.Module, max_batch: int = 64) -> Engine:
        """The engine for ``model``/``vae`` (VAR + VQVAE or Infinity + BSQVAE) on their device (built on first use)."""
        device, dtype = _placement(model)
        key = (id(model), id(vae), str(device), dtype)
        engine = self._engines.pop(key, None)
        if engine is None or engine.source_model is not model or engine.vae is not vae:
            engine = Engine(model, vae, max_batch=max_batch, device=device, dtype=dtype)
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
    model: torch.nn.Module,
    vae: torch.nn.Module,
    cond: Any,
    params: Optional[SamplingParams] = None,
    *,
    return_tokens: bool = False,
    engine: Optional[Engine] = None,
    text_encoder: Any = None,
    **overrides: Any,
) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
    """Sample one image per label (VAR + VQVAE) or prompt (Infinity + BSQVAE): images (B, 3, H, W) in [0, 1], and
    the tokens per scale if ``return_tokens`` (VAR: (B, pn^2); Infinity: bits (B, h*w, d), uint8 from the Engine, int64 from the reference sampler).

    ``cond``: class labels for VAR; for Infinity text features (anything ``TextFeatures.coerce`` takes, e.g.
    ``(features (B, T, Ct5), mask (B, T))``), or prompts (a list of str) with ``text_encoder`` (anything with
    ``encode(prompts) -> TextFeatures``). ``params`` (default ``SamplingParams()``) with keyword ``overrides``
    (``cfg=``, ``top_k=``, ``top_p=``, ``temperature=``, ``seed=``, ``ssg=``; Infinity also ``h_div_w=``, ``pn=``,
    ``schedule=``, ``negative=``, ``cfg_insertion_layer=``, ``cfg_list=``, ``tau_list=``: see
    :func:`ssg_engine.infinity_sampler.infinity_request`). On CUDA this runs an ``Engine`` (``engine``, else one
    from ``ENGINE_CACHE``; Philox draws from ``seed``), elsewhere the reference sampler (a ``torch.Generator``
    seeded with ``seed``): the same distributions, not the same random numbers.
    """
    check_family(model, vae, "generate(var, vae, labels)")
    infinity = isinstance(model, InfinityTransformer)
    negative = overrides.get("negative")
    negative_prompts = isinstance(negative, str) or (isinstance(negative, (list, tuple)) and any(isinstance(n, str) for n in negative))
    if text_encoder is not None:
        if not infinity:
            raise TypeError("text_encoder= is for text-conditional (Infinity) models; a VAR takes class labels")
        if not callable(getattr(text_encoder, "encode", None)):
            raise TypeError(f"text_encoder must have encode(prompts) -> TextFeatures (e.g. ssg_engine.text.T5TextEncoder); got {type(text_encoder).__name__}")
        cond = text_encoder.encode(check_prompts([cond] if isinstance(cond, str) else cond, "cond"))
        if negative_prompts:  # one negative prompt for every image, or one per image
            overrides["negative"] = text_encoder.encode(check_prompts([negative] * cond.batch if isinstance(negative, str) else negative, "negative"))
    elif infinity and (isinstance(cond, str) or (isinstance(cond, (list, tuple)) and any(isinstance(c, str) for c in cond))):
        raise TypeError("cond: prompts (str) need text_encoder= (e.g. ssg_engine.text), and a list of prompts holds only str; "
                        "or pass text features")
    elif negative_prompts:
        raise TypeError("negative: prompts (str) need text_encoder= (e.g. ssg_engine.text); or pass text features")
    device = next(model.parameters()).device
    if engine is not None or device.type == "cuda":
        images, tokens = (engine or ENGINE_CACHE.get(model, vae)).generate(cond, params, **overrides)
    elif infinity:
        family = family_keywords(overrides, text_conditional=True)
        params = resolve_params(params, overrides, model)
        request = infinity_request(model, vae, params, **family)
        out = sample_infinity_reference(
            model, vae, cond, request.schedule, cfg_list=request.cfg_list, tau_list=request.tau_list,
            top_k=params.top_k, top_p=params.top_p, seed=params.seed, cfg_insertion_layer=request.cfg_insertion_layer,
            negative=request.negative, ssg=params.ssg,
        )
        images, tokens = out.images, out.bits
    else:
        family_keywords(overrides, text_conditional=False)
        params = resolve_params(params, overrides, model)
        labels_t = class_labels(cond, model.num_classes, device)
        if not model.vae_proxy or model.vae_proxy[0] is not vae:
            model.attach_vae(vae)
        out = sample_reference(model, int(labels_t.shape[0]), labels_t, params)
        images, tokens = out.images, out.tokens
    return (images, tokens) if return_tokens else images
