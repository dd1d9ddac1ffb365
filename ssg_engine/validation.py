"""Argument normalisation shared by every layer: one message shape for every bad number; the config-field checks and
config-file reading every family's config uses; prompt lists."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Union

import numpy as np
import torch

Number = Union[int, float]


def as_number(
    value: Any, name: str, requirement: str, *, integer: bool = False, valid: Callable[[Number], bool] = math.isfinite
) -> Number:
    """``value`` (a Python, NumPy or 0-d tensor number; never a bool) as a Python ``int`` (``integer``) or ``float``.

    Raises ``ValueError("{name} must be {requirement}, got {value!r}")`` for any other type, or when ``valid`` is false.
    """
    v = value.item() if isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype != torch.bool else value
    ok = isinstance(v, numbers.Integral if integer else numbers.Real) and not isinstance(v, bool)
    if ok:
        try:
            v = int(v) if integer else float(v)
        except OverflowError:  # an int too large for a float
            ok = False
    if not ok or not valid(v):
        raise ValueError(f"{name} must be {requirement}, got {value!r}")
    return v

def class_labels(labels: Any, num_classes: int, device: Union[str, torch.device], name: str = "labels") -> torch.Tensor:
    """``labels`` (a list of ints, or a 1-D integer tensor or NumPy array) as a 1-D int64 tensor on ``device``, each in
    ``[0, num_classes)``; otherwise a ``ValueError`` naming ``name`` (never rounded or flattened).

    The one label check of every sampling entry point (``sample_reference``, ``generate``, ``Engine.generate``).
    """
    kinds = "a list of integer class indices, or a 1-D integer tensor or NumPy array"
    if (
        isinstance(labels, str)
        or (isinstance(labels, np.ndarray) and labels.dtype.kind in "US")
        or (isinstance(labels, (list, tuple)) and any(isinstance(x, str) for x in labels))
    ):
        raise ValueError(
            f"{name} must be integer class indices, not class names ({labels!r}); convert names first, "
            "e.g. with ssg_engine.data.class_index for the Fashion-MNIST classes"
        )
    if isinstance(labels, (list, tuple)):
        labels = torch.tensor(
            [as_number(x, f"{name}[{i}]", "an integer class index", integer=True) for i, x in enumerate(labels)], dtype=torch.long
        )
    elif isinstance(labels, np.ndarray) and labels.dtype.kind in "biufc":
        labels = torch.as_tensor(labels.copy())  # a copy: negative strides, and 0-d stays 0-d
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be {kinds}; got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.ndim != 1:
        raise ValueError(f"{name} must be {kinds}; got dtype {labels.dtype} and shape {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError(f"{name} is empty: give at least one class index")
    labels = labels.to(device=device, dtype=torch.long)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(f"class labels must be in [0, {num_classes}); got {bad.tolist()[:8]}")
    return labels


def machine_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(need: int, what: str, fix: str) -> None:
    """``ValueError`` starting with ``what`` (the argument and its value) when a run would hold ``need`` bytes, more
    than this machine's memory; called before any compute, so an absurd count never starts a run."""
    have = machine_memory()
    if need > have:
        raise ValueError(f"{what}: the run would hold {need / 2**30:.3g} GiB in memory, more than this machine's "
                         f"{have / 2**30:.3g} GiB; {fix}")


def refuse_module_run(module: str, *commands: str) -> NoReturn:
    """``python -m <module>`` of a module whose command moved to ``ssg-engine <command>``: one line on stderr saying
    where the command is, exit status 2 (never exit 0 having done nothing)."""
    where = " or ".join(f"`ssg-engine {c} ...`" for c in commands)
    sys.stderr.write(f"error: python -m {module} is not a command; run {where} (python -m ssg_engine.cli works too); "
                     "see ssg-engine --help\n")
    raise SystemExit(2)


class AssumedSettingWarning(UserWarning):
    """A model setting that neither the checkpoint nor the config gave was assumed (the message names it and how to
    set it): if the model was trained otherwise, its samples are wrong."""


def field_type_problem(name: str, kind: str, value: Any) -> Optional[str]:
    """Why ``value`` does not fit a config field annotated ``kind`` (``int``, ``float``, ``bool``, ``Optional[int]`` or
    ``Tuple[int, ...]``); None if it does. Floats must be finite."""
    def integral(v: Any) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if kind == "Optional[int]":
        ok, want = value is None or integral(value), "an integer or null"
    elif kind == "bool":
        ok, want = isinstance(value, bool), "true or false"
    elif kind == "int":
        ok, want = integral(value), "an integer"
    elif kind == "float":
        ok, want = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value), "a finite number"
    else:
        ok, want = isinstance(value, (list, tuple)) and all(integral(v) for v in value), "a list of integers"
    return None if ok else f"{name} must be {want} (got {value!r})"


def read_config_file(path: Union[str, Path]) -> Dict[str, Any]:
    """The JSON object of config file ``path``; one ``FileNotFoundError``/``ValueError`` line naming the file and the
    fix for a missing file, a folder, a binary or unreadable file, bad JSON, or JSON that is not an object."""
    path = Path(path)
    if path.is_dir():
        hint = f" (e.g. {path / 'config.json'})" if (path / "config.json").is_file() else ""
        raise FileNotFoundError(f"config path {path} is a directory; pass the JSON config file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not a text file (a checkpoint?); pass the JSON config") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; fix the file") from None
    except OSError as e:
        raise OSError(f"config file {path} cannot be read ({e.strerror}); check its permissions") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise ValueError(f'config file {path} must be a JSON object of config fields ({{"field": value, ...}}), not {kind}')
    return data


def normalise_fields(config: Any) -> List[str]:
    """The type problems of a config dataclass's fields (:func:`field_type_problem`); each field that fits is
    normalised in place (NumPy numbers, lists -> bool / int / float / tuple of ints) so that equal configs compare equal."""
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        problem = field_type_problem(f.name, f.type, value)
        if problem:
            problems.append(problem)
        elif value is not None:
            tuple_of_ints = f.type.startswith("Tuple")
            cast = {"bool": bool, "float": float}.get(f.type, (lambda v: tuple(int(x) for x in v)) if tuple_of_ints else int)
            object.__setattr__(config, f.name, cast(value))
    return problems


def local_model_folder(path: Union[str, Path], what: str, files: str) -> Path:
    """``path`` as the folder of a Hugging Face model saved locally (it holds ``config.json``); else one
    ``FileNotFoundError`` line naming ``what`` (e.g. "text encoder folder") and the ``files`` it must hold."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} not found: {folder}; download {files} into a local folder and pass it")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what} {folder} has no config.json; it must hold {files}")
    return folder


def check_loading_info(info: Dict[str, Any], what: str, files: str) -> None:
    """One ``ValueError`` line naming ``what`` (e.g. "text encoder folder X") unless transformers'
    ``output_loading_info`` reports every weight loaded: missing or mismatched ones would start from random values."""
    missing = [k for k in info.get("missing_keys", []) if k]
    mismatched = [k for k, *_ in info.get("mismatched_keys", [])]
    if missing or mismatched:
        first = f"missing {missing[0]}" if missing else f"wrong shape at {mismatched[0]}"
        raise ValueError(f"{what}: its weights do not fit its config.json ({first}); it must hold {files}")


def check_prompts(prompts: Any, what: str = "prompts") -> List[str]:
    """``prompts`` as a list of non-empty strings; else one ``TypeError``/``ValueError`` line naming ``what``."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{what} must be a list of strings (one per image; wrap a single prompt as [prompt]); got {type(prompts).__name__}")
    if not prompts:
        raise ValueError(f"{what} is empty; give at least one prompt")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"{what}[{empty[0]}] is an empty prompt; write some text (for no negative prompt, pass none: "
                         "the model's cfg_uncond is used)")
    return list(prompts)


def check_feature_tensor(t: Any, name: str, ndim: int) -> None:
    """``TypeError``/``ValueError`` naming ``name`` unless ``t`` is a dense real floating tensor of ``ndim`` dims with data
    (not on the meta device)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor with {ndim} dims; got {type(t).__name__}")
    if t.layout != torch.strided or t.is_meta:
        raise ValueError(f"{name} must be a dense tensor with data; got a {t.layout} tensor on {t.device}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor; got dtype {t.dtype}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims; got shape {tuple(t.shape)}")
