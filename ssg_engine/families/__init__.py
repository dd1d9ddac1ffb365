"""Model families and their registry: one folder per family (``families/<name>/``: model, tokenizer, config and
presets, request and reference sampler, loading, upstream-compatible entry points), and one line per family in
``FAMILIES``.

Shared code never imports a family by name: it asks this registry, which imports a family's ``FamilySpec`` from its
``"module:ATTRIBUTE"`` string on first use (as vLLM's model registry does). So ``import ssg_engine.families`` imports
no family (and no torch), and a new family is one new folder with a ``spec.py`` plus one ``FAMILIES`` line.

    family("var")                  # the FamilySpec registered as "var"
    family_of(model)               # the spec of the family a model belongs to (None: of none)
    detect_family(state_dict)      # (spec, checkpoint kind) of the one family whose checkpoint it is, else None
    split_keywords(overrides, spec)  # pop a family's request keywords; another family's is one TypeError
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, MutableMapping, Optional, Tuple

if TYPE_CHECKING:
    import torch

# family name -> "module:ATTRIBUTE" of its FamilySpec, imported on first use (register_family adds one)
FAMILIES: Dict[str, str] = {
    "var": "ssg_engine.families.var.spec:SPEC",
    "infinity": "ssg_engine.families.infinity.spec:SPEC",
    "hart": "ssg_engine.families.hart.spec:SPEC",
}
# the family a model of no registered family is checked as (its messages say what a sampler takes)
DEFAULT_FAMILY = "var"
_LOADED: Dict[str, "FamilySpec"] = {}


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """What shared code (Engine, ``generate``, checkpoint loading, the command line) asks of a model family.

    ``name``: the registry key and ``--family`` value; ``title``: its name in messages (``"VAR"``); ``kind``: the
    phrase a message uses for its models (``"class-conditional VAR"``) and ``takes``: what they take (``"labels and
    SamplingParams"``). ``checkpoints``: checkpoint kind -> (a key only that kind's state dicts hold, its name in
    messages), e.g. ``{"var": ("pos_1LC", "VAR"), "vqvae": ("quantize.embedding.weight", "VQ-VAE")}``; the first is the
    model's. ``loader``: ``"module:function"`` that loads a (model, VAE) pair from two checkpoints (``load``).
    ``keywords``: the request keywords besides ``SamplingParams``' fields; ``text_conditional``: prompts / text features
    instead of class labels. The callables take a model as a sampler is given it: ``owns(model)``: of this family;
    ``check_pair(model, vae, where)``: ``TypeError`` naming ``where`` unless they are this family's pair;
    ``placement(model)``: (device, dtype) an Engine for it runs at; ``generate_reference(model, vae, cond, params, *,
    row_seeds=None, **keywords)``: (images (B, 3, H, W), tokens per scale) from the family's reference sampler
    (``keywords``: the family's keywords; ``row_seeds``: per-row seeding, :mod:`ssg_engine.seeding`); ``rows(model,
    cond)``: the number of images B a condition asks for (``ValueError``/``TypeError`` for a malformed one). Optional: ``owns_tokenizer(vae)``: ``vae`` is this
    family's tokenizer (another family's model given it is one ``TypeError``); ``resolve_params(params, overrides,
    model)``: the family's own sampling settings (default: ``SamplingParams``); ``engine``: whether an ``Engine`` runs
    it (False: the reference sampler on every device); ``engine_bind(model, vae, cond, params, home, static,
    **keywords)``: what the Engine samples a request with: the model bound to it (a ``NextScaleModel``: VAR's model
    itself, Infinity's and HART's request objects), its condition on device ``home`` (``static``: in the static shapes
    CUDA graphs need) and the params the Engine applies; ``engine_request``: ``engine_bind`` returns a request object
    (``Engine.run_batch`` needs it as ``model=``); ``engine_serves(params, overrides)``: whether the Engine serves that
    request (False: ``generate`` runs the reference sampler on CUDA too; None: it serves every request);
    ``engine_dtypes``: the names of the Engine dtypes the family runs at (``"float32"``; empty: any);
    ``engine_prepare(model, vae, device, dtype, vae_dtype)``: the (model, vae) an Engine samples with (VAR: the pair
    cast to ``dtype``; Infinity, HART: a copy with its linear weights in ``dtype`` and ``vae_dtype`` refused);
    ``engine_autocast``: the Engine runs the family under ``torch.autocast(dtype)`` (below float32);
    ``engine_scales(model)``: the most scales a request runs (None: ``len(model.scale_sizes())``);
    ``engine_check_memory(request, vae, dtype, b, cached, device_memory, max_batch)``: ``ValueError`` before anything
    is allocated when a bucket of ``b`` images does not fit ``device_memory`` bytes (``cached``: the KV cache's (rows,
    tokens) so far; None: no check).

    A bound request may also have (the Engine asks with ``hasattr``): ``graph_key()`` (what a captured graph bakes in
    of it), ``cfg_ts()`` (the CFG weight of every scale), ``take_rows(rows)`` / ``pad_rows(b)`` (the request for a
    chunk / a padded bucket), ``static_numbers()`` / ``static_tensors()`` / ``static_copy(numbers)`` (the numbers and
    tensors a captured graph reads from device buffers, and the request reading them), ``seeded(seed)`` (drawing more
    than tokens from the seed tensor), ``top_ks`` (top-k per scale), ``soft_embeddings(state, si, logits, tokens, top_p,
    gumbels)`` (embeddings fed instead of the tokens'). A condition other than a tensor of labels has ``batch``, row
    slicing, ``pad_rows(b)`` and, for graphs, ``tensors()`` and ``static_like(device)``.
    """

    name: str
    title: str
    kind: str
    takes: str
    checkpoints: Mapping[str, Tuple[str, str]]
    loader: str
    owns: Callable[[Any], bool]
    check_pair: Callable[[Any, Any, str], None]
    placement: Callable[[Any], Tuple["torch.device", "torch.dtype"]]
    generate_reference: Callable[..., Tuple[Any, List[Any]]]
    rows: Callable[[Any, Any], int]
    keywords: Tuple[str, ...] = ()
    text_conditional: bool = False
    owns_tokenizer: Optional[Callable[[Any], bool]] = None
    resolve_params: Optional[Callable[[Any, Dict[str, Any], Any], Any]] = None
    engine: bool = True
    engine_bind: Optional[Callable[..., Tuple[Any, Any, Any]]] = None
    engine_serves: Optional[Callable[[Any, Dict[str, Any]], bool]] = None
    engine_dtypes: Tuple[str, ...] = ()
    engine_request: bool = False
    engine_prepare: Optional[Callable[..., Tuple[Any, Any]]] = None
    engine_autocast: bool = False
    engine_scales: Optional[Callable[[Any], int]] = None
    engine_check_memory: Optional[Callable[..., None]] = None

    def detect(self, state_dict: Mapping[str, Any]) -> bool:
        """Whether ``state_dict`` holds the marker key of one of this family's checkpoint kinds."""
        return any(key in state_dict for key, _ in self.checkpoints.values())

    @property
    def loader_name(self) -> str:
        """The loading function's public name (``"load_models"``), for messages."""
        return self.loader.rpartition(":")[2]

    def load(self, model_ckpt: Any, vae_ckpt: Any, **kwargs: Any) -> Tuple[Any, Any]:
        """The family's loader (``loader``) on two checkpoints (paths or state dicts); ``kwargs``: ``config``,
        ``device``, ``dtype``. The pair in the loader's order (VAR: (vae, var); Infinity: (model, vae))."""
        return _resolve(self.loader)(model_ckpt, vae_ckpt, **kwargs)


def _resolve(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def register_family(name: str, target: str) -> None:
    """Register the family ``name`` as the ``FamilySpec`` at ``target`` (``"module:ATTRIBUTE"``, imported on first use);
    ``ValueError`` for a malformed target or a name taken by another target."""
    module, sep, attribute = target.partition(":")
    if not (isinstance(name, str) and name and sep and module and attribute):
        raise ValueError(f"register_family: name must be a non-empty string and target 'module:ATTRIBUTE'; got {name!r}, {target!r}")
    if FAMILIES.get(name, target) != target:
        raise ValueError(f"register_family: family {name!r} is already registered as {FAMILIES[name]!r}")
    FAMILIES[name] = target


def family(name: str) -> FamilySpec:
    """The spec of the family registered as ``name`` (imported on first use); ``ValueError`` naming the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {name!r}")
    if name not in _LOADED:
        spec = _resolve(FAMILIES[name])
        if not isinstance(spec, FamilySpec) or spec.name != name:
            raise TypeError(f"{FAMILIES[name]} is not the FamilySpec of {name!r}")
        _LOADED[name] = spec
    return _LOADED[name]


def all_families() -> List[FamilySpec]:
    """Every registered family's spec, in registration order (imports each spec module; they import no model code)."""
    return [family(name) for name in FAMILIES]


def family_of(model: Any) -> Optional[FamilySpec]:
    """The spec of the family that owns ``model`` (``spec.owns(model)``), None if no family does."""
    return next((spec for spec in all_families() if spec.owns(model)), None)


def detect_family(state_dict: Mapping[str, Any]) -> Optional[Tuple[FamilySpec, str]]:
    """(spec, checkpoint kind) of the one kind whose marker key ``state_dict`` holds; None if none or several do."""
    found = [(spec, kind) for spec in all_families() for kind, (key, _) in spec.checkpoints.items() if key in state_dict]
    return found[0] if len(found) == 1 else None


def split_keywords(overrides: MutableMapping[str, Any], spec: FamilySpec) -> Dict[str, Any]:
    """Pop ``spec``'s request keywords out of ``overrides`` (the rest are ``SamplingParams`` fields) and return them;
    another family's keyword is one ``TypeError`` naming it and what ``spec``'s models take."""
    for other in all_families():
        for k in other.keywords:
            if k in overrides and k not in spec.keywords:
                raise TypeError(f"{k}= is a {other.kind} keyword; a {spec.kind} takes {spec.takes} only")
    return {k: overrides.pop(k) for k in spec.keywords if k in overrides}
