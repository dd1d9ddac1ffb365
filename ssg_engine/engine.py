"""The fast sampling engine: a static KV cache, conditioning once per batch, fused per-scale ops, no host sync
inside the loop, and on CUDA the whole scale loop + VAE decode captured as a CUDA graph per batch-size bucket.

It drives the model through the same :func:`ssg_engine.pipeline.run_scales` as the reference sampler, so it
computes the same logits; only the randomness differs (Philox from a seed tensor instead of a
``torch.Generator``), and greedy sampling (``top_k=1``) gives the same tokens.
"""
from __future__ import annotations

import collections
import functools
import math
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from . import ops
from .backend import resolve_backend
from .guidance import cfg_ratio
from .kv_cache import StaticKVCache
from .models.var import VARTransformer
from .models.vqvae import VQVAE
from .params import SamplingParams, check_seed
from .pipeline import Guidance, ScaleGuidance, guidance_schedule, nonfinite_logits_error, run_scales
from .sampler import check_models, resolve_params
from .validation import as_number, class_labels


def batch_buckets(max_batch: int) -> List[int]:
    """Batch sizes a request is padded up to: powers of two below ``max_batch``, then ``max_batch``."""
    return [1 << i for i in range(math.ceil(math.log2(max_batch))) if (1 << i) < max_batch] + [max_batch]


def graph_key(params: SamplingParams, num_scales: int) -> tuple:
    """What a captured graph bakes in: the sampler's filters and which scales run SSG with which prior.
    cfg and the beta values are device tensors refilled before each replay (no new capture)."""
    ssg = params.ssg
    ssg_key = None if ssg is None else (ssg.prior, ssg.interp, ssg.prior_source, tuple(b != 0.0 for b in ssg.step_betas(num_scales)))
    return params.top_k, params.top_p, params.temperature, ssg_key


class Engine:
    """Batch sampler for a loaded (var, vae) pair.

    ``Engine(var, vae, max_batch=64, device="cuda", dtype=torch.bfloat16, cuda_graphs=True, backend="auto")``;
    ``engine.generate(labels, params)`` (or keyword overrides: ``cfg=``, ``seed=``, ``ssg=`` ...) returns
    ``images (B, 3, H, W)`` in [0, 1] and ``tokens`` (list of (B, pn^2)). Requests larger than ``max_batch``
    are split (chunk ``i`` uses seed ``seed + i``); each chunk is padded up to a bucket (``batch_buckets``).

    Memory follows the batches in use: the KV cache is allocated for the largest bucket used so far (never
    for ``max_batch`` up front; ``kv_cache_bytes()``), and at most ``max_graphs`` captured graphs are kept
    (least recently used dropped), all in one shared memory pool. The reference backend syncs the host, so it
    runs without graphs. The VQ-VAE decodes in ``vae_dtype`` (default: ``dtype``), channels-last, inside the
    captured graph; its quantizer keeps the accumulated latent in float32.
    """

    def __init__(
        self,
        var: VARTransformer,
        vae: VQVAE,
        max_batch: int = 64,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.bfloat16,
        cuda_graphs: bool = True,
        backend: str = "auto",
        max_graphs: int = 8,
        vae_dtype: Optional[torch.dtype] = None,
    ) -> None:
        check_models(var, vae, "Engine(var, vae)")
        self.max_batch = as_number(max_batch, "max_batch", "a positive integer", integer=True, valid=lambda v: v > 0)
        self.max_graphs = as_number(max_graphs, "max_graphs", "a positive integer", integer=True, valid=lambda v: v > 0)
        self.device = torch.device(device) if device is not None else var.lvl_1L.device
        self.backend = resolve_backend(backend, self.device)  # an unknown or unusable backend fails here
        self.dtype = dtype
        self.vae_dtype = dtype if vae_dtype is None else vae_dtype
        self.var = var.to(device=self.device, dtype=dtype).eval()
        self.vae = vae.to(device=self.device, dtype=torch.float32).eval()
        for part in (self.vae.post_quant_conv, self.vae.decoder):  # the quantizer keeps the latent in float32
            part.to(dtype=self.vae_dtype, memory_format=torch.channels_last)
        self.var.attach_vae(self.vae)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and self.backend == "triton"
        self.buckets = batch_buckets(self.max_batch)
        self.offsets = [torch.tensor([si], dtype=torch.long, device=self.device) for si in range(len(var.patch_nums))]
        self._kv: Optional[StaticKVCache] = None
        self._graphs: "collections.OrderedDict[tuple, _CapturedBatch]" = collections.OrderedDict()
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None  # one memory pool for all graphs

    # ------------------------------------------------------------------ public
    def kv_cache_bytes(self) -> int:
        """Bytes of KV cache held now (0 before the first batch)."""
        return 0 if self._kv is None else int(self._kv.nbytes())

    @torch.no_grad()
    def generate(
        self, labels: Union[Sequence[int], torch.Tensor], params: Optional[SamplingParams] = None, **overrides: Any
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Sample one image per label. Non-finite logits raise ``NonFiniteLogitsError`` naming the first bad
        scale, checked once after all chunks (the only host sync of the call)."""
        params = resolve_params(params, overrides)
        labels_t = class_labels(labels, self.var.num_classes, self.device)
        chunks = range(0, labels_t.numel(), self.max_batch)
        seed = check_seed(params.seed, count=len(chunks)) or 0
        images, tokens, nonfinite = [], [], []
        for i, start in enumerate(chunks):
            img, tok, bad = self._run_chunk(labels_t[start : start + self.max_batch], params, seed + i)
            images.append(img)
            tokens.append(tok)
            nonfinite.append(bad)
        bad_scales = torch.stack(nonfinite).any(0).nonzero()
        if bad_scales.numel():
            si = int(bad_scales[0, 0])
            raise nonfinite_logits_error(si, self.var.scale_sizes()[si])
        return torch.cat(images), [torch.cat([t[k] for t in tokens]) for k in range(len(tokens[0]))]

    @torch.inference_mode()
    def run_batch(
        self,
        labels: torch.Tensor,
        seed: torch.Tensor,
        params: SamplingParams,
        schedule: Optional[List[ScaleGuidance]] = None,
        forced_tokens: Optional[List[torch.Tensor]] = None,
        record_logits: bool = False,
    ) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """The whole sampling loop for labels (b,) with a seed tensor (1,); no host sync with the Triton backend.
        Runs in inference mode (no autograd bookkeeping); callers get copies made outside it.

        Returns images, tokens and a (K,) bool device tensor: True for scales whose logits (after CFG, SSG and
        temperature) are not all finite. ``schedule`` defaults to Python numbers (a captured graph passes
        device tensors). ``forced_tokens`` / ``record_logits`` are for testing against the reference sampler
        (``self.last_logits`` then holds each step's (cfg, sampled) logits).
        """
        var, B = self.var, labels.shape[0]
        if schedule is None:
            schedule = guidance_schedule(params.cfg, params.ssg, var.scale_sizes(), self.device)
        guide = Guidance(schedule, params.ssg, functools.partial(ops.ssg_guidance, backend=self.backend))
        kv = self._kv_cache(2 * B)
        nonfinite: List[torch.Tensor] = []
        self.last_logits = []

        def store(layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> Tuple[torch.Tensor, torch.Tensor]:
            kv.write(layer, start, k, v)
            return kv.read(layer, 2 * B, start + k.shape[2])

        def pick(si: int, logits_2B: torch.Tensor):
            guided, cfg = guide(si, logits_2B)
            # a device flag, no sync: max |logit| / T is NaN or inf iff some sampled logit is (NaN propagates)
            nonfinite.append(~torch.isfinite(torch.linalg.vector_norm(guided, float("inf")) / params.temperature))
            if self.backend == "reference" and nonfinite[-1]:  # it syncs every scale anyway; fail before its draw does
                raise nonfinite_logits_error(si, var.scale_sizes()[si])
            if record_logits:
                self.last_logits.append((cfg.clone(), guided / params.temperature))
            if forced_tokens is not None:
                return forced_tokens[si].to(self.device), None
            idx = ops.sample_logits(guided, params.top_k, params.top_p, params.temperature, seed, self.offsets[si], backend=self.backend)
            return idx.clamp_(0, var.V - 1), None  # NaN logits can give out-of-range tokens: the flag reports them

        images, tokens = run_scales(var, labels, store, pick)
        return images, tokens, torch.stack(nonfinite)

    # ------------------------------------------------------------------ batches
    def _kv_cache(self, rows: int) -> StaticKVCache:
        """The static cache, grown to ``rows`` when a larger bucket comes (graphs of the old one are dropped)."""
        if self._kv is None or self._kv.batch < rows:
            self._graphs.clear()
            self._kv = None  # free the old buffers before allocating the new ones
            layers, heads, length, head_dim = self.var.cache_layout()
            self._kv = StaticKVCache(layers, rows, heads, length, head_dim, self.dtype, self.device)
        return self._kv

    def _run_chunk(self, labels: torch.Tensor, params: SamplingParams, seed: int) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        n = labels.numel()
        b = next(size for size in self.buckets if size >= n)
        padded = torch.cat([labels, labels.new_zeros(b - n)])
        seed_t = torch.tensor([seed], dtype=torch.long, device=self.device)
        if self.cuda_graphs:
            self._kv_cache(2 * b)  # grow (and drop stale graphs) before looking a graph up
            key = (b, graph_key(params, len(self.var.patch_nums)))
            graph = self._graphs.pop(key, None) or _CapturedBatch(self, b, params)
            self._graphs[key] = graph  # most recently used last
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            img, tok, bad = graph.replay(padded, seed_t, params)
        else:
            img, tok, bad = self.run_batch(padded, seed_t, params)
        return img[:n].clone(), [t[:n].clone() for t in tok], bad.clone()


class _CapturedBatch:
    """One CUDA graph of ``Engine.run_batch`` for a bucket and a ``graph_key``; labels, seed, the CFG weights and
    the SSG betas are static device buffers refilled before each replay."""

    def __init__(self, engine: Engine, bucket: int, params: SamplingParams) -> None:
        self.engine = engine
        device = engine.device
        self.labels = torch.zeros(bucket, dtype=torch.long, device=device)
        self.seed = torch.zeros(1, dtype=torch.long, device=device)
        template = guidance_schedule(params.cfg, params.ssg, engine.var.scale_sizes(), device)
        self.cfg_t = torch.zeros(len(template), dtype=torch.float32, device=device)
        self.beta = torch.zeros(len(template), dtype=torch.float32, device=device)
        schedule = [ScaleGuidance(self.cfg_t[si], self.beta[si] if g.operator is not None else 0.0, g.operator) for si, g in enumerate(template)]
        self._fill(params)
        run = functools.partial(engine.run_batch, self.labels, self.seed, params, schedule)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up compiles the Triton kernels and fills caches outside capture
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=engine._graph_pool):
            self.images, self.tokens, self.nonfinite = run()

    def _fill(self, params: SamplingParams) -> None:
        K = self.cfg_t.numel()
        self.cfg_t.copy_(torch.tensor([cfg_ratio(params.cfg, si, K) for si in range(K)]))
        self.beta.copy_(torch.tensor(params.ssg.step_betas(K) if params.ssg is not None else [0.0] * K))

    def replay(self, labels: torch.Tensor, seed: torch.Tensor, params: SamplingParams) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        self.labels.copy_(labels)
        self.seed.copy_(seed)
        self._fill(params)
        self.graph.replay()
        return self.images, self.tokens, self.nonfinite
