"""Per-row seeding: each image row of a request draws from its own random stream, so that a request's images do not
depend on what it was batched with (the service, the pipeline and ``generate`` use it).

The key of row ``r`` of a request with seed ``s`` (:func:`row_seeds`) is a splitmix64 mix, kept in [0, 2^63)::

    key(s, r) = splitmix64(splitmix64(s mod 2^64) + r mod 2^64) >> 1

where ``splitmix64(x)`` is the finaliser ``z = x + 0x9E3779B97F4A7C15; z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9;
z = (z ^ z >> 27) * 0x94D049BB133111EB; z ^ z >> 31`` (all mod 2^64). Row ``b`` of a batch then draws only from
``row_seeds[b]`` and its own position: the reference samplers give it its own ``torch.Generator`` (:func:`row_generators`;
HART's diffusion noise and MaskGIT orders from ``key + 1`` and ``key + 2``, as the batch rule does with ``seed``), the
Engine's kernels read ``seed[b]`` as the Philox key with a per-scale offset and the row's own token index as the
counter. CFG's unconditional rows use their image row's seed. ``None`` everywhere keeps the per-batch draws from
``seed`` (upstream's: the golden tests and ``autoregressive_infer_cfg``).
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Union

import torch

from .params import check_seed
from .validation import as_number

_M64 = (1 << 64) - 1
RowSeeds = Union[torch.Tensor, Sequence[int]]


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def row_seeds(seed: int, count: int, start: int = 0) -> torch.Tensor:
    """The keys of rows ``start .. start + count - 1`` of a request with ``seed`` (see the module docstring):
    (count,) int64 on the CPU, each in [0, 2^63). Deterministic; distinct rows (and seeds) give distinct keys except
    for 64-bit collisions."""
    seed = check_seed(seed)
    if seed is None:
        raise ValueError("seed: row seeds need an integer seed in [-2**63, 2**63 - 1]; got None")
    count = as_number(count, "count", "an integer >= 0", integer=True, valid=lambda v: v >= 0)
    start = as_number(start, "start", "an integer >= 0 with start + count <= 2**63", integer=True, valid=lambda v: 0 <= v <= 2**63 - count)
    base = _splitmix64(seed & _M64)
    return torch.tensor([_splitmix64((base + r) & _M64) >> 1 for r in range(start, start + count)], dtype=torch.int64)


def check_row_seeds(seeds: Optional[RowSeeds], batch: int, device: Union[str, torch.device, None] = None,
                    name: str = "row_seeds") -> Optional[torch.Tensor]:
    """``seeds`` (a (batch,) integer tensor or a sequence of ``batch`` ints in int64's range, one per image row) as a
    (batch,) int64 tensor on ``device``; None stays None (per-batch draws). ``ValueError`` naming ``name`` otherwise."""
    if seeds is None:
        return None
    fix = f"give one int64 seed per image row ({batch}), e.g. ssg_engine.seeding.row_seeds(seed, {batch})"
    if torch.is_tensor(seeds):
        if seeds.ndim != 1 or seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:
            raise ValueError(f"{name}: expected a 1-d integer tensor; got {seeds.dtype} {tuple(seeds.shape)}; {fix}")
        values = seeds.to(device=device, dtype=torch.int64)
    else:
        if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
            raise ValueError(f"{name}: expected a tensor or a sequence of ints; got {type(seeds).__name__}; {fix}")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not -(2**63) <= int(s) < 2**63:
                raise ValueError(f"{name}: {s!r} is not an int64 integer; {fix}")
        values = torch.tensor([int(s) for s in seeds], dtype=torch.int64, device=device)
    if values.shape[0] != batch:
        raise ValueError(f"{name}: got {values.shape[0]} seeds for {batch} image rows; {fix}")
    return values


def row_generators(seeds: torch.Tensor, device: Union[str, torch.device], add: int = 0) -> List[torch.Generator]:
    """One ``torch.Generator`` on ``device`` per row seed of ``seeds`` (B,), seeded with ``seed + add`` (a host read)."""
    generators = []
    for s in seeds.tolist():
        generator = torch.Generator(device=device)
        generator.manual_seed((s + add) % 2**64)
        generators.append(generator)
    return generators
