"""The models a server holds (``ServedModel``) and the one function that runs a batch of rows through one of them.

A batch is rows of one or more requests that share a model and its settings (``Settings``); row ``r`` of a request
with seed ``s`` draws from the stream keyed by ``(s, r)`` (``ssg_engine.seeding.row_seeds``), so a request's images
do not depend on what it was batched with: they equal ``generate(..., seed=s, seeding="row")`` for it alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..api import generate
from ..params import SamplingParams


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the rows of one batch share besides the model: the sampling settings without the seed, and Infinity's
    negative prompt (None: none). Hashable: the scheduler's batch key."""

    params: Any  # SamplingParams or HARTParams, seed None
    negative: Optional[str] = None


@dataclasses.dataclass
class ServedModel:
    """One model of a server: its name (the API's ``model``), family (``var`` | ``infinity`` | ``hart``), the loaded
    modules, its default sampling settings (the model card's, seed None), its image size (H, W, after ``warm_up``), and for class-conditional models
    the class count and names (names only for the shipped model). ``keywords``: fixed ``generate`` keywords (the
    shipped Infinity model's ``schedule``)."""

    name: str
    family: str
    model: torch.nn.Module
    vae: torch.nn.Module
    defaults: Any
    text_encoder: Any = None
    num_classes: int = 0
    class_names: Tuple[str, ...] = ()
    keywords: Dict[str, Any] = dataclasses.field(default_factory=dict)
    size: Tuple[int, int] = (0, 0)  # set by warm_up()

    @property
    def text_conditional(self) -> bool:
        return self.family != "var"

    def describe(self) -> Dict[str, Any]:
        """The model's entry in ``GET /v1/models`` (OpenAI's fields, then ours)."""
        d = self.defaults
        return {
            "id": self.name, "object": "model", "created": 0, "owned_by": "ssg-engine", "family": self.family,
            "conditioning": "text" if self.text_conditional else "class", "size": f"{self.size[1]}x{self.size[0]}",
            "num_classes": self.num_classes, "class_names": list(self.class_names),
            "defaults": {"guidance_scale": d.cfg, "top_k": d.top_k, "top_p": d.top_p, "temperature": d.temperature,
                         "ssg_scale": self.default_beta()},
        }

    def warm_up(self) -> None:
        """Generate one image (seed 0), so that the first request pays no first-call costs; sets ``size``."""
        cond = "a photo" if self.text_conditional else 0  # words of the shipped text encoder's vocabulary
        image = self.run([cond], Settings(self.defaults), torch.zeros(1, dtype=torch.int64))
        self.size = (int(image.shape[-2]), int(image.shape[-1]))

    def check_prompt(self, prompt: str) -> None:
        """``ValueError`` when this model's text encoder cannot take ``prompt`` (the shipped model's small vocabulary);
        checked per request, so that one bad prompt never fails the batch it would have joined."""
        tokenize = getattr(self.text_encoder, "token_ids", None)
        if tokenize is not None:
            tokenize([prompt])

    def default_beta(self) -> float:
        """The SSG beta this model uses when SSG is asked for without one (its card's, else the default)."""
        from ..guidance import SSG

        return SSG().for_model(self.model).beta

    @torch.no_grad()
    def run(self, conds: Sequence[Any], settings: Settings, row_seeds: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] for ``conds`` (N labels or prompts), row ``i`` seeded by ``row_seeds[i]``
        ((N,) int64: each request's ``seeding.row_seeds(seed, n)``, concatenated)."""
        extra = dict(self.keywords)
        if settings.negative is not None:
            extra["negative"] = settings.negative
        if self.text_encoder is not None:
            extra["text_encoder"] = self.text_encoder
        return generate(self.model, self.vae, list(conds), settings.params, seeding="row", row_seeds=row_seeds, **extra)


def shipped_models(device: str = "cpu", families: Sequence[str] = ("var", "infinity")) -> List[ServedModel]:
    """The shipped Fashion-MNIST models of ``families`` on ``device``: ``fashion-mnist-var`` (class-conditional VAR)
    ``fashion-mnist-infinity`` (text-to-image Infinity) and ``fashion-mnist-hart`` (text-to-image HART), with their
    model cards' settings."""
    from ..pretrained import (
        HART_SAMPLING, INFINITY_SAMPLING, SAMPLING, class_names, infinity_folder_schedule, load_pretrained,
        load_pretrained_hart, load_pretrained_infinity,
    )

    out = []
    if "var" in families:
        vae, var = load_pretrained(device=device)
        out.append(ServedModel("fashion-mnist-var", "var", var, vae, SAMPLING.replace(seed=None),
                               num_classes=var.num_classes, class_names=class_names()[: var.num_classes]))
    if "infinity" in families:
        model, vae, text_encoder = load_pretrained_infinity(device=device)
        schedule = infinity_folder_schedule()
        out.append(ServedModel("fashion-mnist-infinity", "infinity", model, vae, INFINITY_SAMPLING.replace(seed=None),
                               text_encoder=text_encoder,
                               keywords={"schedule": schedule}))
    if "hart" in families:
        model, tokenizer, text_encoder = load_pretrained_hart(device=device)
        out.append(ServedModel("fashion-mnist-hart", "hart", model, tokenizer, HART_SAMPLING.replace(seed=None),
                               text_encoder=text_encoder))
    return out

