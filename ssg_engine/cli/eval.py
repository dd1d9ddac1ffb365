"""``ssg-engine eval`` (the SSG ablation table, ``ssg_engine.eval.ablation``) and ``ssg-engine fid-sample`` (a sample
set for the guided-diffusion evaluator, ``ssg_engine.eval.fid_sample``; run it under ``torchrun`` as
``torchrun --nproc_per_node N -m ssg_engine.cli fid-sample ...``)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..data import SPLIT_SIZES
from ..eval import ablation, fid_sample
from ..families.infinity.model import scale_schedule
from ..files import portable_path
from ..pretrained import HART_SAMPLING, INFINITY_SAMPLING, SAMPLING, pretrained_files
from ..validation import check_memory
from .common import (
    CFG_MAX, INT32_MAX, SSG_BETA_MAX, TEMPERATURE_MAX, TEMPERATURE_MIN, UsageError, add_model_args, add_sampling_args, check_model_args,
    check_output_dir, check_output_file, float_arg, int_arg, load_from_args, load_infinity_from_args, model_default_help,
    load_hart_from_args, model_family, model_sampling, parse_floats, report_assumed_settings, resolve_ssg_args, sampling_from_args,
)
from .sample import image_pixels


def cmd_eval(args: argparse.Namespace) -> int:
    check_output_dir(args.out_dir, "--out-dir")
    betas = parse_floats(args.betas, "--betas", -SSG_BETA_MAX, SSG_BETA_MAX)
    temperatures = parse_floats(args.temperatures, "--temperatures", TEMPERATURE_MIN, TEMPERATURE_MAX)
    card = model_sampling(args)  # the model's settings for the flags left unset
    cfg, top_k, top_p = (card_value if flag is None else flag for flag, card_value in
                         ((args.cfg, card.cfg), (args.top_k, card.top_k), (args.top_p, card.top_p)))
    text_encoder, options, schedule = None, {}, None
    if args.no_residual and model_family(args) != "hart":
        raise UsageError("--no-residual drops HART's diffusion residual; it is for --family hart")
    if model_family(args) == "hart":
        check_model_args(args)
        if args.var and not args.text_encoder:  # before any model loads
            raise UsageError("eval --family hart asks for prompts: give --text-encoder FOLDER with --var/--vae")
        model, vae, text_encoder = load_hart_from_args(args)
        options = {"more_smooth": card.more_smooth, "num_maskgit_iters": card.num_maskgit_iters, "residual": not args.no_residual}
        what = "shipped pretrained Fashion-MNIST text-to-image HART (ssg_engine.pretrained)"
    elif model_family(args) == "infinity":
        check_model_args(args)
        if args.var and not args.text_encoder:  # before any model loads
            raise UsageError("eval --family infinity asks for prompts: give --text-encoder FOLDER with --var/--vae")
        model, vae, text_encoder = load_infinity_from_args(args)
        if model.config.num_scales is None:
            raise UsageError(f"eval: the number of scales of {args.var} is unknown (a checkpoint's shapes cannot tell it); "
                             'give it in a --config file, e.g. {"num_scales": 5}')
        report_assumed_settings(args)
        what = "shipped pretrained Fashion-MNIST text-to-image Infinity (ssg_engine.pretrained)"
        schedule = scale_schedule(1.0, model.config.num_scales)
    else:
        vae, model = load_from_args(args)
        what = "shipped pretrained Fashion-MNIST VAR (ssg_engine.pretrained)"
    check_memory(args.samples * 3 * 4 * image_pixels(model, vae, schedule), f"--samples {args.samples}",
                 "an arm's samples are held in memory as float32 images; give a smaller --samples")
    desc = f"{portable_path(args.var)} + {portable_path(args.vae)}" if args.var else what
    priors = [p for v in args.priors for p in v.split(",") if p]
    ablation.run_ablation(
        model, vae, args.out_dir, text_encoder=text_encoder, samples=args.samples, seeds=args.seeds, betas=betas,
        temperatures=temperatures, priors=priors, cfg=cfg, top_k=top_k, top_p=top_p, options=options,
        batch_size=args.batch_size, fid_arms=args.fid_arms, inception_ref_n=args.inception_ref_n,
        inception_batch_size=args.inception_batch_size, classifier=args.classifier, cache=args.cache_dir,
        spectrum_temperature=args.spectrum_temperature, resume=args.resume, model_desc=desc,
        log=lambda m: print(m, flush=True),
    )
    return 0


def cmd_fid_sample(args: argparse.Namespace) -> int:
    check_output_file(args.out, (".npz",), "--out")
    if args.shard_dir is not None:
        check_output_dir(args.shard_dir, "--shard-dir")
    resolve_ssg_args(args)
    if args.var:
        var_file, vae_file = Path(args.var), Path(args.vae)
    else:
        vae_file, var_file, _ = pretrained_files()
    job = fid_sample.FidSampleJob(
        model_files={"var": var_file, "vae": vae_file}, out=Path(args.out),
        sampling=sampling_from_args(args, model_sampling(args), args.ssg_beta), per_class=args.per_class,
        shard_size=args.batch_size, sampler=args.sampler, device=args.device, num_classes=args.num_classes,
        threads=args.threads, shard_dir=Path(args.shard_dir) if args.shard_dir else None,
    )
    fid_sample.run_fid_sample(job, lambda device: load_from_args(args, device=device))
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``eval`` and ``fid-sample`` on the ``ssg-engine`` subparsers."""
    p = sub.add_parser(
        "eval", help="SSG ablation table (classifier accuracy, FD-classifier, Inception FID) + spectrum PNG",
        description=ablation.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p, infinity=True)
    p.add_argument("--samples", type=int_arg(4), default=1000, help="class-balanced samples per arm per seed")
    p.add_argument("--seeds", type=int_arg(1), default=3)
    p.add_argument("--betas", nargs="+", default=[str(b) for b in ablation.DEFAULT_BETAS], help="SSG strengths (space- or comma-separated)")
    p.add_argument("--temperatures", nargs="+", default=[str(t) for t in ablation.DEFAULT_TEMPERATURES],
                   help="the temperature grid, used for every arm")
    p.add_argument("--priors", nargs="+", default=list(ablation.DEFAULT_PRIORS), help="SSG priors: dse and the ablations bilinear bicubic nearest area")
    p.add_argument("--cfg", type=float_arg(-CFG_MAX, CFG_MAX), default=None,
                   help=f"default: the model card's settings (shipped VAR: cfg {SAMPLING.cfg:g}, top-k {SAMPLING.top_k}, top-p "
                        f"{SAMPLING.top_p:g}; shipped Infinity: cfg (w) {INFINITY_SAMPLING.cfg:g}, top-k {INFINITY_SAMPLING.top_k}, "
                        f"top-p {INFINITY_SAMPLING.top_p:g}; shipped HART: cfg {HART_SAMPLING.cfg:g}, top-k {HART_SAMPLING.top_k}, "
                        f"top-p {HART_SAMPLING.top_p:g}), or upstream's for --var/--vae")
    p.add_argument("--top-k", type=int_arg(0, INT32_MAX), default=None)
    p.add_argument("--top-p", type=float_arg(0.0, 1.0), default=None)
    p.add_argument("--batch-size", type=int_arg(1), default=100)
    p.add_argument("--no-residual", action="store_true",
                   help="--family hart: decode the last scale from its discrete codes only (no diffusion residual), the "
                        "ablation only hybrid tokens allow")
    p.add_argument("--fid-arms", choices=["main", "all", "none"], default="main", help="arms scored with Inception FID/KID (main: baseline + DSE)")
    p.add_argument("--inception-ref-n", type=int_arg(1, SPLIT_SIZES["test"]), default=SPLIT_SIZES["test"],
                   help="test images for the Inception reference statistics (at most the test split's)")
    p.add_argument("--inception-batch-size", type=int_arg(1), default=100)
    p.add_argument("--classifier", default=None,
                   help="classifier weights, an existing file (default: the shipped weights, else the cache dir's, trained on first use)")
    p.add_argument("--cache-dir", default=None, help="cache for classifier / reference statistics (default $SSG_ENGINE_CACHE or ~/.cache/ssg_engine)")
    p.add_argument("--spectrum-temperature", type=float_arg(TEMPERATURE_MIN, TEMPERATURE_MAX), default=None,
                   help="temperature of the spectrum plot's arms (default 1.0 if in the grid)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the (arm, seed) results stored in OUT_DIR/runs/ whose settings match; compute only the others")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "fid-sample",
        help="class-conditional samples as an npz for the guided-diffusion evaluator (resumable, torchrun data-parallel)",
        description=fid_sample.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--per-class", type=int_arg(1), default=50, help="images per class")
    p.add_argument("--num-classes", type=int_arg(1), default=None, help="sample classes 0..N-1 (default: all of the model's)")
    p.add_argument("--batch-size", type=int_arg(1), default=50, help="images per shard (= per sampling batch); part of the determinism key")
    p.add_argument("--seed", type=int_arg(0), default=None, help=f"base seed; shard (c, start) uses shard_seed(seed, c, start); {model_default_help('seed')}")
    p.add_argument("--sampler", choices=fid_sample.SAMPLERS, default="reference",
                   help="reference: sample_reference with that seed (bit-reproducible on CPU); engine: ssg_engine.generate (the fast Engine on CUDA)")
    p.add_argument("--threads", type=int_arg(1), default=None,
                   help="CPU threads per process (default 1 on CPU: BLAS reductions, hence the bits, depend on the thread count)")
    p.add_argument("--out", default="samples.npz")
    p.add_argument("--shard-dir", default=None, help="where shards go (default: <out>.shards)")
    p.set_defaults(func=cmd_fid_sample)
