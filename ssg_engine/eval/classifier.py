"""A small Fashion-MNIST CNN trained by our own code: the domain metric for class-conditional samples.

- Input: images (N, 3, 32, 32) (or (N, 1, H, W)) in [0, 1], exactly what the samplers return for the
  Fashion-MNIST VAR (28x28 digits-style images zero-padded to 32x32, grey replicated to 3 channels;
  ``ssg_engine.data.prepare_images``). Channels are averaged, then mapped to [-1, 1]; other sizes are
  resized to 32x32 (area / bilinear) so the net can also score the golden tiny model's 128px noise.
- Metrics: **class accuracy** of the classifier on class-conditional samples (does the sample show
  the class it was asked for?) and **FD-classifier**: the Fréchet distance between the classifier's
  penultimate features (128-d) of the samples and of the Fashion-MNIST test set.
- Weights: safetensors plus a JSON sidecar with the test accuracy measured at training time. The
  weights shipped in ``ssg_engine/eval/assets/`` are used when present (so every machine scores with
  the same network); otherwise ``$SSG_ENGINE_CACHE`` (default ``~/.cache/ssg_engine``)/
  ``fmnist_classifier.safetensors``, trained on first use (``train_classifier``: 8 epochs, 4-5 minutes
  on one busy CPU thread; the shipped weights: 91.7% test accuracy). ``python -m ssg_engine.eval.classifier``
  retrains (``--epochs 4``: ~2 minutes, ~90%).
- Reference statistics (mean / covariance of the test set's features) are cached next to the weights
  in an ``.npz`` keyed by the weights' hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache import user_cache_dir
from ..files import atomic_output, atomic_write, atomic_write_json

PathLike = Union[str, Path]
CLASSIFIER_FILE = "fmnist_classifier.safetensors"
FEATURE_DIM = 128
IMAGE_SIZE = 32


cache_dir = user_cache_dir  # ``path``, else ``$SSG_ENGINE_CACHE``, else ``~/.cache/ssg_engine`` (created)


class FashionClassifier(nn.Module):
    """3 conv stages (16-32-64 channels, 32 -> 16 -> 8 -> 4) + a 128-d penultimate layer + 10-way head."""

    def __init__(self, num_classes: int = 10, width: int = 16, feature_dim: int = FEATURE_DIM):
        super().__init__()
        w = width

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.features = nn.Sequential(stage(1, w), stage(w, 2 * w), stage(2 * w, 4 * w))
        self.fc = nn.Linear(4 * w * 4 * 4, feature_dim)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, 1, 32, 32) in [-1, 1]."""
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            mode = "area" if min(x.shape[-2:]) > IMAGE_SIZE else "bilinear"
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
        return x.clamp(0, 1).mul(2).sub(1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 128) of preprocessed input (after ReLU)."""
        return F.relu(self.fc(self.features(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.embed(x)))


def _dataset_images01(split: str, root: Optional[PathLike] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` as the VAR sees it: (N, 3, 32, 32) float in [0, 1], and labels (N,)."""
    from ..data import load_fashion_mnist, prepare_images

    u8, labels = load_fashion_mnist(split, root)
    return prepare_images(u8, size=IMAGE_SIZE, channels=1).add_(1).mul_(0.5), labels


def dataset_images01(split: str = "test", root: Optional[PathLike] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Public alias: (N, 1, 32, 32) in [0, 1] (one channel; the metrics average channels anyway) and labels."""
    return _dataset_images01(split, root)


@torch.no_grad()
def _evaluate(model: FashionClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(1, x.shape[0])


def train_classifier(
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    max_train: Optional[int] = None,
    max_test: Optional[int] = None,
    root: Optional[PathLike] = None,
    threads: Optional[int] = None,
    verbose: bool = True,
) -> Tuple[FashionClassifier, Dict[str, object]]:
    """Train on the 60k train set (or its first ``max_train``): AdamW + one-cycle LR, label smoothing,
    random shifts of up to 2 px and horizontal flips.

    Returns the model (eval mode) and info with the accuracy on the 10k test images (or the first ``max_test``).
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        xtr, ytr = _dataset_images01("train", root)
        xte, yte = _dataset_images01("test", root)
        if max_train is not None:
            xtr, ytr = xtr[:max_train], ytr[:max_train]
        if max_test is not None:
            xte, yte = xte[:max_test], yte[:max_test]
        xtr, xte = xtr.mul(2).sub(1), xte.mul(2).sub(1)  # preprocess() of 1-channel 32x32 [0, 1] images
        model = FashionClassifier()
        steps_per_epoch = (xtr.shape[0] + batch_size - 1) // batch_size
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
        t0 = time.perf_counter()
        for ep in range(epochs):
            model.train()
            perm = torch.randperm(xtr.shape[0], generator=gen)
            total = 0.0
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size : (i + 1) * batch_size]
                xb = xtr[idx]
                # augmentation: random shift by up to 2 px (the padding is background), random h-flip
                dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
                if bool(torch.rand((), generator=gen) < 0.5):
                    xb = xb.flip(3)
                loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach())
            if verbose:
                print(f"classifier epoch {ep + 1}/{epochs}: loss {total / steps_per_epoch:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        acc = _evaluate(model, xte, yte)
        info = {
            "test_accuracy": acc, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
            "train_images": int(xtr.shape[0]), "test_images": int(xte.shape[0]), "train_seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__,
        }
        if verbose:
            print(f"classifier test accuracy {acc:.4f} on {xte.shape[0]} images", flush=True)
        return model.eval(), info
    finally:
        torch.set_num_threads(old_threads)


def save_classifier(model: FashionClassifier, path: PathLike, info: Dict[str, object]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.chmod(tmp, 0o644)
    atomic_write_json(path.with_suffix(".json"), info)


def _file_hash(path: PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


SHIPPED = Path(__file__).resolve().parent / "assets" / CLASSIFIER_FILE


def classifier_path(path: Optional[PathLike] = None, cache: Optional[PathLike] = None) -> Path:
    """``path``; else the shipped weights (``ssg_engine/eval/assets/``, so every machine scores with the
    same network); else the cache dir's file (trained on first use)."""
    if path is not None:
        return Path(path)
    if SHIPPED.is_file():
        return SHIPPED
    return cache_dir(cache) / CLASSIFIER_FILE


def load_classifier(
    path: Optional[PathLike] = None, cache: Optional[PathLike] = None, train_if_missing: bool = True, **train_kwargs
) -> Tuple[FashionClassifier, Dict[str, object]]:
    """The classifier at ``classifier_path(path, cache)``; when that file is missing, a ``path`` given is an error
    (``FileNotFoundError``, never a silent retraining), the default cache file is trained and cached first.

    ``info`` holds what was recorded at training time (``test_accuracy`` ...) and ``weights_hash``.
    """
    from safetensors.torch import load_file

    p = classifier_path(path, cache)
    if not p.is_file():
        if path is not None:
            raise FileNotFoundError(f"classifier weights {p} not found; give an existing file, or leave --classifier out to use the shipped classifier")
        if not train_if_missing:
            raise FileNotFoundError(f"no trained Fashion-MNIST classifier at {p} (train one with `python -m ssg_engine.eval.classifier`)")
        model, info = train_classifier(**train_kwargs)
        save_classifier(model, p, info)
    model = FashionClassifier()
    try:
        model.load_state_dict(load_file(str(p)))
    except Exception as e:  # safetensors and torch raise their own error types (multi-line) for foreign or damaged files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"classifier weights {p} are not a safetensors file of the Fashion-MNIST classifier ({first}); "
                         "give one written by `python -m ssg_engine.eval.classifier`, or leave --classifier out") from None
    info_path = p.with_suffix(".json")
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info["weights_hash"] = _file_hash(p)
    info["path"] = str(p)
    return model.eval().requires_grad_(False), info


@torch.no_grad()
def classify(model: FashionClassifier, images01: torch.Tensor, batch_size: int = 500) -> Tuple[np.ndarray, np.ndarray]:
    """(logits (N, 10) float32, penultimate features (N, 128) float64) of images (N, C, H, W) in [0, 1]."""
    model.eval()
    logits, feats = [], []
    for i in range(0, images01.shape[0], batch_size):
        x = model.preprocess(images01[i : i + batch_size].cpu())
        f = model.embed(x)
        feats.append(f.double().numpy())
        logits.append(model.head(f).numpy())
    if not logits:
        return np.zeros((0, 10), np.float32), np.zeros((0, FEATURE_DIM))
    return np.concatenate(logits), np.concatenate(feats)


def class_accuracy(model: FashionClassifier, images01: torch.Tensor, labels) -> float:
    """Fraction of images the classifier assigns to the class they were sampled for."""
    logits, _ = classify(model, images01)
    return float((logits.argmax(1) == np.asarray(labels)).mean())


def reference_features(
    model: FashionClassifier, info: Dict[str, object], cache: Optional[PathLike] = None, root: Optional[PathLike] = None
) -> Dict[str, np.ndarray]:
    """Classifier features of the Fashion-MNIST test set, with mean/cov; cached to ``cls_ref_<hash>.npz``."""
    f = cache_dir(cache) / f"cls_ref_{info.get('weights_hash', 'nohash')}.npz"
    if f.is_file():
        with np.load(f) as z:
            return {k: z[k] for k in z.files}
    x, y = _dataset_images01("test", root)
    logits, feats = classify(model, x)
    out = {
        "features": feats, "labels": y.numpy(), "mu": feats.mean(0), "sigma": np.cov(feats, rowvar=False),
        "accuracy": np.asarray((logits.argmax(1) == y.numpy()).mean()),
    }
    atomic_write(f, lambda fh: np.savez(fh, **out))
    return out


def main(argv=None) -> int:  # python -m ssg_engine.eval.classifier [--epochs N] [--out PATH]
    import argparse

    p = argparse.ArgumentParser(description="train and cache the Fashion-MNIST classifier used by `ssg-engine eval`")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--out", default=None, help=f"weights path (default: cache dir / {CLASSIFIER_FILE})")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    model, info = train_classifier(epochs=a.epochs, threads=a.threads)
    out = classifier_path(a.out)
    save_classifier(model, out, info)
    print(f"wrote {out}: test accuracy {info['test_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
