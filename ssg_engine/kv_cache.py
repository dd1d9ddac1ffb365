"""Static KV cache for VAR next-scale generation: preallocated K/V storage plus a slot allocator.

A pool holds ``k_cache`` / ``v_cache`` of shape ``(num_layers, capacity, num_heads, max_len, head_dim)``.
A sequence owns one *slot* (an index into ``capacity``). All sequences of a batch advance in
lockstep: for each scale, every layer ``append``\\ s that scale's K/V (``(n, H, l, D)``) after the
slots' current lengths, then ``advance`` adds ``l`` to the lengths once.

Bookkeeping (which slots are allocated, a host mirror of each slot's length) stays on the host, so
every check runs without a device sync; ``append`` computes positions on the device from
``lengths`` and never reallocates, so it can be captured in a CUDA graph. Slot tensors returned by
``allocate`` (and slices of them) are resolved from host records; any other slots tensor is read
back, which on CUDA is a device sync (and not allowed during graph capture).

Note that replaying a captured graph updates the device ``lengths`` but not the host mirror.

Two implementations with the same API and the same errors:

* ``CppKVCachePool``: the C++ extension ``ssg_engine._C`` (append is the custom op
  ``torch.ops.ssg_engine.kv_append_``);
* ``PyKVCachePool``: pure Python / torch ops, used when the extension is not built.

``KVCachePool`` is the extension class when available, else ``PyKVCachePool`` (with a
``RuntimeWarning``, once per process).
"""
from __future__ import annotations

import operator
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .extension import load_extension

__all__ = ["KVCacheError", "PoolExhaustedError", "KVCachePool", "PyKVCachePool", "extension_available", "kv_append_"]


class KVCacheError(ValueError):
    """Invalid use of a pool: bad slot ids, double free, overflow of max_len, wrong shape/dtype/device."""


class PoolExhaustedError(RuntimeError):
    """Not enough free slots (or no contiguous run of them) for an allocation."""


SlotsLike = Union[torch.Tensor, Sequence[int]]

_C, _IMPORT_ERROR = load_extension()  # installed build, else built with ninja at first use, else (None, reason)
if _C is not None:
    _C._set_exception_types(PoolExhaustedError, KVCacheError)


def extension_available() -> bool:
    """True when the C++ extension ``ssg_engine._C`` imported."""
    return _C is not None


def kv_append_(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    layer: int,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Write ``k``, ``v`` ``(n, H, l, D)`` at positions ``[lengths[s], lengths[s] + l)`` of slots ``s``.

    ``k_cache`` / ``v_cache``: ``(layers, capacity, H, max_len, D)``; ``lengths``: ``(capacity,)`` int64;
    ``slots``: ``(n,)`` int64, all on one device. Device index math only (no sync, no bounds check:
    the pool checks bounds on the host). Same computation as the C++ op
    ``torch.ops.ssg_engine.kv_append_``.
    """
    n, num_heads, l, _ = k.shape
    pos = lengths.index_select(0, slots).unsqueeze(1) + torch.arange(l, device=slots.device)  # (n, l)
    heads = torch.arange(num_heads, device=slots.device)
    index = (slots.view(n, 1, 1), heads.view(1, num_heads, 1), pos.view(n, 1, l))
    k_cache[layer].index_put_(index, k)
    v_cache[layer].index_put_(index, v)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class PyKVCachePool:
    """Pure-Python KV-cache pool (same API and errors as the C++ ``CppKVCachePool``).

    ``k_cache`` / ``v_cache``: ``(num_layers, capacity, num_heads, max_len, head_dim)`` zeros;
    ``lengths``: ``(capacity,)`` int64 on ``device``.
    """

    def __init__(
        self,
        num_layers: int,
        capacity: int,
        num_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device, int] = "cpu",
    ) -> None:
        sizes = dict(num_layers=num_layers, capacity=capacity, num_heads=num_heads, max_len=max_len, head_dim=head_dim)
        for name, value in sizes.items():
            if value <= 0:
                raise KVCacheError(f"KVCachePool: {name} must be >= 1, got {value}")
        self.num_layers, self.capacity, self.num_heads = num_layers, capacity, num_heads
        self.max_len, self.head_dim = max_len, head_dim
        shape = (num_layers, capacity, num_heads, max_len, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=torch.device(device))
        self.v_cache = torch.zeros(shape, dtype=dtype, device=torch.device(device))
        self.lengths = torch.zeros(capacity, dtype=torch.long, device=self.k_cache.device)
        self.num_free = capacity
        self._host_len: List[int] = [0] * capacity
        self._allocated: List[bool] = [False] * capacity
        # Records of allocate() calls: storage key -> (tensor, host ids, version at allocation).
        self._records: Dict[int, Tuple[torch.Tensor, List[int], int]] = {}
        self._owner: List[Optional[int]] = [None] * capacity

    # -- allocation ----------------------------------------------------------------------------
    def allocate(self, n: int, contiguous: bool = True) -> torch.Tensor:
        """Allocate ``n`` slots; returns their int64 ids ``(n,)`` on the device (lengths set to 0).

        ``contiguous=True`` returns the lowest run ``start .. start+n-1``; otherwise the ``n``
        lowest free slots.
        """
        if n <= 0:
            raise KVCacheError(f"allocate: n must be >= 1, got {n}")
        if n > self.num_free:
            raise PoolExhaustedError(
                f"pool exhausted: asked for {n} slots, {self.num_free} free (capacity {self.capacity})"
            )
        if contiguous:
            run, longest, start = 0, 0, -1
            for s in range(self.capacity):
                run = 0 if self._allocated[s] else run + 1
                longest = max(longest, run)
                if run == n:
                    start = s - n + 1
                    break
            if start < 0:
                raise PoolExhaustedError(
                    f"pool exhausted: no contiguous run of {n} free slots (free {self.num_free}, "
                    f"longest run {longest}); pass contiguous=False to accept scattered slots"
                )
            ids = list(range(start, start + n))
        else:
            ids = [s for s in range(self.capacity) if not self._allocated[s]][:n]

        # A normal (non-inference) tensor, so its version counter tells us whether it was
        # modified in place after we recorded its contents.
        with torch.inference_mode(False):
            slots = torch.tensor(ids, dtype=torch.long).to(self.k_cache.device)
        self.lengths.index_fill_(0, slots, 0)
        key = _storage_key(slots)
        for s in ids:
            self._allocated[s] = True
            self._host_len[s] = 0
            self._owner[s] = key
        self.num_free -= n
        self._records[key] = (slots, ids, slots._version)
        return slots

    def free(self, slots: SlotsLike) -> None:
        """Return slots (tensor or sequence of ints) to the pool."""
        ids = self._ids("free", slots)
        self._check_ids("free", ids, double_free_hint=True)
        for s in ids:
            self._drop_record(self._owner[s])
            self._allocated[s] = False
        self.num_free += len(ids)

    def fill_length(self, slot: int) -> int:
        """Host-side fill length of one allocated slot."""
        self._check_ids("fill_length", [slot])
        return self._host_len[slot]

    def reset(self, slots: SlotsLike) -> None:
        """Set the lengths of allocated slots to 0 without freeing them."""
        ids = self._ids("reset", slots)
        self._check_ids("reset", ids)
        index = slots if isinstance(slots, torch.Tensor) else torch.tensor(ids, dtype=torch.long)
        self.lengths.index_fill_(0, index.to(self.lengths.device), 0)
        for s in ids:
            self._host_len[s] = 0

    # -- K/V -----------------------------------------------------------------------------------
    def append(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` ``(n, H, l, D)`` after each slot's current length in ``layer``.

        No reallocation and no device sync; ``lengths`` is unchanged (see ``advance``).
        """
        self._check_layer("append", layer)
        ids = self._host_ids("append", slots)
        self._check_kv("k", k, len(ids))
        self._check_kv("v", v, len(ids))
        if v.shape != k.shape:
            raise KVCacheError(f"append: k and v shapes differ: {_fmt_shape(k.shape)} vs {_fmt_shape(v.shape)}")
        self._check_ids("append", ids)
        self._check_room("append", ids, k.shape[2])
        kv_append_(self.k_cache, self.v_cache, self.lengths, layer, slots, k, v)

    def advance(self, slots: torch.Tensor, l: int) -> None:
        """``lengths[slots] += l`` on the device and in the host mirror."""
        ids = self._host_ids("advance", slots)
        if l <= 0:
            raise KVCacheError(f"advance: l must be >= 1, got {l}")
        self._check_ids("advance", ids)
        self._check_room("advance", ids, l)
        self.lengths.index_add_(0, slots, torch.full((len(ids),), l, dtype=torch.long, device=slots.device))
        for s in ids:
            self._host_len[s] += l

    def view(self, layer: int, slots: torch.Tensor, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """K, V ``(n, H, length, D)`` of these slots: a view for a contiguous run, else a gather."""
        self._check_layer("view", layer)
        ids = self._host_ids("view", slots)
        if length <= 0 or length > self.max_len:
            raise KVCacheError(f"view: length must be in [1, {self.max_len}], got {length}")
        self._check_ids("view", ids)
        k = self.k_cache[layer].narrow(2, 0, length)
        v = self.v_cache[layer].narrow(2, 0, length)
        if ids == list(range(ids[0], ids[0] + len(ids))):
            return k.narrow(0, ids[0], len(ids)), v.narrow(0, ids[0], len(ids))
        return k.index_select(0, slots), v.index_select(0, slots)

    # -- checks (host only) --------------------------------------------------------------------
    def _ids(self, op: str, slots: SlotsLike) -> List[int]:
        if isinstance(slots, torch.Tensor):
            return self._host_ids(op, slots)
        return [operator.index(s) for s in slots]

    def _host_ids(self, op: str, slots: torch.Tensor) -> List[int]:
        """Host copy of a slots tensor: from the allocate() record when possible, else read back."""
        if not isinstance(slots, torch.Tensor):
            raise TypeError(f"{op}: slots must be a torch.Tensor, got {type(slots).__name__}")
        if slots.dim() != 1 or slots.dtype != torch.long or slots.device != self.k_cache.device:
            raise KVCacheError(
                f"{op}: slots must be a 1-D int64 tensor on {self.k_cache.device}, "
                f"got {slots.dim()}-D {slots.dtype} on {slots.device}"
            )
        n = slots.shape[0]
        if n == 0:
            raise KVCacheError(f"{op}: no slots given")
        if not slots.is_inference():
            record = self._records.get(_storage_key(slots))
            if record is not None and record[2] == slots._version:
                base_tensor, ids, _ = record
                base = slots.storage_offset() - base_tensor.storage_offset()
                stride = slots.stride(0)
                first, last = base, base + (n - 1) * stride
                if min(first, last) >= 0 and max(first, last) < len(ids):
                    return [ids[base + i * stride] for i in range(n)]
        return slots.tolist()

    def _check_ids(self, op: str, ids: List[int], double_free_hint: bool = False) -> None:
        if not ids:
            raise KVCacheError(f"{op}: no slots given")
        seen = set()
        for s in ids:
            if s < 0 or s >= self.capacity:
                raise KVCacheError(f"{op}: slot id {s} out of range [0, {self.capacity})")
            if s in seen:
                raise KVCacheError(f"{op}: duplicate slot id {s}")
            seen.add(s)
            if not self._allocated[s]:
                hint = " (double free?)" if double_free_hint else ""
                raise KVCacheError(f"{op}: slot {s} is not allocated{hint}")

    def _check_room(self, op: str, ids: List[int], l: int) -> None:
        for s in ids:
            room = self.max_len - self._host_len[s]
            if l > room:
                raise KVCacheError(
                    f"{op}: slot {s} has length {self._host_len[s]}; adding {l} tokens exceeds "
                    f"max_len {self.max_len} (room for {room})"
                )

    def _check_layer(self, op: str, layer: int) -> None:
        if layer < 0 or layer >= self.num_layers:
            raise KVCacheError(f"{op}: layer {layer} out of range [0, {self.num_layers})")

    def _check_kv(self, name: str, t: torch.Tensor, n: int) -> None:
        if t.dtype != self.k_cache.dtype:
            raise KVCacheError(f"append: {name} dtype {t.dtype} does not match the pool dtype {self.k_cache.dtype}")
        if t.device != self.k_cache.device:
            raise KVCacheError(f"append: {name} is on {t.device} but the pool is on {self.k_cache.device}")
        ok = t.dim() == 4 and t.shape[0] == n and t.shape[1] == self.num_heads and t.shape[2] >= 1
        if not (ok and t.shape[3] == self.head_dim):
            raise KVCacheError(
                f"append: {name} must have shape (n, H, l, D) = ({n}, {self.num_heads}, l>=1, {self.head_dim}), "
                f"got {_fmt_shape(t.shape)}"
            )

    def _drop_record(self, key: Optional[int]) -> None:
        record = self._records.pop(key, None) if key is not None else None
        if record is not None:
            for s in record[1]:
                if self._owner[s] == key:
                    self._owner[s] = None


_warned_missing_extension = False


def _warn_missing_extension() -> None:
    global _warned_missing_extension
    if not _warned_missing_extension:
        _warned_missing_extension = True
        warnings.warn(
            f"the C++ extension is not available ({_IMPORT_ERROR}); KVCachePool uses the pure-Python fallback.",
            RuntimeWarning,
            stacklevel=3,
        )


if _C is not None:
    CppKVCachePool = _C.KVCachePool
    KVCachePool = CppKVCachePool
    __all__.append("CppKVCachePool")
else:

    class KVCachePool(PyKVCachePool):  # type: ignore[no-redef]
        """``PyKVCachePool`` (the C++ extension is absent); warns once per process."""

        def __init__(self, *args, **kwargs) -> None:
            _warn_missing_extension()
            super().__init__(*args, **kwargs)
