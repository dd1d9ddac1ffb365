"""KV-cache pool: both implementations (C++ extension and pure-Python fallback) on CPU."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ssg_engine import kv_cache
from ssg_engine.kv_cache import KVCacheError, PoolExhaustedError, PyKVCachePool, extension_available

NO_EXT_REASON = (
    "C++ extension ssg_engine._C is not built (run `python setup.py build_ext --inplace`; "
    "set SSG_ENGINE_REQUIRE_EXT=1 to make its absence a failure)"
)
needs_ext = pytest.mark.skipif(not extension_available(), reason=NO_EXT_REASON)

IMPLS = [
    pytest.param("cpp", marks=needs_ext, id="cpp"),
    pytest.param("py", id="py"),
]

L, C, H, M, D = 2, 6, 2, 8, 3


def make_pool(impl: str, num_layers=L, capacity=C, num_heads=H, max_len=M, head_dim=D, **kw):
    cls = kv_cache.CppKVCachePool if impl == "cpp" else PyKVCachePool
    return cls(num_layers, capacity, num_heads, max_len, head_dim, **kw)


@pytest.fixture(params=IMPLS)
def impl(request) -> str:
    return request.param


@pytest.fixture
def pool(impl):
    return make_pool(impl)


def kv(n: int, l: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, H, l, D, generator=g, dtype=dtype), torch.randn(n, H, l, D, generator=g, dtype=dtype)


def test_extension_required_by_ci():
    """Fails (not skips) when SSG_ENGINE_REQUIRE_EXT=1 and the extension did not import."""
    if not extension_available():
        if os.environ.get("SSG_ENGINE_REQUIRE_EXT") == "1":
            pytest.fail(f"SSG_ENGINE_REQUIRE_EXT=1 but ssg_engine._C failed to import: {kv_cache._IMPORT_ERROR}")
        pytest.skip(NO_EXT_REASON)
    assert kv_cache.KVCachePool is kv_cache.CppKVCachePool
    assert hasattr(torch.ops.ssg_engine, "kv_append_")


# -- construction and allocation ---------------------------------------------------------------
def test_construction(pool):
    assert pool.k_cache.shape == pool.v_cache.shape == (L, C, H, M, D)
    assert pool.k_cache.dtype == torch.float32 and not pool.k_cache.any()
    assert pool.lengths.shape == (C,) and pool.lengths.dtype == torch.long and not pool.lengths.any()
    assert pool.num_free == C
    assert (pool.num_layers, pool.capacity, pool.num_heads, pool.max_len, pool.head_dim) == (L, C, H, M, D)


def test_construction_dtype_device(impl):
    pool = make_pool(impl, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert pool.k_cache.dtype == pool.v_cache.dtype == torch.bfloat16
    assert pool.lengths.device.type == "cpu"


@pytest.mark.parametrize("field", ["num_layers", "capacity", "num_heads", "max_len", "head_dim"])
def test_construction_rejects_nonpositive(impl, field):
    with pytest.raises(KVCacheError, match=f"{field} must be >= 1, got 0"):
        make_pool(impl, **{field: 0})


def test_allocate_contiguous_lowest_run(pool):
    a = pool.allocate(2)
    b = pool.allocate(3)
    assert a.tolist() == [0, 1] and b.tolist() == [2, 3, 4]
    assert a.dtype == torch.long and a.device == pool.k_cache.device
    assert pool.num_free == 1
    pool.free(a)
    assert pool.num_free == 3
    assert pool.allocate(1).tolist() == [0]
    assert pool.allocate(2, contiguous=False).tolist() == [1, 5]
    assert pool.num_free == 0


def test_allocate_resets_lengths(pool):
    s = pool.allocate(2)
    pool.advance(s, 3)
    pool.free(s)
    s2 = pool.allocate(2)
    assert s2.tolist() == [0, 1]
    assert pool.lengths.tolist()[:2] == [0, 0] and pool.fill_length(0) == 0


def test_allocate_errors(pool):
    with pytest.raises(KVCacheError, match="n must be >= 1, got 0"):
        pool.allocate(0)
    with pytest.raises(PoolExhaustedError, match=r"asked for 7 slots, 6 free \(capacity 6\)"):
        pool.allocate(7)
    pool.allocate(2)
    mid = pool.allocate(1)
    pool.allocate(3)
    pool.free(mid)  # free: slot 2 only
    with pytest.raises(PoolExhaustedError, match=r"asked for 2 slots, 1 free"):
        pool.allocate(2)
    pool.free([0, 1])  # free: 0, 1, 2
    with pytest.raises(PoolExhaustedError, match="asked for 4 slots, 3 free"):
        pool.allocate(4)
    pool.free([5])  # free: 0, 1, 2, 5 -> longest run 3
    with pytest.raises(PoolExhaustedError, match=r"no contiguous run of 4 free slots \(free 4, longest run 3\)"):
        pool.allocate(4)
    assert pool.allocate(4, contiguous=False).tolist() == [0, 1, 2, 5]


def test_free_errors(pool):
    s = pool.allocate(2)
    with pytest.raises(KVCacheError, match=r"free: slot id 6 out of range \[0, 6\)"):
        pool.free([6])
    with pytest.raises(KVCacheError, match=r"free: slot id -1 out of range"):
        pool.free([-1])
    with pytest.raises(KVCacheError, match=r"free: slot 3 is not allocated \(double free\?\)"):
        pool.free([3])
    with pytest.raises(KVCacheError, match="free: duplicate slot id 1"):
        pool.free([1, 1])
    with pytest.raises(KVCacheError, match="free: no slots given"):
        pool.free([])
    assert pool.num_free == C - 2  # failed frees changed nothing
    pool.free(s)
    with pytest.raises(KVCacheError, match=r"free: slot 0 is not allocated \(double free\?\)"):
        pool.free(s)
    with pytest.raises(TypeError):
        pool.free([0.5])


def test_fill_length_errors(pool):
    with pytest.raises(KVCacheError, match="fill_length: slot 0 is not allocated"):
        pool.fill_length(0)
    with pytest.raises(KVCacheError, match="fill_length: slot id 9 out of range"):
        pool.fill_length(9)


# -- append / advance / view -------------------------------------------------------------------
def test_append_advance_view_positions(pool):
    other = pool.allocate(1)  # slot 0 stays empty
    s = pool.allocate(2)  # slots 1, 2
    k1, v1 = kv(2, 3, seed=1)
    k2, v2 = kv(2, 2, seed=2)
    for layer in range(L):
        pool.append(layer, s, k1 + layer, v1 - layer)
    assert pool.lengths.tolist() == [0] * C  # append does not advance
    pool.advance(s, 3)
    for layer in range(L):
        pool.append(layer, s, k2 + layer, v2 - layer)
    pool.advance(s, 2)

    assert pool.lengths.tolist() == [0, 5, 5, 0, 0, 0]
    assert [pool.fill_length(i) for i in (0, 1, 2)] == [0, 5, 5]
    for layer in range(L):
        exp_k = torch.cat([k1, k2], dim=2) + layer
        exp_v = torch.cat([v1, v2], dim=2) - layer
        assert torch.equal(pool.k_cache[layer, 1:3, :, :5], exp_k)
        assert torch.equal(pool.v_cache[layer, 1:3, :, :5], exp_v)
        assert not pool.k_cache[layer, 1:3, :, 5:].any()  # beyond the fill length
        K, V = pool.view(layer, s, 5)
        assert K.shape == V.shape == (2, H, 5, D)
        assert torch.equal(K, exp_k) and torch.equal(V, exp_v)
    untouched = [0, 3, 4, 5]
    assert not pool.k_cache[:, untouched].any() and not pool.v_cache[:, untouched].any()
    pool.free(other)


def test_contiguous_view_is_zero_copy(pool):
    pool.allocate(1)
    s = pool.allocate(3)  # slots 1..3
    k, v = kv(3, 4)
    pool.append(1, s, k, v)
    K, V = pool.view(1, s, 4)
    assert K.data_ptr() == pool.k_cache[1, 1].data_ptr() and V.data_ptr() == pool.v_cache[1, 1].data_ptr()
    assert K.untyped_storage().data_ptr() == pool.k_cache.untyped_storage().data_ptr()
    pool.k_cache[1, 2, 0, 0, 0] = 123.0  # writes through the cache show in the view
    assert K[1, 0, 0, 0].item() == 123.0
    # a slice of the allocated tensor is still a run
    K2, _ = pool.view(1, s[1:], 2)
    assert K2.data_ptr() == pool.k_cache[1, 2].data_ptr() and K2.shape == (2, H, 2, D)


def test_noncontiguous_gather(pool):
    a = pool.allocate(1)
    pool.allocate(1)
    b = pool.allocate(1)
    pool.free(pool.lengths.new_tensor([1]))  # free slot 1 -> scattered allocation 1, 3
    s = pool.allocate(2, contiguous=False)
    assert s.tolist() == [1, 3]
    k, v = kv(2, 3, seed=5)
    pool.append(0, s, k, v)
    pool.advance(s, 3)
    K, V = pool.view(0, s, 3)
    assert torch.equal(K, k) and torch.equal(V, v)
    assert K.untyped_storage().data_ptr() != pool.k_cache.untyped_storage().data_ptr()
    # reverse order (a tensor not made by allocate) gathers in that order
    rev = torch.tensor([3, 1])
    K, V = pool.view(0, rev, 3)
    assert torch.equal(K, k.flip(0)) and torch.equal(V, v.flip(0))
    assert torch.equal(pool.k_cache[0, 3, :, :3], k[1]) and not pool.k_cache[0, 2].any()
    pool.free(torch.cat([a, b]))


def test_append_scattered_slots_and_reuse(pool):
    s = pool.allocate(4)
    pool.free([1, 2])
    sc = torch.tensor([3, 0])
    k, v = kv(2, 2, seed=3)
    pool.append(1, sc, k, v)
    pool.advance(sc, 2)
    assert torch.equal(pool.k_cache[1, 3, :, :2], k[0]) and torch.equal(pool.k_cache[1, 0, :, :2], k[1])
    assert pool.lengths.tolist() == [2, 0, 0, 2, 0, 0]
    with pytest.raises(KVCacheError, match="append: slot 1 is not allocated"):
        pool.append(0, s, *kv(4, 1))


def test_append_strided_kv(pool):
    s = pool.allocate(2)
    k = torch.randn(2, 3, H, D).transpose(1, 2)  # (n, H, l, D), not contiguous
    v = torch.randn(2, H, D, 3).transpose(2, 3)
    pool.append(0, s, k, v)
    assert torch.equal(pool.k_cache[0, :2, :, :3], k) and torch.equal(pool.v_cache[0, :2, :, :3], v)


def test_reset(pool):
    s = pool.allocate(2)
    k, v = kv(2, 3, seed=7)
    pool.append(0, s, k, v)
    pool.advance(s, 3)
    pool.reset([1])
    assert pool.lengths.tolist()[:2] == [3, 0] and pool.fill_length(1) == 0
    k2, v2 = kv(2, 1, seed=8)
    pool.append(0, s, k2, v2)
    assert torch.equal(pool.k_cache[0, 0, :, 3], k2[0, :, 0])  # slot 0 continues at 3
    assert torch.equal(pool.k_cache[0, 1, :, 0], k2[1, :, 0])  # slot 1 starts over at 0
    pool.reset(s)
    assert pool.lengths.tolist()[:2] == [0, 0] and pool.num_free == C - 2
    with pytest.raises(KVCacheError, match="reset: slot 4 is not allocated"):
        pool.reset([4])


def test_slots_tensor_modified_in_place(pool):
    s = pool.allocate(2)  # [0, 1]
    pool.allocate(1)  # 2
    s.copy_(torch.tensor([2, 0]))  # the pool must not trust its record of s any more
    k, v = kv(2, 1, seed=9)
    pool.append(0, s, k, v)
    assert torch.equal(pool.k_cache[0, 2, :, 0], k[0, :, 0]) and torch.equal(pool.k_cache[0, 0, :, 0], k[1, :, 0])
    assert not pool.k_cache[0, 1].any()


def test_inference_mode(pool):
    with torch.inference_mode():
        s = pool.allocate(2)
        k, v = kv(2, 2, seed=4)
        pool.append(0, s, k, v)
        pool.advance(s, 2)
        K, _ = pool.view(0, s, 2)
        assert torch.equal(K, k)
        pool.free(s)


def test_meta_pool_needs_no_slot_reads(impl):
    """On 'meta' nothing can be read back: slots from allocate() must resolve from host records."""
    pool = make_pool(impl, device="meta")
    s = pool.allocate(3)
    assert s.device.type == "meta"
    k = torch.empty(3, H, 4, D, device="meta")
    pool.append(0, s, k, k)
    pool.append(1, s[1:], k[1:], k[1:])
    pool.advance(s, 4)
    assert pool.fill_length(2) == 4
    K, V = pool.view(1, s, 6)
    assert K.shape == (3, H, 6, D)
    pool.reset(s[:1])
    with pytest.raises(NotImplementedError):  # any other slots tensor is read back, impossible on meta
        pool.advance(s.clone(), 1)
    pool.free(s)
    assert pool.num_free == C


# -- errors on append / advance / view --------------------------------------------------------
def test_append_past_max_len(pool):
    s = pool.allocate(2)
    pool.advance(s, 6)
    with pytest.raises(
        KVCacheError, match=r"append: slot 0 has length 6; adding 3 tokens exceeds max_len 8 \(room for 2\)"
    ):
        pool.append(0, s, *kv(2, 3))
    pool.append(0, s, *kv(2, 2))  # exactly fills
    with pytest.raises(KVCacheError, match=r"advance: slot 0 has length 6; adding 3 tokens exceeds max_len 8"):
        pool.advance(s, 3)
    pool.advance(s, 2)
    assert pool.fill_length(1) == M


def test_append_advance_unallocated(pool):
    pool.allocate(1)
    bad = torch.tensor([0, 2])
    with pytest.raises(KVCacheError, match="append: slot 2 is not allocated"):
        pool.append(0, bad, *kv(2, 1))
    with pytest.raises(KVCacheError, match="advance: slot 2 is not allocated"):
        pool.advance(bad, 1)
    with pytest.raises(KVCacheError, match="view: slot 2 is not allocated"):
        pool.view(0, bad, 1)
    with pytest.raises(KVCacheError, match=r"append: slot id 7 out of range \[0, 6\)"):
        pool.append(0, torch.tensor([7]), *kv(1, 1))
    with pytest.raises(KVCacheError, match="append: duplicate slot id 0"):
        pool.append(0, torch.tensor([0, 0]), *kv(2, 1))
    assert pool.lengths.tolist() == [0] * C and not pool.k_cache.any()


def test_append_shape_dtype_device_errors(pool):
    s = pool.allocate(2)
    k, v = kv(2, 3)
    with pytest.raises(KVCacheError, match=r"append: k must have shape \(n, H, l, D\) = \(2, 2, l>=1, 3\), got \(2, 3, 3, 3\)"):
        pool.append(0, s, torch.zeros(2, 3, 3, 3), v)
    with pytest.raises(KVCacheError, match=r"got \(1, 2, 3, 3\)"):
        pool.append(0, s, k[:1], v[:1])
    with pytest.raises(KVCacheError, match=r"append: v must have shape .* got \(2, 2, 3\)"):
        pool.append(0, s, k, v[..., 0])
    with pytest.raises(KVCacheError, match=r"got \(2, 2, 0, 3\)"):
        pool.append(0, s, k[:, :, :0], v[:, :, :0])
    with pytest.raises(KVCacheError, match=r"k and v shapes differ: \(2, 2, 3, 3\) vs \(2, 2, 2, 3\)"):
        pool.append(0, s, k, v[:, :, :2])
    with pytest.raises(KVCacheError, match="append: k dtype torch.float16 does not match the pool dtype torch.float32"):
        pool.append(0, s, k.half(), v)
    with pytest.raises(KVCacheError, match="append: v is on meta but the pool is on cpu"):
        pool.append(0, s, k, v.to("meta"))
    with pytest.raises(KVCacheError, match=r"append: layer 2 out of range \[0, 2\)"):
        pool.append(2, s, k, v)
    with pytest.raises(KVCacheError, match=r"append: layer -1 out of range"):
        pool.append(-1, s, k, v)
    with pytest.raises(KVCacheError, match="append: slots must be a 1-D int64 tensor on cpu, got 1-D torch.int32 on cpu"):
        pool.append(0, s.int(), k, v)
    with pytest.raises(KVCacheError, match="got 2-D torch.int64 on cpu"):
        pool.append(0, s[None], k, v)
    with pytest.raises(KVCacheError, match="got 1-D torch.int64 on meta"):
        pool.append(0, s.to("meta"), k, v)
    with pytest.raises(KVCacheError, match="append: no slots given"):
        pool.append(0, s[:0], k[:0], v[:0])
    with pytest.raises(TypeError):
        pool.append(0, [0, 1], k, v)
    assert not pool.k_cache.any() and not pool.v_cache.any()


def test_advance_view_errors(pool):
    s = pool.allocate(2)
    with pytest.raises(KVCacheError, match="advance: l must be >= 1, got 0"):
        pool.advance(s, 0)
    with pytest.raises(KVCacheError, match=r"view: length must be in \[1, 8\], got 9"):
        pool.view(0, s, 9)
    with pytest.raises(KVCacheError, match=r"view: length must be in \[1, 8\], got 0"):
        pool.view(0, s, 0)
    with pytest.raises(KVCacheError, match=r"view: layer 5 out of range \[0, 2\)"):
        pool.view(5, s, 1)


# -- the custom op and cross-implementation equality -------------------------------------------
@needs_ext
def test_custom_op_matches_python_op():
    cache = [torch.zeros(L, C, H, M, D) for _ in range(4)]
    lengths = torch.tensor([0, 2, 0, 5, 1, 0])
    slots = torch.tensor([3, 1, 4])
    k, v = kv(3, 2, seed=11)
    torch.ops.ssg_engine.kv_append_(cache[0], cache[1], lengths, 1, slots, k, v)
    kv_cache.kv_append_(cache[2], cache[3], lengths, 1, slots, k, v)
    assert torch.equal(cache[0], cache[2]) and torch.equal(cache[1], cache[3])
    assert torch.equal(cache[0][1, 3, :, 5:7], k[0]) and torch.equal(cache[1][1, 4, :, 1:3], v[2])


@needs_ext
def test_custom_op_opcheck():
    cache_k, cache_v = torch.zeros(L, C, H, M, D), torch.zeros(L, C, H, M, D)
    args = (cache_k, cache_v, torch.tensor([0, 2, 0, 0, 0, 0]), 0, torch.tensor([1, 0]), *kv(2, 3))
    torch.library.opcheck(torch.ops.ssg_engine.kv_append_, args, test_utils=("test_schema", "test_faketensor"))


def _script(pool, log):
    """One fixed sequence of pool operations; records every result and error type."""
    def rec(fn, *a):
        try:
            out = fn(*a)
        except (KVCacheError, PoolExhaustedError) as e:
            log.append(type(e).__name__)
            return None
        log.append(out.tolist() if isinstance(out, torch.Tensor) else out)
        return out

    a = rec(pool.allocate, 3)
    b = rec(pool.allocate, 2)
    for step, l in enumerate((1, 4, 2)):
        for layer in range(L):
            rec(pool.append, layer, a, *kv(3, l, seed=100 + 10 * step + layer))
            rec(pool.append, layer, b, *kv(2, l, seed=200 + 10 * step + layer))
        rec(pool.advance, a, l)
        rec(pool.advance, b, l)
    rec(pool.append, 0, a, *kv(3, 2))  # past max_len
    rec(pool.free, a[1:2])
    c = rec(pool.allocate, 2, False)
    rec(pool.allocate, 2)  # exhausted
    rec(pool.append, 1, c, *kv(2, 3, seed=300))
    rec(pool.advance, c, 3)
    rec(pool.reset, b[:1])
    rec(pool.append, 0, b, *kv(2, 2, seed=301))
    rec(pool.free, [1])  # double free
    log.append([pool.fill_length(i) for i in (0, 2, 3, 4)])
    log.append(pool.num_free)
    for layer in range(L):
        log.append(pool.view(layer, torch.tensor([4, 0, 2]), 7)[0].sum().item())


@needs_ext
def test_cpp_and_python_identical():
    pools, logs = [], []
    for impl in ("cpp", "py"):
        pool, log = make_pool(impl), []
        _script(pool, log)
        pools.append(pool)
        logs.append(log)
    assert logs[0] == logs[1]
    assert "PoolExhaustedError" in logs[0] and "KVCacheError" in logs[0]
    cpp, py = pools
    assert torch.equal(cpp.k_cache, py.k_cache) and torch.equal(cpp.v_cache, py.v_cache)
    assert torch.equal(cpp.lengths, py.lengths) and cpp.k_cache.any()


def _import_without_installed_extension(tmp_path, **env_overrides: str) -> subprocess.CompletedProcess:
    """Import ssg_engine.kv_cache in a fresh process where ``ssg_engine._C`` cannot import (as after an install
    that did not build it); build cache in ``tmp_path``. Prints the pool class name."""
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["ssg_engine._C"] = None  # make `from . import _C` fail
        warnings.simplefilter("always")
        from ssg_engine import kv_cache
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = kv_cache.KVCachePool(1, 2, 1, 4, 2)
            b = kv_cache.KVCachePool(1, 2, 1, 4, 2)
        for w in caught:
            print("WARNING", w.message)
        s = a.allocate(2)
        a.append(0, s, *[__import__("torch").ones(2, 1, 1, 2)] * 2)
        print(type(a).__name__, kv_cache.extension_available())
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: val for k, val in os.environ.items() if k not in ("PYTHONWARNINGS", "SSG_ENGINE_BUILD_EXT")}
    env.update(SSG_ENGINE_CACHE=str(tmp_path), **env_overrides)
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)


def test_fallback_warns_once(tmp_path):
    """With the extension neither installed nor built (SSG_ENGINE_BUILD_EXT=0), KVCachePool is the Python pool
    and warns once per process, with the reason."""
    out = _import_without_installed_extension(tmp_path, SSG_ENGINE_BUILD_EXT="0")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    warnings_ = [l for l in lines if l.startswith("WARNING")]
    assert len(warnings_) == 1 and "pure-Python fallback" in warnings_[0] and "SSG_ENGINE_BUILD_EXT=0" in warnings_[0], lines
    assert lines[-1] == "KVCachePool False"  # the fallback subclass of PyKVCachePool


@pytest.mark.slow
def test_extension_built_at_first_use_then_cached(tmp_path):
    """An install without the compiled extension builds it with ninja on first import (one line saying so),
    and reuses the cached build afterwards."""
    first = _import_without_installed_extension(tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1] == "KVCachePool True", first.stdout + first.stderr
    assert "building the C++ KV-cache extension" in first.stderr and str(tmp_path) in first.stderr
    second = _import_without_installed_extension(tmp_path)
    assert second.returncode == 0 and second.stdout.strip().splitlines()[-1] == "KVCachePool True", second.stderr
    assert "building" not in second.stderr


def test_failed_build_falls_back_with_reason(tmp_path):
    """When building at first use fails (here: no working C++ compiler), the Python pool is used and the warning
    gives the reason."""
    out = _import_without_installed_extension(tmp_path, CXX="/bin/false")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "KVCachePool False", lines
    assert any("building it at first use failed" in l for l in lines if l.startswith("WARNING")), lines
