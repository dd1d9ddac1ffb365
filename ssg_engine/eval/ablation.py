"""``ssg-engine eval``: the SSG ablation table and the spectral evidence, on a Fashion-MNIST model: the class-conditional
VAR, or a text-conditional one: the Infinity-family model (``--family infinity``) or the HART-family model
(``--family hart``; ``--no-residual`` drops its last-scale diffusion residual, the ablation only hybrid tokens allow).

Arms (every arm is run at every temperature of ``--temperatures``, so no arm gets a temperature the
others do not):

- ``baseline``: no SSG;
- ``dse``: SSG with the DSE prior, for each beta of ``--betas``;
- ``bilinear`` / ``bicubic`` / ``nearest`` / ``area``: SSG with that interpolation as the prior
  (the ablations), for each beta.

Per arm and seed: ``--samples`` class-balanced samples (labels ``i % num_classes``) drawn in batches
whose seeds depend only on (seed, batch index), so all arms share the same random numbers (per-batch draws:
``generate(..., seeding="batch")``, the draws the stored results and bench/results/quality were made with). A text-conditional
model is asked for sample ``i`` with the prompt of class ``i % 10`` in held-out template
``(i // 10) % len(HELD_OUT_TEMPLATES)`` (``ssg_engine.data``: templates never seen in training); its ``cfg`` is
Infinity's CFG weight ``w`` and its temperature Infinity's ``tau``, at every scale (HART: the end of its CFG ramp, and
its temperature at every scale). Metrics:

- ``acc``: accuracy of our Fashion-MNIST classifier on the samples w.r.t. the class asked for;
- ``fd_cls``: Fréchet distance in the classifier's 128-d penultimate space to the 10k test images;
- ``precision`` / ``recall`` (k=3) in the same space, against a same-size random subset of the test set;
- ``fid`` / ``kid`` (Inception-v3, ``metrics.py``) for the arms chosen by ``--fid-arms``
  (``main`` = baseline and DSE, ``all``, ``none``) against the first ``--inception-ref-n`` test images.

Mean ± std over seeds go to ``ablation.json`` and ``ablation.md``. ``spectrum.png``: radially averaged
amplitude spectrum of the generated images divided by the test set's (1 = the data's spectrum), for the
baseline and the DSE arms (seed 0, at ``--spectrum-temperature``), plus the priors at the largest beta.
Every (arm, seed) result is stored as soon as it is computed, atomically, in ``OUT_DIR/runs/`` under a
name made from a hash of everything it depends on (model weights, sampler, samples, batch size, cfg,
top-k, top-p, temperature, SSG prior / beta / interpolation, classifier, FID reference, seed);
``ablation.json`` (rewritten after every arm) gathers the results of the current grid. With ``--resume``
the stored results whose settings match are reused, so a rerun after an interruption, or with a larger
grid or more seeds, computes only what is missing; stored results are never deleted. Paths in the
output are relative to the repository (or ``~``), never machine-specific absolute paths.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.util
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..files import atomic_output, atomic_write, atomic_write_bytes, atomic_write_json, portable_path
from ..pretrained import SAMPLING

DEFAULT_PRIORS = ("dse", "bilinear", "bicubic", "nearest", "area")
DEFAULT_BETAS = (0.25, 0.5, 1.0)
DEFAULT_TEMPERATURES = (1.0,)
RUNS_DIR = "runs"  # OUT_DIR/runs/: one stored result per (arm, seed), named by the hash of its settings
METRIC_KEYS = ("acc", "fd_cls", "precision", "recall", "fid", "kid")


@dataclasses.dataclass(frozen=True)
class Arm:
    temperature: float
    prior: Optional[str] = None  # None: baseline
    beta: float = 0.0

    @property
    def name(self) -> str:
        base = "baseline" if self.prior is None else f"{self.prior} b={self.beta:g}"
        return f"{base} T={self.temperature:g}"

    @property
    def main(self) -> bool:
        return self.prior in (None, "dse")

    def ssg(self):
        from ..guidance import SSG

        return None if self.prior is None else SSG(beta=self.beta, prior=self.prior)


def build_arms(betas: Sequence[float], temperatures: Sequence[float], priors: Sequence[str]) -> List[Arm]:
    """Baseline and every (prior, beta), each at every temperature (the same grid for all arms)."""
    from ..guidance import PRIORS

    for p in priors:
        if p not in PRIORS or p == "none":
            raise ValueError(f"unknown prior {p!r}; choose from {', '.join(x for x in PRIORS if x != 'none')}")
    arms = []
    for t in temperatures:
        arms.append(Arm(float(t)))
        for p in priors:
            arms.extend(Arm(float(t), p, float(b)) for b in betas)
    return arms


def batch_seed(seed: int, batch: int) -> int:
    """Seed of batch ``batch`` of an arm's run with seed ``seed`` (the same for every arm)."""
    return int(seed) * 1_000_003 + int(batch)


def num_classes(model, text_encoder=None) -> int:
    """Classes the ablation asks for: the VAR's labels, or the 10 Fashion-MNIST classes named in prompts."""
    from ..data import CLASS_PHRASES

    return len(CLASS_PHRASES) if text_encoder is not None else model.num_classes


def held_out_prompts(labels: torch.Tensor) -> List[str]:
    """The prompt of sample ``i``: class ``labels[i]`` in held-out template ``(i // 10) % len(HELD_OUT_TEMPLATES)``."""
    from ..data import HELD_OUT_TEMPLATES, make_prompt

    return [make_prompt(int(y), HELD_OUT_TEMPLATES[(i // 10) % len(HELD_OUT_TEMPLATES)]) for i, y in enumerate(labels)]


@torch.no_grad()
def sample_arm(model, vae, arm: Arm, n: int, seed: int, batch_size: int, cfg: float, top_k: Optional[int], top_p: float,
               text_encoder=None, options: Optional[Dict[str, object]] = None):
    """(images (n, 3, H, W) float32 on CPU in [0, 1], labels (n,) int64) for ``arm``: class labels for a VAR, held-out
    prompts (``held_out_prompts``) encoded by ``text_encoder`` for a text-conditional model; ``options``: the family's
    own ``generate`` keywords (HART: ``more_smooth``, ``num_maskgit_iters``, ``residual``)."""
    from ..api import generate

    labels = torch.arange(n) % num_classes(model, text_encoder)
    conditions = labels if text_encoder is None else held_out_prompts(labels)
    extra = {**(options or {}), **({} if text_encoder is None else {"text_encoder": text_encoder})}
    out = []
    for b, i in enumerate(range(0, n, batch_size)):
        img = generate(
            model, vae, conditions[i : i + batch_size], cfg=cfg, top_k=top_k, top_p=top_p,
            temperature=arm.temperature, seed=batch_seed(seed, b), ssg=arm.ssg(), seeding="batch", **extra,
        )
        out.append(img.float().cpu())
    return torch.cat(out), labels


# ----------------------------------------------------------------------------- spectra


def radial_amplitude_spectrum(images01: torch.Tensor, size: Optional[int] = None) -> np.ndarray:
    """Radially averaged amplitude spectrum, averaged over images: (size // 2 + 1,) for radii 0 .. size/2.

    Images are averaged over channels, resized (area / bilinear) to ``size`` if given, their mean is
    removed, then ``|FFT2|`` (orthonormal) is averaged in integer-radius frequency bins.
    """
    x = images01.float()
    if x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    if size is not None and x.shape[-1] != size:
        mode = "area" if x.shape[-1] > size else "bilinear"
        x = torch.nn.functional.interpolate(x, size=(size, size), mode=mode)
    x = x[:, 0].double()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    h, w = x.shape[-2:]
    amp = torch.fft.fftshift(torch.fft.fft2(x, norm="ortho").abs(), dim=(-2, -1)).mean(0)
    fy = torch.arange(h, dtype=torch.float64) - h // 2
    fx = torch.arange(w, dtype=torch.float64) - w // 2
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).round().long()
    nb = min(h, w) // 2 + 1
    sums = torch.zeros(nb, dtype=torch.float64).index_add_(0, r.clamp(max=nb - 1).flatten(), amp.flatten())
    cnt = torch.zeros(nb, dtype=torch.float64).index_add_(0, r.clamp(max=nb - 1).flatten(), torch.ones_like(amp).flatten())
    # radii beyond size/2 (the corners) are folded into the last bin; report bins 0..size/2
    return (sums / cnt.clamp_min(1)).numpy()


def plot_spectrum_ratio(curves: Dict[str, np.ndarray], data: np.ndarray, path: Path, title: str, panels: Dict[str, List[str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(data) - 1
    freq = np.arange(1, n + 1) / (2 * n)  # cycles per pixel, up to Nyquist 0.5
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7.5, 6 * len(panels)), 4.4), squeeze=False)
    for ax, (ptitle, names) in zip(axes[0], panels.items()):
        for name in names:
            if name in curves:
                style = dict(color="black", lw=2) if name.startswith("baseline") else {}
                ax.plot(freq, curves[name][1:] / np.maximum(data[1:], 1e-12), label=name, **style)
        ax.axhline(1.0, color="gray", ls="--", lw=1)
        ax.set_xlabel("spatial frequency (cycles / pixel)")
        ax.set_ylabel("amplitude: generated / data")
        ax.set_title(ptitle)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- references


def inception_reference(n: int, cache: Optional[str], batch_size: int, device: str) -> Dict[str, np.ndarray]:
    """Inception features / stats of the first ``n`` Fashion-MNIST test images; cached as an .npz."""
    from .classifier import cache_dir, dataset_images01
    from .metrics import feature_stats, inception_features

    x, _ = dataset_images01("test")
    n = min(int(n), x.shape[0])
    f = cache_dir(cache) / f"inception_ref_fmnist_test_{n}.npz"
    if f.is_file():
        with np.load(f) as z:
            return {k: z[k] for k in z.files}
    print(f"eval: Inception features of {n} test images (cached to {f})", file=sys.stderr, flush=True)
    feats = inception_features(x[:n], batch_size=batch_size, device=device, progress=True)
    mu, sigma = feature_stats(feats)
    out = {"features": feats.astype(np.float32), "mu": mu, "sigma": sigma}
    atomic_write(f, lambda fh: np.savez(fh, **out))
    return out


def _summary(values: List[float]) -> Dict[str, float]:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


# ----------------------------------------------------------------------------- stored results


def encoder_module(text_encoder) -> torch.nn.Module:
    """The module holding a text encoder's weights: the encoder itself (the small word-level ``TextEncoder``), or
    the module a wrapper holds (``WordTextEncoder.module``; ``T5TextEncoder`` / ``Qwen2TextEncoder``'s ``model``)."""
    if isinstance(text_encoder, torch.nn.Module):
        return text_encoder
    for attr in ("module", "model"):
        if isinstance(getattr(text_encoder, attr, None), torch.nn.Module):
            return getattr(text_encoder, attr)
    raise TypeError(f"text_encoder: {type(text_encoder).__name__} holds no torch module to fingerprint its weights by")


def model_fingerprint(model, vae, text_encoder=None) -> str:
    """sha256 (16 hex digits) of the model's config and the weights of the model, the VAE and the text encoder (if
    any): the model, whatever files it came from."""
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dataclasses.asdict(model.config)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for module in (model, vae) + ((encoder_module(text_encoder),) if text_encoder is not None else ()):
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:16]


def run_key(arm: Arm, seed: int, common: Dict[str, object]) -> Dict[str, object]:
    """Everything the result of ``arm`` at ``seed`` depends on: ``common`` (model, sampler, samples, batch size, cfg,
    top-k, top-p, classifier, FID reference), the temperature, every SSG setting (prior, beta, interp ...), the seed."""
    ssg = arm.ssg()
    key = {**common, "temperature": arm.temperature, "ssg": dataclasses.asdict(ssg) if ssg else None, "seed": seed}
    return json.loads(json.dumps(key))  # as it reads back from the file


def run_path(runs_dir: Path, arm: Arm, seed: int, key: Dict[str, object]) -> Path:
    """``runs_dir/<arm>_seed<seed>_<hash of key>.json``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return runs_dir / f"{re.sub(r'[^A-Za-z0-9.]+', '_', arm.name)}_seed{seed}_{digest}.json"


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_run(path: Path, key: Dict[str, object]) -> Optional[Dict[str, object]]:
    """The stored result at ``path`` (None when there is none); ``ValueError`` naming the file when it is damaged."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or record.get("key") != key:
            raise ValueError("its settings are not those its name stands for")
        metrics = record.get("metrics")
        if not isinstance(metrics, dict) or any(k not in metrics for k in METRIC_KEYS):
            raise ValueError("its metrics are incomplete")
        bad = [k for k in METRIC_KEYS if not (metrics[k] is None or _finite_number(metrics[k]))]
        if bad:
            raise ValueError(f"metric {bad[0]} is {metrics[bad[0]]!r}, not a finite number")
        if not isinstance(record.get("seconds"), (int, float)) or (key["seed"] == 0 and not isinstance(record.get("spectrum"), list)):
            raise ValueError("its timing or spectrum is missing")
    except ValueError as e:  # JSON and UTF-8 decoding errors included
        raise ValueError(f"eval --resume: the stored result {path} is damaged ({e}); delete it to recompute that arm") from None
    return record


# ----------------------------------------------------------------------------- the run


def run_ablation(
    model,
    vae,
    out_dir,
    *,
    text_encoder=None,
    samples: int = 1000,
    seeds: int = 3,
    betas: Sequence[float] = DEFAULT_BETAS,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    priors: Sequence[str] = DEFAULT_PRIORS,
    cfg: float = SAMPLING.cfg,
    top_k: Optional[int] = SAMPLING.top_k,
    top_p: float = SAMPLING.top_p,
    options: Optional[Dict[str, object]] = None,
    batch_size: int = 100,
    fid_arms: str = "main",
    inception_ref_n: int = 10000,
    inception_batch_size: int = 100,
    classifier: Optional[str] = None,
    cache: Optional[str] = None,
    spectrum_temperature: Optional[float] = None,
    resume: bool = False,
    model_desc: str = "",
    log=print,
) -> Dict[str, object]:
    """Run the ablation table of ``model``/``vae`` into ``out_dir`` (see the module docstring; ``resume`` reuses the
    stored (arm, seed) results whose settings match); returns what ``ablation.json`` holds. ``text_encoder``: the
    text-conditional model's encoder (``encode(prompts) -> TextFeatures``); None for a class-conditional VAR.
    ``options``: the family's own ``generate`` keywords (``sample_arm``), part of every stored result's key."""
    from .classifier import classify, dataset_images01, load_classifier, reference_features
    from .metrics import fid_from_features, fid_from_stats, inception_features, kernel_inception_distance, precision_recall

    classes = num_classes(model, text_encoder)
    if classes > 10:
        raise ValueError(f"eval scores with a Fashion-MNIST classifier (10 classes); this model has {classes} classes")
    if samples < 4 or seeds < 1:
        raise ValueError("need --samples >= 4 and --seeds >= 1")
    if fid_arms not in ("main", "all", "none"):
        raise ValueError(f"fid_arms must be main | all | none, got {fid_arms!r}")
    plot = importlib.util.find_spec("matplotlib") is not None
    if not plot:
        log("note: matplotlib is not installed, so eval skips spectrum.png (its numbers stay in ablation.json); "
            "pip install 'ssg-engine[plot]' to draw it")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = str(next(model.parameters()).device)
    arms = build_arms(betas, temperatures, priors)
    settings = {
        "samples_per_arm_per_seed": samples, "seeds": seeds, "betas": list(map(float, betas)),
        "temperatures": list(map(float, temperatures)), "priors": list(priors), "cfg": cfg, "top_k": top_k,
        "top_p": top_p, "batch_size": batch_size, "fid_arms": fid_arms, "inception_ref_n": inception_ref_n,
        "model": model_desc, "sampler": "Engine (CUDA)" if device.startswith("cuda") else "reference (CPU)",
    }
    options = dict(options or {})
    if options:
        settings["options"] = options
    if text_encoder is not None:
        from ..data import HELD_OUT_TEMPLATES

        settings["conditioning"] = f"prompts of the held-out templates {list(HELD_OUT_TEMPLATES)}; cfg = w, temperature = tau"
    json_path = out_dir / "ablation.json"
    runs_dir = out_dir / RUNS_DIR
    if resume and json_path.is_file() and not runs_dir.is_dir():
        raise ValueError(
            f"{json_path} was written without stored per-arm results ({runs_dir} is missing), so --resume cannot reuse "
            "its arms and would overwrite it; move it away, or give another --out-dir"
        )

    cls_model, cls_info = load_classifier(classifier, cache)
    ref_cls = reference_features(cls_model, cls_info, cache)
    test_x, _ = dataset_images01("test")
    spec_size = test_x.shape[-1]
    data_spec = radial_amplitude_spectrum(test_x, spec_size)
    ref_inc = None
    if fid_arms != "none":
        ref_inc = inception_reference(inception_ref_n, cache, inception_batch_size, device)
    settings["model_fingerprint"] = model_fingerprint(model, vae, text_encoder)
    common_key = {
        "format": 1, "model": settings["model_fingerprint"], "sampler": settings["sampler"], "samples": samples,
        "batch_size": batch_size, "cfg": cfg, "top_k": top_k, "top_p": top_p, "classifier": cls_info["weights_hash"],
        **({"conditioning": settings["conditioning"]} if text_encoder is not None else {}),
        **({"options": options} if options else {}),
    }

    def score_seed(arm: Arm, seed: int, want_fid: bool) -> Dict[str, object]:
        """Sample ``arm`` with ``seed`` and score it: the metrics, and (seed 0) the images' spectrum."""
        images, labels = sample_arm(model, vae, arm, samples, seed, batch_size, cfg, top_k, top_p, text_encoder, options)
        logits, feats = classify(cls_model, images)
        pred = logits.argmax(1)
        lab = labels.numpy()
        ref_feats = ref_cls["features"]
        pr_rng = np.random.default_rng([12345, seed])  # the same test subset for every arm at this seed
        sub = ref_feats[pr_rng.choice(ref_feats.shape[0], min(samples, ref_feats.shape[0]), replace=False)]
        prec, rec = precision_recall(sub, feats, k=3)
        m = {
            "seed": seed,
            "acc": float((pred == lab).mean()),
            "acc_per_class": [float((pred[lab == c] == c).mean()) for c in range(classes) if (lab == c).any()],
            "fd_cls": fid_from_stats(feats, ref_cls),
            "precision": prec,
            "recall": rec,
            "fid": None,
            "kid": None,
        }
        if want_fid:
            inc = inception_features(images, batch_size=inception_batch_size, device=device)
            ref_f = ref_inc["features"].astype(np.float64)
            m["fid"] = fid_from_features(inc, ref_f)  # exact low-rank path when samples < 2048
            m["kid"] = kernel_inception_distance(inc, ref_f, num_subsets=50, max_subset_size=1000, seed=seed)[0]
        spectrum = radial_amplitude_spectrum(images, spec_size).tolist() if seed == 0 else None
        return {"metrics": m, "spectrum": spectrum}

    results = {
        "settings": settings,
        "classifier": {
            **{k: cls_info.get(k) for k in ("test_accuracy", "epochs", "weights_hash")}, "path": portable_path(cls_info["path"]),
        },
        "metric_notes": {
            "acc": "classifier accuracy on the class asked for (higher is better)",
            "fd_cls": "Frechet distance, classifier penultimate features, vs 10k test images (lower is better)",
            "precision/recall": "Kynkaenniemi et al. k=3, classifier features, vs a same-size test subset (the same for every arm at a seed)",
            "fid": f"Inception-v3 FID vs the first {inception_ref_n} test images (biased upward at small N)",
            "kid": "Inception KID (unbiased, polynomial kernel)",
        },
        "arms": [],
        "spectra": {"data": data_spec.tolist(), "size": spec_size},
    }
    spectra: Dict[str, np.ndarray] = {}
    t_all = time.perf_counter()
    for ai, arm in enumerate(arms):
        want_fid = fid_arms == "all" or (fid_arms == "main" and arm.main)
        per_seed, seconds, reused = [], 0.0, 0
        for s in range(seeds):
            key = run_key(arm, s, {**common_key, "inception_ref_n": inception_ref_n if want_fid else None})
            path = run_path(runs_dir, arm, s, key)
            record = load_run(path, key) if resume else None
            if record is None:
                t0 = time.perf_counter()
                record = {"key": key, **score_seed(arm, s, want_fid), "seconds": round(time.perf_counter() - t0, 1),
                          "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
                atomic_write_json(path, record)
            else:
                reused += 1
            per_seed.append(record["metrics"])
            seconds += record["seconds"]
            if s == 0:
                spectra[arm.name] = np.asarray(record["spectrum"])
        entry = {
            "name": arm.name, "temperature": arm.temperature, "prior": arm.prior or "none (baseline)", "beta": arm.beta,
            "per_seed": per_seed,
            **{k: _summary([p[k] for p in per_seed]) for k in METRIC_KEYS},
            "spectrum_seed0": spectra[arm.name].tolist(),
            "seconds": round(seconds, 1),
        }
        results["arms"].append(entry)
        log(f"eval [{ai + 1}/{len(arms)}] {arm.name}: " + ", ".join(
            f"{k} {entry[k]['mean']:.4g}±{entry[k]['std']:.2g}" for k in METRIC_KEYS if entry[k]["mean"] is not None
        ) + f" ({entry['seconds']}s" + (f"; {reused} of {seeds} seed(s) reused from {runs_dir}" if reused else "") + ")")
        atomic_write_json(json_path, results)

    results["seconds"] = round(time.perf_counter() - t_all, 1)
    atomic_write_json(json_path, results)
    atomic_write_bytes(out_dir / "ablation.md", markdown_table(results).encode())
    # spectral evidence
    t_spec = spectrum_temperature if spectrum_temperature is not None else (1.0 if 1.0 in map(float, temperatures) else float(temperatures[0]))
    base = Arm(t_spec).name
    panels = {f"baseline vs SSG-DSE (T={t_spec:g})": [base] + [Arm(t_spec, "dse", b).name for b in betas]}
    if len(priors) > 1:
        bmax = max(betas)
        panels[f"priors at beta={bmax:g} (T={t_spec:g})"] = [base] + [Arm(t_spec, p, bmax).name for p in priors]
    written = [json_path, out_dir / "ablation.md"]
    if plot:
        written.append(out_dir / "spectrum.png")
        plot_spectrum_ratio(spectra, data_spec, written[-1], "radially averaged amplitude spectrum / Fashion-MNIST test set (seed 0)", panels)
    log(f"eval: wrote {', '.join(map(str, written))} ({results['seconds']}s)")
    return results


def _fmt(s: Dict[str, Optional[float]], digits: int) -> str:
    if s["mean"] is None:
        return "—"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown_table(results: Dict[str, object]) -> str:
    st = results["settings"]
    lines = [
        "# SSG ablation",
        "",
        f"Model: {st['model'] or '(given checkpoints)'}; sampler: {st['sampler']}; cfg {st['cfg']}, top-k {st['top_k']}, "
        f"top-p {st['top_p']}; {st['samples_per_arm_per_seed']} class-balanced samples per arm per seed, "
        f"{st['seeds']} seed(s); mean ± std over seeds. Classifier: test accuracy "
        f"{results['classifier'].get('test_accuracy')} (weights {results['classifier'].get('weights_hash')})."
        + (f" Conditioning: {st['conditioning']}." if "conditioning" in st else "")
        + (" Options: " + ", ".join(f"{k}={v}" for k, v in st["options"].items()) + "." if st.get("options") else ""),
        "",
        "| arm | T | prior | beta | acc ↑ | FD-cls ↓ | precision ↑ | recall ↑ | FID ↓ | KID ↓ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in results["arms"]:
        lines.append(
            f"| {a['name']} | {a['temperature']:g} | {a['prior']} | {a['beta']:g} | {_fmt(a['acc'], 4)} | {_fmt(a['fd_cls'], 3)} | "
            f"{_fmt(a['precision'], 3)} | {_fmt(a['recall'], 3)} | {_fmt(a['fid'], 2)} | {_fmt(a['kid'], 4)} |"
        )
    lines += ["", "Best FD-cls per temperature:", ""]
    for t in st["temperatures"]:
        arms_t = [a for a in results["arms"] if a["temperature"] == t and a["fd_cls"]["mean"] is not None]
        if arms_t:
            best = min(arms_t, key=lambda a: a["fd_cls"]["mean"])
            base = next((a for a in arms_t if a["prior"].startswith("none")), None)
            extra = f" (baseline {base['fd_cls']['mean']:.3f})" if base else ""
            lines.append(f"- T={t:g}: {best['name']} with FD-cls {best['fd_cls']['mean']:.3f}{extra}")
    lines += ["", "Metric notes: " + "; ".join(f"{k}: {v}" for k, v in results["metric_notes"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":  # the old entry point: the command is `ssg-engine eval`
    from ..validation import refuse_module_run

    refuse_module_run("ssg_engine.eval.ablation", "eval")
