"""The Engine's static KV cache: preallocated K/V buffers for one batch that advances in lockstep.

``k_cache`` / ``v_cache`` have shape ``(num_layers, batch, num_heads, max_len, head_dim)``. At every
scale each layer ``write``\\ s that scale's K/V ``(n, H, l, D)`` at positions ``[start, start + l)`` of
rows ``:n`` (all rows have the same length, so ``start`` is a host integer: one ``copy_`` into a slice,
no allocation, no sync, CUDA-graph safe), then ``read`` returns views ``(n, H, length, D)`` to attend
over. Every argument is checked on the host; misuse raises :class:`KVCacheError`.

Two implementations, same API, same errors, same contents (tested against each other):

* the C++ extension (``StaticKVCache`` of ``ssg_engine._C``), built at install or at first use
  (:mod:`ssg_engine.extension`);
* :class:`PyStaticKVCache`, used (with one warning giving the reason) only when the extension cannot be built.

The device write is one custom op, ``torch.ops.ssg_engine.kv_write_`` (schema ``KV_WRITE_SCHEMA``, as
``csrc/kv_cache.cpp`` defines it: it mutates exactly the two caches; with a fake impl, so ``torch.compile`` traces
it): the extension's C++ kernel, or the same op defined here in Python when the extension is absent. The Engine
writes through :func:`write_and_read` (the op and two views, no pybind call), ``PyStaticKVCache.write`` through the
op after its checks.
"""
from __future__ import annotations

import warnings
from typing import Tuple, Union

import torch

from .extension import load_extension

__all__ = ["KVCacheError", "StaticKVCache", "PyStaticKVCache", "extension_available", "write_and_read"]


class KVCacheError(ValueError):
    """Invalid use of a cache: layer or positions out of range, wrong shape, dtype or device."""


_C, _IMPORT_ERROR = load_extension()  # installed build, else built with ninja at first use, else (None, reason)
if _C is not None:
    _C._set_exception_type(KVCacheError)

KV_WRITE_SCHEMA = "(Tensor(a!) k_cache, Tensor(b!) v_cache, int layer, int start, Tensor k, Tensor v) -> ()"

if _C is None:  # the extension's op, in Python: one write path whichever cache is in use
    torch.library.define("ssg_engine::kv_write_", KV_WRITE_SCHEMA)

    @torch.library.impl("ssg_engine::kv_write_", "CompositeExplicitAutograd")
    def _kv_write_python(k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n, l = k.shape[0], k.shape[2]
        k_cache[layer, :n, :, start : start + l].copy_(k)
        v_cache[layer, :n, :, start : start + l].copy_(v)


@torch.library.register_fake("ssg_engine::kv_write_")
def _kv_write_fake(k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Writes in place, returns nothing: nothing to allocate."""


def write_and_read(
    k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``k``, ``v`` (n, H, l, D) written at positions ``[start, start + l)`` of rows ``:n`` of ``layer`` of the caches
    (num_layers, batch, H, max_len, D) by ``torch.ops.ssg_engine.kv_write_``; returns the K, V views
    (n, H, start + l, D). No host checks (the caller's shapes come from the model's cache layout)."""
    torch.ops.ssg_engine.kv_write_(k_cache, v_cache, layer, start, k, v)
    n, end = k.shape[0], start + k.shape[2]
    return k_cache[layer, :n, :, :end], v_cache[layer, :n, :, :end]


def extension_available() -> bool:
    """True when the C++ extension is in use."""
    return _C is not None


def _fmt_shape(shape: Tuple[int, ...]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


class PyStaticKVCache:
    """Pure-PyTorch twin of the C++ ``StaticKVCache`` (same API, errors and contents)."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        sizes = dict(num_layers=num_layers, batch=batch, num_heads=num_heads, max_len=max_len, head_dim=head_dim)
        for name, value in sizes.items():
            if value <= 0:
                raise KVCacheError(f"StaticKVCache: {name} must be >= 1, got {value}")
        shape = (num_layers, batch, num_heads, max_len, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=torch.device(device))
        self.v_cache = torch.zeros(shape, dtype=dtype, device=torch.device(device))
        self.num_layers, self.batch, self.num_heads, self.max_len, self.head_dim = shape

    def nbytes(self) -> int:
        """Bytes held by the K and V buffers."""
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` (n, H, l, D) at positions ``[start, start + l)`` of rows ``:n`` of ``layer``."""
        self._check_layer("write", layer)
        for name, t in (("k", k), ("v", v)):
            n, heads, l, dim = t.shape if t.ndim == 4 else (0, 0, 0, 0)
            if t.ndim != 4 or not 1 <= n <= self.batch or heads != self.num_heads or l < 1 or dim != self.head_dim:
                raise KVCacheError(
                    f"write: {name} must have shape (n <= {self.batch}, {self.num_heads}, l >= 1, {self.head_dim}), "
                    f"got {_fmt_shape(t.shape)}"
                )
            if t.dtype != self.k_cache.dtype or t.device != self.k_cache.device:
                raise KVCacheError(
                    f"write: {name} is {t.dtype} on {t.device}, the cache is {self.k_cache.dtype} on {self.k_cache.device}"
                )
        if v.shape != k.shape:
            raise KVCacheError(f"write: v has shape {_fmt_shape(v.shape)}, k has {_fmt_shape(k.shape)}")
        l = k.shape[2]
        if start < 0 or start + l > self.max_len:
            raise KVCacheError(f"write: positions [{start}, {start + l}) are outside the cache's [0, {self.max_len})")
        torch.ops.ssg_engine.kv_write_(self.k_cache, self.v_cache, layer, start, k, v)

    def read(self, layer: int, n: int, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """K, V views (n, H, length, D): rows ``:n``, positions ``[0, length)`` of ``layer``."""
        self._check_layer("read", layer)
        if not 1 <= n <= self.batch:
            raise KVCacheError(f"read: n must be in [1, {self.batch}], got {n}")
        if not 1 <= length <= self.max_len:
            raise KVCacheError(f"read: length must be in [1, {self.max_len}], got {length}")
        return self.k_cache[layer, :n, :, :length], self.v_cache[layer, :n, :, :length]

    def _check_layer(self, what: str, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise KVCacheError(f"{what}: layer must be in [0, {self.num_layers}), got {layer}")


_warned_missing_extension = False


def _warn_missing_extension() -> None:
    global _warned_missing_extension
    if not _warned_missing_extension:
        _warned_missing_extension = True
        warnings.warn(
            f"the C++ extension is not available ({_IMPORT_ERROR}); StaticKVCache uses the pure-PyTorch twin.",
            RuntimeWarning,
            stacklevel=3,
        )


if _C is not None:
    StaticKVCache = _C.StaticKVCache
else:

    class StaticKVCache(PyStaticKVCache):  # type: ignore[no-redef]
        """``PyStaticKVCache`` (the C++ extension is absent); warns once per process with the reason."""

        def __init__(self, *args, **kwargs) -> None:
            _warn_missing_extension()
            super().__init__(*args, **kwargs)
