"""Qwen2 text features for HART, as upstream's ``encode_prompts`` (``hart/utils/tools.py``, mit-han-lab/hart
e28a41fe) called by its ``sample.py`` with its defaults: ``--max_token_length 300`` and ``--use_llm_system_prompt``
on (``type=bool, default=True``), the system prompt ``llm_system_prompt`` (``hart/utils/constants.py``).

What upstream computes, for B prompts: each prompt tokenized on its own, truncated and padded to 300 tokens
(``padding="max_length"``; the padding side is the tokenizer folder's own, transformers' default is the right);
``context_mask = tokens != pad_token_id``; ``context_position_ids = cumsum(context_mask) - 1``; with the system prompt
on, its tokens (unpadded, truncated to 300) are put before every prompt with a mask of ones, and only the prompt
positions of the last hidden state are kept (padding positions included); the features are cast to float32. The
weights stay float32 (``AutoModel.from_pretrained`` without a dtype) and the call runs under
``torch.autocast("cuda", float16)``, which on other devices does nothing.

Optional: needs ``transformers`` (``pip install 'ssg-engine[text]'``) and a local folder with the text model's files
(upstream: mit-han-lab/Qwen2-VL-1.5B-Instruct, ``--text_model_path``); nothing is downloaded.

Precomputed features (:meth:`HARTTextFeatures.save` / :meth:`HARTTextFeatures.load`): a ``torch.save`` file holding
the dict ``{"features": (B, Lc, Cc) float, "mask": (B, Lc) bool, "position_ids": (B, Lc) integer}``: the padded form
of Infinity's ``--text-features`` file (``{"features", "mask"}``) plus the position ids (optional on load: the
default is ``cumsum(mask) - 1``, upstream's rule).
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from ...validation import check_feature_tensor, check_loading_info, check_prompts, local_model_folder
from .model import HARTCondition

MAX_LENGTH = 300  # sample.py --max_token_length
# upstream's llm_system_prompt (hart/utils/constants.py), verbatim: the features depend on every character
SYSTEM_PROMPT = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for image '
    "generation.\n\nExamples:\n"
    "- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a round shape, sleeping peacefully on a "
    "warm sunny windowsill, surrounded by pots of blooming red flowers.\n"
    "- User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing street lamps, a diverse "
    "crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.\n\n"
    "Please generate only the enhanced description for the prompt below and DO NOT include any additional sentences. "
    'Start your response with "Enhanced Prompt:".\n\nUser Prompt:\n'
)
_WEIGHTS = "the text model's files (config.json, the model weights and the tokenizer files; upstream: Qwen2-VL-1.5B-Instruct)"
_FILE_FORM = "save {'features': (B, Lc, Cc) float, 'mask': (B, Lc) bool, 'position_ids': (B, Lc) int64} with torch.save"


@dataclasses.dataclass
class HARTTextFeatures:
    """Text features of B prompts, padded: ``context`` (B, Lc, Cc) float, ``context_mask`` (B, Lc) bool (True on each
    prompt's tokens; every row has one), ``context_position_ids`` (B, Lc) int64 (None: ``cumsum(mask) - 1``).
    ``ValueError``/``TypeError`` (one line naming the field) otherwise."""

    context: torch.Tensor
    context_mask: torch.Tensor
    context_position_ids: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        check_feature_tensor(self.context, "context", 3)
        shape = tuple(self.context.shape[:2])
        mask = self.context_mask
        if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"context_mask must be a bool tensor {shape} (True on each prompt's tokens); got "
                            f"{f'dtype {mask.dtype}' if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if tuple(mask.shape) != shape:
            raise ValueError(f"context_mask must have the shape {shape} of context (B, Lc); got {tuple(mask.shape)}")
        self.context_mask = mask = mask != 0
        if not bool(mask.any(1).all()):
            raise ValueError(f"context_mask row {int((~mask.any(1)).nonzero()[0])} has no token; every prompt needs one")
        ids = self.context_position_ids
        if ids is None:
            self.context_position_ids = torch.cumsum(mask, dim=1) - 1
        elif not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"context_position_ids must be an integer tensor {shape}; got "
                            f"{f'dtype {ids.dtype}' if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        elif tuple(ids.shape) != shape:
            raise ValueError(f"context_position_ids must have the shape {shape} of context (B, Lc); got {tuple(ids.shape)}")
        else:
            self.context_position_ids = ids.long()
        if not bool(torch.isfinite(self.context).all()):
            raise ValueError("context holds NaN or inf; encode the prompts again")

    @property
    def batch(self) -> int:
        return self.context.shape[0]

    def __getitem__(self, rows: Any) -> "HARTTextFeatures":
        """The prompts ``rows`` (a slice or an index tensor) of these features."""
        return HARTTextFeatures(self.context[rows], self.context_mask[rows], self.context_position_ids[rows])

    def pad_rows(self, b: int) -> "HARTTextFeatures":
        """These features padded to ``b`` rows with empty prompts (zero context, one token at position 0)."""
        extra = b - self.batch
        mask = torch.zeros(extra, self.context_mask.shape[1], dtype=torch.bool, device=self.context_mask.device)
        mask[:, 0] = True
        return HARTTextFeatures(torch.cat((self.context, self.context.new_zeros(extra, *self.context.shape[1:]))),
                                torch.cat((self.context_mask, mask)),
                                torch.cat((self.context_position_ids, self.context_position_ids.new_zeros(extra, mask.shape[1]))))

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context, context_mask, context_position_ids): what a captured graph's static buffers are refilled from."""
        return self.context, self.context_mask, self.context_position_ids

    def static_like(self, device: torch.device) -> "HARTTextFeatures":
        """Buffers of these features' shapes on ``device`` (empty prompts until refilled from :meth:`tensors`)."""
        empty = HARTTextFeatures(self.context[:0], self.context_mask[:0], self.context_position_ids[:0]).pad_rows(self.batch)
        return HARTTextFeatures(*(t.to(device) for t in empty.tensors()))

    def condition(self, **options: Any) -> HARTCondition:
        """A :class:`HARTCondition` with these features; ``options``: its other fields (``diffusion_cfg``, ...)."""
        return HARTCondition(context=self.context, context_mask=self.context_mask,
                             context_position_ids=self.context_position_ids, **options)

    def save(self, path: Union[str, Path]) -> None:
        """Write the precomputed-features file (the module docstring's format), tensors on the CPU."""
        torch.save({"features": self.context.cpu(), "mask": self.context_mask.cpu(),
                    "position_ids": self.context_position_ids.cpu()}, str(path))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "HARTTextFeatures":
        """Read a precomputed-features file onto the CPU; one ``FileNotFoundError``/``ValueError`` line naming it
        when it is missing, unreadable or not of the module docstring's format."""
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"HART text features {file}: no such file; {_FILE_FORM}")
        try:
            obj = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable file is the caller's to fix
            raise ValueError(f"HART text features {file}: not a torch.save file ({type(e).__name__}); {_FILE_FORM}") from None
        if not isinstance(obj, dict) or not {"features", "mask"} <= set(obj):
            keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"HART text features {file}: expected a dict with 'features' and 'mask'; got {keys}; {_FILE_FORM}")
        try:
            return cls(obj["features"], obj["mask"], obj.get("position_ids"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"HART text features {file}: {e}; {_FILE_FORM}") from None


class Qwen2TextEncoder:
    """HART's text model (a Qwen2 LM) + tokenizer from the local folder ``path``; ``encode`` gives upstream's features.

    ``dtype``: the weights (float32: upstream's). ``autocast``: run under ``torch.autocast("cuda", float16)`` as
    upstream's ``sample.py`` (CUDA only; elsewhere the model runs in ``dtype``). ``max_length``: tokens per prompt
    (upstream 300; must match the HART model's ``context_token``). ``use_system_prompt``: prepend
    :data:`SYSTEM_PROMPT` (upstream's default, on).
    """

    def __init__(self, path: Union[str, Path], device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                 autocast: bool = True, max_length: int = MAX_LENGTH, use_system_prompt: bool = True) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1 (upstream: {MAX_LENGTH}); got {max_length!r}")
        folder = local_model_folder(path, "text model folder", _WEIGHTS)
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ImportError(f"the HART text encoder needs transformers ({e}); pip install 'ssg-engine[text]', "
                              "or pass precomputed text features instead") from None
        try:  # transformers raises many error types (and multi-line messages) for damaged or foreign files
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model, info = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype, output_loading_info=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"text model folder {folder}: cannot load it ({first}); it must hold {_WEIGHTS}") from None
        check_loading_info(info, f"text model folder {folder}", _WEIGHTS)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"text model folder {folder}: the tokenizer has no pad token (Qwen2's is <|endoftext|>); it must hold {_WEIGHTS}")
        self.device = torch.device(device)
        self.autocast = autocast
        self.max_length = max_length
        self.use_system_prompt = use_system_prompt
        self.model = model.to(self.device).eval().requires_grad_(False)

    def _tokens(self, texts: Sequence[str], padding: str) -> torch.Tensor:
        """Token ids (B, L) of ``texts``, truncated to ``max_length`` and padded as ``padding`` asks."""
        return self.tokenizer(list(texts), padding=padding, max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> HARTTextFeatures:
        """Features of B prompts: ``context`` (B, max_length, Cc) float32 (the last hidden state at the prompt's
        positions, padding included), ``context_mask`` (B, max_length) ``tokens != pad_token_id``,
        ``context_position_ids`` ``cumsum(mask) - 1``; prompts longer than ``max_length`` tokens are truncated."""
        tokens = self._tokens(check_prompts(prompts), "max_length")
        mask = tokens != self.tokenizer.pad_token_id
        ids, attention = tokens, mask
        kept = 0
        if self.use_system_prompt:
            system = self._tokens([SYSTEM_PROMPT], "longest").expand(len(tokens), -1)
            kept = system.shape[1]
            ids, attention = torch.cat((system, tokens), 1), torch.cat((torch.ones_like(system, dtype=torch.bool), mask), 1)
        use_autocast = self.autocast and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.float16) if use_autocast else contextlib.nullcontext():
            hidden = self.model(ids, attention_mask=attention, output_hidden_states=True).hidden_states[-1]
        return HARTTextFeatures(hidden[:, kept:].float(), mask, torch.cumsum(mask, dim=1) - 1)


class WordTextEncoder:
    """HART's padded text features from a small word-level encoder (:class:`ssg_engine.families.infinity.text.TextEncoder`,
    the one the shipped Fashion-MNIST models train): ``encode(prompts)`` gives ``context`` (B, ``context_tokens``,
    width) with each prompt's word features first and zeros after them, ``context_mask`` True on the words,
    ``context_position_ids`` ``cumsum(mask) - 1``. ``features`` is the same with gradients (training).
    Unknown words, empty prompts or prompts over ``context_tokens`` words: one ``ValueError`` (the message lists the
    vocabulary)."""

    def __init__(self, module: Any, context_tokens: int) -> None:
        if module.config.max_len > context_tokens:
            raise ValueError(f"the text encoder takes {module.config.max_len} words but the HART model only {context_tokens} "
                             "context tokens; give a model trained with this encoder")
        self.module = module
        self.context_tokens = context_tokens

    @property
    def vocabulary(self) -> Tuple[str, ...]:
        return tuple(self.module.config.vocab)

    def token_ids(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, List[int]]:
        """The word ids (B, T) and lengths of ``prompts``; one ``ValueError`` for a prompt the vocabulary cannot
        take (a server checks each request's prompt with it before batching)."""
        return self.module.token_ids(check_prompts(prompts))

    def features(self, prompts: Sequence[str]) -> HARTTextFeatures:
        """Differentiable features of ``prompts`` (see the class docstring)."""
        ids, lens = self.token_ids(prompts)
        words = self.module(ids, lens)  # (B, T, width)
        B, T, width = words.shape
        mask = torch.arange(self.context_tokens, device=words.device)[None] < torch.tensor(lens, device=words.device)[:, None]
        context = words.new_zeros(B, self.context_tokens, width)
        context = context.masked_scatter(mask[..., None], words[mask[:, :T]])
        return HARTTextFeatures(context, mask, torch.cumsum(mask, dim=1) - 1)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> HARTTextFeatures:
        """Features of ``prompts`` for sampling (no gradients)."""
        return self.features(prompts)
