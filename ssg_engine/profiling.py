"""Named ranges that read well in ``nsys`` (NVTX) and in ``torch.profiler`` traces; free when neither is on."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def _nvtx_usable() -> bool:
    return torch.cuda.is_available() and hasattr(torch.cuda, "nvtx")


def _torch_profiler_on() -> bool:
    return bool(getattr(torch.autograd.profiler, "_is_profiler_enabled", False))


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """``with nvtx_range("scale 3"):`` marks an NVTX range on CUDA builds, and a ``record_function``
    range while ``torch.profiler`` is recording; otherwise it does nothing."""
    with contextlib.ExitStack() as stack:
        if _torch_profiler_on():
            stack.enter_context(torch.profiler.record_function(name))
        if _nvtx_usable():
            torch.cuda.nvtx.range_push(name)
            stack.callback(torch.cuda.nvtx.range_pop)
        yield
