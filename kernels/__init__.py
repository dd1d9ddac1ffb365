"""Triton kernels of ssg-engine (installed as ``ssg_engine.kernels``), one op per module.

Each module holds the jit kernel, its launcher and the pure-PyTorch reference that
specifies it; the modules import without triton (only the launchers need it). Each
launcher builds a :class:`KernelLaunch` in one function (``*_launch``) that alone
chooses the kernel configuration; ``bench/aot_compile.py`` calls the same function on
meta tensors to compile every configuration ahead of time.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Tuple

import torch

from ssg_engine.backend import triton_interpreting


def jit(**options: Any) -> Callable[[Callable], Any]:
    """``triton.jit(**options)`` as a decorator; the plain function when triton is not installed."""
    try:
        import triton
    except ImportError:  # reference-only install: the launchers raise instead
        return lambda fn: fn
    return lambda fn: triton.jit(fn, **options)


def require_kernel_device(device: torch.device) -> None:
    """Raise ``ValueError`` unless a Triton kernel can run on ``device``."""
    if device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"the Triton kernels need CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 before "
            "importing triton to run them on the CPU interpreter"
        )


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """One launch of a jit kernel: ``kernel[grid](*args, **constexprs, num_warps=num_warps)``."""

    kernel: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    constexprs: Dict[str, Any]
    num_warps: int

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)
