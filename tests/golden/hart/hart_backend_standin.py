"""CPU stand-in for upstream HART's compiled extension `hart_backend.fused_kernels`.

Upstream HART (mit-han-lab/hart @ e28a41fe15025baf3d48ab004f5d3727c88d8fc7) imports
`hart_backend.fused_kernels` unconditionally in `hart/modules/networks/basic_hart.py:10`; the module
is a CUDA extension built from `hart/kernels/` (setup.py: `name="hart_backend.fused_kernels"`). On the
inference path only `rms_norm` is called (`LlamaRMSNormFused.forward`, basic_hart.py:492-504). The fused
RoPE entry points (`fused_rope_*`) belong to code paths that upstream leaves commented out
(`LlamaAttention.forward`, "Use optimized rotary embedding") and are not provided here: calling one
raises, so a run that needed them would fail loudly instead of silently differing.

`rms_norm(out, input, weight, epsilon, use_quant)` follows
`hart/kernels/csrc/layernorm/layernorm_kernels.cu` (`vllm::rms_norm_kernel`, lines 21-74) for
`use_quant=False`:

    variance = sum_j float(x_j)^2                         (accumulated in float32)
    s = rsqrt(variance / hidden_size + epsilon)           (float32)
    out_j = scalar_t(float(x_j) * s) * weight_j           (rounded to the input dtype, then the
                                                           multiply in the input dtype)

`weight` has the input's dtype (the kernel reads it as `scalar_t`; upstream casts it first with
`self.weight.data = self.weight.data.to(x)`). The result is written into `out` in place, as the kernel
does. Only the order of the float32 sum differs from the GPU's block reduction.
"""

from __future__ import annotations

import torch

__all__ = ["rms_norm"]


def rms_norm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float,
             use_quant: bool) -> None:
    """Write RMSNorm(input) * weight into `out` (shapes (..., hidden); weight (hidden,))."""
    if use_quant:
        raise NotImplementedError("hart_backend stand-in: the int8 (use_quant=True) variant is not used by inference")
    if weight.dtype != input.dtype or out.dtype != input.dtype:
        raise TypeError("hart_backend stand-in: input, weight and out must share one dtype (the kernel's scalar_t)")
    x = input.float()
    s = torch.rsqrt(x.square().sum(-1, keepdim=True) / input.shape[-1] + epsilon)
    out.copy_((x * s).to(input.dtype) * weight)


def _missing(name: str):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"hart_backend stand-in: {name} is not on HART's inference path")
    fn.__name__ = name
    return fn


fused_rope_forward_func = _missing("fused_rope_forward_func")
fused_rope_backward_func = _missing("fused_rope_backward_func")
fused_rope_with_pos_forward_func = _missing("fused_rope_with_pos_forward_func")
