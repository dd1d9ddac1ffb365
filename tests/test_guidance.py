"""DSE operator, priors, the SSG formula and schedule, and SSG inside sampling."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err

from ssg_engine import SSG, dse, dse_operator, generate, prior, sample_reference, ssg_logits
from ssg_engine.guidance import PRIORS, dct_matrix, dse_reference, prior_operator

VAR256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
PAIRS = sorted({(a, b) for pn in (VAR256, VAR512) for a, b in zip(pn[:-1], pn[1:])})


def _dct2(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return dct_matrix(h) @ x @ dct_matrix(w).T


@pytest.mark.parametrize("src, dst", PAIRS)
@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_operator_equals_literal_dct_path(src, dst, interp):
    torch.manual_seed(src * 100 + dst)
    x = torch.randn(2, src * src, 3, dtype=torch.float64)
    assert rel_err(dse(x, src, dst, interp), dse_reference(x, src, dst, interp)) < 1e-10


@pytest.mark.parametrize("src, dst", [((2, 3), (4, 5)), ((1, 4), (3, 4)), ((5, 2), (5, 7)), ((3, 3), (3, 3))])
def test_non_square_sizes(src, dst):
    x = torch.randn(1, src[0] * src[1], 2, dtype=torch.float64)
    out = dse(x, src, dst)
    assert out.shape == (1, dst[0] * dst[1], 2)
    assert rel_err(out, dse_reference(x, src, dst)) < 1e-10


@pytest.mark.parametrize("src, dst", [(1, 2), (3, 4), (13, 16), ((2, 3), (5, 4))])
def test_constants_are_kept(src, dst):
    h, w = (src, src) if isinstance(src, int) else src
    H, W = (dst, dst) if isinstance(dst, int) else dst
    x = torch.full((1, h * w, 1), 2.5, dtype=torch.float64)
    assert torch.allclose(dse(x, src, dst), torch.full((1, H * W, 1), 2.5, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("src, dst", [(3, 4), (8, 10), ((2, 3), (5, 4))])
def test_spectrum_low_block_and_high_band(src, dst):
    h, w = (src, src) if isinstance(src, int) else src
    H, W = (dst, dst) if isinstance(dst, int) else dst
    x = torch.randn(h, w, dtype=torch.float64)
    out = dse(x.reshape(1, h * w, 1), src, dst).reshape(H, W)
    spec = _dct2(out)
    assert torch.allclose(spec[:h, :w], math.sqrt(H * W / (h * w)) * _dct2(x), atol=1e-10)
    interp = torch.nn.functional.interpolate(x[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    high = torch.ones(H, W, dtype=torch.bool)
    high[:h, :w] = False
    assert torch.allclose(spec[high], _dct2(interp)[high], atol=1e-10)


def test_linear_and_identical_per_channel():
    x, y = torch.randn(2, 16, 5, dtype=torch.float64), torch.randn(2, 16, 5, dtype=torch.float64)
    assert torch.allclose(dse(2 * x - 3 * y, 4, 5), 2 * dse(x, 4, 5) - 3 * dse(y, 4, 5), atol=1e-12)
    one = dse(x[:, :, :1], 4, 5)
    for v in range(5):
        assert torch.allclose(dse(x[:, :, v : v + 1], 4, 5), dse(x, 4, 5)[:, :, v : v + 1], atol=1e-12)
    assert one.shape == (2, 25, 1)


def test_operator_cached_per_device_dtype():
    a = dse_operator(5, 6)
    assert dse_operator(5, 6) is a
    assert dse_operator(5, 6, dtype=torch.float64) is not a and dse_operator(5, 6, dtype=torch.float64).dtype == torch.float64
    assert dse_operator(5, 6, interp="bicubic") is not a


@pytest.mark.parametrize("kind", ["bilinear", "bicubic", "nearest", "area"])
def test_ablation_priors_match_interpolate(kind):
    x = torch.randn(2, 9, 4, dtype=torch.float64)
    maps = x.permute(0, 2, 1).reshape(8, 1, 3, 3)
    kw = {"align_corners": False} if kind in ("bilinear", "bicubic") else {}
    ref = torch.nn.functional.interpolate(maps, size=(5, 5), mode=kind, **kw).reshape(2, 4, 25).permute(0, 2, 1)
    assert torch.allclose(prior(x, 3, 5, kind), ref, atol=1e-12)


def test_none_prior_is_zero():
    assert torch.count_nonzero(prior(torch.randn(1, 4, 3), 2, 3, "none")) == 0


def test_ssg_formula_hand_computed():
    # 1x1 -> 2x2: every prior of a constant map is that constant, so prior = l_prev everywhere
    l_k = torch.tensor([[[1.0, 2.0], [0.0, 1.0], [3.0, -1.0], [2.0, 2.0]]])  # (1, 4, 2)
    l_prev = torch.tensor([[[1.0, 0.5]]])  # (1, 1, 2)
    out = ssg_logits(l_k, l_prev, 1, 2, beta=0.5)
    expected = l_k + 0.5 * (l_k - torch.tensor([1.0, 0.5]))
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(ssg_logits(l_k, l_prev, 1, 2, beta=0.0), l_k)


def test_schedules_resolve():
    assert SSG(beta=0.3).step_betas(4) == [0.0, 0.3, 0.3, 0.3]
    assert SSG(beta=0.3, first_step=2, last_step=2).step_betas(4) == [0.0, 0.0, 0.3, 0.0]
    assert SSG(betas=[9.0, 0.1, 0.2, 0.3]).step_betas(4) == [0.0, 0.1, 0.2, 0.3]
    ramp = SSG(beta_start=0.0, beta_end=1.0).step_betas(5)
    assert ramp == pytest.approx([0.0, 0.0, 1 / 3, 2 / 3, 1.0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=0.5, prior="gaussian"), "unknown prior 'gaussian'; choose one of dse, bilinear, bicubic, nearest, area, none"),
        (dict(beta=0.5, interp="lanczos"), "unknown DSE interpolation 'lanczos'; choose one of bilinear, bicubic"),
        (dict(beta=float("nan")), "beta must be a finite number"),
        (dict(beta=float("inf")), "beta must be a finite number"),
        (dict(beta=0.1, betas=[0.1]), "exactly one of"),
        (dict(beta_start=0.1), "needs both"),
        (dict(beta=0.1, first_step=0), "first_step must be an integer >= 1"),
        (dict(beta=0.1, prior_source="raw"), "unknown prior_source"),
    ],
)
def test_bad_ssg_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSG(**kwargs)


def test_schedule_length_and_range_checked():
    with pytest.raises(ValueError, match="betas has 3 entries but the model samples 7 steps"):
        SSG(betas=[0.1, 0.2, 0.3]).step_betas(7)
    with pytest.raises(ValueError, match="last_step=9 is past the last step 6"):
        SSG(beta=0.1, last_step=9).step_betas(7)


def test_destination_smaller_than_source():
    with pytest.raises(ValueError, match="destination .* is smaller than source"):
        dse(torch.randn(1, 16, 2), 4, 3)
    with pytest.raises(ValueError, match="x has 10 tokens but the source size 3x3 needs 9"):
        dse_reference(torch.randn(1, 10, 2), 3, 4)


def test_unknown_prior_kind_in_operator():
    with pytest.raises(ValueError, match="unknown prior 'cubic'; choose one of " + ", ".join(PRIORS)):
        prior_operator("cubic", 2, 3)


# ----------------------------------------------------------------------------- inside sampling


def _run(var, **kw):
    return sample_reference(var, 2, torch.tensor([1, 9]), seed=7, cfg=1.5, top_k=64, top_p=0.9, record_logits=True, **kw)


def test_beta_zero_is_identical_to_no_ssg(tiny_models):
    _, var = tiny_models
    base, zero = _run(var), _run(var, ssg=SSG(beta=0.0))
    assert all(torch.equal(a, b) for a, b in zip(base.tokens, zero.tokens))
    assert torch.equal(base.images, zero.images)


def test_step0_untouched_and_formula_applied(tiny_models):
    _, var = tiny_models
    out = _run(var, ssg=SSG(beta=0.7))
    assert torch.equal(out.sampled_logits[0], out.cfg_logits[0])
    for k in range(1, len(var.patch_nums)):
        src, dst = var.patch_nums[k - 1], var.patch_nums[k]
        expected = ssg_logits(out.cfg_logits[k], out.cfg_logits[k - 1], src, dst, 0.7)
        assert rel_err(out.sampled_logits[k], expected) < 1e-6


def test_prior_source_guided(tiny_models):
    _, var = tiny_models
    out = _run(var, ssg=SSG(beta=0.7, prior_source="guided"))
    k = 3
    expected = ssg_logits(out.cfg_logits[k], out.sampled_logits[k - 1], var.patch_nums[k - 1], var.patch_nums[k], 0.7)
    assert rel_err(out.sampled_logits[k], expected) < 1e-6
    cfg_source = ssg_logits(out.cfg_logits[k], out.cfg_logits[k - 1], var.patch_nums[k - 1], var.patch_nums[k], 0.7)
    assert rel_err(out.sampled_logits[k], cfg_source) > 1e-4


def test_ssg_changes_greedy_token_in_predicted_direction(tiny_models):
    """With top_k=1, SSG flips a token where the formula says the SSG logit of another token is larger."""
    _, var = tiny_models
    base = sample_reference(var, 2, torch.tensor([1, 9]), seed=0, top_k=1, record_logits=True)
    beta, k = 4.0, 1
    forced = base.tokens  # same history: feed the baseline tokens, compare step k's greedy choice
    guided = sample_reference(var, 2, torch.tensor([1, 9]), seed=0, top_k=1, ssg=SSG(beta=beta), forced_tokens=forced, record_logits=True)
    predicted = ssg_logits(base.cfg_logits[k], base.cfg_logits[k - 1], var.patch_nums[k - 1], var.patch_nums[k], beta).argmax(-1)
    assert torch.equal(guided.sampled_logits[k].argmax(-1), predicted)
    free = sample_reference(var, 2, torch.tensor([1, 9]), seed=0, top_k=1, ssg=SSG(beta=beta))
    assert torch.equal(free.tokens[k], predicted)
    assert not torch.equal(predicted, base.tokens[k]), "beta too small to flip any greedy token in this case"


def test_temperature_scales_sampled_logits(tiny_models):
    _, var = tiny_models
    out = _run(var, temperature=0.5)
    assert torch.allclose(out.sampled_logits[2], out.cfg_logits[2] / 0.5)


def test_generate_api(tiny_models):
    vae, var = tiny_models
    imgs, tokens = generate(var, vae, [1, 2, 3], top_k=50, top_p=0.9, seed=1, ssg=SSG(beta=0.5), return_tokens=True)
    assert imgs.shape == (3, 3, 128, 128) and 0 <= imgs.min() and imgs.max() <= 1
    assert [t.shape[1] for t in tokens] == [p * p for p in var.patch_nums]
    again = generate(var, vae, [1, 2, 3], top_k=50, top_p=0.9, seed=1, ssg=SSG(beta=0.5))
    assert torch.equal(imgs, again)
