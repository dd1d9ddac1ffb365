"""HART's entry in the family registry (:mod:`ssg_engine.families`). Importing it imports no model code (nor torch):
each function imports what it needs when it runs. The Engine runs HART through its request
(:class:`ssg_engine.families.hart.request.HARTRequest`, bound by ``_engine_bind``)."""
from __future__ import annotations

from typing import Any, Tuple

from .. import FamilySpec


def _owns(model: Any) -> bool:
    from .model import HARTTransformer

    return isinstance(model, HARTTransformer)


def _owns_tokenizer(vae: Any) -> bool:
    from .tokenizer import HARTTokenizer

    return isinstance(vae, HARTTokenizer)


def _check_pair(model: Any, vae: Any, where: str) -> None:
    if not _owns_tokenizer(vae):
        raise TypeError(f"{where}: a HART model takes its HARTTokenizer (se.load_hart returns (model, tokenizer)); got {type(vae).__name__}")
    if model.tokenizer_proxy and model.tokenizer is not vae:
        raise TypeError(f"{where}: this HARTTokenizer is not the one attached to the model; pass the pair se.load_hart returned")


def _placement(model: Any) -> Tuple[Any, Any]:
    """The model's device, and float16 autocast on CUDA as upstream samples (else float32, the reference sampler's)."""
    import torch

    from .config import ENGINE_CUDA_DTYPE

    device = next(model.parameters()).device
    return device, getattr(torch, ENGINE_CUDA_DTYPE) if device.type == "cuda" else torch.float32


def _resolve_params(params: Any, overrides: Any, model: Any) -> Any:
    from .sampler import resolve_hart_params

    return resolve_hart_params(params, overrides, model)


def _engine_prepare(model: Any, vae: Any, device: Any, dtype: Any, vae_dtype: Any) -> Tuple[Any, Any]:
    """The pair an Engine samples with under autocast: ``model.inference_copy(dtype, device)`` (the model given is left
    as it is) and the tokenizer on ``device``; ``vae_dtype`` is VAR's alone (one ``ValueError``)."""
    if vae_dtype is not None:
        raise ValueError("vae_dtype applies to VAR's VQ-VAE; leave it None for HART (its VAE runs under autocast to dtype)")
    return model.inference_copy(dtype, device), vae.to(device=device).eval()


def _generate_reference(model: Any, vae: Any, cond: Any, params: Any, **keywords: Any) -> Tuple[Any, Any]:
    from .sampler import generate_reference

    return generate_reference(model, vae, cond, params, **keywords)


def _engine_bind(model: Any, vae: Any, cond: Any, params: Any, home: Any, static: bool, *, upstream_compat: bool = False,
                 residual: bool = True, **fields: Any) -> Tuple[Any, Any, Any]:
    """(HARTRequest, text features on ``home`` (static shapes already), params) for the Engine; ``upstream_compat=True``
    is the reference sampler's alone (one ``ValueError``)."""
    from .request import hart_request
    from .sampler import hart_features

    if upstream_compat:
        raise ValueError("upstream_compat: the Engine draws from its seed tensor; use upstream_compat=False, or the "
                         "reference sampler (ssg_engine.families.hart.sampler.sample_hart_reference)")
    request, params = hart_request(model, params, residual=residual, **fields)
    features = hart_features(cond)
    return request, type(features)(*(t.to(home) for t in features.tensors())), params


def _engine_serves(params: Any, overrides: Any) -> bool:
    """The Engine draws from its seed tensor: ``upstream_compat`` requests (upstream's generators) are the reference
    sampler's; every other one (``more_smooth`` too) the Engine's."""
    return not overrides.get("upstream_compat", False)


def _rows(model: Any, cond: Any) -> int:
    from .sampler import hart_features

    return hart_features(cond).batch


SPEC = FamilySpec(
    name="hart",
    title="HART",
    kind="text-conditional (HART)",
    takes="HART text features (HARTTextFeatures or (context, mask[, position_ids])), HARTParams and more_smooth=, num_maskgit_iters=, upstream_compat=, residual=",
    checkpoints={"hart": ("diffloss.net.input_proj.weight", "HART transformer"),
                 "hart_tokenizer": ("vae.quantize.embedding.weight", "HART tokenizer")},
    loader="ssg_engine.families.hart.loading:load_hart",
    owns=_owns,
    check_pair=_check_pair,
    placement=_placement,
    generate_reference=_generate_reference,
    rows=_rows,
    engine_prepare=_engine_prepare,
    engine_autocast=True,
    keywords=("more_smooth", "num_maskgit_iters", "upstream_compat", "residual"),
    text_conditional=True,
    owns_tokenizer=_owns_tokenizer,
    resolve_params=_resolve_params,
    engine_bind=_engine_bind,
    engine_request=True,
    engine_serves=_engine_serves,
    engine_dtypes=("float32", "float16", "bfloat16"),
)
