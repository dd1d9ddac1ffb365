"""Generate the golden reference data of upstream Infinity on tiny random-weight models.

NOT run by CI and not imported by any test: this script only *produces* the files next to it
(`<config>/config.json`, `<config>/infinity.pth`, `<config>/vae.pth`, `<config>/golden.safetensors`,
`<config>/ar*.json`). The tests of ssg-engine's Infinity family read those files; they never need
upstream's code.

Upstream: https://github.com/FoundationVision/Infinity at commit
    4c27bbb54a9918847a2fe56b0fbe31a8523791a1  (2025-11-10, "Update README.md")
Only `infinity/` of that checkout is used (models/infinity.py, models/basic.py, models/fused_op.py,
models/flex_attn.py, models/bitwise_self_correction.py, models/bsq_vae/*, utils/dist.py,
utils/misc.py, utils/dynamic_resolution.py). Upstream's code is imported unchanged.

How to run (CPU only, about a minute on 2 cores; float32):

    git clone https://github.com/FoundationVision/Infinity /tmp/infinity
    git -C /tmp/infinity checkout 4c27bbb54a9918847a2fe56b0fbe31a8523791a1
    pip install --target /tmp/pydeps einops pytz          # pure-Python deps upstream imports
    PYTHONPATH=/tmp/pydeps python tests/golden/infinity/make_infinity_golden.py /tmp/infinity

Options: `--out DIR` (default: this script's folder), `--only NAME[,NAME]` (a subset of CONFIGS),
`--check` (regenerate into a temporary folder and compare with the committed files instead of
writing: tensors must agree to rel. error 1e-6, integer tensors exactly).
All randomness is seeded: re-running with the same torch build on the same machine reproduces the
files exactly. Elsewhere floats may differ in the last ulps, and through upstream's bf16 rounding in
the cross-attention occasionally by ~1e-5 relative, which in rare cases changes a sampled bit.
Recorded with Python 3.11.7, torch 2.13.0+cpu, numpy 2.4.6, safetensors 0.8.0, einops 0.8.2.

Environment it sets up before importing upstream (nothing in upstream's files is modified):

* `flash_attn` -> `flash_attn_standin.py` (next to this script), registered as
  `sys.modules["flash_attn"]`. Upstream imports `flash_attn_func` and
  `flash_attn_varlen_kvpacked_func` unconditionally. `flash_attn_func` is never called here
  (customized_flash_attn=False: self-attention runs upstream's non-flash path,
  `torch.nn.functional.scaled_dot_product_attention`, in float32). The cross-attention
  (`CrossAttention.forward`, also the text attentive pool) has only the flash path: upstream casts
  its float32 q/kv to bfloat16, calls `flash_attn_varlen_kvpacked_func`, and casts the result back
  with `.float()`. The stand-in computes per-sequence softmax attention over the packed sequences
  (cu_seqlens), scale `softmax_scale` (upstream passes 1/sqrt(head_dim)), in float32 from the
  bf16 inputs, and rounds its output to bf16 (the input dtype), as flash-attn returns the input
  dtype. See that file's docstring. `flash_attn.ops.*` (fused LN / RMSNorm / MLP) are absent, so
  upstream's own `except ImportError` fallback is taken (`flash_fused_op_installed = False`).
* `timm` (used as is if it imports; timm 0.9.6 needs torchvision, absent here), else a minimal
  stub with what upstream imports:
  `timm.models.register_model` (returns the function unchanged; the registry is not used),
  `timm.models.layers.DropPath` / `drop_path` (timm's semantics; identity in eval mode and
  drop_path_rate is 0 anyway), `timm.loss.SoftTargetCrossEntropy` (timm's formula; only its
  `__repr__` is patched by upstream, it is never called).
* `torchvision` (+ `torchvision.transforms`) and `imageio`: empty modules. Imported at the top of
  `bsq_vae/flux_vqgan.py` and never used by the classes used here.
* `TORCHDYNAMO_DISABLE=1`: `infinity/models/fused_op.py` wraps `fused_ada_layer_norm` in
  `torch.compile(fullgraph=True)`; with dynamo disabled the decorated function runs eagerly
  (`x.float()`, `F.layer_norm` without affine, `.mul(scale + 1).add_(shift)`), the same math as
  the non-fused path, without an inductor/C++ build.

Model construction mirrors upstream's released inference setup (`tools/run_infinity.py`
`load_infinity` and `scripts/infer.sh`): shared_aln=True, fused_norm=True (see below),
customized_flash_attn=False, use_flex_attn=False, pad_to_multiplier=128,
add_lvl_embeding_only_first_block=1, use_bit_label=1, rope2d_each_sa_layer=1,
rope2d_normalized_by_hw=2, apply_spatial_patchify=0, cos_attn=True (default), block_chunks=depth
(autoregressive_infer_cfg iterates `self.block_chunks`, which exists only when block_chunks > 1),
inference_mode=True at sampling, drop_path_rate=0, eval mode.
fused_norm=True matters: in `CrossAttnBlock.forward` only the fused branch passes `scale_ind` to
the self-attention, so only with it does the KV-cached sampler apply RoPE at each scale's own
positions (the non-fused branch always slices the RoPE table from position 0; that branch is not
the released configuration and is not recorded).

The BSQ VAE is upstream's `vae_model(...)` (bsq_vae/vae.py; schedule_mode="dynamic",
patch_size=16, codebook_size=2**d, test_mode=True) with only `base_ch`, `num_res_blocks` and the
channel multipliers made small: `vae_model` hard-codes base_ch=128, num_res_blocks=2, so the
`AutoEncoder` it calls is wrapped to override those two fields of its argument namespace (every
other field is vae_model's own). Random weights: PyTorch default init of every layer, then every
parameter perturbed (see `randomize_`) so that no parameter is a trivial 0 / 1 and every one of
them affects the outputs; the transformer's head is scaled so that bit probabilities range from
near 0.5 to near 0/1 (top-p matters).

Recorded per configuration (one safetensors file; exact keys in the README next to this script):
text features (packed kv_compact / lens / cu_seqlens_k, and a negative-prompt set), teacher-forced
logits for random bit labels, the VAE encoder + multi-scale BSQ quantizer on a random image and
teacher-forced logits for its bits (teacher-forcing input built by upstream's
`BitwiseSelfCorrection.flip_requant`, with bit-flip noise off), and for each sampling run
(`ar{n}.json`): upstream `autoregressive_infer_cfg` with per-scale cfg/tau lists, top-k/top-p on the
2-way bit logits, CFG on logits and/or at a layer's output, negative-prompt features: the
CFG-combined, temperature-scaled logits each scale hands to the sampler, the sampled bits, the
codes, the summed codes; for run 0 also the decoded float image (one decoded image per
configuration keeps the folder small; the other runs' images are a function of their summed codes;
upstream's returned uint8 BGR image is a function of the float one and is checked, not stored). Records are taken with wrappers around upstream functions (the
module-level sampler `sample_with_top_k_top_p_also_inplace_modifying_logits_`,
`vae.quantizer.lfq.indices_to_codes`, `vae.decode`, forward hooks on `text_proj_for_sos` /
`text_proj_for_ca`) that call the originals unchanged.

Self-checks while generating (assertions; nothing is written if one fails): the bits of
`vae.encode` equal those of `flip_requant`, and the teacher-forcing input rebuilt from them with
`bits_to_x_BLC` equals flip_requant's; each recorded decoded image equals
`vae.decoder(summed_codes).clamp(-1, 1)`; for the runs without CFG, teacher forcing
(`Infinity.forward`) on the sampled bits reproduces the KV-cached sampler's logits (rel. < 1e-5 per
scale).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
UPSTREAM_COMMIT = "4c27bbb54a9918847a2fe56b0fbe31a8523791a1"

# --------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------

CONFIGS = {
    # square schedule (h/w = 1.0, '0.06M': 7 scales up to 16x16 -> 256x256 px), d = 16 bits
    "sq_d16": dict(
        seed=20250,
        h_div_w=1.0, pn="0.06M",
        vae=dict(codebook_dim=16, base_ch=24, num_res_blocks=1,
                 encoder_ch_mult=[1, 1, 1, 1, 1], decoder_ch_mult=[1, 1, 1, 1, 1]),
        gpt=dict(depth=2, embed_dim=128, num_heads=2, mlp_ratio=4.0, text_channels=256, text_maxlen=32),
        head_scale=4.0,
        B=2, lens=[7, 12], neg_lens=[5, 9],
        runs=[
            # CFG on logits (cfg_insertion_layer=[0]), release defaults top_k=900 (>= 2: no-op on
            # 2-way logits) and top_p=0.97; cfg 1.0 at the first scale (no guidance there).
            dict(g_seed=11, cfg_list=[1.0, 3.0, 3.0, 2.5, 2.0, 1.5, 1.5],
                 tau_list=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5], top_k=900, top_p=0.97,
                 cfg_insertion_layer=[0], negative=False),
            # CFG at the last layer's output (cfg_insertion_layer=[-1] = layer 1 of 2), top-k=1
            # (greedy per bit; ties keep both), negative prompt features
            dict(g_seed=12, cfg_list=[4.0, 4.0, 3.0, 3.0, 1.0, 2.0, 2.0],
                 tau_list=[1.0, 1.0, 0.75, 0.75, 0.5, 0.5, 0.5], top_k=1, top_p=0.0,
                 cfg_insertion_layer=[-1], negative=True),
            # no CFG (cfg 1 everywhere -> batch B, no uncond half), plain sampling; used for the
            # teacher-forced vs KV-cached consistency check
            dict(g_seed=13, cfg_list=[1.0] * 7, tau_list=[1.0] * 7, top_k=0, top_p=0.0,
                 cfg_insertion_layer=[0], negative=False),
        ],
    ),
    # non-square 2:1 schedule (h/w = 0.5, '0.06M': 7 scales up to 11x22 -> 176x352 px), d = 8 bits
    "wide_d8": dict(
        seed=20251,
        h_div_w=0.5, pn="0.06M",
        vae=dict(codebook_dim=8, base_ch=24, num_res_blocks=1,  # 24 -> 48 channels: nin_shortcut convs
                 encoder_ch_mult=[1, 1, 1, 1, 2], decoder_ch_mult=[1, 1, 1, 1, 2]),
        gpt=dict(depth=3, embed_dim=128, num_heads=4, mlp_ratio=2.0, text_channels=128, text_maxlen=32),
        head_scale=4.0,
        B=2, lens=[10, 4], neg_lens=[6, 3],
        runs=[
            # CFG at a middle layer's output (cfg_insertion_layer=[-2] = layer 1 of 3), top-p 0.8
            dict(g_seed=21, cfg_list=[3.0, 3.0, 2.0, 2.0, 1.5, 1.5, 1.5],
                 tau_list=[1.0, 1.0, 0.8, 0.8, 0.6, 0.6, 0.6], top_k=0, top_p=0.8,
                 cfg_insertion_layer=[-2], negative=False),
            # CFG on logits and at a layer at once ([0, -1]), negative prompt, top-k 900 + top-p 0.9
            dict(g_seed=22, cfg_list=[2.0, 2.0, 2.0, 1.0, 3.0, 3.0, 3.0],
                 tau_list=[0.9, 0.9, 0.9, 0.9, 0.7, 0.7, 0.7], top_k=900, top_p=0.9,
                 cfg_insertion_layer=[0, -1], negative=True),
            # no CFG, plain sampling
            dict(g_seed=23, cfg_list=[1.0] * 7, tau_list=[1.0] * 7, top_k=0, top_p=0.0,
                 cfg_insertion_layer=[0], negative=False),
        ],
    ),
}

# Infinity constructor arguments shared by every configuration (upstream's released inference
# setup, tools/run_infinity.py load_infinity + scripts/infer.sh); cond_drop_rate is set to 0 on the
# instance before teacher forcing (upstream's forward drops text with python `random` otherwise).
GPT_COMMON = dict(
    shared_aln=True, head_aln=True, cos_attn=True, swiglu=False, norm_eps=1e-6, rms_norm=False,
    cross_attn_layer_scale=-1.0, nm0=False, tau=1, head_depth=1,
    customized_flash_attn=False, fused_mlp=False, fused_norm=True, use_flex_attn=False,
    pad_to_multiplier=128, add_lvl_embeding_only_first_block=1, use_bit_label=1,
    rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, apply_spatial_patchify=0,
    drop_rate=0.0, drop_path_rate=0.0, checkpointing="full-block", inference_mode=True,
    train_h_div_w_list=[1.0], cond_drop_rate=0.1, top_p=0.0, top_k=0.0,
)
VAE_COMMON = dict(schedule_mode="dynamic", patch_size=16, test_mode=True)

# --------------------------------------------------------------------------------------------
# stand-ins for unavailable imports
# --------------------------------------------------------------------------------------------


def _module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    m.__file__ = f"<stand-in {name}, {Path(__file__).name}>"
    return m


def install_stubs():
    spec = importlib.util.spec_from_file_location("flash_attn", HERE / "flash_attn_standin.py")
    fa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fa)
    sys.modules["flash_attn"] = fa

    try:  # a working real timm (it needs torchvision) is used as is
        import timm.loss  # noqa: F401
        import timm.models  # noqa: F401
        import timm.models.layers  # noqa: F401
        have_timm = True
    except Exception:
        have_timm = False
        for k in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]:
            del sys.modules[k]
    if not have_timm:
        def register_model(fn):
            return fn

        def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
            if drop_prob == 0.0 or not training:
                return x
            keep = 1 - drop_prob
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
            if keep > 0.0 and scale_by_keep:
                mask.div_(keep)
            return x * mask

        class DropPath(nn.Module):
            def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
                super().__init__()
                self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

            def forward(self, x):
                return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

        class SoftTargetCrossEntropy(nn.Module):
            def forward(self, x, target):
                return torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1).mean()

        layers = _module("timm.models.layers", DropPath=DropPath, drop_path=drop_path)
        models = _module("timm.models", register_model=register_model, layers=layers)
        loss = _module("timm.loss", SoftTargetCrossEntropy=SoftTargetCrossEntropy)
        timm_mod = _module("timm", models=models, loss=loss, __version__="0.0-standin")
        sys.modules.update({"timm": timm_mod, "timm.models": models, "timm.models.layers": layers, "timm.loss": loss})
    for name in ("torchvision", "imageio"):
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = _module(name)
            if name == "torchvision":
                sys.modules["torchvision.transforms"] = sys.modules[name].transforms = _module("torchvision.transforms")
    return {"timm": "real" if have_timm else "stand-in"}


def import_upstream(upstream: Path):
    sys.path.insert(0, str(upstream))
    import infinity.models.infinity as inf_mod  # noqa: F401
    import infinity.models.basic as basic
    import infinity.models.bsq_vae.vae as vae_mod
    import infinity.models.bitwise_self_correction as bsc_mod
    from infinity.utils.dynamic_resolution import dynamic_resolution_h_w

    assert basic.flash_attn_varlen_kvpacked_func is sys.modules["flash_attn"].flash_attn_varlen_kvpacked_func
    assert basic.flash_fused_op_installed is False
    return types.SimpleNamespace(inf=inf_mod, basic=basic, vae=vae_mod, bsc=bsc_mod, table=dynamic_resolution_h_w)


# --------------------------------------------------------------------------------------------
# model construction
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(module: nn.Module, gen: torch.Generator, rel: float = 0.25, abs_: float = 0.05):
    """Perturb every floating parameter: p += rel * std(p) * N(0,1) (+ abs_ * N(0,1) where p is constant)."""
    for name, p in module.named_parameters():
        if not p.is_floating_point():
            continue
        noise = torch.randn(p.shape, generator=gen)
        std = p.float().std().item() if p.numel() > 1 else 0.0
        if std < 1e-8:  # constant init (biases 0, norm weights 1, ...)
            p.add_(abs_ * noise)
        else:
            p.add_(rel * std * noise)


def build_vae(U, cfg, gen):
    v = cfg["vae"]
    d = v["codebook_dim"]
    real_autoencoder = U.vae.AutoEncoder

    def tiny_autoencoder(args):
        args.base_ch = v["base_ch"]
        args.num_res_blocks = v["num_res_blocks"]
        return real_autoencoder(args)

    U.vae.AutoEncoder = tiny_autoencoder
    try:
        vae = U.vae.vae_model(None, VAE_COMMON["schedule_mode"], d, 2 ** d, test_mode=VAE_COMMON["test_mode"],
                              patch_size=VAE_COMMON["patch_size"], encoder_ch_mult=list(v["encoder_ch_mult"]),
                              decoder_ch_mult=list(v["decoder_ch_mult"]))
    finally:
        U.vae.AutoEncoder = real_autoencoder
    randomize_(vae, gen)
    with torch.no_grad():  # keep the decoder output mostly inside upstream's clamp to [-1, 1]
        vae.decoder.conv_out.conv.weight.mul_(0.5)
    return vae.eval()


def build_gpt(U, cfg, vae, gen):
    g = cfg["gpt"]
    kw = dict(GPT_COMMON)
    kw.update(embed_dim=g["embed_dim"], depth=g["depth"], num_heads=g["num_heads"], mlp_ratio=g["mlp_ratio"],
              text_channels=g["text_channels"], text_maxlen=g["text_maxlen"], block_chunks=g["depth"],
              pn=cfg["pn"], raw_scale_schedule=None)
    gpt = U.inf.Infinity(vae_local=vae, **kw)
    randomize_(gpt, gen)
    with torch.no_grad():
        gpt.head.weight.mul_(cfg["head_scale"])
    gpt.eval()
    gpt.requires_grad_(False)
    return gpt, kw


def text_features(B_lens, Ct5, gen):
    lens = list(B_lens)
    kv_compact = torch.randn(sum(lens), Ct5, generator=gen) * 0.3
    cu_seqlens_k = F.pad(torch.tensor(lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    return kv_compact, lens, cu_seqlens_k, max(lens)


def bits_to_x_BLC(vae, bits, vae_scale_schedule):
    """Teacher-forcing input from bit labels, the same ops as autoregressive_infer_cfg's
    `vae_type != 0` branch (and BitwiseSelfCorrection.flip_requant): for each scale, codes =
    lfq.indices_to_codes(bits, 'bit_label'); summed += trilinear-up(codes, last scale);
    next input = trilinear(summed, next scale), flattened h*w-major."""
    summed, xs = 0, []
    up = vae.quantizer.z_interplote_up
    for si, b in enumerate(bits):
        codes = vae.quantizer.lfq.indices_to_codes(b, label_type="bit_label")  # B d 1 h w
        summed = summed + F.interpolate(codes, size=vae_scale_schedule[-1], mode=up)
        if si != len(bits) - 1:
            nxt = F.interpolate(summed, size=vae_scale_schedule[si + 1], mode=up).squeeze(-3)
            xs.append(nxt.reshape(*nxt.shape[:2], -1).permute(0, 2, 1))
    return torch.cat(xs, 1), summed


def smooth_image_uint8(B, H, W, gen):
    """A random uint8 image (B, 3, H, W) with some low-frequency structure (for the encoder test)."""
    low = torch.rand(B, 3, H // 16, W // 16, generator=gen) * 2 - 1
    img = F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
    img = img + 0.15 * torch.randn(B, 3, H, W, generator=gen)
    return ((img.clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).contiguous()


def uint8_to_model_input(u8):
    """upstream tools/run_infinity.py `transform`: to_tensor (float32 / 255), then im.add(im).add_(-1)."""
    im = u8.to(torch.float32).div(255)
    return im.add(im).add_(-1)


# --------------------------------------------------------------------------------------------
# recording
# --------------------------------------------------------------------------------------------


def run_ar(U, gpt, vae, sched, text, neg, run):
    rec = dict(logits=[], bits=[], codes=[], dec_in=[], dec_out=[], cond=[])
    orig_sample = U.inf.sample_with_top_k_top_p_also_inplace_modifying_logits_
    lfq = vae.quantizer.lfq
    orig_i2c = lfq.indices_to_codes
    orig_decode = vae.decode

    def sample_rec(logits_BlV, *a, **kw):
        rec["logits"].append(logits_BlV.detach().clone())
        return orig_sample(logits_BlV, *a, **kw)

    def i2c_rec(indices, label_type="int_label", project_out=True):
        out = orig_i2c(indices, label_type, project_out)
        rec["bits"].append(indices.detach().clone())
        rec["codes"].append(out.detach().clone())
        return out

    def decode_rec(z):
        out = orig_decode(z)
        rec["dec_in"].append(z.detach().clone())
        rec["dec_out"].append(out.detach().clone())
        return out

    h = gpt.text_proj_for_sos.register_forward_hook(lambda m, i, o: rec["cond"].append(o.detach().clone()))
    U.inf.sample_with_top_k_top_p_also_inplace_modifying_logits_ = sample_rec
    lfq.indices_to_codes = i2c_rec
    vae.decode = decode_rec
    try:
        kv, lens, cu, mx = text
        _, _, img = gpt.autoregressive_infer_cfg(
            vae=vae, scale_schedule=sched, label_B_or_BLT=(kv.clone(), lens, cu.clone(), mx), B=len(lens),
            negative_label_B_or_BLT=((neg[0].clone(), neg[1], neg[2].clone(), neg[3]) if run["negative"] else None),
            g_seed=run["g_seed"], cfg_list=list(run["cfg_list"]), tau_list=list(run["tau_list"]),
            top_k=run["top_k"], top_p=run["top_p"], cfg_insertion_layer=list(run["cfg_insertion_layer"]),
            vae_type=vae.codebook_dim, returns_vemb=1, ret_img=True, inference_mode=True,
            gt_leak=0, gt_ls_Bl=None,
        )
    finally:
        U.inf.sample_with_top_k_top_p_also_inplace_modifying_logits_ = orig_sample
        del lfq.indices_to_codes
        del vae.decode
        h.remove()
    assert len(rec["logits"]) == len(sched) == len(rec["bits"]) and len(rec["dec_in"]) == 1
    return rec, img


def generate(U, name, cfg, out_dir: Path):
    print(f"== {name}", flush=True)
    gen = torch.Generator().manual_seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    table = U.table[cfg["h_div_w"]][cfg["pn"]]
    sched = [(1, h, w) for (_, h, w) in table["scales"]]  # as tools/run_infinity.py
    H, W = table["pixel"]
    B, d = cfg["B"], cfg["vae"]["codebook_dim"]
    L = sum(h * w for _, h, w in sched)

    vae = build_vae(U, cfg, gen)
    gpt, gpt_kw = build_gpt(U, cfg, vae, gen)
    Ct5 = cfg["gpt"]["text_channels"]
    text = text_features(cfg["lens"], Ct5, gen)
    neg = text_features(cfg["neg_lens"], Ct5, gen)
    T = {}
    T["text.kv_compact"], T["text.lens"], T["text.cu_seqlens_k"] = text[0], torch.tensor(text[1]), text[2]
    T["neg.kv_compact"], T["neg.lens"], T["neg.cu_seqlens_k"] = neg[0], torch.tensor(neg[1]), neg[2]
    T["cfg_uncond"] = gpt.cfg_uncond.detach().clone()

    with torch.no_grad():
        # ---- teacher forcing on random bit labels ----
        gpt.cond_drop_rate = 0.0
        bits = [torch.randint(0, 2, (B, 1, h, w, d), generator=gen) for (_, h, w) in sched]
        x_BLC, summed = bits_to_x_BLC(vae, bits, sched)
        cond_rec = []
        hk = gpt.text_proj_for_sos.register_forward_hook(lambda m, i, o: cond_rec.append(o.detach().clone()))
        ca_rec = []
        hk2 = gpt.text_proj_for_ca.register_forward_hook(lambda m, i, o: ca_rec.append(o.detach().clone()))
        logits = gpt(label_B_or_BLT=(text[0].clone(), text[1], text[2].clone(), text[3]),
                     x_BLC_wo_prefix=x_BLC.clone(), scale_schedule=sched)
        hk.remove(), hk2.remove()
        assert logits.shape == (B, L, 2 * d), logits.shape
        for si, b in enumerate(bits):
            T[f"tf.bits.{si}"] = b.to(torch.uint8)
        T["tf.x_BLC_wo_prefix"] = x_BLC
        T["tf.logits"] = logits
        T["tf.cond_BD"] = cond_rec[0]
        T["tf.ca_kv"] = ca_rec[0]
        T["tf.summed_codes"] = summed

        # ---- VAE: encode an image, multi-scale BSQ, decode; teacher forcing on its bits ----
        img_u8 = smooth_image_uint8(1, H, W, gen)
        img = uint8_to_model_input(img_u8)
        h_raw, z, _, all_bits, _, var_input = vae.encode(img, scale_schedule=sched)
        T["enc.img_uint8"] = img_u8
        T["enc.h"] = h_raw
        T["enc.z"] = z
        for si, b in enumerate(all_bits):
            T[f"enc.bits.{si}"] = b.to(torch.uint8)
        bsc = U.bsc.BitwiseSelfCorrection(vae, types.SimpleNamespace(
            noise_apply_layers=-1, noise_apply_requant=1, noise_apply_strength=-1,
            apply_spatial_patchify=0, debug_bsc=0))
        x_enc, gt_bits = bsc.flip_requant(sched, img, h_raw, "cpu")
        assert all(torch.equal(g.reshape(1, -1, d), b.reshape(1, -1, d).long()) for g, b in zip(gt_bits, all_bits))
        t1 = (text[0][: text[1][0]].clone(), text[1][:1], text[2][:2].clone(), text[1][0])
        T["enc.x_BLC_wo_prefix"] = x_enc
        T["enc.logits"] = gpt(label_B_or_BLT=t1, x_BLC_wo_prefix=x_enc.clone(), scale_schedule=sched)
        x_chk, _ = bits_to_x_BLC(vae, [b.long() for b in all_bits], sched)
        assert (x_chk - x_enc).abs().max() < 1e-6

    # ---- sampling runs ----
    runs_json = []
    for n, run in enumerate(cfg["runs"]):
        rec, img_u8 = run_ar(U, gpt, vae, sched, text, neg, run)
        for si, (_, h, w) in enumerate(sched):
            T[f"ar{n}.logits.{si}"] = rec["logits"][si].reshape(B, h * w, d, 2)
            T[f"ar{n}.bits.{si}"] = rec["bits"][si].to(torch.uint8)
            T[f"ar{n}.codes.{si}"] = rec["codes"][si]
        T[f"ar{n}.summed_codes"] = rec["dec_in"][0].unsqueeze(2)  # (B, d, 1, H, W) like upstream's summed_codes
        T[f"ar{n}.cond_BD"] = rec["cond"][0]
        if n == 0:  # one decoded image per configuration (size budget); the others: summed codes
            T[f"ar{n}.img"] = rec["dec_out"][0]
        # upstream's returned image is this float image as uint8 BGR (not stored: derivable)
        u8 = ((rec["dec_out"][0] + 1) / 2).permute(0, 2, 3, 1).mul_(255).to(torch.uint8).flip(dims=(3,))
        assert torch.equal(u8, img_u8)
        assert rec["dec_in"][0].is_contiguous(memory_format=torch.channels_last)
        dec = vae.decoder(rec["dec_in"][0].contiguous(memory_format=torch.channels_last)).clamp(-1, 1)
        assert torch.equal(dec, rec["dec_out"][0])
        runs_json.append(dict(
            B=B, g_seed=run["g_seed"], cfg_list=run["cfg_list"], tau_list=run["tau_list"], top_k=run["top_k"],
            top_p=run["top_p"], cfg_insertion_layer=run["cfg_insertion_layer"],
            negative_label_B_or_BLT="neg" if run["negative"] else None, text="text",
            vae_type=d, returns_vemb=1, ret_img=True, inference_mode=True, gt_leak=0, trunk_scale=1000,
            scale_schedule=[list(s) for s in sched],
        ))
        # consistency: without CFG, teacher forcing on the sampled bits gives the sampler's logits
        if all(c == 1 for c in run["cfg_list"]):
            xs, _ = bits_to_x_BLC(vae, [b.long() for b in rec["bits"]], sched)
            with torch.no_grad():
                lt = gpt(label_B_or_BLT=(text[0].clone(), text[1], text[2].clone(), text[3]),
                         x_BLC_wo_prefix=xs, scale_schedule=sched)
            start, worst = 0, 0.0
            for si, (_, h, w) in enumerate(sched):
                ref = lt[:, start:start + h * w].reshape(B, h * w, d, 2) / run["tau_list"][si]
                got = T[f"ar{n}.logits.{si}"]
                rel = ((ref - got).norm() / ref.norm()).item()
                assert rel < 1e-5, (name, n, si, rel)
                worst = max(worst, rel)
                start += h * w
            print(f"   ar{n}: teacher-forced logits on the sampled bits vs the KV-cached sampler's: "
                  f"worst rel. error per scale {worst:.1e}")

    # ---- save ----
    out = out_dir / name
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous() for k, v in T.items()}, str(out / "golden.safetensors"))
    torch.save({k: v.detach().clone() for k, v in gpt.state_dict().items()}, out / "infinity.pth")
    # upstream's vae_model(vqgan_ckpt=path) reads torch.load(path)["vae"]
    torch.save({"vae": {k: v.detach().clone() for k, v in vae.state_dict().items()}}, out / "vae.pth")
    for n, rj in enumerate(runs_json):
        (out / f"ar{n}.json").write_text(dumps(rj))
    config = dict(
        name=name, upstream="FoundationVision/Infinity", upstream_commit=UPSTREAM_COMMIT,
        h_div_w=cfg["h_div_w"], pn=cfg["pn"], scale_schedule=[list(s) for s in sched], image_hw=[H, W],
        seq_len=L, B=B, text=dict(lens=cfg["lens"], max_seqlen_k=max(cfg["lens"]), Ct5=Ct5),
        negative=dict(lens=cfg["neg_lens"], max_seqlen_k=max(cfg["neg_lens"])),
        infinity={k: v for k, v in gpt_kw.items()},
        vae=dict(vae_model=dict(vqgan_ckpt=None, codebook_dim=cfg["vae"]["codebook_dim"],
                                codebook_size=2 ** cfg["vae"]["codebook_dim"],
                                encoder_ch_mult=cfg["vae"]["encoder_ch_mult"],
                                decoder_ch_mult=cfg["vae"]["decoder_ch_mult"], **VAE_COMMON),
                 overrides=dict(base_ch=cfg["vae"]["base_ch"], num_res_blocks=cfg["vae"]["num_res_blocks"])),
        head_scale=cfg["head_scale"], seed=cfg["seed"], torch=torch.__version__,
    )
    (out / "config.json").write_text(dumps(config))
    verify_saved(U, cfg, out, sched)
    return out


@torch.no_grad()
def verify_saved(U, cfg, out: Path, sched):
    """Fresh models with other random weights, loaded from the saved files with upstream's own
    loaders (vae_model(vqgan_ckpt=path), Infinity.load_state_dict(strict=True)), reproduce the
    teacher-forced logits, the encoder bits and run 0's image exactly."""
    from safetensors.torch import load_file
    T = load_file(str(out / "golden.safetensors"))
    other = dict(cfg, seed=cfg["seed"] + 1000)
    gen = torch.Generator().manual_seed(other["seed"])
    vae = build_vae(U, other, gen)
    real_autoencoder = U.vae.AutoEncoder
    v = cfg["vae"]

    def tiny_autoencoder(args):
        args.base_ch, args.num_res_blocks = v["base_ch"], v["num_res_blocks"]
        return real_autoencoder(args)

    U.vae.AutoEncoder = tiny_autoencoder
    try:
        vae = U.vae.vae_model(str(out / "vae.pth"), VAE_COMMON["schedule_mode"], v["codebook_dim"], 2 ** v["codebook_dim"],
                              test_mode=True, patch_size=VAE_COMMON["patch_size"],
                              encoder_ch_mult=list(v["encoder_ch_mult"]), decoder_ch_mult=list(v["decoder_ch_mult"]))
    finally:
        U.vae.AutoEncoder = real_autoencoder
    gpt, _ = build_gpt(U, other, vae, gen)
    gpt.load_state_dict(torch.load(out / "infinity.pth", weights_only=True), strict=True)
    gpt.cond_drop_rate = 0.0
    text = (T["text.kv_compact"].clone(), T["text.lens"].tolist(), T["text.cu_seqlens_k"].clone(), int(T["text.lens"].max()))
    logits = gpt(label_B_or_BLT=text, x_BLC_wo_prefix=T["tf.x_BLC_wo_prefix"].clone(), scale_schedule=sched)
    assert torch.equal(logits, T["tf.logits"])
    _, _, _, bits, _, _ = vae.encode(uint8_to_model_input(T["enc.img_uint8"]), scale_schedule=sched)
    assert all(torch.equal(b.to(torch.uint8), T[f"enc.bits.{si}"]) for si, b in enumerate(bits))
    # upstream's summed_codes is channels-last (see README): decode it in that memory format
    z = T["ar0.summed_codes"].squeeze(-3)
    assert torch.equal(vae.decode(z.contiguous(memory_format=torch.channels_last)), T["ar0.img"])
    nchw = vae.decode(z.contiguous())
    rel = ((nchw - T["ar0.img"]).norm() / T["ar0.img"].norm()).item()
    print(f"   {out.name}: decoding ar0.summed_codes as a contiguous NCHW tensor instead: rel. error {rel:.1e}")
    print(f"   {out.name}: saved state dicts reload with upstream's loaders and reproduce the records")


def dumps(obj) -> str:
    """JSON with one top-level key per line (lists and nested objects inline)."""
    return "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items()) + "\n}\n"


def compare(new: Path, old: Path):
    from safetensors.torch import load_file
    a, b = load_file(str(new / "golden.safetensors")), load_file(str(old / "golden.safetensors"))
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    worst = 0.0
    for k in a:
        if a[k].is_floating_point():
            rel = ((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item()
            worst = max(worst, rel)
            assert rel < 1e-6, (k, rel)
        else:
            assert torch.equal(a[k], b[k]), k
    for f in sorted(p.name for p in old.glob("*.json")):
        assert json.loads((new / f).read_text()) == json.loads((old / f).read_text()), f
    print(f"   {old.name}: identical bits, worst float rel. error {worst:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("upstream", type=Path, help="checkout of FoundationVision/Infinity at " + UPSTREAM_COMMIT)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--only", default="")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if not (args.upstream / "infinity" / "models" / "infinity.py").is_file():
        sys.exit(f"{args.upstream}: not a checkout of FoundationVision/Infinity (infinity/models/infinity.py missing)")
    torch.set_grad_enabled(False)
    stubs = install_stubs()
    U = import_upstream(args.upstream)
    print(f"upstream {args.upstream} (expected commit {UPSTREAM_COMMIT}); timm: {stubs['timm']}; torch {torch.__version__}")
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    tmp = Path(tempfile.mkdtemp(prefix="infinity_golden_")) if args.check else None
    try:
        for name in names:
            out = generate(U, name, CONFIGS[name], tmp or args.out)
            if args.check:
                compare(out, args.out / name)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
