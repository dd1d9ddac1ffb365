"""Image grids and PNG output (written atomically: whole or not at all)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .files import atomic_output


LAYOUTS = ("BHWC", "BCHW")


def to_uint8(images: torch.Tensor, layout: str = "BHWC", bgr: bool = False) -> np.ndarray:
    """Sampled images (B, C, H, W) in [0, 1] (what ``generate`` returns) as a uint8 NumPy array, rounded: ``layout``
    ``"BHWC"`` (B, H, W, C) or ``"BCHW"``; ``bgr=True`` reverses the 3 colour channels, so
    ``to_uint8(images, bgr=True)`` is upstream Infinity's output (uint8 BGR (B, H, W, 3), for OpenCV)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a floating-point (B, C, H, W) tensor in [0, 1]; got a {got}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(bgr, bool):
        raise TypeError(f"bgr must be True or False, got {type(bgr).__name__}")
    if bgr and images.shape[1] != 3:
        raise ValueError(f"bgr=True needs 3 colour channels; images have {images.shape[1]}")
    out = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    if bgr:
        out = out.flip(1)
    return (out.permute(0, 2, 3, 1) if layout == "BHWC" else out).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: Optional[int] = None, pad: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """(B, C, H, W) -> one (C, H', W') grid, ``nrow`` images per row (default: about square)."""
    B, C, H, W = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(B)))
    rows = math.ceil(B / nrow)
    grid = images.new_full((C, rows * (H + pad) + pad, nrow * (W + pad) + pad), pad_value)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = images[i]
    return grid


def side_by_side(grids: Sequence[torch.Tensor], gap: int = 8, pad_value: float = 1.0) -> torch.Tensor:
    """Concatenate (C, H, W) grids left to right with a gap; heights are padded to the tallest."""
    H = max(g.shape[1] for g in grids)
    parts: List[torch.Tensor] = []
    for i, g in enumerate(grids):
        if i:
            parts.append(g.new_full((g.shape[0], H, gap), pad_value))
        parts.append(torch.cat([g, g.new_full((g.shape[0], H - g.shape[1], g.shape[2]), pad_value)], dim=1))
    return torch.cat(parts, dim=2)


def save_png(image_CHW: torch.Tensor, path: Union[str, Path], upscale: int = 1) -> Path:
    """Save one (C, H, W) image in [0, 1] as PNG (nearest-neighbour ``upscale`` for small images), atomically."""
    path = Path(path)
    arr = to_uint8(image_CHW.unsqueeze(0))[0]
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    with atomic_output(path) as tmp:
        img.save(tmp, format="PNG")
    return path
