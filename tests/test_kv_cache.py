"""The Engine's static KV cache: the C++ extension and its pure-PyTorch twin, on CPU."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ssg_engine import kv_cache
from ssg_engine.kv_cache import KVCacheError, PyStaticKVCache, extension_available

NO_EXT_REASON = "the C++ extension did not build or import (set SSG_ENGINE_REQUIRE_EXT=1 to make its absence a failure)"
needs_ext = pytest.mark.skipif(not extension_available(), reason=NO_EXT_REASON)
IMPLS = [pytest.param("cpp", marks=needs_ext, id="cpp"), pytest.param("py", id="py")]

LAYERS, BATCH, HEADS, MAX_LEN, DIM = 2, 4, 2, 8, 3


def make_cache(impl: str, dtype: torch.dtype = torch.float32):
    cls = kv_cache._C.StaticKVCache if impl == "cpp" else PyStaticKVCache
    return cls(LAYERS, BATCH, HEADS, MAX_LEN, DIM, dtype, "cpu")


@pytest.fixture(params=IMPLS)
def impl(request) -> str:
    return request.param


def kv(n: int, l: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, HEADS, l, DIM, generator=g).to(dtype), torch.randn(n, HEADS, l, DIM, generator=g).to(dtype)


def test_extension_required_by_ci():
    """Fails (not skips) when SSG_ENGINE_REQUIRE_EXT=1 and the extension is not in use."""
    if not extension_available():
        if os.environ.get("SSG_ENGINE_REQUIRE_EXT") == "1":
            pytest.fail(f"SSG_ENGINE_REQUIRE_EXT=1 but the C++ extension is not available: {kv_cache._IMPORT_ERROR}")
        pytest.skip(NO_EXT_REASON)
    assert kv_cache.StaticKVCache is kv_cache._C.StaticKVCache
    assert hasattr(torch.ops.ssg_engine, "kv_write_")


def test_construction(impl):
    cache = make_cache(impl, torch.bfloat16)
    assert tuple(cache.k_cache.shape) == (LAYERS, BATCH, HEADS, MAX_LEN, DIM) == tuple(cache.v_cache.shape)
    assert cache.k_cache.dtype == torch.bfloat16 and not cache.k_cache.any()
    assert (cache.num_layers, cache.batch, cache.num_heads, cache.max_len, cache.head_dim) == (LAYERS, BATCH, HEADS, MAX_LEN, DIM)
    assert cache.nbytes() == 2 * LAYERS * BATCH * HEADS * MAX_LEN * DIM * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_then_read_is_concatenation(impl, dtype):
    """Writing the scales one after another and reading is what upstream's torch.cat cache holds."""
    cache = make_cache(impl, dtype)
    ks, vs, start = [], [], 0
    for step, l in enumerate((1, 2, 5)):  # 8 positions in all, the cache's max_len
        k, v = kv(3, l, seed=step, dtype=dtype)
        cache.write(1, start, k, v)
        start += l
        ks.append(k)
        vs.append(v)
        K, V = cache.read(1, 3, start)
        assert torch.equal(K, torch.cat(ks, dim=2)) and torch.equal(V, torch.cat(vs, dim=2))
    assert not cache.k_cache[0].any() and not cache.k_cache[1, 3:].any()  # other layer and rows untouched


def test_read_is_a_view(impl):
    cache = make_cache(impl)
    K, _ = cache.read(0, 2, 4)
    assert K.data_ptr() == cache.k_cache.data_ptr() and tuple(K.shape) == (2, HEADS, 4, DIM)


BAD_CALLS = [
    ("write", dict(layer=2, start=0, n=1, l=1), "layer must be in [0, 2), got 2"),
    ("write", dict(layer=-1, start=0, n=1, l=1), "layer must be in [0, 2), got -1"),
    ("write", dict(layer=0, start=7, n=1, l=2), "positions [7, 9) are outside the cache's [0, 8)"),
    ("write", dict(layer=0, start=-1, n=1, l=1), "positions [-1, 0) are outside"),
    ("write", dict(layer=0, start=0, n=5, l=1), "k must have shape (n <= 4, 2, l >= 1, 3), got (5, 2, 1, 3)"),
    ("read", dict(layer=0, n=0, length=1), "read: n must be in [1, 4], got 0"),
    ("read", dict(layer=0, n=1, length=9), "read: length must be in [1, 8], got 9"),
    ("read", dict(layer=3, n=1, length=1), "read: layer must be in [0, 2), got 3"),
]


@pytest.mark.parametrize("what,args,message", BAD_CALLS)
def test_errors_name_the_problem(impl, what, args, message):
    cache = make_cache(impl)
    with pytest.raises(KVCacheError) as e:
        if what == "write":
            cache.write(args["layer"], args["start"], *kv(args["n"], args["l"]))
        else:
            cache.read(args["layer"], args["n"], args["length"])
    assert message in str(e.value)


def test_write_checks_dtype_shape_and_pair(impl):
    cache = make_cache(impl)
    k, v = kv(2, 1)
    with pytest.raises(KVCacheError, match="k is torch.bfloat16 on cpu, the cache is torch.float32 on cpu"):
        cache.write(0, 0, k.bfloat16(), v)
    with pytest.raises(KVCacheError, match=r"v must have shape"):
        cache.write(0, 0, k, v[:, :1])
    with pytest.raises(KVCacheError, match=r"v has shape \(1, 2, 1, 3\), k has \(2, 2, 1, 3\)"):
        cache.write(0, 0, k, v[:1])


def test_construction_errors(impl):
    cls = kv_cache._C.StaticKVCache if impl == "cpp" else PyStaticKVCache
    with pytest.raises(KVCacheError, match="StaticKVCache: batch must be >= 1, got 0"):
        cls(1, 0, 1, 1, 1, torch.float32, "cpu")


@needs_ext
def test_cpp_and_python_agree():
    """Same calls, same contents (and the op is visible to the dispatcher, e.g. for profiling and graphs)."""
    caches = [make_cache("cpp"), make_cache("py")]
    for cache in caches:
        start = 0
        for step, (layer, l) in enumerate([(0, 1), (1, 1), (0, 3), (1, 3), (0, 4)]):
            cache.write(layer, start if layer == 0 else step, *kv(4, l, seed=step))
            start += l if layer == 0 else 0
    assert torch.equal(caches[0].k_cache, caches[1].k_cache) and torch.equal(caches[0].v_cache, caches[1].v_cache)
    k_cache, v_cache = torch.zeros(1, 2, 1, 4, 1), torch.zeros(1, 2, 1, 4, 1)
    torch.ops.ssg_engine.kv_write_(k_cache, v_cache, 0, 1, torch.ones(2, 1, 2, 1), torch.full((2, 1, 2, 1), 2.0))
    assert k_cache[0, :, 0, :, 0].tolist() == [[0, 1, 1, 0]] * 2 and v_cache[0, :, 0, :, 0].tolist() == [[0, 2, 2, 0]] * 2


def _import_without_installed_extension(tmp_path, **env_overrides: str) -> subprocess.CompletedProcess:
    """Import ssg_engine.kv_cache in a fresh process where ``ssg_engine._C`` cannot import (as after an install
    that did not build it); build cache in ``tmp_path``. Prints warnings, then the cache class and availability."""
    code = textwrap.dedent(
        """
        import sys, warnings
        import torch
        sys.modules["ssg_engine._C"] = None  # make `from . import _C` fail
        from ssg_engine import kv_cache
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = kv_cache.StaticKVCache(1, 2, 1, 4, 2, torch.float32, "cpu")
            b = kv_cache.StaticKVCache(1, 2, 1, 4, 2, torch.float32, "cpu")
        for w in caught:
            print("WARNING", w.message)
        a.write(0, 0, torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2))
        print(type(a).__name__, kv_cache.extension_available())
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: val for k, val in os.environ.items() if k not in ("PYTHONWARNINGS", "SSG_ENGINE_BUILD_EXT")}
    env.update(SSG_ENGINE_CACHE=str(tmp_path), **env_overrides)
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)


def test_fallback_warns_once(tmp_path):
    """With the extension neither installed nor built (SSG_ENGINE_BUILD_EXT=0), the pure-PyTorch twin is used and
    warns once per process, with the reason."""
    out = _import_without_installed_extension(tmp_path, SSG_ENGINE_BUILD_EXT="0")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    warnings_ = [l for l in lines if l.startswith("WARNING")]
    assert len(warnings_) == 1 and "pure-PyTorch twin" in warnings_[0] and "SSG_ENGINE_BUILD_EXT=0" in warnings_[0], lines
    assert lines[-1] == "StaticKVCache False"


@pytest.mark.slow
def test_extension_built_at_first_use_then_cached(tmp_path):
    """An install without the compiled extension builds it with ninja on first import (one line saying so),
    and reuses the cached build afterwards."""
    first = _import_without_installed_extension(tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1] == "StaticKVCache True", first.stdout + first.stderr
    assert "building the C++ KV-cache extension" in first.stderr and str(tmp_path) in first.stderr
    second = _import_without_installed_extension(tmp_path)
    assert second.returncode == 0 and second.stdout.strip().splitlines()[-1] == "StaticKVCache True", second.stderr
    assert "building" not in second.stderr


def test_failed_build_falls_back_with_reason(tmp_path):
    """When building at first use fails (here: no working C++ compiler), the twin is used and the warning says why."""
    out = _import_without_installed_extension(tmp_path, CXX="/bin/false")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "StaticKVCache False", lines
    assert any("building it at first use failed" in l for l in lines if l.startswith("WARNING")), lines
