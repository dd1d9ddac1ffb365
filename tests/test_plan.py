"""Memory plan: the exact lines agree with what the Engine and the loaded models really hold."""
from __future__ import annotations

import pytest
import torch

from ssg_engine.engine import Engine
from ssg_engine.plan import CONTEXT_BYTES, GiB, plan
from ssg_engine.pretrained import PRETRAINED_DIR, load_pretrained
from ssg_engine.config import ModelConfig


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


def test_plan_command(capsys):
    from ssg_engine.cli import main

    assert main(["plan", "--preset", "d30", "--batch-size", "64", "--dtype", "bfloat16", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "KV cache" in out and "18.68 GiB" in out and "does NOT fit in 24.0 GiB" in out
    assert main(["plan", "--preset", "d30", "--batch-size", "1", "--gpu-memory", "24"]) == 0
    assert "fits in 24.0 GiB" in capsys.readouterr().out
    assert main(["plan", "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_plan_command_prints_the_roofline_floor(capsys):
    from ssg_engine.cli import main

    assert main(["plan", "--preset", "d16", "--batch-size", "16", "--gpu", "h200"]) == 0
    assert "roofline floor on H200 SXM" in capsys.readouterr().out
