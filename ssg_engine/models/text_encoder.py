"""Kept for compatibility: ``ssg_engine.models.text_encoder`` is ``ssg_engine.families.infinity.text`` (Infinity's text encoders), which now lives in its
family's folder. This module replaces itself with that one, so every name (private ones too), ``isinstance`` checks,
pickles naming ``ssg_engine.models.text_encoder`` and patches of its attributes all reach the same objects."""
import sys

from ssg_engine.families.infinity import text as _module

sys.modules[__name__] = _module
