"""Evaluation of SSG: FID/KID/precision-recall (standard Inception-v3), a Fashion-MNIST classifier metric,
the SSG ablation table, and class-conditional sample sets for the OpenAI guided-diffusion evaluator.

Submodules are imported lazily (``ssg_engine.eval.metrics``, ``.classifier``, ``.ablation``, ``.fid_sample``).
"""
from __future__ import annotations

__all__ = ["metrics", "classifier", "ablation", "fid_sample", "add_eval_subparsers"]


def add_eval_subparsers(sub):
    """Register ``ssg-engine eval`` and ``ssg-engine fid-sample`` on an argparse subparsers object."""
    from .ablation import add_eval_subparsers as _add

    return _add(sub)
