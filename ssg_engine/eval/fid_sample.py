"""``ssg-engine fid-sample``: a class-conditional sample set in the OpenAI guided-diffusion evaluator's layout.

Output: ``np.savez(out, arr_0, arr_1)`` with ``arr_0`` uint8 (N, H, W, 3) images (``round(255 x)`` of
the sampler's [0, 1] output) ordered by class, then index within the class, and ``arr_1`` int64 labels
(N,) — what ``guided-diffusion/evaluations/evaluator.py`` reads (it uses ``arr_0``).

Determinism rule
----------------
The set is cut into fixed **shards**: class ``c``, indices ``[start, start + shard_size)`` with
``start = 0, shard_size, 2 * shard_size, ...`` (``shard_size`` = ``--batch-size``; the last shard of a
class may be shorter). A shard is sampled as one batch of ``n`` labels ``c`` with the seed
``shard_seed(seed, c, start)`` (a SHA-256 of ``"ssg-engine-fid:{seed}:{c}:{start}"``, 62 bits): with the
reference sampler that seed is the ``g_seed`` of ``sample_reference``, with ``--sampler engine`` the
Engine's Philox seed. So every image depends only on (seed, class, index, shard size, sampling
settings) — never on the number of processes, the rank that made it, the order shards were made in,
or on how often the run was interrupted. With the reference sampler on CPU the npz is bit-identical
for any world size (tested with ``torchrun --nproc_per_node 2``) as long as every process uses the same
number of intra-op threads (``--threads``, default 1 on CPU: matrix-multiply reductions are split by
thread, so the thread count changes the low bits); on a GPU it is as deterministic as the kernels are.
Scale out on CPU with processes (``torchrun --nproc_per_node N``), not threads.

Resuming
--------
Shards go to ``--shard-dir`` (default ``<out>.shards/``) as ``c{class}_i{start}.npy``, each written to a
temporary file and moved into place with ``os.replace`` (atomic), so a shard file that exists is
complete. A restarted run skips the shards that exist (and have the expected shape) and makes only the
rest; ``manifest.json`` records the settings the images depend on, and a restart with different
settings is refused. The final npz is assembled from the shards in (class, start) order, also via a
temporary file and ``os.replace``.

Data parallel
-------------
Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank loads the model, all ranks list the missing shards
(then a barrier), rank ``r`` makes missing shards ``r, r + W, r + 2W, ...`` (round-robin), and after a
second barrier rank 0 assembles the npz. Backend: NCCL when sampling on CUDA (each rank on
``cuda:LOCAL_RANK``), gloo on CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..cli import add_model_args, add_sampling_args, load_from_args, ssg_from_args

STALL_ENV = "SSG_ENGINE_FID_SAMPLE_STALL_AFTER"  # test hook: stall (sleep) after this process wrote N shards
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Shard:
    cls: int
    start: int
    n: int

    @property
    def name(self) -> str:
        return f"c{self.cls:05d}_i{self.start:07d}.npy"


def shard_seed(seed: int, cls: int, start: int) -> int:
    """The seed of shard (cls, start): a fixed function of (seed, cls, start) only (62 bits)."""
    h = hashlib.sha256(f"ssg-engine-fid:{int(seed)}:{int(cls)}:{int(start)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 62) - 1)


def shard_plan(num_classes: int, per_class: int, shard_size: int, classes: Optional[Sequence[int]] = None) -> List[Shard]:
    """All shards in output order: class by class, index ranges of ``shard_size``."""
    if per_class <= 0 or shard_size <= 0:
        raise ValueError(f"per_class and shard_size must be positive, got {per_class} and {shard_size}")
    classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    return [Shard(c, s, min(shard_size, per_class - s)) for c in classes for s in range(0, per_class, shard_size)]


def to_uint8_nhwc(images01: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3), rounding ``255 x`` to nearest."""
    return images01.detach().float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:  # a file object: numpy does not append ".npz"
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _shard_ok(path: Path, n: int) -> bool:
    """A shard file exists and holds (n, H, W, 3) uint8 (header check only)."""
    if not path.is_file():
        return False
    try:
        a = np.load(path, mmap_mode="r")
    except Exception:
        return False
    return a.dtype == np.uint8 and a.ndim == 4 and a.shape[0] == n and a.shape[3] == 3


# ----------------------------------------------------------------------------- models


# ----------------------------------------------------------------------------- distributed


def _dist_env() -> Tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _init_dist(device: str) -> Tuple[int, int, str]:
    rank, world, local = _dist_env()
    if world > 1:
        import torch.distributed as dist

        if device.startswith("cuda"):
            device = f"cuda:{local}"
            torch.cuda.set_device(local)
            backend = "nccl"
        else:
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=timedelta(hours=12))
    return rank, world, device


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------- main


def _abspath(p: Optional[str]) -> Optional[str]:
    return str(Path(p).resolve()) if p else None


def manifest_for(args: argparse.Namespace, num_classes: int, classes: List[int]) -> Dict[str, object]:
    return {
        "format": 1, "var": _abspath(args.var), "vae": _abspath(args.vae), "per_class": args.per_class, "classes": classes,
        "num_classes_model": num_classes, "shard_size": args.batch_size, "seed": args.seed, "sampler": args.sampler,
        "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p, "temperature": args.temperature,
        "threads": args.threads if str(args.device) == "cpu" else None, "ssg_beta": args.ssg_beta, "ssg_prior": args.ssg_prior if args.ssg_beta is not None else None,
        "ssg_interp": args.ssg_interp if args.ssg_beta is not None else None,
    }


def sample_shard(var, vae, shard: Shard, args: argparse.Namespace, ssg) -> np.ndarray:
    from ..sampler import generate, sample_reference

    seed = shard_seed(args.seed, shard.cls, shard.start)
    kw = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, ssg=ssg)
    if args.sampler == "reference":
        images = sample_reference(var, shard.n, [shard.cls] * shard.n, g_seed=seed, **kw).images
    else:
        images = generate(var, vae, [shard.cls] * shard.n, seed=seed, **kw)
    return to_uint8_nhwc(images)


def run_fid_sample(args: argparse.Namespace) -> int:
    if args.per_class <= 0 or args.batch_size <= 0:
        raise SystemExit("error: --per-class and --batch-size must be positive")
    rank, world, device = _init_dist(args.device)
    args.device = device
    if args.threads is None:
        args.threads = 1 if device == "cpu" else torch.get_num_threads()
    old_threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(args.threads)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if rank == 0 else (lambda *a: None)
    try:
        out = Path(args.out)
        shard_dir = Path(args.shard_dir) if args.shard_dir else out.with_name(out.name + ".shards")
        vae, var = load_from_args(args)
        nc_model = var.num_classes
        n_cls = args.num_classes if args.num_classes is not None else nc_model
        if not 0 < n_cls <= nc_model:
            raise SystemExit(f"error: --num-classes must be in [1, {nc_model}], got {n_cls}")
        classes = list(range(n_cls))
        plan = shard_plan(n_cls, args.per_class, args.batch_size, classes)
        manifest = manifest_for(args, nc_model, classes)
        shard_dir.mkdir(parents=True, exist_ok=True)
        mpath = shard_dir / MANIFEST
        if mpath.is_file():
            old = json.loads(mpath.read_text())
            diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
            if diff:
                raise SystemExit(f"error: {shard_dir} holds shards made with other settings {diff}; use another --shard-dir or delete it")
        pending = [s for s in plan if not _shard_ok(shard_dir / s.name, s.n)]
        _barrier(world)  # every rank has listed the missing shards before any rank writes one
        if rank == 0 and not mpath.is_file():
            tmp = shard_dir / f".{MANIFEST}.tmp{os.getpid()}"
            tmp.write_text(json.dumps(manifest, indent=1))
            os.replace(tmp, mpath)
        mine = pending[rank::world]
        log(f"fid-sample: {len(plan)} shards of <= {args.batch_size} images ({n_cls} classes x {args.per_class}); "
            f"{len(plan) - len(pending)} already done, {len(pending)} to make on {world} process(es)")
        ssg = ssg_from_args(args, args.ssg_beta)
        stall_after = int(os.environ.get(STALL_ENV, "0") or 0)
        t0 = time.perf_counter()
        for i, shard in enumerate(mine):
            _atomic_save_npy(shard_dir / shard.name, sample_shard(var, vae, shard, args, ssg))
            if (i + 1) % max(1, len(mine) // 20) == 0 or i + 1 == len(mine):
                log(f"  rank 0: {i + 1}/{len(mine)} shards ({time.perf_counter() - t0:.1f}s)")
            if stall_after and i + 1 >= stall_after:
                print(f"fid-sample: rank {rank} stalling after {i + 1} shards ({STALL_ENV})", file=sys.stderr, flush=True)
                while True:
                    time.sleep(60)
        _barrier(world)
        if rank == 0:
            missing = [s.name for s in plan if not _shard_ok(shard_dir / s.name, s.n)]
            if missing:
                raise SystemExit(f"error: shards missing after sampling: {missing[:5]}")
            first = np.load(shard_dir / plan[0].name)
            arr = np.empty((sum(s.n for s in plan),) + first.shape[1:], np.uint8)
            labels = np.empty(arr.shape[0], np.int64)
            pos = 0
            for s in plan:
                a = np.load(shard_dir / s.name)
                if a.shape[1:] != first.shape[1:]:
                    raise SystemExit(f"error: shard {s.name} has image shape {a.shape[1:]}, expected {first.shape[1:]}")
                arr[pos : pos + s.n] = a
                labels[pos : pos + s.n] = s.cls
                pos += s.n
            _atomic_savez(out, arr_0=arr, arr_1=labels)
            print(f"wrote {out}: arr_0 {arr.shape} uint8 (class-major), arr_1 labels ({time.perf_counter() - t0:.1f}s)")
        _barrier(world)
    finally:
        torch.set_num_threads(old_threads)
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


def add_fid_sample_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "fid-sample",
        help="class-conditional samples as an npz for the guided-diffusion evaluator (resumable, torchrun data-parallel)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--per-class", type=int, default=50, help="images per class")
    p.add_argument("--num-classes", type=int, default=None, help="sample classes 0..N-1 (default: all of the model's)")
    p.add_argument("--batch-size", type=int, default=50, help="images per shard (= per sampling batch); part of the determinism key")
    p.add_argument("--seed", type=int, default=0, help="base seed; shard (c, start) uses shard_seed(seed, c, start)")
    p.add_argument("--sampler", choices=["reference", "engine"], default="reference",
                   help="reference: sample_reference with g_seed (bit-reproducible on CPU); engine: ssg_engine.generate (the fast Engine on CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default 1 on CPU: BLAS reductions, hence the bits, depend on the thread count)")
    p.add_argument("--out", default="samples.npz")
    p.add_argument("--shard-dir", default=None, help="where shards go (default: <out>.shards)")
    p.set_defaults(func=run_fid_sample)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ssg_engine.eval.fid_sample ...`` (same flags as ``ssg-engine fid-sample``; for torchrun)."""
    parser = argparse.ArgumentParser(prog="fid-sample")
    sub = parser.add_subparsers(dest="command", required=True)
    add_fid_sample_parser(sub)
    args = parser.parse_args(["fid-sample", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
