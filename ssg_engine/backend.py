"""The one backend switch of ssg-engine.

``backend="auto" | "reference" | "triton"``; the environment variable
``SSG_ENGINE_BACKEND`` overrides whatever the caller passed. ``auto`` picks Triton
for CUDA tensors when Triton is importable, the PyTorch reference otherwise.
``TRITON_INTERPRET=1`` makes ``auto`` pick Triton on CPU too (that is how CI runs
the kernels).
"""
from __future__ import annotations

import functools
import os
from typing import Literal, Union

import torch

Backend = Literal["auto", "reference", "triton"]
BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "SSG_ENGINE_BACKEND"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works (the reference path never needs it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: Union[torch.device, str]) -> str:
    """Return ``"reference"`` or ``"triton"`` for tensors on ``device``."""
    chosen = os.environ.get(ENV_VAR, "").strip() or backend
    if chosen not in BACKENDS:
        source = f"environment variable {ENV_VAR}" if os.environ.get(ENV_VAR) else "backend"
        raise ValueError(f"unknown {source} {chosen!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if chosen == "auto":
        usable = triton_available() and (device.type == "cuda" or triton_interpreting())
        return "triton" if usable else "reference"
    if chosen == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was asked for but triton is not importable")
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
                "before importing triton to run the kernels on the CPU interpreter"
            )
    return chosen
