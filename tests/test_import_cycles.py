"""The package's import graph: no cycles, and no module imports a module of a higher layer.

The graph is read from the source (``ast``), not by importing: every module of the ``ssg_engine`` package
(``ssg_engine/**.py``, and ``kernels/**.py``, installed as ``ssg_engine.kernels``; ``csrc/`` has no Python) and every
import statement in it, module-level or inside a function (lazy imports run too, just later). Imports under
``if TYPE_CHECKING:`` are left out: they never run. Relative imports are resolved; ``from pkg import name`` is an
import of the module ``pkg.name`` when that is a module of the package, else of ``pkg``. Third-party imports are
ignored, and so are the parent packages Python imports on the way to a module (``import a.b.c`` is an edge to
``a.b.c`` only): a package's ``__init__`` counts only where a module imports from it.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "ssg_engine"
# Where each package's sources live (setup.py's package_dir).
SOURCE_DIRS = {PACKAGE: REPO / "ssg_engine", f"{PACKAGE}.kernels": REPO / "kernels"}
# Compiled modules (built from csrc/): imported like modules, but they import nothing of ours.
COMPILED_MODULES = {f"{PACKAGE}._C"}

# Layers, lowest first: a module may import modules of its own layer or lower ones, never higher ones. Names are
# relative to the package ("X.*" is the package X and everything in it); "ssg_engine" is the package's __init__,
# which re-exports the API.
LAYERS: Dict[str, List[str]] = {
    # the family registry (families/__init__.py) imports its families' specs by "module:ATTRIBUTE" strings on first use,
    # never by import statement, so it sits at the bottom; so do shared checkpoint reading and VAR's config
    "foundation": [
        "config", "files", "cache", "extension", "profiling", "backend", "data", "validation", "checkpoints",
        "families", "families.var", "families.infinity", "families.hart", "families.var.config",
    ],
    # the fused ops sit below the models: a model's layers call them (with the sampler's backend), and their PyTorch
    # references are the models' eager code (the oracle); the reference backend stores K/V with the cache's write op
    "kernels": ["kernels.*", "ops", "kv_cache"],
    "models": [
        "models.*", "memory", "families.var.model", "families.var.tokenizer", "families.infinity.model",
        "families.infinity.tokenizer", "families.infinity.text", "families.hart.config", "families.hart.diffusion",
        "families.hart.tokenizer", "families.hart.model", "families.hart.text",
    ],
    "guidance": ["guidance", "params", "seeding"],
    "samplers": [
        "pipeline", "sampler", "infinity_sampler", "engine", "families.var.sampler", "families.infinity.sampler",
        "families.hart.sampler", "families.hart.request", "families.var.spec", "families.infinity.spec", "families.hart.spec",
    ],
    "api": [PACKAGE, "loading", "text", "api", "pretrained", "analysis", "imaging", "costs", "plan", "families.var.loading",
            "families.infinity.loading", "families.hart.loading", "pretrained_pipeline", "diffusers_pipeline"],
    "training and evaluation": ["training.*", "eval.*"],
    # the HTTP service sits with the command line: it checks requests with the CLI's bounds, and `serve` starts it;
    # serve.ray_deployment (Ray Serve over the same checks and batch runner) reads `ssg-engine serve`'s flags
    "command line": ["cli.*", "__main__", "serve.*"],
}
# Shared modules that still import a family's modules by name (everything else asks the registry,
# ssg_engine.families): the old import paths kept for compatibility, and the code that knows one family's details:
# the memory plan and planner (each family's presets and sizes), the shipped models, the VAR spectra, training,
# evaluation and the command line. (The Engine is not one: it asks the registry and the bound requests.)
FAMILY_AWARE = {
    "config", "sampler", "infinity_sampler", "text", "loading", "models.var", "models.vqvae", "models.infinity",
    "models.bsq_vae", "models.text_encoder",  # kept for compatibility
    "memory", "plan", "costs", "pretrained", "pretrained_pipeline", "analysis", "training.*", "eval.*", "cli.*",
}
# A family that builds on another's modules, by name: HART's hybrid tokenizer is VAR's multi-scale VQ-VAE (upstream
# HART's ``var_quantize_multiple_res``) plus a continuous residual, configured by VAR's ModelConfig.
FAMILY_REUSE = {"hart": {"var"}}


def package_modules() -> Dict[str, Path]:
    """Every module of the package: dotted name -> source file (a package's name -> its ``__init__.py``)."""
    modules = {}
    for package, folder in SOURCE_DIRS.items():
        for file in sorted(folder.rglob("*.py")):
            parts = file.relative_to(folder).with_suffix("").parts
            modules[".".join((package, *parts[: -1 if parts[-1] == "__init__" else None]))] = file
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.stmt]:
    """Every ``import`` / ``from ... import`` under ``node``, at any depth, except under ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        runs = child.orelse if isinstance(child, ast.If) and _is_type_checking(child.test) else [child]
        for stmt in runs:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                yield stmt
            else:
                yield from _import_nodes(stmt)


def imports_of(module: str, file: Path, known: Set[str]) -> Set[str]:
    """The modules of the package (``known``) that ``module`` (source ``file``) imports."""
    found = set()
    for node in _import_nodes(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the module's package (a package's __init__ is its own), up level - 1
                package = module if file.name == "__init__.py" else module.rpartition(".")[0]
                package = package.rsplit(".", node.level - 1)[0]
                base = f"{package}.{base}" if base else package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            if target.split(".")[0] != PACKAGE:
                continue  # third-party
            assert target in known, f"{file}: imports {target}, which is no module of the package"
            if target != module and target not in COMPILED_MODULES:
                found.add(target)
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = package_modules()
    known = set(modules) | COMPILED_MODULES
    return {name: imports_of(name, file, known) for name, file in modules.items()}


def find_cycles(graph: Dict[str, Set[str]], limit: int = 100) -> List[List[str]]:
    """The graph's elementary cycles (at most ``limit``), each from its smallest module: ``[a, b, c, a]``."""
    cycles: List[List[str]] = []

    def walk(start: str, path: List[str], on_path: Set[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if len(cycles) >= limit:
                return
            if nxt == start:
                cycles.append(path + [start])
            elif nxt > start and nxt not in on_path:
                walk(start, path + [nxt], on_path | {nxt})

    for start in sorted(graph):
        walk(start, [start], {start})
    return cycles


def _matches(name: str, module: str) -> bool:
    """``module`` is the one ``LAYERS`` entry ``name`` stands for, or one of its package's (``X.*``)."""
    relative = module if module == PACKAGE else module.removeprefix(PACKAGE + ".")
    return name == relative or (name.endswith(".*") and f"{relative}.".startswith(name[:-1]))


def layer_of(module: str) -> Optional[int]:
    """The index in ``LAYERS`` of ``module``'s layer; None when it is in none."""
    for index, names in enumerate(LAYERS.values()):
        if any(_matches(name, module) for name in names):
            return index
    return None


def test_the_graph_sees_the_whole_package():
    """The walk finds every package folder, and lazy imports (here: the CLI's) count."""
    graph = import_graph()
    assert {"ssg_engine", "ssg_engine.cli", "ssg_engine.kernels", "ssg_engine.eval.ablation",
            "ssg_engine.serve.ray_deployment"} <= set(graph)
    assert "ssg_engine.imaging" in graph["ssg_engine.cli.sample"]  # imported inside a function


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    chains = "\n".join(" -> ".join(c) for c in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s); break each (move the shared code down a layer):\n{chains}"


def test_layers_are_respected():
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"modules in no layer: {', '.join(unplaced)}; place each in LAYERS in {Path(__file__).name}"
    stale = [name for names in LAYERS.values() for name in names if not any(_matches(name, m) for m in graph)]
    assert not stale, f"LAYERS names modules that do not exist: {', '.join(stale)}; remove them"
    names = list(LAYERS)
    upward = [
        f"{m} ({names[layer_of(m)]}) imports {t} ({names[layer_of(t)]})"
        for m, targets in sorted(graph.items()) for t in sorted(targets) if layer_of(t) > layer_of(m)
    ]
    assert not upward, "imports from a higher layer (move the shared code down, or the import up):\n" + "\n".join(upward)


def test_shared_code_asks_the_registry():
    """No module outside ``ssg_engine/families/<name>/`` imports a family's modules, except the ``FAMILY_AWARE`` ones;
    a family imports no other family (shared layers go to ``models.layers``) except as ``FAMILY_REUSE`` says."""
    leaks = []
    for m, targets in sorted(import_graph().items()):
        relative = m.removeprefix(PACKAGE + ".")
        home = relative.split(".")[1] if relative.startswith("families.") and relative.count(".") >= 1 else None
        for t in sorted(targets):
            parts = t.removeprefix(PACKAGE + ".").split(".")
            if len(parts) < 3 or parts[0] != "families":
                continue  # not a family's module (the registry, ssg_engine.families, is for everyone)
            if home is None and any(_matches(name, m) for name in FAMILY_AWARE):
                continue
            if home != parts[1] and parts[1] not in FAMILY_REUSE.get(home, ()):
                leaks.append(f"{m} imports {t}")
    assert not leaks, "import a family through the registry (ssg_engine.families.family / family_of):\n" + "\n".join(leaks)


def test_every_family_aware_module_exists():
    modules = import_graph()
    stale = sorted(name for name in FAMILY_AWARE if not any(_matches(name, m) for m in modules))
    assert not stale, f"FAMILY_AWARE names modules that do not exist: {', '.join(stale)}"
