"""Kept for compatibility: ``ssg_engine.infinity_sampler`` is ``ssg_engine.families.infinity.sampler`` (Infinity's reference sampler), which now lives in its
family's folder. This module replaces itself with that one, so every name (private ones too), ``isinstance`` checks,
pickles naming ``ssg_engine.infinity_sampler`` and patches of its attributes all reach the same objects."""
import sys

from ssg_engine.families.infinity import sampler as _module

sys.modules[__name__] = _module
