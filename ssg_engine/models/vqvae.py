"""Kept for compatibility: ``ssg_engine.models.vqvae`` is ``ssg_engine.families.var.tokenizer`` (VAR's VQ-VAE), which now lives in its
family's folder. This module replaces itself with that one, so every name (private ones too), ``isinstance`` checks,
pickles naming ``ssg_engine.models.vqvae`` and patches of its attributes all reach the same objects."""
import sys

from ssg_engine.families.var import tokenizer as _module

sys.modules[__name__] = _module
