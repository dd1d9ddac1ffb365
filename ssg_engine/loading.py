"""Loading the public checkpoints (``.pth`` plain state dicts, or ``.safetensors``) without random init: VAR with its
VQ-VAE (``load_models``) and Infinity with its BSQ VAE (``load_infinity``)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .config import ARCH_FIELDS, PRESET_DEPTHS, AssumedSettingWarning, ModelConfig, infer_config, matching_presets, preset_key, read_config_file
from .models.bsq_vae import BSQVAE, load_bsq_vae
from .models.infinity import InfinityConfig, InfinityTransformer
from .models.var import level_buffers
from .sampler import VAR
from .models.vqvae import VQVAE

ConfigLike = Union[None, str, Path, ModelConfig, Mapping[str, object]]
StateLike = Union[str, Path, Mapping[str, torch.Tensor]]
_CKPT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# A key only each family's state dict holds (checkpoint_family), and the family's name in messages.
FAMILY_KEYS = {"var": "pos_1LC", "vqvae": "quantize.embedding.weight", "infinity": "cfg_uncond", "bsq_vae": "encoder.conv_in.conv.weight"}
FAMILY_NAMES = {"var": "VAR", "vqvae": "VQ-VAE", "infinity": "Infinity", "bsq_vae": "BSQ VAE"}
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
    """``"var"``, ``"vqvae"``, ``"infinity"`` or ``"bsq_vae"`` from the keys of a state dict; None if not exactly one fits."""
    found = [family for family, key in FAMILY_KEYS.items() if key in state_dict]
    return found[0] if len(found) == 1 else None


def expect_family(state_dict: Mapping[str, Any], family: str, what: str) -> None:
    """``CheckpointError`` naming ``what`` (a file or an argument) if ``state_dict`` is of another known family than
    ``family``; an unknown one is left to the loader, whose key check says what is wrong."""
    found = checkpoint_family(state_dict)
    if found is None or found == family:
        return
    infinity = {"infinity", "bsq_vae"}
    if (found in infinity) == (family in infinity):
        fix = "the transformer and the VAE checkpoints are swapped; give each in its place"
    elif found in infinity:
        fix = "load it with load_infinity (command line: --family infinity)"
    else:
        fix = "load it with load_models (command line: --family var)"
    found_name, name = (("an " if n == "infinity" else "a ") + FAMILY_NAMES[n] for n in (found, family))
    raise CheckpointError(f"{what} is {found_name} checkpoint, not {name} one; {fix}")


def resolve_config(config: ConfigLike, var_state: Optional[Mapping[str, torch.Tensor]], vae_state: Optional[Mapping[str, torch.Tensor]]) -> ModelConfig:
    """A ``ModelConfig`` from a preset name, a JSON path, a dict, a config object, or (None) the checkpoints' shapes."""
    if isinstance(config, ModelConfig):
        cfg = config
    elif config is None:
        return infer_config(var_state, vae_state)
    elif isinstance(config, Mapping):
        cfg = _config_over_shapes(config, "config", var_state, vae_state)
    elif not isinstance(config, (str, Path)):
        raise TypeError(f"config must be None, a preset name, a JSON path, a dict or a ModelConfig; got {type(config).__name__}")
    elif isinstance(config, str) and preset_key(config) in PRESET_DEPTHS:
        cfg = ModelConfig.preset(config)
        if var_state is not None:
            fits = matching_presets(var_state)
            if fits and preset_key(config) not in fits:
                raise CheckpointError(f"the VAR checkpoint fits preset {' / '.join(fits)}, not {config!r}")
    elif Path(config).exists() or str(config).lower().endswith(".json"):
        cfg = _config_over_shapes(read_config_file(config), f"config file {config}", var_state, vae_state)
    else:
        raise ValueError(f"config {str(config)!r} is neither a preset ({', '.join(PRESET_DEPTHS)}) nor an existing JSON file")
    return cfg


def _config_over_shapes(given: Mapping[str, Any], source: str, var_state: Optional[Mapping[str, torch.Tensor]],
                        vae_state: Optional[Mapping[str, torch.Tensor]]) -> ModelConfig:
    """``given`` config fields (``source`` names them in errors) over the config the checkpoints' shapes determine: a
    partial config gives only what the shapes cannot tell (or overrides them); without both checkpoints, or where the
    shapes tell too little, every ``ARCH_FIELDS`` entry must be given."""
    if var_state is None or vae_state is None or all(k in given for k in ARCH_FIELDS):
        return ModelConfig.from_dict(given, source)
    try:
        inferred = infer_config(var_state, vae_state, given.get("patch_nums"))
    except (TypeError, ValueError) as why:
        try:
            return ModelConfig.from_dict(given, source)
        except ValueError as e:  # which required fields are missing, and why the shapes cannot tell them
            raise ValueError(f"{e} (the checkpoints' shapes cannot fill them in: {why})") from None
    return ModelConfig.from_dict({**inferred.to_dict(), **given}, source)


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


def build_models(cfg: ModelConfig, device: Union[str, torch.device] = "meta") -> Tuple[VQVAE, VAR]:
    """Construct (vae, var) on ``device`` (default ``meta``: no memory, no init)."""
    with torch.device(device):
        vae = VQVAE(cfg)
        var = VAR(cfg, vae)
    return vae, var


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


def load_models(
    var_ckpt: StateLike,
    vae_ckpt: StateLike,
    config: ConfigLike = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tuple[VQVAE, VAR]:
    """Load (vae, var) from checkpoint paths (or state dicts), built on the meta device and filled by assignment.

    ``config``: None (inferred from the tensor shapes), a preset name (``d16`` ... ``d36``), a JSON path, a dict of
    ``ModelConfig`` fields, or a ``ModelConfig``.
    The VQ-VAE stays float32 (it decodes in float32); the VAR is cast to ``dtype``. Both are in eval mode.
    """
    var_state, vae_state = _state(var_ckpt, "var_ckpt", "var"), _state(vae_ckpt, "vae_ckpt", "vqvae")
    cfg = resolve_config(config, var_state, vae_state)
    vae, var = build_models(cfg, "meta")
    vae_state = dict(vae_state)
    ema = vae_state.get("quantize.ema_vocab_hit_SV")
    if ema is not None and ema.shape[0] != len(cfg.patch_nums):  # upstream tolerates a different scale count here
        vae_state["quantize.ema_vocab_hit_SV"] = torch.zeros(len(cfg.patch_nums), ema.shape[1], dtype=ema.dtype)
    _check_and_load(vae, vae_state, "VQ-VAE")
    _check_and_load(var, var_state, "VAR")
    vae = vae.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    var = var.to(device=device, dtype=dtype).eval().requires_grad_(False)
    var.attach_vae(vae)
    return vae, var


InfinityConfigLike = Union[None, str, InfinityConfig, Mapping[str, Any]]
# buffers of older code that upstream Infinity.load_state_dict removes from a checkpoint before loading
STALE_INFINITY_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")


# InfinityConfig fields that change samples but that neither the checkpoint's shapes nor upstream's file tell: the
# released value is assumed unless the config gives them
ASSUMED_INFINITY_SETTINGS = ("fused_norm",)


def warn_assumed_settings(given: Mapping[str, Any], what: str) -> None:
    """One ``AssumedSettingWarning`` naming the ``ASSUMED_INFINITY_SETTINGS`` the ``given`` config leaves out (their
    released value is used) and how to set them."""
    assumed = {name: getattr(InfinityConfig, name) for name in ASSUMED_INFINITY_SETTINGS if name not in given}
    if assumed:
        values = ", ".join(f"{name}={value}" for name, value in assumed.items())
        other = ", ".join(f"{name!r}: {not value}" for name, value in assumed.items())
        other_json = ", ".join(f"{json.dumps(name)}: {json.dumps(not value)}" for name, value in assumed.items())
        warnings.warn(
            f"{what}: assumed {values} (the released models' value; a checkpoint's shapes cannot tell it); if the model "
            f"was trained otherwise its samples are wrong: pass config={{{other}}} (command line: --config FILE.json "
            f"holding {{{other_json}}})", AssumedSettingWarning, stacklevel=3,
        )


def load_infinity(
    model_path: StateLike,
    vae_path: StateLike,
    config: InfinityConfigLike = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tuple[InfinityTransformer, BSQVAE]:
    """Load (infinity, vae) from upstream files (``infinity_*.pth`` plain or as a training checkpoint, safetensors, or
    our own saved state dicts) or state dicts, e.g. ``infinity_2b_reg.pth`` with ``infinity_vae_d32reg.pth``.

    ``config``: None (inferred from the shapes, ``InfinityConfig.from_state_dict``), a preset name (``INFINITY_PRESETS``),
    a dict of ``InfinityConfig`` fields or upstream ``Infinity(...)`` keywords, or an ``InfinityConfig``; the bits per
    token must be the VAE's ``codebook_dim``. The model is built on the meta device, filled strictly (``load_upstream``;
    only the stale buffers upstream's own ``load_state_dict`` drops are ignored) and cast to ``dtype``; the VAE stays
    float32. Both are in eval mode.
    """
    model_state = {k: v for k, v in _state(model_path, "model_path", "infinity").items() if k not in STALE_INFINITY_BUFFERS}
    vae_state = _state(vae_path, "vae_path", "bsq_vae")
    what = str(model_path) if isinstance(model_path, (str, Path)) else "model_path"
    try:
        vae = load_bsq_vae(vae_state, device=device)
    except ValueError as e:
        raise CheckpointError(f"{vae_path if isinstance(vae_path, (str, Path)) else 'vae_path'}: {e}") from None
    d = vae.config.codebook_dim
    if isinstance(config, InfinityConfig):
        cfg = config
    elif isinstance(config, str):
        cfg = InfinityConfig.preset(config, codebook_dim=d)
    elif config is None or isinstance(config, Mapping):
        try:
            inferred = InfinityConfig.from_state_dict(model_state)
        except ValueError as e:
            raise CheckpointError(f"{what}: {e}") from None
        cfg = inferred if config is None else InfinityConfig.from_upstream(config, codebook_dim=d, base=inferred)
    else:
        raise TypeError(f"config must be None, a preset name, a dict or an InfinityConfig; got {type(config).__name__}")
    if cfg.codebook_dim != d:
        patchify = " (4 x the VAE's: spatial patchify, as Infinity-8B; not supported)" if cfg.codebook_dim == 4 * d else ""
        raise CheckpointError(f"{what} predicts {cfg.codebook_dim} bits per token{patchify} but the VAE has codebook_dim {d}; "
                              "give the VAE the model was trained with (infinity_2b_reg.pth: infinity_vae_d32reg.pth)")
    with torch.device("meta"):
        model = InfinityTransformer(cfg)
    model.to_empty(device=device)  # every parameter and buffer is in the strictly checked state dict
    try:
        model.load_upstream(model_state)
    except ValueError as e:
        raise CheckpointError(f"{what}: {e}") from None
    if config is None or isinstance(config, Mapping):  # said once the model has loaded
        warn_assumed_settings(config or {}, what)
    return model.to(dtype=dtype).eval().requires_grad_(False), vae


def random_models(
    cfg: ModelConfig, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 0.02
) -> Tuple[VQVAE, VAR]:
    """(vae, var) of ``cfg`` with random N(0, std) weights, initialised directly on ``device`` (for benchmarks).

    The VQ-VAE is float32, the VAR ``dtype``; both in eval mode. The masking buffers are the real ones.
    """
    vae, var = build_models(cfg, "meta")
    gen = torch.Generator(device=device).manual_seed(seed)
    lvl_1L, attn_bias = level_buffers(cfg.patch_nums)
    exact = {"lvl_1L": lvl_1L, "attn_bias_for_masking": attn_bias}
    for model, dt in ((vae, torch.float32), (var, dtype)):
        model.to_empty(device=device)
        with torch.no_grad():
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                if model is var and name in exact:
                    t.copy_(exact[name])
                elif name.endswith("zero_k_bias"):
                    t.zero_()
                elif t.dtype.is_floating_point:
                    t.normal_(0.0, std, generator=gen)
        model.to(dtype=dt).eval().requires_grad_(False)
    var.attach_vae(vae)
    return vae, var
