"""Generate the golden reference data of upstream HART on tiny random-weight models (CPU, float32).

NOT run by CI and not imported by any test: this script only *produces* the files next to it
(`<config>/llm/`, `<config>/tokenizer/`, `<config>/golden.safetensors`, `<config>/ar*.json`,
`<config>/config.json`). Tests of ssg-engine's HART family read those files; they never need
upstream's code.

Upstream: https://github.com/mit-han-lab/hart at commit e28a41fe15025baf3d48ab004f5d3727c88d8fc7.
Only `hart/` of that checkout is imported, unchanged (hart/modules/models/transformer/*,
hart/modules/models/autoencoder/*, hart/modules/networks/*, hart/modules/diffusion/*,
hart/modules/losses/vqgan/* (the tokenizer folder's discriminator class), hart/utils/*).

How to run (CPU only, float32, about a minute on 2 cores):

    python3 tests/golden/hart/make_hart_golden.py --upstream /work/upstream/hart --out tests/golden/hart
    python3 tests/golden/hart/make_hart_golden.py --upstream /work/upstream/hart --out tests/golden/hart --verify

`--verify` regenerates everything into a temporary folder and compares it with the files in `--out`
(tensors bit for bit, JSON files equal) instead of writing. `--only NAME[,NAME]` restricts to a subset
of CONFIGS. Recorded with Python 3.11, torch 2.13.0+cpu, transformers 5.25.0, numpy 2.4.6,
scipy 1.17.1, safetensors 0.8.0.

What it patches in its own process before importing upstream (nothing in upstream's files changes):

* `hart_backend.fused_kernels` -> `hart_backend_standin.py` (next to this script), registered in
  `sys.modules`. basic_hart.py imports it unconditionally; inference only calls its `rms_norm`
  (`LlamaRMSNormFused`); the stand-in follows the CUDA kernel (see its docstring).
* `torch.Tensor.cuda` and `torch.nn.Module.cuda` return `self` (upstream hard-codes `.cuda()` in
  `HARTForT2I.__init__` (vae), `mask_by_order`, `sample_orders`, the last stage's mask/tokens,
  `DiffLoss.sample` (noise) and `p_sample_loop_progressive` (timesteps)). `hart.utils.get_device()`
  already answers "cpu" without CUDA, so `HARTForT2I.rng` is a CPU generator.
* flash-attn and xformers are not installed: upstream's own `except ImportError` paths make every
  attention `torch.nn.functional.scaled_dot_product_attention` (float32; `use_cross_attn=False`, the
  only xformers user).
* transformers 5.25 instead of upstream's pinned 4.42: see `_transformers_compat` (the only
  incompatibilities met are listed there and in the README).

Seeding rule (recorded in each ar{n}.json): immediately before each `autoregressive_infer_cfg` call the
script runs `torch.manual_seed(torch_seed)` (global CPU generator: the diffusion head's initial noise
and its per-step noise; on a GPU upstream would draw the per-step noise from the CUDA generator) and
`np.random.seed(np_seed)` (MaskGIT orders, `np.random.shuffle` per batch row); token draws and
more_smooth's Gumbel noise use upstream's own `CopyableGenerator` seeded with `g_seed`. All drawn
noise and orders are also stored, so a re-implementation can replay them instead of reproducing the
generators.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
UPSTREAM_COMMIT = "e28a41fe15025baf3d48ab004f5d3727c88d8fc7"

# --------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------

CONFIGS = {
    # 5 scales ending at 6x6 (36 last-stage tokens, MaskGIT with 3 iterations in ar1), V = 768 (so
    # upstream's hard-coded top-k 600 really filters), attn_l2_norm on, AdaLN pooling "max",
    # context RMSNorm on, timestep-embedded level embedding, 8 diffusion steps, right padding.
    "a_d2": dict(
        seed=2101,
        vae=dict(vocab_size=768, z_channels=16, ch=32, ch_mult=[1, 1], quant_resi=0.5, share_quant_resi=4),
        llm=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4.0, context_token=12, context_dim=48,
                 attn_l2_norm=True, sep_aln_pooling_mode="max", use_context_norm=True, context_norm_scale=1.0,
                 use_timestep_embed=True, diff_width=64, diff_depth=2, num_sampling_steps="8",
                 patch_nums=[1, 2, 3, 4, 6]),
        head_scale=1.0, codebook_scale=1.0, decoder_out_scale=0.5, ctx_std=2.0, B=2, lens=[5, 9], padding="right",
        runs=[
            # sample.py's defaults: cfg 4.5, top_p 0 (not passed), more_smooth=True, EMA weights
            dict(weights="ema", cfg=4.5, top_p=0.0, more_smooth=True, g_seed=1, torch_seed=11, np_seed=21,
                 num_maskgit_iters=1, raw=False),
            # MaskGIT with 3 iterations at the last stage, top-p, no smoothing
            dict(weights="ema", cfg=2.0, top_p=0.9, more_smooth=False, g_seed=2, torch_seed=12, np_seed=22,
                 num_maskgit_iters=3, raw=False),
            # the non-EMA weights (model.safetensors); raw cond/uncond logits stored
            dict(weights="model", cfg=3.0, top_p=0.0, more_smooth=False, g_seed=3, torch_seed=13, np_seed=23,
                 num_maskgit_iters=1, raw=True),
        ],
    ),
    # 8 scales ending at 8x8 (so the last stage, si = 7, uses upstream's top-k 300), V = 640,
    # attn_l2_norm off, AdaLN pooling "avg" (masked mean), no context norm, plain level embedding,
    # 5 diffusion steps (respacing 0, 250, 500, 749, 999), left padding.
    "b_d3": dict(
        seed=2102,
        vae=dict(vocab_size=640, z_channels=16, ch=32, ch_mult=[1, 1], quant_resi=0.5, share_quant_resi=4),
        llm=dict(depth=3, embed_dim=48, num_heads=3, mlp_ratio=4.0, context_token=16, context_dim=40,
                 attn_l2_norm=False, sep_aln_pooling_mode="avg", use_context_norm=False, context_norm_scale=1.0,
                 use_timestep_embed=False, diff_width=48, diff_depth=3, num_sampling_steps="5",
                 patch_nums=[1, 2, 3, 4, 5, 6, 7, 8]),
        head_scale=1.0, codebook_scale=1.0, decoder_out_scale=0.5, ctx_std=1.0, B=2, lens=[7, 16], padding="left",
        runs=[
            dict(weights="ema", cfg=4.5, top_p=0.0, more_smooth=True, g_seed=4, torch_seed=14, np_seed=24,
                 num_maskgit_iters=2, raw=False),
            dict(weights="ema", cfg=1.5, top_p=0.8, more_smooth=False, g_seed=5, torch_seed=15, np_seed=25,
                 num_maskgit_iters=1, raw=False),
        ],
    ),
}

# HARTForT2IConfig arguments shared by every configuration (upstream's text-to-image setup: llama
# attention/MLP with RoPE, per-block AdaLN (shared_aln False), no cross-attention, iddpm sampler).
LLM_COMMON = dict(
    mlp_type="llama", attn_type="llama", disable_aln=False, shared_aln=False, use_cross_attn=False,
    drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, norm_eps=1e-6, cond_drop_rate=0.1,
    flash_if_available=True, fused_if_available=True, diffusion_batch_mul=4, sampler="iddpm",
)
VAE_COMMON = dict(quantizer_type="var_hybrid", test_mode=True, using_znorm=False, beta=0.25, quant_conv_ks=3,
                  default_qresi_counts=0, dropout=0.0, hybrid=True, disable_quant_resi=False,
                  freeze_codebook_for_hybrid=True, double_decoder=False)

# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------


def install_stubs() -> None:
    """hart_backend stand-in, .cuda() no-ops."""
    spec = importlib.util.spec_from_file_location("hart_backend.fused_kernels", HERE / "hart_backend_standin.py")
    fk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fk)
    hb = types.ModuleType("hart_backend")
    hb.fused_kernels = fk
    sys.modules["hart_backend"] = hb
    sys.modules["hart_backend.fused_kernels"] = fk
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self


def _transformers_compat(classes) -> list[str]:
    """Minimal shims for transformers 5.x running upstream code written for 4.42 (returns what was done).

    Upstream's PreTrainedModel subclasses never call `self.post_init()`; transformers 5 needs the
    attributes it sets (`all_tied_weights_keys`, ...) in save_pretrained/from_pretrained. post_init
    in 5.x initialises no weight, so calling it at the end of each upstream `__init__` changes nothing else.
    `HARTForT2I.forward` reads `self.gradient_checkpointing`, which neither upstream nor transformers 5
    sets: it is set to False (the inference value).
    """
    done: list[str] = []
    for cls in classes:
        orig = cls.__init__

        def init(self, *a, __orig=orig, **k):
            __orig(self, *a, **k)
            if not hasattr(self, "all_tied_weights_keys"):
                self.post_init()
            if not hasattr(self, "gradient_checkpointing"):
                self.gradient_checkpointing = False

        cls.__init__ = init
        done.append(f"{cls.__name__}.__init__ followed by post_init() (and gradient_checkpointing = False if unset)")

    # transformers 5 builds every model inside a meta-device context in from_pretrained (4.42 built it
    # on the CPU); upstream's HARTForT2I.__init__ cannot run there (it calls .item() in LlamaAttention and
    # from_pretrained for its tokenizer, hart_transformer_t2i.py:115). Build it on the CPU, as 4.42 did.
    llm_cls = classes[0]
    orig_llm_init = llm_cls.__init__

    def llm_init(self, *a, **k):
        with torch.device("cpu"):
            orig_llm_init(self, *a, **k)

    llm_cls.__init__ = llm_init
    done.append(f"{llm_cls.__name__}.__init__ run under torch.device('cpu') (from_pretrained's meta init)")

    # transformers 5's from_pretrained leaves buffers that are in no checkpoint (non-persistent ones:
    # every RoPE `inv_freq`, BH:277, :302, :349-356, :523-529, :583-589) as uninitialised memory; 4.42
    # kept the values the constructor computed. Restore them from a freshly constructed instance.
    for cls in (classes[0], classes[2]):
        orig_fp = cls.from_pretrained.__func__

        def from_pretrained(c, *a, __orig=orig_fp, **k):
            model = __orig(c, *a, **k)
            persistent = set(model.state_dict())
            fresh = dict(type(model)(model.config).named_buffers())
            with torch.no_grad():
                for name, buf in model.named_buffers():
                    if name not in persistent:
                        buf.copy_(fresh[name])
            return model

        cls.from_pretrained = classmethod(from_pretrained)
        done.append(f"{cls.__name__}.from_pretrained: non-persistent buffers restored from a fresh instance")
    return done


def import_upstream(upstream: Path):
    sys.path.insert(0, str(upstream))
    import hart.modules.models.transformer.hart_transformer_t2i as T
    import hart.modules.models.autoencoder as A
    import hart.modules.networks.basic_hart as BH
    import hart.modules.diffusion.gaussian_diffusion as GD
    from hart.modules.losses.vqgan import NLayerDiscriminator
    assert BH.flash_attn_func is None and BH.memory_efficient_attention is None
    compat = _transformers_compat([T.HARTForT2I, A.HARTAutoEncoder, A.HARTAutoEncoderWithDisc, NLayerDiscriminator])
    return types.SimpleNamespace(T=T, A=A, BH=BH, GD=GD, compat=compat)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(module: nn.Module, gen: torch.Generator) -> None:
    """Give every parameter random values (nothing is left at a constant 0 or 1, every one matters).

    Matrices and conv kernels (ndim >= 2): N(0, 1/fan_in); vectors named `weight` (norm scales):
    1 + 0.1 N(0,1); `scale_mul_1H11` (log attention scale): log(4) + 0.1 N(0,1); other vectors
    (biases, q_bias, v_bias): 0.05 N(0,1). Constructor and transformers initialisation are overwritten.
    """
    for name, p in module.named_parameters():
        z = torch.randn(p.shape, generator=gen)
        if name.endswith("scale_mul_1H11"):
            p.copy_(math.log(4.0) + 0.1 * z)
        elif p.ndim >= 2:
            p.copy_(z / math.sqrt(p[0].numel()))
        elif name.endswith("weight"):
            p.copy_(1.0 + 0.1 * z)
        else:
            p.copy_(0.05 * z)


def make_tokenizer(U, cfg, gen, tok_dir: Path):
    """Build HARTAutoEncoderWithDisc with random weights; save it (without the discriminator)."""
    v = cfg["vae"]
    conf = U.A.HARTAutoEncoderWithDiscConfig(
        vocab_size=v["vocab_size"], z_channels=v["z_channels"], ch=v["ch"], ch_mult=list(v["ch_mult"]),
        quant_resi=v["quant_resi"], share_quant_resi=v["share_quant_resi"],
        v_patch_nums=list(cfg["llm"]["patch_nums"]), **VAE_COMMON)
    m = U.A.HARTAutoEncoderWithDisc(conf)
    randomize_(m.vae, gen)
    with torch.no_grad():
        m.vae.quantize.embedding.weight.mul_(cfg["codebook_scale"])  # codes at the encoder output's scale
        m.vae.decoder.conv_out.weight.mul_(cfg["decoder_out_scale"])  # decoded images mostly inside the clamp
    sd = {k: t for k, t in m.state_dict().items() if not k.startswith("disc.")}
    m.save_pretrained(tok_dir, state_dict=dict(sd))  # save_pretrained consumes the dict it is given
    return sd


def make_llm(U, cfg, gen, tok_dir: Path, llm_dir: Path):
    """Build HARTForT2I with random weights; save model.safetensors + config.json + ema_model.bin."""
    conf = U.T.HARTForT2IConfig(vae_path=str(tok_dir), **LLM_COMMON, **cfg["llm"])
    m = U.T.HARTForT2I(conf)
    randomize_(m, gen)
    with torch.no_grad():
        m.head.weight.mul_(cfg["head_scale"])
    m.config.vae_path = None  # released layout: the tokenizer is found at <llm>/../tokenizer
    m.save_pretrained(llm_dir)
    sd = m.state_dict()
    ema, params = {}, dict(m.named_parameters())
    for k, t in sd.items():
        if k in params:  # an EMA of parameters; buffers (zero_k_bias, lvl_1L, the mask) are copied
            std = t.std().item() if t.numel() > 1 else 0.0
            t = t + (0.1 * std if std > 1e-8 else 0.02) * torch.randn(t.shape, generator=gen)
        ema[k] = t.clone()
    torch.save(ema, llm_dir / "ema_model.bin")
    return sd, ema, {k: b.clone() for k, b in m.named_buffers()}


def load_like_sample_py(U, llm_dir: Path):
    """upstream sample.py: AutoModel.from_pretrained(llm) (+ tokenizer at ../tokenizer), eval, EMA deepcopy."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(str(llm_dir))
    model.eval()
    ema_model = copy.deepcopy(model)
    ema_model.load_state_dict(torch.load(llm_dir / "ema_model.bin"))
    return model, ema_model


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def context_inputs(cfg, gen):
    """Stand-in for hart.utils.encode_prompts: (context_tensor, context_mask, context_position_ids)."""
    B, Lc, D = cfg["B"], cfg["llm"]["context_token"], cfg["llm"]["context_dim"]
    mask = torch.zeros(B, Lc, dtype=torch.bool)
    for b, n in enumerate(cfg["lens"]):
        if cfg["padding"] == "right":
            mask[b, :n] = True
        else:
            mask[b, Lc - n:] = True
    pos = torch.cumsum(mask, dim=1) - 1  # encode_prompts: cumsum(mask) - 1 (int64)
    ctx = torch.randn(B, Lc, D, generator=gen) * cfg["ctx_std"]  # every position has features, pads too
    return ctx.float(), mask, pos


def smooth_image(B, H, W, gen):
    low = torch.rand(B, 3, max(2, H // 4), max(2, W // 4), generator=gen) * 2 - 1
    return F.interpolate(low, size=(H, W), mode="bicubic", align_corners=False).clamp(-1, 1).contiguous()


# --------------------------------------------------------------------------------------------
# recording
# --------------------------------------------------------------------------------------------


class Recorder:
    """Wrappers around upstream functions that call the originals unchanged and keep copies."""

    def __init__(self, U):
        self.U, self.on, self.ev = U, False, []
        T = U.T
        orig_sample, orig_mask = T.sample_with_top_k_top_p_, T.mask_by_order

        def sample_rec(logits_BlV, top_k=0, top_p=0.0, rng=None, num_samples=1):
            if self.on:
                self.ev.append(("logits", logits_BlV.clone(), top_k))
            out = orig_sample(logits_BlV, top_k=top_k, top_p=top_p, rng=rng, num_samples=num_samples)
            if self.on:
                self.ev.append(("idx", out[:, :, 0].clone()))
            return out

        def mask_rec(mask_len, order, bsz, seq_len):
            out = orig_mask(mask_len, order, bsz, seq_len)
            if self.on:
                self.ev.append(("mask_next", out.clone(), float(mask_len)))
            return out

        T.sample_with_top_k_top_p_, T.mask_by_order = sample_rec, mask_rec

    def attach(self, model):
        """Instance-level wrappers on one model (and its private VAE copy)."""
        rec = self
        vae, quant, diff = model.vae_proxy[0], model.vae_quant_proxy[0], model.diffloss
        o_logits, o_orders, o_next = model.get_logits, model.sample_orders, quant.get_next_autoregressive_input
        o_diff, o_img = diff.sample, vae.fhat_to_img

        def get_logits(h, cond_BD):
            out = o_logits(h, cond_BD)
            if rec.on:
                rec.ev.append(("raw", out.clone()))
            return out

        def sample_orders(bsz):
            out = o_orders(bsz)
            if rec.on:
                rec.ev.append(("orders", out.clone()))
            return out

        def next_input(si, SN, f_hat, h_BChw, patch_nums=None):
            if rec.on:
                rec.ev.append(("h", si, h_BChw.clone()))
            return o_next(si, SN, f_hat, h_BChw, patch_nums=patch_nums)

        def diff_sample(z, temperature=1.0, cfg=1.5, sampler=None):
            noises = []
            o_randn, o_randn_like = torch.randn, torch.randn_like

            def randn(*a, **k):
                t = o_randn(*a, **k)
                noises.append(t.clone())
                return t

            def randn_like(*a, **k):
                t = o_randn_like(*a, **k)
                noises.append(t.clone())
                return t

            torch.randn, torch.randn_like = randn, randn_like
            try:
                out = o_diff(z=z, temperature=temperature, cfg=cfg, sampler=sampler)
            finally:
                torch.randn, torch.randn_like = o_randn, o_randn_like
            if rec.on:
                rec.ev.append(("diff", z.clone(), float(cfg), noises, out.clone()))
            return out

        def fhat_to_img(f_hat):
            f = f_hat.clone()
            out = o_img(f_hat)
            if rec.on:
                rec.ev.append(("fhat", f, out.clone()))
            return out

        model.get_logits, model.sample_orders = get_logits, sample_orders
        quant.get_next_autoregressive_input = next_input
        diff.sample, vae.fhat_to_img = diff_sample, fhat_to_img


def run_ar(rec: Recorder, model, cfg, run, ctx, mask, pos):
    """One autoregressive_infer_cfg call; returns (tensors, json, raw-per-stage list)."""
    pn = cfg["llm"]["patch_nums"]
    K, B = len(pn), cfg["B"]
    rec.ev, rec.on = [], True
    torch.manual_seed(run["torch_seed"])
    np.random.seed(run["np_seed"])
    try:
        img = model.autoregressive_infer_cfg(
            B=B, label_B=ctx.clone(), g_seed=run["g_seed"], cfg=run["cfg"], top_p=run["top_p"],
            more_smooth=run["more_smooth"], context_position_ids=pos.clone(), context_mask=mask.clone(),
            num_maskgit_iters=run["num_maskgit_iters"])
    finally:
        rec.on = False
    ev = rec.ev
    t: dict[str, torch.Tensor] = {}
    raws = [e[1] for e in ev if e[0] == "raw"]
    logits = [e for e in ev if e[0] == "logits"]
    idxs = [e[1] for e in ev if e[0] == "idx"]
    hs = [e for e in ev if e[0] == "h"]
    diffs = [e for e in ev if e[0] == "diff"]
    masks = [e for e in ev if e[0] == "mask_next"]
    n_it = run["num_maskgit_iters"]
    assert len(logits) == K - 1 + n_it and len(raws) == K - 1 + n_it and len(diffs) == n_it and len(hs) == K - 1
    top_ks = [e[2] for e in logits]
    for si in range(K - 1):
        t[f"logits.{si}"] = logits[si][1]
        t[f"idx.{si}"] = idxs[si]
        t[f"h.{si}"] = hs[si][2]
        assert hs[si][1] == si
    orders = [e[1] for e in ev if e[0] == "orders"]
    assert len(orders) == 1
    t["last.orders"] = orders[0]
    Llast = pn[-1] ** 2
    prev = torch.ones(B, Llast, dtype=torch.bool)
    diff_cfgs, diff_json = [], []
    for it in range(n_it):
        nxt = masks[it][1].bool()
        pred = prev if it == n_it - 1 else torch.logical_xor(prev, nxt)
        prev = nxt
        t[f"last.pred_mask.{it}"] = pred.to(torch.uint8)
        t[f"last.logits.{it}"] = logits[K - 1 + it][1]
        t[f"last.idx.{it}"] = idxs[K - 1 + it]
        _, z, dcfg, noises, out = diffs[it]
        t[f"last.diff.z.{it}"] = z
        t[f"last.diff.noise.{it}"] = noises[0]
        t[f"last.diff.step_noise.{it}"] = torch.stack(noises[1:])
        t[f"last.diff.out.{it}"] = out
        diff_cfgs.append(dcfg)
        diff_json.append(dict(n_pred=int(pred[0].sum()), mask_len=masks[it][2]))
    fh = [e for e in ev if e[0] == "fhat"]
    assert len(fh) == 1
    t["fhat"] = fh[0][1]
    t["img"] = img.clone()
    assert torch.equal(fh[0][2].add(1).mul(0.5), img)
    if run["raw"]:
        t["raw.0"] = raws[0][:, -1:].clone()
        for si in range(1, K - 1):
            t[f"raw.{si}"] = raws[si]
        for it in range(n_it):
            t[f"raw.last.{it}"] = raws[K - 1 + it]
    js = dict(B=B, context="ctx", cfg=run["cfg"], top_p=run["top_p"], more_smooth=run["more_smooth"],
              g_seed=run["g_seed"], torch_seed=run["torch_seed"], np_seed=run["np_seed"],
              num_maskgit_iters=n_it, final_stage=0, weights=run["weights"],
              num_sampling_steps=cfg["llm"]["num_sampling_steps"],
              top_k_per_call=top_ks, diffusion_cfg_per_iter=diff_cfgs, maskgit_iters=diff_json,
              raw_logits_stored=run["raw"])
    return t, js, raws


def teacher_force(model, cfg, ctx, mask, pos, idx, last_gt, np_seed=0, torch_seed=0):
    """HARTForT2I.forward on given tokens; conditioning dropout and MaskGIT masking switched off."""
    quant = model.vae_quant_proxy[0]
    x = quant.idxBl_to_var_input([i.clone() for i in idx])
    model.cond_drop_rate = -math.inf  # forward drops context rows where randn(B) < cond_drop_rate, even in eval

    class NoMask:  # forward masks ceil(L_last * r) last-stage tokens, r ~ truncnorm; r = 0 keeps all
        @staticmethod
        def rvs(n):
            return np.zeros(n)

    saved = model.mask_ratio_generator
    model.mask_ratio_generator = NoMask()
    torch.manual_seed(torch_seed)
    np.random.seed(np_seed)
    try:
        logits, _, _ = model(ctx.clone(), x, pos.clone(), mask.clone(), last_gt.clone(), idx[-1].clone())
    finally:
        model.mask_ratio_generator = saved
        model.cond_drop_rate = LLM_COMMON["cond_drop_rate"]
    return x, logits


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------
# one configuration
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(U, rec: Recorder, name: str, cfg: dict, out: Path) -> dict:
    t0 = time.time()
    gen = torch.Generator().manual_seed(cfg["seed"])
    d = out / name
    if d.exists():
        shutil.rmtree(d)
    tok_dir, llm_dir = d / "tokenizer", d / "llm"
    tok_sd = make_tokenizer(U, cfg, gen, tok_dir)
    llm_sd, ema_sd, llm_buffers = make_llm(U, cfg, gen, tok_dir, llm_dir)

    # load back exactly as upstream's sample.py does
    model, ema_model = load_like_sample_py(U, llm_dir)
    for k, v in model.state_dict().items():
        assert torch.equal(v, llm_sd[k]), k
    for k, v in ema_model.state_dict().items():
        assert torch.equal(v, ema_sd[k]), k
    for m in (model, ema_model):  # non-persistent buffers (RoPE inv_freq) as the constructor made them
        for k, v in m.named_buffers():
            assert torch.equal(v, llm_buffers[k]), k
    for k, v in model.vae_proxy[0].state_dict().items():
        assert torch.equal(v, tok_sd["vae." + k]), k
    models = {"model": model, "ema": ema_model}
    for m in models.values():
        rec.attach(m)
    vae = model.vae_proxy[0]

    g: dict[str, torch.Tensor] = {}
    ctx, mask, pos = context_inputs(cfg, gen)
    g["ctx.tensor"], g["ctx.mask"], g["ctx.position_ids"] = ctx, mask, pos
    pn = cfg["llm"]["patch_nums"]
    K, B, V, Cvae = len(pn), cfg["B"], cfg["vae"]["vocab_size"], cfg["vae"]["z_channels"]

    # teacher forcing on random tokens (EMA weights)
    tf_idx = [torch.randint(0, V, (B, p * p), generator=gen) for p in pn]
    tf_gt = torch.randn(B, pn[-1] ** 2, Cvae, generator=gen)
    x, logits = teacher_force(ema_model, cfg, ctx, mask, pos, tf_idx, tf_gt)
    for si, i in enumerate(tf_idx):
        g[f"tf.idx.{si}"] = i
    g["tf.x_BLCv"], g["tf.last_gt"], g["tf.logits"] = x, tf_gt, logits

    # tokenizer encode / decode on a smooth random image
    down = 2 ** (len(cfg["vae"]["ch_mult"]) - 1)
    H = down * pn[-1]
    img = smooth_image(B, H, H, gen)
    f = vae.quant_conv(vae.encoder(img))
    enc = vae.img_to_idxBl_and_frest(img)
    g["enc.img"], g["enc.f"] = img, f
    for si in range(K):
        g[f"enc.idx.{si}"] = enc[si]
    g["enc.resid"] = enc[K]
    quant = vae.quantize

    def decode(last_tokens):  # upstream's inference accumulation + fhat_to_img
        fh = torch.zeros(B, Cvae, pn[-1], pn[-1])
        for si in range(K):
            h = (quant.embedding(enc[si]) if si < K - 1 else last_tokens).transpose(1, 2).reshape(B, Cvae, pn[si], pn[si])
            fh, _ = U.A.HARTHybridQuantizer.get_next_autoregressive_input(quant, si, K, fh, h, patch_nums=pn)
        return fh.clone(), vae.fhat_to_img(fh.clone())

    g["dec.fhat"], g["dec.img"] = decode(enc[K])
    _, g["dec.img_discrete"] = decode(quant.embedding(enc[K - 1]))
    checks = {"dec.fhat_vs_enc.f": rel(g["dec.fhat"], f)}
    assert checks["dec.fhat_vs_enc.f"] < 1e-5, checks

    # sampling runs
    runs_js = []
    for n, run in enumerate(cfg["runs"]):
        m = models[run["weights"]]
        t, js, raws = run_ar(rec, m, cfg, run, ctx, mask, pos)
        for k, v in t.items():
            g[f"ar{n}.{k}"] = v
        runs_js.append(js)
        if not run["more_smooth"] and run["num_maskgit_iters"] == 1:
            # teacher forcing on the sampled tokens reproduces the cached sampler's conditional rows
            idx = [t[f"idx.{si}"] for si in range(K - 1)] + [t["last.idx.0"]]
            _, tfl = teacher_force(m, cfg, ctx, mask, pos, idx, torch.zeros(B, pn[-1] ** 2, Cvae))
            cached = torch.cat([raws[0][:B, -1:]] + [r[:B] for r in raws[1:]], dim=1)
            checks[f"ar{n}.tf_vs_cached"] = rel(tfl, cached)
            assert checks[f"ar{n}.tf_vs_cached"] < 1e-5, checks
        img_n = t["img"]
        checks[f"ar{n}.img_clamped_frac"] = float(((img_n <= 0) | (img_n >= 1)).float().mean())

    d.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in g.items()}, str(d / "golden.safetensors"))
    for n, js in enumerate(runs_js):
        (d / f"ar{n}.json").write_text(dumps(js))
    qr = quant.quant_resi
    qr_index = [list(qr.qresi_ls).index(qr[si / (K - 1)]) for si in range(K)]
    conf = dict(name=name, upstream_commit=UPSTREAM_COMMIT, quant_resi_index_per_scale=qr_index, seed=cfg["seed"], B=B, lens=cfg["lens"],
                padding=cfg["padding"], ctx_std=cfg["ctx_std"], head_scale=cfg["head_scale"], image_size=H,
                llm={**LLM_COMMON, **cfg["llm"]}, tokenizer={**VAE_COMMON, **cfg["vae"]},
                transformers_compat=U.compat)
    (d / "config.json").write_text(dumps(conf))
    return dict(seconds=round(time.time() - t0, 1), checks=checks)


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def compare(new: Path, old: Path) -> list[str]:
    from safetensors.torch import load_file
    bad = []
    for p in sorted(new.rglob("*")):
        if p.is_dir():
            continue
        q = old / p.relative_to(new)
        if not q.exists():
            bad.append(f"missing {q}")
        elif p.suffix == ".safetensors":
            a, b = load_file(str(p)), load_file(str(q))
            if a.keys() != b.keys():
                bad.append(f"{q}: keys differ")
            bad += [f"{q}:{k}" for k in a if k in b and not torch.equal(a[k], b[k])]
        elif p.suffix == ".bin":
            a, b = torch.load(p), torch.load(q)
            bad += [f"{q}:{k}" for k in a if not torch.equal(a[k], b.get(k, torch.empty(0)))]
        elif p.read_bytes() != q.read_bytes():
            bad.append(f"{q}: differs")
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", type=Path, required=True, help="checkout of mit-han-lab/hart at " + UPSTREAM_COMMIT)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--only", default="")
    ap.add_argument("--verify", action="store_true")
    args = ap.parse_args()
    if not (args.upstream / "hart/modules/models/transformer/hart_transformer_t2i.py").exists():
        sys.exit(f"--upstream {args.upstream}: not a checkout of mit-han-lab/hart")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    install_stubs()
    U = import_upstream(args.upstream)
    rec = Recorder(U)
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    dest = Path(tempfile.mkdtemp(prefix="hart_golden_")) if args.verify else args.out
    for name in names:
        info = generate(U, rec, name, CONFIGS[name], dest)
        print(name, json.dumps(info))
    if args.verify:
        bad = compare(dest, args.out)
        shutil.rmtree(dest)
        print("verify:", "OK (bit-exact)" if not bad else f"{len(bad)} differences: {bad[:10]}")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
