"""bench/bench_e2e.py's compiled_reference arm (traced with Dynamo's eager backend on CPU: the same graphs and
calls as on the GPU, without Inductor's compile) and its speed-up ratios."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_e2e import COMPILED, GOLDEN_TINY, UPSTREAM, compiled_reference, summarize  # noqa: E402

from ssg_engine import SSG, load_models, sample_reference  # noqa: E402


def test_compiled_reference_draws_the_reference_tokens_and_images():
    """The compiled step over the torch.cat cache is the reference step: same seed, same tokens at every scale and
    the same images (float32 on CPU, eager backend: the same ops in the same order, so bit-equal)."""
    vae, var = load_models(GOLDEN_TINY / "var.pth", GOLDEN_TINY / "vae.pth", config=GOLDEN_TINY / "config.json")
    model = compiled_reference(var, None, backend="eager")
    model.attach_vae(vae)
    assert model.step is not var.step and model.blocks is var.blocks  # its own step, the same weights
    settings = dict(seed=0, cfg=1.5, top_k=10, top_p=0.9, ssg=SSG(beta=0.5))
    ref = sample_reference(var, 2, torch.tensor([0, 1]), **settings)
    out = sample_reference(model, 2, torch.tensor([0, 1]), **settings)
    assert len(out.tokens) == len(var.patch_nums)
    for si, (a, b) in enumerate(zip(ref.tokens, out.tokens)):
        assert torch.equal(a, b), f"scale {si}"
    assert torch.equal(ref.images, out.images)


def test_summary_has_engine_vs_compiled_and_vs_upstream_ratios():
    seconds = {UPSTREAM: 4.0, "reference_eager": 2.0, COMPILED: 1.0, "engine_eager": 0.8, "engine_graphs": 0.5}
    rows = [
        {"kind": "row", "model": "d16", "B": 1, "ssg": ssg, "method": m, "seconds": s * (1.5 if ssg == "on" else 1.0)}
        for m, s in seconds.items() for ssg in ("off", "on")
    ]
    out = summarize(rows)
    assert out["d16_B1_engine_graphs_speedup_vs_compiled_reference"] == 2.0
    assert out["d16_B1_engine_eager_ssg_speedup_vs_compiled_reference"] == pytest.approx(1.25)
    assert out["d16_B1_compiled_reference_speedup_vs_upstream"] == 4.0
    assert out["d16_B1_compiled_reference_ssg_overhead"] == pytest.approx(0.5)
