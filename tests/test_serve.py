"""The HTTP service on loopback (uvicorn in a thread, the shipped models on CPU): the OpenAI images API and our
fields, served images equal to ``generate`` for each request alone, batching, errors (one line, the right status),
the bounded queue, timeouts, disconnects, the official ``openai`` client, and ``ssg-engine serve`` (SIGTERM drains).
Every network call has a timeout; nothing leaves 127.0.0.1."""
from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import pytest
import torch

import ssg_engine as se
from ssg_engine.imaging import to_uint8

pytest.importorskip("fastapi", reason="the serve extra: pip install 'ssg-engine[serve]' (scripts/setup.sh installs it)")
TIMEOUT = 60.0
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    from ssg_engine.serve.models import shipped_models

    served = shipped_models("cpu")
    for m in served:
        m.warm_up()
    return {m.name: m for m in served}


@contextlib.contextmanager
def serving(models: Dict[str, Any], **limits: Any) -> Iterator[Tuple[str, Any]]:
    """(base URL, app) of ``create_app(models, **limits)`` served by uvicorn on 127.0.0.1 (a free port) in a thread."""
    import uvicorn

    from ssg_engine.serve.app import create_app

    app = create_app(list(models.values()), **limits)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)


def call(host: str, method: str, path: str, body: Any = None, raw: Optional[bytes] = None) -> Tuple[int, Dict[str, str], bytes]:
    """(status, headers, body) of one HTTP request (JSON ``body``, or ``raw`` bytes)."""
    conn = http.client.HTTPConnection(host, timeout=TIMEOUT)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data is not None else {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def post(host: str, body: Any) -> Tuple[int, Dict[str, Any]]:
    status, _, data = call(host, "POST", "/v1/images/generations", body)
    return status, json.loads(data)


def decode(item: Dict[str, str]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def expected(model: Any, cond: Any, seed: int, negative: Optional[str] = None, **changes: Any) -> np.ndarray:
    """``generate`` for one request alone (row seeding), as the PNGs' uint8 (B, H, W, 3)."""
    extra = dict(model.keywords, **({} if negative is None else {"negative": negative}))
    if model.text_encoder is not None:
        extra["text_encoder"] = model.text_encoder
    images = se.generate(model.model, model.vae, cond, model.defaults.replace(**changes), seed=seed, seeding="row", **extra)
    return to_uint8(images)


def assert_same_images(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    """The served PNGs are ``generate``'s images: the same draws (the tokens), so at most one uint8 step apart where the
    float32 decode of a larger batch rounds differently (a different draw changes whole regions, far past this)."""
    assert got.shape == want.shape, what
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, f"{what}: max diff {diff.max()}, {(diff > 0).mean():.2%} of the values differ"


def test_models_health_metrics_and_page(models):
    with serving(models) as (host, _):
        status, _, data = call(host, "GET", "/v1/models")
        listed = {m["id"]: m for m in json.loads(data)["data"]}
        assert status == 200 and set(listed) == {"fashion-mnist-var", "fashion-mnist-infinity"}
        assert listed["fashion-mnist-var"]["conditioning"] == "class" and listed["fashion-mnist-var"]["size"] == "32x32"
        assert listed["fashion-mnist-var"]["class_names"][7] == "sneaker"
        assert listed["fashion-mnist-infinity"]["defaults"]["ssg_scale"] == pytest.approx(0.15)
        status, _, data = call(host, "GET", "/healthz")
        assert status == 200 and json.loads(data)["status"] == "ok"
        status, _, data = call(host, "GET", "/")
        assert status == 200 and b'id="baseline"' in data and b'id="ssg"' in data
        assert post(host, {"model": "fashion-mnist-var", "class_labels": [1], "seed": 3})[0] == 200
        status, headers, data = call(host, "GET", "/metrics")
        text = data.decode()
        assert status == 200 and headers["content-type"].startswith("text/plain")
        for line in ('ssg_requests_total{code="200"} 1', "ssg_images_total 1", "ssg_queue_depth 0", "ssg_batch_size_count 1",
                     "ssg_request_latency_seconds_count 1", 'ssg_request_latency_seconds_bucket{le="+Inf"} 1'):
            assert line in text.splitlines(), line


@pytest.mark.slow
def test_served_images_equal_generate_for_each_request_alone(models):
    var, inf = models["fashion-mnist-var"], models["fashion-mnist-infinity"]
    requests = [  # same settings (one batch), then other settings, then the other model
        {"model": var.name, "class_labels": ["sneaker", 0, "bag"], "n": 3, "seed": 11},
        {"model": var.name, "class_labels": [4], "n": 2, "seed": 12},
        {"model": var.name, "prompt": "trouser", "seed": 13},
        {"model": var.name, "class_labels": [5], "n": 2, "seed": 12, "ssg_scale": 0.5, "top_k": 50, "guidance_scale": 1.5},
        {"model": inf.name, "prompt": "a photo of a sneaker", "n": 2, "seed": 14},
        {"model": inf.name, "prompt": "a photo of a bag", "seed": 15, "ssg_scale": 0.3, "ssg_prior": "bilinear",
         "negative_prompt": "a photo of a shirt", "temperature": 0.8},
    ]
    with serving(models, max_batch=8, max_wait_ms=300) as (host, app):
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda b: post(host, b), requests, timeout=TIMEOUT))
        batches = app.state.metrics.batch_size.counts
    assert all(status == 200 for status, _ in answers), answers
    assert sum(batches) < len(requests)  # the first three requests shared a batch
    want = [
        expected(var, [7, 0, 8], 11), expected(var, [4, 4], 12), expected(var, [1], 13),
        expected(var, [5, 5], 12, ssg=se.SSG(beta=0.5), top_k=50, cfg=1.5),
        expected(inf, ["a photo of a sneaker"] * 2, 14),
        expected(inf, ["a photo of a bag"], 15, negative="a photo of a shirt", ssg=se.SSG(beta=0.3, prior="bilinear"), temperature=0.8),
    ]
    for (status, body), request, images in zip(answers, requests, want):
        assert body["seed"] == request["seed"] and len(body["data"]) == request.get("n", 1)
        assert_same_images(np.stack([decode(d) for d in body["data"]]), images, json.dumps(request))


def test_a_request_without_seed_gets_one_that_reproduces_it(models):
    with serving(models) as (host, _):
        status, first = post(host, {"model": "fashion-mnist-var", "class_labels": [2], "n": 2})
        assert status == 200 and isinstance(first["seed"], int) and 0 <= first["seed"] < 2**63
        status, again = post(host, {"model": "fashion-mnist-var", "class_labels": [2], "n": 2, "seed": first["seed"]})
    assert [d["b64_json"] for d in again["data"]] == [d["b64_json"] for d in first["data"]]


@pytest.mark.parametrize("body, status, message", [
    ({"model": "nope", "prompt": "x"}, 404, "model: 'nope' is not served; GET /v1/models lists fashion-mnist-var, fashion-mnist-infinity"),
    ({"prompt": "sneaker", "n": 0}, 422, "n: 0 is out of range; give an integer in [1, 64]"),
    ({"prompt": "sneaker", "n": "2"}, 422, "n: '2' is not an integer; give an integer in [1, 64]"),
    ({"prompt": "sneaker", "guidance_scale": 5000}, 422, "guidance_scale: 5000 is out of range; give a number in [-1000, 1000]"),
    ({"prompt": "sneaker", "top_p": 1.5}, 422, "top_p: 1.5 is out of range; give a number in [0, 1]"),
    ({"prompt": "sneaker", "seed": -1}, 422, "seed: -1 is out of range; give an integer in [0, 2**63 - 1]"),
    ({"prompt": "sneaker", "ssg_prior": "fft"}, 422, "ssg_prior: 'fft' is not a prior; give one of dse, bilinear, bicubic, nearest, area, none"),
    ({"prompt": "sneaker", "response_format": "url"}, 422, "response_format: 'url' is not served"),
    ({"prompt": "sneaker", "size": "1024x1024"}, 422, "size: '1024x1024': fashion-mnist-var makes 32x32 images"),
    ({"prompt": "sneaker", "style": "vivid"}, 422, "style: unknown field"),
    ({"prompt": "shoe-horn"}, 422, "prompt: unknown class 'shoe-horn'; valid classes: 0=t-shirt"),
    ({"class_labels": [10]}, 422, "class_labels: class index 10 out of range [0, 10)"),
    ({"class_labels": [1, 2], "n": 3}, 422, "class_labels: give one label, or one per image (n=3); got 2"),
    ({"class_labels": [1], "negative_prompt": "x"}, 422, "negative_prompt: fashion-mnist-var is class-conditional"),
    ({"model": "fashion-mnist-infinity"}, 422, "prompt: fashion-mnist-infinity is text-to-image; give a prompt"),
    ({"model": "fashion-mnist-infinity", "prompt": " "}, 422, "prompt: is empty"),
    ({"model": "fashion-mnist-infinity", "prompt": "x", "class_labels": [1]}, 422, "class_labels: fashion-mnist-infinity is text-to-image"),
    ([1, 2], 400, "the body must be a JSON object"),
])
def test_bad_requests_are_one_line_with_the_right_status(models, body, status, message):
    with serving(models) as (host, _):
        got, answer = post(host, body)
        code, _, metrics = call(host, "GET", "/metrics")
    error = answer["error"]
    assert got == status and error["message"].startswith(message) and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"
    assert f'ssg_requests_total{{code="{status}"}} 1' in metrics.decode()


def test_malformed_and_oversized_bodies(models):
    with serving(models, max_body_bytes=1024) as (host, _):
        status, _, data = call(host, "POST", "/v1/images/generations", raw=b"{not json")
        assert status == 400 and json.loads(data)["error"]["message"].startswith("the body is not JSON")
        status, _, data = call(host, "POST", "/v1/images/generations", raw=b"\xff\xfe")
        assert status == 400
        status, _, data = call(host, "POST", "/v1/images/generations", {"prompt": "x" * 2000})
        assert status == 413 and "at most 1024" in json.loads(data)["error"]["message"]


def test_a_full_queue_answers_503_with_retry_after(models):
    with serving(models, max_queue=2, max_n=2, max_wait_ms=3000, max_batch=64) as (host, _):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post, host, {"class_labels": [1], "n": 2, "seed": 1})
            deadline = time.monotonic() + TIMEOUT
            while json.loads(call(host, "GET", "/healthz")[2])["queue_depth"] != 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            status, headers, data = call(host, "POST", "/v1/images/generations", {"class_labels": [1], "seed": 2})
            assert waiting.result(TIMEOUT)[0] == 200
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert json.loads(data)["error"]["message"].startswith("the queue is full (2 images waiting, at most 2)")


def test_timeouts_and_disconnects_free_their_slots(models):
    with serving(models, max_wait_ms=60000, max_batch=64, timeout_s=0.2) as (host, app):
        status, answer = post(host, {"class_labels": [1], "seed": 1})
        assert status == 504 and answer["error"]["message"].startswith("timeout: the request did not finish in 0.2 s")
        assert app.state.scheduler.queued_rows == 0
    with serving(models, max_wait_ms=60000, max_batch=64, timeout_s=60) as (host, app):
        body = json.dumps({"class_labels": [1], "n": 3, "seed": 1}).encode()
        with socket.create_connection(tuple(host.split(":")), timeout=TIMEOUT) as s:  # type: ignore[arg-type]
            s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + TIMEOUT
            while app.state.scheduler.queued_rows != 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        deadline = time.monotonic() + TIMEOUT
        while app.state.scheduler.queued_rows:  # the client has gone: its rows leave the queue
            assert time.monotonic() < deadline, "a disconnected client's rows stayed queued"
            time.sleep(0.01)


def test_the_official_openai_client(models):
    openai = pytest.importorskip("openai", reason="the serve extra's test dependency: pip install openai (scripts/setup.sh)")
    with serving(models) as (host, _):
        client = openai.OpenAI(base_url=f"http://{host}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
        r = client.images.generate(model="fashion-mnist-infinity", prompt="a photo of a bag", n=2, response_format="b64_json",
                                   extra_body={"seed": 21, "ssg_scale": 0.15})
        inf = models["fashion-mnist-infinity"]
        assert_same_images(np.stack([decode({"b64_json": d.b64_json}) for d in r.data]),
                           expected(inf, ["a photo of a bag"] * 2, 21, ssg=se.SSG(beta=0.15)))
        assert r.model_extra["seed"] == 21
        r = client.images.generate(model="fashion-mnist-var", prompt="sneaker", response_format="b64_json", extra_body={"seed": 4})
        assert_same_images(decode({"b64_json": r.data[0].b64_json}), expected(models["fashion-mnist-var"], [7], 4)[0])
        assert [m.id for m in client.models.list()] == ["fashion-mnist-var", "fashion-mnist-infinity"]
        with pytest.raises(openai.UnprocessableEntityError, match="guidance_scale: 5000 is out of range"):
            client.images.generate(model="fashion-mnist-var", prompt="sneaker", extra_body={"guidance_scale": 5000})


def _cli(*args: str, **kw: Any) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.Popen([sys.executable, "-P", "-m", "ssg_engine", "serve", *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, **kw)


@pytest.mark.parametrize("flags, message", [
    (["--max-batch", "0"], "error: --max-batch: 0 is out of range; give an integer in [1, 4096]"),
    (["--name", "x"], "error: --name names --var/--vae checkpoints"),
    (["--family", "hart", "--text-encoder", "x"], "error: --text-encoder describes --var/--vae checkpoints"),
    (["--var", "a.pth"], "error: give both --var and --vae, or neither"),
    (["--max-n", "20", "--max-queue", "10"], "error: --max-n 20 is more than --max-queue 10"),
])
def test_cli_bad_flags_are_one_line(capsys, flags, message):
    from ssg_engine.cli import main

    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_cli_serves_and_sigterm_drains_in_flight_work():
    p = _cli("--family", "var", "--port", "0", "--max-wait-ms", "1500", "--timeout-s", "60")
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "serving" not in line:
            assert time.monotonic() < deadline and p.poll() is None, line
            line = p.stderr.readline()
        host = line.split("http://")[1].strip().rstrip("/")
        assert line.startswith("serving fashion-mnist-var at http://127.0.0.1:")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(post, host, {"class_labels": [3], "n": 2, "seed": 5})
            deadline = time.monotonic() + TIMEOUT
            while json.loads(call(host, "GET", "/healthz")[2])["queue_depth"] != 2:  # queued, waiting 1.5 s for company
                assert time.monotonic() < deadline
                time.sleep(0.01)
            p.send_signal(signal.SIGTERM)
            status, answer = in_flight.result(TIMEOUT)
        assert status == 200 and len(answer["data"]) == 2
        assert p.wait(TIMEOUT) == 0
        with pytest.raises(OSError):  # no longer listening
            call(host, "GET", "/healthz")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(TIMEOUT)


class HashTextEncoder:
    """A stand-in text encoder for the golden tiny HART (whose Qwen2 golden has another width): features drawn from a
    generator seeded by each prompt's CRC, so equal prompts give equal features."""

    def __init__(self, model: Any) -> None:
        self.Lc, self.Cc = model.context_token, model.context_embed.weight.shape[1]

    def encode(self, prompts: Any) -> Any:
        import zlib

        rows = [torch.randn(1, self.Lc, self.Cc, generator=torch.Generator().manual_seed(zlib.crc32(p.encode()))) for p in prompts]
        lens = torch.tensor([min(self.Lc, 2 + len(p.split())) for p in prompts])
        return se.HARTTextFeatures(torch.cat(rows), torch.arange(self.Lc)[None] < lens[:, None])


@pytest.mark.slow
def test_checkpoints_of_every_family_are_served():
    from ssg_engine.cli import build_parser
    from ssg_engine.cli.serve import served_models
    from ssg_engine.params import HARTParams
    from ssg_engine.serve.models import ServedModel

    golden = REPO / "tests" / "golden"
    args = build_parser().parse_args(["serve", "--var", str(golden / "var_tiny" / "var.pth"), "--vae", str(golden / "var_tiny" / "vae.pth"),
                                      "--config", str(golden / "var_tiny" / "config.json"), "--device", "cpu"])
    (var,) = served_models(args)
    assert var.name == "var" and var.family == "var" and var.class_names == ()
    model, tokenizer = se.load_hart(golden / "hart" / "a_d2" / "llm", golden / "hart" / "a_d2" / "tokenizer")
    hart = ServedModel("tiny-hart", "hart", model, tokenizer, HARTParams(seed=None, top_k=50), text_encoder=HashTextEncoder(model))
    served = {m.name: m for m in (var, hart)}
    for m in served.values():
        m.warm_up()
    with serving(served, max_wait_ms=200) as (host, _):
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda b: post(host, b), [
                {"model": "var", "class_labels": [1, 3], "seed": 5}, {"model": "var", "class_labels": [2], "seed": 6},
                {"model": "tiny-hart", "prompt": "a red cat", "n": 2, "seed": 7, "ssg_scale": 0.5}], timeout=TIMEOUT))
        assert post(host, {"model": "var", "class_labels": ["sneaker"]}) == (422, {"error": {
            "message": "class_labels: 'sneaker' is not an integer label; class names work with the shipped model only",
            "type": "invalid_request_error", "param": "class_labels", "code": None}})
        assert post(host, {"model": "tiny-hart", "prompt": "a cat", "negative_prompt": "a dog"})[0] == 422
    assert [s for s, _ in answers] == [200, 200, 200]
    for (_, body), m, cond, seed, changes in zip(answers, (var, var, hart), ([1, 3], [2], ["a red cat"] * 2), (5, 6, 7),
                                                 ({}, {}, {"ssg": se.SSG(beta=0.5)})):
        assert_same_images(np.stack([decode(d) for d in body["data"]]), expected(m, cond, seed, **changes), m.name)


def test_the_shipped_hart_model_is_served():
    from ssg_engine.cli import build_parser
    from ssg_engine.cli.serve import served_models

    (hart,) = served_models(build_parser().parse_args(["serve", "--family", "hart", "--device", "cpu"]))
    assert hart.name == "fashion-mnist-hart" and hart.family == "hart"
    hart.warm_up()
    with serving({hart.name: hart}, max_wait_ms=100) as (host, _):
        status, body = post(host, {"model": hart.name, "prompt": "a photo of a sneaker", "n": 2, "seed": 3, "ssg_scale": 0.5})
        assert status == 200
        assert_same_images(np.stack([decode(d) for d in body["data"]]),
                           expected(hart, ["a photo of a sneaker"] * 2, 3, ssg=se.SSG(beta=0.5)), hart.name)
        status, body = post(host, {"model": hart.name, "prompt": "a red fox"})
        assert status == 422 and "unknown word(s) 'red', 'fox'" in body["error"]["message"]
