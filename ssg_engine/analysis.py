"""Latent-level spectral analysis (the paper's "latents level analysis").

Per scale k >= 1: the radially averaged log-magnitude DCT spectrum of the semantic residual
``l_k - prior(l_{k-1})`` (over the token grid, averaged over images and vocabulary channels), and of
the sampled tokens' codebook embeddings. Frequencies are DCT indices ``rho = sqrt(u^2 + v^2)``
binned to integers on the ``pn x pn`` grid; the previous scale's Nyquist limit is ``rho = pn_{k-1}``,
so what a scale adds beyond the coarser one sits at ``rho >= pn_{k-1}``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from .families.var.sampler import SampleOutput
from .guidance import SSG, dct_matrix, prior


@dataclasses.dataclass
class ScaleSpectrum:
    step: int
    size: int
    prev_nyquist: int  # rho of the previous scale's highest frequency
    rho: List[int]
    residual_log_mag: List[float]
    token_log_mag: List[float]


def radial_log_spectrum(maps: torch.Tensor) -> torch.Tensor:
    """Radially averaged mean log-magnitude of the orthonormal 2-D DCT of maps (N, H, W) -> (R,) over integer radii."""
    N, H, W = maps.shape
    spec = dct_matrix(H) @ maps.double() @ dct_matrix(W).T
    logmag = spec.abs().clamp_min(1e-12).log().mean(0)  # (H, W)
    u = torch.arange(H, dtype=torch.float64).view(-1, 1)
    v = torch.arange(W, dtype=torch.float64).view(1, -1)
    rho = (u.square() + v.square()).sqrt().round().long()
    R = int(rho.max()) + 1
    total = torch.zeros(R, dtype=torch.float64).index_add_(0, rho.flatten(), logmag.flatten())
    count = torch.zeros(R, dtype=torch.float64).index_add_(0, rho.flatten(), torch.ones(H * W, dtype=torch.float64))
    return total / count


def latent_spectra(out: SampleOutput, patch_nums: Sequence[int], embedding: torch.Tensor, prior_kind: str = "dse", interp: str = "bilinear") -> List[ScaleSpectrum]:
    """Spectra per scale from a ``sample_reference(..., record_logits=True)`` output.

    ``embedding``: the codebook (V, Cvae). The residual uses the CFG-combined logits (before SSG).
    """
    if out.cfg_logits is None:
        raise ValueError("latent_spectra needs an output sampled with record_logits=True")
    result = []
    for k in range(1, len(patch_nums)):
        h, H = patch_nums[k - 1], patch_nums[k]
        residual = out.cfg_logits[k] - prior(out.cfg_logits[k - 1], h, H, prior_kind, interp)  # (B, H*H, V)
        B, _, V = residual.shape
        res_maps = residual.permute(0, 2, 1).reshape(B * V, H, H)
        tok = embedding[out.tokens[k]]  # (B, H*H, Cvae)
        tok_maps = tok.permute(0, 2, 1).reshape(-1, H, H)
        res_spec, tok_spec = radial_log_spectrum(res_maps), radial_log_spectrum(tok_maps)
        result.append(
            ScaleSpectrum(k, H, h, list(range(len(res_spec))), res_spec.tolist(), tok_spec.tolist())
        )
    return result


def plot_spectra(runs: Dict[str, List[ScaleSpectrum]], path: Union[str, Path], title: Optional[str] = None) -> Path:
    """Save a two-panel PNG: residual and token-embedding spectra per scale, one line style per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from e
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    for r, (name, spectra) in enumerate(runs.items()):
        for i, s in enumerate(spectra):
            color = cmap(i / max(len(spectra) - 1, 1))
            label = f"{name} k={s.step} ({s.size}x{s.size})" if r == 0 or i == len(spectra) - 1 else None
            axes[0].plot(s.rho, s.residual_log_mag, styles[r % 4], color=color, label=label if r == 0 else None)
            axes[1].plot(s.rho, s.token_log_mag, styles[r % 4], color=color, label=f"{name}" if i == len(spectra) - 1 else None)
            if r == 0:
                for ax in axes:
                    ax.axvline(s.prev_nyquist, color=color, alpha=0.25, linewidth=0.8)
    axes[0].set_title("semantic residual l_k - prior(l_{k-1})")
    axes[1].set_title("sampled token embeddings")
    for ax in axes:
        ax.set_xlabel("DCT radius rho (faint lines: previous scale's Nyquist)")
        ax.set_ylabel("mean log |DCT|")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def spectra_for(var, labels: torch.Tensor, seed: int, ssg: Optional[SSG], **sampling) -> List[ScaleSpectrum]:
    """Sample with ``sample_reference`` and return the per-scale spectra (prior from ``ssg`` or DSE)."""
    from .families.var.sampler import sample_reference

    out = sample_reference(var, int(labels.shape[0]), labels, seed=seed, ssg=ssg, record_logits=True, **sampling)
    kind, interp = (ssg.prior, ssg.interp) if ssg is not None else ("dse", "bilinear")
    return latent_spectra(out, var.patch_nums, var.vae_proxy[0].quantize.embedding.weight, kind, interp)
