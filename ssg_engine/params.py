"""``SamplingParams``: every sampling setting, validated once; the only place sampling defaults live.

The defaults are upstream VAR's FID protocol (``cfg=1.5, top_k=900, top_p=0.96``, temperature 1, no SSG).
A model card supplies its own settings as a ``SamplingParams`` (e.g. ``ssg_engine.pretrained.SAMPLING``);
``params.replace(cfg=2.0)`` derives one from another.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from .guidance import SSG
from .validation import as_number

def check_seed(seed: Any, name: str = "seed", count: int = 1) -> Optional[int]:
    """``seed`` as a Python int (None stays None); the ``count`` seeds ``seed .. seed + count - 1`` must fit int64."""
    if seed is None:
        return None
    return as_number(
        seed, name, f"an integer in [-2**63, 2**63 - {count}] or None", integer=True, valid=lambda v: -(2**63) <= v <= 2**63 - count
    )


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request.

    - ``cfg``: classifier-free guidance scale (VAR's ramp ``t_k = cfg * k / (K - 1)``), finite.
    - ``top_k`` (>= 0, 0 = off), ``top_p`` (in [0, 1], 0 = off), ``temperature`` (> 0): upstream's filters.
    - ``seed``: int64 seed of the random draws (None: the global generator, reference sampler only).
    - ``ssg``: an :class:`ssg_engine.SSG` or None (no SSG).

    Numbers may be Python, NumPy or 0-d tensor numbers; they are stored as Python numbers. Bad values raise
    ``ValueError`` (``TypeError`` for ``ssg``) naming the field.
    """

    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    temperature: float = 1.0
    seed: Optional[int] = 0
    ssg: Optional[SSG] = None

    def __post_init__(self) -> None:
        if self.ssg is not None and not isinstance(self.ssg, SSG):
            raise TypeError(f"ssg must be an ssg_engine.SSG or None, got {type(self.ssg).__name__}")
        fields = {
            "cfg": as_number(self.cfg, "cfg", "a finite number"),
            "top_k": as_number(self.top_k, "top_k", "an integer >= 0 (0 disables it)", integer=True, valid=lambda v: v >= 0),
            "top_p": as_number(self.top_p, "top_p", "in [0, 1] (0 disables it)", valid=lambda v: 0.0 <= v <= 1.0),
            "temperature": as_number(
                self.temperature, "temperature", "a finite number > 0", valid=lambda v: math.isfinite(v) and v > 0
            ),
            "seed": check_seed(self.seed),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def for_model(self, model: Any) -> "SamplingParams":
        """These settings for ``model``: an SSG given without a beta takes the model's (:meth:`SSG.for_model`)."""
        return self if self.ssg is None else self.replace(ssg=self.ssg.for_model(model))

    def replace(self, **changes: Any) -> "SamplingParams":
        """A copy with ``changes`` applied (validated again); unknown names raise ``TypeError``."""
        return dataclasses.replace(self, **changes)


# Upstream Infinity's release settings (FoundationVision/Infinity 4c27bbb: ``predict.py`` cfg 3 and tau 0.5,
# ``gen_one_img`` top-k 900 and top-p 0.97, CFG on the logits): for an Infinity model, ``cfg`` is the CFG weight
# ``w`` of every scale (1 = off) and ``temperature`` the ``tau`` of every scale.
INFINITY_UPSTREAM = SamplingParams(cfg=3.0, top_k=900, top_p=0.97, temperature=0.5)


@dataclasses.dataclass(frozen=True)
class HARTParams:
    """Sampling settings of one HART request: :class:`SamplingParams`' fields (same meaning and checks; ``cfg`` is
    the end of upstream HART's ramp ``cfg * k / (K - 1)``), except ``top_k``, plus HART's own two:

    - ``top_k``: None (upstream-compat): upstream's hard-coded top-k, 600 below scale 7 and 300 from there on
      (upstream ignores its ``top_k`` argument); an integer >= 0 (0 = off) is honoured at every scale.
    - ``more_smooth``: feed soft Gumbel-softmax embeddings of the filtered logits instead of the drawn codes'.
    - ``num_maskgit_iters``: MaskGIT passes (>= 1) over the last scale.

    The diffusion head's step count is the checkpoint's (``HARTConfig.num_sampling_steps``, "8" in upstream's
    config), not a sampling setting. Bad values raise ``ValueError`` (``TypeError`` for ``ssg``) naming the field.
    """

    cfg: float = 4.5
    top_k: Optional[int] = None
    top_p: float = 0.0
    temperature: float = 1.0
    seed: Optional[int] = 0
    ssg: Optional[SSG] = None
    more_smooth: bool = False
    num_maskgit_iters: int = 1

    def __post_init__(self) -> None:
        shared = SamplingParams(
            cfg=self.cfg, top_k=0 if self.top_k is None else self.top_k, top_p=self.top_p,
            temperature=self.temperature, seed=self.seed, ssg=self.ssg,
        )
        for name in ("cfg", "top_p", "temperature", "seed") + (() if self.top_k is None else ("top_k",)):
            object.__setattr__(self, name, getattr(shared, name))
        if self.more_smooth not in (True, False):
            raise ValueError(f"more_smooth must be True or False, got {self.more_smooth!r}")
        object.__setattr__(self, "more_smooth", bool(self.more_smooth))
        iters = as_number(self.num_maskgit_iters, "num_maskgit_iters", "an integer >= 1", integer=True, valid=lambda v: v >= 1)
        object.__setattr__(self, "num_maskgit_iters", iters)

    def for_model(self, model: Any) -> "HARTParams":
        """These settings for ``model``: an SSG given without a beta takes the model's (:meth:`SSG.for_model`)."""
        return self if self.ssg is None else self.replace(ssg=self.ssg.for_model(model))

    def replace(self, **changes: Any) -> "HARTParams":
        """A copy with ``changes`` applied (validated again); unknown names raise ``TypeError``."""
        return dataclasses.replace(self, **changes)


# Upstream HART's release settings (mit-han-lab/hart e28a41f ``sample.py``: cfg 4.5, ``more_smooth=True``, one
# MaskGIT iteration, top-p 0; ``autoregressive_infer_cfg``'s hard-coded top-k 600/300).
HART_UPSTREAM = HARTParams(cfg=4.5, top_k=None, top_p=0.0, more_smooth=True, num_maskgit_iters=1)
