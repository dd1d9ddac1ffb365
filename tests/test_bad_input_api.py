"""Bad input to the Python API, bad configs and checkpoints: one clear error, raised before any compute (issue #10)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ssg_engine import SSG, CheckpointError, ModelConfig, generate, load_models, sample_reference
from ssg_engine.families.var.config import ARCH_FIELDS
from ssg_engine.engine import Engine
from ssg_engine.guidance import DEFAULT_BETA
from ssg_engine.pretrained import PRETRAINED_DIR
from ssg_engine import NonFiniteLogitsError

REF = dict(top_k=1, top_p=0.0)  # greedy: the same tokens whatever the random numbers


def _golden_config(tiny_dir) -> dict:
    return json.loads((tiny_dir / "config.json").read_text())


def _fresh(tiny_dir):
    return load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=tiny_dir / "config.json")


@pytest.fixture(scope="module")
def engine(tiny_dir):
    vae, var = _fresh(tiny_dir)
    return Engine(var, vae, max_batch=4, device="cpu", dtype=torch.float32, cuda_graphs=False, backend="reference")


# ----------------------------------------------------------------------------- config files and dicts


def test_invalid_json_names_file_and_position(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"V": 256,,}')
    with pytest.raises(ValueError, match=r"config file .*bad.json is not valid JSON: Expecting property name .* at line 1, column 11"):
        ModelConfig.from_json(bad)


def test_missing_fields_are_listed(tiny_dir, tmp_path):
    d = _golden_config(tiny_dir)
    del d["depth"], d["V"]
    (tmp_path / "c.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"config file .*c.json: missing required field\(s\) \['V', 'depth'\]"):
        ModelConfig.from_json(tmp_path / "c.json")
    with pytest.raises(ValueError, match=r"^config: missing required field\(s\) \['V', 'depth'\]"):
        ModelConfig.from_dict(d)
    # with the checkpoints, a partial config is merged over their shapes (issue 19)
    full = ModelConfig.from_json(tiny_dir / "config.json")
    for partial in (tmp_path / "c.json", d):
        assert load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=partial)[1].config == full


def test_required_fields_are_the_architecture(tiny_dir):
    assert set(ARCH_FIELDS) == set(_golden_config(tiny_dir))
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['V', 'Cvae'"):
        ModelConfig.from_dict({})


def test_shipped_and_golden_configs_load(tiny_dir):
    assert ModelConfig.from_json(PRETRAINED_DIR / "config.json").V == 512
    assert ModelConfig.from_json(tiny_dir / "config.json").V == 256


def test_config_dict_accepted(tiny_dir, tiny_models, golden):
    vae, var = load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=_golden_config(tiny_dir))
    assert var.config == tiny_models[1].config
    assert torch.equal(var(golden["tf.label"], golden["tf.x_BLCv"]), tiny_models[1](golden["tf.label"], golden["tf.x_BLCv"]))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(V="256"), r"V must be an integer \(got '256'\)"),
        (dict(depth=2.5), r"depth must be an integer \(got 2.5\)"),
        (dict(attn_l2_norm=1), r"attn_l2_norm must be true or false \(got 1\)"),
        (dict(patch_nums=[1, "2"]), r"patch_nums must be a list of integers"),
    ],
)
def test_config_value_types(tiny_dir, change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({**_golden_config(tiny_dir), **change})


def test_config_directory_and_wrong_kinds(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config path .*var_tiny is a directory; pass the JSON config file \(e.g. .*config.json\)"):
        load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=tiny_dir)
    with pytest.raises(ValueError, match=r"config file .*var.pth is not a text file"):
        load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=tiny_dir / "var.pth")
    with pytest.raises(ValueError, match=r"config 'd99' is neither a preset \(d16, d20, d24, d30, d36\) nor an existing JSON file"):
        load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config="d99")
    with pytest.raises(TypeError, match="config must be None, a preset name, a JSON path, a dict or a ModelConfig; got int"):
        load_models(tiny_dir / "var.pth", tiny_dir / "vae.pth", config=5)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config file .*list.json must be a JSON object"):
        ModelConfig.from_json(tmp_path / "list.json")


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_directory(tiny_dir):
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*var_tiny is a directory, not a file; pass the checkpoint file inside it \(it holds golden.safetensors, vae.pth, var.pth\)"):
        load_models(tiny_dir, tiny_dir / "vae.pth", config=tiny_dir / "config.json")


def test_legacy_checkpoint_loads(tiny_dir, tmp_path, golden, tiny_models):
    for name in ("var", "vae"):
        sd = torch.load(tiny_dir / f"{name}.pth", weights_only=True)
        torch.save(sd, tmp_path / f"{name}.pth", _use_new_zipfile_serialization=False)
    assert (tmp_path / "var.pth").read_bytes()[:1] == b"\x80"
    _, var = load_models(tmp_path / "var.pth", tmp_path / "vae.pth", config=tiny_dir / "config.json")
    assert torch.equal(var(golden["tf.label"], golden["tf.x_BLCv"]), tiny_models[1](golden["tf.label"], golden["tf.x_BLCv"]))


def test_format_detected_by_content(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    for name, fname in (("var", "var.SAFETENSORS"), ("vae", "vae.weights")):  # upper-case and unknown extensions
        sd = torch.load(tiny_dir / f"{name}.pth", weights_only=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / fname))
    shutil.copy(tiny_dir / "vae.pth", tmp_path / "vae.bin")  # a torch zip file with another extension
    load_models(tmp_path / "var.SAFETENSORS", tmp_path / "vae.weights", config=tiny_dir / "config.json")
    load_models(tmp_path / "var.SAFETENSORS", tmp_path / "vae.bin", config=tiny_dir / "config.json")


def test_unreadable_checkpoints(tiny_dir, tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pth is not a readable torch checkpoint or safetensors file \(it is empty or starts with neither"):
        load_models(tmp_path / "empty.pth", tiny_dir / "vae.pth", config=tiny_dir / "config.json")
    sd = torch.load(tiny_dir / "var.pth", weights_only=True)
    torch.save({"model": sd, "step": torch.tensor(3)}, tmp_path / "wrapped.pth")
    with pytest.raises(CheckpointError, match=r"does not hold a state dict .*it nests mappings under \['model'\]: save the model's state dict \(e.g. sd\['model'\]\) on its own"):
        load_models(tmp_path / "wrapped.pth", tiny_dir / "vae.pth", config=tiny_dir / "config.json")
    with pytest.raises(TypeError, match="var_ckpt must be a checkpoint path or a state dict, got int"):
        load_models(123, tiny_dir / "vae.pth")
    with pytest.raises(CheckpointError, match=r"var_ckpt does not hold a state dict \(a flat mapping from names to tensors\)"):
        load_models({"head.weight": [1.0]}, tiny_dir / "vae.pth")


# ----------------------------------------------------------------------------- labels


BAD_LABELS = [
    ([1.9, 2.9], r"labels\[0\] must be an integer class index, got 1.9"),
    (torch.tensor([1.9, 2.9]), r"labels must be a list of integer class indices, or a 1-D integer tensor or NumPy array; got dtype torch.float32 and shape \(2,\)"),
    (torch.tensor([[1], [2]]), r"got dtype torch.int64 and shape \(2, 1\)"),
    (np.array([1.0, 2.0]), r"got dtype torch.float64 and shape \(2,\)"),
    ([True, False], r"labels\[0\] must be an integer class index, got True"),
    (torch.tensor([True]), r"got dtype torch.bool"),
    ([[1, 2]], r"labels\[0\] must be an integer class index, got \[1, 2\]"),
    ([], "labels is empty: give at least one class index"),
    (["sneaker", "bag"], r"labels must be integer class indices, not class names \(\['sneaker', 'bag'\]\); .*ssg_engine.data.class_index"),
    ("sneaker", r"not class names \('sneaker'\)"),
    (np.array(["bag"]), r"labels must be integer class indices, not class names"),
    (np.array(3), r"got dtype torch.int64 and shape \(\)"),
    (3, "labels must be a list of integer class indices, or a 1-D integer tensor or NumPy array; got int"),
    ([1, 10], r"class labels must be in \[0, 10\); got \[10\]"),
]


@pytest.mark.parametrize("labels, match", BAD_LABELS)
def test_bad_labels_generate(tiny_models, labels, match):
    vae, var = tiny_models
    with pytest.raises(ValueError, match=match):
        generate(var, vae, labels)


@pytest.mark.parametrize("labels, match", BAD_LABELS)
def test_bad_labels_engine(engine, labels, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(labels)


def test_bad_labels_sample_reference(tiny_models):
    _, var = tiny_models
    with pytest.raises(ValueError, match=r"label_B\[1\] must be an integer class index, got 2.9"):
        sample_reference(var, 2, [1, 2.9])
    with pytest.raises(ValueError, match=r"label_B must be an integer class index < 10 \(negative: unconditional\), got 2.5"):
        sample_reference(var, 2, 2.5)
    with pytest.raises(ValueError, match="batch size B must be a positive integer, got True"):
        sample_reference(var, True, [1])


def test_integer_label_forms_agree(tiny_models, engine):
    vae, var = tiny_models
    forms = [[1, 7], (1, 7), torch.tensor([1, 7]), torch.tensor([1, 7], dtype=torch.int32), np.array([1, 7]),
             np.array([1, 7], dtype=np.uint8), np.array([7, 1])[::-1], [np.int64(1), torch.tensor(7)]]
    _, want = generate(var, vae, [1, 7], **REF, return_tokens=True)
    for labels in forms:
        _, got = generate(var, vae, labels, **REF, return_tokens=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), labels
        _, got = engine.generate(labels, **REF)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), labels
    ref = sample_reference(var, 2, np.int64(3), seed=0, **REF)
    assert torch.equal(ref.tokens[0], sample_reference(var, 2, 3, seed=0, **REF).tokens[0])


# ----------------------------------------------------------------------------- numbers, SSG, backend, seed


def test_ssg_default():
    """No beta: the model's (``SSG.for_model``; a model without a card value gets the package default)."""
    assert SSG().beta is None and SSG().step_betas(3) == [0.0, DEFAULT_BETA, DEFAULT_BETA]
    assert SSG().for_model(object()) == SSG(beta=DEFAULT_BETA, prior="dse")


def test_numpy_and_tensor_numbers(tiny_models, engine):
    vae, var = tiny_models
    assert SSG(beta=np.float32(0.5)) == SSG(beta=0.5)
    assert SSG(betas=np.array([0.0, 0.5]), first_step=np.int64(1), last_step=torch.tensor(1)) == SSG(betas=[0.0, 0.5], last_step=1)
    assert SSG(beta_start=torch.tensor(0.25), beta_end=np.float64(1.0)).beta_start == 0.25
    plain = dict(cfg=1.5, top_k=5, top_p=0.9, temperature=0.8, ssg=SSG(beta=0.5))
    odd = dict(cfg=torch.tensor(1.5), top_k=np.int64(5), top_p=np.float32(0.9), temperature=torch.tensor(0.8), ssg=SSG(beta=np.float32(0.5)))
    want = sample_reference(var, 2, [1, 2], seed=np.int64(3), **plain).tokens
    got = sample_reference(var, 2, [1, 2], seed=3, **odd).tokens
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    _, want = engine.generate([1, 2], seed=3, **plain)
    _, got = engine.generate([1, 2], seed=np.int64(3), **odd)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cfg=True), "cfg must be a finite number, got True"),
        (dict(cfg="1.5"), "cfg must be a finite number, got '1.5'"),
        (dict(cfg=torch.tensor([1.5, 2.0])), r"cfg must be a finite number, got tensor\(\[1.5000, 2.0000\]\)"),
        (dict(top_k=True), r"top_k must be an integer >= 0 \(0 disables it\), got True"),
        (dict(top_k=5.0), r"top_k must be an integer >= 0 \(0 disables it\), got 5.0"),
        (dict(top_k=torch.tensor(5.0)), r"top_k must be an integer >= 0 \(0 disables it\), got tensor\(5.\)"),
        (dict(top_p=np.float32("nan")), r"top_p must be in \[0, 1\] \(0 disables it\), got (np.float32\()?nan"),
        (dict(temperature=np.bool_(True)), r"temperature must be a finite number > 0, got (np.)?True"),
        (dict(ssg=0.5), "ssg must be an ssg_engine.SSG or None, got float"),
        (dict(seed=1.5), r"seed must be an integer in \[-2\*\*63, 2\*\*63 - 1\] or None, got 1.5"),
        (dict(seed=2**63), r"seed must be an integer in \[-2\*\*63, 2\*\*63 - 1\] or None, got 9223372036854775808"),
        (dict(seed="0"), r"seed must be an integer .* got '0'"),
        (dict(seed=True), r"seed must be an integer .* got True"),
        (dict(ssg=SSG(beta=0.5, first_step=20)), "first_step=20 is past the last step 6 of a 7-scale model"),
    ],
)
def test_bad_numbers_generate(tiny_models, kwargs, match):
    vae, var = tiny_models
    with pytest.raises((ValueError, TypeError), match=match):
        generate(var, vae, [1], **kwargs)


def test_bad_numbers_engine_and_reference(engine, tiny_models):
    _, var = tiny_models
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*63 - 1\] or None, got 0.5"):
        sample_reference(var, 1, [1], seed=0.5)
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        engine.generate([1], top_k=np.float64(3))
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*63 - 2\] or None"):
        engine.generate(list(range(5)), seed=2**63 - 1)  # two chunks: seeds seed and seed + 1
    _, none = engine.generate([1], seed=None, top_k=5)
    assert all(torch.equal(a, b) for a, b in zip(none, engine.generate([1], seed=0, top_k=5)[1]))  # the Engine's None is 0
    with pytest.raises(ValueError, match="first_step=7 is past the last step 6"):
        engine.generate([1], ssg=SSG(beta=0.5, first_step=7))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=True), "beta must be a finite number, got True"),
        (dict(beta="0.5"), "beta must be a finite number, got '0.5'"),
        (dict(betas="0.5"), "betas must be a sequence of numbers, one per sampling step; got '0.5'"),
        (dict(betas=torch.tensor(0.5)), "betas must be a sequence of numbers"),
        (dict(betas=[0.0, np.bool_(True)]), r"betas\[1\] must be a finite number, got (np.)?True"),
        (dict(beta=0.5, first_step=1.0), r"first_step must be an integer >= 1 \(step 0 has no prior\), got 1.0"),
        (dict(beta=0.5, last_step=True), "last_step must be an integer >= first_step=1, got True"),
        (dict(beta_start=0.1, beta_end=np.float64("inf")), r"beta_end must be a finite number, got (np.float64\()?inf"),
    ],
)
def test_bad_ssg_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSG(**kwargs)


def test_engine_construction_errors(tiny_models, monkeypatch):
    vae, var = tiny_models
    monkeypatch.delenv("SSG_ENGINE_BACKEND", raising=False)
    with pytest.raises(ValueError, match="unknown backend 'nope'; choose one of auto, reference, triton"):
        Engine(var, vae, max_batch=2, device="cpu", dtype=torch.float32, backend="nope")
    with pytest.raises(ValueError, match="max_batch must be a positive integer, got 2.0"):
        Engine(var, vae, max_batch=2.0, device="cpu", dtype=torch.float32)
    with pytest.raises(TypeError, match=r"Engine\(var, vae\) takes the VAR, then the VQVAE \(load_models returns \(vae, var\)\); got VQVAE, VAR"):
        Engine(vae, var, device="cpu", dtype=torch.float32)
    with pytest.raises(TypeError, match=r"generate\(var, vae, labels\) takes the VAR, then the VQVAE"):
        generate(vae, var, [1])


# ----------------------------------------------------------------------------- non-finite logits


def _broken(tiny_dir, value: float):
    vae, var = _fresh(tiny_dir)
    var.head.weight.fill_(value)
    return vae, var


NONFINITE = r"non-finite logits at scale {} \({}\) after CFG, SSG and temperature; lower cfg/ssg beta or raise temperature, or check the checkpoint"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_head_reference(tiny_dir, value):
    vae, var = _broken(tiny_dir, value)
    with pytest.raises(NonFiniteLogitsError, match=NONFINITE.format(0, "1x1")):
        sample_reference(var, 2, [1, 2], seed=0)
    with pytest.raises(ValueError, match=NONFINITE.format(0, "1x1")):  # a ValueError too, so callers catching those show it
        generate(var, vae, [1, 2])


def test_nonfinite_head_engine(tiny_dir):
    vae, var = _broken(tiny_dir, float("nan"))
    eng = Engine(var, vae, max_batch=2, device="cpu", dtype=torch.float32, cuda_graphs=False, backend="reference")
    with pytest.raises(NonFiniteLogitsError, match=NONFINITE.format(0, "1x1")):
        eng.generate([1, 2, 3])


def test_extreme_cfg(tiny_models, engine):
    _, var = tiny_models
    # cfg=1e30 still fits float32 on this model (the guided logits stay below 3.4e38): it samples, greedily
    assert len(sample_reference(var, 2, [1, 2], seed=0, cfg=1e30).tokens) == 7
    # cfg=1e38 overflows at scale 1, where the CFG ramp first applies (t = cfg / 6)
    with pytest.raises(NonFiniteLogitsError, match=NONFINITE.format(1, "2x2")):
        sample_reference(var, 2, [1, 2], seed=0, cfg=1e38)
    with pytest.raises(NonFiniteLogitsError, match=NONFINITE.format(1, "2x2")):
        engine.generate([1, 2], cfg=1e38)
    with pytest.raises(NonFiniteLogitsError, match=NONFINITE.format(0, "1x1")):
        sample_reference(var, 1, [1], seed=0, temperature=1e-40)


def test_nonfinite_flag_after_the_loop_triton(tiny_dir):
    """The Triton path has no host check in the loop: the per-scale device flags are checked once after the batch."""
    pytest.importorskip("triton", reason="triton not installed")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    vae, var = _broken(tiny_dir, float("nan"))
    eng = Engine(var, vae, max_batch=1, device=device, dtype=torch.float32, cuda_graphs=device == "cuda", backend="triton")
    with pytest.raises(NonFiniteLogitsError, match=NONFINITE.format(0, "1x1")):
        eng.generate([1])
