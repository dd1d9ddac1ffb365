"""The user cache folder of ssg-engine (built extension, classifier weights, reference statistics)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def user_cache_dir(path: Union[None, str, Path] = None) -> Path:
    """``path``, else ``$SSG_ENGINE_CACHE``, else ``~/.cache/ssg_engine`` (created)."""
    if path is None:
        path = os.environ.get("SSG_ENGINE_CACHE") or (Path.home() / ".cache" / "ssg_engine")
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p
