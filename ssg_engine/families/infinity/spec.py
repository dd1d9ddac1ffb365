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


def _generate_reference(model: Any, vae: Any, cond: Any, params: Any, **keywords: Any) -> Tuple[Any, Any]:
    from .sampler import generate_reference

    return generate_reference(model, vae, cond, params, **keywords)


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
    engine_prepare=_engine_prepare,
    engine_autocast=True,
    keywords=("h_div_w", "pn", "schedule", "negative", "cfg_insertion_layer", "cfg_list", "tau_list"),
    text_conditional=True,
)
