"""Loading the public checkpoints (``.pth`` plain state dicts, or ``.safetensors``) without random init: VAR with its
VQ-VAE (``load_models``), Infinity with its BSQ VAE (``load_infinity``) and HART with its tokenizer (``load_hart``).

One import path for both: reading and checking a checkpoint is shared (:mod:`ssg_engine.checkpoints`), each loader
lives in its family's folder (:mod:`ssg_engine.families.var.loading`, :mod:`ssg_engine.families.infinity.loading`);
this module re-exports them (the command line calls the loaders through it)."""
from .checkpoints import (
    FAMILY_KEYS, FAMILY_NAMES, CheckpointError, StateLike, check_state_dict, checkpoint_family,
    checkpoint_format, expect_family, read_state_dict,
)
from .families.infinity.loading import (
    ASSUMED_INFINITY_SETTINGS, STALE_INFINITY_BUFFERS, InfinityConfigLike, load_infinity, warn_assumed_settings,
)
from .families.hart.loading import load_hart
from .families.var.loading import ConfigLike, build_models, load_models, random_models, resolve_config

__all__ = [
    "ASSUMED_INFINITY_SETTINGS", "FAMILY_KEYS", "FAMILY_NAMES", "STALE_INFINITY_BUFFERS", "CheckpointError", "ConfigLike",
    "InfinityConfigLike", "StateLike", "build_models", "check_state_dict", "checkpoint_family", "checkpoint_format",
    "expect_family", "load_hart", "load_infinity", "load_models", "random_models", "read_state_dict", "resolve_config",
    "warn_assumed_settings",
]
