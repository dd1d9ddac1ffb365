"""Reading and checking checkpoint files, shared by every family's loader: ``.pth`` plain state dicts (or in one of
upstream's wrappers) and ``.safetensors``, recognised from their content; which family's checkpoint a state dict is
(``checkpoint_family``, from the markers the family registry holds); strict, shape-checked loading by assignment.
``ssg_engine.loading`` re-exports these names with the families' loaders (``load_models``, ``load_infinity``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn

from .families import all_families, detect_family

StateLike = Union[str, Path, Mapping[str, torch.Tensor]]
_CKPT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# Every checkpoint kind of the registered families (FamilySpec.checkpoints): a key only its state dicts hold
# (checkpoint_family), and its name in messages.
FAMILY_KEYS = {kind: key for spec in all_families() for kind, (key, _) in spec.checkpoints.items()}
FAMILY_NAMES = {kind: name for spec in all_families() for kind, (_, name) in spec.checkpoints.items()}
# Where upstream files nest the state dict: the BSQ VAE's {"vae": sd}, Infinity's training checkpoint (its model part,
# as upstream's save_slim_model takes it).
_WRAPPERS = (("vae",), ("trainer", "gpt_fsdp"))


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model asked for; the message says why."""


def checkpoint_format(path: Path) -> Optional[str]:
    """``"safetensors"``, ``"zip"`` (``torch.save``), ``"pickle"`` (legacy ``torch.save``) or None, from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte little-endian header length, then the JSON header
        return "safetensors"
    if head[:2] == b"PK":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return None


def check_state_dict(sd: object, what: str) -> Dict[str, torch.Tensor]:
    """``sd`` as a dict if it is a flat, non-empty mapping from names to tensors; else ``CheckpointError`` naming ``what``."""
    if isinstance(sd, Mapping) and sd and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        return dict(sd)
    hint = ""
    if isinstance(sd, Mapping):
        nested = [k for k, v in sd.items() if isinstance(v, Mapping)]
        if nested:
            hint = f"; it nests mappings under {nested[:5]}: save the model's state dict (e.g. sd[{nested[0]!r}]) on its own"
    raise CheckpointError(f"{what} does not hold a state dict (a flat mapping from names to tensors){hint}")


def _unwrap(obj: Any) -> Any:
    """The state dict inside one of upstream's wrappers (``_WRAPPERS``), else ``obj`` itself."""
    for keys in _WRAPPERS:
        inner = obj
        for key in keys:
            inner = inner.get(key) if isinstance(inner, Mapping) else None
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return obj


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read a state dict from a ``torch.save`` file (zip or legacy; ``weights_only=True``) or a safetensors file: plain,
    or in one of upstream's wrappers (``{"vae": sd}``, ``{"trainer": {"gpt_fsdp": sd}}``).

    The format is recognised from the file's content, not its name.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _CKPT_SUFFIXES)
        hint = f" (it holds {', '.join(found[:5])})" if found else ""
        raise FileNotFoundError(f"checkpoint {path} is a directory, not a file; pass the checkpoint file inside it{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    fmt = checkpoint_format(path)
    if fmt is None:
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint or safetensors file (it is empty or starts with neither "
            "'PK' (torch zip), 0x80 (legacy torch pickle) nor a safetensors header)"
        )
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:  # mmap needs the zip format
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=fmt == "zip")
    except Exception as e:  # torch and safetensors raise many error types
        kind = "safetensors file" if fmt == "safetensors" else "torch checkpoint"
        raise CheckpointError(f"{path} is not a readable {kind}: {e}") from e
    return check_state_dict(_unwrap(sd), str(path))


def checkpoint_family(state_dict: Mapping[str, Any]) -> Optional[str]:
    """The checkpoint kind (``FAMILY_KEYS``: ``"var"``, ``"vqvae"``, ``"infinity"``, ``"bsq_vae"``, ...) of a state dict
    from its keys; None if not exactly one fits."""
    found = detect_family(state_dict)
    return None if found is None else found[1]


def _owner(kind: str) -> Any:
    """The spec of the family with checkpoint kind ``kind``."""
    return next(spec for spec in all_families() if kind in spec.checkpoints)


def expect_family(state_dict: Mapping[str, Any], family: str, what: str) -> None:
    """``CheckpointError`` naming ``what`` (a file or an argument) if ``state_dict`` is of another known checkpoint kind
    than ``family`` (a ``FAMILY_KEYS`` kind); an unknown one is left to the loader, whose key check says what is wrong."""
    found = checkpoint_family(state_dict)
    if found is None or found == family:
        return
    owner = _owner(found)
    if owner is _owner(family):
        fix = "the transformer and the VAE checkpoints are swapped; give each in its place"
    else:
        fix = f"load it with {owner.loader_name} (command line: --family {owner.name})"
    found_name, name = (("an " if FAMILY_NAMES[n][0] in "AEIOU" else "a ") + FAMILY_NAMES[n] for n in (found, family))
    raise CheckpointError(f"{what} is {found_name} checkpoint, not {name} one; {fix}")


def _check_and_load(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), first: {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[:5]}")
        raise CheckpointError(f"{what} checkpoint does not match the model: " + "; ".join(parts))
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{what} checkpoint: shape mismatch at {k!r}: expected {tuple(v.shape)}, found {tuple(state[k].shape)}")
    model.load_state_dict(state, strict=True, assign=True)


def _state(ckpt: StateLike, name: str, family: str) -> Dict[str, torch.Tensor]:
    """The state dict of a checkpoint path or (checked) mapping given as argument ``name``, of ``family`` (see
    ``expect_family``)."""
    if isinstance(ckpt, Mapping):
        sd = check_state_dict(_unwrap(ckpt), name)
    elif not isinstance(ckpt, (str, Path)):
        raise TypeError(f"{name} must be a checkpoint path or a state dict, got {type(ckpt).__name__}")
    else:
        sd = read_state_dict(ckpt)
    expect_family(sd, family, str(ckpt) if isinstance(ckpt, (str, Path)) else name)
    return sd


