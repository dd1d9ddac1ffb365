"""Shared fixtures and helpers: the golden tiny models in tests/golden/ (read-only; see tests/golden/README.md)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
TINY = GOLDEN / "var_tiny"
INFINITY_GOLDEN = GOLDEN / "infinity"
INFINITY_CONFIGS = ("sq_d16", "wide_d8")


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"golden data missing: {path} (it is part of the repository: restore it with git checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return _require(TINY)


@pytest.fixture(scope="session")
def golden(tiny_dir):
    from safetensors.torch import load_file

    return load_file(str(tiny_dir / "golden.safetensors"))


@pytest.fixture(scope="session")
def tiny_models(tiny_dir):
    from ssg_engine import load_models

    return load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=tiny_dir / "config.json")


@pytest.fixture(scope="session")
def ar_args(tiny_dir):
    return [json.loads((tiny_dir / f"ar{n}.json").read_text()) for n in (0, 1)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture
def spy_backends(monkeypatch):
    """``spy_backends(module, *names)`` wraps those functions of ``module`` and returns the list that records,
    for each call, the last ``_``-separated word of the called name (e.g. ``"reference"`` / ``"triton"``)."""
    monkeypatch.delenv("SSG_ENGINE_BACKEND", raising=False)
    calls = []

    def install(module, *names):
        for name in names:
            original = getattr(module, name)

            def spy(*args, _original=original, _name=name, **kwargs):
                calls.append(_name.rsplit("_", 1)[1])
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, spy)
        return calls

    return install


def kernel_test_settings():
    """For the kernel test modules, called after they set TRITON_INTERPRET: (interpreting, device, requires_gpu mark).

    ``requires_gpu`` marks compiled-kernel checks: they need CUDA and TRITON_INTERPRET=0 in the environment.
    """
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    device = "cuda" if torch.cuda.is_available() and not interpret else "cpu"
    requires_gpu = pytest.mark.skipif(
        not torch.cuda.is_available() or interpret,
        reason="needs a CUDA GPU; run by bench/device_check.sh"
        if not torch.cuda.is_available()
        else "compiled-kernel check: run with TRITON_INTERPRET=0 (the interpreter is on)",
    )
    return interpret, device, requires_gpu


@pytest.fixture
def one_thread():
    """One intra-op thread (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared, busy CPU
    two threads wait for each other far longer than they compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def golden_infinity_config(name: str):
    """The InfinityConfig of golden configuration ``name`` (from its config.json: upstream's keywords and the VAE's d)."""
    from ssg_engine.families.infinity.model import InfinityConfig

    c = json.loads((_require(INFINITY_GOLDEN / name) / "config.json").read_text())
    return InfinityConfig.from_upstream(c["infinity"], c["vae"]["vae_model"]["codebook_dim"])


def load_golden_infinity(name: str):
    """(model loaded with upstream's weights, eval mode; the golden tensors) of golden configuration ``name``."""
    from safetensors.torch import load_file

    from ssg_engine.families.infinity.model import InfinityTransformer

    model = InfinityTransformer(golden_infinity_config(name)).eval()
    model.load_upstream(torch.load(INFINITY_GOLDEN / name / "infinity.pth", weights_only=True))
    return model, load_file(str(INFINITY_GOLDEN / name / "golden.safetensors"))


def packed(T: Dict[str, torch.Tensor], prefix: str) -> tuple:
    """Upstream's (kv_compact, lens, cu_seqlens_k, max_seqlen_k) from the golden tensors ``prefix.*``."""
    return T[f"{prefix}.kv_compact"], T[f"{prefix}.lens"], T[f"{prefix}.cu_seqlens_k"], int(T[f"{prefix}.lens"].max())


# The Engine's graph path against its eager path on a GPU, per Engine dtype. Logits (relative error, given the same
# tokens): float32 differs only in summation order (padded vs packed text: <= 2e-4 measured on CPU; 5x margin);
# bfloat16 adds roundings of 2^-8 through the blocks (the bf16-vs-fp32 bound of tests/test_engine.py). Greedy
# tokens/bits: the fraction that agree, since a logit difference can flip a near-tie (and every later scale with it).
GRAPH_LOGITS_REL_TOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2}
GREEDY_AGREEMENT = {torch.float32: 0.99, torch.bfloat16: 0.95}


def agreement(a, b) -> float:
    """Fraction of equal entries over two lists of token (or bit) tensors of equal shapes."""
    assert [x.shape for x in a] == [y.shape for y in b]
    return sum(int((x == y).sum()) for x, y in zip(a, b)) / sum(x.numel() for x in a)
