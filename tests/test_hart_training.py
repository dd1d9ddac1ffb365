"""Training of the Fashion-MNIST text-to-image HART model (hybrid tokenizer + HART + diffusion head + text encoder):
the pieces against their definitions, a tiny deterministic run loaded by the family's loader, and the shipped model
(loads, fits the size budget, samples its classes; CLI sample / eval with no other argument)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ssg_engine.data import HELD_OUT_TEMPLATES, dataset_dir, make_prompt

needs_data = pytest.mark.skipif(not dataset_dir().is_dir(), reason="Fashion-MNIST not installed")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vae_steps=3, hart_steps=3, batch_size=4, hart_batch_size=4, train_limit=64, eval_limit=16,
            progress=False, num_threads=None)


def _recipe():
    from ssg_engine.training import HARTRecipe

    return HARTRecipe(vocab_size=64, z_channels=8, vae_ch=32, patch_nums=(1, 2, 4, 8), embed_dim=32, depth=1, num_heads=2,
                      diff_width=32, diff_depth=1, text_width=32, text_layers=1, text_heads=2)


def _tokenizer(seed: int = 0):
    from ssg_engine.families.hart.tokenizer import HARTTokenizer

    recipe = _recipe()
    torch.manual_seed(seed)
    return HARTTokenizer(recipe.tokenizer_config(), recipe.patch_nums).eval()


# ----------------------------------------------------------------------------- the pieces


def test_training_quantizer_gives_the_tokenizer_tokens_and_codes_plus_residual_are_the_latent():
    from ssg_engine.training.vqvae_trainer import quantize_train

    tok = _tokenizer()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        f = tok.quant_conv(tok.encoder(x))
        f_hat, _, ids, _ = quantize_train(tok, f, refine_last=False)
        *tokens, last = tok.img_to_idxBl_and_frest(x)
    assert all(torch.equal(a.view(3, -1), b) for a, b in zip(ids, tokens))  # training tokens == inference tokens
    # the discrete f_hat of training is the tokenizer's (last scale added without refinement) ...
    assert torch.allclose(f_hat, tok.tokens_to_fhat(tokens), atol=1e-5)
    # ... and codes + continuous residual give back the latent itself: what the decoder sees with continuous_prob
    residual = last - tok.quantize.embedding(tokens[-1])
    assert torch.allclose(tok.tokens_to_fhat(tokens, residual), f, atol=1e-5)
    with torch.no_grad():
        refined, _, _, _ = quantize_train(tok, f)  # VAR's rule refines the last scale too
    assert not torch.allclose(refined, f_hat, atol=1e-4)


def test_diffusion_loss_is_zero_for_the_true_noise_and_variance_and_positive_otherwise():
    from ssg_engine.families.hart.diffusion import TRAIN_STEPS
    from ssg_engine.training.hart_trainer import DiffusionTrainingLoss

    loss_fn = DiffusionTrainingLoss()
    sqrt_cum = torch.from_numpy(loss_fn.tables["sqrt_cum"]).float()
    sqrt_1m = torch.from_numpy(loss_fn.tables["sqrt_one_minus_cum"]).float()

    class Oracle(torch.nn.Module):
        """Predicts the exact noise from (x_t, t, x_start = c) and the posterior variance (var_values -1)."""

        def __init__(self, eps_error: float = 0.0) -> None:
            super().__init__()
            self.eps_error = eps_error

        def forward(self, x_t, t, c):
            eps = (x_t - sqrt_cum[t][:, None] * c) / sqrt_1m[t][:, None]
            return torch.cat([eps + self.eps_error, -torch.ones_like(c)], 1)

    x0 = torch.randn(512, 16, generator=torch.Generator().manual_seed(0)) * 0.3
    seeded = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    t = torch.randint(0, TRAIN_STEPS, (x0.shape[0],), generator=seeded())
    assert (t > 0).all()  # no row at t = 0 (the decoder NLL): the exact prediction has zero loss
    assert loss_fn(Oracle(), x0, x0, seeded()) == pytest.approx(0.0, abs=2e-3)
    # an error e on every epsilon: MSE e^2, and a KL term on the mean that is positive
    wrong = float(loss_fn(Oracle(0.1), x0, x0, seeded()))
    assert wrong > 0.01 * (1 + 1e-3)
    # the t = 0 decoder NLL: a discretized Gaussian with the true mean puts mass ~1 on a bin when its std is tiny
    from ssg_engine.training.hart_trainer import discretized_gaussian_log_likelihood

    x = torch.tensor([[-1.0, 0.0, 1.0]])
    assert torch.allclose(discretized_gaussian_log_likelihood(x, x, torch.full_like(x, math.log(1e-4))), torch.zeros_like(x), atol=1e-4)
    # std 1: an inner bin of width 2/255 holds ~2/255 * N(0; 0, 1); an edge bin holds the tail beyond it, ~1/2
    ll = discretized_gaussian_log_likelihood(x, x, torch.zeros_like(x))[0]
    assert float(ll[1]) == pytest.approx(math.log(2 / 255 / math.sqrt(2 * math.pi)), abs=1e-3)
    assert float(ll[0]) == float(ll[2]) == pytest.approx(math.log(0.5), abs=1e-2)


def test_dropped_prompts_are_the_samplers_unconditional_branch():
    from ssg_engine.families.hart.text import HARTTextFeatures
    from ssg_engine.training.hart_trainer import drop_prompts

    ctx = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = drop_prompts(HARTTextFeatures(ctx, mask), torch.tensor([False, True, False]))
    assert torch.equal(out.context[0], ctx[0]) and torch.equal(out.context[1], torch.zeros(5, 4))
    assert out.context_mask[1].tolist() == [True, False, False, False, False]
    assert out.context_position_ids[1].tolist() == [0] * 5 and torch.equal(out.context_mask[0], mask[0])


def test_word_text_encoder_pads_after_the_words_and_names_the_vocabulary():
    from ssg_engine.data import prompt_vocabulary
    from ssg_engine.families.hart.text import WordTextEncoder
    from ssg_engine.families.infinity.text import TextEncoder, TextEncoderConfig

    enc = WordTextEncoder(TextEncoder(TextEncoderConfig(prompt_vocabulary(), 32, 1, 2, 12)), context_tokens=12)
    f = enc.encode(["a sneaker", "an ankle boot on a dark background"])
    assert tuple(f.context.shape) == (2, 12, 32) and f.context_mask.sum(1).tolist() == [2, 7]
    assert (f.context[0, 2:] == 0).all() and f.context_position_ids[1, :7].tolist() == list(range(7))
    packed = enc.module.encode(["a sneaker"]).kv_compact
    assert torch.allclose(f.context[0, :2], packed, atol=1e-5)
    with pytest.raises(ValueError, match="unknown word.*'fox'.*vocabulary is: a an and ankle"):
        enc.encode(["a red fox"])
    with pytest.raises(ValueError, match="only 8 context tokens"):
        WordTextEncoder(enc.module, context_tokens=8)


# ----------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    from ssg_engine.training import train_fashion_mnist_hart

    root = tmp_path_factory.mktemp("hart")
    metrics = [train_fashion_mnist_hart(root / f"run{i}", seed=0, recipe=_recipe(), **TINY) for i in range(2)]
    return root, metrics


@needs_data
@pytest.mark.slow
def test_tiny_run_writes_upstreams_layout_deterministically(tiny_runs):
    from safetensors.torch import load_file

    import ssg_engine as se
    from ssg_engine.pretrained import load_hart_folder

    root, metrics = tiny_runs
    folder = root / "run0"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "config.json", "llm/config.json", "llm/model.safetensors", "metrics.json", "text_encoder.safetensors",
        "tokenizer/config.json", "tokenizer/model.safetensors"]
    assert all(k.startswith("vae.") for k in load_file(str(folder / "tokenizer" / "model.safetensors")))  # upstream's keys
    m = metrics[0]
    for k in ("psnr", "psnr_residual"):
        assert math.isfinite(m["tokenizer"]["test"][k])
    for k in ("train", "val", "val_held_out_templates"):
        assert 0.0 <= m["hart"][k]["token_acc"] <= 1.0 and m["hart"][k]["diffusion_loss"] > 0
    for part in ("llm/model.safetensors", "tokenizer/model.safetensors", "text_encoder.safetensors"):
        a, b = load_file(str(folder / part)), load_file(str(root / "run1" / part))
        assert all(v.dtype != torch.float32 for v in a.values())
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{part} differs between two runs"
    model, tokenizer = se.load_hart(folder)  # the family's loader reads the folder as it reads upstream's release
    assert model.patch_nums == (1, 2, 4, 8) and model.context_token == 16
    model, tokenizer, text_encoder = load_hart_folder(folder)
    prompts = [make_prompt(y, HELD_OUT_TEMPLATES[0]) for y in (7, 9)]
    images = se.generate(model, tokenizer, prompts, text_encoder=text_encoder, cfg=3.0, seed=0)
    assert tuple(images.shape) == (2, 3, 32, 32) and torch.isfinite(images).all()
    (folder / "text_encoder.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="text_encoder.safetensors missing"):
        load_hart_folder(folder)


def test_cli_train_hart_flags():
    from ssg_engine.cli import build_parser
    from ssg_engine.cli.train import DEFAULTS

    args = build_parser().parse_args(["train", "--family", "hart", "--out", "x", "--var-steps", "2"])
    assert args.family == "hart" and args.var_steps == 2 and args.vae_steps is None
    assert DEFAULTS["hart"]["var_steps"] > 0


# ----------------------------------------------------------------------------- the shipped model


def test_shipped_hart_model_loads_fits_and_samples_its_classes():
    from ssg_engine.eval.classifier import class_accuracy, load_classifier
    from ssg_engine.pretrained import HART_DIR, HART_SAMPLING, HART_SSG_BETA, PRETRAINED_DIR, load_pretrained_hart

    import ssg_engine as se

    hart_bytes = sum(p.stat().st_size for p in HART_DIR.rglob("*.safetensors"))
    all_bytes = sum(p.stat().st_size for p in PRETRAINED_DIR.parent.rglob("*.safetensors"))
    assert hart_bytes <= 10e6 and all_bytes <= 35e6
    cfg = json.loads((HART_DIR / "config.json").read_text())
    assert cfg["family"] == "hart" and cfg["sampling"] == {
        "cfg": HART_SAMPLING.cfg, "more_smooth": HART_SAMPLING.more_smooth, "num_maskgit_iters": HART_SAMPLING.num_maskgit_iters}
    model, tokenizer, text_encoder = load_pretrained_hart()
    assert model.ssg_beta == HART_SSG_BETA and next(model.parameters()).dtype == torch.float32
    labels = [y for y in range(10) for _ in range(3)]
    prompts = [make_prompt(y, HELD_OUT_TEMPLATES[i % 3]) for i, y in enumerate(labels)]
    images = se.generate(model, tokenizer, prompts, HART_SAMPLING, text_encoder=text_encoder)
    clf, _ = load_classifier(train_if_missing=False)
    assert class_accuracy(clf, images, labels) >= 0.5  # the model card: measured on 900 held-out-template prompts
    guided = se.generate(model, tokenizer, prompts[:4], HART_SAMPLING.replace(ssg=se.SSG()), text_encoder=text_encoder)
    assert not torch.equal(guided, images[:4])  # SSG() takes the card's beta (model.ssg_beta)


def test_shipped_hart_runs_with_no_other_argument(tmp_path, capsys):
    from ssg_engine.cli import main

    out = tmp_path / "grid.png"
    assert main(["sample", "--family", "hart", "--prompt", "a sneaker", "--per-prompt", "8", "--compare", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()
    rc = main(["sample", "--family", "hart", "--prompt", "a red fox", "--out", str(tmp_path / "bad.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown word(s) 'red', 'fox'" in err[0] and "vocabulary is: a an and" in err[0], err
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("argv, words", [
    (["eval", "--family", "var", "--no-residual"], ["--no-residual", "--family hart"]),
    (["eval", "--family", "hart", "--var", "x", "--vae", "y"], ["--text-encoder FOLDER"]),
    (["sample", "--family", "hart", "--text-encoder", "x"], ["--text-encoder describes --var/--vae"]),
])
def test_hart_command_line_errors_are_one_line(argv, words, tmp_path, capsys):
    from ssg_engine.cli import main

    rc = main([*argv, *(["--out-dir", str(tmp_path / "e")] if argv[0] == "eval" else ["--out", str(tmp_path / "g.png")])])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], (w, err[0])


@needs_data
@pytest.mark.slow
def test_eval_hart_with_and_without_the_residual(tmp_path, capsys):
    from ssg_engine.cli import main

    common = ["eval", "--family", "hart", "--samples", "10", "--seeds", "1", "--betas", "0.5", "--priors", "dse",
              "--fid-arms", "none", "--batch-size", "10"]
    results = {}
    for name, extra in (("with", []), ("without", ["--no-residual"])):
        assert main([*common, *extra, "--out-dir", str(tmp_path / name)]) == 0, capsys.readouterr().err
        results[name] = json.loads((tmp_path / name / "ablation.json").read_text())
        assert [a["name"] for a in results[name]["arms"]] == ["baseline T=1", "dse b=0.5 T=1"]
    assert results["with"]["settings"]["options"]["residual"] is True
    assert results["without"]["settings"]["options"]["residual"] is False
    assert "Options: more_smooth=" in (tmp_path / "without" / "ablation.md").read_text()
    # the residual changes the images, hence the classifier features
    assert results["with"]["arms"][0]["fd_cls"] != results["without"]["arms"][0]["fd_cls"]
