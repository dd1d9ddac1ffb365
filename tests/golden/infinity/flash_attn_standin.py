"""CPU stand-in for the two `flash_attn` functions upstream Infinity imports.

Not part of ssg-engine and not run by CI: `make_infinity_golden.py` installs this module as
`sys.modules["flash_attn"]` before importing upstream (FoundationVision/Infinity), whose
`infinity/models/basic.py` does, unconditionally,

    from flash_attn import flash_attn_func                  # used only with customized_flash_attn=True
    from flash_attn import flash_attn_varlen_kvpacked_func  # the only path of CrossAttention

and, inside `try/except ImportError`, `from flash_attn.ops.{layer_norm,rms_norm,fused_dense} import ...`.
This module is a plain module (not a package), so those `flash_attn.ops.*` imports raise
`ModuleNotFoundError` (an ImportError) and upstream takes its own fallback
(`flash_fused_op_installed = False`, `rms_norm_impl` in PyTorch), exactly as on a machine whose
flash-attn build has no fused ops.

Semantics implemented (flash-attn 2.x documented interface, `flash_attn/flash_attn_interface.py`):

* `flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, ...)`:
  q (B, Lq, H, d), k/v (B, Lk, Hk, d) with H % Hk == 0 (MQA/GQA: kv head j serves query heads
  j*H/Hk ... (j+1)*H/Hk - 1); returns (B, Lq, H, d).
* `flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
  dropout_p=0.0, softmax_scale=None, causal=False, ...)`: q (total_q, H, d), kv (total_k, 2, Hk, d),
  cu_seqlens_* int32 (batch + 1,) cumulative offsets; sequence i is q[cu_q[i]:cu_q[i+1]] attending
  to kv[cu_k[i]:cu_k[i+1]] only (no attention across sequences); returns (total_q, H, d).
* softmax_scale defaults to 1 / sqrt(d). causal=True masks key j for query i when
  j > i + (Lk - Lq) (flash-attn >= 2.1 aligns the causal mask to the bottom-right corner).
* dtype: like flash-attn, only float16 / bfloat16 inputs are accepted (a float32 input raises
  TypeError, as flash-attn's "FlashAttention only support fp16 and bf16 data type"); the output has
  the input dtype. Internally, like flash-attn's kernels (fp32 accumulators, fp32 softmax), the
  scores, the softmax and the weighted sum are computed in float32 from the (already rounded) half-
  precision inputs, and the result is rounded once to the input dtype:

      qf, kf, vf = q.float(), k.float(), v.float()
      s = (qf @ kf^T) * softmax_scale            # per sequence, per head, float32
      p = softmax(s, dim=-1)                     # float32 (masked entries -inf)
      out = (p @ vf).to(q.dtype)

  Upstream's CrossAttention casts its float32 q and kv to bfloat16 before the call and casts the
  result back with `.float()`, so in upstream's float32 runs the cross-attention (the text
  attentive pool and every block's cross-attention) sees bf16-rounded q, k, v and returns a bf16-rounded
  output. Real flash-attn additionally rounds the unnormalised probabilities to the input dtype
  before the P @ V product and uses an exp2-based online softmax over key blocks; those effects are
  of the order of bf16 rounding and are not modelled (a CPU reference cannot match a GPU kernel bit
  for bit anyway). What the reference pins down is the float32 path a re-implementation can
  follow exactly: bf16-rounded inputs, float32 attention, bf16-rounded output.
* dropout_p must be 0 (inference only); window_size, alibi_slopes, return_attn_probs are not
  supported (upstream never passes them).
"""

from __future__ import annotations

import math

import torch

__version__ = "2.0.0-cpu-standin"

_HALF = (torch.float16, torch.bfloat16)


def _check(*tensors):
    for t in tensors:
        if t.dtype not in _HALF:
            raise TypeError(f"FlashAttention only support fp16 and bf16 data type (got {t.dtype})")
    if len({t.dtype for t in tensors}) != 1:
        raise TypeError("query, key and value must have the same dtype")


def _attend(q, k, v, scale, causal):
    """q (Lq, H, d), k/v (Lk, Hk, d) in half precision -> (Lq, H, d) float32."""
    Lq, H, d = q.shape
    Lk, Hk, _ = k.shape
    if H % Hk:
        raise ValueError(f"number of query heads {H} is not a multiple of key/value heads {Hk}")
    qf = q.float().transpose(0, 1)  # H Lq d
    kf = k.float().transpose(0, 1)  # Hk Lk d
    vf = v.float().transpose(0, 1)
    if Hk != H:
        kf = kf.repeat_interleave(H // Hk, dim=0)
        vf = vf.repeat_interleave(H // Hk, dim=0)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # H Lq Lk
    if causal:
        i = torch.arange(Lq).view(Lq, 1)
        j = torch.arange(Lk).view(1, Lk)
        s = s.masked_fill(j > i + (Lk - Lq), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, vf).transpose(0, 1)  # Lq H d


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    if dropout_p:
        raise NotImplementedError("stand-in: dropout_p must be 0")
    if tuple(window_size) != (-1, -1) or alibi_slopes is not None or return_attn_probs:
        raise NotImplementedError("stand-in: window_size / alibi_slopes / return_attn_probs unsupported")
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    out = torch.stack([_attend(q[b], k[b], v[b], scale, causal) for b in range(q.shape[0])], 0)
    return out.to(q.dtype)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    if dropout_p:
        raise NotImplementedError("stand-in: dropout_p must be 0")
    if tuple(window_size) != (-1, -1) or alibi_slopes is not None or return_attn_probs:
        raise NotImplementedError("stand-in: window_size / alibi_slopes / return_attn_probs unsupported")
    if kv.ndim != 4 or kv.shape[1] != 2:
        raise ValueError(f"kv must be (total_k, 2, Hk, d), got {tuple(kv.shape)}")
    _check(q, kv)
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    if len(cq) != len(ck):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length")
    if cq[-1] != q.shape[0] or ck[-1] != kv.shape[0]:
        raise ValueError("cu_seqlens do not match the packed tensors")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(len(cq) - 1):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        if cq[i + 1] - cq[i] > max_seqlen_q or ck[i + 1] - ck[i] > max_seqlen_k:
            raise ValueError("a sequence is longer than max_seqlen")
        if cq[i + 1] == cq[i]:
            continue
        if ck[i + 1] == ck[i]:  # flash-attn returns zeros for an empty key set
            out[qs] = 0
            continue
        out[qs] = _attend(q[qs], kv[ks, 0], kv[ks, 1], scale, causal)
    return out.to(q.dtype)
