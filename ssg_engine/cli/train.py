"""``ssg-engine train``: train a small VQ-VAE + VAR on Fashion-MNIST (``ssg_engine.training.train_fashion_mnist``)."""
from __future__ import annotations

import argparse
from typing import Any

from .common import check_output_dir, int_arg


def cmd_train(args: argparse.Namespace) -> int:
    """Errors (a refused --out, a missing dataset) and Ctrl-C are reported by ``run_cli``."""
    check_output_dir(args.out, "--out")
    from ..training import train_fashion_mnist

    m = train_fashion_mnist(
        args.out, seed=args.seed, vae_steps=args.vae_steps, var_steps=args.var_steps, batch_size=args.batch_size,
        var_batch_size=args.var_batch_size, var_train_images=args.var_train_images, train_limit=args.train_images,
        eval_limit=args.eval_images, force=args.force,
    )
    print(
        f"wrote {args.out}: VQ-VAE test PSNR {m['vae']['test']['psnr']:.2f} dB, "
        f"VAR val CE {m['var']['val']['ce']:.3f}, total {m['total_wall_s']:.0f} s"
    )
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``train`` on the ``ssg-engine`` subparsers."""
    p = sub.add_parser("train", help="train a small VQ-VAE + VAR (CPU-sized) on Fashion-MNIST")
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist"])
    p.add_argument("--out", required=True,
                   help="output folder for vae/var .safetensors, config.json, metrics.json; it appears only once training has "
                        "finished (until then the run writes .<out>.partial-<pid> next to it)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out (only once training has finished)")
    p.add_argument("--seed", type=int_arg(0), default=0)
    # defaults = the recipe of the shipped model (assets/fashion_mnist/MODEL_CARD.md)
    p.add_argument("--vae-steps", type=int_arg(1), default=400)
    p.add_argument("--var-steps", type=int_arg(1), default=900)
    p.add_argument("--batch-size", type=int_arg(1), default=32, help="VQ-VAE batch size")
    p.add_argument("--var-batch-size", type=int_arg(1), default=64)
    p.add_argument("--var-train-images", type=int_arg(1), default=25000, help="train images tokenized for the VAR")
    p.add_argument("--train-images", type=int_arg(1), default=None, help="use only the first N training images (default: all 60000)")
    p.add_argument("--eval-images", type=int_arg(1), default=None, help="test images for the reported metrics (default: all 10000)")
    p.set_defaults(func=cmd_train)
