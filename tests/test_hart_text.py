"""``ssg_engine.families.hart.text``: HART's optional Qwen2 text encoder and its precomputed-features file. With
``transformers`` installed, the encoder on the tiny random Qwen2 of ``tests/golden/hart/text`` reproduces upstream's
``encode_prompts`` bit for bit (float32, CPU), in both system-prompt modes (the golden data: make_text_golden.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ssg_engine.families.hart.model import HARTCondition
from ssg_engine.families.hart.text import MAX_LENGTH, HARTTextFeatures, Qwen2TextEncoder

GOLDEN = Path(__file__).parent / "golden" / "hart" / "text"


def golden(mode: str) -> HARTTextFeatures:
    """Upstream's outputs for the golden prompts (``sys0``: no system prompt, ``sys1``: upstream's default)."""
    t = load_file(str(GOLDEN / "golden.safetensors"))
    return HARTTextFeatures(t[f"{mode}.context"], t[f"{mode}.context_mask"], t[f"{mode}.context_position_ids"])


def golden_prompts() -> list:
    with safe_open(str(GOLDEN / "golden.safetensors"), "pt") as f:
        return json.loads(f.metadata()["prompts"])


def test_missing_folder_says_where_the_weights_go(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"text model folder not found: .*nope; download the text model's files "
                                                r"\(config.json, .*Qwen2-VL-1.5B-Instruct\) into a local folder"):
        Qwen2TextEncoder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"has no config.json; it must hold the text model's files"):
        Qwen2TextEncoder(tmp_path)


def test_missing_transformers_says_what_to_install(tmp_path: Path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an environment without it looks like to import
    with pytest.raises(ImportError, match=r"needs transformers .*pip install 'ssg-engine\[text\]', or pass precomputed text features"):
        Qwen2TextEncoder(tmp_path)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "300"])
def test_bad_max_length(tmp_path: Path, bad):
    with pytest.raises(ValueError, match=r"max_length must be an integer >= 1 \(upstream: 300\)"):
        Qwen2TextEncoder(tmp_path, max_length=bad)


@pytest.fixture(scope="module")
def transformers_installed() -> None:
    pytest.importorskip("transformers", reason="the optional extra ssg-engine[text] (transformers) is not installed")


@pytest.mark.parametrize("options, mode", [({}, "sys1"), ({"use_system_prompt": False}, "sys0")])
def test_encode_reproduces_upstream_bit_for_bit(transformers_installed, options, mode):
    """The defaults are upstream sample.py's (system prompt on, 300 tokens); the golden prompts are a short one, one
    truncated at 300 tokens and a multi-line one with CJK, an emoji and accents, encoded in one batch."""
    enc = Qwen2TextEncoder(GOLDEN / "qwen2", **options)
    assert enc.max_length == MAX_LENGTH == 300 and enc.tokenizer.padding_side == "right"
    out, ref = enc.encode(golden_prompts()), golden(mode)
    assert out.context.dtype == torch.float32 and out.context.shape == (3, 300, 64)
    assert out.context_mask.dtype == torch.bool and out.context_position_ids.dtype == torch.int64
    assert out.context_mask.sum(1).tolist() == [3, 300, 20]  # the long prompt is truncated
    assert torch.equal(out.context_mask, ref.context_mask)
    assert torch.equal(out.context_position_ids, ref.context_position_ids)
    assert torch.equal(out.context, ref.context)
    one = enc.encode(golden_prompts()[:1])  # a batch of one gives the same row
    assert torch.equal(one.context[0], ref.context[0])


def test_system_prompt_changes_the_features():
    """The two golden modes differ (the system prompt is seen by the prompt tokens), with the same mask."""
    on, off = golden("sys1"), golden("sys0")
    assert torch.equal(on.context_mask, off.context_mask) and not torch.equal(on.context, off.context)


@pytest.mark.parametrize("prompts, error, message", [
    ([], ValueError, r"prompts is empty; give at least one prompt"),
    (["a fox", " "], ValueError, r"prompts\[1\] is an empty prompt"),
    ("a fox", TypeError, r"prompts must be a list of strings .*got str"),
    ([1, 2], TypeError, r"prompts must be a list of strings"),
])
def test_encode_bad_prompts(transformers_installed, prompts, error, message):
    enc = Qwen2TextEncoder(GOLDEN / "qwen2")
    with pytest.raises(error, match=message):
        enc.encode(prompts)


def test_foreign_folder_is_one_line(transformers_installed, tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"text model folder .*: cannot load it \(.*\); it must hold the text model's files") as e:
        Qwen2TextEncoder(tmp_path)
    assert "\n" not in str(e.value)


def test_features_feed_hart_condition():
    ref = golden("sys1")
    cond = ref.condition(diffusion_cfg=2.0)
    assert isinstance(cond, HARTCondition) and cond.diffusion_cfg == 2.0
    assert cond.context is ref.context and cond.context_mask is ref.context_mask
    assert cond.context_position_ids is ref.context_position_ids


def test_features_file_round_trip(tmp_path: Path):
    ref = golden("sys1")
    ref.save(tmp_path / "f.pt")
    back = HARTTextFeatures.load(tmp_path / "f.pt")
    for name in ("context", "context_mask", "context_position_ids"):
        assert torch.equal(getattr(back, name), getattr(ref, name))
    # position ids are optional in the file (upstream's cumsum(mask) - 1)
    torch.save({"features": ref.context, "mask": ref.context_mask.to(torch.uint8)}, tmp_path / "g.pt")
    back = HARTTextFeatures.load(tmp_path / "g.pt")  # an integer 0/1 mask is read as bool
    assert torch.equal(back.context_mask, ref.context_mask) and torch.equal(back.context_position_ids, ref.context_position_ids)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("mask"), r"expected a dict with 'features' and 'mask'; got \['features', 'position_ids'\]"),
    (lambda d: d.update(mask=d["mask"][:, :10]), r"context_mask must have the shape \(3, 300\) of context \(B, Lc\); got \(3, 10\)"),
    (lambda d: d.update(mask=d["mask"].float()), r"context_mask must be a bool tensor \(3, 300\) .*got dtype torch.float32"),
    (lambda d: d["mask"][1].zero_(), r"context_mask row 1 has no token"),
    (lambda d: d.update(features=d["features"][0]), r"context must have 3 dims; got shape \(300, 64\)"),
    (lambda d: d.update(position_ids=d["position_ids"].float()), r"context_position_ids must be an integer tensor \(3, 300\)"),
    (lambda d: d.update(position_ids=d["position_ids"][:2]), r"context_position_ids must have the shape \(3, 300\)"),
    (lambda d: d["features"].view(-1)[5].fill_(float("nan")), r"context holds NaN or inf"),
])
def test_bad_features_file_is_one_line(tmp_path: Path, edit, message):
    ref = golden("sys1")
    data = {"features": ref.context.clone(), "mask": ref.context_mask.clone(), "position_ids": ref.context_position_ids.clone()}
    edit(data)
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"HART text features .*bad.pt: " + message) as e:
        HARTTextFeatures.load(tmp_path / "bad.pt")
    assert "\n" not in str(e.value) and "with torch.save" in str(e.value)


def test_unreadable_or_missing_features_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"HART text features .*none.pt: no such file; save \{'features'"):
        HARTTextFeatures.load(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_text("not a tensor file")
    with pytest.raises(ValueError, match=r"HART text features .*junk.pt: not a torch.save file"):
        HARTTextFeatures.load(tmp_path / "junk.pt")


def test_loading_info_with_missing_or_mismatched_weights_is_one_error():
    """Both text encoders refuse a folder whose weights transformers would partly start from random values."""
    from ssg_engine.validation import check_loading_info

    check_loading_info({"missing_keys": [], "mismatched_keys": []}, "text model folder X", "its files")
    with pytest.raises(ValueError, match=r"^text model folder X: its weights do not fit its config.json \(missing a.w\); it must hold its files$"):
        check_loading_info({"missing_keys": ["a.w"], "mismatched_keys": []}, "text model folder X", "its files")
    with pytest.raises(ValueError, match=r"wrong shape at b.w"):
        check_loading_info({"missing_keys": [], "mismatched_keys": [("b.w", (2,), (3,))]}, "text model folder X", "its files")
