"""``SSGEngineDiffusionPipeline``: :class:`ssg_engine.Pipeline` as a ``diffusers.DiffusionPipeline`` subclass, for code
written against diffusers (``pip install 'ssg-engine[diffusers]'``). Everything is the wrapped ``Pipeline``'s: loading
(``from_pretrained``: a shipped name, a saved folder, a released layout), saving, the call and its arguments; this
class adds diffusers' container (registered components, ``.to()``, ``.device``, ``.components``, the progress-bar
configuration) and returns diffusers' ``ImagePipelineOutput``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import torch

try:
    from diffusers import DiffusionPipeline, ImagePipelineOutput
except ImportError as e:  # the optional dependency, named with its fix
    raise ImportError(f"ssg_engine.diffusers_pipeline needs diffusers ({e}); pip install 'ssg-engine[diffusers]'") from None

from .pretrained_pipeline import Pipeline


class SSGEngineDiffusionPipeline(DiffusionPipeline):
    """A next-scale model (VAR, Infinity, HART) with SSG behind diffusers' ``DiffusionPipeline`` interface.

    Components: ``transformer`` (VAR / Infinity / HART transformer), ``vae`` (VQ-VAE, BSQ VAE or HART tokenizer) and
    ``text_encoder`` (None for VAR). ``pipe(...)`` takes :meth:`ssg_engine.Pipeline.__call__`'s arguments (diffusers'
    names: ``prompt``, ``guidance_scale``, ``num_images_per_prompt``, ``generator``, ``output_type``, ... plus
    ``class_labels``, ``ssg_scale``, ``batch_size``) and gives the same images; the wrapped pipeline is
    ``self.ssg_pipeline`` (its model card's settings, class names and ``compare``)."""

    _optional_components = ["text_encoder"]

    def __init__(self, transformer: Any, vae: Any, text_encoder: Any = None) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder)
        self.ssg_pipeline = Pipeline(transformer, vae, text_encoder)

    @classmethod
    def from_ssg_pipeline(cls, pipeline: Pipeline) -> "SSGEngineDiffusionPipeline":
        """This class around an :class:`ssg_engine.Pipeline` (sharing its models and keeping its card's settings)."""
        out = cls(pipeline.model, pipeline.vae, pipeline.text_encoder)
        out.ssg_pipeline = pipeline
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any) -> "SSGEngineDiffusionPipeline":
        """:meth:`ssg_engine.Pipeline.from_pretrained` (same path forms and keywords: ``device``, ``torch_dtype``,
        ``text_encoder``, ``config``), wrapped."""
        return cls.from_ssg_pipeline(Pipeline.from_pretrained(pretrained_model_name_or_path, **kwargs))

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs: Any) -> Path:
        """:meth:`ssg_engine.Pipeline.save_pretrained`; diffusers' hub keywords (``push_to_hub``, ...) are refused."""
        if kwargs:
            raise TypeError(f"save_pretrained: {', '.join(sorted(kwargs))} not supported (the folder is written locally only)")
        return self.ssg_pipeline.save_pretrained(save_directory)

    @property
    def device(self) -> torch.device:
        """The transformer's device (diffusers' own property reads ``.device`` of ModelMixin components, which ours are not)."""
        return next(self.ssg_pipeline.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's floating-point dtype."""
        return next(p.dtype for p in self.ssg_pipeline.model.parameters() if p.is_floating_point())

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """The bar's tqdm keywords (``disable=True``), for diffusers' bar and the wrapped pipeline's."""
        super().set_progress_bar_config(**kwargs)
        self.ssg_pipeline.set_progress_bar_config(**kwargs)

    def __call__(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        """``ssg_pipeline(*args, **kwargs)``'s images as ``ImagePipelineOutput`` (``return_dict=False``: ``(images,)``)."""
        images = self.ssg_pipeline(*args, **kwargs).images
        return ImagePipelineOutput(images=images) if return_dict else (images,)
