"""The fast sampling engine: static KV cache, conditioning computed once per batch, fused per-scale ops,
no host sync inside the loop, and on CUDA the whole scale loop + VAE decode captured as one CUDA graph
per batch-size bucket.

Numerically it computes what ``sample_reference`` computes (same blocks, same attention over the
same keys); only the sampling randomness differs (Philox from a seed tensor instead of a
``torch.Generator``), so greedy sampling (``top_k=1``) gives the same tokens.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import ops
from .backend import resolve_backend
from .guidance import SSG, as_number, cfg_ratio, prior_operator
from .kv_cache import KVCachePool
from .models.var import VAR
from .models.vqvae import VQVAE
from .profiling import nvtx_range
from .sampler import check_models, check_sampling_args, check_seed, nonfinite_logits_error


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Everything a captured graph bakes in (sampling parameters and SSG schedule)."""

    cfg: float
    top_k: int
    top_p: float
    temperature: float
    ssg: Optional[SSG]


def _buckets(max_batch: int) -> List[int]:
    sizes = [1 << i for i in range(max(1, math.ceil(math.log2(max_batch)) + 1)) if (1 << i) < max_batch]
    return sizes + [max_batch]


class Engine:
    """Batch sampler for a loaded (vae, var) pair.

    ``Engine(var, vae, max_batch=64, device="cuda", dtype=torch.bfloat16, cuda_graphs=True, backend="auto")``;
    ``engine.generate(labels, cfg=1.5, top_k=900, top_p=0.96, temperature=1.0, seed=0, ssg=None)`` returns
    ``images (B, 3, H, W)`` in [0, 1] and ``tokens`` (list of (B, pn^2)). Requests larger than
    ``max_batch`` are split; each chunk is padded up to a bucket size (powers of two, and ``max_batch``).
    """

    def __init__(
        self,
        var: VAR,
        vae: VQVAE,
        max_batch: int = 64,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.bfloat16,
        cuda_graphs: bool = True,
        backend: str = "auto",
    ) -> None:
        check_models(var, vae, "Engine(var, vae)")
        max_batch = as_number(max_batch, "max_batch", "a positive integer", integer=True, valid=lambda v: v > 0)
        self.device = torch.device(device) if device is not None else var.lvl_1L.device
        resolve_backend(backend, self.device)  # an unknown or unusable backend fails here, not at the first batch
        self.dtype = dtype
        self.var = var.to(device=self.device, dtype=dtype).eval()
        self.vae = vae.to(device=self.device, dtype=torch.float32).eval()
        self.var.attach_vae(self.vae)
        self.backend = backend
        self.max_batch = max_batch
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.buckets = _buckets(max_batch)
        cfg = var.config
        self.pool = KVCachePool(cfg.depth, 2 * max_batch, cfg.num_heads, cfg.L, cfg.embed_dim // cfg.num_heads, dtype, self.device)
        self.slots = self.pool.allocate(2 * max_batch, contiguous=True)
        self.lvl_pos = self.var.lvl_pos().detach()
        self.offsets = [torch.tensor([si], dtype=torch.long, device=self.device) for si in range(len(cfg.patch_nums))]
        self._graphs: Dict[Tuple[int, _Settings], "_CapturedBatch"] = {}

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(
        self,
        labels: Union[Sequence[int], torch.Tensor],
        cfg: float = 1.5,
        top_k: int = 900,
        top_p: float = 0.96,
        temperature: float = 1.0,
        seed: Optional[int] = 0,
        ssg: Optional[SSG] = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Sample one image per label; chunk ``i`` of ``max_batch`` images uses seed ``seed + i`` (None: 0).

        Non-finite logits raise ``NonFiniteLogitsError`` naming the first bad scale, checked once after all chunks.
        """
        settings = _Settings(*check_sampling_args(cfg, top_k, top_p, temperature, ssg), ssg)
        labels_t = self.var.check_labels(labels)
        chunks = range(0, labels_t.numel(), self.max_batch)
        seed = check_seed(seed, count=len(chunks)) or 0
        images, tokens, nonfinite = [], [], []
        for i, start in enumerate(chunks):
            img, tok, bad = self._run_chunk(labels_t[start : start + self.max_batch], settings, seed + i)
            images.append(img)
            tokens.append(tok)
            nonfinite.append(bad)
        bad_scales = torch.stack(nonfinite).any(0).nonzero()  # the one host sync of the call
        if bad_scales.numel():
            si = int(bad_scales[0, 0])
            raise nonfinite_logits_error(si, self.var.patch_nums[si])
        return torch.cat(images), [torch.cat([t[k] for t in tokens]) for k in range(len(tokens[0]))]

    # ------------------------------------------------------------------ batches
    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _run_chunk(self, labels: torch.Tensor, settings: _Settings, seed: int) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """Images and tokens of up to ``max_batch`` labels, and the (K,) device flags of scales with non-finite logits."""
        n = labels.numel()
        b = self._bucket(n)
        padded = torch.cat([labels, labels.new_zeros(b - n)])
        seed_t = torch.tensor([seed], dtype=torch.long, device=self.device)
        if self.cuda_graphs:
            graph = self._graphs.get((b, settings))
            if graph is None:
                graph = self._graphs[(b, settings)] = _CapturedBatch(self, b, settings)
            img, tok = graph.replay(padded, seed_t)
            nonfinite = graph.nonfinite
        else:
            img, tok = self.run_batch(padded, seed_t, settings)
            nonfinite = self.last_nonfinite
        return img[:n].clone(), [t[:n].clone() for t in tok], nonfinite.clone()

    def run_batch(
        self,
        labels: torch.Tensor,
        seed: torch.Tensor,
        settings: _Settings,
        forced_tokens: Optional[List[torch.Tensor]] = None,
        record_logits: bool = False,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The whole sampling loop for labels (b,) with a seed tensor (1,); no host sync on CUDA.

        ``forced_tokens`` / ``record_logits`` exist for testing against the reference sampler
        (``self.last_logits`` then holds each step's (cfg, sampled) logits). ``self.last_nonfinite`` is a (K,) bool
        device tensor: True for scales whose logits (after CFG, SSG and temperature) are not all finite.
        """
        var, quant = self.var, self.vae.quantize
        pn_list = var.patch_nums
        K = len(pn_list)
        B = labels.shape[0]
        slots = self.slots[: 2 * B]
        betas = settings.ssg.step_betas(K) if settings.ssg is not None else [0.0] * K
        eager_check = resolve_backend(self.backend, self.device) == "reference"  # it syncs every scale anyway
        self.pool.reset(slots)
        self.last_logits = []

        with nvtx_range("conditioning"):
            cond_BD = var.class_emb(torch.cat((labels, torch.full_like(labels, var.num_classes))))
            shared = var.shared_ada_lin(cond_BD)
            mods = [block.modulation(shared) for block in var.blocks]  # once per batch, not per scale
            head_scale, head_shift = var.head_nm.ada_lin(cond_BD).view(-1, 1, 2, var.C).unbind(2)
        x = cond_BD.unsqueeze(1).expand(2 * B, var.first_l, -1) + var.pos_start.expand(2 * B, var.first_l, -1) + self.lvl_pos[:, : var.first_l]
        f_hat = torch.zeros(B, var.Cvae, pn_list[-1], pn_list[-1], device=self.device)
        prev: Optional[torch.Tensor] = None
        tokens: List[torch.Tensor] = []
        nonfinite: List[torch.Tensor] = []
        cur = 0
        for si, pn in enumerate(pn_list):
            with nvtx_range(f"scale {si} ({pn}x{pn})"):
                l = pn * pn
                for layer, block in enumerate(var.blocks):
                    with nvtx_range(f"block {layer}"):
                        x = block.forward_modulated(x, mods[layer], lambda h, i=layer, blk=block: self._attend(blk, i, slots, h, cur + l))
                self.pool.advance(slots, l)
                cur += l
                with nvtx_range("head"):
                    h = var.head_nm.ln_wo_grad(x).mul(head_scale.add(1)).add_(head_shift)
                    logits = F.linear(h, var.head.weight, var.head.bias).float()
                operator = None
                if betas[si] != 0.0:
                    operator = prior_operator(settings.ssg.prior, pn_list[si - 1], pn, settings.ssg.interp, self.device, torch.float32)
                guided, cfg_out = ops.ssg_guidance(
                    logits, prev, operator, cfg_ratio(settings.cfg, si, K), betas[si], backend=self.backend
                )
                prev = guided if settings.ssg is not None and settings.ssg.prior_source == "guided" else cfg_out
                # a device flag, no sync: max |logit| / T is NaN or inf iff some sampled logit is (NaN propagates)
                nonfinite.append(~torch.isfinite(torch.linalg.vector_norm(guided, float("inf")) / settings.temperature))
                if eager_check and nonfinite[-1]:  # the reference sampler would raise a multinomial error first
                    raise nonfinite_logits_error(si, pn)
                if record_logits:
                    self.last_logits.append((cfg_out.clone(), guided / settings.temperature))
                if forced_tokens is not None:
                    idx = forced_tokens[si].to(self.device)
                else:
                    idx = ops.sample_logits(
                        guided, settings.top_k, settings.top_p, settings.temperature, seed, self.offsets[si], backend=self.backend
                    ).clamp_(0, var.V - 1)  # NaN logits can give out-of-range tokens: finish the loop, the flag reports it
                tokens.append(idx)
                h_BChw = quant.embedding(idx).transpose(1, 2).reshape(B, var.Cvae, pn, pn)
                f_hat, nxt = quant.get_next_autoregressive_input(si, K, f_hat, h_BChw)
                if si != K - 1:
                    nxt_l = pn_list[si + 1] ** 2
                    nxt = nxt.view(B, var.Cvae, -1).transpose(1, 2).to(self.dtype)
                    x = (var.word_embed(nxt) + self.lvl_pos[:, cur : cur + nxt_l]).repeat(2, 1, 1)
        self.last_nonfinite = torch.stack(nonfinite)
        with nvtx_range("vae decode"):
            images = self.vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
        return images, tokens

    def _attend(self, block, layer: int, slots: torch.Tensor, h: torch.Tensor, length: int) -> torch.Tensor:
        """Attention of the new scale's tokens over the static cache (written in place, then read as a view)."""
        attn = block.attn
        q, k, v = attn.qkv(h)
        self.pool.append(layer, slots, k.contiguous(), v.contiguous())
        K, V = self.pool.view(layer, slots, length)
        return attn.attend(q, K, V, None)


class _CapturedBatch:
    """One CUDA graph of ``Engine.run_batch`` for a bucket size and fixed settings; inputs are static buffers."""

    def __init__(self, engine: Engine, bucket: int, settings: _Settings) -> None:
        self.labels = torch.zeros(bucket, dtype=torch.long, device=engine.device)
        self.seed = torch.zeros(1, dtype=torch.long, device=engine.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up compiles the Triton kernels and fills caches outside capture
            for _ in range(2):
                engine.run_batch(self.labels, self.seed, settings)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.images, self.tokens = engine.run_batch(self.labels, self.seed, settings)
            self.nonfinite = engine.last_nonfinite

    def replay(self, labels: torch.Tensor, seed: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        self.labels.copy_(labels)
        self.seed.copy_(seed)
        self.graph.replay()
        return self.images, self.tokens
