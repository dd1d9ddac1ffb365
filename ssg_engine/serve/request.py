"""One ``POST /v1/images/generations`` body, checked field by field before any compute (``parse_request``).

OpenAI's fields (``model``, ``prompt``, ``n``, ``response_format``, ``size``, ``user``) and ours (``class_labels``,
``seed``, ``negative_prompt``, ``guidance_scale``, ``ssg_scale``, ``ssg_prior``, ``top_k``, ``top_p``,
``temperature``). A bad field is one ``RequestError`` naming it, with the CLI's ranges and wording
(``<field>: <problem>; <fix>``); nothing the client sends names a file or is unpickled.
"""
from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Any, Dict, List, Optional

from ..cli.common import CFG_MAX, INT32_MAX, INT64_MAX, SSG_BETA_MAX, TEMPERATURE_MAX, TEMPERATURE_MIN
from ..guidance import PRIORS, SSG
from .models import ServedModel, Settings

PROMPT_MAX_CHARS = 1000
FIELDS = ("model", "prompt", "n", "response_format", "size", "user", "class_labels", "seed", "negative_prompt",
          "guidance_scale", "ssg_scale", "ssg_prior", "top_k", "top_p", "temperature")


class RequestError(ValueError):
    """A bad request: HTTP ``status`` (400 malformed, 404 unknown model, 422 a bad value), the field (``param``)
    and a one-line message ``<field>: <problem>; <fix>``."""

    def __init__(self, status: int, param: Optional[str], message: str) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclasses.dataclass
class ImageRequest:
    """A checked request: its model, one condition per image (label or prompt), the batch settings and the seed
    (given, or drawn at random and returned in the response)."""

    model: ServedModel
    conds: List[Any]
    settings: Settings
    seed: int

    @property
    def n(self) -> int:
        return len(self.conds)


def _bad(param: str, message: str) -> RequestError:
    return RequestError(422, param, f"{param}: {message}")


def _int(body: Dict[str, Any], name: str, lo: int, hi: int) -> Optional[int]:
    value = body.get(name)
    want = f"an integer in [{lo}, {'2**63 - 1' if hi == INT64_MAX else hi}]"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"{value!r} is not an integer; give {want}")
    if not lo <= value <= hi:
        raise _bad(name, f"{value} is out of range; give {want}")
    return value


def _float(body: Dict[str, Any], name: str, lo: float, hi: float) -> Optional[float]:
    value = body.get(name)
    want = f"a number in [{lo:g}, {hi:g}]"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, f"{value!r} is not a number; give {want}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise _bad(name, f"{value} is out of range; give {want}")
    return float(value)


def _text(body: Dict[str, Any], name: str) -> Optional[str]:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(name, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _bad(name, "is empty; give some text, or leave the field out")
    if len(value) > PROMPT_MAX_CHARS:
        raise _bad(name, f"is {len(value)} characters long; give at most {PROMPT_MAX_CHARS}")
    return value


def _labels(body: Dict[str, Any], model: ServedModel, n: Optional[int]) -> List[int]:
    """``class_labels`` (one label, or one per image; names with the shipped model), else ``prompt`` as a class."""
    from ..data import class_index

    raw = body.get("class_labels")
    name = "class_labels"
    if raw is None:
        if body.get("prompt") is None:
            raise _bad("class_labels", f"{model.name} is class-conditional; give class_labels (or the class as prompt)")
        raw, name = body["prompt"], "prompt"
    values = raw if isinstance(raw, list) else [raw]
    if not values or (n is not None and len(values) not in (1, n)):
        raise _bad(name, f"give one label, or one per image (n={n}); got {len(values)}")
    labels = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise _bad(name, f"{v!r} is not a class label; give integers in [0, {model.num_classes})"
                             + (" or class names" if model.class_names else ""))
        if isinstance(v, str) and not model.class_names and not v.strip().lstrip("-").isdigit():
            raise _bad(name, f"{v!r} is not an integer label; class names work with the shipped model only")
        try:
            labels.append(class_index(v, model.num_classes) if model.class_names else int(v))
        except ValueError as e:
            raise _bad(name, str(e)) from None
        if not 0 <= labels[-1] < model.num_classes:
            raise _bad(name, f"class {labels[-1]} is outside [0, {model.num_classes}); give labels of this model's classes")
    count = n if n is not None else len(labels)
    return labels * count if len(labels) == 1 else labels


def parse_request(body: Any, models: Dict[str, ServedModel], max_n: int) -> ImageRequest:
    """The checked request of a decoded JSON ``body``; ``RequestError`` for the first bad field. ``models``: the
    served models by name (the first is the default ``model``); ``max_n``: the most images one request may ask for."""
    if not isinstance(body, dict):
        raise RequestError(400, None, "the body must be a JSON object; see POST /v1/images/generations in the README")
    unknown = [k for k in body if k not in FIELDS]
    if unknown:
        raise _bad(unknown[0], f"unknown field; the fields are {', '.join(FIELDS)}")
    name = body.get("model")
    if name is None:
        name = next(iter(models))
    if not isinstance(name, str) or name not in models:
        raise RequestError(404, "model", f"model: {name!r} is not served; GET /v1/models lists {', '.join(models)}")
    model = models[name]
    fmt = body.get("response_format")
    if fmt not in (None, "b64_json"):
        raise _bad("response_format", f"{fmt!r} is not served; give \"b64_json\" (images come back in the response, never as URLs)")
    size = body.get("size")
    if size not in (None, "auto", f"{model.size[1]}x{model.size[0]}"):
        raise _bad("size", f"{size!r}: {model.name} makes {model.size[1]}x{model.size[0]} images; give that size or leave it out")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user", f"must be a string, got {type(body['user']).__name__}")
    n = _int(body, "n", 1, max_n)
    seed = _int(body, "seed", 0, INT64_MAX)
    if model.text_conditional:
        if body.get("class_labels") is not None:
            raise _bad("class_labels", f"{model.name} is text-to-image; give prompt")
        prompt = _text(body, "prompt")
        if prompt is None:
            raise _bad("prompt", f"{model.name} is text-to-image; give a prompt")
        for field, text in (("prompt", prompt), ("negative_prompt", _text(body, "negative_prompt"))):
            if text is not None:
                try:
                    model.check_prompt(text)
                except ValueError as e:
                    raise _bad(field, " ".join(str(e).split())) from None
        conds: List[Any] = [prompt] * (n or 1)
    else:
        if body.get("negative_prompt") is not None:
            raise _bad("negative_prompt", f"{model.name} is class-conditional; negative prompts are for text-to-image models")
        conds = _labels(body, model, n)
    negative = _text(body, "negative_prompt")
    if negative is not None and model.family == "hart":
        raise _bad("negative_prompt", "HART's CFG uses the model's empty text; leave it out")
    changes: Dict[str, Any] = {}
    for field, key, value in (
        ("guidance_scale", "cfg", _float(body, "guidance_scale", -CFG_MAX, CFG_MAX)),
        ("top_k", "top_k", _int(body, "top_k", 0, INT32_MAX)),
        ("top_p", "top_p", _float(body, "top_p", 0.0, 1.0)),
        ("temperature", "temperature", _float(body, "temperature", TEMPERATURE_MIN, TEMPERATURE_MAX)),
    ):
        if value is not None:
            changes[key] = value
    beta = _float(body, "ssg_scale", -SSG_BETA_MAX, SSG_BETA_MAX)
    prior = body.get("ssg_prior")
    if prior is not None and prior not in PRIORS:
        raise _bad("ssg_prior", f"{prior!r} is not a prior; give one of {', '.join(PRIORS)}")
    if beta is not None or prior is not None:  # a prior alone turns SSG on at the model's beta, as --ssg-prior does
        changes["ssg"] = SSG(beta=beta, prior=prior or "dse").for_model(model.model)
    try:
        params = model.defaults.replace(**changes)
    except (TypeError, ValueError) as e:  # a family's own limits (SamplingParams / HARTParams checks)
        raise RequestError(422, None, " ".join(str(e).split())) from None
    return ImageRequest(model, conds, Settings(params, negative), secrets.randbelow(INT64_MAX + 1) if seed is None else seed)
