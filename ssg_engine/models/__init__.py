"""Upstream-compatible VQ-VAE tokenizer and VAR transformer."""
from .var import VARTransformer
from .vqvae import VQVAE, VectorQuantizer2

__all__ = ["VARTransformer", "VQVAE", "VectorQuantizer2"]
