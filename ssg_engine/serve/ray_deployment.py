"""The HTTP service as a Ray Serve deployment (the ``ray`` extra), for clusters of many nodes: the same API as
``ssg-engine serve`` (``POST /v1/images/generations``, ``GET /v1/models``, ``GET /healthz``), the same request checks
(``parse_request``: the same one-line errors and status codes), the same batch runner (``ServedModel.run``) and the
same per-row seeding, so a request's images are ``generate(..., seed=s)``'s for it alone.

Each image of a request is one item of ``@serve.batch``; a batch Ray hands over may hold rows of different models or
settings, and ``run_rows`` splits it into groups of equal (model, ``Settings``) that each run once. Ray does the
rest: replicas (``num_replicas``, one GPU each with ``num_gpus=1``), routing, and back-pressure
(``max_ongoing_requests`` / ``max_queued_requests``). Run it with ``serve run``::

    serve run ssg_engine.serve.ray_deployment:build_app flags="--family var --max-batch 16" num_replicas=2

or from Python with ``serve.run(deployment(load, ...).bind())``. Ray is imported inside the functions that need it:
this module imports without Ray.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import shlex
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..seeding import row_seeds
from .app import MODEL_REFUSED, error_response, images_response, png_b64, read_json
from .models import ServedModel, Settings
from .request import RequestError, parse_request

# ``ssg-engine serve`` flags that Ray owns: where it listens (``serve start --http-port`` or ``serve.start(http_options=)``)
# and its queue (``max_queued_requests``, counted in requests, not images).
RAY_OWNED_FLAGS = ("--host", "--port", "--max-queue")


@dataclasses.dataclass(frozen=True)
class Row:
    """One image of a request, the item ``@serve.batch`` batches: the model's name, the batch settings, the condition
    (a class label or a prompt) and the row's seed key (``seeding.row_seeds(seed, n)[r]``)."""

    model: str
    settings: Settings
    cond: Any
    seed: int


def run_rows(models: Dict[str, ServedModel], rows: Sequence[Row]) -> List[Union[str, Exception]]:
    """One batch of ``rows`` (N,) as N base64 PNGs: the rows are grouped by (model, settings), in order of first
    appearance, and each group runs once (``ServedModel.run`` with its rows' seeds). A group that raises gives its
    exception in place of each of its rows' PNGs (the other groups still run)."""
    groups: Dict[Tuple[str, Settings], List[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row.model, row.settings), []).append(i)
    out: List[Union[str, Exception]] = [""] * len(rows)
    for (name, settings), index in groups.items():
        try:
            seeds = torch.tensor([rows[i].seed for i in index], dtype=torch.int64)
            results: List[Union[str, Exception]] = list(png_b64(models[name].run([rows[i].cond for i in index], settings, seeds)))
        except Exception as e:  # noqa: BLE001 - handed to the rows' requests, which answer 422 or re-raise it
            results = [e] * len(index)
        for i, result in zip(index, results):
            out[i] = result
    return out


def deployment(load: Callable[[], Sequence[ServedModel]], *, max_batch: int = 16, max_wait_ms: float = 10.0,
               max_n: int = 64, timeout_s: float = 300.0, max_body_bytes: int = 65536, **options: Any) -> Any:
    """A Ray Serve deployment (``ray.serve.Deployment``; ``.bind()`` it) whose replicas each call ``load()`` (picklable,
    e.g. ``functools.partial(shipped_models, "cuda")``) for their models, warm them up, and serve them. ``@serve.batch``
    takes at most ``max_batch`` images and waits at most ``max_wait_ms`` for them; per request at most ``max_n``
    images, ``timeout_s`` seconds (504) and a body of ``max_body_bytes`` (413). ``options`` go to
    ``serve.deployment`` (``num_replicas``, ``ray_actor_options``, ``max_queued_requests``, ...);
    ``max_ongoing_requests`` defaults to ``2 * max_batch``, so that a full batch can gather while one runs."""
    for name, value, low in (("max_batch", max_batch, 1), ("max_n", max_n, 1), ("max_body_bytes", max_body_bytes, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: {value!r} is not an integer >= {low}; give one")
    for name, value in (("max_wait_ms", max_wait_ms), ("timeout_s", timeout_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name}: {value!r} is not a number >= 0; give one")
    if not callable(load):
        raise ValueError(f"load: {load!r} is not callable; give a function returning the ServedModels to serve")
    from ray import serve

    options.setdefault("max_ongoing_requests", 2 * max_batch)

    @serve.deployment(**options)
    @serve.ingress()  # the app is built in each replica (__serve_build_asgi_app__), never pickled
    class SSGImages:
        """One replica: its models (loaded and warmed up once), the batch queue of their rows, and the FastAPI app."""

        def __init__(self) -> None:
            models = list(load())
            if not models:
                raise ValueError("load: it returned no models; return at least one ServedModel")
            for m in models:
                m.warm_up()
            self.models: Dict[str, ServedModel] = {m.name: m for m in models}

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_ms / 1000.0)
        async def run(self, rows: List[Row]) -> List[Union[str, Exception]]:
            return await asyncio.to_thread(run_rows, self.models, rows)  # the replica's event loop stays free

        async def images(self, request: Request) -> JSONResponse:
            """``POST /v1/images/generations``: ``app.py``'s checks and answers, each image one item of ``run``."""
            try:
                req = parse_request(await read_json(request, max_body_bytes), self.models, max_n)
            except RequestError as e:
                return error_response(e.status, str(e), e.param)
            rows = [Row(req.model.name, req.settings, c, s) for c, s in zip(req.conds, row_seeds(req.seed, req.n).tolist())]
            try:
                results = await asyncio.wait_for(asyncio.gather(*(self.run(r) for r in rows)), timeout_s)
            except asyncio.TimeoutError:
                return error_response(504, f"timeout: the request did not finish in {timeout_s:g} s; ask for fewer images or retry")
            failed = next((r for r in results if isinstance(r, Exception)), None)
            if isinstance(failed, MODEL_REFUSED):  # settings the model refused when it ran (its family's limits)
                return error_response(422, " ".join(str(failed).split()))
            if failed is not None:
                raise failed
            return images_response(req, results)

        def __serve_build_asgi_app__(self) -> FastAPI:
            api = FastAPI(title="ssg-engine", docs_url=None, redoc_url=None, openapi_url=None)
            api.add_route("/v1/images/generations", self.images, methods=["POST"])  # Starlette's: it takes the Request
            api.get("/v1/models")(lambda: {"object": "list", "data": [m.describe() for m in self.models.values()]})
            api.get("/healthz")(lambda: {"status": "ok", "models": list(self.models)})
            return api

    return SSGImages


def build_app(args: Dict[str, str]) -> Any:
    """The application ``serve run ssg_engine.serve.ray_deployment:build_app key=value ...`` deploys (a
    ``ray.serve.Application``). Keys: ``flags`` (``ssg-engine serve``'s model and limit flags in one string, e.g.
    ``"--family infinity --var m.pth --vae v.pth --text-encoder t5/ --max-batch 32"``; none: both shipped models on the
    CPU), ``num_replicas`` (default 1), ``num_gpus`` per replica (default 1 with ``--device cuda``, else 0) and
    ``num_cpus`` per replica (default 1). ``--host``, ``--port`` and ``--max-queue`` are Ray's (``ValueError``): ``serve
    start --http-host/--http-port`` and the deployment's ``max_queued_requests``."""
    from ..cli import build_parser
    from ..cli.serve import served_models

    unknown = sorted(set(args) - {"flags", "num_replicas", "num_gpus", "num_cpus"})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key; the keys are flags, num_replicas, num_gpus, num_cpus")
    tokens = shlex.split(args.get("flags", ""))
    owned = [t.split("=")[0] for t in tokens if t.split("=")[0] in RAY_OWNED_FLAGS]
    if owned:
        raise ValueError(f"flags: {owned[0]} is Ray's under Ray Serve; set where it listens with `serve start --http-host/"
                         "--http-port` (or serve.start(http_options=...)), and its queue with deployment(max_queued_requests=...)")
    try:
        flags: argparse.Namespace = build_parser().parse_args(["serve", *tokens])
    except SystemExit:  # argparse printed the flag and the problem
        raise ValueError(f"flags: {args.get('flags')!r} are not `ssg-engine serve` flags (the line above says which)") from None
    counts = {}
    for key, default in (("num_replicas", 1), ("num_gpus", 1 if flags.device.startswith("cuda") else 0), ("num_cpus", 1)):
        try:
            counts[key] = float(args.get(key, default)) if key != "num_replicas" else int(args.get(key, default))
        except ValueError:
            raise ValueError(f"{key}: {args[key]!r} is not a number; give one, e.g. {key}=1") from None
        if not counts[key] >= (1 if key == "num_replicas" else 0):  # NaN too
            raise ValueError(f"{key}: {counts[key]:g} is too small; give at least {1 if key == 'num_replicas' else 0}")
    return deployment(functools.partial(served_models, flags), max_batch=flags.max_batch, max_wait_ms=flags.max_wait_ms,
                      max_n=flags.max_n, timeout_s=flags.timeout_s, max_body_bytes=flags.max_body_kb * 1024,
                      num_replicas=counts["num_replicas"],
                      ray_actor_options={"num_gpus": counts["num_gpus"], "num_cpus": counts["num_cpus"]}).bind()
