"""VAR's hyper-parameters: ``ModelConfig``, the public presets, and inference from checkpoints.

(``ssg_engine.config`` is this module, kept for compatibility; the config-field helpers shared by every family live
in :mod:`ssg_engine.validation` and are re-exported here.)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from ...validation import AssumedSettingWarning, field_type_problem, normalise_fields, read_config_file

__all__ = [  # the helpers are re-exported: ssg_engine.config (this module) has always held them
    "ARCH_FIELDS", "PATCH_NUMS_256", "PATCH_NUMS_512", "PRESET_DEPTHS", "AssumedSettingWarning", "ModelConfig", "field_type_problem",
    "infer_config", "matching_presets", "normalise_fields", "preset_key", "read_config_file",
]

PATCH_NUMS_256: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512: Tuple[int, ...] = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
# The fields that define the architecture: a config file or dict must give all of them (the rest default to upstream's).
ARCH_FIELDS: Tuple[str, ...] = (
    "V", "Cvae", "ch", "patch_nums", "depth", "embed_dim", "num_heads", "num_classes", "attn_l2_norm", "shared_aln", "share_quant_resi",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a VQ-VAE + VAR pair, with upstream VAR's defaults.

    The first block of fields (``ARCH_FIELDS``) is what ``tests/golden/var_tiny/config.json`` holds and what
    ``from_dict``/``from_json`` require; the rest are the upstream defaults that no public checkpoint changes.
    """

    V: int = 4096
    Cvae: int = 32
    ch: int = 160
    patch_nums: Tuple[int, ...] = PATCH_NUMS_256
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    num_classes: int = 1000
    attn_l2_norm: bool = True
    shared_aln: bool = False
    share_quant_resi: int = 4
    # VQ-VAE defaults (upstream VQVAE / vq-f16 ddconfig)
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True
    quant_resi: float = 0.5
    quant_conv_ks: int = 3
    using_znorm: bool = False
    beta: float = 0.25
    # VAR defaults
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    cond_drop_rate: float = 0.1

    def __post_init__(self) -> None:
        problems = normalise_fields(self)
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        for name in ("V", "Cvae", "ch", "depth", "embed_dim", "num_heads", "num_classes", "num_res_blocks"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)})")
        if not self.patch_nums or any(p <= 0 for p in self.patch_nums):
            problems.append(f"patch_nums must be positive integers (got {self.patch_nums})")
        elif list(self.patch_nums) != sorted(set(self.patch_nums)):
            problems.append(f"patch_nums must be strictly increasing (got {self.patch_nums})")
        if self.embed_dim % max(self.num_heads, 1):
            problems.append(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.share_quant_resi < 0:
            problems.append(f"share_quant_resi must be >= 0 (got {self.share_quant_resi})")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------ derived sizes
    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.downsample * self.patch_nums[-1]

    @property
    def L(self) -> int:
        """Total number of tokens over all scales (680 for VAR-256)."""
        return sum(p * p for p in self.patch_nums)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_nums"] = list(self.patch_nums)
        d["ch_mult"] = list(self.ch_mult)
        return d

    def to_json(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "ModelConfig":
        """A config from a mapping (e.g. a parsed config.json): every ``ARCH_FIELDS`` entry is required, the other
        fields default to upstream's. ``source`` names the mapping in errors (``from_json`` passes the file)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{source} must be a JSON object / mapping of ModelConfig fields, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        missing = [k for k in ARCH_FIELDS if k not in d]
        problems = []
        if unknown:
            problems.append(f"unknown ModelConfig field(s) {unknown}; known fields: {known}")
        if missing:
            problems.append(
                f"missing required field(s) {missing}: a config must give all of {list(ARCH_FIELDS)} "
                "(`ssg-engine info` prints them from the VAR and VQ-VAE checkpoints; ModelConfig.to_json writes a complete file)"
            )
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))
        try:
            return cls(**dict(d))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "ModelConfig":
        """Read a config file written by ``to_json`` (or by hand: ``ARCH_FIELDS`` are required)."""
        return cls.from_dict(read_config_file(path), source=f"config file {path}")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """One of the public checkpoints' configs: ``d16``, ``d20``, ``d24``, ``d30`` (256px), ``d36`` (512px)."""
        key = preset_key(name)
        if key not in PRESET_DEPTHS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_DEPTHS)}")
        depth = PRESET_DEPTHS[key]
        big = key == "d36"
        return cls(
            depth=depth,
            embed_dim=depth * 64,
            num_heads=depth,
            shared_aln=big,
            patch_nums=PATCH_NUMS_512 if big else PATCH_NUMS_256,
        )


PRESET_DEPTHS: Dict[str, int] = {"d16": 16, "d20": 20, "d24": 24, "d30": 30, "d36": 36}


def preset_key(name: str) -> str:
    """The ``PRESET_DEPTHS`` key a preset or checkpoint name refers to (``"var_d36_512"`` -> ``"d36"``)."""
    return name.lower().removeprefix("var_").removesuffix("_512")


def _patch_nums_for_token_count(L: int) -> Optional[Tuple[int, ...]]:
    for pn in (PATCH_NUMS_256, PATCH_NUMS_512):
        if sum(p * p for p in pn) == L:
            return pn
    return None


def infer_config(
    var_state: Optional[Mapping[str, Any]] = None,
    vae_state: Optional[Mapping[str, Any]] = None,
    patch_nums: Optional[Sequence[int]] = None,
) -> ModelConfig:
    """Infer a ``ModelConfig`` from checkpoint tensor shapes wherever that is unambiguous.

    ``patch_nums`` is recognised from the token count of ``pos_1LC`` when it equals one of the
    presets' (680 or 2240); otherwise it must be passed, and the error says so.
    """
    fields: Dict[str, Any] = {}
    if var_state is not None:
        if "pos_1LC" not in var_state or "class_emb.weight" not in var_state:
            raise ValueError("not a VAR state dict: keys 'pos_1LC' and 'class_emb.weight' are missing")
        L, C = var_state["pos_1LC"].shape[1], var_state["pos_1LC"].shape[2]
        depth = len({k.split(".")[1] for k in var_state if k.startswith("blocks.")})
        heads = var_state["blocks.0.attn.scale_mul_1H11"].shape[1] if "blocks.0.attn.scale_mul_1H11" in var_state else None
        if heads is None:
            raise ValueError(
                "cannot infer num_heads from a VAR checkpoint without attn_l2_norm "
                "(no 'blocks.0.attn.scale_mul_1H11'); pass a config"
            )
        found_pn = tuple(patch_nums) if patch_nums is not None else _patch_nums_for_token_count(L)
        if found_pn is None:
            raise ValueError(
                f"cannot infer patch_nums: pos_1LC has {L} tokens, which matches no preset "
                f"(680 for {PATCH_NUMS_256}, 2240 for {PATCH_NUMS_512}); pass patch_nums or a config"
            )
        if sum(p * p for p in found_pn) != L:
            raise ValueError(f"patch_nums {found_pn} give {sum(p * p for p in found_pn)} tokens but pos_1LC has {L}")
        fields.update(
            patch_nums=found_pn,
            depth=depth,
            embed_dim=C,
            num_heads=int(heads),
            num_classes=var_state["class_emb.weight"].shape[0] - 1,
            attn_l2_norm=True,
            shared_aln="shared_ada_lin.1.weight" in var_state,
            Cvae=var_state["word_embed.weight"].shape[1],
            V=var_state["head.weight"].shape[0],
            mlp_ratio=var_state["blocks.0.ffn.fc1.weight"].shape[0] / C,
        )
    if vae_state is not None:
        if "quantize.embedding.weight" not in vae_state or "encoder.conv_in.weight" not in vae_state:
            raise ValueError("not a VQ-VAE state dict: keys 'quantize.embedding.weight' / 'encoder.conv_in.weight' are missing")
        V, Cvae = vae_state["quantize.embedding.weight"].shape
        qr = [k for k in vae_state if k.startswith("quantize.quant_resi.") and k.endswith(".weight")]
        levels = len({k.split(".")[2] for k in vae_state if k.startswith("encoder.down.")})
        mults = tuple(
            vae_state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // vae_state["encoder.conv_in.weight"].shape[0]
            for i in range(levels)
        )
        n_res = len({k.split(".")[4] for k in vae_state if k.startswith("encoder.down.0.block.")})
        vae_fields = dict(
            V=int(V), Cvae=int(Cvae), ch=int(vae_state["encoder.conv_in.weight"].shape[0]),
            ch_mult=mults, num_res_blocks=n_res,
            in_channels=int(vae_state["encoder.conv_in.weight"].shape[1]),
            quant_conv_ks=int(vae_state["quant_conv.weight"].shape[-1]),
        )
        if "quantize.quant_resi.qresi.weight" in vae_state:
            vae_fields["share_quant_resi"] = 1
        elif any(".qresi_ls." in k for k in qr):
            vae_fields["share_quant_resi"] = len(qr)
        else:
            vae_fields["share_quant_resi"] = 0
        for k, v in vae_fields.items():
            if k in fields and fields[k] != v:
                raise ValueError(f"VAR and VQ-VAE checkpoints disagree on {k}: VAR has {fields[k]}, VQ-VAE has {v}")
        fields.update(vae_fields)
        if vae_fields["share_quant_resi"] == 0 and "patch_nums" not in fields:
            fields["patch_nums"] = tuple(patch_nums) if patch_nums is not None else None
    if fields.get("patch_nums") is None:
        if patch_nums is None:
            if var_state is None and vae_state is not None:
                S = vae_state["quantize.ema_vocab_hit_SV"].shape[0] if "quantize.ema_vocab_hit_SV" in vae_state else None
                raise ValueError(
                    f"cannot infer patch_nums from a VQ-VAE checkpoint alone ({S} scales recorded); "
                    "pass patch_nums or a config"
                )
        fields["patch_nums"] = tuple(patch_nums) if patch_nums is not None else PATCH_NUMS_256
    return ModelConfig(**fields)


def matching_presets(var_state: Mapping[str, Any]) -> list:
    """Names of presets whose shapes match ``var_state`` (depth, width, patch_nums, shared AdaLN)."""
    try:
        cfg = infer_config(var_state)
    except ValueError:
        return []
    out = []
    for name in PRESET_DEPTHS:
        p = ModelConfig.preset(name)
        if (p.depth, p.embed_dim, p.patch_nums, p.shared_aln) == (cfg.depth, cfg.embed_dim, cfg.patch_nums, cfg.shared_aln):
            out.append(name)
    return out

