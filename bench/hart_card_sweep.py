"""The sampling-settings table of the shipped HART model's card: class accuracy of the shipped Fashion-MNIST
classifier on samples of held-out-template prompts (and the first training templates), per CFG / ``more_smooth`` /
residual setting, each column class-balanced, seed 0. CPU, reference sampler (``generate`` on CPU).

    python bench/hart_card_sweep.py --n 300 --cfgs 1 2 3 4.5 6 --out bench/results/quality/hart/card_sweep.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

import ssg_engine as se
from ssg_engine.data import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, make_prompt
from ssg_engine.eval.classifier import class_accuracy, load_classifier
from ssg_engine.files import atomic_write_json
from ssg_engine.pretrained import HART_SAMPLING, load_pretrained_hart


def prompts(n: int, templates) -> tuple:
    """(prompts, labels): sample i asks for class i % 10 in template (i // 10) % len(templates)."""
    labels = [i % 10 for i in range(n)]
    return [make_prompt(y, templates[(i // 10) % len(templates)]) for i, y in enumerate(labels)], labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="samples per column (a multiple of 10)")
    ap.add_argument("--cfgs", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.5, 6.0])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--out", default=None, help="write the rows as JSON here too")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tokenizer, text_encoder = load_pretrained_hart()
    clf, info = load_classifier(train_if_missing=False)
    sets = {"held_out": prompts(args.n, HELD_OUT_TEMPLATES), "train_first3": prompts(args.n, TRAIN_TEMPLATES[:3])}
    rows = []
    for cfg, tau, smooth, residual in itertools.product(args.cfgs, args.temperatures, (True, False), (True, False)):
        if not residual and not smooth:
            continue  # the residual ablation at the smooth setting only
        row = {"cfg": cfg, "temperature": tau, "more_smooth": smooth, "residual": residual, "n": args.n}
        t0 = time.perf_counter()
        for name, (ps, labels) in sets.items():
            imgs = []
            for i in range(0, len(ps), args.batch_size):
                imgs.append(se.generate(model, tokenizer, ps[i : i + args.batch_size], HART_SAMPLING, text_encoder=text_encoder,
                                        cfg=cfg, temperature=tau, more_smooth=smooth, residual=residual, seed=i))
            row[name] = round(class_accuracy(clf, torch.cat(imgs), labels), 4)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        atomic_write_json(Path(args.out), {"classifier_test_accuracy": info.get("test_accuracy"), "rows": rows,
                                           "top_k": HART_SAMPLING.top_k, "top_p": HART_SAMPLING.top_p})


if __name__ == "__main__":
    main()
