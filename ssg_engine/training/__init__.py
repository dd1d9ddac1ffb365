"""Training on Fashion-MNIST (CPU-sized): the multi-scale VQ-VAE, then the VAR; or the BSQ VAE, then the Infinity
transformer with its text encoder; or HART's hybrid tokenizer, then the HART transformer with its diffusion head and
text encoder.

``train_fashion_mnist(out_dir, ...)`` runs both VAR stages and writes ``vae.safetensors``,
``var.safetensors``, ``config.json`` and ``metrics.json``; ``train_fashion_mnist_infinity(out_dir, ...)`` writes
``vae.safetensors``, ``infinity.safetensors``, ``text_encoder.safetensors`` (float16), ``config.json`` and
``metrics.json``; ``train_fashion_mnist_hart(out_dir, ...)`` writes upstream's released layout (``llm/`` and
``tokenizer/``, each ``config.json`` + ``model.safetensors``) plus ``text_encoder.safetensors``, ``config.json`` and
``metrics.json``. ``out_dir`` appears only complete (see ``staged_output_dir``); ``ssg-engine train --family
{var,infinity,hart} --dataset fashion-mnist --out DIR`` (``ssg_engine.cli.train``) calls them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import random
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch

from ..families.hart.config import HARTConfig, HARTTokenizerConfig
from ..families.infinity.model import InfinityConfig, scale_schedule
from ..families.infinity.text import TextEncoderConfig
from ..families.infinity.tokenizer import BSQVAEConfig
from ..families.var.config import ModelConfig
from ..files import DISK_FULL, exclusive_lock, output_error
from .bsq_trainer import evaluate_bsq_vae, train_bsq_vae
from .hart_trainer import encode_hybrid, evaluate_hart, evaluate_hybrid_tokenizer, init_hart_weights, train_hart
from .infinity_trainer import encode_bits, evaluate_infinity, init_infinity_weights, train_infinity
from .var_trainer import evaluate_var, init_var_weights, tokenize, train_var
from .vqvae_trainer import evaluate_vae, train_vqvae

__all__ = [
    "FASHION_MNIST_CONFIG", "train_fashion_mnist", "train_vqvae", "train_var",
    "evaluate_vae", "evaluate_var", "init_var_weights", "tokenize", "seed_everything",
    "InfinityRecipe", "FASHION_MNIST_INFINITY", "train_fashion_mnist_infinity", "train_bsq_vae", "evaluate_bsq_vae",
    "train_infinity", "evaluate_infinity", "init_infinity_weights", "encode_bits",
    "HARTRecipe", "FASHION_MNIST_HART", "train_fashion_mnist_hart", "train_hart", "evaluate_hart", "init_hart_weights",
    "encode_hybrid", "evaluate_hybrid_tokenizer",
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
    """``ValueError`` naming the first value that is given (not None) but not a positive integer, as its flag, or
    that asks for more images than its Fashion-MNIST split holds (``data.SPLIT_SIZES``)."""
    from ..data import SPLIT_SIZES

    limits = {"train_images": SPLIT_SIZES["train"], "var_train_images": SPLIT_SIZES["train"], "eval_images": SPLIT_SIZES["test"]}
    for name, value in values.items():
        flag = f"--{name.replace('_', '-')}"
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        if value is not None and value > limits.get(name, value):
            raise ValueError(f"{flag} {value}: the Fashion-MNIST split holds only {limits[name]} images; give at most that")


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
    A lock (``.<name>.lock``, see ``files.exclusive_lock``) is held from start to rename: a second run on the same
    ``out`` is refused (``OutputError``) instead of replacing the first one's model. A full disk removes the partial
    folder and is raised as ``OutputError`` naming ``out``.
    """
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder for the trained model")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out {out} already exists and is not empty; pass --force to replace it once training has finished, or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out.with_name(f".{out.name}.lock"), out):
        for stale in out.parent.glob(f".{out.name}{PARTIAL}*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid))):
                shutil.rmtree(stale, ignore_errors=True)
        partial = out.with_name(f".{out.name}{PARTIAL}{os.getpid()}")
        partial.mkdir()
        try:
            yield partial
        except BaseException as e:
            shutil.rmtree(partial, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in DISK_FULL:
                raise output_error(out, e) from None
            raise
        if out.exists():  # an empty folder, or --force
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(partial, out)
            shutil.rmtree(old)
        else:
            os.rename(partial, out)


def _start(num_threads: Optional[int], seed: int) -> float:
    """Set the intra-op threads (None: leave them) and every seed; the start time."""
    if num_threads:
        torch.set_num_threads(num_threads)
    seed_everything(seed)
    return time.perf_counter()


def _fashion_mnist_splits(data_root: Optional[Union[str, Path]], train_limit: Optional[int], eval_limit: Optional[int],
                          size: int = 32, channels: int = 3) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train images, train labels, test images, test labels: images (N, channels, size, size) in [-1, 1], each split
    capped at its limit (None: all)."""
    from ..data import load_fashion_mnist, prepare_images

    out = []
    for split, limit in (("train", train_limit), ("test", eval_limit)):
        x, y = load_fashion_mnist(split, data_root)
        out += [prepare_images(x[:limit], size, channels), y[:limit]]
    return out[0], out[1], out[2], out[3]


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _save_safetensors(module: torch.nn.Module, path: Path, dtype: torch.dtype = torch.float32, prefix: str = "") -> None:
    """The module's state dict as safetensors, keys prefixed by ``prefix``, floating-point tensors in ``dtype``
    (written by Python, so a full disk is an ``OSError``)."""
    from safetensors.torch import save

    sd = {
        prefix + k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().clone()
        for k, v in module.state_dict().items()
    }
    path.write_bytes(save(sd))


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
    from ..families.var.model import VARTransformer
    from ..families.var.tokenizer import VQVAE

    _check_positive(
        vae_steps=vae_steps, var_steps=var_steps, batch_size=batch_size, var_batch_size=var_batch_size,
        train_images=train_limit, eval_images=eval_limit, var_train_images=var_train_images,
    )
    t_all = _start(num_threads, seed)
    cfg = config or FASHION_MNIST_CONFIG
    size = cfg.image_size
    with staged_output_dir(Path(out_dir), force) as folder:
        xtr, ytr, xte, yte = _fashion_mnist_splits(data_root, train_limit, eval_limit, size, cfg.in_channels)

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


@dataclasses.dataclass(frozen=True)
class InfinityRecipe:
    """Architecture of the Fashion-MNIST text-to-image model: BSQ VAE (32x32 -> 8x8 latent of ``bits`` bits),
    Infinity transformer, text encoder, and the schedule (``h_div_w``, ``num_scales``: 5 scales = (1..8)^2)."""

    bits: int = 16
    vae_base_ch: int = 32
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_maxlen: int = 16
    cond_drop_rate: float = 0.1
    h_div_w: float = 1.0
    num_scales: int = 5

    def vae_config(self) -> BSQVAEConfig:
        return BSQVAEConfig(codebook_dim=self.bits, base_ch=self.vae_base_ch, num_res_blocks=1,
                            encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2), patch_size=4)

    def text_config(self) -> TextEncoderConfig:
        from ..data import prompt_vocabulary

        return TextEncoderConfig(prompt_vocabulary(), self.text_width, self.text_layers, self.text_heads, self.text_maxlen)

    def infinity_config(self) -> InfinityConfig:
        return InfinityConfig(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads, mlp_ratio=4.0,
                              text_channels=self.text_width, text_maxlen=self.text_maxlen, codebook_dim=self.bits,
                              num_scales=self.num_scales)

    def schedule(self) -> Tuple[Tuple[int, int, int], ...]:
        """The scale schedule as upstream's (1, h, w) entries."""
        return tuple((1, h, w) for h, w in scale_schedule(self.h_div_w, self.num_scales))


# Chosen by measurement on 2 shared CPU cores (see ssg_engine/assets/fashion_mnist_infinity/MODEL_CARD.md).
FASHION_MNIST_INFINITY = InfinityRecipe()


def train_fashion_mnist_infinity(
    out_dir: Union[str, Path],
    seed: int = 0,
    vae_steps: int = 800,
    infinity_steps: int = 1000,
    batch_size: int = 32,
    infinity_batch_size: int = 64,
    recipe: InfinityRecipe = FASHION_MNIST_INFINITY,
    vae_lr: float = 1e-3,
    infinity_lr: float = 1e-3,
    num_threads: Optional[int] = 2,
    data_root: Optional[Union[str, Path]] = None,
    train_limit: Optional[int] = None,
    eval_limit: Optional[int] = None,
    infinity_train_images: Optional[int] = None,
    progress: bool = True,
    force: bool = False,
) -> Dict[str, Any]:
    """Train the BSQ VAE, then the Infinity transformer and text encoder jointly, on Fashion-MNIST; write the
    weights (float16), ``config.json`` and ``metrics.json`` into ``out_dir`` (appears only complete, see
    ``staged_output_dir``; an existing non-empty one is refused unless ``force``).

    ``train_limit`` / ``eval_limit`` cap the train / test images (None: all); ``infinity_train_images`` caps how many
    train images are encoded to bits for the transformer (None: steps * batch). Deterministic for a seed.
    Returns the metrics dict (also written to ``metrics.json``).
    """
    from ..data import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES
    from ..families.infinity.model import InfinityTransformer
    from ..families.infinity.text import TextEncoder
    from ..families.infinity.tokenizer import BSQVAE
    from ..pretrained import INFINITY_SAMPLING

    _check_positive(
        vae_steps=vae_steps, var_steps=infinity_steps, batch_size=batch_size, var_batch_size=infinity_batch_size,
        train_images=train_limit, eval_images=eval_limit, var_train_images=infinity_train_images,
    )
    t_all = _start(num_threads, seed)
    sched = recipe.schedule()
    with staged_output_dir(Path(out_dir), force) as folder:
        xtr, ytr, xte, yte = _fashion_mnist_splits(data_root, train_limit, eval_limit)

        # ---------------------------------------------------------------- stage 1: BSQ VAE
        vae = BSQVAE(recipe.vae_config())
        vae_res = train_bsq_vae(vae, xtr, sched, vae_steps, batch_size=batch_size, lr=vae_lr, seed=seed, progress=progress)
        vae_eval = evaluate_bsq_vae(vae, xte, sched)
        if progress:
            print(f"BSQ VAE: {vae_steps} steps in {vae_res['wall_s']:.0f} s; test PSNR {vae_eval['psnr']} dB, "
                  f"bit entropy {vae_eval['bit_usage']['mean_entropy']}", flush=True)

        # ---------------------------------------------------------------- stage 2: Infinity + text encoder
        ibs = infinity_batch_size
        n_bits = min(xtr.shape[0], max(ibs, infinity_steps * ibs), infinity_train_images or xtr.shape[0])
        t = time.perf_counter()
        bits_tr = encode_bits(vae, xtr[:n_bits], sched)
        n_val = min(xte.shape[0], 1000)
        bits_te = encode_bits(vae, xte[:n_val], sched)
        encode_s = time.perf_counter() - t
        seed_everything(seed + 1)
        text_encoder = TextEncoder(recipe.text_config())
        model = InfinityTransformer(recipe.infinity_config())
        init_infinity_weights(model)
        inf_res = train_infinity(model, text_encoder, vae, bits_tr, ytr[:n_bits], TRAIN_TEMPLATES, sched, infinity_steps,
                                 batch_size=ibs, lr=infinity_lr, cond_drop_rate=recipe.cond_drop_rate, seed=seed, progress=progress)
        n_tr_eval = min(n_bits, 1000)
        evals = {
            "train": evaluate_infinity(model, text_encoder, vae, bits_tr[:n_tr_eval], ytr[:n_tr_eval], TRAIN_TEMPLATES, sched),
            "val": evaluate_infinity(model, text_encoder, vae, bits_te, yte[:n_val], TRAIN_TEMPLATES, sched),
            "val_held_out_templates": evaluate_infinity(model, text_encoder, vae, bits_te, yte[:n_val], HELD_OUT_TEMPLATES, sched),
        }
        _save_safetensors(vae, folder / "vae.safetensors", torch.float16)
        _save_safetensors(model, folder / "infinity.safetensors", torch.float16)
        _save_safetensors(text_encoder, folder / "text_encoder.safetensors", torch.float16)
        config = {
            "family": "infinity",
            "vae": dataclasses.asdict(recipe.vae_config()),
            "infinity": dataclasses.asdict(recipe.infinity_config()),
            "text_encoder": recipe.text_config().to_dict(),
            "schedule": {"h_div_w": recipe.h_div_w, "num_scales": recipe.num_scales},
            "sampling": {"cfg": INFINITY_SAMPLING.cfg, "temperature": INFINITY_SAMPLING.temperature,
                         "top_k": INFINITY_SAMPLING.top_k, "top_p": INFINITY_SAMPLING.top_p},
        }
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        metrics: Dict[str, Any] = {
            "dataset": "fashion-mnist",
            "seed": seed,
            "recipe": dataclasses.asdict(recipe),
            "torch": torch.__version__,
            "machine": f"{platform.machine()} cpu, {torch.get_num_threads()} threads",
            "vae": {
                "steps": vae_steps, "batch_size": batch_size, "lr": vae_lr, "params": _count(vae),
                "train_wall_s": vae_res["wall_s"],
                "train_final_ema": {k: round(v, 5) for k, v in (vae_res["final_ema"] or {}).items()},
                "test": {"n_images": int(xte.shape[0]), **vae_eval},
                "history": vae_res["history"],
            },
            "infinity": {
                "steps": infinity_steps, "batch_size": ibs, "lr": infinity_lr,
                "train_images_encoded": int(n_bits), "encode_wall_s": round(encode_s, 2),
                "params": _count(model), "text_encoder_params": _count(text_encoder),
                "train_wall_s": inf_res["wall_s"],
                "train_final_ema_ce": round(float(inf_res["final_ema_ce"] or 0.0), 5),
                **evals,
                "history": inf_res["history"],
            },
            "total_wall_s": round(time.perf_counter() - t_all, 2),
        }
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


@dataclasses.dataclass(frozen=True)
class HARTRecipe:
    """Architecture of the Fashion-MNIST HART model: the hybrid tokenizer (VAR's VQ-VAE, V codes of ``z_channels``,
    32x32 -> 8x8 latent, plus the last scale's continuous residual), the transformer (text tokens replace the first
    scale; ``context_token`` = the text encoder's ``text_maxlen`` words of width ``text_width``), the residual
    diffusion MLP head (trained on ``diffusion_batch_mul`` noised copies of each last-scale token), the word-level
    text encoder, and ``continuous_prob`` (the tokenizer's decoder sees the
    continuous latent that often)."""

    vocab_size: int = 512
    z_channels: int = 16
    vae_ch: int = 32
    vae_ch_mult: Tuple[int, ...] = (1, 2, 2)
    patch_nums: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8)
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    diff_width: int = 128
    diff_depth: int = 3
    diffusion_batch_mul: int = 2
    num_sampling_steps: str = "8"
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_maxlen: int = 16
    cond_drop_rate: float = 0.1
    continuous_prob: float = 0.5

    def tokenizer_config(self) -> HARTTokenizerConfig:
        return HARTTokenizerConfig(vocab_size=self.vocab_size, z_channels=self.z_channels, ch=self.vae_ch,
                                   ch_mult=self.vae_ch_mult, v_patch_nums=self.patch_nums)

    def hart_config(self) -> HARTConfig:
        return HARTConfig(patch_nums=self.patch_nums, context_token=self.text_maxlen, context_dim=self.text_width,
                          depth=self.depth, embed_dim=self.embed_dim, num_heads=self.num_heads, diff_width=self.diff_width,
                          diff_depth=self.diff_depth, num_sampling_steps=self.num_sampling_steps, use_context_norm=True)

    def text_config(self) -> TextEncoderConfig:
        from ..data import prompt_vocabulary

        return TextEncoderConfig(prompt_vocabulary(), self.text_width, self.text_layers, self.text_heads, self.text_maxlen)


# Chosen by measurement on 2 shared CPU cores (see ssg_engine/assets/fashion_mnist_hart/MODEL_CARD.md).
FASHION_MNIST_HART = HARTRecipe()


def _json_config(cfg: Any) -> Dict[str, Any]:
    """A frozen config dataclass as upstream's config.json keys (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def train_fashion_mnist_hart(
    out_dir: Union[str, Path],
    seed: int = 0,
    vae_steps: int = 500,
    hart_steps: int = 700,
    batch_size: int = 32,
    hart_batch_size: int = 64,
    recipe: HARTRecipe = FASHION_MNIST_HART,
    vae_lr: float = 1e-3,
    hart_lr: float = 1e-3,
    num_threads: Optional[int] = 2,
    data_root: Optional[Union[str, Path]] = None,
    train_limit: Optional[int] = None,
    eval_limit: Optional[int] = None,
    hart_train_images: Optional[int] = None,
    progress: bool = True,
    force: bool = False,
) -> Dict[str, Any]:
    """Train the hybrid tokenizer, then the HART transformer, diffusion head and text encoder jointly, on
    Fashion-MNIST; write upstream's layout (``llm/``, ``tokenizer/``; float16 weights), ``text_encoder.safetensors``,
    ``config.json`` and ``metrics.json`` into ``out_dir`` (appears only complete, see ``staged_output_dir``; an existing
    non-empty one is refused unless ``force``). ``ssg_engine.families.hart.load_hart(out_dir)`` loads the model.

    ``train_limit`` / ``eval_limit`` cap the train / test images (None: all); ``hart_train_images`` caps how many train
    images are tokenized for the transformer (None: steps * batch). Deterministic for a seed.
    Returns the metrics dict (also written to ``metrics.json``).
    """
    from ..data import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES
    from ..families.hart.model import HARTTransformer
    from ..families.hart.text import WordTextEncoder
    from ..families.hart.tokenizer import HARTTokenizer
    from ..families.infinity.text import TextEncoder
    from ..pretrained import HART_SAMPLING

    _check_positive(
        vae_steps=vae_steps, var_steps=hart_steps, batch_size=batch_size, var_batch_size=hart_batch_size,
        train_images=train_limit, eval_images=eval_limit, var_train_images=hart_train_images,
    )
    t_all = _start(num_threads, seed)
    tok_cfg, hart_cfg = recipe.tokenizer_config(), recipe.hart_config()
    with staged_output_dir(Path(out_dir), force) as folder:
        xtr, ytr, xte, yte = _fashion_mnist_splits(data_root, train_limit, eval_limit)

        # ---------------------------------------------------------------- stage 1: hybrid tokenizer
        tokenizer = HARTTokenizer(tok_cfg, recipe.patch_nums)
        tok_res = train_vqvae(tokenizer, xtr, vae_steps, batch_size=batch_size, lr=vae_lr, seed=seed, progress=progress,
                              continuous_prob=recipe.continuous_prob, refine_last=False)
        tok_eval = evaluate_hybrid_tokenizer(tokenizer, xte)
        if progress:
            print(f"hybrid tokenizer: {vae_steps} steps in {tok_res['wall_s']:.0f} s; test PSNR {tok_eval['psnr']} dB codes only, "
                  f"{tok_eval['psnr_residual']} dB with the residual", flush=True)

        # ---------------------------------------------------------------- stage 2: HART + diffusion head + text encoder
        hbs = hart_batch_size
        n_tok = min(xtr.shape[0], max(hbs, hart_steps * hbs), hart_train_images or xtr.shape[0])
        t = time.perf_counter()
        tok_tr, last_tr = encode_hybrid(tokenizer, xtr[:n_tok])
        n_val = min(xte.shape[0], 1000)
        tok_te, last_te = encode_hybrid(tokenizer, xte[:n_val])
        encode_s = time.perf_counter() - t
        seed_everything(seed + 1)
        text_encoder = WordTextEncoder(TextEncoder(recipe.text_config()), hart_cfg.context_token)
        model = HARTTransformer(hart_cfg, tokenizer)
        init_hart_weights(model)
        res = train_hart(model, text_encoder, tokenizer, tok_tr, last_tr, ytr[:n_tok], TRAIN_TEMPLATES, hart_steps,
                         batch_size=hbs, lr=hart_lr, cond_drop_rate=recipe.cond_drop_rate,
                         diffusion_batch_mul=recipe.diffusion_batch_mul, seed=seed, progress=progress)
        n_tr_eval = min(n_tok, 1000)
        evals = {
            "train": evaluate_hart(model, text_encoder, tokenizer, tok_tr[:n_tr_eval], last_tr[:n_tr_eval], ytr[:n_tr_eval], TRAIN_TEMPLATES),
            "val": evaluate_hart(model, text_encoder, tokenizer, tok_te, last_te, yte[:n_val], TRAIN_TEMPLATES),
            "val_held_out_templates": evaluate_hart(model, text_encoder, tokenizer, tok_te, last_te, yte[:n_val], HELD_OUT_TEMPLATES),
        }
        # upstream's keys: the tokenizer's under ``vae.`` (its HARTAutoEncoderWithDisc), the transformer's bare
        for part, module, cfg, prefix in (("tokenizer", tokenizer, tok_cfg, "vae."), ("llm", model, hart_cfg, "")):
            (folder / part).mkdir()
            _save_safetensors(module, folder / part / "model.safetensors", torch.float16, prefix)
            (folder / part / "config.json").write_text(json.dumps(_json_config(cfg), indent=1))
        _save_safetensors(text_encoder.module, folder / "text_encoder.safetensors", torch.float16)
        config = {
            "family": "hart",
            "text_encoder": recipe.text_config().to_dict(),
            "sampling": {"cfg": HART_SAMPLING.cfg, "more_smooth": HART_SAMPLING.more_smooth,
                         "num_maskgit_iters": HART_SAMPLING.num_maskgit_iters},
        }
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        metrics: Dict[str, Any] = {
            "dataset": "fashion-mnist",
            "seed": seed,
            "recipe": dataclasses.asdict(recipe),
            "torch": torch.__version__,
            "machine": f"{platform.machine()} cpu, {torch.get_num_threads()} threads",
            "tokenizer": {
                "steps": vae_steps, "batch_size": batch_size, "lr": vae_lr, "params": _count(tokenizer),
                "continuous_prob": recipe.continuous_prob,
                "train_wall_s": tok_res["wall_s"],
                "train_final_ema": {k: round(v, 5) for k, v in (tok_res["final_ema"] or {}).items()},
                "dead_code_restarts": tok_res["dead_code_restarts"],
                "test": {"n_images": int(xte.shape[0]), **tok_eval},
                "history": tok_res["history"],
            },
            "hart": {
                "steps": hart_steps, "batch_size": hbs, "lr": hart_lr,
                "train_images_tokenized": int(n_tok), "tokenize_wall_s": round(encode_s, 2),
                "params": _count(model) - _count(model.diffloss), "diffusion_head_params": _count(model.diffloss),
                "text_encoder_params": _count(text_encoder.module),
                "train_wall_s": res["wall_s"],
                "train_final_ema": {k: round(v, 5) for k, v in (res["final_ema"] or {}).items()},
                **evals,
                "history": res["history"],
            },
            "total_wall_s": round(time.perf_counter() - t_all, 2),
        }
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
