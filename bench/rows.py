"""JSON Lines rows for the benchmarks and ``bench/device_check.sh``: one JSON object per line, each with a ``kind``
(``"run"``: a run's settings and environment; ``"row"``: one measurement; ``"done"``: the run ended), written and
flushed as soon as it is known, so a process killed by a step's time limit leaves every line it completed.

    rows = RowWriter(path)            # appends (several steps may share one file); path None: writes nothing
    rows.write("row", model="d16", B=16, seconds=0.1)
    read_rows(path)                   # the complete lines; a line cut by a kill is skipped
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, List, Optional, Union


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class RowWriter:
    """Appends rows to a JSON Lines file, one flushed line per :meth:`write`."""

    def __init__(self, path: Union[str, Path, None]) -> None:
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, **fields: Any) -> dict:
        """Append ``{"kind": kind, **fields}`` as one line (flushed before returning) and return it."""
        row = {"kind": kind, **fields}
        if self.path is not None:
            line = json.dumps(_finite(row), default=str)
            with self.path.open("a") as f:  # one open per line: nothing is held back in a buffer
                f.write(line + "\n")
        return row


def read_rows(path: Union[str, Path], kind: Optional[str] = None) -> List[dict]:
    """The rows of a JSON Lines file (of one ``kind`` if given); a missing file is empty, an incomplete line skipped."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and (kind is None or row.get("kind") == kind):
            rows.append(row)
    return rows
