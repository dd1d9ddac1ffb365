"""The ComfyUI custom nodes (comfyui/ssg_engine_nodes), called as ComfyUI calls them (ComfyUI itself is not on the
package index): the folder imported as ComfyUI imports a custom-node folder, each node's schema checked as ComfyUI's
validation reads it, ``FUNCTION`` run on the shipped models with the widgets' defaults, the IMAGE type's layout
(B, H, W, C) float32 in [0, 1], and bad inputs as one clear message."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import ssg_engine as se
from ssg_engine.cli import common
from ssg_engine.guidance import PRIORS

NODES_DIR = Path(__file__).resolve().parents[1] / "comfyui" / "ssg_engine_nodes"
COMFY_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "IMAGE", "SSG_PIPELINE"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nodes():
    """The package as ComfyUI's ``load_custom_node`` imports a folder: its ``__init__.py`` under the folder's name."""
    name = NODES_DIR.name
    spec = importlib.util.spec_from_file_location(name, NODES_DIR / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def defaults(cls, **given):
    """The inputs ComfyUI sends for untouched widgets (each default, a combo's first choice), overridden by ``given``."""
    out = {}
    for section in ("required", "optional"):
        for name, spec in cls.INPUT_TYPES().get(section, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list):
                out[name] = kind[0]
            elif "default" in opts:
                out[name] = opts["default"]
    out.update(given)
    return out


def run(cls, **inputs):
    """ComfyUI's execution: instantiate the class, call its FUNCTION with keyword inputs, get a tuple."""
    result = getattr(cls(), cls.FUNCTION)(**inputs)
    assert isinstance(result, tuple) and len(result) == len(cls.RETURN_TYPES)
    return result


def test_schema_is_well_formed(nodes):
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for key, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert isinstance(cls.CATEGORY, str) and callable(getattr(cls, cls.FUNCTION))
        assert isinstance(cls.RETURN_TYPES, tuple) and len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
        assert set(cls.RETURN_TYPES) <= COMFY_TYPES
        schema = cls.INPUT_TYPES()
        assert set(schema) <= {"required", "optional", "hidden"} and schema["required"]
        for section in schema.values():
            for name, spec in section.items():
                assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (key, name)
                kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
                if isinstance(kind, list):
                    assert kind and all(isinstance(c, str) for c in kind), (key, name)
                    continue
                assert kind in COMFY_TYPES, (key, name)
                if kind in ("INT", "FLOAT"):
                    assert opts["min"] <= opts["default"] <= opts["max"], (key, name)
    # the ranges are the command line's bounds, so any widget value is one the sampler takes
    req = nodes.NODE_CLASS_MAPPINGS["SSGEngineSampler"].INPUT_TYPES()["required"]
    assert (req["guidance_scale"][1]["min"], req["guidance_scale"][1]["max"]) == (-common.CFG_MAX, common.CFG_MAX)
    assert (req["temperature"][1]["min"], req["temperature"][1]["max"]) == (common.TEMPERATURE_MIN, common.TEMPERATURE_MAX)
    assert (req["ssg_beta"][1]["min"], req["ssg_beta"][1]["max"]) == (-common.SSG_BETA_MAX, common.SSG_BETA_MAX)
    assert req["top_k"][1]["max"] == common.INT32_MAX and req["seed"][1]["max"] == common.INT64_MAX
    assert req["ssg_prior"][0] == list(PRIORS)


def test_loader_and_sampler_on_the_shipped_models(nodes):
    loader, sampler = nodes.NODE_CLASS_MAPPINGS["SSGEngineLoader"], nodes.NODE_CLASS_MAPPINGS["SSGEngineSampler"]
    (var_pipe,) = run(loader, **defaults(loader))
    assert isinstance(var_pipe, se.Pipeline) and var_pipe.family == "var"
    (images,) = run(sampler, **defaults(sampler, pipeline=var_pipe, prompt="sneaker\n8", images_per_prompt=2))
    assert images.shape == (4, 32, 32, 3) and images.dtype == torch.float32
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    want = var_pipe(class_labels=[7, 8], num_images_per_prompt=2, seed=0, output_type="pt").images  # ssg_beta 0: off
    assert torch.equal(images, want.permute(0, 2, 3, 1))
    (t2i,) = run(loader, **defaults(loader, model="fashion-mnist-t2i"))
    (images,) = run(sampler, **defaults(sampler, pipeline=t2i, prompt="a sneaker", settings="custom", guidance_scale=2.0,
                                        temperature=0.9, ssg_beta=0.15, seed=4))
    want = t2i("a sneaker", guidance_scale=2.0, top_k=0, top_p=0.0, temperature=0.9, ssg_scale=0.15, seed=4, output_type="pt").images
    assert images.shape == (1, 32, 32, 3) and torch.equal(images, want.permute(0, 2, 3, 1))


def test_compare_node_returns_one_labelled_image(nodes):
    loader, compare = nodes.NODE_CLASS_MAPPINGS["SSGEngineLoader"], nodes.NODE_CLASS_MAPPINGS["SSGEngineCompare"]
    (pipe,) = run(loader, **defaults(loader))
    (grid,) = run(compare, **defaults(compare, pipeline=pipe, prompt="bag\ncoat", images_per_prompt=2))
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[3] == 3 and grid.dtype == torch.float32
    assert float(grid.min()) >= 0 and float(grid.max()) <= 1
    want = pipe.compare(class_labels=["bag", "coat"], num_images_per_prompt=2, seed=0)
    assert tuple(grid.shape[1:3]) == (want.height, want.width)


@pytest.mark.parametrize("node, given, match", [
    ("SSGEngineLoader", {"model": " "}, "model is empty"),
    ("SSGEngineLoader", {"model": "no-such-model"}, "'no-such-model' does not exist"),
    ("SSGEngineSampler", {"prompt": "\n \n"}, "prompt is empty"),
    ("SSGEngineSampler", {"prompt": "a red fox"}, "unknown class 'a red fox'"),
    ("SSGEngineSampler", {"pipeline": "not a pipeline"}, "pipeline must come from the SSG-Engine Loader node"),
    ("SSGEngineSampler", {"negative_prompt": "a bag"}, "negative_prompt is for Infinity models"),
])
def test_bad_inputs_are_one_clear_message(nodes, node, given, match):
    cls = nodes.NODE_CLASS_MAPPINGS[node]
    inputs = defaults(cls, **given)
    if "pipeline" in cls.INPUT_TYPES()["required"] and "pipeline" not in given:
        inputs["pipeline"] = se.Pipeline.from_pretrained("fashion-mnist")
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match) as info:
        run(cls, **inputs)
    assert "\n" not in str(info.value)
