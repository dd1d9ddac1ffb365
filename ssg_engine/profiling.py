"""NVTX ranges that read well in ``nsys``; no-ops where NVTX is unavailable."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def _nvtx_usable() -> bool:
    return torch.cuda.is_available() and hasattr(torch.cuda, "nvtx")


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """``with nvtx_range("scale 3"):`` marks a range on CUDA builds, does nothing elsewhere."""
    if not _nvtx_usable():
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
