"""Time building + loading a public-size checkpoint against a bare ``torch.load`` of the same file.

Writes a random-weight checkpoint with the exact keys and shapes of a preset (``d30`` by default,
2.0 B parameters, float32 like the public files), then times, each in a fresh process so the page
cache state is the same for all (the file is read once first to warm it):
  - ``torch.load(path, weights_only=True)`` (bare, reads every byte),
  - ``torch.load(path, weights_only=True, mmap=True)`` (bare, lazy),
  - ``ssg_engine.load_models(path, vae_path)`` (meta-device build + assign + checks), and
  - the naive way: construct the model normally (random init) then ``load_state_dict``.
Usage: python bench/bench_load.py --preset d30 --dir /tmp/ckpt --out bench/results/load_d30_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

SNIPPETS = {
    "bare_torch_load": "import torch; sd = torch.load({var!r}, map_location='cpu', weights_only=True)",
    "bare_torch_load_mmap": "import torch; sd = torch.load({var!r}, map_location='cpu', weights_only=True, mmap=True)",
    "ssg_engine_load_models": "import ssg_engine; vae, var = ssg_engine.load_models({var!r}, {vae!r})",
    "naive_init_then_load": (
        "import torch, ssg_engine; from ssg_engine.loading import build_models; "
        "cfg = ssg_engine.ModelConfig.preset({preset!r}); vae, var = build_models(cfg, 'cpu'); "
        "var.load_state_dict(torch.load({var!r}, map_location='cpu', weights_only=True)); "
        "vae.load_state_dict(torch.load({vae!r}, map_location='cpu', weights_only=True))"
    ),
}


def write_checkpoints(preset: str, out_dir: Path) -> tuple:
    from ssg_engine import ModelConfig, build_models

    out_dir.mkdir(parents=True, exist_ok=True)
    var_path, vae_path = out_dir / f"var_{preset}.pth", out_dir / "vae_ch160v4096z32.pth"
    if var_path.exists() and vae_path.exists():
        return var_path, vae_path
    vae, var = build_models(ModelConfig.preset(preset), "meta")
    gen = torch.Generator().manual_seed(0)
    for model, path in ((var, var_path), (vae, vae_path)):
        sd = {}
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                sd[k] = torch.randn(v.shape, generator=gen).mul_(0.02)
            else:
                sd[k] = torch.zeros(v.shape, dtype=v.dtype)
        torch.save(sd, path)
        del sd
    return var_path, vae_path


def time_snippet(code: str) -> float:
    """Wall time of ``code`` in a fresh interpreter, minus the interpreter + imports start-up."""
    prog = f"import time, torch, ssg_engine; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", prog], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="d30")
    ap.add_argument("--dir", default="/tmp/ssg_engine_ckpt")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-naive", action="store_true", help="skip the slow random-init baseline")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    var_path, vae_path = write_checkpoints(args.preset, Path(args.dir))
    print(f"checkpoints ready in {time.perf_counter() - t0:.1f}s: {var_path} ({var_path.stat().st_size / 1e9:.2f} GB)")
    var_path.read_bytes()  # warm the page cache once so every variant sees the same state
    results = {}
    for name, tmpl in SNIPPETS.items():
        if name == "naive_init_then_load" and args.skip_naive:
            continue
        code = tmpl.format(var=str(var_path), vae=str(vae_path), preset=args.preset)
        times = [time_snippet(code) for _ in range(args.repeats)]
        results[name] = {"seconds_min": min(times), "seconds_all": times}
        print(f"{name:28s} {min(times):8.3f} s")
    base = results["bare_torch_load"]["seconds_min"]
    ours = results["ssg_engine_load_models"]["seconds_min"]
    print(f"load_models / bare torch.load = {ours / base:.3f}")
    report = {
        "preset": args.preset, "var_checkpoint_bytes": var_path.stat().st_size, "results": results,
        "ratio_load_models_over_bare_torch_load": ours / base,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
