"""``SSGEngineDiffusionPipeline`` with the real ``diffusers`` package (the ``[diffusers]`` extra, installed by
scripts/setup.sh): a ``DiffusionPipeline`` subclass that loads the shipped models and saved folders, gives
``ImagePipelineOutput`` with the same images as ``ssg_engine.Pipeline``, and honours diffusers' container API."""
from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

import ssg_engine as se
from ssg_engine.diffusers_pipeline import SSGEngineDiffusionPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name, kwargs", [
    ("fashion-mnist", {"class_labels": ["sneaker", 0]}),
    ("fashion-mnist-t2i", {"prompt": ["a sneaker", "a bag"], "negative_prompt": "a coat"}),
])
def test_diffusion_pipeline_subclass_on_the_shipped_models(name, kwargs, tmp_path):
    pipe = SSGEngineDiffusionPipeline.from_pretrained(name)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, DiffusionPipeline) and pipe.device == torch.device("cpu")
    assert set(pipe.components) == {"transformer", "vae", "text_encoder"}
    assert pipe.components["transformer"] is pipe.ssg_pipeline.model
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(0), guidance_scale=2.5, ssg_scale=0.3, num_images_per_prompt=2)
    assert isinstance(out, ImagePipelineOutput) and len(out.images) == 4 and out.images[0].size == (32, 32)
    plain = se.Pipeline.from_pretrained(name)
    plain.set_progress_bar_config(disable=True)
    want = plain(**kwargs, generator=torch.Generator().manual_seed(0), guidance_scale=2.5, ssg_scale=0.3, num_images_per_prompt=2,
                 output_type="pt").images
    got = pipe(**kwargs, generator=torch.Generator().manual_seed(0), guidance_scale=2.5, ssg_scale=0.3, num_images_per_prompt=2,
               output_type="pt", return_dict=False)[0]
    assert torch.equal(got, want)
    # a saved folder loads back through the subclass with the same images
    folder = pipe.save_pretrained(tmp_path / "saved")
    again = SSGEngineDiffusionPipeline.from_pretrained(folder)
    again.set_progress_bar_config(disable=True)
    assert torch.equal(again(**kwargs, seed=3, output_type="pt").images, pipe(**kwargs, seed=3, output_type="pt").images)
    with pytest.raises(TypeError, match="push_to_hub not supported"):
        pipe.save_pretrained(tmp_path / "hub", push_to_hub=True)
