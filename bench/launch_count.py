"""Kernel-launching ops per batch, reference loop vs Engine, counted on the CPU (no GPU needed).

Method: every aten op dispatched during one sampling call that can launch a kernel is counted by a
``TorchDispatchMode``, and each Triton launch counts once. Both samplers run under ``torch.inference_mode`` (as the
Engine's ``run_batch`` always does), where composite ops (``linear``, ``layer_norm``, ``softmax``, ``matmul``) reach
the mode undecomposed: one op each, as one cuBLAS/cuDNN/ATen kernel on a GPU. Not counted: views and metadata,
allocation-only ops (``NOT_LAUNCHING``), ops without tensor outputs (``promote_types``) and non-mutating ops whose
outputs all alias an input (``to`` or ``contiguous`` that copy nothing). Both samplers get a warm-up call first.

* ``reference``: the upstream-exact reference loop (``sample_reference`` / ``sample_infinity_reference``), float32,
  the kernels' PyTorch references: what upstream launches, plus nothing. Its packed-text cross-attention
  (``varlen_cross_attention``: a per-prompt loop of matmuls and softmaxes with bf16 round trips that stands in for
  upstream's one ``flash_attn_varlen`` kernel on the CPU) counts as one launch.
* ``engine``: ``Engine(..., dtype=bfloat16, backend="triton")`` under ``TRITON_INTERPRET=1`` on its CUDA-graph path
  (static buffers; Infinity's text padded with a key mask), which on the CPU runs eagerly: the ops a captured graph
  replays (graphs change who launches, not what). Its Triton kernels are counted, not
  run (the interpreter would take hours at these sizes): their launchers allocate the outputs and the values stay
  unwritten, which changes no count (the Engine has no data-dependent control flow; a non-finite flag raised from
  such values at the end of ``generate`` is ignored).

Models (random weights): VAR d16 and d30, Infinity-2B and HART 0.7B (``hart_0.7b_1024px``: 300 context tokens, 14
scales to 64x64, one MaskGIT pass, the 8-step diffusion head) as *narrow twins* (same depth, schedule, vocabulary,
codebook and VAE layout; width 128, 2 heads, VAE channels 32; HART's diffusion head width 64 and text width 256),
since the number of launches does not depend on the width (checked here: a depth-2 VAR twin at width 128 and 256 must
count the same, else the script fails); Infinity and HART also on their two golden tiny configurations
(``tests/golden/infinity``, ``tests/golden/hart``). B = 1, SSG off and on. HART's Engine runs float32 (its only
dtype; its rows say ``engine_dtype``), with upstream's top-k (600/300), both samplers at CFG 4.5.

    python bench/launch_count.py --out bench/results/launch_count.json
    python bench/launch_count.py --quick          # the depth-2 width check and the golden tiny models only
    python bench/launch_count.py --family hart --out bench/results/launch_count.json   # HART's rows only; the file's
                                                  # other rows are kept as they are
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, Iterator, List, Optional  # noqa: E402

import torch  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode, _pop_mode_temporarily  # noqa: E402

from ssg_engine.families.var.config import ModelConfig  # noqa: E402
from ssg_engine.engine import Engine  # noqa: E402
from ssg_engine.guidance import SSG  # noqa: E402
from ssg_engine.families.infinity.sampler import sample_infinity_reference  # noqa: E402
from ssg_engine.kernels import KernelLaunch  # noqa: E402
from ssg_engine.loading import build_models  # noqa: E402
from ssg_engine.families.infinity import model as infinity  # noqa: E402
from ssg_engine.families.infinity.tokenizer import BSQVAE, BSQVAEConfig  # noqa: E402
from ssg_engine.families.infinity.model import INFINITY_PRESETS, InfinityConfig, InfinityTransformer, TextFeatures, scale_schedule  # noqa: E402
from ssg_engine.families.hart.config import PRESETS as HART_PRESETS  # noqa: E402
from ssg_engine.families.hart.config import HARTTokenizerConfig  # noqa: E402
from ssg_engine.families.hart.loading import load_hart  # noqa: E402
from ssg_engine.families.hart.model import HARTTransformer  # noqa: E402
from ssg_engine.families.hart.sampler import sample_hart_reference  # noqa: E402
from ssg_engine.families.hart.text import HARTTextFeatures  # noqa: E402
from ssg_engine.families.hart.tokenizer import HARTTokenizer  # noqa: E402
from ssg_engine.params import HARTParams, SamplingParams  # noqa: E402
from ssg_engine.pipeline import NonFiniteLogitsError  # noqa: E402
from ssg_engine.families.var.sampler import sample_reference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "infinity"
NOT_LAUNCHING = {
    "view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "select", "slice",
    "as_strided", "detach", "alias", "split", "split_with_sizes", "unbind", "chunk", "narrow", "_reshape_alias",
    "lift_fresh", "empty", "empty_strided", "new_empty", "new_empty_strided", "unflatten", "flatten", "view_as",
    "expand_as", "_local_scalar_dense", "is_nonzero", "item", "sym_size", "sym_stride", "sym_numel", "dim", "size", "stride",
    "empty_like", "broadcast_to",
}
TWIN = dict(embed_dim=128, num_heads=2)  # the twins' width: head_dim 64 (VAR's; Infinity-2B has 128)
GOALS = {"var": 0.40, "infinity": 0.50}  # issue #20: the Engine at most this fraction of the reference loop's count
ENGINE_DTYPE = torch.bfloat16
HART_ENGINE_DTYPE = torch.float32  # the HART Engine's only dtype
HART_GOLDEN = REPO / "tests" / "golden" / "hart"


class LaunchCount(TorchDispatchMode):
    """Counts aten ops that launch a kernel (``ops``), and Triton launches (``triton``, also in ``ops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += launches(func, args, kwargs or {}, out)
        return out

    def count_launch(self, launch: KernelLaunch) -> None:
        """``KernelLaunch.run`` while counting: one op, not run."""
        self.ops += 1
        self.triton += 1


def launches(func, args: tuple, kwargs: dict, out: object) -> bool:
    """Whether the aten op ``func`` launched a kernel (see the module docstring)."""
    if func.__name__.split(".")[0].rstrip("_") in NOT_LAUNCHING:
        return False
    outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not outs:
        return False
    if func._schema.is_mutable:
        return True
    inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    return not all(t.untyped_storage().data_ptr() in inputs for t in outs)


def count(fn: Callable[[], object]) -> LaunchCount:
    """One warm-up call (operators, caches), then the counted call; Triton launches are counted, not run."""
    counter, run = LaunchCount(), KernelLaunch.run
    for counted in (False, True):
        KernelLaunch.run = (lambda launch: counter.count_launch(launch)) if counted else (lambda launch: None)
        try:
            with counter if counted else contextlib.nullcontext(), torch.inference_mode():
                fn()
        except NonFiniteLogitsError:  # from unwritten kernel outputs (see the module docstring)
            pass
        finally:
            KernelLaunch.run = run
    return counter


def graph_path_engine(model, vae, B: int, dtype: torch.dtype = ENGINE_DTYPE) -> Engine:
    """A Triton Engine (bf16 unless ``dtype``) on its CUDA-graph path (static batch buffers, padded text), which a CPU
    runs eagerly."""
    engine = Engine(model, vae, max_batch=B, device="cpu", dtype=dtype, cuda_graphs=False, backend="triton")
    engine.cuda_graphs = True  # nothing is captured off CUDA (_StaticBatch runs the loop on its static buffers)
    return engine


@contextlib.contextmanager
def varlen_as_one_launch() -> Iterator[None]:
    """The reference's ``varlen_cross_attention`` counted as the one kernel upstream launches for it (its ops run
    outside the counting mode)."""
    original = infinity.varlen_cross_attention

    def one_launch(*args, **kwargs):
        if not isinstance(_get_current_dispatch_mode(), LaunchCount):  # the warm-up call
            return original(*args, **kwargs)
        with _pop_mode_temporarily() as counter:
            counter.ops += 1
            return original(*args, **kwargs)

    infinity.varlen_cross_attention = one_launch
    try:
        yield
    finally:
        infinity.varlen_cross_attention = original


# ---------------------------------------------------------------------------------------------- VAR


def var_twin(depth: int, width: int = TWIN["embed_dim"]) -> ModelConfig:
    """VAR-256 of ``depth`` (d16: 16 ... d30: 30) narrowed to ``width`` (head_dim 64), VQ-VAE channels 32."""
    return ModelConfig(depth=depth, embed_dim=width, num_heads=width // 64, ch=32)


def count_var(cfg: ModelConfig, ssg: bool, B: int = 1) -> Dict[str, int]:
    torch.manual_seed(0)
    vae, var = build_models(cfg, "cpu")
    vae, var = vae.eval(), var.eval()
    params = SamplingParams(cfg=1.5, top_k=900, top_p=0.96, ssg=SSG(beta=0.5) if ssg else None, seed=1)
    labels = torch.arange(B) % cfg.num_classes
    ref = count(lambda: sample_reference(var, B, labels, params))
    engine = graph_path_engine(var, vae, B)
    eng = count(lambda: engine.generate(labels, params))
    return dict(reference_ops=ref.ops, engine_ops=eng.ops, engine_triton=eng.triton)


# ---------------------------------------------------------------------------------------------- Infinity


def infinity_twin() -> InfinityConfig:
    """Infinity-2B's depth, chunks, shared AdaLN, bits and text length, narrowed (width 128, 2 heads, text 256 channels)."""
    return dataclasses.replace(INFINITY_PRESETS["infinity_2b"], **TWIN, text_channels=256)


def golden_config(name: str) -> tuple:
    c = json.loads((GOLDEN / name / "config.json").read_text())
    vae = c["vae"]["vae_model"]
    vcfg = BSQVAEConfig(codebook_dim=vae["codebook_dim"], base_ch=c["vae"]["overrides"]["base_ch"], num_res_blocks=c["vae"]["overrides"]["num_res_blocks"],
                        encoder_ch_mult=vae["encoder_ch_mult"], decoder_ch_mult=vae["decoder_ch_mult"], patch_size=vae["patch_size"])
    return InfinityConfig.from_upstream(c["infinity"], vae["codebook_dim"]), vcfg, c["h_div_w"], c["pn"]


def count_infinity(cfg: InfinityConfig, vcfg: BSQVAEConfig, h_div_w: float, pn: str, ssg: bool, B: int = 1) -> Dict[str, int]:
    torch.manual_seed(0)
    model, vae = InfinityTransformer(cfg).eval(), BSQVAE(vcfg).eval()
    schedule = scale_schedule(h_div_w, pn)
    gen = torch.Generator().manual_seed(0)
    text = TextFeatures(torch.randn(7 * B, cfg.text_channels, generator=gen), [7] * B)
    K = len(schedule)
    beta = SSG(beta=0.15) if ssg else None
    with varlen_as_one_launch():
        ref = count(lambda: sample_infinity_reference(model, vae, text, schedule, cfg_list=[3.0] * K, tau_list=[1.0] * K, seed=1, ssg=beta))
    engine = graph_path_engine(model, vae, B)
    eng = count(lambda: engine.generate(text, SamplingParams(cfg=3.0, ssg=beta, seed=1), h_div_w=h_div_w, pn=pn))
    return dict(reference_ops=ref.ops, engine_ops=eng.ops, engine_triton=eng.triton)


# ---------------------------------------------------------------------------------------------- HART


def hart_twin() -> tuple:
    """(model, tokenizer) of hart_0.7b_1024px's depth, context tokens, scales, vocabulary and diffusion steps, narrowed
    (width 128, 2 heads, text 256 channels, diffusion head width 64, tokenizer channels 32), random weights."""
    cfg = dataclasses.replace(HART_PRESETS["hart_0.7b_1024px"], **TWIN, context_dim=256, diff_width=64)
    torch.manual_seed(0)
    tok = HARTTokenizer(HARTTokenizerConfig(ch=32, v_patch_nums=cfg.patch_nums), cfg.patch_nums).eval()
    return HARTTransformer(cfg, tok).eval(), tok


def count_hart(model: HARTTransformer, tok: HARTTokenizer, ssg: bool, B: int = 1) -> Dict[str, int]:
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(B, model.context_token, model.context_embed.in_features, generator=gen)
    mask = torch.zeros(B, model.context_token, dtype=torch.bool)
    mask[:, :7] = True  # a 7-token prompt, padded
    params = HARTParams(cfg=4.5, seed=1, ssg=SSG(beta=0.5) if ssg else None)
    ref = count(lambda: sample_hart_reference(model, context, mask, params=params))
    engine = graph_path_engine(model, tok, B, HART_ENGINE_DTYPE)
    eng = count(lambda: engine.generate(HARTTextFeatures(context, mask), params))
    return dict(reference_ops=ref.ops, engine_ops=eng.ops, engine_triton=eng.triton)


# ---------------------------------------------------------------------------------------------- main


def width_check() -> Dict[str, int]:
    """The same depth-2 VAR at width 128 and 256 must launch the same ops (the twins' premise)."""
    narrow, wide = (count_var(var_twin(2, w), ssg=True) for w in (128, 256))
    if narrow != wide:
        sys.exit(f"launch counts depend on the width ({narrow} at 128 vs {wide} at 256): the narrow twins do not stand for the real models")
    return narrow


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--quick", action="store_true", help="the width check and the golden tiny models only")
    ap.add_argument("--family", choices=["var", "infinity", "hart"], default=None,
                    help="this family's rows only; with --out, the file's rows of the other families are kept")
    args = ap.parse_args()
    started = time.time()
    runs: List[tuple] = [("var", "depth-2 twin, widths 128 and 256", None, None)]
    if not args.quick:
        runs += [("var", f"d{d} twin", var_twin(d), None) for d in (16, 30)]
    runs += [("infinity", f"golden {name}", None, golden_config(name)) for name in ("sq_d16", "wide_d8")]
    if not args.quick:
        runs.append(("infinity", "infinity_2b twin (1M, 1:1)", None, (infinity_twin(), BSQVAEConfig(base_ch=32), 1.0, "1M")))
    runs += [("hart", f"golden {name}", None, lambda name=name: load_hart(HART_GOLDEN / name)) for name in ("a_d2", "b_d3")]
    if not args.quick:
        runs.append(("hart", "hart_0.7b_1024px twin", None, hart_twin))
    runs = [run for run in runs if args.family in (None, run[0])]
    rows = []
    for family, model, var_cfg, inf in runs:
        hart_pair = inf() if family == "hart" else None
        for ssg in (False, True):
            t0 = time.time()
            if var_cfg is None and inf is None:
                if not ssg:
                    continue
                counts = width_check()
            elif family == "var":
                counts = count_var(var_cfg, ssg)
            elif family == "hart":
                counts = count_hart(*hart_pair, ssg=ssg)
            else:
                counts = count_infinity(*inf, ssg=ssg)
            ratio = counts["engine_ops"] / counts["reference_ops"]
            goal = None if (var_cfg is None and inf is None) or family not in GOALS else GOALS[family]  # the width check: no goal
            row = dict(family=family, model=model, B=1, ssg=ssg, **counts, engine_fraction=round(ratio, 4),
                       goal=goal, meets_goal=None if goal is None else ratio <= goal, seconds=round(time.time() - t0, 1))
            if family == "hart":
                row["engine_dtype"] = str(HART_ENGINE_DTYPE).removeprefix("torch.")
            rows.append(row)
            print(f"{family:8s} {model:34s} SSG {'on ' if ssg else 'off'}: reference {counts['reference_ops']:6d}  engine "
                  f"{counts['engine_ops']:6d} ({counts['engine_triton']} Triton)  = {100 * ratio:5.1f}%"
                  + ("" if goal is None else f" (goal <= {100 * goal:.0f}%)"), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        seconds = round(time.time() - started, 1)
        if args.family is not None and args.out.exists():  # keep the other families' rows (and the file's run details)
            result = json.loads(args.out.read_text())
            result["rows"] = [r for r in result["rows"] if r["family"] != args.family] + rows
            result[f"{args.family}_seconds"] = seconds
        else:
            result = dict(
                method=__doc__.split("\n\n")[1].replace("\n", " "), engine_dtype=str(ENGINE_DTYPE).removeprefix("torch."),
                torch=torch.__version__, python=platform.python_version(), seconds=seconds, rows=rows,
            )
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
