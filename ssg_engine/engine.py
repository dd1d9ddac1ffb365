"""The fast sampling engine: a static KV cache, conditioning once per batch, fused per-scale ops, no host sync
inside the loop, and on CUDA the whole scale loop + decode captured as a CUDA graph per batch-size bucket (and per
what a request's graph bakes in, e.g. Infinity's schedule; the cfg/temperature values are device tensors).

One Engine for every model family (:mod:`ssg_engine.models.family`): what differs (the copy it samples with, autocast,
how a request binds, its condition's static shapes, its memory check) is the family's registry entry
(:class:`ssg_engine.families.FamilySpec`) and its request's methods; this module imports no family. It drives the
model through the same :func:`ssg_engine.pipeline.run_scales` as the reference samplers, so it computes the same
logits; only the randomness differs (Philox from a seed tensor instead of a ``torch.Generator``), and greedy sampling
(``top_k=1``) gives the same tokens.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from . import ops
from .backend import resolve_backend
from .families import DEFAULT_FAMILY, FamilySpec, all_families, family, family_of, split_keywords
from .guidance import cfg_ratio
from .kv_cache import StaticKVCache
from .models.family import NextScaleModel
from .params import SamplingParams, check_seed
from .pipeline import Guidance, ScaleGuidance, guidance_schedule, nonfinite_logits_error, resolve_params, run_scales
from .seeding import RowSeeds, check_row_seeds
from .validation import as_number

# a batch's condition as run_batch takes it (the family's engine_bind makes it): labels (n,), or a family's condition
# object (text features: packed for eager runs, or in static shapes for CUDA graphs), see FamilySpec
Cond = Union[torch.Tensor, Any]


def batch_buckets(max_batch: int) -> List[int]:
    """Batch sizes a request is padded up to: powers of two below ``max_batch``, then ``max_batch``."""
    return [1 << i for i in range(math.ceil(math.log2(max_batch))) if (1 << i) < max_batch] + [max_batch]


def graph_key(params: SamplingParams, num_scales: int) -> tuple:
    """What a captured graph bakes in: the sampler's filters and which scales run SSG with which prior.
    cfg and the beta values are device tensors refilled before each replay (no new capture)."""
    ssg = params.ssg
    ssg_key = None if ssg is None else (ssg.prior, ssg.interp, ssg.prior_source, tuple(b != 0.0 for b in ssg.step_betas(num_scales)))
    return params.top_k, params.top_p, params.temperature, ssg_key


def check_family(model: Any, vae: Any, where: str) -> FamilySpec:
    """The spec of ``model``'s family (:mod:`ssg_engine.families`); ``TypeError`` naming ``where`` unless (model, vae)
    is that family's pair, e.g. (VARTransformer, VQVAE) or (InfinityTransformer, BSQVAE). A model of no family is
    checked as ``DEFAULT_FAMILY``'s (its message says what a sampler takes)."""
    spec = family_of(model) or family(DEFAULT_FAMILY)
    other = next((o for o in all_families() if o is not spec and o.owns_tokenizer and o.owns_tokenizer(vae)), None)
    if other is not None:  # another family's tokenizer (HART's subclasses VAR's VQVAE)
        raise TypeError(f"{where}: {type(vae).__name__} is a {other.title} tokenizer; a {spec.kind} model takes its own "
                        f"(load the pair with {spec.loader_name})")
    spec.check_pair(model, vae, where)
    return spec


def _rows(cond: Cond) -> int:
    return cond.shape[0] if torch.is_tensor(cond) else cond.batch


def _take(cond: Optional[Cond], rows: slice) -> Optional[Cond]:
    """Rows ``rows`` (a step-1 slice) of ``cond``."""
    return None if cond is None else cond[rows]


def _pad_rows(cond: Cond, b: int) -> Cond:
    """``cond`` padded to ``b`` rows (labels 0; a family's condition: its ``pad_rows``, e.g. empty prompts)."""
    if _rows(cond) == b:
        return cond
    if torch.is_tensor(cond):
        return torch.cat((cond, cond.new_zeros(b - cond.shape[0])))
    return cond.pad_rows(b)


def _tensors(cond: Cond) -> Tuple[torch.Tensor, ...]:
    """The tensors a captured graph's static buffers for ``cond`` are refilled from."""
    return (cond,) if torch.is_tensor(cond) else tuple(cond.tensors())


def _static(cond: Cond, device: torch.device) -> Cond:
    """A buffer of ``cond``'s shapes on ``device`` for a captured graph (refilled from :func:`_tensors` before each replay)."""
    return torch.empty_like(cond, device=device) if torch.is_tensor(cond) else cond.static_like(device)


def _request_key(model: NextScaleModel) -> tuple:
    """What a captured graph bakes in of a bound request (its ``graph_key()``: Infinity's schedule and where CFG
    applies, HART's top-k per scale and diffusion settings; VAR: nothing). The numbers a replay refills are not in it."""
    return model.graph_key() if hasattr(model, "graph_key") else ()


class Engine:
    """Batch sampler for a loaded model pair: (VARTransformer, VQVAE), (InfinityTransformer, BSQVAE) or
    (HARTTransformer, HARTTokenizer) (float32, or float16 / bfloat16 autocast as Infinity; its request from the
    family's ``FamilySpec.engine_bind``:
    :class:`ssg_engine.families.hart.request.HARTRequest`, its MaskGIT passes, diffusion head and ``more_smooth``
    soft embeddings inside the loop and the graph, their random numbers from the seed tensor; text features and
    ``HARTParams``, ``more_smooth=``, ``num_maskgit_iters=``, ``residual=``).

    ``Engine(model, vae, max_batch=64, device="cuda", dtype=torch.bfloat16, cuda_graphs=True, backend="auto",
    device_memory=None)``;
    ``engine.generate(cond, params)`` (or keyword overrides: ``cfg=``, ``seed=``, ``ssg=`` ...; for Infinity also
    ``h_div_w=``, ``pn=``, ``schedule=``, ``negative=``, ``cfg_insertion_layer=``, ``cfg_list=``, ``tau_list=``) returns
    ``images (B, 3, H, W)`` in [0, 1] and the tokens per scale (VAR: (B, pn^2) int64; Infinity: bits (B, h*w, d) uint8).
    ``backend="auto"`` runs the fused Triton kernels on CUDA and the PyTorch references elsewhere (``"triton"`` runs
    the kernels on the CPU interpreter too, with ``TRITON_INTERPRET=1``). Requests larger than ``max_batch`` are split (chunk ``i`` uses seed ``seed + i``); each chunk is padded up to
    a bucket (``batch_buckets``). ``engine.generate(cond, params, row_seeds=...)`` seeds each image row on its own
    (:mod:`ssg_engine.seeding`: the kernels read ``seed[row]``), so an image does not depend on its batch, the
    chunking or the padding.

    Memory follows the batches in use: the KV cache is allocated for the largest (rows, tokens) used so far (never
    for ``max_batch`` up front; ``kv_cache_bytes()``), and at most ``max_graphs`` captured graphs are kept
    (least recently used dropped), all in one shared memory pool. The reference backend syncs the host, so it
    runs without graphs. VAR runs in ``dtype``; its VQ-VAE decodes in ``vae_dtype`` (default: ``dtype``),
    channels-last, inside the captured graph, its quantizer keeping the accumulated latent in float32. Infinity and
    HART sample with ``model.inference_copy(dtype, device)`` (``self.model``; the model given stays
    ``self.source_model``, as it is): their linear weights cast once to ``dtype``, the rest float32 as upstream, run
    under ``torch.autocast(dtype)`` with no weight re-cast per scale; KV cache in ``dtype``. What a family gets is its
    registry entry's (``FamilySpec.engine_prepare``, ``engine_autocast``, ``engine_dtypes``, ``engine_bind``, ...):
    this module names no family. Batches of a family with a memory check (``FamilySpec.engine_check_memory``:
    Infinity's plan, :func:`ssg_engine.memory.infinity_plan`) are checked before anything is allocated: a bucket that
    does not fit ``device_memory`` bytes (default: the CUDA device's total; None on CPU, no check) is one
    ``ValueError`` naming the largest ``max_batch`` that fits.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        vae: torch.nn.Module,
        max_batch: int = 64,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.bfloat16,
        cuda_graphs: bool = True,
        backend: str = "auto",
        max_graphs: int = 8,
        vae_dtype: Optional[torch.dtype] = None,
        device_memory: Optional[int] = None,
    ) -> None:
        self.spec = check_family(model, vae, "Engine(var, vae)")
        if not (self.spec.engine and self.spec.engine_prepare and self.spec.engine_bind):  # a family registers all three
            raise TypeError(f"Engine: there is no {self.spec.title} Engine yet; use ssg_engine.generate (its reference sampler)")
        self.source_model = model  # the model given (Infinity samples with a copy in dtype: self.model)
        self.max_batch = as_number(max_batch, "max_batch", "a positive integer", integer=True, valid=lambda v: v > 0)
        self.max_graphs = as_number(max_graphs, "max_graphs", "a positive integer", integer=True, valid=lambda v: v > 0)
        if device_memory is not None:
            device_memory = as_number(device_memory, "device_memory", "a positive integer (bytes)", integer=True, valid=lambda v: v > 0)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if backend == "auto" and self.device.type != "cuda":
            # the CPU interpreter runs the fused kernels ~100x slower than eager PyTorch: "auto" is the reference off
            # CUDA (backend="triton" runs the kernels there, as the tests of the fused path do)
            backend = "reference"
        self.backend = resolve_backend(backend, self.device)  # an unknown or unusable backend fails here
        if self.spec.engine_dtypes and str(dtype).removeprefix("torch.") not in self.spec.engine_dtypes:
            raise ValueError(f"dtype: the {self.spec.title} Engine runs at {', '.join(self.spec.engine_dtypes)}; got {dtype}")
        self.dtype = dtype
        self.model, self.vae = self.spec.engine_prepare(model, vae, self.device, dtype, vae_dtype)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and self.backend == "triton"
        if device_memory is None and self.device.type == "cuda":
            device_memory = torch.cuda.get_device_properties(self.device).total_memory
        self.device_memory = device_memory
        self.buckets = batch_buckets(self.max_batch)
        num_scales = self.spec.engine_scales(self.model) if self.spec.engine_scales else len(self.model.scale_sizes())
        self.offsets = [torch.tensor([si], dtype=torch.long, device=self.device) for si in range(num_scales)]
        self._kv: Optional[StaticKVCache] = None
        self._graphs: "collections.OrderedDict[tuple, _StaticBatch]" = collections.OrderedDict()
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None  # one memory pool for all graphs

    # ------------------------------------------------------------------ public
    def kv_cache_bytes(self) -> int:
        """Bytes of KV cache held now (0 before the first batch)."""
        return 0 if self._kv is None else int(self._kv.nbytes())

    def bind(self, cond: Any, params: SamplingParams, **family: Any) -> Tuple[NextScaleModel, Cond, SamplingParams]:
        """What :meth:`run_batch` takes for a request (the family's ``FamilySpec.engine_bind``): the model bound to it
        (VAR: itself; Infinity: an ``InfinityRequest``, ``family`` = the Infinity keywords; HART: a ``HARTRequest``),
        the condition (labels (n,), or text: packed) on the device, or with CUDA graphs on the host (in static shapes:
        Infinity's text padded to ``text_maxlen``) until a captured batch stages it, and the params the sampler applies
        (Infinity: temperature 1, as ``params.temperature`` becomes ``tau_list``, applied before CFG)."""
        # with graphs the condition stays on the host until a captured batch stages it (pinned, non-blocking)
        home = torch.device("cpu") if self.cuda_graphs else self.device
        return self.spec.engine_bind(self.model, self.vae, cond, params, home, self.cuda_graphs, **family)

    @torch.no_grad()
    def generate(
        self, cond: Any, params: Optional[SamplingParams] = None, *, row_seeds: Optional[RowSeeds] = None, **overrides: Any
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Sample one image per label (VAR) or prompt (Infinity: text features, anything ``TextFeatures.coerce``
        takes). Non-finite logits raise ``NonFiniteLogitsError`` naming the first bad scale, checked once after all
        chunks (the only host sync of the call).

        ``row_seeds``: one int64 key per image row ((B,) tensor or ints, e.g. ``ssg_engine.seeding.row_seeds(seed,
        B)``): row b draws only from ``row_seeds[b]`` (``params.seed`` unused); None: per-batch draws from
        ``params.seed`` (chunk ``i``: ``seed + i``)."""
        family = split_keywords(overrides, self.spec)
        resolve = self.spec.resolve_params or resolve_params
        model, cond_t, params = self.bind(cond, resolve(params, overrides, self.model), **family)
        keys = check_row_seeds(row_seeds, _rows(cond_t))
        chunks = range(0, _rows(cond_t), self.max_batch)
        seed = check_seed(params.seed, count=len(chunks)) or 0
        images, tokens, nonfinite = [], [], []
        for i, start in enumerate(chunks):
            rows = slice(start, start + self.max_batch)
            chunk_model = model.take_rows(rows) if hasattr(model, "take_rows") else model
            chunk_seed = torch.tensor([seed + i]) if keys is None else keys[rows]
            img, tok, bad = self._run_chunk(chunk_model, _take(cond_t, rows), params, chunk_seed)
            images.append(img)
            tokens.append(tok)
            nonfinite.append(bad)
        bad_scales = torch.stack(nonfinite).any(0).nonzero()
        if bad_scales.numel():
            si = int(bad_scales[0, 0])
            raise nonfinite_logits_error(si, model.scale_sizes()[si])
        return torch.cat(images), [torch.cat([t[k] for t in tokens]) for k in range(len(tokens[0]))]

    @torch.inference_mode()
    def run_batch(
        self,
        cond: Cond,
        seed: torch.Tensor,
        params: SamplingParams,
        *,
        model: Optional[NextScaleModel] = None,
        schedule: Optional[List[ScaleGuidance]] = None,
        forced_tokens: Optional[List[torch.Tensor]] = None,
        forced_gumbels: Optional[List[torch.Tensor]] = None,
        record_logits: bool = False,
    ) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """The whole sampling loop for a condition of b rows (see :meth:`bind`: ``model``, ``cond`` and ``params``;
        ``model`` defaults to the VAR) with a seed tensor (1,) int64 on the device, or (b,): one key per image row
        (per-row seeding; CFG's unconditional rows use their image row's); no host sync with the Triton backend.
        Runs in inference mode (no autograd bookkeeping); callers get copies made outside it.

        Returns images, tokens and a (K,) bool device tensor: True for scales whose logits (after CFG, SSG and
        temperature) are not all finite. ``schedule`` defaults to Python numbers (a captured graph passes
        device tensors). ``forced_tokens`` / ``forced_gumbels`` (the Gumbel noise (b, h*w, V) per scale of a request
        with soft embeddings, HART's ``more_smooth``) / ``record_logits`` are for testing against the reference sampler
        (``self.last_logits`` then holds each step's (cfg, sampled) logits (b, h*w, C)).
        """
        model = self.model if model is None else model
        if self.spec.engine_request and model is self.model:
            raise TypeError(f"run_batch on a {self.spec.title} engine needs model= its request (from engine.bind)")
        if hasattr(model, "seeded"):  # a request drawing more than tokens from the seed (HART: MaskGIT orders, diffusion noise)
            model = model.seeded(seed)
        # top-k per scale: the request's (HART: upstream's 600/300), else params.top_k at every scale
        top_ks = getattr(model, "top_ks", None) or [params.top_k] * len(model.scale_sizes())
        if schedule is None:
            schedule = guidance_schedule(0.0, params.ssg, model.scale_sizes(), self.device, cfg_ts=self._cfg_ts(model, params))
        guide = Guidance(schedule, params.ssg, functools.partial(ops.ssg_guidance, backend=self.backend))
        store = StaticKV(self._kv_cache(2 * _rows(cond), model.cache_layout()), self.backend)
        width = model.draw_width
        nonfinite: List[torch.Tensor] = []
        self.last_logits = []

        bitwise = width == 2  # Infinity: every draw is one bit, a Bernoulli draw fused into guidance
        draw_bits = functools.partial(
            ops.guide_and_sample_bits, top_k=params.top_k, top_p=params.top_p, temperature=params.temperature, seed=seed, backend=self.backend
        )

        # a request feeding soft embeddings instead of the drawn tokens' (HART's more_smooth) says so after each draw
        soft_embeddings = getattr(model, "soft_embeddings", None)

        def soft(si: int, guided: torch.Tensor, idx: torch.Tensor) -> Optional[torch.Tensor]:
            if soft_embeddings is None:
                return None
            gumbels = None if forced_gumbels is None else forced_gumbels[si].to(self.device)
            return soft_embeddings(state, si, guided / params.temperature, idx, params.top_p, gumbels)

        def pick(si: int, logits_2B: torch.Tensor):
            if bitwise:
                bits, flag, cfg, guided = guide.guide_and_draw(si, logits_2B, functools.partial(draw_bits, offset=self.offsets[si]), record_logits)
                nonfinite.append(flag[0])
            else:
                guided, cfg = guide(si, logits_2B)
                # a device flag, no sync: max |logit| / T is NaN or inf iff some sampled logit is (NaN propagates)
                nonfinite.append(~torch.isfinite(torch.linalg.vector_norm(guided, float("inf")) / params.temperature))
            if self.backend == "reference" and nonfinite[-1]:  # it syncs every scale anyway; fail at the first bad scale
                raise nonfinite_logits_error(si, model.scale_sizes()[si])
            if record_logits:
                self.last_logits.append((cfg.clone(), guided / params.temperature))
            if forced_tokens is not None:
                idx = forced_tokens[si].to(self.device)
                return idx, soft(si, guided, idx)
            if bitwise:
                return bits, None
            b, hw, C = guided.shape
            draws = guided.view(b, hw * C // width, width)
            idx = ops.sample_logits(draws, top_ks[si], params.top_p, params.temperature, seed, self.offsets[si], backend=self.backend)
            idx = idx.clamp_(0, width - 1)  # NaN logits can give out-of-range tokens: the flag reports them
            idx = idx if C == width else idx.view(b, hw, C // width)
            return idx, soft(si, guided, idx)

        autocast = self.spec.engine_autocast and self.dtype != torch.float32  # no weight cache: it would outlive a graph capture
        cudnn = torch.backends.cudnn  # benchmark the VAE's convolutions once per static shape (the user's other flags kept)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast, cache_enabled=False), cudnn.flags(
            enabled=cudnn.enabled, benchmark=True, deterministic=cudnn.deterministic, allow_tf32=cudnn.allow_tf32
        ):
            state = model.condition(cond)
            images, tokens = run_scales(model, state, store, pick)
        return images, tokens, torch.stack(nonfinite)

    # ------------------------------------------------------------------ batches
    @staticmethod
    def _cfg_ts(model: NextScaleModel, params: SamplingParams) -> List[float]:
        """The CFG weight ``t_k`` of every scale: a request's (Infinity's lists, HART's ramp), else VAR's ramp of
        ``params.cfg``."""
        if hasattr(model, "cfg_ts"):
            return model.cfg_ts()
        K = len(model.scale_sizes())
        return [cfg_ratio(params.cfg, si, K) for si in range(K)]

    def _kv_cache(self, rows: int, layout: Tuple[int, int, int, int]) -> StaticKVCache:
        """The static cache, grown to ``rows`` x ``layout``'s tokens when a larger batch or schedule comes (graphs of
        the old one are dropped)."""
        layers, heads, length, head_dim = layout
        if self._kv is None or self._kv.batch < rows or self._kv.max_len < length:
            if self._kv is not None:
                rows, length = max(rows, self._kv.batch), max(length, self._kv.max_len)
            self._graphs.clear()
            self._kv = None  # free the old buffers before allocating the new ones
            self._kv = StaticKVCache(layers, rows, heads, length, head_dim, self.dtype, self.device)
        return self._kv

    def _check_memory(self, request: NextScaleModel, b: int) -> None:
        """The family's ``engine_check_memory``: ``ValueError``, before anything is allocated, when a bucket of ``b``
        images of ``request`` (with the KV cache as it would grow) does not fit ``device_memory`` (None: no check)."""
        if self.device_memory is None or self.spec.engine_check_memory is None:
            return
        cached = (self._kv.batch, self._kv.max_len) if self._kv is not None else (0, 0)
        self.spec.engine_check_memory(request, self.vae, self.dtype, b, cached, self.device_memory, self.max_batch)

    def _run_chunk(self, model: NextScaleModel, cond: Cond, params: SamplingParams, seed: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """One chunk of n <= max_batch rows, padded to its bucket; ``seed`` (1,) int64, or (n,) row seeds (padded)."""
        n = _rows(cond)
        b = next(size for size in self.buckets if size >= n)
        if seed.shape[0] > 1:  # per-row keys: one per padded row too (padding rows' draws are discarded)
            seed = torch.cat((seed, seed.new_zeros(b - seed.shape[0])))
        self._check_memory(model, b)
        padded = _pad_rows(cond, b)
        if hasattr(model, "pad_rows"):  # a request with rows of its own (Infinity's negative text)
            model = model.pad_rows(b)
        if self.cuda_graphs:
            self._kv_cache(2 * b, model.cache_layout())  # grow (and drop stale graphs) before looking a graph up
            key = (b, seed.shape[0], graph_key(params, len(model.scale_sizes())), _request_key(model))
            graph = self._graphs.pop(key, None) or _StaticBatch(self, model, padded, params, seed.shape[0])
            self._graphs[key] = graph  # most recently used last
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            img, tok, bad = graph.replay(model, padded, seed, params)
        else:
            img, tok, bad = self.run_batch(padded, seed.to(self.device), params, model=model)
        return img[:n].clone(), [t[:n].clone() for t in tok], bad.clone()


@dataclasses.dataclass
class StaticKV:
    """The Engine's KV store (:class:`ssg_engine.models.family.KVStore`): ``ops.qkv_norm_rope_cache_`` normalises,
    scales and rotates q/k and writes k/v into the static cache in place (one kernel with the Triton backend); the
    model's other ops run on ``backend`` too."""

    cache: StaticKVCache
    backend: str

    def __call__(
        self, layer: int, qkv: torch.Tensor, start: int, *, num_heads: int, scale_mul: Optional[torch.Tensor] = None,
        rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self.cache.k_cache, self.cache.v_cache
        q = ops.qkv_norm_rope_cache_(qkv, k_cache, v_cache, layer, start, num_heads=num_heads, scale_mul=scale_mul, rope=rope, backend=self.backend)
        rows, end = qkv.shape[0], start + qkv.shape[1]
        return q, k_cache[layer, :rows, :, :end], v_cache[layer, :rows, :, :end]


def device_schedule(template: Sequence[ScaleGuidance], cfg_t: torch.Tensor, beta: torch.Tensor) -> List[ScaleGuidance]:
    """The schedule a captured graph runs: ``template``'s prior operators, with the CFG weight and SSG beta of scale
    ``si`` read from ``cfg_t[si]`` / ``beta[si]`` of the (K,) float32 device buffers refilled before each replay."""
    return [ScaleGuidance(cfg_t[si], beta[si] if g.operator is not None else 0.0, g.operator) for si, g in enumerate(template)]


class _StaticBatch:
    """One CUDA graph of ``Engine.run_batch`` for a bucket, a ``graph_key`` and (Infinity) a ``_request_key``, and
    everything it reads, held for its lifetime: the static device buffers refilled before each replay (the condition:
    labels, or padded text and negative text; the seed (1,) or row seeds (b,); one float32 buffer of the CFG weights ``cfg_t`` (K,), the SSG
    betas (K,) and, for Infinity, the request's cfg/tau numbers (3K,), see :class:`RequestTensors`), the guidance
    ``schedule`` with its prior operators, Infinity's RoPE tables (``model.tensors.rope``), the KV cache and the scale
    offsets. Nothing a replay reads lives only in a cache (``guidance._cached_operator`` or ``device_rope_tables``), whose
    eviction would free it under the graph.

    Host values reach the buffers through pinned staging buffers by non-blocking copies; a CUDA event recorded after
    them is waited for before the staging buffers are rewritten. On a CPU engine (tests) nothing is captured and
    :meth:`replay` runs the loop on the static buffers."""

    def __init__(self, engine: Engine, model: NextScaleModel, cond: Cond, params: SamplingParams, seed_rows: int = 1) -> None:
        self.engine = engine
        device = engine.device
        capture = device.type == "cuda"
        K = len(model.scale_sizes())
        self.kv = engine._kv_cache(2 * _rows(cond), model.cache_layout())
        self.offsets = engine.offsets
        self.cond = _static(cond, device)
        self.seed = torch.zeros(seed_rows, dtype=torch.long, device=device)
        extra = len(model.static_numbers()) if hasattr(model, "static_numbers") else 0  # e.g. Infinity's cfg/tau lists
        self.floats = torch.zeros(2 * K + extra, dtype=torch.float32, device=device)
        self.cfg_t, self.beta = self.floats[:K], self.floats[K : 2 * K]
        self.model = model.static_copy(self.floats[2 * K :]) if hasattr(model, "static_copy") else model
        template = guidance_schedule(0.0, params.ssg, model.scale_sizes(), device, cfg_ts=engine._cfg_ts(model, params))
        self.schedule = device_schedule(template, self.cfg_t, self.beta)
        self._static = self._buffers(self.model, self.cond) + (self.seed, self.floats)
        self._staging = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in self._static) if capture else None
        self._copied = torch.cuda.Event() if capture else None
        self._fill(model, cond, torch.zeros(seed_rows, dtype=torch.long), params)
        self._run = run = functools.partial(engine.run_batch, self.cond, self.seed, params, model=self.model, schedule=self.schedule)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        if capture:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up compiles the Triton kernels and fills caches outside capture
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=engine._graph_pool):
                self.images, self.tokens, self.nonfinite = run()

    @staticmethod
    def _buffers(model: NextScaleModel, cond: Cond) -> Tuple[torch.Tensor, ...]:
        """The condition's tensors, then the request's own (``static_tensors()``: Infinity's negative text)."""
        return _tensors(cond) + (tuple(model.static_tensors()) if hasattr(model, "static_tensors") else ())

    def _fill(self, model: NextScaleModel, cond: Cond, seed: Union[int, torch.Tensor], params: SamplingParams) -> None:
        """Stage ``cond`` (and negative text; on the host, see :meth:`Engine.bind`), ``seed`` (an int, or the int64
        keys of the seed buffer's shape) and the request's numbers into the static buffers."""
        seed = torch.as_tensor(seed, dtype=torch.long).reshape(-1)
        K = self.cfg_t.numel()
        numbers = self.engine._cfg_ts(model, params) + (params.ssg.step_betas(K) if params.ssg is not None else [0.0] * K)
        if hasattr(model, "static_numbers"):
            numbers += model.static_numbers()
        values = self._buffers(model, cond) + (seed, torch.tensor(numbers, dtype=torch.float32))
        if self._staging is None:
            for static, new in zip(self._static, values):
                static.copy_(new)
            return
        self._copied.synchronize()  # the previous replay's copies have left the staging buffers
        for static, host, new in zip(self._static, self._staging, values):
            host.copy_(new)
            static.copy_(host, non_blocking=True)
        self._copied.record()

    def replay(self, model: NextScaleModel, cond: Cond, seed: Union[int, torch.Tensor], params: SamplingParams) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """Images, tokens and the non-finite flags of ``cond`` (``seed``, ``params``, ``model``'s numbers) from the
        captured graph (CPU: the loop on the static buffers)."""
        self._fill(model, cond, seed, params)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.images, self.tokens, self.nonfinite
