"""Shared model code: ``family`` (the interface every sampler drives, :class:`NextScaleModel`) and ``layers`` (layers
more than one family builds from). Each family's models live in its folder (:mod:`ssg_engine.families`); the names
below (upstream-compatible VQ-VAE tokenizer and VAR transformer) and the submodules ``var``, ``vqvae``, ``infinity``,
``bsq_vae``, ``text_encoder`` are kept here for compatibility, imported on first use (so that importing the shared
``ssg_engine.models.family`` imports no family)."""
from __future__ import annotations

import importlib
from typing import Any, List

# public name -> the module that defines it
_EXPORTS = {
    "VARTransformer": "ssg_engine.families.var.model",
    "VQVAE": "ssg_engine.families.var.tokenizer",
    "VectorQuantizer2": "ssg_engine.families.var.tokenizer",
}

__all__ = ["VARTransformer", "VQVAE", "VectorQuantizer2"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
