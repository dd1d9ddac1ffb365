"""Infinity transformer (text-to-image, bitwise next-scale prediction), state-dict compatible with upstream
FoundationVision/Infinity (commit 4c27bbb5, ``infinity_*.pth``).

Shapes: ``B`` images, ``L`` tokens over all scales of a schedule, ``C`` width, ``d`` bits per token (the BSQ
codebook dim), ``Ct5`` text-feature width, ``N`` packed text tokens (sum of the prompt lengths). The head predicts
2 logits per bit: ``(B, L, 2d)``, bit ``k`` of a token at ``[..., 2k:2k+2]`` (reshape to ``(B, L, d, 2)``).

Upstream behaviour reproduced on purpose (see ``tests/golden/infinity/README.md``):

* the cross-attention (every block's and the text attentive pool's) rounds its float32 q, k, v to bfloat16,
  attends in float32 per packed sequence, and rounds the output to bfloat16 (upstream's flash-attn varlen call);
* 2-D RoPE at positions normalised by the last scale of the ratio's ``1M`` schedule (``rope2d_normalized_by_hw=2``);
* ``fused_norm=True`` (released): the KV-cached step applies RoPE at each scale's own positions; with
  ``fused_norm=False`` upstream's cached sampler slices the RoPE table from position 0 at every scale, and
  :meth:`InfinityTransformer.step` does the same (teacher forcing is unaffected).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers
import re
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import ops
from ...kernels.qkv_norm_rope_cache import qkv_norm_rope_reference
from ...models.family import KVStore, cast_copy
from ...models.layers import FFN
from ...validation import as_number, check_feature_tensor, normalise_fields
from .tokenizer import BSQVAE, accumulate_codes, bits_to_codes

# ---------------------------------------------------------------------------------------------- scale schedules

# h/w ratio -> (h, w) of the 13 scales of upstream's dynamic-resolution table (ratios < 1 are the transposes)
_RATIO_HWS: Dict[float, List[Tuple[int, int]]] = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)],
}
# total-pixel name -> number of scales
PIXEL_SCALES: Dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
MAX_SCALES = 13


def _ratio_table() -> Dict[float, List[Tuple[int, int]]]:
    table = {}
    for ratio, hws in _RATIO_HWS.items():
        table[ratio] = hws
        if ratio != 1.0:
            table[int(1 / ratio * 1000) / 1000] = [(w, h) for h, w in hws]
    return table


RATIO_TABLE = _ratio_table()
Schedule = Tuple[Tuple[int, int], ...]


def scale_schedule(h_div_w: float, pn: Union[str, int] = "1M") -> Schedule:
    """(h, w) of every scale of upstream's table for ratio ``h_div_w`` (a table key up to 1e-3) and ``pn``: a total-pixel
    name of upstream's (``"0.06M"``, ``"0.25M"``, ``"0.60M"``, ``"1M"``) or a number of scales (the table row's first ``pn``
    scales, for models trained on smaller images, e.g. 5 scales = an 8x8 latent)."""
    h_div_w = as_number(h_div_w, "h_div_w", f"a finite number, one of Infinity's ratios {sorted(RATIO_TABLE)}")
    ratio = min(RATIO_TABLE, key=lambda r: abs(r - h_div_w))
    if abs(ratio - h_div_w) > 1e-3:
        raise ValueError(f"h_div_w={h_div_w} is not in Infinity's table; use one of {sorted(RATIO_TABLE)}")
    if isinstance(pn, numbers.Integral) and not isinstance(pn, bool):
        pn = int(pn)
        if not 1 <= pn <= MAX_SCALES:
            raise ValueError(f"pn={pn} scales: use 1 to {MAX_SCALES} or one of {list(PIXEL_SCALES)}")
        return tuple(RATIO_TABLE[ratio][:pn])
    if not isinstance(pn, str) or pn not in PIXEL_SCALES:
        raise ValueError(f"pn={pn!r} is not in Infinity's table; use one of {list(PIXEL_SCALES)} or a number of scales")
    return tuple(RATIO_TABLE[ratio][: PIXEL_SCALES[pn]])


# every table schedule (any prefix of a ratio's row) -> (h, w) of the last scale of its ratio's 1M schedule (the RoPE
# normalisation; upstream's schedules are the prefixes of PIXEL_SCALES' lengths)
_ROPE_EXTENT: Dict[Schedule, Tuple[int, int]] = {
    tuple(hws[:n]): hws[MAX_SCALES - 1] for hws in RATIO_TABLE.values() for n in range(1, MAX_SCALES + 1)
}


def as_schedule(schedule: Sequence[Sequence[int]]) -> Schedule:
    """Normalise (h, w) or upstream's (t=1, h, w) entries to a tuple of (h, w); it must be a prefix of a table row."""
    out = []
    for i, s in enumerate(schedule):
        if isinstance(s, (str, bytes)) or not isinstance(s, (Sequence, torch.Tensor)) or len(s) not in (2, 3):
            raise ValueError(f"schedule[{i}] must be (h, w) or (1, h, w); got {s!r}")
        s = [as_number(n, f"schedule[{i}]", "(h, w) or (1, h, w) of integers", integer=True) for n in s]
        if len(s) == 3:
            if s[0] != 1:
                raise ValueError(f"scale {tuple(s)}: only images (t = 1) are supported")
            s = s[1:]
        out.append((s[0], s[1]))
    sched = tuple(out)
    if sched not in _ROPE_EXTENT:
        raise ValueError(f"scale schedule {sched} is not one of Infinity's dynamic-resolution table; use scale_schedule(h_div_w, pn)")
    return sched


def rope_tables(schedule: Schedule, head_dim: int, grid: int = 128, base: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, head_dim/2) of the 2-D RoPE for every token of ``schedule`` (float32): rotated pair ``i`` of a
    head uses the height frequency ``i`` for ``i < head_dim/4``, else the width frequency ``i - head_dim/4``."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    freqs = torch.outer(torch.arange(grid, dtype=torch.int64).float(), inv_freq)  # (grid, half/2)
    H1, W1 = _ROPE_EXTENT[schedule]
    parts = []
    for h, w in schedule:
        ih = (torch.arange(h) * (H1 / h)).round().int()
        iw = (torch.arange(w) * (W1 / w)).round().int()
        parts.append(torch.cat((freqs[ih][:, None].expand(h, w, -1), freqs[iw][None].expand(h, w, -1)), dim=-1).reshape(h * w, half))
    angles = torch.cat(parts)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x (..., l, head_dim) by cos/sin (l, head_dim/2)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1).reshape(x.shape)


# ---------------------------------------------------------------------------------------------- text features


@dataclasses.dataclass
class TextFeatures:
    """Text-encoder features of B prompts, packed: ``kv_compact`` (N, Ct5) float, ``lens`` (B,) prompt lengths
    (each >= 1), ``cu_seqlens`` (B + 1,) int32 cumulative offsets (upstream's ``(kv_compact, lens, cu_seqlens_k,
    max_seqlen_k)``)."""

    kv_compact: torch.Tensor
    lens: List[int]

    def __post_init__(self) -> None:
        check_feature_tensor(self.kv_compact, "text kv_compact", 2)
        self.lens = prompt_lengths(self.lens)

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return F.pad(torch.tensor(self.lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))

    @property
    def batch(self) -> int:
        return len(self.lens)

    def __getitem__(self, rows: slice) -> "TextFeatures":
        """The prompts ``rows`` (a step-1 slice), packed."""
        taken = range(self.batch)[rows]
        if taken.step != 1:
            raise ValueError("TextFeatures rows: only step-1 slices")
        starts = [0, *itertools.accumulate(self.lens)]
        return TextFeatures(self.kv_compact[starts[taken.start] : starts[taken.stop]], self.lens[rows])

    def pad_rows(self, b: int) -> "TextFeatures":
        """These prompts padded to ``b`` with one-token zero prompts (no row attends to nothing)."""
        kv = self.kv_compact
        return TextFeatures(torch.cat((kv, kv.new_zeros(b - self.batch, kv.shape[1]))), self.lens + [1] * (b - self.batch))

    @classmethod
    def from_padded(cls, features: torch.Tensor, mask: torch.Tensor) -> "TextFeatures":
        """From padded features (B, T, Ct5) and a boolean mask (B, T) of valid tokens (a prefix of each row)."""
        check_feature_tensor(features, "text features", 3)
        if not isinstance(mask, torch.Tensor) or mask.is_meta or mask.layout != torch.strided:
            raise TypeError(f"text mask must be a dense torch.Tensor (B, T) of bool, True on each prompt's tokens; got "
                            f"{type(mask).__name__ if not isinstance(mask, torch.Tensor) else f'a {mask.layout} tensor on {mask.device}'}")
        if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
            raise TypeError(f"text mask must be bool (True on each prompt's tokens); got dtype {mask.dtype}")
        if mask.shape != features.shape[:2]:
            raise ValueError(f"padded text: features must be (B, T, Ct5) and mask (B, T); got {tuple(features.shape)}, {tuple(mask.shape)}")
        mask = mask.bool()
        lens = mask.sum(1)
        if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device)[None] < lens[:, None]):
            raise ValueError("padded text: each row's mask must be a prefix of valid tokens (True, ..., False, ...)")
        return cls(features[mask], [int(n) for n in lens.tolist()])

    @classmethod
    def coerce(cls, text: Any) -> "TextFeatures":
        """TextFeatures, upstream's 4-tuple ``(kv_compact, lens, cu_seqlens_k, max_seqlen_k)`` or ``(features, mask)``."""
        if isinstance(text, TextFeatures):
            out = text
        elif isinstance(text, (tuple, list)) and len(text) == 4:
            kv, lens, cu, _ = text
            out = cls(kv, lens)
            try:
                cu_ok = [int(c) for c in (cu.tolist() if isinstance(cu, torch.Tensor) else cu)] == [0, *itertools.accumulate(out.lens)]
            except (TypeError, ValueError, RuntimeError):
                cu_ok = False
            if not cu_ok:
                raise ValueError("text: cu_seqlens_k does not match lens (it must be 0, then their running sums)")
        elif isinstance(text, (tuple, list)) and len(text) == 2:
            features, mask = text
            if isinstance(features, torch.Tensor) and features.ndim == 2 and isinstance(mask, torch.Tensor) and mask.ndim == 1:
                raise ValueError("text: (kv_compact (N, Ct5), lens) is not a form taken; a pair is (features (B, T, Ct5), mask (B, T)), "
                                 "packed features are TextFeatures(kv_compact, lens) or (kv_compact, lens, cu_seqlens_k, max_seqlen_k)")
            out = cls.from_padded(features, mask)
        else:
            raise TypeError("text must be TextFeatures, (kv_compact, lens, cu_seqlens_k, max_seqlen_k) or (features, mask)")
        if not out.lens or min(out.lens) < 1:
            raise ValueError(f"text: need at least one prompt, each with at least one token; got lens {out.lens}")
        if out.kv_compact.shape[0] != sum(out.lens):
            raise ValueError(f"text: kv_compact must be (sum(lens)={sum(out.lens)}, Ct5); got {tuple(out.kv_compact.shape)}")
        if not bool(torch.isfinite(out.kv_compact).all()):
            raise ValueError("text: the features hold NaN or inf; encode the prompts again")
        return out


def prompt_lengths(lens: Any) -> List[int]:
    """``lens`` (a list of ints, or a 1-D integer tensor or NumPy array) as a list of Python ints, each >= 1; one
    ``TypeError``/``ValueError`` line naming ``lens`` otherwise (a bool tensor is a key mask, not lengths)."""
    if isinstance(lens, torch.Tensor) or type(lens).__module__ == "numpy":
        try:
            t = torch.as_tensor(lens)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"text lens must be integer prompt lengths; got an array of {getattr(lens, 'dtype', '?')}") from None
        if t.dtype == torch.bool:
            raise ValueError("text lens must be each prompt's token count (B,), not a key mask; for padded features pass (features, mask)")
        if t.is_meta or t.is_floating_point() or t.is_complex() or t.ndim != 1:
            raise ValueError(f"text lens must be a 1-D integer tensor of prompt lengths; got dtype {t.dtype}, shape {tuple(t.shape)} on {t.device}")
        lens = t.tolist()
    if isinstance(lens, (str, bytes)) or not isinstance(lens, (list, tuple)):
        raise TypeError(f"text lens must be a list of prompt lengths (one int per prompt); got {type(lens).__name__}")
    return [as_number(n, f"text lens[{i}]", "a prompt length (an integer >= 1)", integer=True, valid=lambda v: v >= 1)
            for i, n in enumerate(lens)]


def varlen_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: Sequence[int], scale: float) -> torch.Tensor:
    """Upstream's flash-attn varlen cross-attention in float32: q (B, Lq, H, hd), k/v (N, H, hd) packed by ``lens``
    -> (B, Lq, H*hd). Inputs and output are rounded to bfloat16 (and back), each row attends to its own prompt."""
    B, Lq, H, hd = q.shape
    q = q.to(torch.bfloat16).float().transpose(1, 2)  # B H Lq hd
    k, v = k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float()
    outs = []  # one prompt at a time; split/stack (no slice assignment) keeps training's backward cheap
    for qb, kb, vb in zip(q.unbind(0), k.split(list(lens)), v.split(list(lens))):
        p = torch.softmax(torch.matmul(qb, kb.permute(1, 2, 0)) * scale, dim=-1)
        outs.append(torch.matmul(p, vb.transpose(0, 1)))
    return torch.stack(outs).transpose(1, 2).to(torch.bfloat16).float().reshape(B, Lq, H * hd)


# ---------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class InfinityConfig:
    """Architecture of an Infinity transformer (upstream ``Infinity(...)`` keyword names)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    text_channels: int
    text_maxlen: int
    codebook_dim: int
    block_chunks: int = 1
    norm_eps: float = 1e-6
    shared_aln: bool = True
    cross_attn_layer_scale: float = -1.0
    fused_norm: bool = True
    add_lvl_embeding_only_first_block: int = 1
    pad_to_multiplier: int = 1  # teacher forcing only (see InfinityTransformer.forward)
    # default number of scales of a sampling schedule (scale_schedule's pn); None: unknown (a checkpoint's shapes do
    # not tell it), so every sampling call must give its schedule
    num_scales: Optional[int] = MAX_SCALES

    # upstream options whose released value is the only one implemented here
    _FIXED = dict(head_aln=True, cos_attn=True, swiglu=False, rms_norm=False, nm0=False, tau=1, head_depth=1,
                  use_bit_label=1, rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, apply_spatial_patchify=0,
                  customized_flash_attn=False, fused_mlp=False)
    # upstream Infinity(...) keywords that do not change sampling here (training, attention backend; pn, its schedule,
    # gives num_scales)
    _UPSTREAM_ONLY = ("vae_local", "selecting_idx", "drop_rate", "drop_path_rate", "cond_drop_rate", "rand_uncond", "raw_scale_schedule",
                      "top_p", "top_k", "checkpointing", "use_flex_attn", "batch_size", "pn", "train_h_div_w_list", "video_frames",
                      "always_training_scales", "inference_mode")

    def __post_init__(self) -> None:
        problems = normalise_fields(self)
        if not problems:
            positive = ("embed_dim", "depth", "num_heads", "mlp_ratio", "text_channels", "text_maxlen", "codebook_dim", "block_chunks",
                        "norm_eps", "pad_to_multiplier")
            problems += [f"{name} must be > 0 (got {getattr(self, name)})" for name in positive if getattr(self, name) <= 0]
            if self.num_scales is not None and not 1 <= self.num_scales <= MAX_SCALES:
                problems.append(f"num_scales must be 1 to {MAX_SCALES} or null (got {self.num_scales})")
        if not problems and (self.embed_dim % self.num_heads or self.head_dim % 4):
            problems.append(f"embed_dim={self.embed_dim} must be num_heads={self.num_heads} x a head width divisible by 4 (2-D RoPE)")
        if not problems and self.depth % self.block_chunks:
            problems.append(f"depth={self.depth} is not divisible by block_chunks={self.block_chunks}")
        if problems:
            raise ValueError("invalid Infinity config: " + "; ".join(problems))

    @classmethod
    def from_upstream(cls, kwargs: Mapping[str, Any], codebook_dim: int, base: Optional["InfinityConfig"] = None) -> "InfinityConfig":
        """From upstream ``Infinity(**kwargs)`` keywords or ``InfinityConfig`` fields (e.g. a golden ``config.json``'s
        ``infinity``) and the VAE's d: over ``base`` (e.g. the checkpoint's ``from_state_dict``), so a partial mapping
        overrides only what it gives; without ``base`` every field without a default is required. Unknown keys, and
        options other than the released ones, are a ``ValueError``."""
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"Infinity config must be a mapping of InfinityConfig fields, got {type(kwargs).__name__}")
        for name, value in cls._FIXED.items():
            if name in kwargs and kwargs[name] != value:
                raise ValueError(f"Infinity option {name}={kwargs[name]!r} is not supported (only {value!r})")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in kwargs if k not in fields and k not in cls._FIXED and k not in cls._UPSTREAM_ONLY)
        if unknown:
            raise ValueError(f"unknown Infinity config field(s) {unknown}; known fields: {list(fields)}")
        if kwargs.get("codebook_dim", codebook_dim) != codebook_dim:
            raise ValueError(f"Infinity config: codebook_dim={kwargs['codebook_dim']!r}, but the VAE has codebook_dim {codebook_dim}; "
                             "drop it (it is the VAE's) or give the VAE the model was trained with")
        given = {k: v for k, v in kwargs.items() if k in fields and k != "codebook_dim"}
        if "num_scales" not in given and kwargs.get("pn") is not None:  # upstream's schedule name: the model's scales
            if not isinstance(kwargs["pn"], str) or kwargs["pn"] not in PIXEL_SCALES:
                raise ValueError(f"Infinity config: pn={kwargs['pn']!r} is not one of {list(PIXEL_SCALES)}; fix it or give num_scales")
            given["num_scales"] = PIXEL_SCALES[kwargs["pn"]]
        if base is None:
            missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in given and n != "codebook_dim"]
            if missing:
                raise ValueError(f"Infinity config: missing field(s) {missing}; give them (or load a checkpoint, whose shapes give them)")
            return cls(codebook_dim=codebook_dim, **given)
        return dataclasses.replace(base, codebook_dim=codebook_dim, **given)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @classmethod
    def preset(cls, name: str, codebook_dim: int = 32) -> "InfinityConfig":
        """A released configuration (``INFINITY_PRESETS``), with the VAE's ``codebook_dim`` (32: ``infinity_vae_d32reg``)."""
        if name in UNSUPPORTED_PRESETS:
            raise ValueError(f"Infinity preset {name!r}: {UNSUPPORTED_PRESETS[name]}; use one of {', '.join(INFINITY_PRESETS)}")
        if name not in INFINITY_PRESETS:
            raise ValueError(f"unknown Infinity preset {name!r}; use one of {', '.join(INFINITY_PRESETS)}")
        return dataclasses.replace(INFINITY_PRESETS[name], codebook_dim=codebook_dim)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], codebook_dim: Optional[int] = None) -> "InfinityConfig":
        """The config an upstream ``infinity_*.pth`` state dict's shapes determine (``INFINITY_SHAPE_FIELDS``; every
        other field takes the released value). ``codebook_dim``, if given (the VAE's d), must equal the checkpoint's."""
        missing = [k for k in ("cfg_uncond", "pos_start", "word_embed.weight", "head.weight") if k not in sd]
        if missing:
            raise ValueError(f"not an Infinity state dict: {', '.join(repr(k) for k in missing)} missing")
        flat = sorted({int(m.group(1)) for m in map(_BLOCK_KEY.match, sd) if m})
        chunked: Dict[int, set] = {}
        for m in filter(None, map(_CHUNK_KEY.match, sd)):
            chunked.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        if bool(flat) == bool(chunked):
            raise ValueError("Infinity state dict: need blocks as either 'blocks.{i}.' or 'block_chunks.{i}.module.{j}.' keys (found "
                             + ("both" if flat else "neither") + ")")
        if flat:
            depth, block_chunks, first = len(flat), 1, "blocks.0."
        else:
            sizes = {len(js) for js in chunked.values()}
            if len(sizes) != 1 or len(chunked) < 2:
                raise ValueError(f"Infinity state dict: block chunks must be 2 or more of equal size; found sizes {[len(chunked[i]) for i in sorted(chunked)]}")
            depth, block_chunks, first = sizes.pop() * len(chunked), len(chunked), "block_chunks.0.module.0."
        C = _stored_shape(sd, "pos_start", 3)[-1]
        d = _stored_shape(sd, "word_embed.weight", 2)[1]
        if _stored_shape(sd, "head.weight", 2) != (2 * d, C):
            raise ValueError(f"Infinity state dict: head.weight is {tuple(sd['head.weight'].shape)}, expected (2 x {d} bits, {C}); only bit labels are supported")
        if codebook_dim is not None and codebook_dim != d:
            raise ValueError(f"the Infinity checkpoint predicts d = {d} bits per token but codebook_dim = {codebook_dim}; use the VAE with d = {d}")
        hidden = _stored_shape(sd, first + "ffn.fc1.weight", 2)[0]
        if hidden % 256:
            raise ValueError(f"Infinity state dict: FFN width {hidden} is not a multiple of 256 (upstream rounds embed_dim x mlp_ratio to one)")
        Ct5_maxlen = _stored_shape(sd, "cfg_uncond", 2)
        return cls(
            embed_dim=C, depth=depth, num_heads=_stored_shape(sd, first + "sa.scale_mul_1H11", 4)[1],
            mlp_ratio=4.0 if round(C * 4 / 256) * 256 == hidden else hidden / C,  # the released ratio where it fits
            text_channels=Ct5_maxlen[1], text_maxlen=Ct5_maxlen[0], codebook_dim=d, block_chunks=block_chunks,
            shared_aln="shared_ada_lin.1.weight" in sd,
            cross_attn_layer_scale=1.0 if first + "ca_gamma" in sd else -1.0,  # only >= 0 (gammas stored) matters
            pad_to_multiplier=128,  # upstream's load_infinity
            num_scales=None,  # the shapes do not tell the schedule the model was trained on
        )

    def matching_presets(self) -> List[str]:
        """Names of the presets with this config's ``INFINITY_SHAPE_FIELDS`` (any ``codebook_dim``)."""
        fields = [f for f in INFINITY_SHAPE_FIELDS if f != "codebook_dim"]
        return [name for name, p in INFINITY_PRESETS.items() if all(getattr(p, f) == getattr(self, f) for f in fields)]


def _stored_shape(sd: Mapping[str, Any], key: str, ndim: int) -> Tuple[int, ...]:
    """The shape of tensor ``sd[key]``, which must have ``ndim`` dims; one ``ValueError`` line naming ``key`` otherwise."""
    t = sd.get(key)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"Infinity state dict: {key!r} is missing; the checkpoint is damaged or not an upstream infinity_*.pth")
    if t.ndim != ndim:
        raise ValueError(f"Infinity state dict: {key!r} has shape {tuple(t.shape)}, expected {ndim} dims; the checkpoint is damaged")
    return tuple(t.shape)


_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")
_CHUNK_KEY = re.compile(r"block_chunks\.(\d+)\.module\.(\d+)\.")
# the fields a checkpoint's shapes determine (InfinityConfig.from_state_dict)
INFINITY_SHAPE_FIELDS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "text_channels", "text_maxlen", "codebook_dim",
                         "block_chunks", "shared_aln")


def _released(depth: int, embed_dim: int, num_heads: int, block_chunks: int) -> InfinityConfig:
    """Upstream ``load_infinity``'s fixed arguments (Flan-T5-XL features 2048 x 512 tokens, shared AdaLN, padding to
    128) with a ``load_transformer`` model type's shape; d = 32 bits (``infinity_vae_d32reg.pth``)."""
    return InfinityConfig(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0, text_channels=2048,
                          text_maxlen=512, codebook_dim=32, block_chunks=block_chunks, shared_aln=True, pad_to_multiplier=128)


# upstream tools/run_infinity.py load_transformer's model types (infinity_2b_reg.pth is the released 2B checkpoint)
INFINITY_PRESETS: Dict[str, InfinityConfig] = {
    "infinity_2b": _released(32, 2048, 16, 8),
    "infinity_layer12": _released(12, 768, 8, 4),
    "infinity_layer16": _released(16, 1152, 12, 4),
    "infinity_layer24": _released(24, 1536, 16, 4),
    "infinity_layer32": _released(32, 2080, 20, 4),
    "infinity_layer40": _released(40, 2688, 24, 4),
    "infinity_layer48": _released(48, 3360, 28, 4),
}
UNSUPPORTED_PRESETS: Dict[str, str] = {
    "infinity_8b": "Infinity-8B (depth 40, width 3584) predicts 56 bits = 4 x 14 with spatial patchify "
                   "(apply_spatial_patchify=1, infinity_vae_d56_f8_14_patchify.pth), which is not supported",
}


# ---------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """Upstream's ``FastRMSNorm`` (float32, learned weight)."""

    def __init__(self, C: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return ((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(self.eps))) * self.weight).to(x.dtype)


def ada_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, backend: str = "reference") -> torch.Tensor:
    """LayerNorm without affine in float32, then ``* (1 + scale) + shift``: x (B, l, C), scale/shift (B, 1, C); in
    autocast's dtype when autocast is on (the dtype the next linear layer casts it to), else float32."""
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return ops.ada_ln_modulate(x.float(), scale, shift, eps, out_dtype=out_dtype, backend=backend)


class SelfAttention(nn.Module):
    """Cosine self-attention (L2-normalised q/k, learned per-head scale) with 2-D RoPE after the normalisation."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.max_scale_mul = math.log(100)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def constants(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The packed (q, 0, v) bias (3C,) and the per-head q scale (1, H, 1, 1): what :meth:`qkv` derives from the
        weights alone (a sampler computes them once per batch)."""
        return torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)), self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()

    def qkv_linear(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, l, C) -> the packed q, k, v (B, l, 3C), ``bias`` from :meth:`constants` included."""
        return F.linear(x, self.mat_qkv.weight, bias)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, l, C), cos/sin (l, head_dim/2) -> q, k, v (B, H, l, head_dim), normalised, scaled and rotated."""
        bias, scale_mul = self.constants()
        q, k, v = qkv_norm_rope_reference(self.qkv_linear(x, bias), self.num_heads, scale_mul, (cos, sin))
        return q, k, v.contiguous()  # as upstream (the attention kernels' summation follows the layout)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """q (B, H, l, hd), k/v (B, H, S, hd), additive mask (l, S) or None -> attention output before ``proj`` (B, l, C)."""
        B, _, l, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return out.transpose(1, 2).reshape(B, l, -1)


class CrossAttention(nn.Module):
    """Attention of queries to packed text tokens (upstream's ``CrossAttention``; bf16 rounding as upstream).

    With ``for_attn_pool`` the query is one learned vector per head (``mat_q`` (1, H, hd)) and the output one token.
    """

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, for_attn_pool: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        self.for_attn_pool = for_attn_pool
        if for_attn_pool:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def kv(self, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Text (N, kv_dim) packed or (B, T, kv_dim) padded -> keys, values (N, H, hd) or (B, T, H, hd)."""
        kv = F.linear(text, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        return kv.view(*text.shape[:-1], 2, self.num_heads, self.head_dim).unbind(-3)

    def forward(self, x: Optional[torch.Tensor], kv: Tuple[torch.Tensor, torch.Tensor], lens: Union[Sequence[int], torch.Tensor]) -> torch.Tensor:
        """x (B, l, C) (None for the pool), keys/values from :meth:`kv` -> (B, l, C) (the pool: (B, 1, C)). ``lens``: the
        prompt lengths of packed keys/values, or the key mask (B, T) of padded ones (:func:`masked_cross_attention`)."""
        if self.for_attn_pool:
            q = self.mat_q.to(kv[0].dtype).repeat(len(lens), 1, 1).unsqueeze(1)
        else:
            q = self.mat_q(x).view(x.shape[0], x.shape[1], self.num_heads, self.head_dim)
        attend = masked_cross_attention if torch.is_tensor(lens) else varlen_cross_attention
        return self.proj(attend(q, kv[0], kv[1], lens, self.scale))


class TextAttentivePool(nn.Module):
    """The text condition (B, D) pooled from packed features by one learned query (upstream ``text_proj_for_sos``)."""

    def __init__(self, Ct5: int, D: int) -> None:
        super().__init__()
        head_dim = 64 if D > 4096 else 128
        self.ca = CrossAttention(D, Ct5, Ct5 // head_dim, for_attn_pool=True)

    def forward(self, text: torch.Tensor, lens: Sequence[int]) -> torch.Tensor:
        return self.ca(None, self.ca.kv(text), lens).squeeze(1)


class CrossAttnBlock(nn.Module):
    """AdaLN self-attention (RoPE), LayerNorm cross-attention to the text, AdaLN FFN; upstream parameter names."""

    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.C, self.eps = C, cfg.norm_eps
        self.sa = SelfAttention(C, cfg.num_heads)
        self.ca = CrossAttention(C, C, cfg.num_heads)
        self.ffn = FFN(C, cfg.ffn_hidden)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.shared_aln = cfg.shared_aln
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.ca_gamma: Union[nn.Parameter, float]
        if cfg.cross_attn_layer_scale >= 0:
            self.ca_gamma = nn.Parameter(torch.full((C,), cfg.cross_attn_layer_scale))
        else:
            self.ca_gamma = 1.0

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """(gamma1, gamma2, scale1, scale2, shift1, shift2) as (B, 1, 6, C) from the shared projection (B, 1, 6, C)
        (``shared_aln``) or the text condition (B, D)."""
        if self.shared_aln:
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.C)

    def forward(
        self, x: torch.Tensor, mod: torch.Tensor, self_attn: Any, ca_kv: Tuple[torch.Tensor, torch.Tensor], lens: Sequence[int],
        backend: str = "reference",
    ) -> torch.Tensor:
        """x (B, l, C); ``self_attn`` maps the normalised x to the self-attention output before ``proj`` (B, l, C).
        The fused ops (``backend``: the sampler's) reproduce upstream's eager sequence with the reference backend,
        including its roundings: the attention's gate multiplies in place (``round_gated``), the FFN's does not."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        sa, ffn = self.sa, self.ffn
        h = self_attn(ada_layer_norm(x, scale1, shift1, self.eps, backend))
        x = ops.matmul_gated_residual(x, h, sa.proj.weight, sa.proj.bias, gamma1, round_gated=True, backend=backend)
        x = x + self.ca(self.ca_norm(x), ca_kv, lens).float().mul_(self.ca_gamma)
        h = ops.matmul_gelu(ada_layer_norm(x, scale2, shift2, self.eps, backend), ffn.fc1.weight, ffn.fc1.bias, backend=backend)
        return ops.matmul_gated_residual(x, h, ffn.fc2.weight, ffn.fc2.bias, gamma2, round_gated=False, backend=backend)


class BlockChunk(nn.Module):
    """Upstream's ``MultipleLayers`` container (state-dict keys ``block_chunks.{i}.module.{j}``)."""

    def __init__(self, blocks: Sequence[CrossAttnBlock]) -> None:
        super().__init__()
        self.module = nn.ModuleList(blocks)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, eps: float) -> None:
        super().__init__()
        self.C, self.eps = C, eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def modulation(self, cond_BD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """scale, shift (B, 1, C) from the condition (B, D)."""
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return scale, shift

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, backend: str = "reference") -> torch.Tensor:
        return ada_layer_norm(x, *self.modulation(cond_BD), self.eps, backend)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).reshape(-1, 1, 6, self.weight.shape[0] // 6)


# ---------------------------------------------------------------------------------------------- model


@dataclasses.dataclass
class InfinityState:
    """One batch's sampling state: ``rows`` = B (no CFG) or 2B (conditional rows, then unconditional/negative).

    ``x`` is the current scale's input (rows, h*w, C) without the level embedding; ``summed_codes`` (B, d, 1, H, W)
    the accumulated BSQ codes at the last scale's size (channels-last like upstream's, so that the interpolations
    and the next input's embedding run the same kernels); ``cfg_list``/``cfg_layers`` the CFG mixing applied at the
    output of the listed (absolute) layers inside :meth:`InfinityTransformer.step`; ``cfg_on_logits``: whether the
    caller mixes the logits (then ``step`` returns both halves at scales with cfg != 1); ``cfg_weights``: None (mix
    with ``cfg_list``'s numbers) or device tensors (w_k, 1 - w_k), each (K,), that a captured graph reads instead.
    """

    batch: int
    rows: int
    schedule: Schedule
    cond_BD: torch.Tensor  # (rows, D)
    modulations: List[torch.Tensor]  # per block (rows, 1, 6, C)
    attn_constants: List[Tuple[torch.Tensor, torch.Tensor]]  # per block: SelfAttention.constants()
    ca_kv: List[Tuple[torch.Tensor, torch.Tensor]]  # per block: keys, values (N, H, hd), or (rows, T, H, hd) padded
    lens: Union[List[int], torch.Tensor]  # prompt lengths, or the key mask (rows, T) of padded text
    rope: Tuple[torch.Tensor, torch.Tensor]  # cos, sin (L, hd/2)
    x: torch.Tensor
    summed_codes: torch.Tensor
    cfg_list: Sequence[float]
    cfg_layers: Tuple[int, ...]
    cfg_on_logits: bool
    cfg_weights: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


class InfinityTransformer(nn.Module):
    """Text-conditional bitwise next-scale-prediction transformer; upstream attribute names and state dict.

    Sampling follows :mod:`ssg_engine.models.family` with these differences: the scale schedule is per batch
    (``condition(text, schedule, ...)``, then ``state.schedule``; ``cache_layout(schedule)``); ``step`` returns bit
    logits (2B or B, h*w, d, 2) (see :meth:`step`) and applies CFG inserted at layer outputs itself; ``next_input`` takes bits
    (B, h*w, d); ``decode(state, vae)`` takes the BSQ VAE (anything with ``decode(z)``). :class:`InfinityRequest` binds
    it to one call's settings as the samplers' :class:`ssg_engine.models.family.NextScaleModel`.
    """

    # The model card's SSG strength where it sets one (``SSG.for_model``: what ``SSG()`` without beta uses); None: 0.5.
    ssg_beta: Optional[float] = None

    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        self.config = cfg
        C = self.C = self.D = cfg.embed_dim
        self.d = cfg.codebook_dim
        self.depth, self.num_heads, self.Ct5 = cfg.depth, cfg.num_heads, cfg.text_channels
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, cfg.text_channels))
        self.text_norm = RMSNorm(cfg.text_channels, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(cfg.text_channels, C)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(cfg.text_channels, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.lvl_embed = nn.Embedding(15, C)
        self.word_embed = nn.Linear(self.d, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if cfg.shared_aln else nn.Identity()
        blocks = [CrossAttnBlock(cfg) for _ in range(cfg.depth)]
        self.chunked = cfg.block_chunks > 1
        if self.chunked:
            n = cfg.depth // cfg.block_chunks
            self.block_chunks = nn.ModuleList([BlockChunk(blocks[i : i + n]) for i in range(0, cfg.depth, n)])
        else:
            self.blocks = nn.ModuleList(blocks)
        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, 2 * self.d)

    def block_list(self) -> List[CrossAttnBlock]:
        """The blocks in order (whatever the chunking)."""
        if self.chunked:
            return [b for chunk in self.block_chunks for b in chunk.module]
        return list(self.blocks)

    def load_upstream(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load an upstream ``infinity_*.pth`` state dict strictly; a mismatch raises one ``ValueError`` line."""
        self.check_upstream(state_dict)
        self.load_state_dict(state_dict, strict=True)

    def check_upstream(self, state_dict: Mapping[str, torch.Tensor], check_shapes: bool = True) -> None:
        """``ValueError`` (one line) unless ``state_dict`` has exactly this model's keys, with its shapes if ``check_shapes``
        (works on meta)."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        shapes = [f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
                  if check_shapes and k in state_dict and state_dict[k].shape != v.shape]
        if missing or unexpected or shapes:
            parts = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
            parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
            parts += [f"{len(shapes)} wrong shapes (e.g. {shapes[0]})"] if shapes else []
            raise ValueError(f"not an Infinity state dict for this config (depth {self.depth}, C {self.C}, d {self.d}, Ct5 {self.Ct5}): {'; '.join(parts)}")

    # ------------------------------------------------------------------ shared pieces
    def encode_text(self, text: TextFeatures) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pooled condition (B, D) float32 and the cross-attention text: (N, C) packed, or (B, T, C) for PaddedText."""
        features, lens = (text.features, text.mask) if isinstance(text, PaddedText) else (text.kv_compact, text.lens)
        check_text_width(features, self.Ct5)
        kv = self.text_norm(features.float())
        cond_BD = self.text_proj_for_sos(kv, lens).float()
        return cond_BD, self.text_proj_for_ca(kv)

    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor, backend: str = "reference") -> torch.Tensor:
        """Final AdaLN + head in float32 with autocast off (as upstream): (B, l, C) -> (B, l, 2d)."""
        with torch.autocast(h.device.type, enabled=False):
            return self.head(self.head_nm(h.float(), cond_BD.float(), backend))

    def shared_modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """The shared AdaLN projection (B, 1, 6, C) in float32 with autocast off (as upstream) from the condition
        (B, D); without ``shared_aln`` the condition itself (each block projects it)."""
        with torch.autocast(cond_BD.device.type, enabled=False):
            return self.shared_ada_lin(cond_BD.float()).float().contiguous()

    def low_precision_tensors(self) -> List[torch.Tensor]:
        """The parameters and buffers :meth:`inference_copy` casts: those autocast would cast to its dtype at every
        use (the weights and biases of every linear layer run under autocast, the biases and the pooling query the
        attention layers pass to linear/attention themselves). Not cast (used in float32, as upstream): the head and
        its AdaLN, ``shared_ada_lin`` (autocast off), the blocks' ``ada_gss``, ``scale_mul_1H11`` and ``ca_gamma``,
        every norm, the embeddings of levels and ``pos_start``, ``cfg_uncond``."""
        float32_modules = (self.head, self.head_nm, self.shared_ada_lin)
        kept = {id(t) for m in float32_modules for t in itertools.chain(m.parameters(), m.buffers())}
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        attention = [m for m in self.modules() if isinstance(m, (SelfAttention, CrossAttention))]
        tensors = [t for m in linears for t in m.parameters()]
        tensors += [getattr(a, n) for a in attention for n in ("q_bias", "v_bias", "zero_k_bias") if hasattr(a, n)]
        tensors += [a.mat_q for a in attention if isinstance(getattr(a, "mat_q", None), nn.Parameter)]
        return [t for t in tensors if id(t) not in kept]

    def inference_copy(self, dtype: torch.dtype, device: Union[str, torch.device]) -> "InfinityTransformer":
        """A copy for sampling on ``device`` under ``torch.autocast(dtype)``, in eval mode without gradients, whose
        :meth:`low_precision_tensors` are cast once to ``dtype`` (upstream casts its blocks with ``block.bfloat16()``):
        the same values autocast's cast cache would give, so no weight is re-cast at every scale (autocast then finds
        them in ``dtype``). Every other tensor is moved to ``device`` as it is, shared with this model where it is
        there already. A snapshot: later changes to this model's weights do not reach it."""
        return cast_copy(self, self.low_precision_tensors(), dtype, device)

    def lvl_rows(self, schedule: Schedule) -> torch.Tensor:
        """Each token's scale index (L,)."""
        return torch.cat([torch.full((h * w,), si) for si, (h, w) in enumerate(schedule)])

    def add_level(self, x: torch.Tensor, si: int) -> torch.Tensor:
        """x (B, l, C) of scale ``si`` plus the level embedding of that scale."""
        return x + self.lvl_embed.weight[si]

    # ------------------------------------------------------------------ teacher forcing
    def forward(self, text: Any, x_BLC_wo_prefix: torch.Tensor, schedule: Sequence[Sequence[int]]) -> torch.Tensor:
        """Teacher-forced logits (B, L, 2d) from text features (see :meth:`TextFeatures.coerce`) and the next-scale
        inputs (B, L - 1, d) of ``schedule`` (upstream ``Infinity.forward`` in eval mode, no text dropout)."""
        text = TextFeatures.coerce(text)
        sched = as_schedule(schedule)
        L = sum(h * w for h, w in sched)
        B = x_BLC_wo_prefix.shape[0]
        if tuple(x_BLC_wo_prefix.shape) != (text.batch, L - 1, self.d):
            raise ValueError(f"x_BLC_wo_prefix must be ({text.batch}, {L - 1}, {self.d}); got {tuple(x_BLC_wo_prefix.shape)}")
        cond_BD, ca_text = self.encode_text(text)
        gss = self.shared_modulation(cond_BD)
        sos = cond_BD.unsqueeze(1) + self.pos_start.expand(B, 1, -1)
        x = torch.cat((sos, self.word_embed(x_BLC_wo_prefix.float())), dim=1)
        lvl = self.lvl_rows(sched).to(x.device)
        mask = torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf).to(x.dtype)
        cos, sin = (t.to(x.device) for t in rope_tables(sched, self.C // self.num_heads))
        # upstream pads the sequence to a multiple of pad_to_multiplier: zero rows that attend to token 0 only and
        # get no level embedding nor rotation; they change no real row, but keep the kernels' shapes (bit-exactness)
        pad = (-L) % max(self.config.pad_to_multiplier, 1)
        x = F.pad(x, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad, 0, pad), value=-torch.inf)
        mask[L:, 0] = 0.0
        cos, sin = F.pad(cos, (0, 0, 0, pad)), F.pad(sin, (0, 0, 0, pad))
        lvl_pos = F.pad(self.lvl_embed(lvl), (0, 0, 0, pad))
        for i, block in enumerate(self.block_list()):
            if i == 0 or not self.config.add_lvl_embeding_only_first_block:
                x = x + lvl_pos
            attn = block.sa
            x = block(x, block.modulation(gss), lambda h, a=attn: a.attend(*a.qkv(h, cos, sin), mask), block.ca.kv(ca_text), text.lens)
        return self.get_logits(x[:, :L], cond_BD)

    # ------------------------------------------------------------------ sampling (the NextScaleModel interface)
    def cache_layout(self, schedule: Schedule) -> Tuple[int, int, int, int]:
        """(layers, heads, total tokens, head_dim) of the KV cache for ``schedule``."""
        return self.depth, self.num_heads, sum(h * w for h, w in schedule), self.C // self.num_heads

    def condition(
        self,
        text: Any,
        schedule: Sequence[Sequence[int]],
        negative: Any = None,
        cfg_list: Optional[Sequence[float]] = None,
        cfg_insertion_layer: Sequence[int] = (0,),
        tensors: Optional["RequestTensors"] = None,
    ) -> InfinityState:
        """State for B prompts: the text condition (with CFG anywhere in ``cfg_list``: B more rows, the negative
        features or ``cfg_uncond[:len]`` per prompt), AdaLN modulations, the first scale's input, zero codes. ``text``: what
        :meth:`TextFeatures.coerce` takes (varlen cross-attention), or :class:`PaddedText` (static shapes, masked).

        ``cfg_insertion_layer`` entries ``k < 0`` mix ``cfg * cond + (1 - cfg) * uncond`` at the output of layer
        ``depth + k`` inside :meth:`step`; entry 0 (on logits) is left to the caller (step returns both halves).
        With the batch doubled, ``step`` returns only the conditional rows where the caller does not mix the logits.
        ``tensors`` (a captured graph's): the layer CFG weights and RoPE tables to read instead of ``cfg_list``'s
        numbers and the cached tables (``cfg_list`` still decides where CFG applies).
        """
        # TextFeatures come checked (Engine.bind, the reference sampler): no second value check (a host sync) per batch
        text = text if isinstance(text, (PaddedText, TextFeatures)) else TextFeatures.coerce(text)
        sched = as_schedule(schedule)
        B = text.batch
        guided = cfg_list is not None and any(c != 1 for c in cfg_list)
        if guided:
            check_text_width(text.features if isinstance(text, PaddedText) else text.kv_compact, self.Ct5)
            text = with_negative(text, negative, self.cfg_uncond)
        layers = []
        for k in cfg_insertion_layer:
            if k > 0 or (k < 0 and self.depth + k <= 0):
                raise ValueError(f"cfg_insertion_layer entry {k}: use 0 (logits) or -depth < k < 0 (a layer's output)")
            if k < 0:
                layers.append(self.depth + k)
        cond_BD, ca_text = self.encode_text(text)
        gss = self.shared_modulation(cond_BD)
        blocks = self.block_list()
        x = cond_BD.unsqueeze(1) + self.pos_start.expand(text.batch, 1, -1)
        cos, sin = device_rope_tables(sched, self.C // self.num_heads, x.device) if tensors is None else tensors.rope
        H, W = sched[-1]
        return InfinityState(
            batch=B, rows=text.batch, schedule=sched, cond_BD=cond_BD,
            modulations=[b.modulation(gss) for b in blocks], attn_constants=[b.sa.constants() for b in blocks],
            ca_kv=[b.ca.kv(ca_text) for b in blocks], lens=text.mask if isinstance(text, PaddedText) else text.lens,
            rope=(cos, sin),
            x=x, summed_codes=torch.zeros(B, self.d, 1, H, W, device=x.device).contiguous(memory_format=torch.channels_last_3d),
            cfg_list=list(cfg_list) if cfg_list is not None else [1.0] * len(sched), cfg_layers=tuple(layers),
            cfg_on_logits=0 in cfg_insertion_layer, cfg_weights=None if tensors is None else (tensors.cfg, tensors.uncond),
        )

    def step(self, state: InfinityState, si: int, kv: KVStore) -> torch.Tensor:
        """Bit logits of scale ``si`` in float32, no temperature: the blocks over the state's input (self-attention
        keys/values through ``kv``), layer CFG as configured, the head. Shape (2B, h*w, d, 2), conditional rows first,
        when the caller mixes logits at this scale (``state.cfg_on_logits`` and cfg != 1), else (B, h*w, d, 2): the
        conditional rows only, whose head upstream evaluates on B rows (the same values bit for bit)."""
        begin = sum(h * w for h, w in state.schedule[:si])
        h, w = state.schedule[si]
        r0 = begin if self.config.fused_norm else 0  # upstream's non-fused branch slices RoPE from 0 (see module doc)
        cos, sin = (t[r0 : r0 + h * w] for t in state.rope)
        cfg = state.cfg_list[si]
        B = state.batch

        def attention(x_: torch.Tensor, layer: int, attn: SelfAttention) -> torch.Tensor:
            bias, scale_mul = state.attn_constants[layer]
            q, k, v = kv(layer, attn.qkv_linear(x_, bias), begin, num_heads=self.num_heads, scale_mul=scale_mul, rope=(cos, sin))
            return attn.attend(q, k, v, None)

        x = state.x
        for layer, block in enumerate(self.block_list()):
            if layer == 0 or not self.config.add_lvl_embeding_only_first_block:
                x = self.add_level(x, si)
            x = block(x, state.modulations[layer], lambda x_, i=layer, a=block.sa: attention(x_, i, a), state.ca_kv[layer], state.lens, kv.backend)
            if cfg != 1 and layer in state.cfg_layers:
                w_cond, w_uncond = (cfg, 1 - cfg) if state.cfg_weights is None else (state.cfg_weights[0][si], state.cfg_weights[1][si])
                x = w_cond * x[:B] + w_uncond * x[B:]
                x = torch.cat((x, x))
        rows = state.rows if state.cfg_on_logits and cfg != 1 else B
        logits = self.get_logits(x[:rows], state.cond_BD[:rows], kv.backend)
        return logits.view(rows, h * w, self.d, 2)

    def next_input(self, state: InfinityState, si: int, bits: torch.Tensor) -> None:
        """Add scale ``si``'s bits (B, h*w, d) in {0, 1} to the summed codes and embed scale ``si + 1``'s input."""
        h, w = state.schedule[si]
        codes = bits_to_codes(bits.reshape(state.batch, 1, h, w, self.d))
        schedule = [(1, sh, sw) for sh, sw in state.schedule]
        state.summed_codes, nxt = accumulate_codes(state.summed_codes, codes, si, schedule)
        if nxt is not None:
            state.x = self.word_embed(nxt).repeat(state.rows // state.batch, 1, 1)

    def decode(self, state: InfinityState, vae: Any, backend: str = "reference") -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] from the summed codes via ``vae.decode(z (B, d, h, w), backend)`` (clamped to
        [-1, 1] as upstream); ``z`` is channels-last, as upstream's ``summed_codes.squeeze(-3)`` (the decoder's kernels
        differ)."""
        z = state.summed_codes.squeeze(-3).contiguous(memory_format=torch.channels_last)
        images = vae.decode(z, backend) if isinstance(vae, BSQVAE) else vae.decode(z)  # any other VAE: decode(z) alone
        return images.float().clamp(-1, 1).add(1).mul(0.5)


# ---------------------------------------------------------------------------------------------- padded text, requests


@dataclasses.dataclass
class PaddedText:
    """Text features of B prompts padded to one length T (static shapes, for CUDA graphs): ``features`` (B, T, Ct5),
    ``mask`` (B, T) bool, True on each prompt's tokens (a prefix of its row, at least one)."""

    features: torch.Tensor
    mask: torch.Tensor

    @property
    def batch(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, rows: slice) -> "PaddedText":
        return PaddedText(self.features[rows], self.mask[rows])

    def pad_rows(self, b: int) -> "PaddedText":
        """These prompts padded to ``b`` with one-token zero prompts (no row attends to nothing)."""
        extra = b - self.batch
        mask = torch.zeros(extra, self.mask.shape[1], dtype=torch.bool, device=self.mask.device)
        mask[:, 0] = True
        return PaddedText(torch.cat((self.features, self.features.new_zeros(extra, *self.features.shape[1:]))), torch.cat((self.mask, mask)))

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(features, mask): what a captured graph's static buffers are refilled from."""
        return self.features, self.mask

    def static_like(self, device: torch.device) -> "PaddedText":
        """Buffers of these features' shapes on ``device`` (filled from :meth:`tensors` before each replay)."""
        return PaddedText(torch.empty_like(self.features, device=device), torch.empty_like(self.mask, device=device))

    @classmethod
    def pad(cls, text: TextFeatures, length: int) -> "PaddedText":
        """Packed ``text`` (prompts of at most ``length`` tokens) padded with zeros to ``length`` tokens per prompt."""
        lens = torch.tensor(text.lens, device=text.kv_compact.device)
        mask = torch.arange(length, device=lens.device)[None] < lens[:, None]
        features = text.kv_compact.new_zeros(text.batch, length, text.kv_compact.shape[1])
        features[mask] = text.kv_compact
        return cls(features, mask)


def masked_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`varlen_cross_attention` on padded keys/values (static shapes, for CUDA graphs): q (B, Lq, H, hd), k/v
    (B, T, H, hd), key mask (B, T) -> (B, Lq, H*hd); the same bfloat16 rounding of q, k, v and the output (kept in
    bfloat16 under bf16 autocast, which the projection casts to anyway), masked keys get zero weight. One ``scaled_dot_product_attention`` with the boolean key mask broadcast as (B, 1, 1, T): no
    (B, H, Lq, T) score matrix is materialized. Equal up to float32 summation order (which can move a bfloat16
    rounding of the output by one ulp)."""
    B, Lq, H, hd = q.shape
    q, k, v = (t.to(torch.bfloat16).to(t.dtype).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale).transpose(1, 2).to(torch.bfloat16)
    device = out.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16:
        return out.reshape(B, Lq, H * hd)  # the projection would cast the float32 copy straight back: the same values
    return out.float().reshape(B, Lq, H * hd)


def check_text_width(features: torch.Tensor, Ct5: int) -> None:
    """``ValueError`` unless the text features (..., width) have the model's width ``Ct5``."""
    if features.shape[-1] != Ct5:
        raise ValueError(f"text features have width {features.shape[-1]}; this Infinity expects Ct5={Ct5}")


def with_negative(text: Union[TextFeatures, PaddedText], negative: Any, cfg_uncond: torch.Tensor) -> Union[TextFeatures, PaddedText]:
    """``text`` with B more rows for CFG: the ``negative`` prompts (the same form as ``text``; packed: anything
    :meth:`TextFeatures.coerce` takes) or, without them, ``cfg_uncond[:len]`` for each prompt."""
    if isinstance(text, PaddedText):
        neg = negative if negative is not None else PaddedText(
            cfg_uncond[: text.features.shape[1]].to(text.features).expand_as(text.features), text.mask
        )
        if not isinstance(neg, PaddedText) or neg.features.shape[1:] != text.features.shape[1:]:
            raise ValueError(f"negative text: pad it like the prompts, to {tuple(text.features.shape[1:])} per prompt")
    elif negative is None:
        if max(text.lens) > cfg_uncond.shape[0]:
            raise ValueError(f"text: a prompt has {max(text.lens)} tokens, the unconditional text for CFG covers text_maxlen="
                             f"{cfg_uncond.shape[0]}; shorten the prompt (upstream truncates to text_maxlen) or give negative=")
        neg = TextFeatures(torch.cat([cfg_uncond[:n] for n in text.lens]).to(text.kv_compact), text.lens)
    else:
        try:
            neg = TextFeatures.coerce(negative)
        except (TypeError, ValueError) as e:
            raise type(e)(f"negative: {e}") from None
    if neg.batch != text.batch:
        raise ValueError(f"negative text has {neg.batch} prompts; expected {text.batch} (one per prompt)")
    check_text_width(neg.features if isinstance(neg, PaddedText) else neg.kv_compact, cfg_uncond.shape[1])
    if isinstance(text, PaddedText):
        return PaddedText(torch.cat((text.features, neg.features)), torch.cat((text.mask, neg.mask)))
    return TextFeatures(torch.cat((text.kv_compact, neg.kv_compact.to(text.kv_compact))), text.lens + neg.lens)


@functools.lru_cache(maxsize=64)
def device_rope_tables(schedule: Schedule, head_dim: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_tables` on ``device``, cached (LRU of 64; ``device_rope_tables.cache_clear()`` frees them): no
    host-to-device copy per batch (none inside a CUDA graph capture)."""
    cos, sin = rope_tables(schedule, head_dim)
    return cos.to(device), sin.to(device)


def per_scale(values: Sequence[float], name: str, K: int) -> List[float]:
    """The first ``K`` of ``values`` as finite floats (upstream asserts ``len(values) >= K``); ``ValueError`` naming
    ``name`` otherwise."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, torch.Tensor)) or (torch.is_tensor(values) and values.ndim != 1):
        raise ValueError(f"{name} must be a list of numbers, one per scale; got {type(values).__name__}")
    values = [as_number(v, f"{name}[{i}]", "a finite number") for i, v in enumerate(values)]
    if len(values) < K:
        raise ValueError(f"{name} has {len(values)} entries; the schedule has {K} scales: give one per scale")
    return values[:K]


@dataclasses.dataclass
class RequestTensors:
    """What a captured graph of a request reads from device memory instead of Python numbers (refilled before each
    replay, so a cfg or tau sweep reuses one graph) or cached tables (held here for the graph's lifetime): per scale
    ``cfg`` = w_k, ``uncond`` = 1 - w_k and ``inv_tau`` = 1 / tau_k, each (K,) float32 (computed in float64 on the host
    and rounded once, as the Python numbers are), and the RoPE tables ``rope`` (cos, sin) (L, hd/2)."""

    cfg: torch.Tensor
    uncond: torch.Tensor
    inv_tau: torch.Tensor
    rope: Tuple[torch.Tensor, torch.Tensor]

    @staticmethod
    def values(request: "InfinityRequest") -> List[float]:
        """The request's numbers in the order of :meth:`from_buffer`'s views (3K floats)."""
        return [*request.cfg_list, *(1 - w for w in request.cfg_list), *(1 / t for t in request.tau_list)]

    @classmethod
    def from_buffer(cls, request: "InfinityRequest", buffer: torch.Tensor) -> "RequestTensors":
        """Views of ``buffer`` (3K,) float32 (filled with :meth:`values`) and the request's RoPE tables on its device."""
        cfg, uncond, inv_tau = buffer.view(3, len(request.schedule))
        model = request.model
        return cls(cfg, uncond, inv_tau, device_rope_tables(request.schedule, model.C // model.num_heads, buffer.device))


@dataclasses.dataclass
class InfinityRequest:
    """An Infinity model bound to one call's schedule, CFG and temperature lists, negative prompts (``negative``: as
    the text given to :meth:`condition`; None: ``cfg_uncond``) and VAE (None: no decoding), as a
    :class:`ssg_engine.models.family.NextScaleModel` for the samplers. ``tensors``: None, or the device tensors a
    captured graph reads instead of the lists' numbers and the cached RoPE tables (:class:`RequestTensors`).

    :meth:`step` gives (2B, h*w, 2d) float32 logits: the model's bit logits times ``1 / tau_k`` (upstream's order:
    temperature, then CFG), flattened over (bit, side); where the logits are not mixed at a scale the model returns
    the conditional rows only and they are given twice, with CFG weight ``cfg_ts()[k] = 0``. Tokens are bits
    (B, h*w, d) (``draw_width`` 2: one categorical draw per bit).
    """

    model: InfinityTransformer
    vae: Any
    schedule: Sequence[Sequence[int]]
    cfg_list: Sequence[float]
    tau_list: Sequence[float]
    negative: Any = None
    cfg_insertion_layer: Sequence[int] = (0,)
    tensors: Optional[RequestTensors] = None
    draw_width: ClassVar[int] = 2

    def __post_init__(self) -> None:
        self.schedule = as_schedule(self.schedule)
        K = len(self.schedule)
        self.cfg_list, self.tau_list = per_scale(self.cfg_list, "cfg_list", K), per_scale(self.tau_list, "tau_list", K)
        if min(self.tau_list) <= 0:
            raise ValueError(f"tau_list entries must be > 0; got {self.tau_list}")
        layers = self.cfg_insertion_layer
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise ValueError(f"cfg_insertion_layer must be a list of integers (0: on the logits, k < 0: a layer's output); got {layers!r}")
        self.cfg_insertion_layer = tuple(as_number(k, f"cfg_insertion_layer[{i}]", "an integer", integer=True) for i, k in enumerate(layers))

    def graph_key(self) -> tuple:
        """What a captured graph bakes in of this request: the schedule and where CFG applies (which scales have ``w_k
        != 1``, at which layers, with negative text or not). The values of ``cfg_list`` and ``tau_list`` are device
        tensors refilled before each replay (:class:`RequestTensors`)."""
        return self.schedule, tuple(w != 1 for w in self.cfg_list), self.cfg_insertion_layer, self.negative is not None

    def take_rows(self, rows: slice) -> "InfinityRequest":
        """This request for the prompts ``rows`` (a step-1 slice) of its batch (its negative text's rows)."""
        return dataclasses.replace(self, negative=None if self.negative is None else self.negative[rows])

    def pad_rows(self, b: int) -> "InfinityRequest":
        """This request for a batch padded to ``b`` rows (its negative text padded as the prompts are)."""
        if self.negative is None or self.negative.batch == b:
            return self
        return dataclasses.replace(self, negative=self.negative.pad_rows(b))

    def static_numbers(self) -> List[float]:
        """The numbers a captured graph reads from a device buffer (:meth:`RequestTensors.values`, 3K floats)."""
        return RequestTensors.values(self)

    def static_tensors(self) -> Tuple[torch.Tensor, ...]:
        """The tensors a captured graph's static buffers are refilled from (the negative text's, padded)."""
        return () if self.negative is None else tuple(self.negative.tensors())

    def static_copy(self, numbers: torch.Tensor) -> "InfinityRequest":
        """This request reading its numbers from ``numbers`` (3K,) float32 (filled with :meth:`static_numbers`) and
        its negative text from static buffers on ``numbers``' device (refilled from :meth:`static_tensors`)."""
        negative = None if self.negative is None else self.negative.static_like(numbers.device)
        return dataclasses.replace(self, negative=negative, tensors=RequestTensors.from_buffer(self, numbers))

    def cfg_ts(self) -> List[float]:
        """The CFG weight ``t_k = w_k - 1`` guidance applies to the logits of each scale (0 where they are not mixed)."""
        on_logits = 0 in self.cfg_insertion_layer
        return [(w - 1.0) if (on_logits and w != 1) else 0.0 for w in self.cfg_list]

    def scale_sizes(self) -> List[Tuple[int, int]]:
        return list(self.schedule)

    def cache_layout(self) -> Tuple[int, int, int, int]:
        return self.model.cache_layout(self.schedule)

    def condition(self, text: Any) -> InfinityState:
        return self.model.condition(
            text, self.schedule, negative=self.negative, cfg_list=self.cfg_list, cfg_insertion_layer=self.cfg_insertion_layer,
            tensors=self.tensors,
        )

    def step(self, state: InfinityState, si: int, kv: KVStore) -> torch.Tensor:
        logits = self.model.step(state, si, kv)
        rows, hw, d, _ = logits.shape
        x = logits.mul(1 / self.tau_list[si] if self.tensors is None else self.tensors.inv_tau[si]).reshape(rows, hw, 2 * d)
        return torch.cat((x, x)) if rows == state.batch else x

    def next_input(self, state: InfinityState, si: int, bits: torch.Tensor) -> None:
        self.model.next_input(state, si, bits)

    def decode(self, state: InfinityState, backend: str = "reference") -> Optional[torch.Tensor]:
        return None if self.vae is None else self.model.decode(state, self.vae, backend)
