"""Argument normalisation shared by every layer: one message shape for every bad number."""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Union

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
