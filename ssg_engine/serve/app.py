"""The ASGI app (FastAPI): OpenAI's images API plus our fields, ``/v1/models``, ``/healthz``, ``/metrics`` and the
web page at ``/``, over one ``Scheduler``; ``run_server`` serves it with uvicorn (SIGTERM drains).

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with one-line messages: 400 a body
that is not a JSON object, 404 an unknown model, 413 a body over the size limit, 422 a bad field, 503 a full queue
(with ``Retry-After``) or a draining server, 504 a request past its timeout. The app holds no state outside itself:
everything lives on ``app.state``. Needs the ``serve`` extra (FastAPI, uvicorn).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import signal
import threading
import time
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from ..imaging import to_uint8
from ..seeding import row_seeds
from .metrics import Metrics
from .models import ServedModel
from .page import PAGE
from .request import ImageRequest, RequestError, parse_request
from .scheduler import Draining, Job, QueueFull, Scheduler


def png_b64(images: torch.Tensor) -> List[str]:
    """Each image of ``images`` (B, 3, H, W) in [0, 1] as a base64 PNG."""
    from PIL import Image

    out = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def error_response(status: int, message: str, param: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    """OpenAI's error body with HTTP ``status``."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status,
                        headers=headers)


# What a batch's run raises for settings the model refused (its family's limits): 422, the message on one line.
MODEL_REFUSED = (TypeError, ValueError)


async def read_json(request: Request, max_body_bytes: int) -> Any:
    """The decoded JSON body of ``request``; ``RequestError`` 413 past ``max_body_bytes`` (read no further), 400 when it
    is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise RequestError(413, None, f"the body is {declared} bytes; at most {max_body_bytes} are read (ask for fewer, shorter prompts)")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_body_bytes:
            raise RequestError(413, None, f"the body is over {max_body_bytes} bytes; at most {max_body_bytes} are read")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, None, f"the body is not JSON ({e.msg if hasattr(e, 'msg') else e.reason}); send a JSON object") from None


def images_response(req: ImageRequest, pngs: List[str]) -> JSONResponse:
    """The 200 answer to ``req``: OpenAI's ``{"created", "model", "data": [{"b64_json"}]}`` plus the request's ``seed``."""
    return JSONResponse({"created": int(time.time()), "model": req.model.name, "seed": req.seed,
                         "data": [{"b64_json": p} for p in pngs]})


async def _disconnected(receive: Any) -> None:
    """Return once the client has gone (the body is read, so the next ASGI message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(models: Sequence[ServedModel], *, max_batch: int = 16, max_wait_ms: float = 10.0, max_queue: int = 256,
               max_n: int = 64, timeout_s: float = 300.0, max_body_bytes: int = 65536) -> FastAPI:
    """The FastAPI app serving ``models`` (the first is the default ``model``; call ``warm_up`` on them first). The
    scheduler's limits: ``max_batch`` rows per batch, ``max_wait_ms`` of waiting for more, ``max_queue`` rows
    waiting; per request at most ``max_n`` images, ``timeout_s`` seconds and a body of ``max_body_bytes``."""
    served: Dict[str, ServedModel] = {m.name: m for m in models}
    if not served:
        raise ValueError("models: give at least one model to serve")
    if max_n > max_queue:
        raise ValueError(f"max_n ({max_n}) is more than max_queue ({max_queue}): such a request could never be queued")

    def run_batch(key: Hashable, conds: List[Any], seeds: torch.Tensor) -> List[str]:
        name, settings = key
        return png_b64(served[name].run(conds, settings, seeds))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.scheduler.start()
        yield
        await app.state.scheduler.drain(timeout_s)

    app = FastAPI(title="ssg-engine", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    scheduler = Scheduler(run_batch, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    metrics = Metrics(max_batch, lambda: scheduler.queued_rows)
    scheduler.on_batch = metrics.batch
    app.state.scheduler, app.state.metrics, app.state.models = scheduler, metrics, served

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/healthz")
    async def healthz() -> Any:
        if scheduler.draining:
            return error_response(503, "draining: the server is shutting down")
        return {"status": "ok", "models": list(served), "queue_depth": scheduler.queued_rows}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        return metrics.render()

    @app.get("/v1/models")
    async def list_models() -> Any:
        return {"object": "list", "data": [m.describe() for m in served.values()]}

    @app.post("/v1/images/generations")
    async def images(request: Request) -> Any:
        start = time.monotonic()
        response, count = await _generate(request)
        metrics.request(response.status_code, time.monotonic() - start, count)
        return response

    async def _generate(request: Request) -> Tuple[Any, int]:
        """(the response, the number of images in it)."""
        try:
            scheduler.check_open()  # before reading the body
            req = parse_request(await read_json(request, max_body_bytes), served, max_n)
            job = Job((req.model.name, req.settings), req.conds, row_seeds(req.seed, req.n))
            scheduler.submit(job)
        except RequestError as e:
            return error_response(e.status, str(e), e.param), 0
        except QueueFull as e:
            return error_response(503, str(e), headers={"Retry-After": str(e.retry_after)}), 0
        except Draining as e:
            return error_response(503, str(e)), 0
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            done, _ = await asyncio.wait({job.future, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if job.future not in done:
            scheduler.cancel(job)
            if gone in done:
                return error_response(499, "the client disconnected"), 0
            return error_response(504, f"timeout: the request did not finish in {timeout_s:g} s; ask for fewer images or retry"), 0
        try:
            pngs = job.future.result()
        except MODEL_REFUSED as e:  # settings the model refused when it ran (its family's limits)
            return error_response(422, " ".join(str(e).split())), 0
        return images_response(req, pngs), len(pngs)

    return app


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, drain_timeout_s: float = 300.0,
               on_start: Optional[Callable[[str], None]] = None) -> Optional[int]:
    """Serve ``app`` with uvicorn until SIGTERM / Ctrl-C; then new requests get 503 while the queued and running ones
    finish (at most ``drain_timeout_s``), and it returns the signal that stopped it (None: none). ``on_start(url)`` is
    called once it listens (port 0: the port it got)."""
    import uvicorn

    received: List[int] = []

    class DrainingServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # uvicorn's, without re-raising the signal once drained
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: Any) -> None:
            received.append(sig)
            app.state.scheduler.draining = True
            super().handle_exit(sig, frame)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if on_start is not None and self.servers:
                bound_host, bound_port = self.servers[0].sockets[0].getsockname()[:2]
                on_start(f"http://{bound_host}:{bound_port}/")

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(drain_timeout_s) + 1)
    DrainingServer(config).run()
    return received[0] if received else None
