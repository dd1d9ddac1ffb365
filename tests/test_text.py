"""``ssg_engine.text``: the optional Flan-T5 wrapper. Bad input and a missing ``transformers`` are clear errors; with
``transformers`` and ``sentencepiece`` installed, a tiny random T5 encoder (a tokenizer trained here, offline) gives the
packed features of upstream's ``encode_prompt``."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ssg_engine.families.infinity.model import TextFeatures
from ssg_engine.families.infinity.text import MAX_LENGTH, T5TextEncoder, check_prompts


def test_missing_folder_says_where_the_weights_go(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"text encoder folder not found: .*nope; download google/flan-t5-xl's files "
                                                r"\(config.json, the model weights and the tokenizer files\) into a local folder"):
        T5TextEncoder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"has no config.json; it must hold google/flan-t5-xl's files"):
        T5TextEncoder(tmp_path)


def test_missing_transformers_says_what_to_install(tmp_path: Path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an environment without it looks like to import
    with pytest.raises(ImportError, match=r"needs transformers and sentencepiece .*pip install 'ssg-engine\[text\]', or pass "
                                          r"precomputed text features"):
        T5TextEncoder(tmp_path)


@pytest.mark.parametrize("prompts, error, message", [
    ([], ValueError, r"prompts is empty; give at least one prompt"),
    (["a fox", " "], ValueError, r"prompts\[1\] is an empty prompt; write some text"),
    ("a fox", TypeError, r"prompts must be a list of strings .*wrap a single prompt as \[prompt\]\); got str"),
    ([1, 2], TypeError, r"prompts must be a list of strings"),
])
def test_bad_prompts(prompts, error, message):
    with pytest.raises(error, match=message):
        check_prompts(prompts)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    """A folder laid out like google/flan-t5-xl's: a 1-layer random T5 encoder and a 32-piece tokenizer."""
    pytest.importorskip("transformers", reason="the optional extra ssg-engine[text] (transformers) is not installed")
    spm = pytest.importorskip("sentencepiece", reason="the optional extra ssg-engine[text] (sentencepiece) is not installed")
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = tmp_path_factory.mktemp("t5")
    corpus = ["a red fox jumps over the lazy dog", "a cat holds a sign", "photo of a house by the sea"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(folder / "spiece"), vocab_size=32,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    T5Tokenizer(vocab_file=str(folder / "spiece.model"), legacy=True, extra_ids=0).save_pretrained(str(folder / "t5"))
    torch.manual_seed(0)
    config = T5Config(vocab_size=32, d_model=16, d_kv=4, num_heads=2, num_layers=1, d_ff=32, feed_forward_proj="gated-gelu")
    T5EncoderModel(config).save_pretrained(str(folder / "t5"))
    return folder / "t5"


@torch.no_grad()
def test_encode_packs_like_upstream(tiny_t5: Path):
    enc = T5TextEncoder(tiny_t5)
    prompts = ["a red fox", "photo of a cat by the sea"]
    text = enc.encode(prompts)
    assert isinstance(text, TextFeatures) and text.kv_compact.dtype == torch.float32 and text.kv_compact.shape[1] == 16
    # upstream's encode_prompt, prompt by prompt: pad to 512, keep each prompt's valid rows (its tokens and </s>)
    for i, prompt in enumerate(prompts):
        tok = enc.tokenizer(text=[prompt], max_length=MAX_LENGTH, padding="max_length", truncation=True, return_tensors="pt")
        assert tok.input_ids.shape == (1, MAX_LENGTH) and text.lens[i] == int(tok.attention_mask.sum())
        ref = enc.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask)["last_hidden_state"].float()[0, : text.lens[i]]
        start = sum(text.lens[:i])
        assert torch.equal(text.kv_compact[start : start + text.lens[i]], ref)
    assert text.lens[0] == len(enc.tokenizer("a red fox").input_ids)
    with pytest.raises(ValueError, match="prompts is empty"):
        enc.encode([])
    assert enc.encode(["a fox " * 600]).lens == [MAX_LENGTH]  # truncated as upstream
