"""The family registry (ssg_engine.families) and the import paths kept for compatibility."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ssg_engine.families as families
from ssg_engine.families import FamilySpec, detect_family, family, family_of, register_family, split_keywords

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "golden" / "var_tiny"
INF = REPO / "tests" / "golden" / "infinity" / "wide_d8"

# old module path -> where the module lives now
MOVED = {
    "ssg_engine.config": "ssg_engine.families.var.config",
    "ssg_engine.models.var": "ssg_engine.families.var.model",
    "ssg_engine.models.vqvae": "ssg_engine.families.var.tokenizer",
    "ssg_engine.sampler": "ssg_engine.families.var.sampler",
    "ssg_engine.models.infinity": "ssg_engine.families.infinity.model",
    "ssg_engine.models.bsq_vae": "ssg_engine.families.infinity.tokenizer",
    "ssg_engine.models.text_encoder": "ssg_engine.families.infinity.text",
    "ssg_engine.text": "ssg_engine.families.infinity.text",
    "ssg_engine.infinity_sampler": "ssg_engine.families.infinity.sampler",
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_paths_are_the_moved_modules(old):
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_public_names_and_loading_keep_working():
    import ssg_engine as se
    import ssg_engine.loading as loading
    from ssg_engine.families.infinity.loading import load_infinity
    from ssg_engine.families.var.loading import load_models
    from ssg_engine.models import VQVAE, VARTransformer

    assert (se.load_models, se.load_infinity, loading.load_models) == (load_models, load_infinity, load_models)
    assert se.VQVAE is VQVAE and se.VARTransformer is VARTransformer
    assert se.VAR.__module__ == "ssg_engine.families.var.sampler" and issubclass(se.VAR, VARTransformer)


def test_registry_imports_no_family_and_no_torch():
    """``import ssg_engine.families`` (what shared code imports) loads no family module and not torch."""
    code = ("import sys, ssg_engine.families as f; assert 'torch' not in sys.modules, 'torch'; "
            "assert not [m for m in sys.modules if m.startswith('ssg_engine.families.')], sorted(sys.modules); "
            "f.family('var'); assert 'torch' not in sys.modules, 'the spec imported torch'")
    subprocess.run([sys.executable, "-P", "-c", code], check=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})


def test_registry_lookups():
    assert [s.name for s in families.all_families()] == list(families.FAMILIES)
    var, infinity = family("var"), family("infinity")
    assert isinstance(var, FamilySpec) and var.loader_name == "load_models" and infinity.loader_name == "load_infinity"
    with pytest.raises(ValueError, match="family must be one of var, infinity, hart"):
        family("hart-typo")
    from ssg_engine.loading import read_state_dict

    sds = {k: read_state_dict(p) for k, p in (("var", TINY / "var.pth"), ("vqvae", TINY / "vae.pth"), ("bsq_vae", INF / "vae.pth"))}
    assert {k: detect_family(sd) for k, sd in sds.items()} == {"var": (var, "var"), "vqvae": (var, "vqvae"), "bsq_vae": (infinity, "bsq_vae")}
    assert var.detect(sds["vqvae"]) and not infinity.detect(sds["vqvae"])
    assert detect_family({"pos_1LC": torch.zeros(1), "cfg_uncond": torch.zeros(1)}) is None  # two families' markers
    assert family_of(torch.nn.Linear(2, 2)) is None


def test_models_find_their_family(var_pair):
    vae, var = var_pair
    assert family_of(var) is family("var")
    assert family("var").placement(var) == (torch.device("cpu"), var.head.weight.dtype)
    with pytest.raises(TypeError, match="takes the VAR, then the VQVAE"):
        family("var").check_pair(vae, var, "generate(var, vae, labels)")


def test_split_keywords():
    overrides = {"cfg": 3.0, "pn": "0.06M", "h_div_w": 1.0}
    assert split_keywords(overrides, family("infinity")) == {"h_div_w": 1.0, "pn": "0.06M"} and overrides == {"cfg": 3.0}
    with pytest.raises(TypeError, match=r"pn= is a text-conditional \(Infinity\) keyword; a class-conditional VAR takes labels"):
        split_keywords({"cfg": 3.0, "pn": 4}, family("var"))


def test_register_family_checks_its_arguments(monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))
    register_family("var", families.FAMILIES["var"])  # the same target again: no change
    for name, target in (("var", "elsewhere:SPEC"), ("new", "no_colon"), ("", "m:SPEC")):
        with pytest.raises(ValueError, match="register_family"):
            register_family(name, target)
    register_family("other", "ssg_engine.families.var.spec:SPEC")
    with pytest.raises(TypeError, match="is not the FamilySpec of 'other'"):  # a spec registered under another name
        family("other")


@pytest.fixture
def var_pair():
    from ssg_engine.loading import load_models

    return load_models(TINY / "var.pth", TINY / "vae.pth", TINY / "config.json")
