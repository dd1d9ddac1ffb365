"""Evaluation of SSG: FID/KID/precision-recall (standard Inception-v3), a Fashion-MNIST classifier metric,
the SSG ablation table, and class-conditional sample sets for the OpenAI guided-diffusion evaluator.

Submodules are imported lazily (``ssg_engine.eval.metrics``, ``.classifier``, ``.ablation``, ``.fid_sample``); the
``ssg-engine eval`` and ``fid-sample`` commands (``ssg_engine.cli.eval``) call ``ablation.run_ablation`` and
``fid_sample.run_fid_sample``.
"""
from __future__ import annotations

__all__ = ["metrics", "classifier", "ablation", "fid_sample"]
