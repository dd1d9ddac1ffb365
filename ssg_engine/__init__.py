"""ssg-engine: fast sampling of multi-scale visual autoregressive (VAR) models, with Scaled Spatial Guidance.

The public names below are imported on first use (module ``__getattr__``), so ``import ssg_engine`` (and the
``ssg-engine`` command starting up) does not import torch until something needs it.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Dict, List

__version__ = "0.1.0"

# public name -> the module (relative to this package) that defines it
_EXPORTS: Dict[str, str] = {
    "ModelConfig": ".families.var.config",
    "AssumedSettingWarning": ".validation",
    **dict.fromkeys(["SSG", "dse", "dse_operator", "prior", "ssg_logits"], ".guidance"),
    "VQVAE": ".families.var.tokenizer",
    "VARTransformer": ".families.var.model",
    **dict.fromkeys(["SamplingParams", "HARTParams"], ".params"),
    "NonFiniteLogitsError": ".pipeline",
    **dict.fromkeys(["VAR", "SampleOutput", "sample_reference"], ".families.var.sampler"),
    **dict.fromkeys(["InfinityRequest", "InfinityTransformer", "PaddedText", "TextFeatures", "scale_schedule"], ".families.infinity.model"),
    **dict.fromkeys(["InfinitySampleOutput", "sample_infinity_reference"], ".families.infinity.sampler"),
    "Engine": ".engine",
    "generate": ".api",
    **dict.fromkeys(["CheckpointError", "build_models", "checkpoint_family", "load_hart", "load_infinity", "load_models", "random_models"], ".loading"),
    **dict.fromkeys(["HARTTextFeatures", "Qwen2TextEncoder"], ".families.hart.text"),
    "sample_hart_reference": ".families.hart.sampler",
    "plan": ".plan",
    "to_uint8": ".imaging",
    **dict.fromkeys(["Pipeline", "PipelineOutput"], ".pretrained_pipeline"),
    "SSGEngineDiffusionPipeline": ".diffusers_pipeline",
}

__all__ = [
    "ModelConfig", "AssumedSettingWarning", "SSG", "dse", "dse_operator", "prior", "ssg_logits", "CheckpointError", "build_models",
    "load_models", "load_infinity", "checkpoint_family", "random_models", "VAR", "VARTransformer", "VQVAE", "SamplingParams", "NonFiniteLogitsError",
    "SampleOutput", "generate", "sample_reference", "Engine", "plan", "InfinityTransformer", "InfinityRequest",
    "TextFeatures", "PaddedText", "scale_schedule", "InfinitySampleOutput", "sample_infinity_reference", "to_uint8",
    "load_hart", "HARTParams", "HARTTextFeatures", "Qwen2TextEncoder", "sample_hart_reference", "Pipeline", "PipelineOutput",
    "SSGEngineDiffusionPipeline",
]


def __getattr__(name: str) -> Any:
    """A public name (imported from its module on first use), or a submodule such as ``ssg_engine.loading``."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # imported once
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
