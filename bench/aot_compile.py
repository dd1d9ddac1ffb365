"""Ahead-of-time compile gate for the Triton kernels, on a CPU (the triton wheel ships ptxas).

The sweep is what the Engine launches: every configuration ``bench/engine_launches.py`` recorded while running the
Engine (fake tensors) for every family, preset shape class, bucket, dtype and setting (``engine_launches.json``),
plus the launchers' own ranges (VAR d16..d36, V = 4096; B in {1, 16, 64}; every scale; fp32/bf16/fp16; SSG prior
on/off; top-k/top-p on/off; the VAE decoders' GroupNorm + SiLU at every level) derived by their ``*_launch`` functions on meta tensors. Both are specialized exactly
as ``JITFunction.run`` would (``ssg_engine.kernels.launch_config``: do_not_specialize, pointer alignment), deduped
and compiled to cubin for each ``--arch``. Per compiled configuration it records the registers, local memory
on/off; top-k/top-p on/off; the block GEMMs of VAR and of Infinity-2B's 1M schedule) derived by their ``*_launch``
functions on meta tensors. Both are specialized exactly as ``JITFunction.run`` would
(``ssg_engine.kernels.launch_config``: do_not_specialize, pointer alignment), deduped and compiled to cubin for
each ``--arch``. Per compiled configuration it records the registers, local memory
(spills; ptxas puts them in the stack frame), shared memory, SASS instruction count and compile seconds. Exits 1
when a configuration fails to compile, spills, or needs more shared memory than the arch has.

    python bench/engine_launches.py --out bench/results/aot                      # the Engine's launches
    python bench/aot_compile.py --arch 80 90 --out bench/results/aot --jobs 2    # everything (minutes)
    python bench/aot_compile.py --arch 90 --quick --out /tmp/aot                 # one configuration per kernel

Each compile also lands in Triton's cache, so a JIT launch with the same compile key on that arch loads it
(``bench/device_check.sh`` precompiles this way, ``--jobs 16``, before timing).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # the interpreter's kernel objects cannot be compiled
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # honest compile seconds, never a cache hit

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import itertools  # noqa: E402
import multiprocessing  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, Iterator, List, Optional, Sequence, Tuple  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from ssg_engine.families.var.config import ModelConfig  # noqa: E402
from ssg_engine.guidance import cfg_ratio  # noqa: E402
from ssg_engine.families.infinity.model import INFINITY_PRESETS, scale_schedule  # noqa: E402
from ssg_engine.kernels import KernelLaunch, config_key, launch_config  # noqa: E402
from ssg_engine.kernels.group_norm_silu import group_norm_silu_launch  # noqa: E402
from ssg_engine.kernels.ada_ln_modulate import ada_ln_modulate_launch  # noqa: E402
from ssg_engine.kernels.guide_sample_bits import guide_sample_bits_launch  # noqa: E402
from ssg_engine.kernels.qkv_norm_rope_cache import qkv_norm_rope_cache_launch  # noqa: E402
from ssg_engine.kernels.matmul_gated_residual import matmul_gated_residual_launch  # noqa: E402
from ssg_engine.kernels.matmul_gelu import matmul_gelu_launch  # noqa: E402
from ssg_engine.kernels.sampling import sample_logits_launch  # noqa: E402
from ssg_engine.kernels.ssg_guidance import ssg_guidance_launch  # noqa: E402
from ssg_engine.families.infinity.model import INFINITY_PRESETS, scale_schedule  # noqa: E402

PRESETS = ("d16", "d20", "d24", "d30", "d36")
BATCHES = (1, 16, 64)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# Max shared memory per thread block (bytes), CUDA C++ Programming Guide, "Technical Specifications
# per Compute Capability": https://docs.nvidia.com/cuda/cuda-c-programming-guide/#features-and-technical-specifications
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclasses.dataclass(frozen=True)
class Case:
    """One launch the engine makes: a kernel at one scale of one model, batch, dtype and setting."""

    kernel: str
    preset: str
    batch: int
    dtype: str
    setting: str  # "ssg" / "no ssg" (guidance), "top-k+top-p" ... (sampling)
    scale: int
    launch: KernelLaunch

    @property
    def bucket(self) -> Tuple[str, str, int, str, str]:
        """The launches one CUDA graph of the engine holds (all scales of one batch bucket)."""
        return self.kernel, self.preset, self.batch, self.dtype, self.setting

    def describe(self) -> str:
        return f"{self.preset} B={self.batch} scale {self.scale} {self.dtype} {self.setting}"


def guidance_cases(presets: Sequence[str], batches: Sequence[int], dtypes: Sequence[torch.dtype]) -> Iterator[Case]:
    """``ssg_guidance`` as the engine calls it: prior from scale 1 on when SSG is on, never when off; cfg and beta
    as numbers (eager) or as 0-d device tensors (what a captured graph passes, so a cfg/beta change replays it)."""
    scalar = torch.empty((), dtype=torch.float32, device="meta")
    for preset in presets:
        cfg = ModelConfig.preset(preset)
        pns = cfg.patch_nums
        for batch in batches:
            for dtype in dtypes:
                for ssg, graph in itertools.product((False, True), (False, True)):
                    setting = ("ssg" if ssg else "no ssg") + (" graph" if graph else "")
                    for si, pn in enumerate(pns):
                        logits = torch.empty(2 * batch, pn * pn, cfg.V, dtype=dtype, device="meta")
                        prev = operator = None
                        if ssg and si > 0:
                            prev = torch.empty(batch, pns[si - 1] ** 2, cfg.V, dtype=dtype, device="meta")
                            operator = torch.empty(pn * pn, pns[si - 1] ** 2, device="meta")
                        t, beta = (scalar, scalar if operator is not None else 0.0) if graph else (cfg_ratio(1.5, si, len(pns)), 0.5)
                        launch, _, _ = ssg_guidance_launch(logits, prev, operator, t, beta)
                        yield Case("ssg_guidance", preset, batch, str(dtype).removeprefix("torch."), setting, si, launch)


def sampling_cases(presets: Sequence[str], batches: Sequence[int], dtypes: Sequence[torch.dtype]) -> Iterator[Case]:
    """``sample_logits`` on each scale's (B * pn^2, V) logits, with top-k 900 / top-p 0.96 on or off."""
    seed = torch.zeros(1, dtype=torch.int64, device="meta")
    for preset in presets:
        cfg = ModelConfig.preset(preset)
        for batch in batches:
            for dtype in dtypes:
                for top_k, top_p in ((0, 0.0), (900, 0.0), (0, 0.96), (900, 0.96)):
                    setting = "+".join(name for name, on in (("top-k", top_k), ("top-p", top_p)) if on) or "plain"
                    for si, pn in enumerate(cfg.patch_nums):
                        logits = torch.empty(batch * pn * pn, cfg.V, dtype=dtype, device="meta")
                        launch, _ = sample_logits_launch(logits, top_k, top_p, 1.0, seed, seed)
                        yield Case("sample_logits", preset, batch, str(dtype).removeprefix("torch."), setting, si, launch)


def _qkv_case(kind: str, preset: str, batch: int, dtype: torch.dtype, heads: int, dim: int, depth: int,
              scales: Sequence[int], si: int, normalize: bool, rope: bool) -> Case:
    """``qkv_norm_rope_cache_`` of the last layer of a ``depth``-layer cache at scale ``si`` (l = scales[si] tokens)
    of 2B rows."""
    l, start, total = scales[si], sum(scales[:si]), sum(scales)
    qkv = torch.empty(2 * batch, l, 3 * heads * dim, dtype=dtype, device="meta")
    cache = torch.empty(depth, 2 * batch, heads, total, dim, dtype=dtype, device="meta")
    scale = torch.empty(1, heads, 1, 1, device="meta") if normalize else None
    tables = (torch.empty(l, dim // 2, device="meta"),) * 2 if rope else None
    launch, _ = qkv_norm_rope_cache_launch(qkv, cache, torch.empty_like(cache), depth - 1, start,
                                           num_heads=heads, scale_mul=scale, rope=tables)
    setting = "l2 norm + rope" if rope else "l2 norm" if normalize else "plain"
    return Case(kind, preset, batch, str(dtype).removeprefix("torch."), setting, si, launch)


def qkv_norm_rope_cache_cases(presets: Sequence[str], batches: Sequence[int], dtypes: Sequence[torch.dtype],
                              infinity_presets: Sequence[str] = tuple(INFINITY_PRESETS),
                              cache_layers: Optional[int] = None) -> Iterator[Case]:
    """The QKV epilogue at every scale: VAR presets (D = 64) with and without ``attn_l2_norm``; Infinity presets
    (D = 96 .. 128) with L2 norm and RoPE on the 1M square schedule (13 scales up to 64 x 64); 2B rows. The cache
    holds the model's depth of layers, or ``cache_layers``: the layer index is not specialized, so a shallow cache
    compiles to the same binary (``aot_vs_jit`` materialises those: Infinity-2B's whole cache at B=64 is 176 GB)."""
    for preset in presets:
        cfg = ModelConfig.preset(preset)
        scales = [pn * pn for pn in cfg.patch_nums]
        for batch, dtype, normalize, si in itertools.product(batches, dtypes, (True, False), range(len(scales))):
            yield _qkv_case("qkv_norm_rope_cache", preset, batch, dtype, cfg.num_heads, cfg.embed_dim // cfg.num_heads,
                            cache_layers or cfg.depth, scales, si, normalize, False)
    scales = [h * w for h, w in scale_schedule(1.0, "1M")]
    for preset in infinity_presets:
        cfg = INFINITY_PRESETS[preset]
        for batch, dtype, si in itertools.product(batches, dtypes, range(len(scales))):
            yield _qkv_case("qkv_norm_rope_cache", preset, batch, dtype, cfg.num_heads, cfg.head_dim,
                            cache_layers or cfg.depth, scales, si, True, True)
# GroupNorm (+ SiLU) shapes of the VAE decoders, (channels, groups, H = W) per level: VAR's VQ-VAE (ch 160, mults
# 1,1,2,2,4, 32 groups) at 256 px from its 16x16 latent; Infinity's BSQ VAE (base 128, mults 1,2,4,4,4, 32 groups) at
# 1024 px from 64x64, and the 24-group Normalize of channel counts that 32 does not divide.
GN_SHAPES = {
    "vqvae": [(640, 32, 16), (640, 32, 32), (320, 32, 32), (320, 32, 64), (320, 32, 128), (160, 32, 128), (160, 32, 256)],
    "bsq": [(512, 32, 64), (512, 32, 128), (512, 32, 256), (256, 32, 512), (128, 32, 512), (128, 32, 1024), (48, 24, 64)],
}


def group_norm_silu_cases(batches: Sequence[int], dtypes: Sequence[torch.dtype]) -> Iterator[Case]:
    """``group_norm_silu`` at every decoder level, channels-last (the Engine's VAE) and NCHW, silu and plain (the
    attention blocks' norm); ``scale`` is the decoder level's index in ``GN_SHAPES``."""
    for model, shapes in GN_SHAPES.items():
        for batch in batches:
            for dtype in dtypes:
                for fmt, act in itertools.product((torch.channels_last, torch.contiguous_format), ("silu", "none")):
                    setting = f"{'channels_last' if fmt == torch.channels_last else 'nchw'} {act}"
                    for level, (c, groups, hw) in enumerate(shapes):
                        x = torch.empty(batch, c, hw, hw, dtype=dtype, device="meta").contiguous(memory_format=fmt)
                        weight = torch.empty(c, dtype=dtype, device="meta")
                        launch, _ = group_norm_silu_launch(x, weight, weight, groups, 1e-6, act)
                        yield Case("group_norm_silu", model, batch, str(dtype).removeprefix("torch."), setting, level, launch)
def ada_ln_modulate_cases(presets: Sequence[str], batches: Sequence[int], dtypes: Sequence[torch.dtype],
                          infinity_presets: Sequence[str] = tuple(INFINITY_PRESETS)) -> Iterator[Case]:
    """``ada_ln_modulate`` as the blocks call it, on (2B, l, C) at every scale with scale/shift the ``unbind(2)`` views
    of a (2B, 1, 6, C) modulation (the head's AdaLN: of (2B, 1, 2, C)). VAR: x, modulation and out in the engine's
    dtype. Infinity (1M schedule, square): float32 residual stream and modulation (autocast off), out float32 (as
    ``ada_layer_norm``) or the engine's dtype (what the next linear reads under autocast)."""
    from ssg_engine.families.infinity.model import InfinityConfig, scale_schedule

    def launches(C: int, batch: int, x_dtype: torch.dtype, out_dtype: torch.dtype, ls: Sequence[int]) -> Iterator[Tuple[str, int, KernelLaunch]]:
        # (gamma1, gamma2, scale1, scale2, shift1, shift2) of a block; (scale, shift) of the head
        for chunks, (i_scale, i_shift), what in ((6, (2, 4), "block"), (2, (0, 1), "head")):
            mod = torch.empty(2 * batch, 1, chunks, C, dtype=x_dtype, device="meta")
            for si, l in enumerate(ls):
                x = torch.empty(2 * batch, l, C, dtype=x_dtype, device="meta")
                launch, _ = ada_ln_modulate_launch(x, mod[:, :, i_scale], mod[:, :, i_shift], 1e-6, out_dtype)
                yield what, si, launch

    for preset in presets:
        cfg = ModelConfig.preset(preset)
        for batch, dtype in itertools.product(batches, dtypes):
            for what, si, launch in launches(cfg.embed_dim, batch, dtype, dtype, [pn * pn for pn in cfg.patch_nums]):
                yield Case("ada_ln_modulate", preset, batch, str(dtype).removeprefix("torch."), what, si, launch)
    ls = [h * w for h, w in scale_schedule(1.0, "1M")]
    for preset in infinity_presets:
        C = InfinityConfig.preset(preset).embed_dim
        for batch, out_dtype in itertools.product(batches, dtypes):
            for what, si, launch in launches(C, batch, torch.float32, out_dtype, ls):
                yield Case("ada_ln_modulate", preset, batch, f"float32->{str(out_dtype).removeprefix('torch.')}", what, si, launch)
def _block_linears(name: str, dtype: torch.dtype, residual_dtype: torch.dtype, rows: int, tokens: int, C: int,
                   hidden: int, setting: str, scale: int) -> Iterator[Case]:
    """The three linears of one transformer block on (rows = 2B, tokens, C) activations: fc1 + GELU, then the
    out-projection and fc2 with their gated residual; gamma is a ``mod.unbind(2)`` view of the (2B, 1, 6, C)
    modulation, bias in the linears' dtype."""
    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    dt = str(dtype).removeprefix("torch.")
    gamma = t(rows, 1, 6, C, dt=residual_dtype).unbind(2)[1]
    launch, _ = matmul_gelu_launch(t(rows, tokens, C), t(hidden, C), t(hidden))
    yield Case("matmul_gelu", name, rows // 2, dt, setting, scale, launch)
    for k in (C, hidden):  # out-projection, fc2
        launch, _ = matmul_gated_residual_launch(t(rows, tokens, C, dt=residual_dtype), t(rows, tokens, k), t(C, k), t(C), gamma)
        yield Case("matmul_gated_residual", name, rows // 2, dt, setting + f" K={k}", scale, launch)


def matmul_cases(presets: Sequence[str], batches: Sequence[int], dtypes: Sequence[torch.dtype]) -> Iterator[Case]:
    """``matmul_gelu`` / ``matmul_gated_residual`` at every scale of the VAR ``presets`` (residual in the model's
    dtype) and of Infinity-2B's 1M square schedule (bf16 linears, float32 residual and modulation, as under the
    Engine's autocast), 2B rows of tokens."""
    for preset in presets:
        cfg = ModelConfig.preset(preset)
        C = cfg.embed_dim
        for batch, dtype, (si, pn) in itertools.product(batches, dtypes, enumerate(cfg.patch_nums)):
            yield from _block_linears(preset, dtype, dtype, 2 * batch, pn * pn, C, round(C * cfg.mlp_ratio), "var block", si)
    cfg = INFINITY_PRESETS["infinity_2b"]
    for batch, (si, (h, w)) in itertools.product(batches, enumerate(scale_schedule(1.0, "1M"))):
        yield from _block_linears("infinity_2b", torch.bfloat16, torch.float32, 2 * batch, h * w, cfg.embed_dim,
                                  cfg.ffn_hidden, "infinity block", si)


def quick_cases() -> List[Case]:
    """d16's last scale at B=64, fp32, prior and top-k + top-p on; the sampler on Infinity-2B's last 1M scale
    (64 x 64 tokens x 32 bits, rows of V = 2, B=1, top-p on), the configuration with the most rows per program; and
    the fused bit sampler on that scale (prior, CFG, top-k + top-p); the QKV epilogue of Infinity-2B's last scale
    (L2 norm + RoPE, D = 128, bf16, B=1: its largest tile; at B=64 the cache's layer stride needs int64, a binary
    whose launch ``aot_vs_jit`` could not materialise on a CPU); the AdaLN kernel on d30's last scale at B=64, bf16
    (C = 1920: masked BLOCK_C = 2048, the most x values per thread); GroupNorm + SiLU on the VQ-VAE's last level;
    fc1 + GELU at Infinity-2B's last scale (bf16, the large tiles) and fc2 + gated residual at VAR-d16's first scale
    in fp32 (the small tiles)."""
    guidance = [c for c in guidance_cases(["d16"], [64], [torch.float32]) if c.setting == "ssg"]
    sampling = [c for c in sampling_cases(["d16"], [64], [torch.float32]) if c.setting == "top-k+top-p"]
    seed = torch.zeros(1, dtype=torch.int64, device="meta")
    bits = torch.empty(64 * 64 * 32, 2, device="meta")
    launch, _ = sample_logits_launch(bits, 0, 0.96, 1.0, seed, seed)
    logits = torch.empty(2, 64 * 64, 64, device="meta")  # Infinity-2B's last 1M scale with its prior (48 x 48), CFG
    prev, operator = torch.empty(1, 48 * 48, 64, device="meta"), torch.empty(64 * 64, 48 * 48, device="meta")
    fused, _ = guide_sample_bits_launch(logits, prev, operator, 3.0, 0.5, 900, 0.97, 1.0, seed, seed)
    qkv = list(qkv_norm_rope_cache_cases([], [1], [torch.bfloat16], ["infinity_2b"]))
    gn = [c for c in group_norm_silu_cases([1], [torch.bfloat16]) if c.preset == "vqvae" and c.setting == "channels_last silu"]
    adaln = [c for c in ada_ln_modulate_cases(["d30"], [64], [torch.bfloat16], infinity_presets=()) if c.setting == "block"]
    # the GEMMs: fc1 + GELU at Infinity-2B's last scale, B=1 (bf16; the large-M tiles) and the fc2 gated residual at
    # VAR-d16's first scale, B=1, in fp32 (2 rows: the small-M tiles, FMA dots)
    infinity = list(matmul_cases([], [1], []))
    gemms = [next(c for c in infinity if c.scale == infinity[-1].scale and c.kernel == "matmul_gelu"),
             next(c for c in matmul_cases(["d16"], [1], [torch.float32]) if c.scale == 0 and c.setting.endswith("K=4096"))]
    return [guidance[-1], sampling[-1], Case("sample_logits", "infinity_2b", 1, "float32", "top-p", 12, launch),
            Case("guide_sample_bits", "infinity_2b", 1, "float32", "ssg", 12, fused), qkv[-1], gn[-1], adaln[-1], *gemms]


def range_cases(dtypes: Sequence[torch.dtype]) -> List[Case]:
    """The launchers' own ranges (the full enumeration besides the Engine's recorded launches)."""
    return [*guidance_cases(PRESETS, BATCHES, dtypes), *sampling_cases(PRESETS, BATCHES, dtypes),
            *qkv_norm_rope_cache_cases(PRESETS, BATCHES, dtypes), *group_norm_silu_cases(BATCHES, dtypes),
            *ada_ln_modulate_cases(PRESETS, BATCHES, dtypes), *matmul_cases(PRESETS, BATCHES, dtypes)]


def launch_key(launch: KernelLaunch) -> str:
    """Equal for launches that compile to the same binary (on every arch)."""
    return config_key(launch_config(launch))


def launcher_configs(cases: Sequence[Case]) -> Dict[str, dict]:
    """``{config_key: launch_config}`` of the launchers' own enumeration, each with the case it came from."""
    out: Dict[str, dict] = {}
    for case in cases:
        config = launch_config(case.launch)
        out.setdefault(config_key(config), {**config, "example": f"{case.kernel} {case.describe()} (launcher range)"})
    return out


def engine_configs(path: Path) -> Tuple[Dict[str, dict], Dict[str, int]]:
    """The configurations ``bench/engine_launches.py`` recorded (``{key: config}``, examples filled in) and the
    most distinct configurations of one kernel that one batch run launches (what a CUDA graph compiles), per kernel."""
    data = json.loads(path.read_text())
    configs = {key: dict(config) for key, config in data["configs"].items()}
    variants: Dict[str, int] = defaultdict(int)
    for run in data["runs"]:
        per_kernel: Dict[str, int] = defaultdict(int)
        for key in run["configs"]:
            per_kernel[configs[key]["kernel"]] += 1
            configs[key].setdefault("example", _describe_run(run))
            configs[key]["engine_runs"] = configs[key].get("engine_runs", 0) + 1
        for kernel, n in per_kernel.items():
            variants[kernel] = max(variants[kernel], n)
    return configs, dict(variants)


def _describe_run(run: dict) -> str:
    shape = f" {run['pn']} h/w={run['h_div_w']}" if run["family"] == "infinity" else ""
    return (f"Engine {run['preset']}{shape} B={run['bucket']} {run['dtype']} {'ssg' if run['ssg'] else 'no ssg'} "
            f"top_k={run['top_k']} top_p={run['top_p']} {'graph' if run['graph'] else 'eager'}")


def compile_inputs(config: dict, arch: int):
    """``(JITFunction, ASTSource, options)`` of a :func:`launch_config`, as ``JITFunction._pack_args`` builds them."""
    module, name = config["kernel"].split(":")
    kernel = getattr(importlib.import_module(module), name)
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{kernel!r} is not a JITFunction: import triton with TRITON_INTERPRET=0 (run this script as its own process)")
    backend = make_backend(GPUTarget("cuda", arch, 32))
    signature = {arg: ty for arg, ty, _ in config["args"]}
    constexprs = {(i,): spec for i, (_, ty, spec) in enumerate(config["args"]) if ty == "constexpr"}
    attrs = {(i,): backend.parse_attr(spec) for i, (_, ty, spec) in enumerate(config["args"]) if ty != "constexpr" and isinstance(spec, str)}
    options = backend.parse_options({k: config[k] for k in ("num_warps", "num_stages") if k in config}).__dict__
    return kernel, ASTSource(kernel, signature, constexprs, attrs), options


def resource_usage(cubin: Path) -> Dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's kernel (``cuobjdump -res-usage``)."""
    text = subprocess.run([str(TOOLS / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def sass_instructions(cubin: Path) -> int:
    """Number of SASS instructions (``nvdisasm`` lines with an address)."""
    text = subprocess.run([str(TOOLS / "nvdisasm"), str(cubin)], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", text, flags=re.M))


def compile_row(job: Tuple[str, dict, int]) -> dict:
    """Compile one configuration for ``sm_<arch>`` and measure; ``compiled`` is False (with ``error``) on a failure."""
    key, config, arch = job
    kernel, source, options = compile_inputs(config, arch)
    args = config["args"]
    row = {
        "kernel": kernel.__name__.strip("_"), "arch": arch, "num_warps": config["num_warps"],
        "num_stages": config.get("num_stages"), "key": key,
        "pointers": {name: ty for name, ty, _ in args if ty.startswith("*")},
        "unaligned_pointers": [name for name, ty, spec in args if ty.startswith("*") and spec != "D"],
        "constexprs": {name: spec for name, ty, spec in args if ty == "constexpr" and name.isupper()},
        "specialized_to_constant": {name: spec for name, ty, spec in args if ty == "constexpr" and not name.isupper()},
        "int_args": {name: ty + ("/16" if spec == "D" else "") for name, ty, spec in args if ty[0] in "iu"},
        "example": config.get("example", ""), "engine_runs": config.get("engine_runs", 0),
    }
    start = time.perf_counter()
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:  # noqa: BLE001 - the gate reports every failure
        return {**row, "compiled": False, "error": f"{type(error).__name__}: {str(error)[:2000]}"}
    seconds = round(time.perf_counter() - start, 2)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{row['kernel']}_{arch}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = resource_usage(cubin)
        sass = sass_instructions(cubin)
    return {
        **row, "compiled": True, "registers": usage["REG"],
        "spill_bytes": usage["STACK"] + usage["LOCAL"], "stack_bytes": usage["STACK"],
        "shared_bytes": compiled.metadata.shared, "shared_limit": SHARED_LIMIT.get(arch),
        "sass_instructions": sass, "compile_seconds": seconds,
    }


def problems(row: dict) -> List[str]:
    """Why a row fails the gate (empty when it passes)."""
    if not row["compiled"]:
        return [row["error"].splitlines()[0]]
    out = []
    if row["spill_bytes"]:
        out.append(f"{row['spill_bytes']} bytes of local memory (stack frame: spills) per thread")
    if row["shared_limit"] is not None and row["shared_bytes"] > row["shared_limit"]:
        out.append(f"{row['shared_bytes']} bytes of shared memory > {row['shared_limit']}")
    return out


def compile_all(configs: Dict[str, dict], archs: Sequence[int], jobs: int = 1, log=print) -> List[dict]:
    """One row per configuration and arch, compiled in ``jobs`` processes."""
    work = [(key, config, arch) for arch in archs for key, config in configs.items()]
    rows = []
    with multiprocessing.get_context("spawn").Pool(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(compile_row, work) if pool is not None else map(compile_row, work)
        for i, row in enumerate(results):
            rows.append(row)
            state = "; ".join(problems(row)) or f"{row['registers']} regs, {row['sass_instructions']} SASS"
            log(f"[{i + 1}/{len(work)}] sm_{row['arch']} {row['kernel']} {row['constexprs']} w{row['num_warps']}: {state}")
    return rows


def markdown(rows: Sequence[dict], variants: Dict[str, int], engine_file: str) -> str:
    """Summary per kernel and arch, then one line per compiled configuration."""
    lines = ["# AOT compile of the Triton kernels", "",
             "Generated by `python bench/aot_compile.py --arch 80 90 --out bench/results/aot` (CPU, triton "
             f"{triton.__version__}) from the launches the Engine makes ({engine_file}, written by "
             "`python bench/engine_launches.py --out bench/results/aot`) plus the launchers' own ranges. "
             "spill = local memory bytes per thread, stack frame included (`cuobjdump -res-usage` STACK + LOCAL; ptxas "
             "puts spills in the stack frame), shared = Triton's shared memory per block; variants per bucket = the most "
             "configurations of the kernel one Engine batch run launches (what one CUDA graph compiles).", "",
             "| kernel | arch | configs | from the Engine | failed | max registers | spilling | max shared (B) | max SASS | variants per bucket |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for kernel in sorted({r["kernel"] for r in rows}):
        for arch in sorted({r["arch"] for r in rows}):
            sel = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch]
            ok = [r for r in sel if r["compiled"]]
            if not sel:
                continue
            n_variants = next((n for k, n in variants.items() if k.endswith(":_" + kernel)), "-")
            lines.append(
                f"| {kernel} | sm_{arch} | {len(sel)} | {sum(1 for r in sel if r['engine_runs'])} | {len(sel) - len(ok)} | "
                f"{max((r['registers'] for r in ok), default='-')} | {sum(1 for r in ok if r['spill_bytes'])} | "
                f"{max((r['shared_bytes'] for r in ok), default='-')} | {max((r['sass_instructions'] for r in ok), default='-')} | {n_variants} |"
            )
    lines += ["", "| kernel | arch | input | constexprs | warps | int args (/16 = divisible); const | unaligned pointers | regs | spill | shared | SASS | compile s | Engine runs | example |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        ints = ", ".join(f"{k}:{v}" for k, v in r["int_args"].items())
        ones = ", ".join(f"{k}={v}" for k, v in r["specialized_to_constant"].items())
        if r["compiled"]:
            res = f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | {r['sass_instructions']} | {r['compile_seconds']}"
        else:
            res = "FAILED | | | |"
        lines.append(f"| {r['kernel']} | sm_{r['arch']} | {next(iter(r['pointers'].values()))} | {consts} | {r['num_warps']} | {ints}; {ones} | "
                     f"{', '.join(r['unaligned_pointers'])} | {res} | {r['engine_runs']} | {r['example']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    ap.add_argument("--out", default="bench/results/aot", help="writes aot_kernels.json and aot_kernels.md here")
    ap.add_argument("--launches", default="bench/results/aot/engine_launches.json",
                    help="the Engine's recorded launches (bench/engine_launches.py); ignored with --quick")
    ap.add_argument("--quick", action="store_true", help="one configuration per kernel (the CI test)")
    ap.add_argument("--ranges-only", action="store_true", help="the launchers' ranges only, not the Engine's recorded launches")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    ap.add_argument("--dtypes", nargs="+", choices=[str(d).removeprefix("torch.") for d in DTYPES], default=None,
                    help="input dtypes of the launchers' ranges (default: all)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        print(f"--jobs must be >= 1; got {args.jobs}", file=sys.stderr)
        return 2
    dtypes = DTYPES if args.dtypes is None else [getattr(torch, d) for d in args.dtypes]
    variants: Dict[str, int] = {}
    if args.quick:
        configs = launcher_configs(quick_cases())
    elif args.ranges_only:
        configs = launcher_configs(range_cases(dtypes))
    else:
        launches = Path(args.launches)
        if not launches.is_file():
            print(f"--launches {launches} not found; write it with: python bench/engine_launches.py --out {launches.parent}", file=sys.stderr)
            return 2
        configs = launcher_configs(range_cases(dtypes))
        recorded, variants = engine_configs(launches)
        for key, config in recorded.items():
            configs[key] = {**configs.get(key, {}), **config}
    print(f"{len(configs)} configurations -> compiling for sm_{', sm_'.join(map(str, args.arch))} with {args.jobs} jobs", flush=True)
    rows = compile_all(configs, args.arch, args.jobs, log=lambda line: print(line, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aot_kernels.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "aot_kernels.md").write_text(markdown(rows, variants, "none" if args.quick or args.ranges_only else args.launches))
    failures = [(r, p) for r in rows for p in problems(r)]
    for r, p in failures:
        print(f"FAIL sm_{r['arch']} {r['kernel']} {r['constexprs']} ({r['example']}): {p}", file=sys.stderr)
    print(f"{len(rows)} compiled configurations, {len(failures)} problems; wrote {out}/aot_kernels.json and .md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
