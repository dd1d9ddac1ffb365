"""HART's hyper-parameters, read from the keys of upstream's ``llm/config.json`` and ``tokenizer/config.json``.

Upstream: mit-han-lab/hart ``hart/modules/models/transformer/configuration.py`` (``HARTForT2IConfig``) and
``hart/modules/models/autoencoder/configuration.py`` (``HARTAutoEncoderConfig``). Keys that only matter for
training or for upstream's kernel choice (drop rates, ``flash_if_available``, ...) are accepted and ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Tuple

from ..var.config import ModelConfig  # HART reuses VAR's VQ-VAE, configured by its ModelConfig

# The dtype the HART Engine runs at on CUDA (float16 autocast, as upstream samples; its registry entry's placement).
ENGINE_CUDA_DTYPE = "float16"
# Keys of upstream's config.json that do not change inference (training, HF bookkeeping, kernel selection).
IGNORED_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "vae_path",
    "drop_rate", "attn_drop_rate", "drop_path_rate", "cond_drop_rate", "flash_if_available", "fused_if_available",
    "diffusion_batch_mul", "diffusion_head_repeats", "latent_condition_weight", "num_classes",
    "dropout", "beta", "test_mode", "levels", "hybrid", "freeze_codebook_for_hybrid", "disable_quant_resi",
})


def _pick(cls: Any, d: Mapping[str, Any], what: str) -> Dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in names and k not in IGNORED_KEYS)
    if unknown:
        raise ValueError(f"{what}: unknown config keys {unknown}")
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}


@dataclasses.dataclass(frozen=True)
class HARTConfig:
    """The transformer (``llm/config.json``). ``patch_nums``: side of every scale; the first scale's single token is
    replaced by ``context_token`` text tokens (width ``context_dim``)."""

    patch_nums: Tuple[int, ...] = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
    context_token: int = 300
    context_dim: int = 1536
    depth: int = 24
    embed_dim: int = 1536
    num_heads: int = 24
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    attn_l2_norm: bool = True
    attn_type: str = "llama"
    mlp_type: str = "gpt2"
    shared_aln: bool = False
    disable_aln: bool = False
    use_timestep_embed: bool = False
    sep_aln_pooling_mode: str = "max"
    use_cross_attn: bool = False
    use_context_norm: bool = False
    context_norm_scale: float = 1.0
    diff_width: int = 1024
    diff_depth: int = 6
    num_sampling_steps: str = "8"
    sampler: str = "iddpm"

    def __post_init__(self) -> None:
        if self.attn_type != "llama":
            raise ValueError(f"attn_type must be 'llama' (HART text-to-image); got {self.attn_type!r}")
        if self.mlp_type not in ("gpt2", "llama"):
            raise ValueError(f"mlp_type must be 'gpt2' or 'llama'; got {self.mlp_type!r}")
        if self.sep_aln_pooling_mode not in ("max", "avg"):
            raise ValueError(f"sep_aln_pooling_mode must be 'max' or 'avg'; got {self.sep_aln_pooling_mode!r}")
        for name in ("use_cross_attn", "disable_aln", "shared_aln"):
            if getattr(self, name):
                raise ValueError(f"{name}=True is not supported (no released HART checkpoint uses it)")
        if self.sampler != "iddpm":
            raise ValueError(f"sampler must be 'iddpm'; got {self.sampler!r}")
        if self.context_token < 1 or len(self.patch_nums) < 2 or self.embed_dim % self.num_heads:
            raise ValueError("HARTConfig needs context_token >= 1, at least two scales and num_heads | embed_dim")
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError("the 2-D RoPE needs head_dim divisible by 4")

    @property
    def L(self) -> int:
        """Tokens over all scales with the first scale's single token (upstream ``self.L``)."""
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def seq_len(self) -> int:
        """Sequence length of the transformer: context tokens plus every scale after the first."""
        return self.L + self.context_token - 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HARTConfig":
        """From upstream's ``llm/config.json`` dictionary (unknown keys: ValueError)."""
        return cls(**_pick(cls, d, "HART config"))


@dataclasses.dataclass(frozen=True)
class HARTTokenizerConfig:
    """The hybrid tokenizer (``tokenizer/config.json``, ``HARTAutoEncoderConfig`` keys)."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    v_patch_nums: Tuple[int, ...] = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
    quantizer_type: str = "var_hybrid"
    double_decoder: bool = False

    def __post_init__(self) -> None:
        if self.quantizer_type != "var_hybrid":
            raise ValueError(f"quantizer_type must be 'var_hybrid' (HART's hybrid tokenizer); got {self.quantizer_type!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HARTTokenizerConfig":
        """From upstream's ``tokenizer/config.json`` dictionary (unknown keys: ValueError)."""
        return cls(**_pick(cls, d, "HART tokenizer config"))

    def vqvae_config(self, patch_nums: Tuple[int, ...]) -> ModelConfig:
        """The shared VQ-VAE's config for a transformer with scales ``patch_nums`` (the refinement convs are indexed by
        ``si / (len(patch_nums) - 1)``, as upstream's sampler does)."""
        counts = self.default_qresi_counts or len(self.v_patch_nums)
        if self.share_quant_resi == 0 and counts != len(patch_nums):
            raise ValueError(f"non-shared quant_resi has {counts} convs but the transformer has {len(patch_nums)} scales")
        return ModelConfig(
            V=self.vocab_size, Cvae=self.z_channels, ch=self.ch, ch_mult=self.ch_mult, patch_nums=tuple(patch_nums),
            using_znorm=self.using_znorm, quant_conv_ks=self.quant_conv_ks, quant_resi=self.quant_resi,
            share_quant_resi=self.share_quant_resi,
        )


# The released hart-0.7b-1024px ``llm/config.json`` was never available here (nor quoted anywhere we could search), so
# every number of the preset says where it comes from; ``load_hart`` reads the real file and wins over this preset.
HART_0_7B_1024PX = HARTConfig(
    # upstream: sample.py / app.py ``--max_token_length`` default 300 (the text is padded to it: context tokens)
    context_token=300,
    # upstream: the text encoder's width (README/sample.py: Qwen2-VL-1.5B-Instruct, a Qwen2-1.5B with hidden size 1536)
    context_dim=1536,
    # the last side, 64, is upstream's: 1024 px over the tokenizer's 16x downsampling (``ch_mult`` of five levels);
    # the 13 sides before it are our estimate (upstream's code defaults to VAR's 256-px schedule; no 1024-px list is
    # in its code or README), the same as our HARTTokenizerConfig's ``v_patch_nums``
    patch_nums=(1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
    # our estimate: width = the context width (1536), 64-dim heads (VAR's and upstream's default head size: 24 heads),
    # and the depth at which the checkpoint's name holds: 16 blocks give 732.5M parameters with the 36.6M diffusion
    # head (24 blocks, this preset before, gave 1.07B, not a "0.7b")
    embed_dim=1536, num_heads=24, depth=16,
    # upstream: the text-to-image model is "llama-style" (attention with 2-D RoPE, RMSNorm; the paper); the SwiGLU MLP
    # (``mlp_type="llama"``) is our estimate: at width 1536 it has the GELU MLP's parameters and FLOPs to 0.01%
    mlp_type="llama", attn_type="llama", attn_l2_norm=True, mlp_ratio=4.0,
    # upstream: HARTForT2IConfig's defaults; the diffusion head has 36.6M parameters at them (README: "37M")
    diff_width=1024, diff_depth=6, num_sampling_steps="8",
    # our estimate (unchecked, no effect on costs or memory beyond a few KB): context RMSNorm and the timestep level
    # embedding on, as the tiny golden configuration a_d2
    use_context_norm=True, use_timestep_embed=True,
)

PRESETS: Dict[str, HARTConfig] = {
    "hart_0.7b_1024px": HART_0_7B_1024PX,
}
