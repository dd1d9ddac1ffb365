"""HART family on a tiny random model (no golden data needed): shapes, the protocol, seeded determinism, bad input."""
from __future__ import annotations

import pytest
import torch

from ssg_engine.families.hart.config import HARTConfig, HARTTokenizerConfig
from ssg_engine.families.hart.model import HARTCondition, maskgit_groups
from ssg_engine.families.hart.sampler import HART, cfg_weights, sample_hart_reference
from ssg_engine.families.hart.tokenizer import HARTTokenizer
from ssg_engine.models.family import NextScaleModel
from ssg_engine.pipeline import ConcatKVCache

PN = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def model() -> HART:
    torch.manual_seed(0)
    tok = HARTTokenizer(HARTTokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), v_patch_nums=PN), PN)
    cfg = HARTConfig(patch_nums=PN, context_token=5, context_dim=16, depth=2, embed_dim=32, num_heads=2, diff_width=16,
                     diff_depth=2, num_sampling_steps="4", use_timestep_embed=True, use_context_norm=True, mlp_type="llama")
    m = HART(cfg, tok).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def inputs(B: int = 2):
    gen = torch.Generator().manual_seed(1)
    ctx = torch.randn(B, 5, 16, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]][:B], dtype=torch.bool)
    return ctx, mask


def test_protocol_and_shapes(model):
    assert isinstance(model, NextScaleModel)
    assert model.cache_layout() == (2, 2, 5 + 4 + 9 + 16, 16)
    ctx, mask = inputs()
    out = sample_hart_reference(model, ctx, mask, cfg=3.0, seed=3)
    assert out.images.shape == (2, 3, 8, 8) and 0 <= out.images.min() and out.images.max() <= 1
    assert [t.shape for t in out.tokens] == [(2, 1), (2, 4), (2, 9), (2, 16)]
    assert out.residual.shape == (2, 16, 8)
    # the image is the tokenizer's decode of the drawn codes plus the residual
    again = model.tokenizer.decode_tokens(out.tokens, out.residual).add(1).mul(0.5)
    torch.testing.assert_close(again, out.images, rtol=1e-5, atol=1e-6)


def test_seeded_rule_is_deterministic_and_leaves_global_state(model):
    ctx, mask = inputs()
    state = torch.get_rng_state()
    a = sample_hart_reference(model, ctx, mask, cfg=3.0, seed=5, num_maskgit_iters=3)
    b = sample_hart_reference(model, ctx, mask, cfg=3.0, seed=5, num_maskgit_iters=3)
    c = sample_hart_reference(model, ctx, mask, cfg=3.0, seed=6, num_maskgit_iters=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens)) and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_kv_cached_steps_match_teacher_forcing(model):
    ctx, mask = inputs()
    tokens = sample_hart_reference(model, ctx, mask, cfg=2.0, seed=1).tokens
    q, B, K = model.tokenizer.quantize, 2, len(PN)
    f_hat, xs = torch.zeros(B, 8, 4, 4), []
    for si in range(K - 1):
        h = q.embedding(tokens[si]).transpose(1, 2).reshape(B, 8, PN[si], PN[si])
        f_hat, nxt = q.get_next_autoregressive_input(si, K, f_hat, h)
        xs.append(nxt.flatten(2).transpose(1, 2))
    with torch.no_grad():
        tf = model(ctx, torch.cat(xs, 1), None, mask)
        state, kv, steps = model.condition(HARTCondition(ctx, mask)), ConcatKVCache(model.depth), []
        for si in range(K):
            steps.append(model.step(state, si, kv)[:B])
            if si < K - 1:
                model.next_input(state, si, tokens[si])
    torch.testing.assert_close(torch.cat(steps, 1), tf, rtol=1e-5, atol=1e-5)


def test_no_residual_is_codes_only(model):
    ctx, mask = inputs()
    out = sample_hart_reference(model, ctx, mask, cfg=2.0, seed=2, residual=False)
    assert out.residual is None
    torch.testing.assert_close(model.tokenizer.decode_tokens(out.tokens).add(1).mul(0.5), out.images, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_maskgit_groups_partition_the_last_scale(n):
    orders = torch.stack([torch.randperm(36, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    groups = maskgit_groups(orders, n) if n > 1 else [orders.sort(1).values]
    assert len(groups) == n
    got = torch.cat(groups, 1).sort(1).values
    assert torch.equal(got, torch.arange(36).expand(2, 36))
    assert all(torch.equal(g, g.sort(1).values) for g in groups)


def test_cfg_weights_last_scale_is_stale():
    w = cfg_weights(4.5, 14)
    assert w[:13] == [4.5 * (si / 13) for si in range(13)] and w[13] == w[12]


def test_bad_inputs(model):
    ctx, mask = inputs()
    with pytest.raises(ValueError, match="context must have shape"):
        model.condition(HARTCondition(ctx[:, :4], mask[:, :4]))
    with pytest.raises(ValueError, match="context_mask"):
        model.condition(HARTCondition(ctx, mask[:, :4]))
    with pytest.raises(ValueError, match="maskgit_orders"):
        model.condition(HARTCondition(ctx, mask, num_maskgit_iters=2))
    with pytest.raises(TypeError, match="HARTCondition"):
        model.condition(ctx)
    with pytest.raises(ValueError, match="seed"):
        sample_hart_reference(model, ctx, mask, seed=None)
    with pytest.raises(ValueError, match="unknown config keys"):
        HARTConfig.from_dict({"depth": 2, "deepth": 3})
    with pytest.raises(ValueError, match="attn_type"):
        HARTConfig(attn_type="gpt2")
    with pytest.raises(ValueError, match="ms_idx_Bl"):
        model.tokenizer.tokens_to_fhat([torch.zeros(2, 1, dtype=torch.long)])


def test_preset_builds_with_upstream_sizes():
    from ssg_engine.families.hart.config import PRESETS

    cfg = PRESETS["hart_0.7b_1024px"]
    assert cfg.patch_nums == (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64) and cfg.context_token == 300
    with torch.device("meta"):
        m = HART(cfg, HARTTokenizer(HARTTokenizerConfig(), cfg.patch_nums))
    assert m.cache_layout() == (cfg.depth, cfg.num_heads, 300 + sum(p * p for p in cfg.patch_nums[1:]), cfg.embed_dim // cfg.num_heads)
