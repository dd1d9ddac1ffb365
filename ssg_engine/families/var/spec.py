"""VAR's entry in the family registry (:mod:`ssg_engine.families`). Importing it imports no model code (nor torch):
each function imports what it needs when it runs."""
from __future__ import annotations

from typing import Any, Tuple

from .. import FamilySpec


def _owns(model: Any) -> bool:
    from .model import VARTransformer

    return isinstance(model, VARTransformer)


def _check_pair(model: Any, vae: Any, where: str) -> None:
    from .sampler import check_models

    check_models(model, vae, where)


def _placement(model: Any) -> Tuple[Any, Any]:
    """The model's device, and its weights' dtype (an Engine casts VAR to it)."""
    return next(model.parameters()).device, model.head.weight.dtype


def _engine_prepare(model: Any, vae: Any, device: Any, dtype: Any, vae_dtype: Any) -> Tuple[Any, Any]:
    """The pair an Engine samples with: the model cast to ``dtype`` (in place), the VQ-VAE float32 with its
    ``post_quant_conv`` and decoder in ``vae_dtype`` (None: ``dtype``) channels-last (the quantizer keeps the latent in
    float32), attached to the model."""
    import torch

    vae_dtype = dtype if vae_dtype is None else vae_dtype
    model = model.to(device=device, dtype=dtype).eval()
    vae = vae.to(device=device, dtype=torch.float32).eval()
    for part in (vae.post_quant_conv, vae.decoder):
        part.to(dtype=vae_dtype, memory_format=torch.channels_last)
    model.attach_vae(vae)
    return model, vae


def _engine_bind(model: Any, vae: Any, cond: Any, params: Any, home: Any, static: bool, **keywords: Any) -> Tuple[Any, Any, Any]:
    """(the model itself, class labels (n,) int64 on ``home``, params): VAR takes no request keywords (another
    family's is one ``TypeError``)."""
    from ...validation import class_labels
    from .. import split_keywords

    split_keywords(dict(keywords), SPEC)
    return model, class_labels(cond, model.num_classes, home), params


def _generate_reference(model: Any, vae: Any, cond: Any, params: Any, **keywords: Any) -> Tuple[Any, Any]:
    from .sampler import generate_reference

    return generate_reference(model, vae, cond, params, **keywords)


def _rows(model: Any, cond: Any) -> int:
    from ...validation import class_labels

    return int(class_labels(cond, model.num_classes, "cpu").shape[0])


SPEC = FamilySpec(
    name="var",
    title="VAR",
    kind="class-conditional VAR",
    takes="labels and SamplingParams",
    checkpoints={"var": ("pos_1LC", "VAR"), "vqvae": ("quantize.embedding.weight", "VQ-VAE")},
    loader="ssg_engine.families.var.loading:load_models",
    owns=_owns,
    check_pair=_check_pair,
    placement=_placement,
    generate_reference=_generate_reference,
    rows=_rows,
    engine_bind=_engine_bind,
    engine_prepare=_engine_prepare,
)
