"""Scaled Spatial Guidance (SSG) with Discrete Spatial Enhancement (DSE), and classifier-free guidance.

Logits are token-major: ``(B, h*w, V)``, row-major over ``h`` then ``w`` (VAR's flattening).
Every prior is a fixed linear map over the token axis, so it is one matrix ``M`` of shape
``(H*W, h*w)`` per scale pair: ``prior(x) = M @ x``. See ``docs/ssg_method.md``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .validation import as_number

PRIORS = ("dse", "bilinear", "bicubic", "nearest", "area", "none")
DSE_INTERPS = ("bilinear", "bicubic")
PRIOR_SOURCES = ("cfg", "guided")
# Default strength, chosen on the shipped Fashion-MNIST model (bench/results/quality/): DSE beta=0.5 had the
# lowest classifier Frechet distance of the DSE arms at T=1 (all three betas tried were within one std).
DEFAULT_BETA = 0.5
HW = Tuple[int, int]


def _as_hw(size: Union[int, Sequence[int]]) -> HW:
    if isinstance(size, int):
        return (size, size)
    h, w = (int(s) for s in size)
    return (h, w)


def _check_sizes(src_hw: HW, dst_hw: HW) -> None:
    if min(src_hw) <= 0 or min(dst_hw) <= 0:
        raise ValueError(f"sizes must be positive, got src {src_hw} and dst {dst_hw}")
    if dst_hw[0] < src_hw[0] or dst_hw[1] < src_hw[1]:
        raise ValueError(f"destination {dst_hw} is smaller than source {src_hw}: a prior only upsamples")


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _interpolate(x: torch.Tensor, dst_hw: HW, mode: str) -> torch.Tensor:
    """Interpolate maps (N, 1, h, w) -> (N, 1, H, W); align_corners=False for the modes that take it."""
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(x, size=dst_hw, mode=mode, align_corners=False)
    return F.interpolate(x, size=dst_hw, mode=mode)


# ----------------------------------------------------------------------------- DCT


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C`` (n, n): ``X = C @ x``; its inverse is ``C.T``."""
    k = torch.arange(n, dtype=dtype).unsqueeze(1)
    i = torch.arange(n, dtype=dtype).unsqueeze(0)
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


def _dct_scale(n: int, dtype: torch.dtype) -> torch.Tensor:
    s = torch.full((n,), math.sqrt(2.0 / n), dtype=dtype)
    s[0] = math.sqrt(1.0 / n)
    return s


def _dct1_fft(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last axis via a length-2n FFT (independent of ``dct_matrix``)."""
    n = x.shape[-1]
    spec = torch.fft.fft(x, n=2 * n, dim=-1)[..., :n]
    k = torch.arange(n, dtype=x.dtype)
    return (spec * torch.exp(-1j * math.pi * k / (2 * n))).real * _dct_scale(n, x.dtype)


def _idct1_fft(X: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_dct1_fft`` (orthonormal DCT-III) along the last axis via a length-2n inverse FFT."""
    n = X.shape[-1]
    k = torch.arange(n, dtype=X.dtype)
    z = (X * _dct_scale(n, X.dtype)) * torch.exp(1j * math.pi * k / (2 * n))
    return (torch.fft.ifft(z, n=2 * n, dim=-1)[..., :n] * (2 * n)).real


def _dct2_fft(x: torch.Tensor) -> torch.Tensor:
    return _dct1_fft(_dct1_fft(x).transpose(-1, -2)).transpose(-1, -2)


def _idct2_fft(X: torch.Tensor) -> torch.Tensor:
    return _idct1_fft(_idct1_fft(X).transpose(-1, -2)).transpose(-1, -2)


# ----------------------------------------------------------------------------- DSE


def dse_reference(
    x: torch.Tensor, src_hw: Union[int, Sequence[int]], dst_hw: Union[int, Sequence[int]], interp: str = "bilinear"
) -> torch.Tensor:
    """DSE computed literally, per channel: interpolate, DCT both maps, replace the low block, inverse DCT.

    ``x``: (B, h*w, V) -> (B, H*W, V). Used to test ``dse_operator``; slow.
    """
    _check_choice(interp, DSE_INTERPS, "DSE interpolation")
    (h, w), (H, W) = _as_hw(src_hw), _as_hw(dst_hw)
    _check_sizes((h, w), (H, W))
    B, n, V = x.shape
    if n != h * w:
        raise ValueError(f"x has {n} tokens but the source size {h}x{w} needs {h * w}")
    maps = x.permute(0, 2, 1).reshape(B * V, 1, h, w)
    up = _interpolate(maps, (H, W), interp)
    X, U = _dct2_fft(maps), _dct2_fft(up)
    U = U.clone()
    U[..., :h, :w] = X * math.sqrt((H * W) / (h * w))
    out = _idct2_fft(U)
    return out.reshape(B, V, H * W).permute(0, 2, 1)


def _interp_matrix(src_hw: HW, dst_hw: HW, mode: str) -> torch.Tensor:
    """Matrix (H*W, h*w) of an interpolation mode, from the images of the h*w unit maps (float64)."""
    h, w = src_hw
    units = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
    return _interpolate(units, dst_hw, mode).reshape(h * w, -1).T.contiguous()


def _dse_matrix(src_hw: HW, dst_hw: HW, interp: str) -> torch.Tensor:
    """DSE as one matrix (H*W, h*w) in float64, from DCT matrices:

    ``M = D_HW^T [ (I - P_low) D_HW I_interp + sqrt(HW/hw) E D_hw ]`` where ``D`` are 2-D orthonormal
    DCT-II matrices (Kronecker products), ``P_low`` keeps the low ``h x w`` block and ``E`` embeds it.
    """
    (h, w), (H, W) = src_hw, dst_hw
    D_src = torch.kron(dct_matrix(h), dct_matrix(w))  # (hw, hw) on row-major maps
    D_dst = torch.kron(dct_matrix(H), dct_matrix(W))  # (HW, HW)
    low = (torch.arange(H).unsqueeze(1) < h) & (torch.arange(W).unsqueeze(0) < w)
    low_idx = low.flatten().nonzero().squeeze(1)  # row-major positions of the low block, in (h, w) order
    spec = D_dst @ _interp_matrix(src_hw, dst_hw, interp)  # (HW, hw): DCT of the interpolated unit maps
    spec[low_idx] = D_src * math.sqrt((H * W) / (h * w))
    return D_dst.T @ spec


@functools.lru_cache(maxsize=256)
def _prior_matrix_f64(kind: str, src_hw: HW, dst_hw: HW, interp: str) -> torch.Tensor:
    if kind == "dse":
        return _dse_matrix(src_hw, dst_hw, interp)
    if kind == "none":
        return torch.zeros(dst_hw[0] * dst_hw[1], src_hw[0] * src_hw[1], dtype=torch.float64)
    return _interp_matrix(src_hw, dst_hw, kind)


OPERATOR_CACHE_SIZE = 128  # operators kept per (kind, sizes, interp, device, dtype); a VAR-512 model uses 9 per prior


@functools.lru_cache(maxsize=OPERATOR_CACHE_SIZE)
def _cached_operator(kind: str, src: HW, dst: HW, interp: str, device: str, dtype: torch.dtype) -> torch.Tensor:
    return _prior_matrix_f64(kind, src, dst, interp).to(device=device, dtype=dtype)


def prior_operator(
    kind: str,
    src_hw: Union[int, Sequence[int]],
    dst_hw: Union[int, Sequence[int]],
    interp: str = "bilinear",
    device: Union[torch.device, str] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The prior of ``kind`` as a matrix (H*W, h*w): built in float64 once, cached per (kind, sizes, interp, device,
    dtype) in a bounded LRU cache (``OPERATOR_CACHE_SIZE`` entries).

    ``interp`` is used by ``kind="dse"`` only. ``kind="none"`` is the zero matrix (no prior).
    """
    _check_choice(kind, PRIORS, "prior")
    _check_choice(interp, DSE_INTERPS, "DSE interpolation")
    src, dst = _as_hw(src_hw), _as_hw(dst_hw)
    _check_sizes(src, dst)
    return _cached_operator(kind, src, dst, interp if kind == "dse" else "bilinear", str(torch.device(device)), dtype)


def dse_operator(
    src_hw: Union[int, Sequence[int]],
    dst_hw: Union[int, Sequence[int]],
    interp: str = "bilinear",
    device: Union[torch.device, str] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """DSE matrix ``M`` (H*W, h*w) such that ``dse(x) = M @ x`` over the token axis."""
    return prior_operator("dse", src_hw, dst_hw, interp, device, dtype)


def apply_operator(op: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``op`` (N, M) applied over the token axis of ``x`` (B, M, V) -> (B, N, V), in ``x``'s dtype."""
    if x.ndim != 3 or x.shape[1] != op.shape[1]:
        raise ValueError(f"operator of shape {tuple(op.shape)} cannot apply to x of shape {tuple(x.shape)}")
    return torch.matmul(op.to(x.dtype), x)


def prior(
    x: torch.Tensor,
    src_hw: Union[int, Sequence[int]],
    dst_hw: Union[int, Sequence[int]],
    kind: str = "dse",
    interp: str = "bilinear",
) -> torch.Tensor:
    """Upsample logits (B, h*w, V) -> (B, H*W, V) with the prior ``kind`` (one of ``PRIORS``)."""
    return apply_operator(prior_operator(kind, src_hw, dst_hw, interp, x.device, x.dtype), x)


def dse(
    x: torch.Tensor, src_hw: Union[int, Sequence[int]], dst_hw: Union[int, Sequence[int]], interp: str = "bilinear"
) -> torch.Tensor:
    """DSE prior of logits (B, h*w, V) -> (B, H*W, V) through the cached operator."""
    return prior(x, src_hw, dst_hw, "dse", interp)


def ssg_logits(
    l_k: torch.Tensor,
    l_prev: torch.Tensor,
    src_hw: Union[int, Sequence[int]],
    dst_hw: Union[int, Sequence[int]],
    beta: float,
    prior: str = "dse",
    interp: str = "bilinear",
) -> torch.Tensor:
    """``l_k + beta * (l_k - prior(l_prev))``; ``l_k`` (B, H*W, V), ``l_prev`` (B, h*w, V)."""
    beta = as_number(beta, "beta", "a finite number")
    l_prior = apply_operator(prior_operator(prior, src_hw, dst_hw, interp, l_prev.device, l_prev.dtype), l_prev)
    return l_k + beta * (l_k - l_prior)


def cfg_ratio(cfg: float, step: int, num_steps: int) -> float:
    """VAR's CFG ramp ``t_k = cfg * (k / (K - 1))``, in upstream's order of operations (bit-identical weights)."""
    return cfg * (step / max(num_steps - 1, 1))


# ----------------------------------------------------------------------------- SSG config


@dataclasses.dataclass(frozen=True)
class SSG:
    """Scaled Spatial Guidance settings. Give one of ``beta``, ``betas`` or (``beta_start``, ``beta_end``); none means
    the model's default: :meth:`for_model` (which every sampler applies) takes the beta its model card sets
    (``model.ssg_beta``, e.g. 0.15 for the shipped text-to-image model), else ``DEFAULT_BETA``; without a model,
    ``step_betas`` uses ``DEFAULT_BETA``. Numbers may be Python, NumPy or 0-d tensor numbers (stored as Python numbers).

    - ``beta``: constant guidance scale on steps ``first_step..last_step``.
    - ``betas``: one value per sampling step (its length must equal the number of steps; step 0 is ignored).
    - ``beta_start``/``beta_end``: linear ramp from ``first_step`` to ``last_step``.
    ``prior``: one of ``PRIORS``; ``interp``: DSE's interpolation (``bilinear`` | ``bicubic``);
    ``prior_source``: ``"cfg"`` (previous step's CFG-combined logits before SSG, default) or ``"guided"`` (after SSG).
    """

    beta: Optional[float] = None
    betas: Optional[Tuple[float, ...]] = None
    beta_start: Optional[float] = None
    beta_end: Optional[float] = None
    prior: str = "dse"
    interp: str = "bilinear"
    prior_source: str = "cfg"
    first_step: int = 1
    last_step: Optional[int] = None

    def __post_init__(self) -> None:
        ways = [self.beta is not None, self.betas is not None, self.beta_start is not None or self.beta_end is not None]
        if sum(ways) > 1:
            raise ValueError("give exactly one of beta, betas, or beta_start+beta_end (or none: the model's default beta)")
        finite = "a finite number"
        if self.beta is not None:
            object.__setattr__(self, "beta", as_number(self.beta, "beta", finite))
        if self.betas is not None:
            if isinstance(self.betas, (str, bytes)) or not hasattr(self.betas, "__len__") or getattr(self.betas, "ndim", 1) != 1:
                raise ValueError(f"betas must be a sequence of numbers, one per sampling step; got {self.betas!r}")
            object.__setattr__(self, "betas", tuple(as_number(b, f"betas[{i}]", finite) for i, b in enumerate(self.betas)))
        if ways[2]:
            if self.beta_start is None or self.beta_end is None:
                raise ValueError("a linear beta ramp needs both beta_start and beta_end")
            object.__setattr__(self, "beta_start", as_number(self.beta_start, "beta_start", finite))
            object.__setattr__(self, "beta_end", as_number(self.beta_end, "beta_end", finite))
        _check_choice(self.prior, PRIORS, "prior")
        _check_choice(self.interp, DSE_INTERPS, "DSE interpolation")
        _check_choice(self.prior_source, PRIOR_SOURCES, "prior_source")
        first = as_number(self.first_step, "first_step", "an integer >= 1 (step 0 has no prior)", integer=True, valid=lambda v: v >= 1)
        object.__setattr__(self, "first_step", first)
        if self.last_step is not None:
            last = as_number(self.last_step, "last_step", f"an integer >= first_step={first}", integer=True, valid=lambda v: v >= first)
            object.__setattr__(self, "last_step", last)

    def for_model(self, model: Any) -> "SSG":
        """These settings with the beta of ``model`` filled in when none was given: its card's ``model.ssg_beta``
        where the model sets one, else ``DEFAULT_BETA``; unchanged when a beta, betas or ramp was given."""
        if self.beta is not None or self.betas is not None or self.beta_start is not None:
            return self
        beta = getattr(model, "ssg_beta", None)
        return dataclasses.replace(self, beta=DEFAULT_BETA if beta is None else beta)

    def title(self) -> str:
        """A short human-readable name of these settings, for figure labels: ``"SSG beta=0.5, prior dse"``,
        ``"SSG beta 0.2..0.8, prior dse"`` (a ramp), ``"SSG per-step betas, prior dse"``; ``"SSG model beta"`` when no
        beta is given (apply :meth:`for_model` first to name it)."""
        if self.betas is not None:
            strength = "per-step betas"
        elif self.beta_start is not None:
            strength = f"beta {self.beta_start:g}..{self.beta_end:g}"
        else:
            strength = "model beta" if self.beta is None else f"beta={self.beta:g}"
        prior = f"dse ({self.interp})" if self.prior == "dse" and self.interp != "bilinear" else self.prior
        return f"SSG {strength}, prior {prior}"

    def step_betas(self, num_steps: int) -> List[float]:
        """Per-step beta for a ``num_steps``-scale model; 0 where SSG is off (always at step 0)."""
        last = num_steps - 1 if self.last_step is None else self.last_step
        if self.first_step >= num_steps:
            raise ValueError(f"first_step={self.first_step} is past the last step {num_steps - 1} of a {num_steps}-scale model")
        if last >= num_steps:
            raise ValueError(f"last_step={last} is past the last step {num_steps - 1} of a {num_steps}-scale model")
        if self.betas is not None and len(self.betas) != num_steps:
            raise ValueError(f"betas has {len(self.betas)} entries but the model samples {num_steps} steps")
        out = []
        for k in range(num_steps):
            if k < self.first_step or k > last:
                out.append(0.0)
            elif self.betas is not None:
                out.append(float(self.betas[k]))
            elif self.beta_start is None:  # a beta, or none given (no model here: the package default)
                out.append(float(DEFAULT_BETA if self.beta is None else self.beta))
            else:
                frac = 0.0 if last == self.first_step else (k - self.first_step) / (last - self.first_step)
                out.append(float(self.beta_start + (self.beta_end - self.beta_start) * frac))
        return out
