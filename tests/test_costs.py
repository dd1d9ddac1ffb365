"""The cost model (ssg_engine.costs): counted FLOPs against closed forms, monotonicity, roofline; meta device only.

``stage_costs`` takes seconds per (model, batch) on the meta device and is cached, so the tests share
a few: d16 at B in {1, 16, 64} and every preset at B=16.
"""
import dataclasses

import pytest
import torch

from ssg_engine import costs
from ssg_engine.families.var.config import ModelConfig
from ssg_engine.loading import build_models
from ssg_engine.families.var.tokenizer import ResnetBlock


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


# ---- fused / unfused paths (issue #20): bytes and launches counted per path -------------------------------------------


def test_fused_moves_fewer_bytes_and_launches_than_unfused_at_every_block_stage():
    """d16 at B=1 (each path costs seconds on the meta device; bench/results/cost_model.md has B=64)."""
    cfg, batch = ModelConfig.preset("d16"), 1
    floor, fused, unfused = (by_stage(costs.stage_costs(cfg, batch, path=p), "blocks") for p in costs.PATHS)
    for lo, f, u in zip(floor, fused, unfused):
        assert lo.flops == f.flops == u.flops, f"scale {f.scale}"
        assert f.bytes < u.bytes and f.launches < u.launches, f"scale {f.scale}"
        assert lo.bytes < f.bytes, f"scale {f.scale}"  # the floor also fuses away the LayerNorms and the q/k norm
        assert (lo.launches, f.launches) == (0, 8 * cfg.depth)
        assert 25 * cfg.depth <= u.launches <= 40 * cfg.depth  # issue #20: ~30 launches per block and scale
    for stage in ("head", "guidance", "sampling", "decode"):
        f, u = by_stage(costs.stage_costs(cfg, batch, path="fused"), stage), by_stage(costs.stage_costs(cfg, batch, path="unfused"), stage)
        assert all(a.bytes < b.bytes and a.launches < b.launches for a, b in zip(f, u)), stage


def test_fused_block_bytes_d16_b1_first_scale_by_hand():
    """d16 (C=1024, hidden 4096, 16 heads), B=1: 2 rows x 1 token attending to 1 cached token, bf16 (2 bytes).
    Per block, elements read + written by each fused kernel (act = rows*C = 2048, vec = 2048 per modulation vector):
    LN+mod 2048+2*2048+2048 = 8192; QKV 2048 + 3C^2 + 3C + 3*2048 = 3156992; q/k norm + KV write 6144+16+2048+4096 = 12304;
    attention 2048 + 2*2*1024 + 2048 = 8192; proj+residual 2048 + C^2 + C + 2048 + 2048 + 2048 = 1057792; LN+mod 8192;
    fc1+GELU 2048 + 4C^2 + 4096 + 8192 = 4208640; fc2+residual 8192 + 4C^2 + C + 2048 + 2048 + 2048 = 4209664.
    Sum 12669968 elements = 25339936 bytes per block, x 16 blocks."""
    (first, *_) = by_stage(costs.stage_costs(ModelConfig.preset("d16"), 1, path="fused"), "blocks")
    assert first.bytes == 16 * 25339936
    assert first.launches == 16 * 8


def test_unfused_block_counts_the_concatenated_kv_cache_growth():
    """Upstream's block with a ``torch.cat`` cache of P past tokens against P = 0 (no cat): the two cats read
    the P cached + t new rows and write P + t for K and V (4 (P + t)), attention reads 2P more cached rows;
    in units of rows * C * 2 bytes, two launches more."""
    cfg = ModelConfig.preset("d16")
    _, var = build_models(cfg, "meta")
    block = var.blocks[0].to(torch.bfloat16)
    rows, t, P, C = 2, 4, 10, cfg.embed_dim
    x = torch.empty(rows, t, C, device="meta", dtype=torch.bfloat16)
    mod = torch.empty(rows, 1, 6, C, device="meta", dtype=torch.bfloat16)
    b0, n0, _ = costs._traffic(lambda: costs.upstream_block(block, x, mod, 0))
    bP, nP, _ = costs._traffic(lambda: costs.upstream_block(block, x, mod, P))
    assert bP - b0 == rows * C * 2 * (4 * (P + t) + 2 * P)
    assert nP - n0 == 2
    # the unfused stage at scale k is one such block with the cache of the scales before it, ``depth`` times
    stages = by_stage(costs.stage_costs(cfg, 1, path="unfused"), "blocks")
    x1 = torch.empty(rows, cfg.patch_nums[1] ** 2, C, device="meta", dtype=torch.bfloat16)
    nbytes, launches, _ = costs._traffic(lambda: costs.upstream_block(block, x1, mod, cfg.patch_nums[0] ** 2))
    assert (stages[1].bytes, stages[1].launches) == (cfg.depth * nbytes, cfg.depth * launches)


def test_decode_fused_drops_exactly_the_silus_after_group_norms():
    cfg = ModelConfig.preset("d16")
    (fused,) = by_stage(costs.stage_costs(cfg, 1, path="fused"), "decode")
    (unfused,) = by_stage(costs.stage_costs(cfg, 1, path="unfused"), "decode")
    vae, _ = build_models(cfg, "meta")
    # the decoder's F.silu calls, each right after a GroupNorm: norm1 and norm2 of every ResnetBlock, then norm_out
    silus = 2 * sum(isinstance(m, ResnetBlock) for m in vae.decoder.modules()) + 1
    assert unfused.launches - fused.launches == silus
    assert fused.flops == unfused.flops and fused.bytes < unfused.bytes


def test_predicted_adds_launch_overhead_and_bad_path():
    stages = costs.stage_costs(ModelConfig.preset("d16"), 1, path="fused")
    gpu = costs.GPUS["h100"]
    launches = sum(s.launches for s in stages)
    base = costs.roofline(stages, gpu).seconds
    assert costs.predicted(stages, gpu) == base
    assert costs.predicted(stages, gpu, "graph") == pytest.approx(base + 1.5e-6 * launches)
    assert costs.predicted(stages, gpu, "eager") == pytest.approx(base + 4e-6 * launches)
    with pytest.raises(ValueError, match="path must be one of"):
        costs.stage_costs(ModelConfig.preset("d16"), 1, path="fast")


@pytest.mark.parametrize("steps,batch", [("8", 1), ("5", 3)])
def test_hart_diffusion_head_flops_by_hand(steps, batch):
    """Two FLOPs per weight per row per step: input projection, time MLP, condition embedding, per block the AdaLN
    linear (W -> 3W) and the two MLP linears, the final AdaLN (W -> 2W) and output (W -> 2 Cvae); CFG rows 2B x pn^2.
    The 0.7B preset at 8 steps is the issue's estimate: about 4.8 TFLOP per 1024 px image."""
    from ssg_engine.families.hart.config import PRESETS

    cfg = dataclasses.replace(PRESETS["hart_0.7b_1024px"], num_sampling_steps=steps)
    W, Cz, Cvae = cfg.diff_width, cfg.embed_dim, 32
    macs = Cvae * W + 256 * W + W * W + Cz * W + cfg.diff_depth * (3 * W * W + 2 * W * W) + 2 * W * W + 2 * Cvae * W
    rows = 2 * batch * cfg.patch_nums[-1] ** 2
    floor = costs.hart_diffusion_cost(cfg, batch)
    assert floor.flops == 2 * macs * rows * int(steps)
    if steps == "8":
        assert 4.7e12 < floor.flops / batch < 4.9e12
    unfused = costs.hart_diffusion_cost(cfg, batch, path="unfused")
    assert unfused.flops == floor.flops and unfused.bytes > 2 * floor.bytes and unfused.launches > 0
    with pytest.raises(ValueError, match="path must be one of"):
        costs.hart_diffusion_cost(cfg, batch, path="fast")


# ----------------------------------------------------------------------------- HART's transformer, end to end


def _hart_golden(name):
    from pathlib import Path

    from safetensors.torch import load_file

    from ssg_engine.families.hart.loading import load_hart
    from ssg_engine.families.hart.text import HARTTextFeatures

    folder = Path(__file__).parent / "golden" / "hart" / name
    model, tok = load_hart(folder)
    g = load_file(str(folder / "golden.safetensors"))
    return model, tok, HARTTextFeatures(g["ctx.tensor"], g["ctx.mask"], g["ctx.position_ids"])


def _hart_block_flops_by_hand(cfg, batch, passes):
    """Per block and pass of ``t`` new tokens attending to ``s``: 2 FLOPs per weight per row (qkv 3C^2, proj C^2, the
    MLP's two or three matrices) plus attention 4 * t * s * C per row; 2B rows; ``depth`` blocks."""
    from ssg_engine.families.hart.model import Block

    C, rows = cfg.embed_dim, 2 * batch
    with torch.device("meta"):
        ffn = Block(cfg).ffn
    mlp = sum(p.numel() for n, p in ffn.named_parameters() if n.endswith("weight"))
    return cfg.depth * sum(2 * rows * t * (4 * C * C + mlp) + 4 * rows * t * s * C for t, s in passes)


@pytest.mark.parametrize("name,iters", [("a_d2", 1), ("b_d3", 3)])
def test_hart_stage_flops_against_the_engine_under_a_flop_counter(name, iters):
    """The counted FLOPs of every HART stage (meta device) against two independent counts: torch's FLOP counter on a
    real CPU Engine run of the golden tiny model (attention on SDPA's math path, so that every attention matmul is
    counted) and the blocks by hand (context tokens at scale 0, every scale, the MaskGIT passes). Left over: the
    bicubic upsampling, which the meta device decomposes into small matmuls (< 0.2%)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ssg_engine.engine import Engine
    from ssg_engine.families.hart.model import maskgit_groups
    from ssg_engine.params import HARTParams

    model, tok, text = _hart_golden(name)
    cfg, B = model.config, text.batch
    engine = Engine(model, tok, max_batch=4, device="cpu", dtype=torch.float32, backend="reference")
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        engine.generate(text, HARTParams(cfg=2.0, seed=0, ssg=None, num_maskgit_iters=iters))
    real = counter.get_total_flops()

    stages = costs.hart_stage_costs(cfg, B, torch.float32, ssg=False, num_maskgit_iters=iters, tokenizer=tok.hart_config)
    last = cfg.patch_nums[-1] ** 2
    groups = [g.shape[1] for g in maskgit_groups(torch.arange(last).expand(1, last), iters)] if iters > 1 else [last]
    passes, seen = [(cfg.context_token, cfg.context_token)], cfg.context_token
    for pn in cfg.patch_nums[1:-1]:
        seen += pn * pn
        passes.append((pn * pn, seen))
    for n in groups:
        seen += n
        passes.append((n, seen))
    assert seen == cfg.seq_len and len(passes) == len(cfg.patch_nums) - 1 + len(groups)
    blocks = sum(s.flops for s in by_stage(stages, "blocks"))
    assert blocks == _hart_block_flops_by_hand(cfg, B, passes)
    counted = sum(s.flops for s in stages if s.stage not in ("guidance", "sampling"))  # formulas, not matmuls
    assert real > 0 and abs(counted - real) / real < 2e-3, (counted, real)
    assert {s.stage for s in stages} == {"conditioning", "blocks", "head", "guidance", "sampling", "next input", "diffusion head", "decode"}


@pytest.mark.slow
def test_hart_07b_end_to_end_paths():
    """The 0.7B preset at B=1: the diffusion head is one of the stages, the same FLOPs on every path, the fused path
    reads less than the unfused one and launches fewer kernels, the blocks dominate the floor, float16 (the Engine's
    on CUDA) costs what bfloat16 does (the report's one row for both), float32 (its option) is slower on the H100 and
    SSG adds guidance cost only."""
    from ssg_engine.families.hart.config import PRESETS

    cfg = PRESETS["hart_0.7b_1024px"]
    floor, fused, unfused = (costs.hart_stage_costs(cfg, 1, path=p) for p in costs.PATHS)
    assert by_stage(floor, "diffusion head")[0] == costs.hart_diffusion_cost(cfg, 1)
    assert sum(s.flops for s in floor) == sum(s.flops for s in fused) == sum(s.flops for s in unfused)
    assert sum(s.bytes for s in fused) < sum(s.bytes for s in unfused)
    assert 0 < sum(s.launches for s in fused) < sum(s.launches for s in unfused)
    h100 = costs.GPUS["h100"]
    r = costs.roofline(floor, h100)
    assert max(r.by_stage().items(), key=lambda kv: kv[1][2])[0] == "blocks"
    assert costs.hart_stage_costs(cfg, 1, torch.float16) == floor
    assert costs.roofline(costs.hart_stage_costs(cfg, 1, torch.float32), h100).seconds > r.seconds
    plain = costs.hart_stage_costs(cfg, 1, ssg=False)
    assert [s.flops for s in plain if s.stage != "guidance"] == [s.flops for s in floor if s.stage != "guidance"]
    with pytest.raises(ValueError, match="num_maskgit_iters"):
        costs.hart_stage_costs(cfg, 1, num_maskgit_iters=0)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        costs.hart_stage_costs(cfg, 0)
