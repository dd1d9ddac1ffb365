"""What a captured graph reads (CPU): the Engine's static batch holds every operator, table and buffer it was built
with, Infinity's cfg/tau lists are device tensors refilled before each replay (a sweep reuses one batch), and every
Engine KV write goes through the custom op ``torch.ops.ssg_engine.kv_write_``.

On a CPU Engine nothing is captured: with ``cuda_graphs`` switched on by hand, ``_StaticBatch.replay`` runs the loop
on the static buffers, so reading a stale Python number or a freed cache entry shows here as a wrong result. The
CUDA-graph replays themselves are the GPU tests of tests/test_engine.py and tests/test_infinity_engine.py."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from conftest import INFINITY_GOLDEN as INF
from conftest import load_golden_infinity, packed

from ssg_engine import SSG, SamplingParams, guidance
from ssg_engine.engine import Engine, _request_key, _StaticBatch
from ssg_engine.kv_cache import KV_WRITE_SCHEMA, PyStaticKVCache, write_and_read
from ssg_engine.families.infinity import model as infinity
from ssg_engine.families.infinity.tokenizer import load_bsq_vae


@pytest.fixture(scope="module")
def static_engine() -> Engine:
    """A float32 CPU Engine on the sq_d16 golden Infinity that takes the static-batch path (as with CUDA graphs)."""
    model, T = load_golden_infinity("sq_d16")
    engine = Engine(model, load_bsq_vae(INF / "sq_d16" / "vae.pth"), max_batch=2, device="cpu", dtype=torch.float32, cuda_graphs=False, backend="reference")
    engine.cuda_graphs = True  # no capture on CPU: _StaticBatch runs the loop on its buffers
    engine.text = packed(T, "text")
    return engine


def _eager(engine: Engine, text, seed: int, params: SamplingParams, **family):
    """The loop on the same (padded) condition with the request's Python numbers: what a replay must equal."""
    request, cond, params = engine.bind(text, params, **family)
    return engine.run_batch(cond, torch.tensor([seed]), params, model=request)


@torch.no_grad()
def test_static_batch_holds_every_operator_and_table(static_engine):
    """Clearing the prior-operator and RoPE caches (their only other owners) frees nothing the batch reads: the held
    tensors are the ones its schedule and request point at, with their values, and a replay still equals eager.
    Dropping the batch frees them (so it was the batch that held them)."""
    engine = static_engine
    engine._graphs.clear()
    family = dict(pn=4, cfg_insertion_layer=(0, -1))
    params = SamplingParams(cfg=3.0, top_k=1, top_p=0.0, ssg=SSG(beta=0.8, prior="bilinear"))
    request, cond, bound = engine.bind(engine.text, params, **family)
    sizes = request.scale_sizes()
    head_dim = engine.model.C // engine.model.num_heads
    operators = {si: guidance.prior_operator("bilinear", sizes[si - 1], sizes[si], "bilinear", "cpu") for si in range(1, len(sizes))}
    rope = infinity.device_rope_tables(request.schedule, head_dim, torch.device("cpu"))
    held = [weakref.ref(t) for t in (*operators.values(), *rope)]
    values = [t.clone() for t in (*operators.values(), *rope)]
    batch = _StaticBatch(engine, request, cond, bound)
    assert all(batch.schedule[si].operator is op for si, op in operators.items())
    assert all(a is b for a, b in zip(batch.model.tensors.rope, rope))
    assert batch.kv is engine._kv and batch.offsets is engine.offsets
    del operators, rope
    guidance._cached_operator.cache_clear()
    guidance._prior_matrix_f64.cache_clear()
    infinity.device_rope_tables.cache_clear()
    gc.collect()
    assert all(ref() is not None for ref in held), "a tensor the batch reads lived only in a cache"
    assert all(torch.equal(ref(), v) for ref, v in zip(held, values))
    fresh = guidance.prior_operator("bilinear", sizes[0], sizes[1], "bilinear", "cpu")
    assert fresh is not batch.schedule[1].operator and torch.equal(fresh, batch.schedule[1].operator)
    _, bits, _ = batch.replay(request, cond, 0, bound)
    _, eager_bits, _ = _eager(engine, engine.text, 0, params, **family)
    assert all(torch.equal(a, b) for a, b in zip(bits, eager_bits))
    del batch
    engine._graphs.clear()
    guidance._cached_operator.cache_clear()
    infinity.device_rope_tables.cache_clear()
    gc.collect()
    assert all(ref() is None for ref in held)


def test_request_key_ignores_cfg_and_tau_values():
    """The graph key keeps where CFG applies (w != 1 per scale), not the values of cfg_list / tau_list."""
    model, _ = load_golden_infinity("wide_d8")
    make = lambda cfg, tau: infinity.InfinityRequest(model, None, infinity.scale_schedule(1.0, 3), cfg, tau)  # noqa: E731
    assert _request_key(make([3.0] * 3, [1.0] * 3)) == _request_key(make([1.5, 4.0, 2.0], [0.5, 2.0, 0.7]))
    assert _request_key(make([3.0] * 3, [1.0] * 3)) != _request_key(make([1.0, 3.0, 3.0], [1.0] * 3))


@torch.no_grad()
@pytest.mark.parametrize("insertion", [(0,), (0, -1)], ids=["logits", "logits+layer"])
def test_cfg_and_tau_sweep_reuses_one_batch(static_engine, insertion):
    """A cfg sweep and a tau sweep (CFG on the logits, and at a layer too) run on one static batch, each replay equal
    to the loop with that request's Python numbers (greedy and sampled: one batch each); cfg = 1 somewhere is another."""
    engine = static_engine
    engine._graphs.clear()
    for cfg, tau in ((1.5, 1.0), (3.0, 1.0), (4.5, 1.0), (3.0, 0.5), (3.0, 2.0)):
        for params in (SamplingParams(top_k=1, top_p=0.0, ssg=SSG(beta=0.8)), SamplingParams(top_k=0, top_p=0.9, seed=5, ssg=SSG(beta=0.8))):
            family = dict(pn=4, cfg_list=[cfg] * 4, tau_list=[tau] * 4, cfg_insertion_layer=insertion)
            images, bits = engine.generate(engine.text, params, **family)
            eager_images, eager_bits, _ = _eager(engine, engine.text, params.seed or 0, params, **family)
            assert all(torch.equal(a, b) for a, b in zip(bits, eager_bits)), (cfg, tau)
            assert torch.equal(images, eager_images), (cfg, tau)
    assert len(engine._graphs) == 2  # one per sampling filter (greedy, top-p)
    engine.generate(engine.text, top_k=1, top_p=0.0, pn=4, cfg_list=[1.0, 3.0, 3.0, 3.0], tau_list=[1.0] * 4, cfg_insertion_layer=insertion, ssg=SSG(beta=0.8))
    assert len(engine._graphs) == 3


@torch.no_grad()
def test_var_cfg_and_beta_sweep_reuses_one_batch(tiny_dir):
    """VAR's static batch: labels, seed, cfg and SSG betas refilled per replay, each equal to the loop with those
    Python numbers; one batch for the whole sweep."""
    from ssg_engine import load_models

    vae, var = load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=tiny_dir / "config.json")
    engine = Engine(var, vae, max_batch=4, device="cpu", dtype=torch.float32, cuda_graphs=False, backend="reference")
    engine.cuda_graphs = True  # no capture on CPU: _StaticBatch runs the loop on its buffers
    for labels, seed, cfg, beta in (([1, 2, 3], 0, 1.5, 0.5), ([4, 5, 6], 1, 1.5, 0.5), ([1, 2, 3], 0, 4.0, 0.5), ([1, 2, 3], 0, 1.5, 0.9)):
        params = SamplingParams(cfg=cfg, top_k=100, top_p=0.95, seed=seed, ssg=SSG(beta=beta))
        images, tokens = engine.generate(labels, params)
        model, cond, params = engine.bind(torch.tensor(labels + [0]), params)
        eager_images, eager_tokens, _ = engine.run_batch(cond, torch.tensor([seed]), params, model=model)
        assert all(torch.equal(a, b[:3]) for a, b in zip(tokens, eager_tokens)), (labels, seed, cfg, beta)
        assert torch.equal(images, eager_images[:3])
    assert len(engine._graphs) == 1


# ----------------------------------------------------------------------------- KV writes: one custom op


def test_kv_write_op_is_traceable_and_checked():
    """write_and_read (the Engine's only write path) compiles without a graph break (no pybind call); the op passes
    torch.library.opcheck (schema, mutation annotations, fake impl)."""
    k_cache, v_cache = torch.zeros(2, 3, 2, 8, 4), torch.zeros(2, 3, 2, 8, 4)
    k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    explained = torch._dynamo.explain(write_and_read)(k_cache.clone(), v_cache.clone(), 1, 2, k, v)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch.library.opcheck(torch.ops.ssg_engine.kv_write_, (k_cache.clone(), v_cache.clone(), 1, 2, k, v))
    assert "(" + str(torch.ops.ssg_engine.kv_write_.default._schema).split("(", 1)[1] == KV_WRITE_SCHEMA
    K, V = write_and_read(k_cache, v_cache, 1, 2, k, v)
    assert K.shape == (3, 2, 7, 4) and torch.equal(K[:, :, 2:], k) and torch.equal(V[:, :, 2:], v)
    assert not k_cache[0].any() and not K[:, :, :2].any() and not k_cache[1, :, :, 7:].any()


class _NoPybindWrites(PyStaticKVCache):
    """A cache whose Python-level write/read fail: the Engine must write through the op on the tensors."""

    def write(self, *args, **kwargs):
        raise AssertionError("the Engine called StaticKVCache.write")

    def read(self, *args, **kwargs):
        raise AssertionError("the Engine called StaticKVCache.read")


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.kv_writes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.kv_writes += func is torch.ops.ssg_engine.kv_write_.default
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_engine_writes_kv_through_the_custom_op(monkeypatch, tiny_models):
    """Every KV write of the reference-backend Engine (VAR here) is one kv_write_ call (layers x scales), none via the
    cache's methods (the Triton backend writes K/V inside the fused QKV kernel: tests/test_fused_engine.py)."""
    from ssg_engine import engine as engine_module

    vae, var = tiny_models
    monkeypatch.setattr(engine_module, "StaticKVCache", _NoPybindWrites)
    engine = Engine(var, vae, max_batch=2, device="cpu", dtype=torch.float32, cuda_graphs=False, backend="reference")
    counter = _CountOps()
    with counter:
        _, tokens = engine.generate([1, 2], top_k=1, top_p=0.0, seed=0)
    assert counter.kv_writes == var.depth * len(var.patch_nums)
    monkeypatch.undo()
    expected = Engine(var, vae, max_batch=2, device="cpu", dtype=torch.float32, cuda_graphs=False, backend="reference")
    _, reference_tokens = expected.generate([1, 2], top_k=1, top_p=0.0, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(tokens, reference_tokens))


def test_python_kv_write_op_without_extension(tmp_path):
    """Without the C++ extension the same op (same schema) is defined in Python, and passes opcheck."""
    code = textwrap.dedent(
        """
        import sys
        import torch
        sys.modules["ssg_engine._C"] = None
        from ssg_engine import kv_cache
        assert not kv_cache.extension_available()
        k_cache, v_cache = torch.zeros(1, 2, 1, 4, 1), torch.zeros(1, 2, 1, 4, 1)
        torch.library.opcheck(torch.ops.ssg_engine.kv_write_, (k_cache, v_cache, 0, 1, torch.ones(2, 1, 2, 1), torch.ones(2, 1, 2, 1)))
        torch.ops.ssg_engine.kv_write_(k_cache, v_cache, 0, 1, torch.ones(2, 1, 2, 1), torch.full((2, 1, 2, 1), 2.0))
        print(str(torch.ops.ssg_engine.kv_write_.default._schema).split("(", 1)[1])
        print(k_cache[0, :, 0, :, 0].tolist(), v_cache[0, :, 0, :, 0].tolist())
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, SSG_ENGINE_BUILD_EXT="0", SSG_ENGINE_CACHE=str(tmp_path), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    schema, contents = out.stdout.strip().splitlines()[-2:]
    assert "(" + schema == KV_WRITE_SCHEMA
    assert contents == "[[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]] [[0.0, 2.0, 2.0, 0.0], [0.0, 2.0, 2.0, 0.0]]"
