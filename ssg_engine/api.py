"""The functional API: ``generate`` picks the sampler for the model's device (the Engine on CUDA, the
reference loop elsewhere) and reuses engines through an explicit, bounded cache. One signature for both model
families: class labels for VAR, text features (or prompts with ``text_encoder=``) for Infinity."""
from __future__ import annotations

import collections
from typing import Any, List, Optional, Tuple, Union

import torch

from .engine import Engine, check_family
from .families import family_of, split_keywords
from .params import SamplingParams
from .pipeline import resolve_params
from .seeding import RowSeeds, row_seeds as keyed_rows
from .validation import check_prompts


class EngineCache:
    """Engines kept for reuse by :func:`generate`, keyed by (model, vae, device, dtype); at most ``max_engines``, least
    recently used dropped. An engine holds its models, so they stay alive until dropped or ``clear()``-ed.
    ``ssg_engine.api.ENGINE_CACHE`` is the one ``generate`` uses."""

    def __init__(self, max_engines: int = 2) -> None:
        self.max_engines = max_engines
        self._engines: "collections.OrderedDict[tuple, Engine]" = collections.OrderedDict()

    def get(self, model: torch.nn.Module, vae: torch.nn.Module, max_batch: int = 64) -> Engine:
        """The engine for ``model``/``vae`` (VAR + VQVAE or Infinity + BSQVAE) on their device (built on first use)."""
        device, dtype = family_of(model).placement(model)  # VAR: its weights' dtype; Infinity, HART: bfloat16, float16 autocast on CUDA
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
    seeding: str = "row",
    row_seeds: Optional[RowSeeds] = None,
    **overrides: Any,
) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
    """Sample one image per label (VAR + VQVAE) or prompt (Infinity + BSQVAE): images (B, 3, H, W) in [0, 1], and
    the tokens per scale if ``return_tokens`` (VAR: (B, pn^2); Infinity: bits (B, h*w, d), uint8 from the Engine, int64 from the reference sampler).

    ``cond``: class labels for VAR; for Infinity text features (anything ``TextFeatures.coerce`` takes, e.g.
    ``(features (B, T, Ct5), mask (B, T))``), or prompts (a list of str) with ``text_encoder`` (anything with
    ``encode(prompts) -> TextFeatures``). ``params`` (default ``SamplingParams()``) with keyword ``overrides``
    (``cfg=``, ``top_k=``, ``top_p=``, ``temperature=``, ``seed=``, ``ssg=``; Infinity also ``h_div_w=``, ``pn=``,
    ``schedule=``, ``negative=``, ``cfg_insertion_layer=``, ``cfg_list=``, ``tau_list=``: see
    :func:`ssg_engine.families.infinity.sampler.infinity_request`). On CUDA this runs an ``Engine`` (``engine``, else one
    from ``ENGINE_CACHE``; Philox draws from ``seed``), elsewhere the reference sampler (a ``torch.Generator``
    seeded with ``seed``): the same distributions, not the same random numbers.

    HART (``se.load_hart``'s (model, tokenizer)): ``cond`` HART text features (``HARTTextFeatures`` or ``(context,
    mask[, position_ids])``) or prompts with ``text_encoder`` (``Qwen2TextEncoder``); ``params`` a ``HARTParams``
    (default ``HARTParams()``; upstream's release settings: ``ssg_engine.params.HART_UPSTREAM``), overrides its
    fields (``more_smooth=``, ``num_maskgit_iters=`` too) and ``upstream_compat=``, ``residual=`` (see
    ``sample_hart_reference``). On CUDA (or with ``engine=``) HART runs the Engine (on CUDA under float16 autocast, as
    upstream samples; MaskGIT orders, the diffusion head's noise and ``more_smooth``'s Gumbel noise drawn from the seed
    tensor too), except for ``upstream_compat=True`` (upstream's generators: the reference sampler runs, on CUDA too;
    ``engine=`` with it is one ``ValueError``); ``return_tokens`` gives its codes per scale (B, pn^2) int64.

    Seeding (:mod:`ssg_engine.seeding`): ``seeding="row"`` (default) draws image b from its own stream keyed by
    ``(seed, b)`` (``row_seeds(seed, B)``, or the ``row_seeds`` given: one int64 per image), so an image does not depend
    on the batch it came with (nor on the Engine's ``max_batch`` chunks); with ``seed=None`` (or HART's
    ``upstream_compat=True``) there is nothing to key rows by and the draws are per batch. ``seeding="batch"``: the
    per-batch draws of one generator (reference) or one Philox key per chunk (Engine) from ``seed``, as before
    per-row seeding (what ``autoregressive_infer_cfg`` and the golden tests use).
    """
    if seeding not in ("row", "batch"):
        raise ValueError(f"seeding must be 'row' (one stream per image) or 'batch' (one per batch); got {seeding!r}")
    if row_seeds is not None and seeding != "row":
        raise ValueError("row_seeds: per-row seeds need seeding='row' (the default); drop row_seeds for per-batch draws")
    spec = check_family(model, vae, "generate(var, vae, labels)")
    negative = overrides.get("negative")
    negative_prompts = isinstance(negative, str) or (isinstance(negative, (list, tuple)) and any(isinstance(n, str) for n in negative))
    if text_encoder is not None:
        if not spec.text_conditional:
            raise TypeError(f"text_encoder= is for text-conditional (Infinity) models; a {spec.title} takes class labels")
        if not callable(getattr(text_encoder, "encode", None)):
            raise TypeError(f"text_encoder must have encode(prompts) -> TextFeatures (e.g. ssg_engine.text.T5TextEncoder); got {type(text_encoder).__name__}")
        cond = text_encoder.encode(check_prompts([cond] if isinstance(cond, str) else cond, "cond"))
        if negative_prompts:  # one negative prompt for every image, or one per image
            overrides["negative"] = text_encoder.encode(check_prompts([negative] * cond.batch if isinstance(negative, str) else negative, "negative"))
    elif spec.text_conditional and (isinstance(cond, str) or (isinstance(cond, (list, tuple)) and any(isinstance(c, str) for c in cond))):
        raise TypeError("cond: prompts (str) need text_encoder= (e.g. ssg_engine.text), and a list of prompts holds only str; "
                        "or pass text features")
    elif negative_prompts:
        raise TypeError("negative: prompts (str) need text_encoder= (e.g. ssg_engine.text); or pass text features")
    device = next(model.parameters()).device
    if engine is not None and not spec.engine:
        raise TypeError(f"engine: there is no {spec.title} Engine yet; leave engine=None (the reference sampler runs)")
    serves = spec.engine_serves is None or spec.engine_serves(params, overrides)  # e.g. not HART's upstream_compat
    resolve = spec.resolve_params or resolve_params
    if seeding == "row" and row_seeds is None and not overrides.get("upstream_compat", False):
        fields = dict(overrides)
        split_keywords(fields, spec)
        seed = resolve(params, fields, model).seed  # (a bad override: its one-line message, before any compute)
        row_seeds = None if seed is None else keyed_rows(seed, spec.rows(model, cond))
    if engine is not None or (device.type == "cuda" and spec.engine and serves):
        images, tokens = (engine or ENGINE_CACHE.get(model, vae)).generate(cond, params, row_seeds=row_seeds, **overrides)
    else:  # the family's reference sampler
        keywords = split_keywords(overrides, spec)
        images, tokens = spec.generate_reference(model, vae, cond, resolve(params, overrides, model), row_seeds=row_seeds, **keywords)
    return (images, tokens) if return_tokens else images
