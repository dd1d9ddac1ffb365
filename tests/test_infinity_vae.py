"""Infinity's BSQ VQ-VAE against upstream: tests/golden/infinity/{sq_d16,wide_d8} (see its README)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN, rel_err

from ssg_engine.families.infinity.tokenizer import BSQVAE, BSQVAEConfig, load_bsq_vae

INFINITY = GOLDEN / "infinity"
CONFIGS = ("sq_d16", "wide_d8")
TOL = 1e-5


def _config(folder: Path) -> BSQVAEConfig:
    """The VAE architecture from the golden config.json (upstream vae_model arguments + the tiny overrides)."""
    v = json.loads((folder / "config.json").read_text())["vae"]
    m = v["vae_model"]
    return BSQVAEConfig(codebook_dim=m["codebook_dim"], encoder_ch_mult=m["encoder_ch_mult"],
                        decoder_ch_mult=m["decoder_ch_mult"], patch_size=m["patch_size"], **v["overrides"])


@pytest.fixture(scope="module", params=CONFIGS)
def case(request):
    from safetensors.torch import load_file

    folder = INFINITY / request.param
    cfg = json.loads((folder / "config.json").read_text())
    vae = load_bsq_vae(folder / "vae.pth", _config(folder))
    return vae, load_file(str(folder / "golden.safetensors")), [tuple(s) for s in cfg["scale_schedule"]]


def _bits(T, prefix, n):
    return [T[f"{prefix}.bits.{si}"] for si in range(n)]


def test_config_inferred_from_shapes():
    for name in CONFIGS:
        folder = INFINITY / name
        sd = torch.load(folder / "vae.pth", weights_only=True)["vae"]
        assert BSQVAEConfig.from_state_dict(sd) == _config(folder)
        vae = BSQVAE(_config(folder))
        assert sorted(vae.state_dict()) == sorted(sd)  # key names (both quantizer aliases included), as upstream saves
    assert BSQVAEConfig.released(32) == BSQVAEConfig()


def test_load_rejects_wrong_config():
    folder = INFINITY / "wide_d8"
    with pytest.raises(ValueError, match="shape"):
        load_bsq_vae(folder / "vae.pth", BSQVAEConfig(codebook_dim=16, base_ch=24, num_res_blocks=1,
                                                      encoder_ch_mult=(1, 1, 1, 1, 2), decoder_ch_mult=(1, 1, 1, 1, 2)))
    with pytest.raises(ValueError, match="missing"):
        load_bsq_vae({"vae": {}}, _config(folder))


def test_encode_bits_equal(case):
    vae, T, sched = case
    u8 = T["enc.img_uint8"]
    x = u8.to(torch.float32).div(255)
    enc = vae.encode(x.add(x).add_(-1), sched)  # upstream's transform to [-1, 1]
    assert rel_err(enc.h, T["enc.h"]) < TOL
    assert rel_err(enc.z, T["enc.z"]) < TOL
    assert len(enc.bits) == len(sched)
    for si, b in enumerate(enc.bits):
        assert torch.equal(b.to(torch.uint8), T[f"enc.bits.{si}"]), f"scale {si}"
    x_blc, _ = vae.bits_to_x_BLC(enc.bits, sched)
    assert rel_err(x_blc, T["enc.x_BLC_wo_prefix"]) < TOL


@pytest.mark.parametrize("run", [0, 1, 2])
def test_codes_and_summed_codes_equal(case, run):
    vae, T, sched = case
    summed = None
    for si, b in enumerate(_bits(T, f"ar{run}", len(sched))):
        codes, summed, nxt = vae.next_scale(summed, b, si, sched)
        assert rel_err(codes, T[f"ar{run}.codes.{si}"]) < 1e-6, f"scale {si}"  # bit-identical on the recording build
        assert (nxt is None) == (si == len(sched) - 1)
        if nxt is not None:
            assert nxt.shape == (b.shape[0], sched[si + 1][1] * sched[si + 1][2], vae.codebook_dim)
    assert rel_err(summed, T[f"ar{run}.summed_codes"]) < TOL
    assert summed.squeeze(-3).is_contiguous(memory_format=torch.channels_last)  # as upstream's, see the README


def test_teacher_forcing_input(case):
    vae, T, sched = case
    x, summed = vae.bits_to_x_BLC(_bits(T, "tf", len(sched)), sched)
    assert rel_err(x, T["tf.x_BLC_wo_prefix"]) < TOL
    assert rel_err(summed, T["tf.summed_codes"]) < TOL


def test_decode_image(case):
    vae, T, _ = case
    z = T["ar0.summed_codes"].squeeze(-3)
    img = vae.decode(z.contiguous(memory_format=torch.channels_last))  # upstream decodes a channels-last tensor
    assert rel_err(img, T["ar0.img"]) < TOL
    assert rel_err(vae.decode(z.contiguous()), T["ar0.img"]) < 5e-5  # NCHW: other GroupNorm kernels (README)
