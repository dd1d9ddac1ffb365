"""Layers that more than one model family builds from (same parameter names as upstream's in each)."""
from __future__ import annotations

import torch.nn as nn


class FFN(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (upstream names); a block runs it as ``ops.matmul_gelu`` then
    ``ops.matmul_gated_residual`` (fc2 with the block's gate and residual), see :meth:`AdaLNSelfAttn.forward_modulated`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
