"""``Pipeline``: the diffusers-style way in: ``Pipeline.from_pretrained(path)`` for every family, ``pipe(...)`` with
diffusers' argument names, ``pipe.save_pretrained(folder)``. Sampling is :func:`ssg_engine.api.generate` (one
implementation): ``pipe(...)`` and ``generate(...)`` give the same images for the same settings and seed.

(Not to be confused with :mod:`ssg_engine.pipeline`, the per-scale sampling loop every sampler drives.)

A saved folder holds ``model_index.json`` (the manifest: family, files, configs, the model card's sampling settings
and SSG beta, class names) and safetensors weights: ``transformer.safetensors`` + ``vae.safetensors`` (VAR, Infinity;
Infinity's small word-level text encoder as ``text_encoder.safetensors``), or HART's released layout ``llm/`` +
``tokenizer/`` (each ``config.json`` + ``model.safetensors``), so ``load_hart`` reads it as upstream's.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from tqdm import tqdm

from . import __version__
from .api import generate
from .engine import check_family
from .guidance import SSG
from .params import HART_UPSTREAM, INFINITY_UPSTREAM, HARTParams, SamplingParams
from .seeding import row_seeds
from .validation import as_number, check_prompts, class_labels

if TYPE_CHECKING:
    from PIL import Image

MANIFEST = "model_index.json"
# The shipped models' names (``from_pretrained("fashion-mnist")``): the class-conditional VAR (assets/fashion_mnist)
# the text-to-image Infinity (assets/fashion_mnist_infinity) and the text-to-image HART (assets/fashion_mnist_hart).
SHIPPED = ("fashion-mnist", "fashion-mnist-t2i", "fashion-mnist-hart")
OUTPUT_TYPES = ("pil", "np", "pt")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# Each family's settings when a folder or checkpoint carries no model card: upstream's release settings.
UPSTREAM_SAMPLING = {"var": SamplingParams(), "infinity": INFINITY_UPSTREAM, "hart": HART_UPSTREAM}
Sampling = Union[SamplingParams, HARTParams]


@dataclasses.dataclass
class PipelineOutput:
    """What ``Pipeline.__call__`` returns, as diffusers' ``ImagePipelineOutput``: ``images`` is a list of B PIL RGB
    images (``output_type="pil"``), a float32 NumPy array (B, H, W, 3) in [0, 1] (``"np"``) or a float tensor
    (B, 3, H, W) in [0, 1] (``"pt"``), in the order of the prompts / labels, ``num_images_per_prompt`` each."""

    images: Any


def seed_from_generator(generator: torch.Generator) -> int:
    """The sampler's seed for a ``torch.Generator``: one int64 draw from it (the same generator state gives the same
    seed, hence the same images; the generator advances, as diffusers' pipelines advance theirs)."""
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, device=generator.device))


def repeat_rows(cond: Any, n: int) -> Any:
    """Each row of ``cond`` (labels (B,), a list of prompts, ``TextFeatures`` or ``HARTTextFeatures``) ``n`` times in a
    row: B -> B * n rows, row i * n + j being row i."""
    if n == 1:
        return cond
    if isinstance(cond, list):
        return [c for c in cond for _ in range(n)]
    if isinstance(cond, torch.Tensor):
        return cond.repeat_interleave(n)
    from .families.infinity.model import TextFeatures

    if isinstance(cond, TextFeatures):
        rows = [cond[i : i + 1] for i in range(cond.batch) for _ in range(n)]
        return TextFeatures(torch.cat([r.kv_compact for r in rows]), [k for r in rows for k in r.lens])
    return cond[torch.arange(cond.batch, device=cond.context.device).repeat_interleave(n)]  # HARTTextFeatures


class Pipeline:
    """A model of any family with its VAE / tokenizer, text encoder and model card's sampling settings.

    ``Pipeline(model, vae, text_encoder=None, sampling=None, class_names=None)`` wraps loaded models (VAR + VQVAE,
    Infinity + BSQVAE, HART + its tokenizer); ``sampling`` (default: the family's upstream release settings) is what
    every ``None`` argument of ``__call__`` takes; ``class_names`` lets ``class_labels`` be names (VAR).
    """

    def __init__(self, model: torch.nn.Module, vae: torch.nn.Module, text_encoder: Any = None,
                 sampling: Optional[Sampling] = None, class_names: Optional[Sequence[str]] = None) -> None:
        self.family = check_family(model, vae, "Pipeline(model, vae)").name
        if text_encoder is not None and self.family == "var":
            raise TypeError("text_encoder: a class-conditional VAR takes class labels; leave text_encoder=None")
        if text_encoder is not None and not callable(getattr(text_encoder, "encode", None)):
            raise TypeError(f"text_encoder must have encode(prompts) -> text features; got {type(text_encoder).__name__}")
        sampling = UPSTREAM_SAMPLING[self.family] if sampling is None else sampling
        want = HARTParams if self.family == "hart" else SamplingParams
        if not isinstance(sampling, want):
            raise TypeError(f"sampling must be a {want.__name__} for a {self.family} model; got {type(sampling).__name__}")
        self.model, self.vae, self.text_encoder, self.sampling = model, vae, text_encoder, sampling
        self.class_names = None if class_names is None else tuple(str(c) for c in class_names)
        self.progress_bar_config: Dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], *, device: Union[str, torch.device] = "cpu",
                        torch_dtype: Optional[torch.dtype] = None, text_encoder: Any = None, config: Any = None) -> "Pipeline":
        """Load a pipeline from ``path``, on ``device``, the transformer in ``torch_dtype`` (None: float32; HART:
        float32 only; the VAE / tokenizer stay float32):

        - a shipped model's name: ``"fashion-mnist"`` (VAR), ``"fashion-mnist-t2i"`` (Infinity) or
          ``"fashion-mnist-hart"`` (HART), with their cards;
        - a folder written by :meth:`save_pretrained` (``model_index.json``);
        - a released layout: a folder with a VAR ``.pth`` pair (``var_d16.pth`` + ``vae_ch160v4096z32.pth``), an
          Infinity transformer + BSQ VAE (``infinity_2b_reg.pth`` + ``infinity_vae_d32reg.pth``), or HART's ``llm/`` +
          ``tokenizer/``; ``config`` goes to the family's loader (``load_models`` / ``load_infinity`` / ``load_hart``).

        ``text_encoder``: a text encoder object or a local folder (Infinity: Flan-T5 or a ``train --family infinity``
        folder; HART: Qwen2); without one a text-to-image pipeline takes ``prompt_embeds=`` only. Anything else is one
        ``ValueError`` / ``FileNotFoundError`` saying what ``path`` may be."""
        device = _check_device(device)
        if torch_dtype is not None and torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype must be None or one of {', '.join(map(str, DTYPES))}; got {torch_dtype!r}")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a folder path or a shipped model's name ({', '.join(SHIPPED)}); got {type(path).__name__}")
        if isinstance(path, str) and path in SHIPPED:
            if config is not None or text_encoder is not None:
                raise ValueError(f"{path!r} is a shipped model with its own config and text encoder; leave config and text_encoder out")
            return cls._shipped(path, device, torch_dtype)
        folder = Path(path)
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise FileNotFoundError(
                f"from_pretrained: {str(path)!r} {what}; give a shipped model's name ({', '.join(SHIPPED)}), a folder written by "
                "save_pretrained, or a folder with a released checkpoint pair (VAR .pth pair, Infinity transformer + VAE, HART llm/ + tokenizer/)")
        if (folder / MANIFEST).is_file():
            if config is not None:
                raise ValueError(f"{folder} was written by save_pretrained and holds its config; leave config out")
            return cls._saved(folder, device, torch_dtype, text_encoder)
        if (folder / "llm").is_dir() and (folder / "tokenizer").is_dir():
            return cls._hart(folder, device, torch_dtype, text_encoder, config)
        return cls._released(folder, device, torch_dtype, text_encoder, config)

    @classmethod
    def _shipped(cls, name: str, device: torch.device, dtype: Optional[torch.dtype]) -> "Pipeline":
        from . import pretrained

        if name == "fashion-mnist":
            vae, var = pretrained.load_pretrained(device=device, dtype=dtype or torch.float32)
            return cls(var, vae, sampling=pretrained.SAMPLING, class_names=pretrained.class_names())
        if name == "fashion-mnist-hart":
            if dtype not in (None, torch.float32):
                raise ValueError(f"torch_dtype: HART runs in float32 (its reference sampler and Engine); got {dtype}")
            model, tokenizer, encoder = pretrained.load_pretrained_hart(device=device)
            return cls(model, tokenizer, encoder, sampling=pretrained.HART_SAMPLING)
        model, vae, encoder = pretrained.load_pretrained_infinity(device=device)
        return cls(model.to(dtype or torch.float32), vae, encoder, sampling=pretrained.INFINITY_SAMPLING)

    @classmethod
    def _hart(cls, folder: Path, device: torch.device, dtype: Optional[torch.dtype], text_encoder: Any, config: Any,
              sampling: Optional[HARTParams] = None) -> "Pipeline":
        from .families.hart.text import Qwen2TextEncoder
        from .loading import load_hart

        if dtype not in (None, torch.float32):
            raise ValueError(f"torch_dtype: HART runs in float32 (its reference sampler and Engine); got {dtype}")
        model, tokenizer = load_hart(folder / "llm", folder / "tokenizer", config=config, device=device)
        if isinstance(text_encoder, (str, os.PathLike)):
            text_encoder = Qwen2TextEncoder(text_encoder, device=device, max_length=model.context_token)
        return cls(model, tokenizer, text_encoder, sampling=sampling)

    @classmethod
    def _released(cls, folder: Path, device: torch.device, dtype: Optional[torch.dtype], text_encoder: Any, config: Any) -> "Pipeline":
        from .loading import checkpoint_family, load_infinity, load_models, read_state_dict

        kinds: Dict[str, List[Path]] = {}
        for file in sorted(folder.iterdir()):
            if file.is_file() and file.name.endswith(CHECKPOINT_SUFFIXES):
                kinds.setdefault(checkpoint_family(read_state_dict(file)) or "unknown", []).append(file)
        pairs = {"var": "vqvae", "infinity": "bsq_vae"}
        found = [(t, v) for t, v in pairs.items() if len(kinds.get(t, ())) == 1 and len(kinds.get(v, ())) == 1]
        if len(found) != 1:
            seen = ", ".join(f"{k}: {', '.join(f.name for f in fs)}" for k, fs in kinds.items()) or "no checkpoint files"
            raise ValueError(
                f"from_pretrained: {folder} holds no single released checkpoint pair ({seen}); give a folder with exactly one "
                "VAR + VQ-VAE pair (var_d16.pth + vae_ch160v4096z32.pth) or Infinity transformer + BSQ VAE, a HART folder "
                f"with llm/ and tokenizer/, a folder written by save_pretrained, or a shipped name ({', '.join(SHIPPED)})")
        transformer, vae_kind = found[0]
        model_file, vae_file = kinds[transformer][0], kinds[vae_kind][0]
        if transformer == "var":
            if text_encoder is not None:
                raise TypeError("text_encoder: a class-conditional VAR takes class labels; leave text_encoder out")
            vae, var = load_models(model_file, vae_file, config=config, device=device, dtype=dtype or torch.float32)
            return cls(var, vae)
        model, vae = load_infinity(model_file, vae_file, config=config, device=device, dtype=dtype or torch.float32)
        if isinstance(text_encoder, (str, os.PathLike)):
            from .pretrained import text_encoder_from_folder

            text_encoder = text_encoder_from_folder(text_encoder, device)
        return cls(model, vae, text_encoder)

    @classmethod
    def _saved(cls, folder: Path, device: torch.device, dtype: Optional[torch.dtype], text_encoder: Any) -> "Pipeline":
        from .families.infinity.text import TextEncoderConfig, load_text_encoder
        from .loading import load_infinity, load_models

        manifest = read_manifest(folder)
        family, files, configs = manifest["family"], manifest["files"], manifest["config"]
        sampling = sampling_from_dict(manifest["sampling"], family)
        if family == "hart":
            pipe = cls._hart(folder, device, dtype, text_encoder, None, sampling)
        elif family == "var":
            vae, var = load_models(folder / files["transformer"], folder / files["vae"], config=configs["transformer"],
                                   device=device, dtype=dtype or torch.float32)
            pipe = cls(var, vae, sampling=sampling, class_names=manifest.get("class_names"))
        else:
            model, vae = load_infinity(folder / files["transformer"], folder / files["vae"], config=configs["transformer"],
                                       device=device, dtype=dtype or torch.float32)
            if files.get("text_encoder") is not None:
                if text_encoder is not None:
                    raise ValueError(f"{folder} holds its own text encoder; leave text_encoder out")
                text_encoder = load_text_encoder(folder / files["text_encoder"], TextEncoderConfig.from_dict(configs["text_encoder"]), device)
            elif isinstance(text_encoder, (str, os.PathLike)):
                from .pretrained import text_encoder_from_folder

                text_encoder = text_encoder_from_folder(text_encoder, device)
            pipe = cls(model, vae, text_encoder, sampling=sampling)
        if manifest.get("ssg_beta") is not None:
            pipe.model.ssg_beta = manifest["ssg_beta"]
        return pipe

    def save_pretrained(self, folder: Union[str, os.PathLike]) -> Path:
        """Write this pipeline into ``folder`` (created; a folder written by ``save_pretrained`` before is replaced,
        any other non-empty folder refused) so that ``from_pretrained(folder)`` gives the same images: the manifest
        ``model_index.json`` and safetensors weights in the models' dtypes (module docstring). Written into a
        temporary folder beside it and renamed into place: an interrupted save leaves no half-written folder. A Flan-T5
        or Qwen2 text encoder is not saved (the manifest names it; give ``text_encoder=`` when loading)."""
        from safetensors.torch import save_file

        from .families.hart.text import Qwen2TextEncoder
        from .families.infinity.text import TextEncoder

        target = Path(folder)
        if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MANIFEST).is_file())):
            raise ValueError(f"save_pretrained: {target} exists and is not a folder written by save_pretrained; give a new or empty folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            files: Dict[str, Optional[str]] = {}
            configs: Dict[str, Any] = {}
            if self.family == "hart":
                # upstream's names: the tokenizer's tensors under "vae." (its HARTAutoEncoder wraps the VQ-VAE)
                for part, module, config, prefix in (("llm", self.model, self.model.config, ""),
                                                     ("tokenizer", self.vae, self.vae.hart_config, "vae.")):
                    (tmp / part).mkdir()
                    save_file({prefix + k: v for k, v in _state(module).items()}, str(tmp / part / "model.safetensors"))
                    (tmp / part / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
                    files[part] = f"{part}/model.safetensors"
            else:
                save_file(_state(self.model), str(tmp / "transformer.safetensors"))
                save_file(_state(self.vae), str(tmp / "vae.safetensors"))
                files.update(transformer="transformer.safetensors", vae="vae.safetensors", text_encoder=None)
                configs["transformer"] = self.model.config.to_dict() if self.family == "var" else dataclasses.asdict(self.model.config)
                if isinstance(self.text_encoder, TextEncoder):
                    save_file(_state(self.text_encoder), str(tmp / "text_encoder.safetensors"))
                    files["text_encoder"] = "text_encoder.safetensors"
                    configs["text_encoder"] = self.text_encoder.config.to_dict()
            external = None
            if self.text_encoder is not None and files.get("text_encoder") is None:
                external = "Qwen2" if isinstance(self.text_encoder, Qwen2TextEncoder) else type(self.text_encoder).__name__
            manifest = {
                "_class_name": "Pipeline", "_ssg_engine_version": __version__, "family": self.family, "files": files,
                "config": configs, "sampling": sampling_to_dict(self.sampling), "ssg_beta": getattr(self.model, "ssg_beta", None),
                "class_names": None if self.class_names is None else list(self.class_names), "external_text_encoder": external,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            if target.exists():
                target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    # ------------------------------------------------------------------------------------------------ sampling

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Keywords of the tqdm bar over batches (``disable=True`` turns it off), as diffusers' pipelines take them."""
        self.progress_bar_config = dict(kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[None, str, Sequence[str]] = None,
        *,
        class_labels: Any = None,
        prompt_embeds: Any = None,
        negative_prompt: Union[None, str, Sequence[str]] = None,
        guidance_scale: Optional[float] = None,
        num_images_per_prompt: int = 1,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        ssg_scale: Optional[float] = None,
        ssg: Optional[SSG] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        temperature: Optional[float] = None,
        h_div_w: Optional[float] = None,
        output_type: str = "pil",
        batch_size: Optional[int] = None,
        return_dict: bool = True,
    ) -> Union[PipelineOutput, Tuple[Any]]:
        """Sample ``num_images_per_prompt`` images per prompt (Infinity, HART) or class label (VAR).

        - ``prompt``: str or list of str (needs the pipeline's text encoder), or ``prompt_embeds``: text features
          (Infinity: anything ``TextFeatures.coerce`` takes; HART: ``HARTTextFeatures``). ``class_labels`` (VAR):
          ints, a 1-D integer tensor / array, or class names where the pipeline has them (the shipped model).
        - ``negative_prompt`` (Infinity): one for all, or one per prompt; default the model's learned empty text.
        - ``guidance_scale``: each family's native CFG: VAR's and HART's ramp end (``t_k = cfg * k / (K - 1)``),
          Infinity's weight ``w`` on every scale (1 = off). ``top_k``, ``top_p``, ``temperature`` (Infinity's tau):
          as ``SamplingParams``. ``None`` everywhere means the model card's setting (``self.sampling``).
        - ``ssg_scale``: SSG on with this beta (DSE prior), or ``ssg``: an ``SSG`` (``SSG()``: the card's beta);
          neither: SSG off. ``h_div_w`` (Infinity): the aspect ratio of the schedule.
        - ``seed`` or ``generator`` (one draw from it gives the seed: :func:`seed_from_generator`); neither: the
          card's seed. Row r of the request draws from a stream keyed by (seed, r), so ``batch_size`` (rows per
          ``generate`` call; None: all at once) and the position of a row in its batch do not change its image.
        - ``output_type``: ``"pil"`` | ``"np"`` | ``"pt"`` (:class:`PipelineOutput`); ``return_dict=False`` gives
          ``(images,)``.

        Every argument is checked before any compute; a bad one is one ``ValueError`` / ``TypeError`` naming it."""
        cond, _ = self._conditions(prompt, class_labels, prompt_embeds)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
        per = as_number(num_images_per_prompt, "num_images_per_prompt", "an integer >= 1", integer=True, valid=lambda v: v >= 1)
        rows = _rows(cond) * per
        size = rows if batch_size is None else as_number(batch_size, "batch_size", "an integer >= 1 or None", integer=True, valid=lambda v: v >= 1)
        params = self._params(guidance_scale, top_k, top_p, temperature, ssg_scale, ssg, seed, generator)
        family = self._family_keywords(negative_prompt, h_div_w, cond, per)
        cond = repeat_rows(cond, per)
        if _is_prompts(cond):  # encoded once, before sampling (an unknown word is an error here), as generate encodes them
            cond = self.text_encoder.encode(cond)
            if isinstance(family.get("negative"), str):
                family["negative"] = [family["negative"]] * rows
            if "negative" in family:
                family["negative"] = self.text_encoder.encode(family["negative"])
        images = []
        starts = range(0, rows, size)
        with tqdm(starts, **{"desc": "ssg-engine", "unit": "batch", "file": sys.stderr, **self.progress_bar_config}) as bar:
            for start in bar:
                stop = min(start + size, rows)
                extra = {k: (v[start:stop] if k == "negative" else v) for k, v in family.items()}
                images.append(generate(self.model, self.vae, cond[start:stop], params, seeding="row",
                                       row_seeds=row_seeds(params.seed, stop - start, start), **extra))
        out = _convert(torch.cat(images), output_type)
        return PipelineOutput(images=out) if return_dict else (out,)

    def compare(self, prompt: Union[None, str, Sequence[str]] = None, *, ssg_scale: Optional[float] = None,
                ssg: Optional[SSG] = None, upscale: Optional[int] = None, **kwargs: Any) -> "Image.Image":
        """Baseline and SSG side by side, same seeds, as one labelled PIL image (:func:`ssg_engine.imaging.labelled_grid`):
        a header over each half ("baseline"; the SSG settings), one row per prompt / class (its text or class name),
        ``num_images_per_prompt`` images per row. ``ssg_scale`` / ``ssg`` as in ``__call__`` (neither: ``SSG()``, the
        card's beta); ``upscale``: nearest-neighbour factor (default: about 128 px per image); the other keywords as
        ``__call__`` (``output_type`` and ``return_dict`` excepted)."""
        from .imaging import labelled_grid

        for name in ("output_type", "return_dict"):
            if name in kwargs:
                raise TypeError(f"compare: {name} is not an argument (it returns one PIL image)")
        if ssg is not None and ssg_scale is not None:
            raise ValueError("give ssg_scale or ssg, not both")
        guided_ssg = _ssg(ssg_scale, ssg) or SSG()
        guided_ssg = guided_ssg.for_model(self.model) if isinstance(guided_ssg, SSG) else guided_ssg
        _, labels = self._conditions(prompt, kwargs.get("class_labels"), kwargs.get("prompt_embeds"))
        if upscale is not None:
            upscale = as_number(upscale, "upscale", "an integer in [1, 64]", integer=True, valid=lambda v: 1 <= v <= 64)
        base = self(prompt, ssg=None, output_type="pt", **kwargs).images
        guided = self(prompt, ssg=guided_ssg, output_type="pt", **kwargs).images
        per = kwargs.get("num_images_per_prompt", 1)
        return labelled_grid([base.cpu(), guided.cpu()], ["baseline", guided_ssg.title()], labels, nrow=per,
                             upscale=upscale or max(1, 128 // base.shape[-1]))

    # ------------------------------------------------------------------------------------------------ checks

    def _conditions(self, prompt: Any, labels: Any, embeds: Any) -> Tuple[Any, List[str]]:
        """(the request's conditions: labels (B,) / prompts / text features, one label text per row)."""
        if self.family == "var":
            for name, value in (("prompt", prompt), ("prompt_embeds", embeds)):
                if value is not None:
                    raise TypeError(f"{name}: a class-conditional VAR takes class_labels=, not {name}")
            if labels is None:
                raise ValueError("class_labels is required for a class-conditional VAR (ints" +
                                 (", or class names: " + ", ".join(self.class_names) if self.class_names else "") + ")")
            if isinstance(labels, (str, int)) or (isinstance(labels, torch.Tensor) and labels.ndim == 0):
                labels = [labels]
            if isinstance(labels, (list, tuple)) and any(isinstance(c, str) for c in labels):
                labels = [self._class_index(c) if isinstance(c, str) else c for c in labels]
            labels = class_labels(labels, self.model.num_classes, "cpu", name="class_labels")
            return labels, [self.class_names[c] if self.class_names else f"class {c}" for c in labels.tolist()]
        if labels is not None:
            raise TypeError(f"class_labels: a text-to-image {self.family} model takes prompt= (or prompt_embeds=)")
        if (prompt is None) == (embeds is None):
            raise ValueError("give prompt= (str or list of str) or prompt_embeds= (text features), exactly one")
        if prompt is not None:
            if self.text_encoder is None:
                raise ValueError("prompt: this pipeline has no text encoder; load it with from_pretrained(..., text_encoder=FOLDER) "
                                 "or pass prompt_embeds=")
            prompts = check_prompts([prompt] if isinstance(prompt, str) else prompt, "prompt")
            return prompts, prompts
        if self.family == "infinity":
            from .families.infinity.model import TextFeatures

            embeds = TextFeatures.coerce(embeds)
        else:
            from .families.hart.text import HARTTextFeatures

            if not isinstance(embeds, HARTTextFeatures):
                raise TypeError(f"prompt_embeds: HART takes HARTTextFeatures (Qwen2TextEncoder.encode's); got {type(embeds).__name__}")
        return embeds, [f"prompt {i}" for i in range(embeds.batch)]

    def _class_index(self, name: str) -> int:
        if self.class_names is None:
            raise ValueError(f"class_labels: {name!r} is a name, but this model has no class names; give integer labels")
        key = name.strip().lower().replace("_", "-").replace(" ", "-")
        if key not in self.class_names:
            raise ValueError(f"class_labels: unknown class {name!r}; the classes are {', '.join(self.class_names)}")
        return self.class_names.index(key)

    def _params(self, guidance_scale: Any, top_k: Any, top_p: Any, temperature: Any, ssg_scale: Any, ssg: Any, seed: Any,
                generator: Any) -> Sampling:
        """The card's settings with the arguments given (validated), SSG, and the seed (from ``generator``)."""
        if ssg is not None and ssg_scale is not None:
            raise ValueError("give ssg_scale or ssg, not both")
        if seed is not None and generator is not None:
            raise ValueError("give seed or generator, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be one torch.Generator (a list of generators is not supported; use seed=); "
                            f"got {type(generator).__name__}")
        given = {k: v for k, v in (("cfg", guidance_scale), ("top_k", top_k), ("top_p", top_p), ("temperature", temperature))
                 if v is not None}
        try:
            params = self.sampling.replace(**given, ssg=_ssg(ssg_scale, ssg))
        except ValueError as e:  # name the pipeline's argument, not the field
            raise ValueError(str(e).replace("cfg must", "guidance_scale (cfg) must").replace("beta must", "ssg_scale must", 1)) from None
        if generator is not None:
            seed = seed_from_generator(generator)
        if seed is not None:
            params = params.replace(seed=as_number(seed, "seed", "an integer in [0, 2**63 - 1]", integer=True,
                                                   valid=lambda v: 0 <= v < 2**63))
        if params.seed is None:
            raise ValueError("seed: the pipeline needs a seed (its rows are seeded by (seed, row)); give seed= or generator=")
        return params

    def _family_keywords(self, negative_prompt: Any, h_div_w: Any, cond: Any, per: int) -> Dict[str, Any]:
        """Infinity's keywords of ``generate`` (``negative``, ``h_div_w``), repeated per image; refused elsewhere."""
        if self.family != "infinity":
            for name, value in (("negative_prompt", negative_prompt), ("h_div_w", h_div_w)):
                if value is not None:
                    raise TypeError(f"{name} is for Infinity models; a {self.family} model " +
                                    ("uses its learned empty text for CFG" if name == "negative_prompt" else "has a fixed size"))
            return {}
        out: Dict[str, Any] = {}
        if h_div_w is not None:
            from .families.infinity.model import scale_schedule

            scale_schedule(as_number(h_div_w, "h_div_w", "a positive number"), 1)  # one of the table's ratios
            out["h_div_w"] = h_div_w
        if negative_prompt is not None:
            if not _is_prompts(cond) or self.text_encoder is None:
                raise ValueError("negative_prompt needs prompt= and the pipeline's text encoder (with prompt_embeds, leave it out)")
            if not isinstance(negative_prompt, str):
                negative_prompt = check_prompts(negative_prompt, "negative_prompt")
                if len(negative_prompt) != len(cond):
                    raise ValueError(f"negative_prompt: one for all prompts, or one per prompt ({len(cond)}); got {len(negative_prompt)}")
                negative_prompt = repeat_rows(negative_prompt, per)
            out["negative"] = negative_prompt
        return out


def _ssg(ssg_scale: Any, ssg: Optional[SSG]) -> Optional[SSG]:
    """``SSG(beta=ssg_scale)``, ``ssg``, or None (off)."""
    if ssg is not None and not isinstance(ssg, SSG):
        raise TypeError(f"ssg must be an ssg_engine.SSG or None; got {type(ssg).__name__}")
    if ssg_scale is not None:
        return SSG(beta=as_number(ssg_scale, "ssg_scale", "a finite number"))
    return ssg


def _is_prompts(cond: Any) -> bool:
    return isinstance(cond, list) and all(isinstance(c, str) for c in cond)


def _rows(cond: Any) -> int:
    return len(cond) if isinstance(cond, (list, torch.Tensor)) else cond.batch


def _check_device(device: Any) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]'; got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available here; use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]'; got {str(device)!r}")
    return device


def _convert(images: torch.Tensor, output_type: str) -> Any:
    """(B, 3, H, W) in [0, 1] as ``output_type`` asks (``PipelineOutput``)."""
    if output_type == "pt":
        return images
    if output_type == "np":
        return images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    from PIL import Image

    from .imaging import to_uint8

    return [Image.fromarray(a) for a in to_uint8(images)]


def _state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``module``'s state dict as contiguous CPU tensors of their own (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def sampling_to_dict(sampling: Sampling) -> Dict[str, Any]:
    """A card's settings as JSON-ready fields (its SSG as a dict of ``SSG`` fields, or None)."""
    d = {f.name: getattr(sampling, f.name) for f in dataclasses.fields(sampling)}
    d["ssg"] = None if sampling.ssg is None else dataclasses.asdict(sampling.ssg)
    return d


def sampling_from_dict(d: Dict[str, Any], family: str) -> Sampling:
    """The inverse of :func:`sampling_to_dict` for ``family``'s settings class."""
    d = dict(d)
    ssg = d.pop("ssg", None)
    return (HARTParams if family == "hart" else SamplingParams)(**d, ssg=None if ssg is None else SSG(**ssg))


def read_manifest(folder: Path) -> Dict[str, Any]:
    """``folder/model_index.json``, checked: a ``ValueError`` naming the file for anything save_pretrained did not write."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e}); save the pipeline again with save_pretrained") from None
    needed = ("family", "files", "config", "sampling")
    if not isinstance(manifest, dict) or any(k not in manifest for k in needed) or manifest["family"] not in UPSTREAM_SAMPLING:
        raise ValueError(f"{path} is not a manifest written by ssg_engine's save_pretrained (it needs {', '.join(needed)} and a "
                         f"family among {', '.join(UPSTREAM_SAMPLING)}); save the pipeline again with save_pretrained")
    return manifest
