"""Training: the multi-scale VQ-VAE, then the VAR, on Fashion-MNIST (CPU-sized).

``train_fashion_mnist(out_dir, ...)`` runs both stages and writes ``vae.safetensors``,
``var.safetensors``, ``config.json`` and ``metrics.json`` (``out_dir`` appears only complete: see
``staged_output_dir``); ``ssg-engine train --dataset fashion-mnist --out DIR`` (``ssg_engine.cli.train``) calls it.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import numpy as np
import torch

from ..config import ModelConfig
from .var_trainer import evaluate_var, init_var_weights, tokenize, train_var
from .vqvae_trainer import evaluate_vae, train_vqvae

__all__ = [
    "FASHION_MNIST_CONFIG", "train_fashion_mnist", "train_vqvae", "train_var",
    "evaluate_vae", "evaluate_var", "init_var_weights", "tokenize", "seed_everything",
]

# Chosen by measurement on 2 shared CPU cores (see ssg_engine/assets/fashion_mnist/MODEL_CARD.md).
FASHION_MNIST_CONFIG = ModelConfig(
    V=512, Cvae=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4, 5, 6, 8),
    share_quant_resi=4, depth=4, embed_dim=192, num_heads=4, num_classes=10, cond_drop_rate=0.1,
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_positive(**values: Optional[int]) -> None:
    """``ValueError`` naming the first value that is given (not None) but not a positive integer, as its flag."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


PARTIAL = ".partial-"  # ``.<out>.partial-<pid>``: the folder a run writes before it becomes ``<out>``


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def staged_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh folder ``.<name>.partial-<pid>`` next to ``out`` to write into; it is renamed to ``out`` when
    the block completes, and removed when it fails or is interrupted (Ctrl-C), so ``out`` is never half-written.

    An existing ``out`` that is a file, or a non-empty folder without ``force``, is refused (``FileExistsError``)
    before anything else happens; with ``force`` it is replaced only at the end (moved aside, the new folder
    renamed in, then deleted). Partial folders left by runs that no longer exist (killed) are removed first.
    """
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder for the trained model")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out {out} already exists and is not empty; pass --force to replace it once training has finished, or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}{PARTIAL}*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    partial = out.with_name(f".{out.name}{PARTIAL}{os.getpid()}")
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():  # an empty folder, or --force
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(partial, out)
        shutil.rmtree(old)
    else:
        os.rename(partial, out)


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _save_safetensors(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    sd = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().clone()
        for k, v in module.state_dict().items()
    }
    save_file(sd, str(path))


def train_fashion_mnist(
    out_dir: Union[str, Path],
    seed: int = 0,
    vae_steps: int = 1500,
    var_steps: int = 1500,
    batch_size: int = 64,
    var_batch_size: Optional[int] = None,
    config: Optional[ModelConfig] = None,
    vae_lr: float = 1e-3,
    var_lr: float = 1e-3,
    num_threads: Optional[int] = 2,
    data_root: Optional[Union[str, Path]] = None,
    train_limit: Optional[int] = None,
    eval_limit: Optional[int] = None,
    var_train_images: Optional[int] = None,
    vae_time_budget_s: Optional[float] = None,
    var_time_budget_s: Optional[float] = None,
    progress: bool = True,
    force: bool = False,
) -> Dict[str, Any]:
    """Train the VQ-VAE then the VAR on Fashion-MNIST; write weights, config and metrics into ``out_dir``.

    ``out_dir`` appears only complete (see ``staged_output_dir``): an existing non-empty one is refused
    (``FileExistsError``) unless ``force``, and then replaced only when training has finished.

    ``train_limit`` / ``eval_limit`` cap the number of train / test images used (None: all);
    ``var_train_images`` caps how many train images are tokenized for the VAR (None: steps * batch).
    ``*_time_budget_s`` stop a stage early at a wall-time budget, with its cosine schedule compressed to fit
    (this makes the run timing-dependent; leave them None for a deterministic run).
    Returns the metrics dict (also written to ``metrics.json``).
    """
    from ..data import load_fashion_mnist, prepare_images
    from ..models import VQVAE, VARTransformer

    _check_positive(
        vae_steps=vae_steps, var_steps=var_steps, batch_size=batch_size, var_batch_size=var_batch_size,
        train_images=train_limit, eval_images=eval_limit, var_train_images=var_train_images,
    )
    t_all = time.perf_counter()
    if num_threads:
        torch.set_num_threads(num_threads)
    seed_everything(seed)
    cfg = config or FASHION_MNIST_CONFIG
    size = cfg.image_size
    with staged_output_dir(Path(out_dir), force) as folder:
        xtr_u8, ytr = load_fashion_mnist("train", data_root)
        xte_u8, yte = load_fashion_mnist("test", data_root)
        if train_limit:
            xtr_u8, ytr = xtr_u8[:train_limit], ytr[:train_limit]
        if eval_limit:
            xte_u8, yte = xte_u8[:eval_limit], yte[:eval_limit]
        xtr = prepare_images(xtr_u8, size, cfg.in_channels)
        xte = prepare_images(xte_u8, size, cfg.in_channels)

        # ---------------------------------------------------------------- stage 1: VQ-VAE
        vae = VQVAE(cfg)
        vae_res = train_vqvae(
            vae, xtr, vae_steps, batch_size=batch_size, lr=vae_lr, seed=seed, progress=progress, time_budget_s=vae_time_budget_s
        )
        t = time.perf_counter()
        vae_eval = evaluate_vae(vae, xte)
        vae_eval_s = time.perf_counter() - t
        _save_safetensors(vae, folder / "vae.safetensors")
        cfg.to_json(folder / "config.json")
        if progress:
            print(f"VQ-VAE: {vae_res['steps_done']} steps in {vae_res['wall_s']:.0f} s; test {vae_eval}", flush=True)

        # ---------------------------------------------------------------- stage 2: VAR
        vbs = var_batch_size or batch_size
        n_tok = min(xtr.shape[0], max(vbs, var_steps * vbs), var_train_images or xtr.shape[0])
        t = time.perf_counter()
        tok_tr = tokenize(vae, xtr[:n_tok], progress=progress)
        n_val = min(xte.shape[0], 1000)
        tok_te = tokenize(vae, xte[:n_val])
        tok_s = time.perf_counter() - t
        seed_everything(seed + 1)
        var = VARTransformer(cfg, vae)
        init_var_weights(var)
        var_res = train_var(var, vae, tok_tr, ytr[:n_tok], var_steps, batch_size=vbs, lr=var_lr, seed=seed, progress=progress,
            time_budget_s=var_time_budget_s,
        )
        var_train_eval = evaluate_var(var, vae, ytr[: min(n_tok, 1000)], tok_tr[:1000])
        var_val_eval = evaluate_var(var, vae, yte[:n_val], tok_te)
        _save_safetensors(var, folder / "var.safetensors")

        metrics: Dict[str, Any] = {
            "dataset": "fashion-mnist",
            "seed": seed,
            "config": cfg.to_dict(),
            "image_size": size,
            "torch": torch.__version__,
            "machine": f"{platform.machine()} cpu, {torch.get_num_threads()} threads",
            "vae": {
                "steps": vae_res["steps_done"],
                "steps_planned": vae_steps,
                "time_budget_s": vae_time_budget_s,
                "batch_size": batch_size,
                "lr": vae_lr,
                "params": _count(vae),
                "train_wall_s": vae_res["wall_s"],
                "train_final_ema": {k: round(v, 5) for k, v in (vae_res["final_ema"] or {}).items()},
                "dead_code_restarts": vae_res["dead_code_restarts"],
                "test": {"n_images": int(xte.shape[0]), **vae_eval, "eval_wall_s": round(vae_eval_s, 2)},
                "history": vae_res["history"],
            },
            "var": {
                "steps": var_res["steps_done"],
                "steps_planned": var_steps,
                "time_budget_s": var_time_budget_s,
                "batch_size": vbs,
                "lr": var_lr,
                "train_images_tokenized": int(n_tok),
                "tokenize_wall_s": round(tok_s, 2),
                "params": _count(var),
                "train_wall_s": var_res["wall_s"],
                "train_final_ema_ce": round(float(var_res["final_ema"] or 0.0), 5),
                "train_eval": var_train_eval,
                "val": {"n_images": int(n_val), **var_val_eval},
                "history": var_res["history"],
            },
            "total_wall_s": round(time.perf_counter() - t_all, 2),
        }
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
