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
temporary file and moved into place with ``os.replace`` (atomic). ``manifest.json`` records the settings
the images depend on (the model by its files' sha256 and its config; paths only as given, for
information) and the sha256 of every finished shard; it is created when the first shard is written, so a
run stopped by a bad argument leaves none behind. A restarted run refuses other settings, and a folder
holding shards but no manifest; it keeps the shards whose file matches its recorded sha256, remakes the
others (saying so for a file that does not match), and removes temporary files left by a killed run.
The final npz is assembled from the verified shards in (class, start) order, also via a temporary file
and ``os.replace``.

Data parallel
-------------
Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank loads the model, rank 0 checks the shard folder and
sends the list of missing shards (or its error) to all ranks, rank ``r`` makes missing shards
``r, r + W, r + 2W, ...`` (round-robin; ranks record their shards in the manifest one at a time, under
an ``flock`` of the folder), and after a barrier rank 0 assembles the npz. Backend: NCCL when sampling on CUDA (each rank on
``cuda:LOCAL_RANK``), gloo on CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..cli import (
    CLIParser, UsageError, add_model_args, add_sampling_args, check_output_dir, check_output_file, int_arg, load_from_args,
    resolve_ssg_args, run_cli, ssg_from_args,
)
from ..files import atomic_write, atomic_write_bytes, atomic_write_json, portable_path, sha256_bytes, sha256_file

STALL_ENV = "SSG_ENGINE_FID_SAMPLE_STALL_AFTER"  # test hook: stall (sleep) after this process wrote N shards
MANIFEST = "manifest.json"
INFO_KEYS = ("model_files", "shards")  # manifest entries recorded for information, not compared on resume


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


def npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` as the bytes of an ``.npy`` file."""
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# ----------------------------------------------------------------------------- shard folder and manifest


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder``: processes update its manifest one at a time."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_manifest(path: Path) -> Dict[str, object]:
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
            raise ValueError("no shard table")
    except ValueError as e:
        raise ValueError(f"{path} is damaged ({e}); delete {path.parent} to start over") from None
    return manifest


def _update_manifest(shard_dir: Path, settings: Dict[str, object], shards: Dict[str, Optional[str]]) -> None:
    """Under the folder lock: create the manifest from ``settings`` if it is absent, then record each shard's
    sha256 (or forget the shard, for ``None``)."""
    path = shard_dir / MANIFEST
    with _locked(shard_dir):
        manifest = _read_manifest(path) if path.is_file() else {**settings, "shards": {}}
        for name, sha in shards.items():
            if sha is None:
                manifest["shards"].pop(name, None)
            else:
                manifest["shards"][name] = sha
        atomic_write_json(path, manifest)


def _save_shard(shard_dir: Path, settings: Dict[str, object], shard: Shard, images: np.ndarray) -> None:
    """Write a finished shard atomically and record its sha256; the manifest exists before any shard file does."""
    data = npy_bytes(images)
    if not (shard_dir / MANIFEST).is_file():
        _update_manifest(shard_dir, settings, {})
    atomic_write_bytes(shard_dir / shard.name, data)
    _update_manifest(shard_dir, settings, {shard.name: sha256_bytes(data)})


def _pending_shards(shard_dir: Path, settings: Dict[str, object], plan: List[Shard], log: Callable[[str], None]) -> List[Shard]:
    """The shards of ``plan`` still to make: all but those whose file matches the sha256 in the manifest.

    Refuses (``ValueError``) a folder made with other settings, or holding shards but no manifest; a shard whose
    file does not match its recorded sha256 is forgotten (and remade), with one line saying so.
    """
    for leftover in shard_dir.glob(".*.tmp*"):  # from a killed run
        leftover.unlink(missing_ok=True)
    path = shard_dir / MANIFEST
    if not path.is_file():
        found = sorted(p.name for p in shard_dir.glob("c*_i*.npy"))
        if found:
            raise ValueError(
                f"{shard_dir} holds {len(found)} shard file(s) ({found[0]} ...) but no {MANIFEST}, so the settings "
                f"they were made with are unknown; delete {shard_dir} (or give another --shard-dir) to start over"
            )
        return list(plan)
    old = _read_manifest(path)
    diff = {k: (old.get(k), settings.get(k)) for k in sorted(set(old) | set(settings)) if k not in INFO_KEYS and old.get(k) != settings.get(k)}
    if diff:
        raise ValueError(f"{shard_dir} holds shards made with other settings {diff}; use another --shard-dir or delete it")
    recorded = old["shards"]
    pending, forget = [], {}
    for shard in plan:
        file = shard_dir / shard.name
        sha = recorded.get(shard.name)
        if sha is not None and file.is_file() and sha256_file(file) == sha:
            continue
        if sha is not None:
            if file.is_file():
                log(f"fid-sample: {file} does not match its sha256 in {MANIFEST}; remaking it")
            forget[shard.name] = None
        pending.append(shard)
    if forget:
        _update_manifest(shard_dir, settings, forget)
    return pending


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


def _model_files(args: argparse.Namespace) -> Dict[str, Path]:
    """The checkpoint files the images come from: --var/--vae, or the shipped model's."""
    if args.var:
        return {"var": Path(args.var), "vae": Path(args.vae)}
    from ..pretrained import pretrained_files

    vae_file, var_file, _ = pretrained_files()
    return {"var": var_file, "vae": vae_file}


def manifest_for(args: argparse.Namespace, var, classes: List[int]) -> Dict[str, object]:
    """The settings the images depend on (the model by its files' sha256 and its config), compared on resume, plus
    the model files as given (``model_files``, recorded only, never as machine-specific absolute paths)."""
    files = _model_files(args)
    ssg_on = args.ssg_beta is not None
    settings = {
        "format": 2, "model_sha256": {k: sha256_file(f) for k, f in files.items()}, "model_config": var.config.to_dict(),
        "model_files": {k: portable_path(f) for k, f in files.items()}, "per_class": args.per_class, "classes": classes,
        "num_classes_model": var.num_classes, "shard_size": args.batch_size, "seed": args.seed, "sampler": args.sampler,
        "device": torch.device(args.device).type, "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p,
        "temperature": args.temperature, "threads": args.threads if str(args.device) == "cpu" else None,
        "ssg_beta": args.ssg_beta, "ssg_prior": args.ssg_prior if ssg_on else None, "ssg_interp": args.ssg_interp if ssg_on else None,
    }
    return json.loads(json.dumps(settings))  # as it reads back from the file (lists, not tuples)


def sample_shard(var, vae, shard: Shard, args: argparse.Namespace, ssg) -> np.ndarray:
    from ..sampler import generate, sample_reference

    seed = shard_seed(args.seed, shard.cls, shard.start)
    kw = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, ssg=ssg)
    if args.sampler == "reference":
        images = sample_reference(var, shard.n, [shard.cls] * shard.n, g_seed=seed, **kw).images
    else:
        images = generate(var, vae, [shard.cls] * shard.n, seed=seed, **kw)
    return to_uint8_nhwc(images)


def _from_rank0(obj: object, world: int) -> object:
    """Rank 0's ``obj`` on every rank."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _assemble(shard_dir: Path, plan: List[Shard]) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, 3), labels int64 (N,)) from the shards in plan order, each checked against its sha256."""
    recorded = _read_manifest(shard_dir / MANIFEST)["shards"]
    images: Optional[np.ndarray] = None
    pos = 0
    for shard in plan:
        file = shard_dir / shard.name
        data = file.read_bytes() if file.is_file() else b""
        if sha256_bytes(data) != recorded.get(shard.name):
            raise ValueError(f"{file} is missing or does not match its sha256 in {MANIFEST}; run again to remake it")
        a = np.load(io.BytesIO(data))
        if images is None:
            images = np.empty((sum(s.n for s in plan),) + a.shape[1:], np.uint8)
        elif a.shape[1:] != images.shape[1:]:
            raise ValueError(f"{file} has images of shape {a.shape[1:]}, the first shard {images.shape[1:]}")
        images[pos : pos + shard.n] = a
        pos += shard.n
    labels = np.repeat(np.array([s.cls for s in plan], np.int64), [s.n for s in plan])
    return images, labels


def run_fid_sample(args: argparse.Namespace) -> int:
    check_output_file(args.out, (".npz",), "--out")
    if args.shard_dir is not None:
        check_output_dir(args.shard_dir, "--shard-dir")
    resolve_ssg_args(args)
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
            raise UsageError(f"--num-classes {n_cls} is out of range; give a number in [1, {nc_model}] (the model's classes)")
        classes = list(range(n_cls))
        plan = shard_plan(n_cls, args.per_class, args.batch_size, classes)
        ssg = ssg_from_args(args, args.ssg_beta)  # every argument is checked before any file is written
        decision: Tuple[Optional[Dict[str, object]], List[int], Optional[str]] = (None, [], None)
        if rank == 0:
            try:
                settings = manifest_for(args, var, classes)
                shard_dir.mkdir(parents=True, exist_ok=True)
                for leftover in out.parent.glob(f".{out.name}.tmp*"):  # from a killed run
                    leftover.unlink(missing_ok=True)
                pending = set(_pending_shards(shard_dir, settings, plan, log))
                decision = (settings, [i for i, s in enumerate(plan) if s in pending], None)
            except (ValueError, OSError) as e:  # sent to every rank, so that all of them stop
                decision = (None, [], str(e))
        settings, todo, error = _from_rank0(decision, world)
        if error is not None:
            raise ValueError(error)
        mine = [plan[i] for i in todo[rank::world]]
        log(f"fid-sample: {len(plan)} shards of <= {args.batch_size} images ({n_cls} classes x {args.per_class}); "
            f"{len(plan) - len(todo)} already done, {len(todo)} to make on {world} process(es)")
        stall_after = int(os.environ.get(STALL_ENV, "0") or 0)
        t0 = time.perf_counter()
        for i, shard in enumerate(mine):
            _save_shard(shard_dir, settings, shard, sample_shard(var, vae, shard, args, ssg))
            if (i + 1) % max(1, len(mine) // 20) == 0 or i + 1 == len(mine):
                log(f"  rank 0: {i + 1}/{len(mine)} shards ({time.perf_counter() - t0:.1f}s)")
            if stall_after and i + 1 >= stall_after:
                print(f"fid-sample: rank {rank} stalling after {i + 1} shards ({STALL_ENV})", file=sys.stderr, flush=True)
                while True:
                    time.sleep(60)
        _barrier(world)
        if rank == 0:
            arr, labels = _assemble(shard_dir, plan)
            atomic_write(out, lambda fh: np.savez(fh, arr_0=arr, arr_1=labels))  # a file object: numpy adds no ".npz"
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
    p.add_argument("--per-class", type=int_arg(1), default=50, help="images per class")
    p.add_argument("--num-classes", type=int_arg(1), default=None, help="sample classes 0..N-1 (default: all of the model's)")
    p.add_argument("--batch-size", type=int_arg(1), default=50, help="images per shard (= per sampling batch); part of the determinism key")
    p.add_argument("--seed", type=int_arg(0), default=0, help="base seed; shard (c, start) uses shard_seed(seed, c, start)")
    p.add_argument("--sampler", choices=["reference", "engine"], default="reference",
                   help="reference: sample_reference with g_seed (bit-reproducible on CPU); engine: ssg_engine.generate (the fast Engine on CUDA)")
    p.add_argument("--threads", type=int_arg(1), default=None,
                   help="CPU threads per process (default 1 on CPU: BLAS reductions, hence the bits, depend on the thread count)")
    p.add_argument("--out", default="samples.npz")
    p.add_argument("--shard-dir", default=None, help="where shards go (default: <out>.shards)")
    p.set_defaults(func=run_fid_sample)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ssg_engine.eval.fid_sample ...`` (same flags as ``ssg-engine fid-sample``; for torchrun)."""
    parser = CLIParser(prog="fid-sample")
    sub = parser.add_subparsers(dest="command", required=True)
    add_fid_sample_parser(sub)
    return run_cli(parser, ["fid-sample", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
