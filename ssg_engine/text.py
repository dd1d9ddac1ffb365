"""Flan-T5 text features for Infinity, as upstream's ``encode_prompt`` (``tools/run_infinity.py``, commit 4c27bbb).

Optional: needs ``transformers`` and ``sentencepiece`` (``pip install 'ssg-engine[text]'``) and a local folder with
google/flan-t5-xl's files (``config.json``, the weights, the tokenizer files); nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import torch

from .models.infinity import TextFeatures

MAX_LENGTH = 512  # upstream's tokenizer max_length (= the released models' text_maxlen)
_WEIGHTS = "google/flan-t5-xl's files (config.json, the model weights and the tokenizer files)"


def check_prompts(prompts: Any, what: str = "prompts") -> List[str]:
    """``prompts`` as a list of non-empty strings; else one ``TypeError``/``ValueError`` line naming ``what``."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{what} must be a list of strings (one per image; wrap a single prompt as [prompt]); got {type(prompts).__name__}")
    if not prompts:
        raise ValueError(f"{what} is empty; give at least one prompt")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"{what}[{empty[0]}] is an empty prompt; write some text (for no negative prompt, pass none: "
                         "the model's cfg_uncond is used)")
    return list(prompts)


class T5TextEncoder:
    """Flan-T5 encoder + tokenizer from the local folder ``path``; ``encode`` gives the packed features Infinity takes.

    ``dtype``: the encoder's weights (None: float16 on CUDA, as upstream; float32 on CPU, where float16 is slow).
    """

    def __init__(self, path: Union[str, Path], device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> None:
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"text encoder folder not found: {folder}; download {_WEIGHTS} into a local folder and pass it")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {folder} has no config.json; it must hold {_WEIGHTS}")
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError as e:
            raise ImportError(f"the text encoder needs transformers and sentencepiece ({e}); pip install 'ssg-engine[text]', "
                              "or pass precomputed text features instead") from None
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        try:  # transformers raises many error types (and multi-line messages) for damaged or foreign files
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), revision=None, legacy=True)
            model, info = T5EncoderModel.from_pretrained(str(folder), dtype=self.dtype, output_loading_info=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"text encoder folder {folder}: cannot load it ({first}); it must hold {_WEIGHTS}") from None
        missing = [k for k in info.get("missing_keys", []) if k]
        mismatched = [k for k, *_ in info.get("mismatched_keys", [])]
        if missing or mismatched:  # transformers would start them from random values
            first = f"missing {missing[0]}" if missing else f"wrong shape at {mismatched[0]}"
            raise ValueError(f"text encoder folder {folder}: its weights do not fit its config.json ({first}); it must hold {_WEIGHTS}")
        if len(self.tokenizer) > model.config.vocab_size:
            raise ValueError(f"text encoder folder {folder}: the tokenizer has {len(self.tokenizer)} tokens but the model embeds "
                             f"{model.config.vocab_size}; give the tokenizer files of the same model")
        self.tokenizer.model_max_length = MAX_LENGTH
        self.model = model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextFeatures:
        """Packed float32 features of B prompts: ``kv_compact`` (N, Ct5) and ``lens`` (each prompt's token count with
        its end token, at most 512; longer prompts are truncated). Each prompt is encoded on its own, padded to 512
        tokens, as upstream's ``encode_prompt`` does (the same shapes, so the same kernels)."""
        feats, lens = [], []
        for prompt in check_prompts(prompts):
            tokens = self.tokenizer(text=[prompt], max_length=MAX_LENGTH, padding="max_length", truncation=True, return_tensors="pt")
            mask = tokens.attention_mask.to(self.device)
            hidden = self.model(input_ids=tokens.input_ids.to(self.device), attention_mask=mask)["last_hidden_state"].float()
            n = int(mask.sum())
            feats.append(hidden[0, :n])
            lens.append(n)
        return TextFeatures(torch.cat(feats), lens)
