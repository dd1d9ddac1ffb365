"""Record every Triton kernel configuration the Engine launches, for the AOT gate (``bench/aot_compile.py``).

Runs ``Engine.run_batch`` with the Triton backend on fake tensors (``torch._subclasses.FakeTensorMode``: real
preset shapes, no memory, no compute; each preset as a 2-layer twin, same width, heads, vocabulary and schedules,
since the depth only repeats the same per-layer launches and fake dispatch costs time per op) inside ``ssg_engine.kernels.record_launches(execute=False)``, for every family,
preset shape class, batch bucket, dtype and setting the Engine supports: SSG on/off, top-k/top-p on/off (top-k 1, as
Infinity's 2-way bits make it a switch of its own), the eager schedule (CFG/beta as numbers) and the captured
graph's (CFG/beta read from device buffers, ``engine.device_schedule``). Any kernel launched through
``KernelLaunch.run`` is recorded; nothing here lists kernels. Writes ``engine_launches.json``: the distinct
configurations (``ssg_engine.kernels.launch_config``) and, per run, the configurations it launched.

    python bench/engine_launches.py --out bench/results/aot            # every run (minutes)
    python bench/engine_launches.py --quick --out /tmp/aot             # a few runs (the CI test)

Infinity runs under ``torch.autocast`` of the fake tensors' device (CPU here, CUDA on a GPU); both autocast
policies run its linear layers, so its logits, in ``dtype`` (the only autocast-dependent kernel input). HART
(``hart_0.7b_1024px``'s shapes) runs float32, its Engine's only dtype; its ``top_k`` None is upstream's per-scale
top-k (600, then 300), its release setting.

    python bench/engine_launches.py --family hart --out bench/results/aot   # HART's runs only; the file's other
                                                                           # runs and configurations are kept
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # kernels run on CPU tensors: recording needs no GPU (and launches nothing)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, Iterator, List, Optional, Sequence, Tuple  # noqa: E402

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily  # noqa: E402

from ssg_engine.families.var.config import ModelConfig  # noqa: E402
from ssg_engine.engine import Engine, device_schedule  # noqa: E402
from ssg_engine.guidance import SSG  # noqa: E402
from ssg_engine.kernels import config_key, record_launches  # noqa: E402
from ssg_engine.loading import build_models  # noqa: E402
from ssg_engine.families.infinity.tokenizer import BSQVAE, BSQVAEConfig  # noqa: E402
from ssg_engine.families.infinity.model import INFINITY_PRESETS, RATIO_TABLE, InfinityConfig, InfinityTransformer, PaddedText, TextFeatures  # noqa: E402
from ssg_engine.families.hart.config import PRESETS as HART_PRESETS  # noqa: E402
from ssg_engine.families.hart.config import HARTTokenizerConfig  # noqa: E402
from ssg_engine.families.hart.model import HARTTransformer  # noqa: E402
from ssg_engine.families.hart.text import HARTTextFeatures  # noqa: E402
from ssg_engine.families.hart.tokenizer import HARTTokenizer  # noqa: E402
from ssg_engine.params import HARTParams, SamplingParams  # noqa: E402
from ssg_engine.pipeline import guidance_schedule  # noqa: E402

MAX_BATCH = 64
TWIN_DEPTH = 2  # layers of each preset's twin
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# (family, preset, pn, h_div_w) of each shape class. VAR: d16..d30 share the 256 px shapes (V = 4096, scales, head
# dim 64), d36 is the 512 px class. Infinity: every released preset has V = 2 (bits x 32) and its own width and heads;
# a schedule's token counts come from its aspect ratio (h/w and w/h have the same counts; smaller pixel counts run a
# prefix of the 1M schedule, the same scales).
SWEPT = (("var", "d16", "", 1.0), ("infinity", "infinity_2b", "1M", 1.0))  # every setting
CORE = (("var", "d36", "", 1.0), *(("infinity", "infinity_2b", "1M", r) for r in sorted(RATIO_TABLE) if r > 1.0))
OTHERS = (  # the default setting (bf16, B = 64, SSG, eager and graph): same shapes as above, other widths
    *(("var", preset, "", 1.0) for preset in ("d20", "d24", "d30")),
    *(("infinity", preset, "1M", 1.0) for preset in INFINITY_PRESETS if preset != "infinity_2b"),
    ("infinity", "infinity_2b", "0.06M", 1.0),
)
SHAPES = SWEPT + CORE + OTHERS
FILTERS = ((0, 0.0), (1, 0.0), (900, 0.0), (0, 0.96), (900, 0.96))  # (top_k, top_p)
DEFAULT_FILTER = (900, 0.96)
HART = ("hart", "hart_0.7b_1024px", "", 1.0)  # one shape class (V = 4096, 14 scales to 64x64)
HART_FILTERS = ((None, 0.0), (None, 0.96), (0, 0.0), (1, 0.0), (900, 0.96))  # None: upstream's top-k per scale


@dataclasses.dataclass(frozen=True)
class Run:
    """One ``run_batch`` of the Engine."""

    family: str  # "var" | "infinity" | "hart"
    preset: str
    dtype: str
    bucket: int
    ssg: bool
    top_k: Optional[int]  # HART: None = upstream's per-scale top-k
    top_p: float
    graph: bool  # the captured graph's schedule (device cfg/beta) instead of the eager one (numbers)
    pn: str = ""  # Infinity: total pixels and aspect ratio of the schedule
    h_div_w: float = 1.0

    def describe(self) -> str:
        shape = f" {self.pn} h/w={self.h_div_w}" if self.family == "infinity" else ""
        return (f"{self.preset}{shape} B={self.bucket} {self.dtype} {'ssg' if self.ssg else 'no ssg'} "
                f"top_k={self.top_k} top_p={self.top_p} {'graph' if self.graph else 'eager'}")


def hart_runs() -> List[Run]:
    """HART (float32): every bucket with SSG and upstream's filter, SSG off at B = 1 and 64, every filter at B = 64;
    eager and graph."""
    buckets = [1 << i for i in range(MAX_BATCH.bit_length())]
    settings = [(b, True, HART_FILTERS[0]) for b in buckets] + [(b, False, HART_FILTERS[0]) for b in (1, MAX_BATCH)]
    settings += [(MAX_BATCH, ssg, f) for ssg in (False, True) for f in HART_FILTERS[1:]]
    family, preset, pn, ratio = HART
    return [Run(family, preset, "float32", b, ssg, k, p, graph, pn, ratio) for (b, ssg, (k, p)), graph in itertools.product(settings, (False, True))]


def all_runs(quick: bool = False) -> List[Run]:
    """The full enumeration, or (``quick``) a few runs covering both families, eager and graph, SSG and filters."""
    if quick:
        return [
            Run("var", "d16", "bfloat16", 2, True, 900, 0.96, True),
            Run("var", "d16", "float32", MAX_BATCH, False, 900, 0.96, False),  # the sweep's float32 setting
            Run("infinity", "infinity_2b", "bfloat16", 2, True, 900, 0.96, True, "0.06M", 1.0),
            Run("infinity", "infinity_2b", "bfloat16", 1, False, 1, 0.0, False, "0.06M", 1.0),
        ]
    buckets = [1 << i for i in range(MAX_BATCH.bit_length())]
    runs: Dict[Run, None] = {}  # ordered, without repeats
    for shape in SHAPES:
        settings = [("bfloat16", MAX_BATCH, True, DEFAULT_FILTER)]
        if shape in SWEPT + CORE:  # bf16 (the default dtype) at B = 1 and 64, SSG on/off, default filter
            settings += [("bfloat16", b, ssg, DEFAULT_FILTER) for b in (1, MAX_BATCH) for ssg in (False, True)]
        if shape in SWEPT:  # every filter at B = 64, every bucket, fp16 and fp32
            settings += [("bfloat16", MAX_BATCH, ssg, f) for ssg in (False, True) for f in FILTERS]
            settings += [("bfloat16", b, True, DEFAULT_FILTER) for b in buckets]
            settings += [(d, MAX_BATCH, ssg, DEFAULT_FILTER) for d in ("float16", "float32") for ssg in (False, True)]
        for (dtype, bucket, ssg, (top_k, top_p)), graph in itertools.product(settings, (False, True)):
            family, preset, pn, ratio = shape
            runs[Run(family, preset, dtype, bucket, ssg, top_k, top_p, graph, pn, ratio)] = None
    return sorted(runs, key=lambda r: (SHAPES.index((r.family, r.preset, r.pn, r.h_div_w)), r.dtype)) + hart_runs()


@contextlib.contextmanager
def fake_tensors() -> Iterator[FakeTensorMode]:
    """Fake tensors for the block; the converter's memo holds strong references instead of weak ones, because
    ``nn.Module.to`` swaps fake parameters and ``torch.utils.swap_tensors`` refuses tensors with weak references."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # the real prior operators (see run_once)
    mode.fake_tensor_converter.meta_converter.tensor_memo = {}
    with mode:
        yield mode


def build_engine(family: str, preset: str, dtype: torch.dtype) -> Engine:
    """An Engine of the preset's shapes on fake CPU tensors (call inside :func:`fake_tensors`)."""
    with torch.device("cpu"):
        if family == "var":
            vae, model = build_models(ModelConfig.preset(preset).replace(depth=TWIN_DEPTH), device="cpu")
        elif family == "hart":
            cfg = dataclasses.replace(HART_PRESETS[preset], depth=TWIN_DEPTH)
            vae = HARTTokenizer(HARTTokenizerConfig(v_patch_nums=cfg.patch_nums), cfg.patch_nums)
            model = HARTTransformer(cfg, vae)
        else:
            cfg = dataclasses.replace(InfinityConfig.preset(preset), depth=TWIN_DEPTH, block_chunks=1)
            model, vae = InfinityTransformer(cfg), BSQVAE(BSQVAEConfig(codebook_dim=cfg.codebook_dim))
    return Engine(model, vae, max_batch=MAX_BATCH, device="cpu", dtype=dtype, cuda_graphs=False, backend="triton")


def run_once(engine: Engine, run: Run) -> None:
    """``engine.run_batch`` as ``Engine.generate`` (eager) or a captured graph (``run.graph``) calls it."""
    ssg = SSG() if run.ssg else None
    if run.family == "hart":
        with unset_fake_temporarily():  # bind checks the features' values: real, small (a 7-token prompt, padded)
            mask = torch.zeros(run.bucket, engine.model.context_token, dtype=torch.bool)
            mask[:, :7] = True
            text = HARTTextFeatures(torch.zeros(run.bucket, engine.model.context_token, engine.model.context_embed.in_features), mask)
            model, cond, params = engine.bind(text, HARTParams(cfg=4.5, top_k=run.top_k, top_p=run.top_p, ssg=ssg))
    elif run.family == "infinity":
        params = SamplingParams(top_k=run.top_k, top_p=run.top_p, ssg=ssg)
        with unset_fake_temporarily():  # bind checks the features' values (finite): real, small
            text = TextFeatures(torch.zeros(7 * run.bucket, engine.model.Ct5), [7] * run.bucket)
            model, cond, params = engine.bind(text, params, pn=run.pn, h_div_w=run.h_div_w)
        if run.graph:  # what Engine.bind gives a graph-capturing engine
            cond = PaddedText.pad(cond, engine.model.config.text_maxlen)
    else:
        params = SamplingParams(top_k=run.top_k, top_p=run.top_p, ssg=ssg)
        model, cond = engine.model, torch.zeros(run.bucket, dtype=torch.long)  # bind checks label values: no data here
    if params.ssg is not None:  # prior operators are built from data (DCT, nonzero): build them (cached) for real
        with unset_fake_temporarily():
            guidance_schedule(0.0, params.ssg, model.scale_sizes(), engine.device)
    seed = torch.zeros(1, dtype=torch.long)
    schedule = None
    if run.graph:
        template = guidance_schedule(0.0, params.ssg, model.scale_sizes(), engine.device, cfg_ts=engine._cfg_ts(model, params))
        schedule = device_schedule(template, torch.zeros(len(template)), torch.zeros(len(template)))
    engine.run_batch(cond, seed, params, model=model, schedule=schedule)


def record(runs: Sequence[Run], log=print) -> Dict[str, object]:
    """``{"configs": {key: launch_config}, "runs": [{**run, "launches": n, "configs": [key, ...]}]}``."""
    configs: Dict[str, dict] = {}
    rows = []
    engines: Dict[Tuple[str, str, str], Engine] = {}
    with fake_tensors():
        for i, run in enumerate(runs):
            engine_key = (run.family, run.preset, run.dtype)
            if engine_key not in engines:
                engines.clear()  # one engine at a time
                engines[engine_key] = build_engine(run.family, run.preset, DTYPES[run.dtype])
            with record_launches(execute=False) as recorder:
                run_once(engines[engine_key], run)
            keys = [config_key(c) for c in recorder.configs]
            configs.update(zip(keys, recorder.configs))
            rows.append({**dataclasses.asdict(run), "launches": len(keys), "configs": sorted(set(keys))})
            log(f"[{i + 1}/{len(runs)}] {run.describe()}: {len(keys)} launches, {len(set(keys))} configurations")
    return {"configs": dict(sorted(configs.items())), "runs": rows}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/aot", help="writes engine_launches.json here")
    ap.add_argument("--quick", action="store_true", help="a few runs (the CI test)")
    ap.add_argument("--family", choices=["var", "infinity", "hart"], default=None,
                    help="this family's runs only; the existing engine_launches.json's other runs and configurations are kept")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    runs = [r for r in all_runs(args.quick) if args.family in (None, r.family)]
    result = record(runs, log=lambda line: print(line, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.family is not None and (out / "engine_launches.json").exists():
        kept = json.loads((out / "engine_launches.json").read_text())
        kept_runs = [r for r in kept["runs"] if r["family"] != args.family]
        configs = {key: kept["configs"][key] for r in kept_runs for key in r["configs"]}
        result = {"configs": dict(sorted({**configs, **result["configs"]}.items())), "runs": kept_runs + result["runs"]}
    (out / "engine_launches.json").write_text(json.dumps(result, indent=1) + "\n")
    launches = sum(r["launches"] for r in result["runs"])
    print(f"{len(result['runs'])} runs, {launches} launches, {len(result['configs'])} distinct configurations "
          f"({time.perf_counter() - start:.0f} s); wrote {out}/engine_launches.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
