"""Kept for compatibility: ``ssg_engine.models.infinity`` is ``ssg_engine.families.infinity.model`` (Infinity transformer), which now lives in its
family's folder. This module replaces itself with that one, so every name (private ones too), ``isinstance`` checks,
pickles naming ``ssg_engine.models.infinity`` and patches of its attributes all reach the same objects."""
import sys

from ssg_engine.families.infinity import model as _module

sys.modules[__name__] = _module
