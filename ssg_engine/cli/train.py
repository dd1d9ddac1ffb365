"""``ssg-engine train``: train a small model on Fashion-MNIST: ``--family var`` (default) a VQ-VAE + class-conditional
VAR (``ssg_engine.training.train_fashion_mnist``), ``--family infinity`` a BSQ VAE + text-to-image Infinity with its
text encoder (``ssg_engine.training.train_fashion_mnist_infinity``), ``--family hart`` a hybrid tokenizer + text-to-image
HART with its diffusion head and text encoder (``ssg_engine.training.train_fashion_mnist_hart``)."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from ..data import SPLIT_SIZES
from .common import check_output_dir, int_arg

# defaults per family = the recipes of the shipped models (assets/fashion_mnist*/MODEL_CARD.md)
DEFAULTS: Dict[str, Dict[str, int]] = {
    "var": {"vae_steps": 400, "var_steps": 900, "batch_size": 32, "var_batch_size": 64, "var_train_images": 25000},
    "infinity": {"vae_steps": 800, "var_steps": 1000, "batch_size": 32, "var_batch_size": 64, "var_train_images": 40000},
    "hart": {"vae_steps": 500, "var_steps": 700, "batch_size": 32, "var_batch_size": 64, "var_train_images": 25000},
}


def cmd_train(args: argparse.Namespace) -> int:
    """Errors (a refused --out, a missing dataset) and Ctrl-C are reported by ``run_cli``."""
    check_output_dir(args.out, "--out")
    opts = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in DEFAULTS[args.family].items()}
    common = dict(seed=args.seed, train_limit=args.train_images, eval_limit=args.eval_images, force=args.force)
    if args.family == "hart":
        from ..training import train_fashion_mnist_hart

        m = train_fashion_mnist_hart(
            args.out, vae_steps=opts["vae_steps"], hart_steps=opts["var_steps"], batch_size=opts["batch_size"],
            hart_batch_size=opts["var_batch_size"], hart_train_images=opts["var_train_images"], **common,
        )
        tok = m["tokenizer"]["test"]
        print(
            f"wrote {args.out}: hybrid tokenizer test PSNR {tok['psnr']:.2f} dB codes only, {tok['psnr_residual']:.2f} dB "
            f"with the residual; HART val CE {m['hart']['val']['ce']:.3f}, diffusion loss "
            f"{m['hart']['val']['diffusion_loss']:.4f}, total {m['total_wall_s']:.0f} s"
        )
        return 0
    if args.family == "infinity":
        from ..training import train_fashion_mnist_infinity

        m = train_fashion_mnist_infinity(
            args.out, vae_steps=opts["vae_steps"], infinity_steps=opts["var_steps"], batch_size=opts["batch_size"],
            infinity_batch_size=opts["var_batch_size"], infinity_train_images=opts["var_train_images"], **common,
        )
        print(
            f"wrote {args.out}: BSQ VAE test PSNR {m['vae']['test']['psnr']:.2f} dB, "
            f"Infinity val bit CE {m['infinity']['val']['ce']:.4f} (bit acc {m['infinity']['val']['bit_acc']:.4f}), "
            f"total {m['total_wall_s']:.0f} s"
        )
        return 0
    from ..training import train_fashion_mnist

    m = train_fashion_mnist(
        args.out, vae_steps=opts["vae_steps"], var_steps=opts["var_steps"], batch_size=opts["batch_size"],
        var_batch_size=opts["var_batch_size"], var_train_images=opts["var_train_images"], **common,
    )
    print(
        f"wrote {args.out}: VQ-VAE test PSNR {m['vae']['test']['psnr']:.2f} dB, "
        f"VAR val CE {m['var']['val']['ce']:.3f}, total {m['total_wall_s']:.0f} s"
    )
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``train`` on the ``ssg-engine`` subparsers."""
    p = sub.add_parser("train", help="train a small VQ-VAE + VAR, BSQ VAE + text-to-image Infinity, or hybrid tokenizer + "
                                     "text-to-image HART (CPU-sized), on Fashion-MNIST")
    p.add_argument("--family", default="var", choices=["var", "infinity", "hart"],
                   help="var: class-conditional VQ-VAE + VAR (default); infinity: BSQ VAE + Infinity + text encoder; "
                        "hart: hybrid tokenizer + HART + diffusion head + text encoder")
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist"])
    p.add_argument("--out", required=True,
                   help="output folder for the weights (.safetensors), config.json, metrics.json; it appears only once training "
                        "has finished (until then the run writes .<out>.partial-<pid> next to it)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out (only once training has finished)")
    p.add_argument("--seed", type=int_arg(0), default=0)

    def dflt(key: str) -> str:
        return "default: " + ", ".join(f"{fam} {d[key]}" for fam, d in DEFAULTS.items())

    p.add_argument("--vae-steps", type=int_arg(1), default=None, help=f"VQ-VAE / BSQ VAE / hybrid tokenizer steps ({dflt('vae_steps')})")
    p.add_argument("--var-steps", type=int_arg(1), default=None, help=f"transformer (VAR / Infinity / HART) steps ({dflt('var_steps')})")
    p.add_argument("--batch-size", type=int_arg(1), default=None, help=f"VAE batch size ({dflt('batch_size')})")
    p.add_argument("--var-batch-size", type=int_arg(1), default=None, help=f"transformer batch size ({dflt('var_batch_size')})")
    p.add_argument("--var-train-images", type=int_arg(1, SPLIT_SIZES["train"]), default=None,
                   help=f"train images tokenized for the transformer ({dflt('var_train_images')})")
    p.add_argument("--train-images", type=int_arg(1, SPLIT_SIZES["train"]), default=None,
                   help=f"use only the first N training images (default: all {SPLIT_SIZES['train']})")
    p.add_argument("--eval-images", type=int_arg(1, SPLIT_SIZES["test"]), default=None,
                   help=f"test images for the reported metrics (default: all {SPLIT_SIZES['test']})")
    p.set_defaults(func=cmd_train)
