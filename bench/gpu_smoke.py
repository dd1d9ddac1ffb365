"""GPU smoke test, the device check's first step: one VAR-d16 batch (random bf16 weights, B=16) through the Engine
with CUDA graphs, checked before anything is timed:

* ``graphs_vs_eager``: the graphed Engine gives the same tokens at every scale and the same images as the Engine
  without graphs (same seed; the replay runs the same kernels);
* ``engine_vs_reference``: given the same tokens, the bf16 Engine's CFG logits at every scale are within
  ``LOGITS_REL_TOL`` of the float32 reference loop's (``sample_reference`` on a float32 copy of the weights).

Each check is a row appended to ``--rows`` (JSON Lines, ``bench/rows.py``) as soon as it is known, with its
seconds (the first graphed call includes its capture). Exit 1 when a check fails.
``--dry-run`` (CPU): the golden tiny model in float32, the Engine without graphs (the graphs check is a skipped
row); plumbing only.

    python bench/gpu_smoke.py --rows OUT/smoke.jsonl
    python bench/gpu_smoke.py --dry-run --rows /tmp/smoke.jsonl
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env_info import environment  # noqa: E402
from rows import RowWriter  # noqa: E402

from ssg_engine import SSG, ModelConfig, SamplingParams, load_models, random_models, sample_reference  # noqa: E402
from ssg_engine.engine import Engine  # noqa: E402

GOLDEN_TINY = Path(__file__).resolve().parents[1] / "tests" / "golden" / "var_tiny"
BATCH = 16
PARAMS = SamplingParams(cfg=1.5, top_k=900, top_p=0.96, seed=0, ssg=SSG(beta=0.5))
# bf16 Engine vs float32 reference, CFG logits given the same tokens (relative L2 error): tests/test_engine.py's
# BF16_LOGITS_REL_TOL (bf16 keeps 8 bits of mantissa, 2^-8 ~ 4e-3 per rounding, grown over d16's 16 blocks)
LOGITS_REL_TOL = 3e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def timed(fn: Callable[[], object], cuda: bool) -> Tuple[object, float]:
    """``fn()`` and its wall seconds (the device synchronised after it)."""
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def token_agreement(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> List[float]:
    """Fraction of equal tokens at each scale."""
    return [float((x == y).float().mean()) for x, y in zip(a, b)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=None, help="append JSON Lines here, one row per check as it is known")
    ap.add_argument("--dry-run", action="store_true", help="CPU: golden tiny model, float32, no graphs (plumbing only)")
    args = ap.parse_args(argv)
    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run (plumbing only)", file=sys.stderr)
        return 2
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:
        model, (vae, var) = "d16", random_models(ModelConfig.preset("d16"), device, dtype)
    else:
        model, (vae, var) = "tiny", load_models(GOLDEN_TINY / "var.pth", GOLDEN_TINY / "vae.pth", config=GOLDEN_TINY / "config.json")
    B = BATCH if cuda else 2
    rows = RowWriter(args.rows)
    rows.write("run", model=model, B=B, dtype=str(dtype).removeprefix("torch."), device=device, environment=environment(),
               params={"cfg": PARAMS.cfg, "top_k": PARAMS.top_k, "top_p": PARAMS.top_p, "ssg_beta": 0.5})
    labels = torch.arange(B, device=device) % var.num_classes
    reference_var = copy.deepcopy(var).float()  # before the Engines cast and attach their VQ-VAE decoders
    reference_var.attach_vae(copy.deepcopy(vae).float())
    failed = []

    def report(check: str, ok: Optional[bool], **fields) -> None:
        if ok is False:
            failed.append(check)
        rows.write("row", check=check, ok=ok, **fields)
        print(f"{check}: {'skipped' if ok is None else 'ok' if ok else 'FAILED'} {fields}", flush=True)

    eager = Engine(var, vae, max_batch=B, device=device, dtype=dtype, cuda_graphs=False)
    (eager_images, eager_tokens), first_s = timed(lambda: eager.generate(labels, PARAMS), cuda)
    _, eager_s = timed(lambda: eager.generate(labels, PARAMS), cuda)
    report("engine_eager", True, first_seconds=first_s, seconds=eager_s)

    if cuda:
        graphs = Engine(var, vae, max_batch=B, device=device, dtype=dtype, cuda_graphs=True)
        _, capture_s = timed(lambda: graphs.generate(labels, PARAMS), cuda)
        (graph_images, graph_tokens), replay_s = timed(lambda: graphs.generate(labels, PARAMS), cuda)
        agreement = token_agreement(graph_tokens, eager_tokens)
        max_diff = float((graph_images.float() - eager_images.float()).abs().max())
        report("graphs_vs_eager", min(agreement) == 1.0 and max_diff == 0.0, capture_seconds=capture_s, seconds=replay_s,
               token_agreement=agreement, images_max_abs_diff=max_diff)
    else:
        report("graphs_vs_eager", None, note="no CUDA device: the Engine runs without graphs")

    ref, ref_s = timed(lambda: sample_reference(reference_var, B, labels, PARAMS, record_logits=True), cuda)
    eager.run_batch(labels, torch.tensor([0], device=device), PARAMS, forced_tokens=ref.tokens, record_logits=True)
    errors = [rel_err(cfg_logits, ref_logits) for (cfg_logits, _), ref_logits in zip(eager.last_logits, ref.cfg_logits)]
    report("engine_vs_reference", max(errors) < LOGITS_REL_TOL, reference_seconds=ref_s, logits_rel_err=errors,
           tolerance=LOGITS_REL_TOL)
    rows.write("done", ok=not failed, failed=failed)
    print(f"smoke: {'ok' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
