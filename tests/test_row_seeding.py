"""Per-row seeding (ssg_engine.seeding): a request's images do not depend on what it is batched with.

For each family on its tiny golden models (CPU, float32): a request sampled alone equals the same request as one row of
a batch with other requests of other seeds (reference sampler; the Engine on the reference backend, and on the Triton
backend in the interpreter, marked slow). Tokens are compared exactly; images to 1e-4 norm-relative, since the CPU's
BLAS may round differently between batch sizes (measured: <= 2e-5 on VAR's and HART's tiny models).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import INFINITY_GOLDEN, load_golden_infinity, packed, rel_err

import ssg_engine as se
from ssg_engine import SamplingParams, load_models, sample_reference
from ssg_engine.engine import Engine
from ssg_engine.families.hart.loading import load_hart
from ssg_engine.families.hart.sampler import sample_hart_reference
from ssg_engine.families.hart.text import HARTTextFeatures
from ssg_engine.families.infinity.model import TextFeatures
from ssg_engine.families.infinity.tokenizer import load_bsq_vae
from ssg_engine.params import HARTParams
from ssg_engine.seeding import check_row_seeds, row_seeds

IMAGE_TOL = 1e-4
TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
ENGINE_BACKENDS = ["reference"] + ([pytest.param("triton", marks=pytest.mark.slow)] if TRITON else [])
HART = Path(__file__).parent / "golden" / "hart"


def assert_row_equal(batch, alone, row: int) -> None:
    """Row ``row`` of a batch's (images, tokens) equals a request alone's (one row)."""
    images, tokens = batch
    for si, (t, a) in enumerate(zip(tokens, alone[1])):
        assert torch.equal(t[row : row + 1], a), f"scale {si}"
    assert rel_err(images[row : row + 1], alone[0]) < IMAGE_TOL


# ---- the keys ---------------------------------------------------------------------------------------------------


def test_row_seeds_deterministic_distinct_and_in_range():
    keys = row_seeds(7, 64)
    assert keys.dtype == torch.int64 and keys.shape == (64,)
    assert torch.equal(keys, row_seeds(7, 64)) and len(set(keys.tolist())) == 64
    assert (keys >= 0).all()
    assert torch.equal(row_seeds(7, 3, start=5), keys[5:8])  # a row's key depends on (seed, row) only
    assert not set(keys.tolist()) & set(row_seeds(8, 64).tolist())
    assert len(set(row_seeds(-1, 4).tolist() + row_seeds(2**63 - 1, 4).tolist())) == 8
    assert row_seeds(7, 0).shape == (0,)


@pytest.mark.parametrize("args,message", [
    ((None, 2), "seed: row seeds need an integer seed"),
    ((1.5, 2), "seed must be an integer"),
    ((1, -1), "count must be an integer >= 0"),
    ((1, 2, -1), "start must be an integer >= 0"),
])
def test_row_seeds_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        row_seeds(*args)


@pytest.mark.parametrize("seeds,message", [
    ([1, 2], "got 2 seeds for 3 image rows"),
    (torch.tensor([1.0, 2.0, 3.0]), "expected a 1-d integer tensor"),
    ([1, 2.5, 3], "2.5 is not an int64 integer"),
    ([1, 2, 2**63], "is not an int64 integer"),
    ("123", "expected a tensor or a sequence of ints"),
])
def test_check_row_seeds_bad(seeds, message):
    with pytest.raises(ValueError, match=message):
        check_row_seeds(seeds, 3)


# ---- VAR --------------------------------------------------------------------------------------------------------

PARAMS = SamplingParams(cfg=2.0, top_k=40, top_p=0.9, temperature=0.9, seed=0)
KEY = int(row_seeds(5, 1)[0])


@pytest.fixture(scope="module")
def var_pair(tiny_dir):
    vae, var = load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=tiny_dir / "config.json")
    return var, vae


def test_var_reference_row_alone_equals_row_in_batch(tiny_models):
    _, var = tiny_models  # more_smooth: the tokens and the Gumbel noise from the row's generator
    alone = sample_reference(var, 1, torch.tensor([9]), PARAMS, row_seeds=[KEY], more_smooth=True)
    batch = sample_reference(var, 3, torch.tensor([4, 9, 9]), PARAMS, row_seeds=[3, KEY, 4], more_smooth=True)
    assert_row_equal((batch.images, batch.tokens), (alone.images, alone.tokens), 1)
    assert not torch.equal(batch.tokens[-1][1], batch.tokens[-1][2])  # same label, other key: other draws


def test_var_reference_random_labels_per_row(tiny_models):
    _, var = tiny_models
    alone = sample_reference(var, 1, None, PARAMS, row_seeds=[KEY])
    batch = sample_reference(var, 2, None, PARAMS, row_seeds=[11, KEY])
    assert_row_equal((batch.images, batch.tokens), (alone.images, alone.tokens), 1)


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
def test_var_engine_row_alone_equals_row_in_batch_and_chunks(var_pair, backend):
    var, vae = var_pair
    engine = Engine(var, vae, max_batch=2, device="cpu", dtype=torch.float32, cuda_graphs=False, backend=backend)
    params = PARAMS if backend == "reference" else PARAMS.replace(top_k=0, top_p=0.0)  # the interpreter: no bisection
    keys = torch.tensor([3, KEY, 4])
    batch = engine.generate([4, 9, 1], params, row_seeds=keys)  # chunks of 2 and 1 (buckets 2, 1)
    alone = engine.generate([9], params, row_seeds=keys[1:2])
    assert_row_equal(batch, alone, 1)
    last = engine.generate([1], params, row_seeds=[4])  # the second chunk's row alone
    assert_row_equal(batch, last, 2)


def test_generate_seeding_modes(var_pair, tiny_models):
    _, var = tiny_models
    _, vae = var_pair
    labels = [1, 9, 4]
    images, tokens = se.generate(var, vae, labels, PARAMS, seed=5, return_tokens=True)  # seeding="row": row_seeds(5, 3)
    keys = row_seeds(5, 3)
    assert_row_equal((images, tokens), se.generate(var, vae, [9], PARAMS, row_seeds=keys[1:2], return_tokens=True), 1)
    out = sample_reference(var, 3, torch.tensor(labels), PARAMS, row_seeds=keys)
    assert all(torch.equal(a, b) for a, b in zip(tokens, out.tokens))
    # seeding="batch": the per-batch draws of one generator seeded with seed (as before per-row seeding)
    _, batch_tokens = se.generate(var, vae, labels, PARAMS, seed=5, seeding="batch", return_tokens=True)
    upstream = sample_reference(var, 3, torch.tensor(labels), PARAMS.replace(seed=5))
    assert all(torch.equal(a, b) for a, b in zip(batch_tokens, upstream.tokens))
    assert not torch.equal(batch_tokens[-1], tokens[-1])
    with pytest.raises(ValueError, match="seeding must be 'row'"):
        se.generate(var, vae, labels, seeding="rows")
    with pytest.raises(ValueError, match="row_seeds: per-row seeds need seeding='row'"):
        se.generate(var, vae, labels, seeding="batch", row_seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="row_seeds: got 2 seeds for 3 image rows"):
        se.generate(var, vae, labels, row_seeds=[1, 2])


# ---- Infinity ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def infinity():
    model, T = load_golden_infinity("wide_d8")
    vae = load_bsq_vae(INFINITY_GOLDEN / "wide_d8" / "vae.pth")
    text = TextFeatures.coerce(packed(T, "text"))  # two prompts
    return model, vae, text


def prompts(text: TextFeatures, rows) -> TextFeatures:
    """The prompts ``rows`` (any order, repeats allowed) of ``text``, packed."""
    parts = [text[r : r + 1] for r in rows]
    return TextFeatures(torch.cat([p.kv_compact for p in parts]), [p.lens[0] for p in parts])


INFINITY_KW = dict(h_div_w=0.5, pn=4, cfg=3.0, top_k=0, top_p=0.8)


def test_infinity_reference_row_alone_equals_row_in_batch(infinity):
    model, vae, text = infinity
    alone = se.generate(model, vae, prompts(text, [1]), row_seeds=[KEY], return_tokens=True, **INFINITY_KW)
    batch = se.generate(model, vae, prompts(text, [0, 1]), row_seeds=[3, KEY], return_tokens=True, **INFINITY_KW)
    assert_row_equal(batch, alone, 1)


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
def test_infinity_engine_row_alone_equals_row_in_batch(infinity, backend):
    model, vae, text = infinity
    engine = Engine(model, vae, max_batch=2, device="cpu", dtype=torch.float32, cuda_graphs=False, backend=backend)
    batch = engine.generate(prompts(text, [0, 1, 1]), row_seeds=[3, KEY, 4], **INFINITY_KW)
    alone = engine.generate(prompts(text, [1]), row_seeds=[KEY], **INFINITY_KW)
    assert_row_equal(batch, alone, 1)


# ---- HART -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hart():
    from safetensors.torch import load_file

    model, tok = load_hart(HART / "a_d2")
    g = load_file(str(HART / "a_d2" / "golden.safetensors"))
    return model, tok, HARTTextFeatures(g["ctx.tensor"], g["ctx.mask"], g["ctx.position_ids"])  # two prompts


def hart_rows(text: HARTTextFeatures, rows) -> HARTTextFeatures:
    return HARTTextFeatures(*(t[list(rows)] for t in text.tensors()))


# cfg 1 draws the diffusion head's starting noise for both CFG halves; 3 MaskGIT passes use the orders
HART_CASES = [dict(cfg=3.0, num_maskgit_iters=3), dict(cfg=1.0, num_maskgit_iters=1)]


@pytest.mark.parametrize("kw", HART_CASES, ids=str)
def test_hart_reference_row_alone_equals_row_in_batch(hart, kw):
    model, _, text = hart
    params = HARTParams(top_p=0.9, seed=0, **kw)

    def run(rows, keys, **extra):
        t = hart_rows(text, rows)
        out = sample_hart_reference(model, *t.tensors(), params.replace(**extra), row_seeds=keys)
        return out.images, out.tokens

    assert_row_equal(run([0, 1, 1], [3, KEY, 4]), run([1], [KEY]), 1)
    assert_row_equal(run([0, 1], [3, KEY], more_smooth=True), run([1], [KEY], more_smooth=True), 1)
    with pytest.raises(ValueError, match="row_seeds: upstream_compat=True"):
        sample_hart_reference(model, *text.tensors(), params, row_seeds=[1, 2], upstream_compat=True)


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
@pytest.mark.parametrize("kw", HART_CASES, ids=str)
def test_hart_engine_row_alone_equals_row_in_batch(hart, backend, kw):
    model, tok, text = hart
    params = HARTParams(top_p=0.9, **kw)
    engine = Engine(model, tok, max_batch=4, device="cpu", dtype=torch.float32, backend=backend)
    batch = engine.generate(hart_rows(text, [0, 1, 1]), params, row_seeds=[3, KEY, 4])  # bucket 4: one padded row
    alone = engine.generate(hart_rows(text, [1]), params, row_seeds=[KEY])
    assert_row_equal(batch, alone, 1)
    assert not torch.equal(batch[1][-1][1], batch[1][-1][2])


# ---- CUDA graphs ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_gpu_graph_row_alone_equals_row_in_batch(tiny_dir):
    """The captured graphs (bucket 4 and bucket 1) read the row seeds from their static buffer: a row's tokens alone
    equal its tokens in a batch (graph replays of other requests in between)."""
    vae, var = load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=tiny_dir / "config.json")
    engine = Engine(var, vae, max_batch=4, device="cuda", dtype=torch.float32)
    keys = row_seeds(5, 3)
    engine.generate([4, 9, 1], PARAMS, row_seeds=row_seeds(6, 3))  # capture, then replay with other seeds
    batch = engine.generate([4, 9, 1], PARAMS, row_seeds=keys)
    alone = engine.generate([9], PARAMS, row_seeds=keys[1:2])
    agree = (batch[1][-1][1] == alone[1][-1][0]).float().mean().item()
    assert agree > 0.99  # a GPU's GEMMs may round differently between batch sizes and flip a near-tie
