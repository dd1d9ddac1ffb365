"""Generate the golden text features of upstream HART's ``encode_prompts`` on a tiny random Qwen2 (CPU, float32).

NOT run by CI and not imported by any test: it only *produces* the files next to it, which
tests/test_hart_text.py reads (that test never needs upstream's code):

* ``qwen2/``: a folder laid out like HART's text model (``--text_model_path``, a Qwen2 causal LM with
  its tokenizer): ``config.json`` + ``model.safetensors`` of a random 2-layer ``Qwen2ForCausalLM``
  (hidden 64, 4 heads, 2 KV heads, tied embeddings) and ``tokenizer.json`` + ``tokenizer_config.json`` of
  a ``Qwen2Tokenizer`` (Qwen2's byte-level BPE pre-tokenizer, ``<|endoftext|>`` as pad token, padding on
  the right: transformers' default) whose 255 merges are trained here on upstream's system prompt.
* ``golden.safetensors``: upstream's outputs for PROMPTS in one batch, for both values of
  ``use_llm_system_prompt`` (``sys0.*``: off, ``sys1.*``: on, upstream's sample.py default):
  ``context`` (B, 300, 64) float32, ``context_mask`` (B, 300) bool, ``context_position_ids`` (B, 300)
  int64. The metadata holds the prompts (JSON), max_length and the library versions.

Upstream: https://github.com/mit-han-lab/hart at commit e28a41fe15025baf3d48ab004f5d3727c88d8fc7;
``hart.utils`` (``encode_prompts``, ``llm_system_prompt``) is imported from that checkout unchanged,
nothing is stubbed (it imports only torch and transformers). The text model is loaded as sample.py
loads it (``AutoTokenizer`` / ``AutoModel.from_pretrained(path)``) and called as sample.py calls it
(``torch.inference_mode``; sample.py's ``torch.autocast("cuda", float16)`` does nothing on the CPU).

How to run (a few seconds):

    python3 tests/golden/hart/text/make_text_golden.py --upstream /work/upstream/hart --out tests/golden/hart/text

Recorded with Python 3.11, torch 2.13.0+cpu, transformers 5.25.0, tokenizers 0.23.3, safetensors 0.8.0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

MAX_LENGTH = 300  # sample.py --max_token_length default
PROMPTS = [
    "a red fox",
    "a photo of a cat sleeping on a sunny windowsill, " * 30,  # far more than 300 tokens: truncated
    "一只狐狸 in the snow 🦊, café au lait\nsecond line",
]


def build_folder(folder: Path, corpus: str) -> None:
    """The tiny Qwen2 text model folder (tokenizer + random weights, seed 0)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=511, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([corpus], trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]])
    tokenizer.save_pretrained(str(folder))

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    Qwen2ForCausalLM(config).float().save_pretrained(str(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="checkout of mit-han-lab/hart at e28a41fe")
    parser.add_argument("--out", required=True, help="output folder (tests/golden/hart/text)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.upstream).resolve()))
    from hart.utils import encode_prompts, llm_system_prompt  # upstream, unchanged

    import safetensors
    import tokenizers
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    out = Path(args.out)
    folder = out / "qwen2"
    folder.mkdir(parents=True, exist_ok=True)
    build_folder(folder, llm_system_prompt + "\n" + "\n".join(PROMPTS[::2]))

    text_tokenizer = AutoTokenizer.from_pretrained(str(folder))  # as sample.py
    text_model = AutoModel.from_pretrained(str(folder)).eval()
    assert next(text_model.parameters()).dtype == torch.float32
    tensors = {}
    with torch.inference_mode():
        for use in (False, True):
            tokens, mask, position_ids, context = encode_prompts(PROMPTS, text_model, text_tokenizer, MAX_LENGTH,
                                                                 llm_system_prompt, use)
            tensors.update({f"sys{int(use)}.context": context.contiguous(), f"sys{int(use)}.context_mask": mask.contiguous(),
                            f"sys{int(use)}.context_position_ids": position_ids.contiguous()})
            print(f"use_llm_system_prompt={use}: prompt tokens {mask.sum(1).tolist()}, context {tuple(context.shape)}")
    system_tokens = len(text_tokenizer(llm_system_prompt).input_ids)
    print(f"system prompt: {system_tokens} tokens; padding side {text_tokenizer.padding_side}, pad id {text_tokenizer.pad_token_id}")
    meta = {"prompts": json.dumps(PROMPTS, ensure_ascii=False), "max_length": str(MAX_LENGTH),
            "upstream": "mit-han-lab/hart@e28a41fe15025baf3d48ab004f5d3727c88d8fc7",
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                        f"tokenizers {tokenizers.__version__}, safetensors {safetensors.__version__}"}
    save_file(tensors, str(out / "golden.safetensors"), metadata=meta)


if __name__ == "__main__":
    main()
