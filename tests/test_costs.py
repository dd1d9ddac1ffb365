"""The cost model (ssg_engine.costs): counted FLOPs against closed forms, monotonicity, roofline; meta device only.

``stage_costs`` takes seconds per (model, batch) on the meta device and is cached, so the tests share
a few: d16 at B in {1, 16, 64} and every preset at B=16.
"""
import pytest
import torch

from ssg_engine import costs
from ssg_engine.config import ModelConfig
from ssg_engine.loading import build_models


def by_stage(stages, name):
    return [s for s in stages if s.stage == name]


@pytest.mark.parametrize("preset", ["d16", "d36"])
def test_block_flops_are_two_flops_per_weight_per_token_plus_attention(preset):
    cfg = ModelConfig.preset(preset)
    batch = 16
    _, var = build_models(cfg, "meta")
    matmul_weights = sum(
        p.numel() for name, p in var.blocks.named_parameters() if name.endswith("weight") and "ada_lin" not in name
    )
    assert matmul_weights == cfg.depth * 12 * cfg.embed_dim**2  # qkv 3C^2 + proj C^2 + fc1/fc2 8C^2
    seen = 0
    for stage, pn in zip(by_stage(costs.stage_costs(cfg, batch), "blocks"), cfg.patch_nums):
        rows = 2 * batch * pn * pn  # CFG doubles the batch
        seen += pn * pn
        attention = cfg.depth * 4 * rows * seen * cfg.embed_dim  # QK^T and PV
        expected = 2 * matmul_weights * rows + attention
        assert stage.flops == pytest.approx(expected, rel=1e-3), f"scale {stage.scale}"


def test_decode_is_about_394_gflop_per_image_at_256px():
    for batch in (1, 16):
        (decode,) = by_stage(costs.stage_costs(ModelConfig.preset("d16"), batch), "decode")
        assert decode.flops / batch / 1e9 == pytest.approx(394, abs=1.0)


def test_guidance_and_sampling_formulas():
    cost = costs.guidance_cost(batch=2, tokens=16, prev_tokens=9, vocab=4096, scale=3, prior=True)
    outputs = 2 * 16 * 4096
    assert cost.flops == outputs * (3 + 3 + 2 * 9)
    assert cost.bytes == 4 * (4 * outputs + 2 * 9 * 4096 + 16 * 9)
    assert costs.guidance_cost(2, 16, 9, 4096, 3, prior=False).flops == 3 * outputs
    assert costs.sampling_cost(rows=32, vocab=4096, scale=3).bytes == 4 * 32 * 4096 + 8 * 32


def test_totals_monotone_in_batch_and_depth():
    def totals(preset, batch):
        stages = costs.stage_costs(ModelConfig.preset(preset), batch)
        return sum(s.flops for s in stages), sum(s.bytes for s in stages)

    per_batch = [totals("d16", b) for b in (1, 16, 64)]
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(per_batch, per_batch[1:]))
    per_depth = [totals(p, 16) for p in ("d16", "d20", "d24", "d30", "d36")]
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(per_depth, per_depth[1:]))


def test_stages_in_engine_order_and_ssg_only_changes_guidance():
    cfg = ModelConfig.preset("d16")
    stages = costs.stage_costs(cfg, 16)
    assert stages[0].stage == "conditioning" and stages[-1].stage == "decode"
    assert [s.stage for s in stages[1:6]] == ["blocks", "head", "guidance", "sampling", "next input"]
    assert len(stages) == 2 + 5 * len(cfg.patch_nums)
    plain = costs.stage_costs(cfg, 16, ssg=False)
    for on, off in zip(stages, plain):
        assert (on == off) == (on.stage != "guidance" or on.scale == 0)


def test_roofline_bounds_and_gpu_order():
    stages = costs.stage_costs(ModelConfig.preset("d16"), 16)
    times = {name: costs.roofline(stages, gpu).seconds for name, gpu in costs.GPUS.items()}
    assert times["h200"] < times["h100"] < times["a100"]
    r = costs.roofline(stages, costs.GPUS["h200"])
    for s in r.stages:
        gpu = r.gpu
        assert s.seconds == max(s.cost.flops / gpu.peak(s.cost.precision), s.cost.bytes / gpu.bytes_per_s)
        assert s.bound == ("compute" if s.cost.flops / gpu.peak(s.cost.precision) >= s.cost.bytes / gpu.bytes_per_s else "memory")
    assert sum(t for _, _, t, _ in r.by_stage().values()) == pytest.approx(r.seconds)
    # B=1 reads every weight for a handful of tokens: the transformer is bandwidth-bound
    one = costs.roofline(costs.stage_costs(ModelConfig.preset("d16"), 1), costs.GPUS["h200"])
    assert all(s.bound == "memory" for s in one.stages if s.cost.stage == "blocks" and s.cost.scale < 5)


def test_scaled_gpu_keeps_the_peak_ratios():
    h100 = costs.GPUS["h100"]
    measured = h100.scaled(bf16_flops=h100.bf16_flops / 2, bytes_per_s=1e12)
    assert measured.tf32_flops == pytest.approx(h100.tf32_flops / 2)
    assert measured.fp32_flops == pytest.approx(h100.fp32_flops / 2)
    assert measured.bytes_per_s == 1e12


def test_bad_batch_and_cli(capsys):
    with pytest.raises(ValueError, match="batch must be positive"):
        costs.stage_costs(ModelConfig.preset("d16"), 0)
    costs.main(["--preset", "d16", "--batch-size", "1", "--gpu", "a100"])
    out = capsys.readouterr().out
    assert "A100 SXM 80GB" in out and "| decode |" in out and "img/s" in out


def test_float32_transformer_uses_fp32_peak():
    stages = costs.stage_costs(ModelConfig.preset("d16"), 1, torch.float32)
    assert {s.precision for s in by_stage(stages, "blocks")} == {"fp32"}
    half = costs.stage_costs(ModelConfig.preset("d16"), 1, torch.bfloat16)
    (b32, b16) = by_stage(stages, "blocks")[-1], by_stage(half, "blocks")[-1]
    assert b32.flops == b16.flops and b32.bytes > b16.bytes


def test_decode_follows_vae_dtype():
    """The decode runs in the Engine's vae dtype (default: the transformer's): same FLOPs, about half the bytes in bf16."""
    cfg = ModelConfig.preset("d16")
    (bf16,) = by_stage(costs.stage_costs(cfg, 2), "decode")
    (fp32,) = by_stage(costs.stage_costs(cfg, 2, vae_dtype=torch.float32), "decode")
    assert (bf16.precision, fp32.precision) == ("bf16", "tf32")
    assert bf16.flops == fp32.flops and bf16.bytes == pytest.approx(fp32.bytes / 2, rel=0.05)
