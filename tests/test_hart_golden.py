"""HART family against upstream mit-han-lab/hart (tests/golden/hart, made by make_hart_golden.py from upstream's
code on tiny random models; CPU, float32). The model loads the golden folders' upstream-format weights unchanged."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from ssg_engine.families.hart.diffusion import DiffusionHead
from ssg_engine.families.hart.loading import load_hart
from ssg_engine.families.hart.model import HARTCondition, maskgit_groups
from ssg_engine.families.hart.sampler import cfg_weights, sample_hart_reference
from ssg_engine.pipeline import ConcatKVCache

GOLDEN = Path(__file__).parent / "golden" / "hart"
# every recorded model configuration (a folder with upstream's llm/ layout; text/ holds the text encoder's data)
CONFIGS = sorted(p.name for p in GOLDEN.iterdir() if (p / "llm").is_dir() and (p / "golden.safetensors").is_file())
assert len(CONFIGS) >= 2, f"the HART golden configurations are missing from {GOLDEN}"


def golden(name: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / name / "golden.safetensors"))


def runs(name: str) -> List[dict]:
    return [json.loads(p.read_text()) for p in sorted((GOLDEN / name).glob("ar*.json"))]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    r, m = rel(a, b), (a.double() - b.double()).abs().max().item()
    assert r <= rtol, f"{what}: relative error {r:.3g} (max abs {m:.3g}) > {rtol}"


class ReplayNoise:
    """The diffusion noise upstream drew (recorded), handed out in the same order."""

    def __init__(self, initial: torch.Tensor, steps: torch.Tensor) -> None:
        self.init, self.steps, self.i = initial, list(steps), 0

    def initial(self, rows: int, channels: int, device: torch.device) -> torch.Tensor:
        assert self.init.shape == (rows, channels)
        return self.init.clone()

    def step(self, like: torch.Tensor) -> torch.Tensor:
        out = self.steps[self.i]
        self.i += 1
        assert out.shape == like.shape
        return out.clone()


@pytest.fixture(scope="module")
def ema_models():
    """Each configuration as upstream's sample.py loads it by default (``llm/ema_model.bin``), loaded once."""
    return {name: load_hart(GOLDEN / name)[0] for name in CONFIGS}


@pytest.fixture(scope="module")
def plain_models():
    """The non-EMA weights (``llm/model.safetensors``) of each configuration, loaded once."""
    return {name: load_hart(GOLDEN / name, prefer_ema=False)[0] for name in CONFIGS}


@pytest.fixture(scope="module", params=CONFIGS)
def case(request, ema_models):
    name = request.param
    return name, golden(name), ema_models[name], runs(name)


def weights_of(run: dict, model, plain):
    return model if run["weights"] == "ema" else plain


def test_teacher_forced_logits(case):
    name, g, model, _ = case
    with torch.no_grad():
        logits = model(g["ctx.tensor"], g["tf.x_BLCv"], g["ctx.position_ids"], g["ctx.mask"])
    assert_close(logits, g["tf.logits"], 1e-6, f"{name} teacher-forced logits")


def test_non_ema_weights_differ(case, plain_models):
    name, g, model, _ = case
    assert not torch.equal(plain_models[name].head.weight, model.head.weight), "ema_model.bin was not preferred"


def test_tokenizer_encode_decode(case):
    name, g, model, _ = case
    tok, K = model.tokenizer, len(model.patch_nums)
    with torch.no_grad():
        f = tok.quant_conv(tok.encoder(g["enc.img"]))
        enc = tok.img_to_idxBl_and_frest(g["enc.img"])
        fhat = tok.embeddings_to_fhat(enc[: K - 1], g["enc.resid"])
        img = tok.fhat_to_img(fhat.clone())
        img_discrete = tok.decode_tokens([g[f"enc.idx.{si}"] for si in range(K)])
    assert_close(f, g["enc.f"], 1e-6, f"{name} encoder")
    for si in range(K):
        assert torch.equal(enc[si], g[f"enc.idx.{si}"]), f"{name} encode tokens at scale {si}"
    assert_close(enc[K], g["enc.resid"], 1e-6, f"{name} encode residual")
    assert_close(fhat, g["dec.fhat"], 1e-6, f"{name} f_hat")
    assert_close(img, g["dec.img"], 1e-5, f"{name} decoded image")
    assert_close(img_discrete, g["dec.img_discrete"], 1e-5, f"{name} decoded image (codes only)")


def test_diffusion_head_given_noise(case, plain_models):
    name, g, model, rs = case
    for n, run in enumerate(rs):
        head = weights_of(run, model, plain_models[name]).diffloss
        for it, weight in enumerate(run["diffusion_cfg_per_iter"]):
            p = f"ar{n}.last.diff"
            noise = ReplayNoise(g[f"{p}.noise.{it}"], g[f"{p}.step_noise.{it}"])
            out = head.sample(g[f"{p}.z.{it}"], weight, noise)
            assert noise.i == len(noise.steps)
            assert_close(out, g[f"{p}.out.{it}"], 1e-6, f"{name} ar{n} diffusion pass {it}")


def test_respacing_rounds_ties_to_even():
    head = DiffusionHead(4, 4, 8, 1, "5")
    assert head.schedule.timestep_map == [0, 250, 500, 749, 999]  # 249.75 * 3 = 749.25; 499.5 -> 500 (banker's)


def test_kv_cached_logits_given_tokens(case):
    name, g, model, rs = case
    K, ctx, mask, pos = len(model.patch_nums), g["ctx.tensor"], g["ctx.mask"], g["ctx.position_ids"]
    for n, run in enumerate(rs):
        if run["weights"] != "ema":
            continue  # the other weights' runs are checked by the full run test
        p, B, weights = f"ar{n}", run["B"], cfg_weights(run["cfg"], K)
        orders = g[f"{p}.last.orders"]
        state = model.condition(HARTCondition(ctx, mask, pos, weights[-1], num_maskgit_iters=run["num_maskgit_iters"], maskgit_orders=orders))
        for it, group in enumerate(state.groups):
            want = g[f"{p}.last.pred_mask.{it}"].bool()
            got = torch.zeros_like(want).scatter_(1, group, True)
            assert torch.equal(got, want), f"{name} {p} MaskGIT pass {it} positions"
        kv = ConcatKVCache(model.depth)
        with torch.no_grad():
            for si in range(K):
                logits = model.step(state, si, kv)
                t = weights[si]
                cfg = (1 + t) * logits[:B] - t * logits[B:]
                if si < K - 1:
                    assert_close(cfg, g[f"{p}.logits.{si}"], 1e-6, f"{name} {p} scale {si} logits")
                    # (B, l, Cvae) with fresh canonical strides, as upstream's embeddings have: the bicubic upsampling
                    # of a 1x1 map picks its kernel (and rounding) by strides
                    h = g[f"{p}.h.{si}"].flatten(2).transpose(1, 2).clone(memory_format=torch.contiguous_format)
                    model.next_input_embeddings(state, si, h)
                else:
                    for it, group in enumerate(state.groups):
                        got = cfg.gather(1, group[..., None].expand(-1, -1, cfg.shape[-1]))
                        assert_close(got, g[f"{p}.last.logits.{it}"], 1e-6, f"{name} {p} last scale pass {it} logits")


@pytest.mark.parametrize("name,n", [(name, n) for name in CONFIGS for n in range(len(runs(name)))])
def test_full_run_upstream_compat(name, n, ema_models, plain_models):
    g, rs, model = golden(name), runs(name), ema_models[name]
    run = rs[n]
    plain = weights_of(run, model, plain_models[name])
    p, K = f"ar{n}", len(model.patch_nums)
    torch.manual_seed(run["torch_seed"])
    np.random.seed(run["np_seed"])
    out = sample_hart_reference(
        plain, g["ctx.tensor"], g["ctx.mask"], g["ctx.position_ids"], cfg=run["cfg"], top_p=run["top_p"], seed=run["g_seed"],
        more_smooth=run["more_smooth"], upstream_compat=True, num_maskgit_iters=run["num_maskgit_iters"],
    )
    for si in range(K - 1):
        assert torch.equal(out.tokens[si], g[f"{p}.idx.{si}"]), f"{name} {p} tokens at scale {si}"
    groups = maskgit_groups(g[f"{p}.last.orders"], run["num_maskgit_iters"]) if run["num_maskgit_iters"] > 1 else [None]
    for it, group in enumerate(groups):
        got = out.tokens[-1] if group is None else out.tokens[-1].gather(1, group)
        assert torch.equal(got, g[f"{p}.last.idx.{it}"]), f"{name} {p} last-scale tokens of pass {it}"
    assert_close(out.images, g[f"{p}.img"], 1e-6, f"{name} {p} images")


def test_autoregressive_infer_cfg_signature(ema_models):
    """Upstream's entry point, called as sample.py calls it (top_k is accepted and ignored, as upstream)."""
    name = CONFIGS[0]
    g, run, model = golden(name), runs(name)[0], ema_models[name]
    assert run["weights"] == "ema"
    torch.manual_seed(run["torch_seed"])
    np.random.seed(run["np_seed"])
    img = model.autoregressive_infer_cfg(
        B=run["B"], label_B=g["ctx.tensor"], cfg=run["cfg"], g_seed=run["g_seed"], top_k=7, top_p=run["top_p"],
        more_smooth=run["more_smooth"], context_position_ids=g["ctx.position_ids"], context_mask=g["ctx.mask"],
        num_maskgit_iters=run["num_maskgit_iters"],
    )
    assert_close(img, g["ar0.img"], 1e-6, f"{name} ar0 images via autoregressive_infer_cfg")


def test_single_file_weights(tmp_path, ema_models):
    """A ``.pth`` file next to its config.json loads the same model as the released folder."""
    import shutil

    name = CONFIGS[0]
    shutil.copy(GOLDEN / name / "llm" / "config.json", tmp_path / "config.json")
    torch.save(torch.load(GOLDEN / name / "llm" / "ema_model.bin", weights_only=True), tmp_path / "hart.pth")
    model, _ = load_hart(tmp_path / "hart.pth", GOLDEN / name / "tokenizer")
    want = ema_models[name].state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="llm .*missing.pth does not exist"):
        load_hart(tmp_path / "missing.pth", GOLDEN / name / "tokenizer")
