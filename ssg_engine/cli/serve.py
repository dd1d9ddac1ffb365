"""``ssg-engine serve``: the HTTP service (``ssg_engine.serve``): OpenAI's images API, batching concurrent requests.
SIGTERM (or Ctrl-C) drains: new requests get 503, queued ones finish, then it exits (0; 130 after Ctrl-C)."""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, List

from .common import UsageError, add_model_args, check_model_args, float_arg, int_arg, load_from_args, load_hart_from_args, load_infinity_from_args


def served_models(args: argparse.Namespace) -> List[Any]:
    """The models the flags name: both shipped models (no --family, no --var), the shipped model of --family, or
    --var/--vae checkpoints of --family (default var) under --name (default: the --var file's stem)."""
    from ..serve.models import ServedModel, shipped_models

    both = args.family is None and not args.var
    args.family = args.family or "var"
    check_model_args(args)  # --var with --vae, checkpoint flags only with them, --family hart only with them
    if not args.var:
        if args.name is not None:
            raise UsageError("--name names --var/--vae checkpoints; the shipped models have their own names: drop --name")
        return shipped_models(args.device, ("var", "infinity") if both else (args.family,))
    name = args.name or args.var.rstrip("/").split("/")[-1].rsplit(".", 1)[0]
    if args.family == "var":
        vae, var = load_from_args(args)
        from ..params import SamplingParams

        return [ServedModel(name, "var", var, vae, SamplingParams(seed=None), num_classes=var.num_classes)]
    if args.family == "infinity":
        from ..families.infinity.model import scale_schedule
        from ..params import INFINITY_UPSTREAM

        model, vae, text_encoder = load_infinity_from_args(args)
        if text_encoder is None:
            raise UsageError("--family infinity with --var/--vae needs --text-encoder FOLDER: the service takes prompts")
        if model.config.num_scales is None:
            raise UsageError(f"--var {args.var}: its number of scales is unknown (a checkpoint's shapes cannot tell it); "
                             'give a --config file with {"num_scales": N}')
        return [ServedModel(name, "infinity", model, vae, INFINITY_UPSTREAM.replace(seed=None), text_encoder=text_encoder,
                            keywords={"schedule": scale_schedule(1.0, model.config.num_scales)})]
    from ..params import HART_UPSTREAM

    model, tokenizer, text_encoder = load_hart_from_args(args)
    if text_encoder is None:
        raise UsageError("--family hart needs --text-encoder FOLDER (Qwen2): the service takes prompts")
    return [ServedModel(name, "hart", model, tokenizer, HART_UPSTREAM.replace(seed=None), text_encoder=text_encoder)]


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve.app import create_app, run_server

    if args.max_n > args.max_queue:
        raise UsageError(f"--max-n {args.max_n} is more than --max-queue {args.max_queue}: such a request could never be queued; "
                         "lower --max-n or raise --max-queue")
    models = served_models(args)
    for m in models:
        m.warm_up()
    app = create_app(models, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                     max_n=args.max_n, timeout_s=args.timeout_s, max_body_bytes=args.max_body_kb * 1024)
    stopped_by = run_server(app, args.host, args.port, drain_timeout_s=args.timeout_s,
                            on_start=lambda url: print(f"serving {', '.join(m.name for m in models)} at {url}", file=sys.stderr, flush=True))
    if stopped_by == signal.SIGINT:  # Ctrl-C: drained, then the CLI's usual line and status
        print("interrupted", file=sys.stderr)
        return 130
    return 0  # SIGTERM: drained


def add_parsers(sub: Any) -> None:
    """Register ``serve`` on the ``ssg-engine`` subparsers."""
    p = sub.add_parser("serve", help="HTTP service: OpenAI's images API (+ SSG fields), batching concurrent requests; a web page at /")
    add_model_args(p, infinity=True)
    p.set_defaults(family=None)  # no --family and no --var: both shipped models
    p.add_argument("--name", default=None, help="the API's model name for --var/--vae (default: the --var file's stem)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int_arg(0, 65535), default=8000, help="TCP port (default 8000; 0: any free port, printed)")
    p.add_argument("--max-batch", type=int_arg(1, 4096), default=16, help="most images per Engine batch (default 16)")
    p.add_argument("--max-wait-ms", type=float_arg(0.0, 60000.0), default=10.0,
                   help="how long the oldest waiting request waits for others to batch with (default 10 ms)")
    p.add_argument("--max-queue", type=int_arg(1, 1 << 20), default=256,
                   help="most images waiting; past it requests get 503 with Retry-After (default 256)")
    p.add_argument("--max-n", type=int_arg(1, 4096), default=64, help="most images one request may ask for (default 64)")
    p.add_argument("--timeout-s", type=float_arg(0.001, 86400.0), default=300.0,
                   help="per-request timeout (504 past it), and the longest SIGTERM waits to drain (default 300)")
    p.add_argument("--max-body-kb", type=int_arg(1, 1 << 20), default=64, help="largest request body, in KiB (default 64; 413 past it)")
    p.set_defaults(func=cmd_serve)
