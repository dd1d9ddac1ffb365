"""HART's hybrid tokenizer: VAR's multi-scale residual VQ-VAE (shared conv backbone and quantizer) whose last scale
adds a continuous residual on top of its codes, without the refinement conv (upstream ``HARTHybridQuantizer``).

Upstream: mit-han-lab/hart ``hart/modules/models/autoencoder/{hart_autoencoder.py,quantize/hart_hybrid_quantize.py}``.
State dict: upstream ``HARTAutoEncoder``'s names (``loading.py`` strips the ``vae.`` prefix of the released folder).
Shapes: images (B, 3, H, W) in [-1, 1]; latent (B, Cvae, h, w), h = H / 16; tokens per scale (B, pn*pn) int64.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..var.tokenizer import VQVAE  # the hybrid tokenizer is VAR's multi-scale VQ-VAE plus a residual
from .config import HARTTokenizerConfig


class HARTTokenizer(VQVAE):
    """The shared VQ-VAE with HART's hybrid last scale; ``patch_nums`` are the transformer's scales."""

    def __init__(self, cfg: HARTTokenizerConfig, patch_nums: Sequence[int]) -> None:
        super().__init__(cfg.vqvae_config(tuple(patch_nums)))
        self.hart_config = cfg
        self.patch_nums = tuple(patch_nums)

    def tokens_to_fhat(self, ms_idx_Bl: Sequence[torch.Tensor], residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens of every scale (B, pn*pn) and the last scale's continuous residual (B, pn_last^2, Cvae) or None ->
        f_hat (B, Cvae, H, W): :meth:`embeddings_to_fhat` with the last scale's codebook embeddings plus residual."""
        K = len(self.patch_nums)
        if len(ms_idx_Bl) != K:
            raise ValueError(f"ms_idx_Bl must hold {K} scales; got {len(ms_idx_Bl)}")
        last = self.quantize.embedding(ms_idx_Bl[-1])
        if residual is not None:
            if residual.shape != last.shape:
                raise ValueError(f"residual must have shape {tuple(last.shape)}; got {tuple(residual.shape)}")
            last = last + residual
        return self.embeddings_to_fhat(ms_idx_Bl[:-1], last)

    def embeddings_to_fhat(self, ms_idx_Bl: Sequence[torch.Tensor], last_BlC: torch.Tensor) -> torch.Tensor:
        """Tokens of all scales but the last (B, pn*pn) and the last scale's embeddings (B, pn_last^2, Cvae) ->
        f_hat (B, Cvae, H, W) in upstream's sampler order (bicubic up, refine, add; the last scale added as it is)."""
        K = len(self.patch_nums)
        if len(ms_idx_Bl) != K - 1:
            raise ValueError(f"ms_idx_Bl must hold the first {K - 1} scales; got {len(ms_idx_Bl)}")
        B, side, q = last_BlC.shape[0], self.patch_nums[-1], self.quantize
        if tuple(last_BlC.shape[1:]) != (side * side, self.Cvae):
            raise ValueError(f"last_BlC must have shape (B, {side * side}, {self.Cvae}); got {tuple(last_BlC.shape)}")
        f_hat = q.embedding.weight.new_zeros(B, self.Cvae, side, side)
        for si, pn in enumerate(self.patch_nums[:-1]):
            h = q.embedding(ms_idx_Bl[si]).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat.add_(q.quant_resi[si / (K - 1)](F.interpolate(h, size=(side, side), mode="bicubic")))
        return f_hat.add_(last_BlC.transpose(1, 2).reshape(B, self.Cvae, side, side))

    def decode_tokens(self, ms_idx_Bl: Sequence[torch.Tensor], residual: Optional[torch.Tensor] = None, backend: str = "reference") -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] from tokens and residual (see :meth:`tokens_to_fhat`)."""
        return self.fhat_to_img(self.tokens_to_fhat(ms_idx_Bl, residual), backend)

    @torch.no_grad()
    def img_to_idxBl_and_frest(self, img: torch.Tensor) -> List[torch.Tensor]:
        """Upstream ``img_to_idxBl_and_frest``: tokens of every scale (B, pn*pn), then the latent left before the last
        scale's codes (B, pn_last^2, Cvae) (its difference from the codes' embedding is the continuous residual)."""
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"img must have shape (B, 3, H, W); got {tuple(img.shape)}")
        f = self.quant_conv(self.encoder(img))
        B, C, H, W = f.shape
        if self.patch_nums[-1] != H or H != W:
            raise ValueError(f"img gives a {H}x{W} latent; the last scale is {self.patch_nums[-1]}")
        q, K = self.quantize, len(self.patch_nums)
        f_rest = f.detach().clone()
        out: List[torch.Tensor] = []
        for si, pn in enumerate(self.patch_nums):
            z = f_rest if si == K - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
            idx = q.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, C))
            h = F.interpolate(q.embedding(idx.view(B, pn, pn)).permute(0, 3, 1, 2), size=(H, W), mode="bicubic").contiguous()
            if si != K - 1:
                f_rest.sub_(q.quant_resi[si / (K - 1)](h))
            out.append(idx.reshape(B, pn * pn))
        out.append(f_rest.permute(0, 2, 3, 1).reshape(B, H * W, C))
        return out
