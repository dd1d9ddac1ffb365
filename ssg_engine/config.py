"""Kept for compatibility: ``ssg_engine.config`` is ``ssg_engine.families.var.config`` (VAR's ModelConfig and presets (and the shared config-field helpers)), which now lives in its
family's folder. This module replaces itself with that one, so every name (private ones too), ``isinstance`` checks,
pickles naming ``ssg_engine.config`` and patches of its attributes all reach the same objects."""
import sys

from ssg_engine.families.var import config as _module

sys.modules[__name__] = _module
