"""Image grids (labelled ones for baseline-vs-SSG comparisons) and PNG output (written atomically: whole or not at all)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_output


LAYOUTS = ("BHWC", "BCHW")
GRID_PAD = 2  # pixels between and around the images of a grid


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


def make_grid(images: torch.Tensor, nrow: Optional[int] = None, pad: int = GRID_PAD, pad_value: float = 1.0) -> torch.Tensor:
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


def to_pil(image_CHW: torch.Tensor, upscale: int = 1) -> Image.Image:
    """One (C, H, W) image in [0, 1] (C = 1 or 3) as a PIL image (``"L"`` or ``"RGB"``), rounded as ``to_uint8``, with
    nearest-neighbour ``upscale`` (for small images)."""
    arr = to_uint8(image_CHW.unsqueeze(0))[0]
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    return img


def save_image(img: Image.Image, path: Union[str, Path]) -> Path:
    """Save a PIL image as PNG, atomically (a temporary file, then a rename)."""
    path = Path(path)
    with atomic_output(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def save_png(image_CHW: torch.Tensor, path: Union[str, Path], upscale: int = 1) -> Path:
    """Save one (C, H, W) image in [0, 1] as PNG (nearest-neighbour ``upscale`` for small images), atomically."""
    return save_image(to_pil(image_CHW, upscale), path)


LABEL_MARGIN = 4  # pixels around every label
LABEL_FONT_SIZE = 13  # PIL's default font at this size (its bitmap fallback, without FreeType, has one size)
LABEL_MAX_WIDTH = 240  # a longer row label is cut (with "...") at this many pixels


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont) -> str:
    """``text``, cut with "..." to fit ``width`` pixels in ``font``."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""


def labelled_grid(halves: Sequence[torch.Tensor], headers: Sequence[str], row_labels: Sequence[str], nrow: int,
                  upscale: int = 1, gap: int = 8) -> Image.Image:
    """Grids side by side with a header over each and a label left of each row, as one RGB image (PIL's default font).

    ``halves``: (B, C, H, W) images in [0, 1], the same B in each (e.g. baseline and SSG, same seeds); each becomes
    ``make_grid(half, nrow)`` (``ceil(B / nrow)`` rows), joined by ``side_by_side(..., gap)`` and upscaled
    (nearest-neighbour) by ``upscale``. Above it a white band with ``headers[i]`` centred over grid i; left of it a
    white column with ``row_labels[r]`` centred on grid row r (``len(row_labels)`` must be the number of rows; an
    empty list: no column). The image cells are unchanged: the joined grid sits at the bottom-right corner, its
    pixels exactly ``to_pil(side_by_side(grids), upscale)``'s. A label too wide for its place is cut with "..."."""
    if len(headers) != len(halves):
        raise ValueError(f"headers: one per grid ({len(halves)}), got {len(headers)}")
    grids = [make_grid(h, nrow) for h in halves]
    B, _, H, _ = halves[0].shape
    rows = math.ceil(B / nrow)
    if row_labels and len(row_labels) != rows:
        raise ValueError(f"row_labels: one per grid row ({rows}), got {len(row_labels)}")
    body = to_pil(side_by_side(grids, gap=gap), upscale).convert("RGB")
    font = ImageFont.load_default(size=LABEL_FONT_SIZE)
    measure = ImageDraw.Draw(body)
    left, top, _, bottom = measure.textbbox((0, 0), "Ag", font=font)
    line = bottom - top
    band = line + 2 * LABEL_MARGIN
    column = 0
    if row_labels:
        column = min(LABEL_MAX_WIDTH, max(math.ceil(measure.textlength(t, font=font)) for t in row_labels)) + 2 * LABEL_MARGIN
    canvas = Image.new("RGB", (column + body.width, band + body.height), "white")
    canvas.paste(body, (column, band))
    draw = ImageDraw.Draw(canvas)
    x = column
    for grid, header in zip(grids, headers):
        width = grid.shape[2] * upscale
        text = _fit(draw, header, width - 2 * LABEL_MARGIN, font)
        draw.text((x + (width - draw.textlength(text, font=font)) / 2, LABEL_MARGIN - top), text, fill="black", font=font)
        x += width + gap * upscale
    for r, label in enumerate(row_labels):
        centre = band + (GRID_PAD + r * (H + GRID_PAD) + H / 2) * upscale
        draw.text((LABEL_MARGIN, centre - line / 2 - top), _fit(draw, label, column - 2 * LABEL_MARGIN, font), fill="black", font=font)
    return canvas
