"""Memory plan: the exact lines agree with what the Engine and the loaded models really hold."""
from __future__ import annotations

import pytest
import torch

from ssg_engine import SamplingParams
from ssg_engine.engine import Engine
from ssg_engine.plan import CONTEXT_BYTES, GiB, plan
from ssg_engine.pretrained import PRETRAINED_DIR, load_pretrained
from ssg_engine.families.var.config import ModelConfig


def test_plan_matches_the_engine_on_the_shipped_model():
    vae, var = load_pretrained()
    cfg = ModelConfig.from_json(PRETRAINED_DIR / "config.json")
    p = plan(cfg, 2, torch.float32)
    engine = Engine(var, vae, max_batch=64, device="cpu", dtype=torch.float32, cuda_graphs=False)
    engine.generate([1, 2], top_k=1, seed=0)
    assert p.kv_cache == engine.kv_cache_bytes()
    held = sum(t.numel() * t.element_size() for m in (var, vae) for t in list(m.parameters()) + list(m.buffers()))
    assert p.weights == held
    V, last, prev = cfg.V, cfg.patch_nums[-1] ** 2, cfg.patch_nums[-2] ** 2
    assert p.logits == (4 * last + 2 * 2 * last + 2 * prev) * V * 4


def test_d30_at_64_does_not_fit_24gb_but_fits_141gb():
    p = plan("d30", 64, torch.bfloat16)
    assert p.kv_cache == 2 * 30 * 128 * 680 * 1920 * 2  # K and V, 30 layers, 128 rows, 680 tokens, width 1920
    assert not p.fits(24 * GiB) and p.fits(141 * GiB)
    assert plan("d30", 1, torch.bfloat16).fits(24 * GiB)
    assert p.total + CONTEXT_BYTES > 24 * GiB
    assert "does NOT fit" in p.table(24 * GiB) and "fits in 141.0" in p.table(141 * GiB)


def test_plan_grows_with_batch_and_depth():
    assert plan("d16", 16).total < plan("d16", 64).total < plan("d30", 64).total


def test_plan_bad_input():
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        plan("d16", 0)
    with pytest.raises(ValueError, match="unknown preset"):
        plan("d99", 1)


def _usage_errors(capsys, cases):
    """Each ``(argv, flag)``: ``ssg-engine plan *argv`` exits 2 with one line naming ``flag``."""
    from ssg_engine.cli import main

    for argv, flag in cases:
        assert main(["plan", *argv]) == 2
        err = capsys.readouterr().err
        assert flag in err and err.count("\n") == 1, err


def test_plan_command(capsys):
    from ssg_engine.cli import main

    assert main(["plan", "--preset", "d30", "--batch-size", "64", "--dtype", "bfloat16", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "KV cache" in out and "18.68 GiB" in out and "does NOT fit in 24.0 GiB" in out
    assert main(["plan", "--preset", "d30", "--batch-size", "1", "--gpu-memory", "24"]) == 0
    assert "fits in 24.0 GiB" in capsys.readouterr().out
    _usage_errors(capsys, ((["--batch-size", "0"], "--batch-size"),))


def test_plan_command_prints_the_roofline_floor(capsys):
    from ssg_engine.cli import main

    assert main(["plan", "--preset", "d16", "--batch-size", "16", "--gpu", "h200"]) == 0
    assert "roofline floor on H200 SXM" in capsys.readouterr().out


# ----------------------------------------------------------------------------- Infinity


@pytest.fixture(scope="module")
def golden_infinity():
    from conftest import INFINITY_GOLDEN, load_golden_infinity, packed

    from ssg_engine.families.infinity.tokenizer import load_bsq_vae

    model, T = load_golden_infinity("sq_d16")
    return model, load_bsq_vae(INFINITY_GOLDEN / "sq_d16" / "vae.pth"), packed(T, "text")


@torch.no_grad()
def test_infinity_plan_matches_the_engine(golden_infinity):
    """The exact lines (weights of the Engine's copy and VAE, KV cache, text keys/values) equal what a bfloat16
    Engine holds after a batch of 2 at a 5-scale schedule."""
    from ssg_engine.memory import infinity_plan
    from ssg_engine.families.infinity.model import PaddedText, scale_schedule

    model, vae, text = golden_infinity
    engine = Engine(model, vae, max_batch=2, device="cpu", dtype=torch.bfloat16, cuda_graphs=False, backend="reference")
    sched = scale_schedule(1.0, 5)
    p = infinity_plan(model.config, sched, torch.bfloat16, 2, vae=vae.config)
    engine.generate(text, top_k=1, pn=5, cfg=2.0)
    assert p.kv_cache == engine.kv_cache_bytes()
    held = sum(t.numel() * t.element_size() for m in (engine.model, engine.vae) for t in list(m.parameters()) + list(m.buffers()))
    assert p.weights == held
    request, padded, _ = engine.bind(text, SamplingParams(cfg=2.0), pn=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the copy runs under autocast, as in the Engine
        state = request.condition(PaddedText.pad(padded, model.config.text_maxlen))
    assert p.condition == sum(t.numel() * t.element_size() for k, v in state.ca_kv for t in (k, v)) + sum(
        m.numel() * m.element_size() for m in state.modulations)


def test_infinity_2b_at_1m_kv_per_row_and_largest_batch():
    """Infinity-2B at 1M (1:1, 10521 tokens): 2.76 GB of bf16 KV per cache row (two per image with CFG); at most 11
    images fit 80 GiB, 64 do not."""
    from ssg_engine.memory import infinity_plan, largest_batch
    from ssg_engine.families.infinity.model import scale_schedule

    sched = scale_schedule(1.0, "1M")
    one = infinity_plan("infinity_2b", sched, torch.bfloat16, 1)
    assert one.kv_cache == 2 * 32 * 2 * 10521 * 2048 * 2 and round(one.kv_cache / 2 / 1e9, 2) == 2.76
    assert not plan("infinity_2b", 64, pn="1M").fits(80 * GiB)
    assert largest_batch(lambda b: plan("infinity_2b", b, pn="1M", h_div_w=1.0), 80 * GiB) == 11
    assert plan("infinity_2b", 11).fits(80 * GiB) and not plan("infinity_2b", 12).fits(80 * GiB)
    assert plan("infinity_2b", 8, pn="0.25M").total < plan("infinity_2b", 8, pn="1M").total


def test_infinity_plan_bad_input():
    with pytest.raises(ValueError, match="infinity_8b.*not supported"):
        plan("infinity_8b", 1)
    with pytest.raises(ValueError, match="pn='9M'"):
        plan("infinity_2b", 1, pn="9M")
    with pytest.raises(ValueError, match="pn=.*applies to Infinity"):
        plan("d16", 1, pn="1M")
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        plan("infinity_2b", 0)


@torch.no_grad()
def test_engine_refuses_a_bucket_the_plan_says_does_not_fit(golden_infinity):
    """With device_memory set to what a batch of 2 needs, max_batch 4 with 3 prompts (bucket 4) is one ValueError
    naming max_batch and the largest that fits, before anything is allocated; max_batch 2 runs."""
    from ssg_engine.memory import CONTEXT_BYTES, infinity_plan
    from ssg_engine.families.infinity.model import TextFeatures, scale_schedule

    model, vae, text = golden_infinity
    text = TextFeatures.coerce(text)
    three = TextFeatures(torch.cat([text.kv_compact, text.kv_compact[: text.lens[0]]]), text.lens + text.lens[:1])
    budget = infinity_plan(model.config, scale_schedule(1.0, 4), torch.bfloat16, 2, vae=vae.config).total + CONTEXT_BYTES
    big = Engine(model, vae, max_batch=4, device="cpu", dtype=torch.bfloat16, cuda_graphs=False, backend="reference", device_memory=budget)
    with pytest.raises(ValueError, match=r"max_batch=4: a batch of 4 images .* use max_batch=2 or less") as e:
        big.generate(three, top_k=1, pn=4)
    assert "\n" not in str(e.value) and big.kv_cache_bytes() == 0
    with pytest.raises(ValueError, match="not even one image fits"):
        Engine(model, vae, max_batch=1, device="cpu", dtype=torch.bfloat16, cuda_graphs=False, backend="reference",
               device_memory=CONTEXT_BYTES).generate(text[:1], top_k=1, pn=4)
    small = Engine(model, vae, max_batch=2, device="cpu", dtype=torch.bfloat16, cuda_graphs=False, backend="reference", device_memory=budget)
    images, _ = small.generate(three, top_k=1, pn=4)
    assert images.shape[0] == 3
    with pytest.raises(ValueError, match="device_memory must be a positive integer"):
        Engine(model, vae, max_batch=2, device="cpu", device_memory=0)


def test_plan_command_infinity(capsys):
    from ssg_engine.cli import main

    assert main(["plan", "--preset", "infinity_2b", "--pn", "1M", "--h-div-w", "1.0", "--batch-size", "16", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "KV cache" in out and "condition (text, modulations, RoPE)" in out and "does NOT fit in 80.0 GiB" in out
    assert "largest batch that fits: 11" in out
    _usage_errors(capsys, ((["--preset", "infinity_2b", "--pn", "9M"], "--pn"), (["--preset", "d16", "--pn", "1M"], "--pn"),
                           (["--preset", "infinity_2b", "--gpu", "h100"], "--gpu")))


# ----------------------------------------------------------------------------- HART


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hart_plan_matches_the_engine(dtype):
    """The exact lines (weights of the Engine's copy and the tokenizer, KV cache of the context tokens and every
    scale, the state's condition) equal what the HART Engine in ``dtype`` (CPU: float32, or autocast to float16 /
    bfloat16) holds after a batch of the golden a_d2 model, with one MaskGIT pass and with three (the passes fill the
    last scale's positions: the same cache)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from ssg_engine.families.hart.loading import load_hart
    from ssg_engine.families.hart.text import HARTTextFeatures
    from ssg_engine.memory import hart_plan
    from ssg_engine.params import HARTParams

    folder = Path(__file__).parent / "golden" / "hart" / "a_d2"
    model, tok = load_hart(folder)
    g = load_file(str(folder / "golden.safetensors"))
    text = HARTTextFeatures(g["ctx.tensor"], g["ctx.mask"], g["ctx.position_ids"])
    B, cfg, size = text.batch, model.config, torch.empty((), dtype=dtype).element_size()
    p = hart_plan(cfg, B, dtype, tokenizer=tok.hart_config, more_smooth=False)
    assert plan(cfg, B, dtype).kv_cache == p.kv_cache == 2 * cfg.depth * 2 * B * cfg.seq_len * cfg.embed_dim * size
    for iters in (1, 3):
        engine = Engine(model, tok, max_batch=B, device="cpu", dtype=dtype, backend="reference")
        engine.generate(text, HARTParams(cfg=2.0, seed=0, num_maskgit_iters=iters))
        assert engine.kv_cache_bytes() == p.kv_cache
    held = sum(t.numel() * t.element_size() for m in (engine.model, engine.vae) for t in list(m.parameters()) + list(m.buffers()))
    assert p.weights == held
    request, cond, _ = engine.bind(text, HARTParams(cfg=2.0))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):  # as the Engine runs it
        state = request.seeded(torch.zeros(1, dtype=torch.long)).condition(cond)
    tensors = [*state.modulations, state.head_scale, state.head_shift, state.lvl_pos, state.f_hat] + [t for r in state.ropes for t in r]
    assert p.condition == sum(t.numel() * t.element_size() for t in tensors)
    last, prev = cfg.patch_nums[-1] ** 2, cfg.patch_nums[-2] ** 2
    assert p.logits == (2 * B * last + 2 * B * last + B * prev) * model.V * 4
    assert p.total == p.weights + p.kv_cache + p.condition + max(p.logits + p.activations, p.diffusion, p.decode)
    smooth = hart_plan(cfg, B, dtype, tokenizer=tok.hart_config, more_smooth=True)
    assert smooth.gumbel == 4 * 8 * B * last * model.V and p.gumbel == 0
    last_scale = smooth.logits + max(smooth.activations, smooth.gumbel)
    assert smooth.total == p.weights + p.kv_cache + p.condition + max(last_scale, p.diffusion, p.decode) >= p.total


def test_hart_07b_kv_per_row_and_largest_batch():
    """hart_0.7b_1024px (300 context tokens + 9451 image tokens = 9750 positions, 16 blocks of width 1536): float16 by
    default (the Engine's on CUDA), 0.89 GiB of KV cache per image (two cache rows), twice that at float32; the
    largest batch fits, one more does not; more_smooth's Gumbel scratch (on by default, as upstream's) costs batch."""
    from ssg_engine.families.hart.config import PRESETS
    from ssg_engine.memory import largest_batch

    cfg = PRESETS["hart_0.7b_1024px"]
    one = plan("hart_0.7b_1024px", 1)
    assert one.dtype == torch.float16 and one.gumbel == 4 * 8 * 64 * 64 * 4096
    assert cfg.seq_len == 9750 and one.kv_cache == 2 * 16 * 2 * 9750 * 1536 * 2
    assert plan(cfg, 1, torch.float32).kv_cache == 2 * one.kv_cache == plan(cfg, 1, torch.bfloat16).kv_cache * 2
    assert one.diffusion > 0 and 2 * 0.7e9 < one.weights < plan(cfg, 1, torch.float32).weights
    for gib in (80, 141):
        n = largest_batch(lambda b: plan("hart_0.7b_1024px", b), gib * GiB)
        assert n > 1 and plan("hart_0.7b_1024px", n).fits(gib * GiB) and not plan("hart_0.7b_1024px", n + 1).fits(gib * GiB)
        off = largest_batch(lambda b: plan(cfg, b, more_smooth=False), gib * GiB)
        f32 = largest_batch(lambda b: plan(cfg, b, torch.float32), gib * GiB)
        assert f32 < n <= off
    assert largest_batch(lambda b: plan(cfg, b), 80 * GiB) < largest_batch(lambda b: plan(cfg, b), 141 * GiB)


def test_hart_plan_bad_input():
    with pytest.raises(ValueError, match="dtype: the HART Engine runs at float32, float16, bfloat16; got torch.float64"):
        plan("hart_0.7b_1024px", 1, torch.float64)
    with pytest.raises(ValueError, match="pn apply to VAR and Infinity"):
        plan("hart_0.7b_1024px", 1, pn="1M")
    with pytest.raises(ValueError, match="more_smooth applies to HART"):
        plan("d16", 1, more_smooth=True)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        plan("hart_0.7b_1024px", 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_plan_command_hart(capsys, dtype):
    from ssg_engine.cli import main

    assert main(["plan", "--preset", "hart_0.7b_1024px", "--batch-size", "64", "--dtype", dtype, "--gpu-memory", "80", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert f"batch 64, {dtype}" in out and "diffusion head (last scale)" in out and "does NOT fit in 80.0 GiB" in out
    assert "more_smooth Gumbel draw (last scale)" in out
    assert "largest batch that fits: " in out and "roofline floor on H100 SXM" in out
    assert main(["plan", "--preset", "hart_0.7b_1024px", "--batch-size", "1", "--no-more-smooth"]) == 0
    out = capsys.readouterr().out
    assert "batch 1, float16" in out and "Gumbel" not in out
    _usage_errors(capsys, ((["--preset", "hart_0.7b_1024px", "--pn", "1M"], "--pn"), (["--preset", "d16", "--more-smooth"], "--more-smooth")))
