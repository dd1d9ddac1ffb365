"""Infinity's entry in the family registry (:mod:`ssg_engine.families`). Importing it imports no model code (nor
torch): each function imports what it needs when it runs."""
from __future__ import annotations

from typing import Any, Tuple

from .. import FamilySpec


def _owns(model: Any) -> bool:
    from .model import InfinityTransformer

    return isinstance(model, InfinityTransformer)


def _check_pair(model: Any, vae: Any, where: str) -> None:
    from .tokenizer import BSQVAE

    if not isinstance(vae, BSQVAE):
        raise TypeError(f"{where}: an InfinityTransformer takes its BSQVAE (ssg_engine.models.bsq_vae.load_bsq_vae); got {type(vae).__name__}")


def _placement(model: Any) -> Tuple[Any, Any]:
    """The model's device, and bfloat16 autocast on CUDA as upstream (else float32)."""
    import torch

    device = next(model.parameters()).device
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def _engine_prepare(model: Any, vae: Any, device: Any, dtype: Any, vae_dtype: Any) -> Tuple[Any, Any]:
    """The pair an Engine samples with under autocast: ``model.inference_copy(dtype, device)`` (the model given is left
    as it is) and the tokenizer on ``device``; ``vae_dtype`` is VAR's alone (one ``ValueError``)."""
    if vae_dtype is not None:
        raise ValueError("vae_dtype applies to VAR's VQ-VAE; leave it None for Infinity (its VAE runs under autocast to dtype)")
    return model.inference_copy(dtype, device), vae.to(device=device).eval()


def _engine_bind(model: Any, vae: Any, cond: Any, params: Any, home: Any, static: bool, **keywords: Any) -> Tuple[Any, Any, Any]:
    """(InfinityRequest, text on ``home`` (packed; ``static``: padded to ``text_maxlen``, for CUDA graphs), the params
    the sampler applies: temperature 1, as ``params.temperature`` becomes ``tau_list``, applied before CFG);
    ``keywords``: the Infinity keywords (see :func:`ssg_engine.families.infinity.sampler.infinity_request`)."""
    from .model import PaddedText, TextFeatures
    from .sampler import infinity_request

    maxlen = model.config.text_maxlen

    def at_home(text: Any) -> Any:
        packed = TextFeatures.coerce(text)
        if max(packed.lens) > maxlen:
            raise ValueError(f"text: a prompt has {max(packed.lens)} tokens; this model takes at most text_maxlen={maxlen}")
        packed = TextFeatures(packed.kv_compact.to(home), packed.lens)
        return PaddedText.pad(packed, maxlen) if static else packed

    if keywords.get("negative") is not None:
        keywords["negative"] = at_home(keywords["negative"])
    request = infinity_request(model, vae, params, **keywords)
    text = at_home(cond)
    if request.negative is not None and request.negative.batch != text.batch:
        raise ValueError(f"negative has {request.negative.batch} prompts; give one per prompt ({text.batch})")
    return request, text, params.replace(temperature=1.0)


def _engine_scales(model: Any) -> int:
    """The most scales a request runs (the schedules' longest)."""
    from .model import MAX_SCALES

    return MAX_SCALES


def _engine_check_memory(request: Any, vae: Any, dtype: Any, b: int, cached: Tuple[int, int], device_memory: int,
                         max_batch: int) -> None:
    """``ValueError``, before anything is allocated, when the memory plan of a bucket of ``b`` images at the request's
    schedule, with the KV cache grown from its ``cached`` (rows, tokens), does not fit ``device_memory`` bytes; it
    names the largest ``max_batch`` that fits."""
    import dataclasses

    from ...memory import CONTEXT_BYTES, GiB, infinity_plan, itemsize, largest_batch

    layers, heads, length, head_dim = request.cache_layout()
    rows, length = max(2 * b, cached[0]), max(length, cached[1])
    config = request.model.config

    def plan_of(n: int) -> Any:
        return infinity_plan(config, request.schedule, dtype, n, vae=vae.config)

    needed = dataclasses.replace(plan_of(b), kv_cache=2 * layers * rows * heads * length * head_dim * itemsize(dtype))
    if needed.fits(device_memory):
        return
    fit = largest_batch(plan_of, device_memory, limit=max_batch)
    h, w = request.schedule[-1]
    advice = f"use max_batch={fit} or less" if fit else "not even one image fits: use a smaller pn or h_div_w schedule"
    raise ValueError(
        f"max_batch={max_batch}: a batch of {b} images at a {len(request.schedule)}-scale schedule ending at {h}x{w} needs "
        f"{needed.total / GiB:.1f} GiB (+{CONTEXT_BYTES / GiB:.0f} GiB CUDA context), the device has {device_memory / GiB:.1f} GiB; "
        f"{advice} (see ssg_engine.plan / ssg-engine plan)"
    )


def _generate_reference(model: Any, vae: Any, cond: Any, params: Any, **keywords: Any) -> Tuple[Any, Any]:
    from .sampler import generate_reference

    return generate_reference(model, vae, cond, params, **keywords)


def _rows(model: Any, cond: Any) -> int:
    from .model import PaddedText, TextFeatures

    return (cond if isinstance(cond, PaddedText) else TextFeatures.coerce(cond)).batch


SPEC = FamilySpec(
    name="infinity",
    title="Infinity",
    kind="text-conditional (Infinity)",
    takes="text features, SamplingParams and h_div_w=, pn=, schedule=, negative=, cfg_insertion_layer=, cfg_list=, tau_list=",
    checkpoints={"infinity": ("cfg_uncond", "Infinity"), "bsq_vae": ("encoder.conv_in.conv.weight", "BSQ VAE")},
    loader="ssg_engine.families.infinity.loading:load_infinity",
    owns=_owns,
    check_pair=_check_pair,
    placement=_placement,
    generate_reference=_generate_reference,
    rows=_rows,
    engine_bind=_engine_bind,
    engine_request=True,
    engine_prepare=_engine_prepare,
    engine_autocast=True,
    engine_scales=_engine_scales,
    engine_check_memory=_engine_check_memory,
    keywords=("h_div_w", "pn", "schedule", "negative", "cfg_insertion_layer", "cfg_list", "tau_list"),
    text_conditional=True,
)
