"""Infinity's text conditioning: a small word-level encoder trained jointly with a text-to-image model (no
pretrained weights), and the optional Flan-T5 features of upstream's ``encode_prompt`` (``tools/run_infinity.py``,
commit 4c27bbb).

The small encoder: prompts are lowercased and split on anything that is not a letter; each word is looked up in a
fixed vocabulary, embedded, given a learned position, and passed through a few pre-norm transformer encoder layers
(bidirectional, padding masked). :meth:`TextEncoder.encode` returns the packed
:class:`~ssg_engine.families.infinity.model.TextFeatures` (``kv_compact`` (N, width), ``lens``): the interface Flan-T5's
features feed into the Infinity transformer.

Flan-T5 (:class:`T5TextEncoder`) is optional: it needs ``transformers`` and ``sentencepiece`` (``pip install
'ssg-engine[text]'``) and a local folder with google/flan-t5-xl's files (``config.json``, the weights, the tokenizer
files); nothing is downloaded.

``ssg_engine.text`` and ``ssg_engine.models.text_encoder`` are this module, kept for compatibility.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...data import prompt_words
from ...validation import check_loading_info, check_prompts, field_type_problem, local_model_folder
from .model import TextFeatures

MAX_LENGTH = 512  # upstream's tokenizer max_length (= the released models' text_maxlen)
_WEIGHTS = "google/flan-t5-xl's files (config.json, the model weights and the tokenizer files)"


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """``vocab``: the known words (index = token id); ``width``: feature width (Infinity's ``text_channels``);
    ``layers``/``heads``: transformer encoder layers and attention heads; ``max_len``: most words per prompt."""

    vocab: Tuple[str, ...]
    width: int = 128
    layers: int = 2
    heads: int = 4
    max_len: int = 16

    def __post_init__(self) -> None:
        problems = [p for p in (field_type_problem(n, "int", getattr(self, n)) for n in ("width", "layers", "heads", "max_len")) if p]
        if isinstance(self.vocab, (str, bytes)) or not isinstance(self.vocab, Sequence) or not all(isinstance(w, str) for w in self.vocab):
            problems.insert(0, f"vocab must be a list of words (strings); got {type(self.vocab).__name__}")
        if problems:
            raise ValueError("invalid TextEncoderConfig: " + "; ".join(problems))
        object.__setattr__(self, "vocab", tuple(self.vocab))
        if not self.vocab or len(set(self.vocab)) != len(self.vocab) or any(prompt_words(w) != [w] for w in self.vocab):
            raise ValueError("TextEncoderConfig.vocab must be distinct lowercase words (letters only)")
        if min(self.width, self.layers, self.heads, self.max_len) < 1 or self.width % self.heads:
            raise ValueError(f"invalid TextEncoderConfig: width, layers, heads, max_len must be positive, width % heads == 0 ({self})")

    def to_dict(self) -> Dict[str, Any]:
        return {**dataclasses.asdict(self), "vocab": list(self.vocab)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TextEncoderConfig":
        """From a mapping of the fields (``vocab`` required); ``ValueError`` naming a missing or unknown field."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a text encoder config must be a mapping of TextEncoderConfig fields; got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown or "vocab" not in d:
            raise ValueError(f"text encoder config: {f'unknown field(s) {unknown}' if unknown else 'missing field vocab'}; "
                             f"the fields are {known}")
        return cls(**d)

    def to_json(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "TextEncoderConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


class EncoderLayer(nn.Module):
    """Pre-norm self-attention + GELU MLP (4x), both residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, C), key_mask (B, 1, 1, T) True where a key may be attended -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Word embedding + learned positions + ``layers`` encoder layers + a final LayerNorm."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.index = {w: i for i, w in enumerate(cfg.vocab)}
        self.tok_embed = nn.Embedding(len(cfg.vocab), cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_len, cfg.width))
        self.layers = nn.ModuleList([EncoderLayer(cfg.width, cfg.heads) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def token_ids(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, List[int]]:
        """Token ids (B, T) padded with 0, T the longest prompt, and each prompt's length; ``ValueError`` for an
        empty list, a prompt without words, one longer than ``max_len`` words, or an unknown word (the message
        lists the vocabulary)."""
        if isinstance(prompts, str) or not len(prompts):
            raise ValueError("prompts: give a non-empty list of prompt strings")
        rows = []
        for p in prompts:
            words = prompt_words(p)
            if not words:
                raise ValueError(f"prompt {p!r} has no words; the text encoder needs at least one")
            if len(words) > self.config.max_len:
                raise ValueError(f"prompt {p!r} has {len(words)} words; this text encoder takes at most {self.config.max_len}")
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise ValueError(
                    f"prompt {p!r}: unknown word(s) {', '.join(repr(w) for w in unknown)}; "
                    f"the vocabulary is: {' '.join(self.config.vocab)}"
                )
            rows.append([self.index[w] for w in words])
        lens = [len(r) for r in rows]
        ids = torch.zeros(len(rows), max(lens), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids.to(self.pos_embed.device), lens

    def forward(self, ids: torch.Tensor, lens: Sequence[int]) -> torch.Tensor:
        """Token ids (B, T) and lengths -> features (B, T, width) (rows past a prompt's length are padding)."""
        T = ids.shape[1]
        valid = torch.arange(T, device=ids.device)[None] < torch.tensor(lens, device=ids.device)[:, None]
        x = self.tok_embed(ids) + self.pos_embed[:T]
        for layer in self.layers:
            x = layer(x, valid[:, None, None, :])
        return self.norm(x)

    def encode(self, prompts: Sequence[str]) -> TextFeatures:
        """Packed features of ``prompts``: ``kv_compact`` (sum of word counts, width), ``lens`` (B,)."""
        ids, lens = self.token_ids(prompts)
        x = self(ids, lens)
        valid = torch.arange(ids.shape[1], device=ids.device)[None] < torch.tensor(lens, device=ids.device)[:, None]
        return TextFeatures(x[valid], lens)


def load_text_encoder(weights: Union[str, Path], config: TextEncoderConfig, device: Union[str, torch.device] = "cpu") -> TextEncoder:
    """A ``TextEncoder`` of ``config`` with the safetensors ``weights`` (as float32), in eval mode on ``device``."""
    from safetensors.torch import load_file

    enc = TextEncoder(config)
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"text encoder weights {weights}: not a readable safetensors file ({e})") from None
    expected = enc.state_dict()
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    floats = [k for k, v in state.items() if not v.is_floating_point()]
    if missing or unexpected or shapes or floats:
        first = (missing and f"missing {missing[0]}") or (unexpected and f"unexpected {unexpected[0]}") or (shapes and shapes[0]) or f"{floats[0]} is not float"
        raise ValueError(f"text encoder weights {weights} do not fit its config (vocabulary of {len(config.vocab)} words, width "
                         f"{config.width}, {config.layers} layers): {first}; give the weights and config.json written together")
    enc.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return enc.to(device).eval().requires_grad_(False)


class T5TextEncoder:
    """Flan-T5 encoder + tokenizer from the local folder ``path``; ``encode`` gives the packed features Infinity takes.

    ``dtype``: the encoder's weights (None: float16 on CUDA, as upstream; float32 on CPU, where float16 is slow).
    """

    def __init__(self, path: Union[str, Path], device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> None:
        folder = local_model_folder(path, "text encoder folder", _WEIGHTS)
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
        check_loading_info(info, f"text encoder folder {folder}", _WEIGHTS)
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
