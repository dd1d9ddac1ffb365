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
reference sampler that seed is the ``seed`` of ``sample_reference``, with ``--sampler engine`` the
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

from ..files import atomic_write, atomic_write_bytes, atomic_write_json, portable_path, sha256_bytes, sha256_file
from ..params import SamplingParams
from ..validation import check_memory

STALL_ENV = "SSG_ENGINE_FID_SAMPLE_STALL_AFTER"  # test hook: stall (sleep) after this process wrote N shards
MANIFEST = "manifest.json"
INFO_KEYS = ("model_files", "shards")  # manifest entries recorded for information, not compared on resume
SAMPLERS = ("reference", "engine")


@dataclasses.dataclass(frozen=True)
class FidSampleJob:
    """One sample set: the model's checkpoint files, how to sample, and where the shards and the npz go.

    - ``model_files``: ``{"var": path, "vae": path}``, the files the model is loaded from (the manifest identifies the
      model by their sha256);
    - ``sampling``: every image's settings; ``sampling.seed`` is the base seed of ``shard_seed``;
    - ``per_class`` images of each class ``0 .. num_classes - 1`` (None: all of the model's classes), sampled in
      shards of ``shard_size`` by ``sampler`` (one of ``SAMPLERS``) on ``device``;
    - ``threads``: intra-op threads per process (None: 1 on CPU, see the determinism rule; torch's count elsewhere);
    - ``shard_dir``: where the shards go (None: ``<out>.shards``).
    """

    model_files: Dict[str, Path]
    out: Path
    sampling: SamplingParams
    per_class: int
    shard_size: int
    sampler: str
    device: str
    num_classes: Optional[int] = None
    threads: Optional[int] = None
    shard_dir: Optional[Path] = None


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


def manifest_for(job: FidSampleJob, var, classes: List[int]) -> Dict[str, object]:
    """The settings the images depend on (the model by its files' sha256 and its config, every sampling setting),
    compared on resume, plus the model files as given (``model_files``, recorded only, never as machine-specific
    absolute paths)."""
    p = job.sampling
    settings = {
        "format": 3, "model_sha256": {k: sha256_file(f) for k, f in job.model_files.items()}, "model_config": var.config.to_dict(),
        "model_files": {k: portable_path(f) for k, f in job.model_files.items()}, "per_class": job.per_class, "classes": classes,
        "num_classes_model": var.num_classes, "shard_size": job.shard_size, "seed": p.seed, "sampler": job.sampler,
        "device": torch.device(job.device).type, "cfg": p.cfg, "top_k": p.top_k, "top_p": p.top_p, "temperature": p.temperature,
        "threads": job.threads if job.device == "cpu" else None, "ssg": dataclasses.asdict(p.ssg) if p.ssg else None,
    }
    return json.loads(json.dumps(settings))  # as it reads back from the file (lists, not tuples)


def sample_shard(var, vae, shard: Shard, sampling: SamplingParams, sampler: str) -> np.ndarray:
    """The shard's images as uint8 NHWC, sampled with the seed ``shard_seed(sampling.seed, shard.cls, shard.start)`` (per-batch
    draws, ``seeding="batch"``, as the shards written before per-row seeding: a resumed set stays one rule)."""
    from ..api import generate
    from ..families.var.sampler import sample_reference

    seed = shard_seed(sampling.seed, shard.cls, shard.start)
    labels = [shard.cls] * shard.n
    if sampler == "reference":
        images = sample_reference(var, shard.n, labels, sampling, seed=seed).images
    else:
        images = generate(var, vae, labels, sampling, seed=seed, seeding="batch")
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


def run_fid_sample(job: FidSampleJob, load_models: Callable[[str], Tuple[object, object]]) -> None:
    """Make ``job``'s sample set: on every process of a ``torchrun`` group (or alone), load the model with
    ``load_models(device)`` -> ``(vae, var)`` on the process's device, make this process's missing shards, and (rank 0)
    write the npz. Bad settings raise ``ValueError`` before any file is written."""
    if job.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {job.sampler!r}")
    if job.sampling.seed is None:
        raise ValueError("fid-sample needs an integer seed: every shard's seed is derived from it")
    rank, world, device = _init_dist(job.device)
    job = dataclasses.replace(job, device=device, threads=job.threads or (1 if device == "cpu" else torch.get_num_threads()))
    old_threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(job.threads)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if rank == 0 else (lambda *a: None)
    try:
        out = Path(job.out)
        shard_dir = Path(job.shard_dir) if job.shard_dir else out.with_name(out.name + ".shards")
        vae, var = load_models(device)
        nc_model = var.num_classes
        n_cls = job.num_classes if job.num_classes is not None else nc_model
        if not 0 < n_cls <= nc_model:
            raise ValueError(f"--num-classes {n_cls} is out of range; give a number in [1, {nc_model}] (the model's classes)")
        side = var.patch_nums[-1] * vae.downsample
        check_memory(n_cls * job.per_class * 3 * side * side, f"--per-class {job.per_class}",
                     f"the {n_cls} classes' uint8 images are assembled in memory into --out; give a smaller --per-class")
        classes = list(range(n_cls))
        plan = shard_plan(n_cls, job.per_class, job.shard_size, classes)
        decision: Tuple[Optional[Dict[str, object]], List[int], Optional[str]] = (None, [], None)
        if rank == 0:
            try:
                settings = manifest_for(job, var, classes)
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
        log(f"fid-sample: {len(plan)} shards of <= {job.shard_size} images ({n_cls} classes x {job.per_class}); "
            f"{len(plan) - len(todo)} already done, {len(todo)} to make on {world} process(es)")
        stall_after = int(os.environ.get(STALL_ENV, "0") or 0)
        t0 = time.perf_counter()
        for i, shard in enumerate(mine):
            _save_shard(shard_dir, settings, shard, sample_shard(var, vae, shard, job.sampling, job.sampler))
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


if __name__ == "__main__":  # the old entry point: the command is `ssg-engine fid-sample`
    from ..validation import refuse_module_run

    refuse_module_run("ssg_engine.eval.fid_sample", "fid-sample")
