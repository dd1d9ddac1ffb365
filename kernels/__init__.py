"""Triton kernels of ssg-engine (installed as ``ssg_engine.kernels``), one op per module.

Each module holds the jit kernel, its launcher and the pure-PyTorch reference that
specifies it; the modules import without triton (only the launchers need it).
"""
import torch

from ssg_engine.backend import triton_interpreting


def require_kernel_device(device: torch.device) -> None:
    """Raise ``ValueError`` unless a Triton kernel can run on ``device``."""
    if device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"the Triton kernels need CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 before "
            "importing triton to run them on the CPU interpreter"
        )
