"""Kernel-launching ops per Engine batch, counted on the CPU (no GPU needed): every aten op dispatched during one
``Engine.generate`` call (views, metadata and allocation-only ops excluded), with each Triton launch counted once
(the interpreter's own host copies are not counted). Shipped VAR (float32) and Infinity (bf16) models, B = 16,
SSG on, eager (no graphs), Triton backend under ``TRITON_INTERPRET=1``.

    python bench/launch_count.py            # prints one line per family
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _pop_mode_temporarily  # noqa: E402

import ssg_engine as se  # noqa: E402
from ssg_engine.engine import Engine  # noqa: E402
from ssg_engine.kernels import KernelLaunch  # noqa: E402
from ssg_engine.pretrained import load_pretrained, load_pretrained_infinity  # noqa: E402

NOT_LAUNCHING = {
    "view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "select", "slice",
    "as_strided", "detach", "alias", "split", "split_with_sizes", "unbind", "chunk", "narrow", "_reshape_alias",
    "lift_fresh", "empty", "empty_strided", "new_empty", "new_empty_strided", "unflatten", "flatten", "view_as",
    "expand_as", "_local_scalar_dense", "is_nonzero", "item", "sym_size", "sym_stride", "sym_numel", "dim", "size", "stride",
}


class LaunchCount(TorchDispatchMode):
    """Counts aten ops that launch a kernel (``ops``), and Triton launches (``triton``, also in ``ops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0].rstrip("_") not in NOT_LAUNCHING:
            self.ops += 1
        return func(*args, **(kwargs or {}))

    def run_launch(self, launch: KernelLaunch, run) -> None:
        self.ops += 1
        self.triton += 1
        with _pop_mode_temporarily():
            run(launch)


def count(engine: Engine, cond, params: se.SamplingParams) -> LaunchCount:
    """One warm-up call (operators, caches), then the counted call."""
    engine.generate(cond, params)
    counter, run = LaunchCount(), KernelLaunch.run
    KernelLaunch.run = lambda launch: counter.run_launch(launch, run)
    try:
        with counter:
            engine.generate(cond, params)
    finally:
        KernelLaunch.run = run
    return counter


def main() -> None:
    vae, var = load_pretrained()
    engine = Engine(var, vae, max_batch=16, device="cpu", dtype=torch.float32, cuda_graphs=False, backend="triton")
    c = count(engine, torch.arange(16) % 10, se.SamplingParams(ssg=se.SSG(beta=0.5), seed=1))
    print(f"VAR (shipped, float32) B=16 SSG: {c.ops} kernel-launching ops per batch, {c.triton} of them Triton")
    model, bsq, text_encoder = load_pretrained_infinity()
    engine = Engine(model, bsq, max_batch=16, device="cpu", dtype=torch.bfloat16, cuda_graphs=False, backend="triton")
    c = count(engine, text_encoder.encode(["a sneaker"] * 16), se.SamplingParams(ssg=se.SSG(beta=0.15), seed=1))
    print(f"Infinity (shipped, bf16) B=16 SSG: {c.ops} kernel-launching ops per batch, {c.triton} of them Triton")


if __name__ == "__main__":
    main()
