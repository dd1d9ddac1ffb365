"""Upstream-compatible VQ-VAE tokenizer and VAR transformer."""
from .var import VAR
from .vqvae import VQVAE, VectorQuantizer2

__all__ = ["VAR", "VQVAE", "VectorQuantizer2"]
