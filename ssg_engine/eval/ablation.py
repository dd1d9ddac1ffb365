"""``ssg-engine eval``: the SSG ablation table and the spectral evidence, on the Fashion-MNIST VAR.

Arms (every arm is run at every temperature of ``--temperatures``, so no arm gets a temperature the
others do not):

- ``baseline``: no SSG;
- ``dse``: SSG with the DSE prior, for each beta of ``--betas``;
- ``bilinear`` / ``bicubic`` / ``nearest`` / ``area``: SSG with that interpolation as the prior
  (the ablations), for each beta.

Per arm and seed: ``--samples`` class-balanced samples (labels ``i % num_classes``) drawn in batches
whose seeds depend only on (seed, batch index), so all arms share the same random numbers. Metrics:

- ``acc``: accuracy of our Fashion-MNIST classifier on the samples w.r.t. the class asked for;
- ``fd_cls``: Fréchet distance in the classifier's 128-d penultimate space to the 10k test images;
- ``precision`` / ``recall`` (k=3) in the same space, against a same-size random subset of the test set;
- ``fid`` / ``kid`` (Inception-v3, ``metrics.py``) for the arms chosen by ``--fid-arms``
  (``main`` = baseline and DSE, ``all``, ``none``) against the first ``--inception-ref-n`` test images.

Mean ± std over seeds go to ``ablation.json`` and ``ablation.md``. ``spectrum.png``: radially averaged
amplitude spectrum of the generated images divided by the test set's (1 = the data's spectrum), for the
baseline and the DSE arms (seed 0, at ``--spectrum-temperature``), plus the priors at the largest beta.
``ablation.json`` is rewritten after every arm; a rerun with the same settings and ``--resume`` skips
the arms already there.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..cli import add_model_args, load_from_args
from .fid_sample import add_fid_sample_parser

DEFAULT_PRIORS = ("dse", "bilinear", "bicubic", "nearest", "area")
DEFAULT_BETAS = (0.25, 0.5, 1.0)
DEFAULT_TEMPERATURES = (1.0,)
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


@torch.no_grad()
def sample_arm(var, vae, arm: Arm, n: int, seed: int, batch_size: int, cfg: float, top_k: int, top_p: float):
    """(images (n, 3, H, W) float32 on CPU in [0, 1], labels (n,) int64) for ``arm``."""
    from ..sampler import generate

    labels = torch.arange(n) % var.num_classes
    out = []
    for b, i in enumerate(range(0, n, batch_size)):
        img = generate(
            var, vae, labels[i : i + batch_size], cfg=cfg, top_k=top_k, top_p=top_p,
            temperature=arm.temperature, seed=batch_seed(seed, b), ssg=arm.ssg(),
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
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
    tmp = f.with_name(f.name + ".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(f)
    return out


def _summary(values: List[float]) -> Dict[str, float]:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


# ----------------------------------------------------------------------------- the run


def run_ablation(
    var,
    vae,
    out_dir,
    *,
    samples: int = 1000,
    seeds: int = 3,
    betas: Sequence[float] = DEFAULT_BETAS,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    priors: Sequence[str] = DEFAULT_PRIORS,
    cfg: float = 2.0,
    top_k: int = 128,
    top_p: float = 0.95,
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
    from .classifier import classify, dataset_images01, load_classifier, reference_features
    from .metrics import fid_from_features, fid_from_stats, inception_features, kernel_inception_distance, precision_recall

    if var.num_classes > 10:
        raise ValueError(f"eval scores with a Fashion-MNIST classifier (10 classes); this model has {var.num_classes} classes")
    if samples < 4 or seeds < 1:
        raise ValueError("need --samples >= 4 and --seeds >= 1")
    if fid_arms not in ("main", "all", "none"):
        raise ValueError(f"fid_arms must be main | all | none, got {fid_arms!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = str(var.lvl_1L.device)
    arms = build_arms(betas, temperatures, priors)
    settings = {
        "samples_per_arm_per_seed": samples, "seeds": seeds, "betas": list(map(float, betas)),
        "temperatures": list(map(float, temperatures)), "priors": list(priors), "cfg": cfg, "top_k": top_k,
        "top_p": top_p, "batch_size": batch_size, "fid_arms": fid_arms, "inception_ref_n": inception_ref_n,
        "model": model_desc, "sampler": "Engine (CUDA)" if device.startswith("cuda") else "reference (CPU)",
    }
    json_path = out_dir / "ablation.json"
    done: Dict[str, dict] = {}
    if resume and json_path.is_file():
        old = json.loads(json_path.read_text())
        if old.get("settings") == settings:
            done = {a["name"]: a for a in old.get("arms", [])}
            log(f"eval: resuming, {len(done)} arm(s) already in {json_path}")
        else:
            log(f"eval: {json_path} has other settings; starting over")

    cls_model, cls_info = load_classifier(classifier, cache)
    ref_cls = reference_features(cls_model, cls_info, cache)
    test_x, _ = dataset_images01("test")
    spec_size = test_x.shape[-1]
    data_spec = radial_amplitude_spectrum(test_x, spec_size)
    ref_inc = None
    if fid_arms != "none":
        ref_inc = inception_reference(inception_ref_n, cache, inception_batch_size, device)
    pr_rng = np.random.default_rng(12345)

    results = {
        "settings": settings,
        "classifier": {k: cls_info.get(k) for k in ("test_accuracy", "epochs", "weights_hash", "path")},
        "metric_notes": {
            "acc": "classifier accuracy on the class asked for (higher is better)",
            "fd_cls": "Frechet distance, classifier penultimate features, vs 10k test images (lower is better)",
            "precision/recall": "Kynkaenniemi et al. k=3, classifier features, vs a same-size test subset",
            "fid": f"Inception-v3 FID vs the first {inception_ref_n} test images (biased upward at small N)",
            "kid": "Inception KID (unbiased, polynomial kernel)",
        },
        "arms": [],
        "spectra": {"data": data_spec.tolist(), "size": spec_size},
    }
    spectra: Dict[str, np.ndarray] = {}
    t_all = time.perf_counter()
    for ai, arm in enumerate(arms):
        if arm.name in done:
            results["arms"].append(done[arm.name])
            if "spectrum_seed0" in done[arm.name]:
                spectra[arm.name] = np.asarray(done[arm.name]["spectrum_seed0"])
            continue
        t0 = time.perf_counter()
        per_seed = []
        want_fid = fid_arms == "all" or (fid_arms == "main" and arm.main)
        for s in range(seeds):
            images, labels = sample_arm(var, vae, arm, samples, s, batch_size, cfg, top_k, top_p)
            logits, feats = classify(cls_model, images)
            pred = logits.argmax(1)
            lab = labels.numpy()
            sub = ref_cls["features"][pr_rng.choice(ref_cls["features"].shape[0], min(samples, ref_cls["features"].shape[0]), replace=False)]
            prec, rec = precision_recall(sub, feats, k=3)
            m = {
                "seed": s,
                "acc": float((pred == lab).mean()),
                "acc_per_class": [float((pred[lab == c] == c).mean()) for c in range(var.num_classes) if (lab == c).any()],
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
                m["kid"] = kernel_inception_distance(inc, ref_f, num_subsets=50, max_subset_size=1000, seed=s)[0]
            if s == 0:
                spectra[arm.name] = radial_amplitude_spectrum(images, spec_size)
            per_seed.append(m)
        entry = {
            "name": arm.name, "temperature": arm.temperature, "prior": arm.prior or "none (baseline)", "beta": arm.beta,
            "per_seed": per_seed,
            **{k: _summary([p[k] for p in per_seed]) for k in METRIC_KEYS},
            "spectrum_seed0": spectra[arm.name].tolist(),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        results["arms"].append(entry)
        log(f"eval [{ai + 1}/{len(arms)}] {arm.name}: " + ", ".join(
            f"{k} {entry[k]['mean']:.4g}±{entry[k]['std']:.2g}" for k in METRIC_KEYS if entry[k]["mean"] is not None
        ) + f" ({entry['seconds']}s)")
        json_path.write_text(json.dumps(results, indent=1))

    results["seconds"] = round(time.perf_counter() - t_all, 1)
    json_path.write_text(json.dumps(results, indent=1))
    (out_dir / "ablation.md").write_text(markdown_table(results))
    # spectral evidence
    t_spec = spectrum_temperature if spectrum_temperature is not None else (1.0 if 1.0 in map(float, temperatures) else float(temperatures[0]))
    base = Arm(t_spec).name
    panels = {f"baseline vs SSG-DSE (T={t_spec:g})": [base] + [Arm(t_spec, "dse", b).name for b in betas]}
    if len(priors) > 1:
        bmax = max(betas)
        panels[f"priors at beta={bmax:g} (T={t_spec:g})"] = [base] + [Arm(t_spec, p, bmax).name for p in priors]
    plot_spectrum_ratio(spectra, data_spec, out_dir / "spectrum.png", "radially averaged amplitude spectrum / Fashion-MNIST test set (seed 0)", panels)
    log(f"eval: wrote {json_path}, {out_dir / 'ablation.md'}, {out_dir / 'spectrum.png'} ({results['seconds']}s)")
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
        f"{results['classifier'].get('test_accuracy')} (weights {results['classifier'].get('weights_hash')}).",
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


# ----------------------------------------------------------------------------- CLI


def _floats(values: Sequence[str]) -> List[float]:
    out = []
    for v in values:
        for part in str(v).split(","):
            if part.strip():
                out.append(float(part))
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    vae, var = load_from_args(args)
    desc = f"{args.var} + {args.vae}" if args.var else "shipped pretrained Fashion-MNIST VAR (ssg_engine.pretrained)"
    priors = [p for v in args.priors for p in v.split(",") if p]
    run_ablation(
        var, vae, args.out_dir, samples=args.samples, seeds=args.seeds, betas=_floats(args.betas),
        temperatures=_floats(args.temperatures), priors=priors, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
        batch_size=args.batch_size, fid_arms=args.fid_arms, inception_ref_n=args.inception_ref_n,
        inception_batch_size=args.inception_batch_size, classifier=args.classifier, cache=args.cache_dir,
        spectrum_temperature=args.spectrum_temperature, resume=args.resume, model_desc=desc,
        log=lambda m: print(m, flush=True),
    )
    return 0


def add_eval_subparsers(sub) -> None:
    """Register ``eval`` (the ablation) and ``fid-sample`` on the ``ssg-engine`` subparsers."""
    p = sub.add_parser(
        "eval", help="SSG ablation table (classifier accuracy, FD-classifier, Inception FID) + spectrum PNG",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--samples", type=int, default=1000, help="class-balanced samples per arm per seed")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--betas", nargs="+", default=[str(b) for b in DEFAULT_BETAS], help="SSG strengths (space- or comma-separated)")
    p.add_argument("--temperatures", nargs="+", default=[str(t) for t in DEFAULT_TEMPERATURES], help="the temperature grid, used for every arm")
    p.add_argument("--priors", nargs="+", default=list(DEFAULT_PRIORS), help="SSG priors: dse and the ablations bilinear bicubic nearest area")
    p.add_argument("--cfg", type=float, default=2.0, help="default: the shipped model's card settings (cfg 2, top-k 128, top-p 0.95)")
    p.add_argument("--top-k", type=int, default=128)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--fid-arms", choices=["main", "all", "none"], default="main", help="arms scored with Inception FID/KID (main: baseline + DSE)")
    p.add_argument("--inception-ref-n", type=int, default=10000, help="test images for the Inception reference statistics")
    p.add_argument("--inception-batch-size", type=int, default=100)
    p.add_argument("--classifier", default=None, help="classifier weights (default: shipped, else cache dir, trained on first use)")
    p.add_argument("--cache-dir", default=None, help="cache for classifier / reference statistics (default $SSG_ENGINE_CACHE or ~/.cache/ssg_engine)")
    p.add_argument("--spectrum-temperature", type=float, default=None, help="temperature of the spectrum plot's arms (default 1.0 if in the grid)")
    p.add_argument("--resume", action="store_true", help="keep the arms already in OUT_DIR/ablation.json (same settings)")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_eval)
    add_fid_sample_parser(sub)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ssg_engine.eval.ablation [eval|fid-sample] ...`` until the lead wires the subcommands into cli.py."""
    parser = argparse.ArgumentParser(prog="ssg-engine")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_subparsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
