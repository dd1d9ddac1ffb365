"""Argument normalisation shared by every layer: one message shape for every bad number."""
from __future__ import annotations

import math
import numbers
import os
import sys
from typing import Any, Callable, NoReturn, Union

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
