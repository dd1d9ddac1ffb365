"""The ahead-of-time compile gate in CI.

1. The launchers' own ``*_launch`` choices (one configuration per kernel, plus the sampler on Infinity's bit rows) compile to
   sm_90 cubins on the CPU without spills.
2. The committed sweep (``bench/results/aot``) covers what the Engine launches: a quick live recording of the
   Engine's launches (both families, eager and graph schedules, SSG and filters) must be contained in the committed
   ``engine_launches.json``, and every recorded configuration must be compiled in ``aot_kernels.json`` for sm_80
   and sm_90 with no spill and no failure.

The scripts run in subprocesses: recording needs ``TRITON_INTERPRET=1`` (CPU tensors) and compiling
``TRITON_INTERPRET=0`` when triton is imported; each sets its own, whatever the caller's environment says.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # the in-process recorder test runs the kernel on CPU
pytest.importorskip("triton", reason="the AOT gate compiles the Triton kernels")
import torch  # noqa: E402

from conftest import kernel_test_settings  # noqa: E402
from ssg_engine.kernels import record_launches  # noqa: E402
from ssg_engine.kernels.ssg_guidance import ssg_guidance_launch, ssg_guidance_reference  # noqa: E402

INTERPRET, DEVICE, _ = kernel_test_settings()

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "aot"
REGENERATE = ("python bench/engine_launches.py --out bench/results/aot && "
              "python bench/aot_compile.py --arch 80 90 --out bench/results/aot --jobs 2")
ARCHS = (80, 90)


def _run(script: str, *args: str, interpret: str = "1") -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": interpret, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _describe(config: dict) -> str:
    consts = {name: spec for name, ty, spec in config["args"] if ty == "constexpr"}
    types = {name: f"{ty}{'/16' if spec == 'D' else ''}" for name, ty, spec in config["args"] if ty != "constexpr"}
    return f"{config['kernel']} warps={config['num_warps']} {consts} {types}"


def _recorded_args(launch) -> dict:
    with record_launches(execute=False) as recorder:
        launch.run()
    (config,) = recorder.configs
    return {name: (ty, spec) for name, ty, spec in config["args"]}


def test_record_launches_records_what_triton_specializes():
    """Alignment from the view's byte offset, ints == 1 as constants, do_not_specialize honoured; execute=False
    launches nothing; outside the block nothing is recorded and the kernel runs."""
    logits = torch.randn(33, device=DEVICE)[1:].view(2, 2, 8)  # 4 B past an aligned base
    t = torch.tensor([0.5, 1.5, 2.5], device=DEVICE)
    launch, guided, cfg = ssg_guidance_launch(logits, None, None, t[1], 0.0)  # t[1]: a graph's cfg_t[si] view
    args = _recorded_args(launch)
    assert args["logits_ptr"] == ("*fp32", "")  # unaligned: not divisible by 16
    assert args["guided_ptr"] == ("*fp32", "D")  # a fresh allocation
    assert args["t_ptr"] == ("*fp32", "")  # do_not_specialize_on_alignment: never "D"
    assert args["stride_t"] == ("i32", None) and args["B"] == ("i32", None)  # do_not_specialize
    assert args["stride_lv"] == ("constexpr", 1) and args["V"] == ("i32", "")  # 1 -> constant; 8 % 16 != 0
    assert args["T_IS_TENSOR"] == ("constexpr", True) and args["HAS_PRIOR"] == ("constexpr", False)
    aligned = [ssg_guidance_launch(torch.randn(2, 2, 16, device=DEVICE), None, None, t[si], 0.0)[0] for si in (0, 1)]
    args0, args1 = map(_recorded_args, aligned)
    assert args0["logits_ptr"] == ("*fp32", "D") and args0["V"] == ("i32", "D")
    assert args0 == args1  # t[0] (aligned) and t[1] (4 B off) compile to one variant

    guided.fill_(float("nan"))
    with record_launches(execute=False):
        launch.run()
    assert guided.isnan().all()  # recorded, not launched
    with record_launches() as recorder:
        launch.run()
    assert len(recorder.configs) == 1
    want, _ = ssg_guidance_reference(logits, None, None, t[1], 0.0)
    torch.testing.assert_close(guided, want)


@pytest.mark.parametrize("interpret", ["1", "0"], ids=["TRITON_INTERPRET=1", "TRITON_INTERPRET=0"])
def test_each_kernel_compiles_for_sm90_without_spills(interpret, tmp_path):
    _run("aot_compile.py", "--arch", "90", "--quick", "--out", str(tmp_path), interpret=interpret)
    rows = json.loads((tmp_path / "aot_kernels.json").read_text())
    assert sorted(r["kernel"] for r in rows) == ["ada_ln_modulate_kernel", "group_norm_silu_kernel", "guide_sample_bits_kernel",
                                                 "matmul_gated_residual_kernel", "matmul_gelu_kernel", "qkv_norm_rope_cache_kernel",
                                                 "sample_kernel", "sample_kernel", "ssg_guidance_kernel"]
    assert {r["num_stages"] for r in rows if r["kernel"].startswith("matmul")} <= {2, 3, 4}  # set by gemm_config, compiled with
    assert {r["constexprs"]["BLOCK_V"] for r in rows if r["kernel"] == "sample_kernel"} == {2, 4096}
    for row in rows:
        assert row["compiled"] and row["arch"] == 90, row
        assert row["spill_bytes"] == 0 and row["stack_bytes"] == 0, row
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] <= row["shared_limit"], row
        assert row["sass_instructions"] > 0
    assert "| sample_kernel | sm_90 |" in (tmp_path / "aot_kernels.md").read_text()


def _committed():
    launches = json.loads((RESULTS / "engine_launches.json").read_text())
    rows = json.loads((RESULTS / "aot_kernels.json").read_text())
    return launches, rows


def test_committed_sweep_compiles_every_engine_launch_without_spills():
    launches, rows = _committed()
    assert launches["runs"] and launches["configs"]
    compiled = {(r["key"], r["arch"]) for r in rows}
    missing = [_describe(c) + f" on sm_{arch}" for key, c in launches["configs"].items() for arch in ARCHS if (key, arch) not in compiled]
    assert not missing, f"{len(missing)} recorded Engine launch configurations are not in the compiled sweep:\n" + \
        "\n".join(missing[:20]) + f"\nregenerate: {REGENERATE}"
    bad = [r for r in rows if not r["compiled"] or r["spill_bytes"] or r["shared_bytes"] > r["shared_limit"]]
    assert not bad, [(r["arch"], r["kernel"], r["constexprs"], r.get("error") or r["spill_bytes"]) for r in bad]
    assert {r["arch"] for r in rows} == set(ARCHS)


def test_the_engine_launches_only_swept_configurations(tmp_path):
    """A quick live recording of the Engine (this code) is contained in the committed recording and sweep: a kernel,
    launcher or Engine change that launches a new configuration fails here until the sweep is regenerated."""
    _run("engine_launches.py", "--quick", "--out", str(tmp_path))
    live = json.loads((tmp_path / "engine_launches.json").read_text())
    assert {r["family"] for r in live["runs"]} == {"var", "infinity"} and all(r["launches"] > 0 for r in live["runs"])
    kernels = {c["kernel"].split(":")[1] for c in live["configs"].values()}
    assert {"_ssg_guidance_kernel", "_sample_kernel"} <= kernels
    launches, rows = _committed()
    compiled = {(r["key"], r["arch"]) for r in rows}
    missing = [_describe(c) for key, c in live["configs"].items()
               if key not in launches["configs"] or any((key, arch) not in compiled for arch in ARCHS)]
    assert not missing, f"the Engine launches {len(missing)} configurations the committed sweep lacks:\n" + \
        "\n".join(missing) + f"\nregenerate: {REGENERATE}"


def test_aot_vs_jit_quick_launches_materialise_in_little_memory():
    """``aot_vs_jit --quick`` (the device check's dry run) materialises one launch per compile key of the quick set:
    each must exist (a smaller twin with the same key) and fit in 1 GiB, else the CPU dry run allocates for minutes
    (Infinity-2B's whole KV cache at B=64 is 176 GB)."""
    code = ("import aot_vs_jit as a, aot_compile as c\n"
            "cases = a.launch_cases(True); keys = {c.launch_key(x.launch) for x in cases}\n"
            "reps = {k: v for k, v in a.representatives(cases + a.small_cases(), 90).items() if k in keys}\n"
            "assert len(reps) == len(keys) == 9, (len(reps), len(keys))\n"
            "for case, _ in reps.values(): assert a.footprint(case.launch) < 2 ** 30, case.describe()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "bench"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
