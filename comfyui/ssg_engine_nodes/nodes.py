"""The node classes (ComfyUI's custom-node protocol: ``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION``, ``CATEGORY``).

Every node calls :class:`ssg_engine.Pipeline`; the number ranges are the ``ssg-engine`` command line's bounds
(``ssg_engine.cli.common``), so a value the widget allows is one the sampler takes. A bad input is one
``ValueError`` / ``TypeError`` naming the input, which ComfyUI shows as the node's error."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from ssg_engine.cli.common import CFG_MAX, INT32_MAX, INT64_MAX, SSG_BETA_MAX, TEMPERATURE_MAX, TEMPERATURE_MIN
from ssg_engine.guidance import PRIORS, SSG
from ssg_engine.pretrained_pipeline import Pipeline

CATEGORY = "ssg-engine"
PIPELINE = "SSG_PIPELINE"  # the loader's output type, the samplers' input
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SETTINGS = ("model card", "custom")  # "model card": guidance/top-k/top-p/temperature are the card's, the widgets unused
MAX_IMAGES = 256  # images per prompt, and per batch


class SSGEngineLoader:
    """A pipeline from a shipped model's name, a folder written by ``save_pretrained``, or a released layout."""

    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (PIPELINE,)
    RETURN_NAMES = ("pipeline",)

    @classmethod
    def INPUT_TYPES(cls) -> Dict[str, Dict[str, tuple]]:
        return {
            "required": {
                "model": ("STRING", {"default": "fashion-mnist", "multiline": False,
                                     "tooltip": "fashion-mnist | fashion-mnist-t2i | fashion-mnist-hart | a saved folder | a released layout folder"}),
                "device": (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"],),
                "dtype": (list(DTYPES),),
            },
            "optional": {
                "text_encoder": ("STRING", {"default": "", "tooltip": "Infinity: Flan-T5 folder; HART: Qwen2 folder (empty: none)"}),
            },
        }

    def load(self, model: str, device: str, dtype: str, text_encoder: str = "") -> Tuple[Pipeline]:
        if not model.strip():
            raise ValueError("model is empty; give fashion-mnist, fashion-mnist-t2i, fashion-mnist-hart or a model folder")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        return (Pipeline.from_pretrained(model.strip(), device=device, torch_dtype=DTYPES[dtype],
                                         text_encoder=text_encoder.strip() or None),)


def sampling_inputs() -> Dict[str, Dict[str, tuple]]:
    """The sampler nodes' inputs (shared by ``SSGEngineSampler`` and ``SSGEngineCompare``)."""
    return {
        "required": {
            "pipeline": (PIPELINE,),
            "prompt": ("STRING", {"default": "sneaker", "multiline": True,
                                  "tooltip": "one prompt per line; a class-conditional model: class names or indices, one per line"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": INT64_MAX}),
            "images_per_prompt": ("INT", {"default": 1, "min": 1, "max": MAX_IMAGES}),
            "settings": (list(SETTINGS), {"tooltip": "model card: the model's own guidance/top-k/top-p/temperature"}),
            "guidance_scale": ("FLOAT", {"default": 2.0, "min": -CFG_MAX, "max": CFG_MAX, "step": 0.1}),
            "top_k": ("INT", {"default": 0, "min": 0, "max": INT32_MAX, "tooltip": "0: off"}),
            "top_p": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "0: off"}),
            "temperature": ("FLOAT", {"default": 1.0, "min": TEMPERATURE_MIN, "max": TEMPERATURE_MAX, "step": 0.05}),
            "ssg_beta": ("FLOAT", {"default": 0.0, "min": -SSG_BETA_MAX, "max": SSG_BETA_MAX, "step": 0.05,
                                   "tooltip": "SSG strength (0: SSG off; Compare: 0 takes the model card's beta)"}),
            "ssg_prior": (list(PRIORS),),
            "batch_size": ("INT", {"default": 16, "min": 1, "max": MAX_IMAGES, "tooltip": "images per sampler call"}),
        },
        "optional": {
            "negative_prompt": ("STRING", {"default": "", "multiline": False, "tooltip": "Infinity only (empty: none)"}),
        },
    }


def _lines(prompt: str) -> List[str]:
    lines = [line.strip() for line in prompt.splitlines() if line.strip()]
    if not lines:
        raise ValueError("prompt is empty; give one prompt (or class) per line")
    return lines


def request(pipeline: Any, prompt: str, seed: int, images_per_prompt: int, settings: str, guidance_scale: float,
            top_k: int, top_p: float, temperature: float, batch_size: int, negative_prompt: str) -> Dict[str, Any]:
    """The keywords of ``Pipeline.__call__`` for the sampler nodes' inputs (SSG left to the caller)."""
    if not isinstance(pipeline, Pipeline):
        raise TypeError(f"pipeline must come from the SSG-Engine Loader node; got {type(pipeline).__name__}")
    if settings not in SETTINGS:
        raise ValueError(f"settings must be one of {', '.join(SETTINGS)}; got {settings!r}")
    lines = _lines(prompt)
    if pipeline.family == "var":
        cond = {"class_labels": [int(x) if re.fullmatch(r"\d+", x) else x for x in lines]}
    else:
        cond = {"prompt": lines}
    custom = settings == "custom"
    return {
        **cond, "seed": seed, "num_images_per_prompt": images_per_prompt, "batch_size": batch_size,
        "guidance_scale": guidance_scale if custom else None, "top_k": top_k if custom else None,
        "top_p": top_p if custom else None, "temperature": temperature if custom else None,
        "negative_prompt": negative_prompt.strip() or None,
    }


class SSGEngineSampler:
    """Images (ComfyUI IMAGE: (B, H, W, 3) float32 in [0, 1]) for prompts or classes, with SSG when ``ssg_beta`` != 0."""

    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)

    @classmethod
    def INPUT_TYPES(cls) -> Dict[str, Dict[str, tuple]]:
        return sampling_inputs()

    def sample(self, pipeline: Any, prompt: str, seed: int, images_per_prompt: int, settings: str, guidance_scale: float,
               top_k: int, top_p: float, temperature: float, ssg_beta: float, ssg_prior: str, batch_size: int,
               negative_prompt: str = "") -> Tuple[torch.Tensor]:
        kwargs = request(pipeline, prompt, seed, images_per_prompt, settings, guidance_scale, top_k, top_p, temperature,
                         batch_size, negative_prompt)
        ssg: Optional[SSG] = SSG(beta=ssg_beta, prior=ssg_prior) if ssg_beta != 0 else None
        pipeline.set_progress_bar_config(disable=True)
        images = pipeline(**kwargs, ssg=ssg, output_type="pt").images
        return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().contiguous(),)


class SSGEngineCompare:
    """Baseline and SSG side by side (same seeds), labelled (headers, one row per prompt / class): one IMAGE."""

    CATEGORY = CATEGORY
    FUNCTION = "compare"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)

    @classmethod
    def INPUT_TYPES(cls) -> Dict[str, Dict[str, tuple]]:
        return sampling_inputs()

    def compare(self, pipeline: Any, prompt: str, seed: int, images_per_prompt: int, settings: str, guidance_scale: float,
                top_k: int, top_p: float, temperature: float, ssg_beta: float, ssg_prior: str, batch_size: int,
                negative_prompt: str = "") -> Tuple[torch.Tensor]:
        import numpy as np

        kwargs = request(pipeline, prompt, seed, images_per_prompt, settings, guidance_scale, top_k, top_p, temperature,
                         batch_size, negative_prompt)
        pipeline.set_progress_bar_config(disable=True)
        prompts = kwargs.pop("prompt", None)
        grid = pipeline.compare(prompts, ssg=SSG(beta=ssg_beta if ssg_beta != 0 else None, prior=ssg_prior), **kwargs)
        return (torch.from_numpy(np.asarray(grid.convert("RGB"), dtype=np.float32) / 255.0)[None],)


NODE_CLASS_MAPPINGS = {
    "SSGEngineLoader": SSGEngineLoader,
    "SSGEngineSampler": SSGEngineSampler,
    "SSGEngineCompare": SSGEngineCompare,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SSGEngineLoader": "SSG-Engine Loader",
    "SSGEngineSampler": "SSG-Engine Sampler",
    "SSGEngineCompare": "SSG-Engine Compare (baseline | SSG)",
}
