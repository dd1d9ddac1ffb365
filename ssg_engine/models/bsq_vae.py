"""Kept for compatibility: ``ssg_engine.models.bsq_vae`` is ``ssg_engine.families.infinity.tokenizer`` (Infinity's BSQ VAE), which now lives in its
family's folder. This module replaces itself with that one, so every name (private ones too), ``isinstance`` checks,
pickles naming ``ssg_engine.models.bsq_vae`` and patches of its attributes all reach the same objects."""
import sys

from ssg_engine.families.infinity import tokenizer as _module

sys.modules[__name__] = _module
