"""The C++ extension ``ssg_engine._C`` (KV-cache pool + graph-safe append op), however the package was installed.

Order of attempts, on first import of :mod:`ssg_engine.kv_cache`:

1. ``ssg_engine._C`` built at install time (``pip install --no-build-isolation -e .``, or any install
   that had torch importable while building);
2. otherwise (e.g. ``pip install -e .`` with build isolation, where setup.py cannot import torch), build
   ``csrc/*.cpp`` once with ``torch.utils.cpp_extension.load`` (ninja), cached under
   :func:`ssg_engine.cache.user_cache_dir` ``/torch_extensions/<torch version>-<python>``; one line on stderr says so;
3. if that fails too, ``None`` and the reason: the caller falls back to the pure-Python pool.

``SSG_ENGINE_BUILD_EXT=0`` skips step 2.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Tuple

from .cache import user_cache_dir

EXTENSION_NAME = "ssg_engine_C"


def extension_sources() -> List[Path]:
    """The C++ sources: ``csrc/`` of a source checkout, else the copy installed as ``ssg_engine/csrc``."""
    package = Path(__file__).resolve().parent
    for folder in (package.parent / "csrc", package / "csrc"):
        sources = sorted(folder.glob("*.cpp"))
        if sources:
            return sources
    return []


def _build_dir() -> Path:
    import torch

    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}"
    folder = user_cache_dir() / "torch_extensions" / tag
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def build_extension() -> ModuleType:
    """Compile (or reuse the cached build of) the extension with ninja; raises with the compiler's reason."""
    from torch.utils import cpp_extension

    sources = extension_sources()
    if not sources:
        raise RuntimeError("the C++ sources (csrc/*.cpp) are not installed with this package")
    build_dir = _build_dir()
    if not any(build_dir.glob(f"{EXTENSION_NAME}*.so")):
        print(f"ssg-engine: building the C++ KV-cache extension with ninja (first use; cached in {build_dir})", file=sys.stderr)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            return cpp_extension.load(
                EXTENSION_NAME, [str(s) for s in sources], extra_cflags=["-O3"], build_directory=str(build_dir), verbose=False
            )
    except Exception as e:
        detail = (log.getvalue().strip().splitlines() or [""])[-1]
        raise RuntimeError(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''} {detail}".strip()) from e


def load_extension() -> Tuple[Optional[ModuleType], Optional[str]]:
    """``(module, None)`` when the extension is usable, else ``(None, reason)``."""
    try:
        from . import _C

        return _C, None
    except ImportError as e:
        installed_error = f"ssg_engine._C did not import ({e})"
    if os.environ.get("SSG_ENGINE_BUILD_EXT", "1") == "0":
        return None, f"{installed_error}; building at first use is off (SSG_ENGINE_BUILD_EXT=0)"
    try:
        return build_extension(), None
    except Exception as e:  # any compiler/toolchain failure: the caller falls back with this reason
        return None, f"{installed_error}; building it at first use failed: {e}"
