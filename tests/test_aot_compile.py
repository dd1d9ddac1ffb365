"""The ahead-of-time compile gate in CI: one configuration of each Triton kernel, chosen by the launchers'
own ``*_launch`` functions, compiled to an sm_90 cubin on the CPU; fails on a compile error or a spill.

``bench/aot_compile.py`` runs in a subprocess: it needs ``TRITON_INTERPRET=0`` when triton is imported
(the interpreter's kernel objects cannot be compiled) and sets it itself, so it must work whatever the
caller's environment says (CI sets ``TRITON_INTERPRET=1``).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the AOT gate compiles the Triton kernels")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "aot_compile.py"


@pytest.mark.parametrize("interpret", ["1", "0"], ids=["TRITON_INTERPRET=1", "TRITON_INTERPRET=0"])
def test_each_kernel_compiles_for_sm90_without_spills(interpret, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90", "--quick", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "aot_kernels.json").read_text())
    assert sorted(r["kernel"] for r in rows) == ["sample_kernel", "ssg_guidance_kernel"]
    for row in rows:
        assert row["compiled"] and row["arch"] == 90, row
        assert row["spill_bytes"] == 0 and row["stack_bytes"] == 0, row
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] <= row["shared_limit"], row
        assert row["sass_instructions"] > 0
    assert "| sample_kernel | sm_90 |" in (tmp_path / "aot_kernels.md").read_text()
