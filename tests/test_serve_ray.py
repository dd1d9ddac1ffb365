"""The Ray Serve deployment (``ssg_engine.serve.ray_deployment``). Without Ray: the module imports, a mixed batch is
split into (model, settings) groups that each run once and give each request ``generate``'s images, and bad
``build_app`` keys are one clear error. With Ray (``pip install 'ssg-engine[ray]'``; CI does not install it, see the
README's serving section for why): a local single-node Ray, the shipped class-conditional model deployed, concurrent
requests on loopback equal to ``generate`` for each request alone, and a bad request's status and message. Every
network call has a timeout; nothing leaves 127.0.0.1."""
from __future__ import annotations

import concurrent.futures
import functools
import os
import socket
import subprocess
import sys
from typing import Any, List

import numpy as np
import pytest

import ssg_engine as se

pytest.importorskip("fastapi", reason="the serve extra: pip install 'ssg-engine[serve]' (scripts/setup.sh installs it)")
from test_serve import TIMEOUT, assert_same_images, call, decode, expected, post  # noqa: E402



@pytest.fixture(scope="module")
def var():
    from ssg_engine.serve.models import shipped_models

    (model,) = shipped_models("cpu", ("var",))
    model.warm_up()
    return model


def test_the_module_imports_without_ray():
    code = ("import sys; sys.modules['ray'] = None\n"  # `import ray` now fails, as where Ray is not installed
            "import ssg_engine.serve.ray_deployment as m\n"
            "try:\n    m.deployment(lambda: [])\nexcept ImportError as e:\n    print('needs', e.name)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "needs ray"  # only deploying needs Ray


def test_a_mixed_batch_runs_each_group_once_and_equals_generate(var):
    from ssg_engine.seeding import row_seeds
    from ssg_engine.serve.models import Settings
    from ssg_engine.serve.ray_deployment import Row, run_rows

    plain, guided = Settings(var.defaults), Settings(var.defaults.replace(ssg=se.SSG(beta=0.5), top_k=50))
    requests = [([7, 0, 8], 11, plain), ([5, 5], 12, guided), ([4], 13, plain)]
    rows: List[Row] = []
    for conds, seed, settings in requests:
        rows += [Row(var.name, settings, c, s) for c, s in zip(conds, row_seeds(seed, len(conds)).tolist())]
    order = [0, 3, 1, 5, 4, 2]  # the requests' rows interleaved, as a batch of concurrent requests arrives
    runs: List[Any] = []
    original = var.run

    def counting_run(conds, settings, seeds):
        runs.append((list(conds), settings))
        return original(conds, settings, seeds)

    var.run = counting_run
    try:
        got = run_rows({var.name: var}, [rows[i] for i in order])
    finally:
        var.run = original
    assert [settings for _, settings in runs] == [plain, guided]  # two groups, each run once, in order of arrival
    assert sorted(runs[0][0]) == [0, 4, 7, 8] and runs[1][0] == [5, 5]
    by_row = {i: got[k] for k, i in enumerate(order)}
    start = 0
    for conds, seed, settings in requests:
        pngs = [by_row[start + r] for r in range(len(conds))]
        start += len(conds)
        want = expected(var, conds, seed, **({} if settings is plain else {"ssg": se.SSG(beta=0.5), "top_k": 50}))
        assert_same_images(np.stack([decode({"b64_json": p}) for p in pngs]), want, f"seed {seed}")


def test_a_failing_group_fails_only_its_rows(var):
    from ssg_engine.serve.models import Settings
    from ssg_engine.serve.ray_deployment import Row, run_rows

    rows = [Row(var.name, Settings(var.defaults), 1, 5), Row("broken", Settings(var.defaults), 1, 6)]
    broken = type("Broken", (), {"run": lambda self, *a: (_ for _ in ()).throw(ValueError("top_k: too large"))})()
    got = run_rows({var.name: var, "broken": broken}, rows)
    assert isinstance(got[0], str) and isinstance(got[1], ValueError) and str(got[1]) == "top_k: too large"


@pytest.mark.parametrize("args, message", [
    ({"flag": "--family var"}, "flag: unknown key; the keys are flags, num_replicas, num_gpus, num_cpus"),
    ({"flags": "--family var --port 9000"}, "flags: --port is Ray's under Ray Serve"),
    ({"flags": "--max-queue=5"}, "flags: --max-queue is Ray's under Ray Serve"),
    ({"flags": "--max-batch 0"}, "flags: '--max-batch 0' are not `ssg-engine serve` flags"),
    ({"num_gpus": "nan"}, "num_gpus: nan is too small; give at least 0"),
    ({"num_replicas": "two"}, "num_replicas: 'two' is not a number; give one, e.g. num_replicas=1"),
])
def test_bad_build_app_arguments_are_one_clear_error(args, message):
    from ssg_engine.serve.ray_deployment import build_app

    with pytest.raises(ValueError) as info:
        build_app(args)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def ray_host():
    """``host:port`` of the shipped class-conditional model deployed by ``build_app`` on a local single-node Ray (2 CPUs,
    a 100 MB object store, no dashboard), shut down afterwards."""
    ray = pytest.importorskip("ray", reason="Ray Serve is the ray extra (pip install 'ssg-engine[ray]'); CI does not install it")
    from ray import serve

    from ssg_engine.serve.ray_deployment import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"flags": "--family var --device cpu --max-batch 8 --max-wait-ms 300 --max-n 8 --timeout-s 60"}),
                  route_prefix="/", blocking=False)
        yield f"127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_ray_served_images_equal_generate_for_each_request_alone(ray_host, var):
    status, _, data = call(ray_host, "GET", "/v1/models")
    assert status == 200 and b'"fashion-mnist-var"' in data
    requests = [  # same settings (one group), and other settings (another group of the same batch)
        {"class_labels": ["sneaker", 0, "bag"], "n": 3, "seed": 11},
        {"class_labels": [4], "n": 2, "seed": 12},
        {"class_labels": [5], "n": 2, "seed": 12, "ssg_scale": 0.5, "top_k": 50, "guidance_scale": 1.5},
        {"prompt": "trouser", "seed": 13},
    ]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(functools.partial(post, ray_host), requests, timeout=TIMEOUT))
    assert all(status == 200 for status, _ in answers), answers
    want = [expected(var, [7, 0, 8], 11), expected(var, [4, 4], 12),
            expected(var, [5, 5], 12, ssg=se.SSG(beta=0.5), top_k=50, cfg=1.5), expected(var, [1], 13)]
    for (_, body), request, images in zip(answers, requests, want):
        assert body["seed"] == request["seed"] and body["model"] == "fashion-mnist-var"
        assert_same_images(np.stack([decode(d) for d in body["data"]]), images, str(request))


@pytest.mark.parametrize("body, status, message", [
    ({"class_labels": [10]}, 422, "class_labels: class index 10 out of range [0, 10)"),
    ({"prompt": "sneaker", "n": 9}, 422, "n: 9 is out of range; give an integer in [1, 8]"),
    ({"model": "nope", "prompt": "x"}, 404, "model: 'nope' is not served; GET /v1/models lists fashion-mnist-var"),
])
def test_ray_bad_requests_are_one_line_with_the_right_status(ray_host, body, status, message):
    got, answer = post(ray_host, body)
    error = answer["error"]
    assert got == status and error["message"].startswith(message) and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"


def test_ray_body_that_is_not_json_is_400(ray_host):
    status, _, data = call(ray_host, "POST", "/v1/images/generations", raw=b"{not json")
    assert status == 400 and b"the body is not JSON" in data
