"""The LCM sampler: parity with diffusers' PixArtSigmaPipeline + LCMScheduler, and models that
record that they are latent consistency models (sampler "lcm" and no guidance by default)."""

import json
import shutil

import numpy as np
import pytest
import torch

from pixsigma import cli
from pixsigma.diffusion.samplers import LCM_ACTION, LCM_INDEX_KEY, is_lcm_model, make_scheduler
from pixsigma.errors import PixsigmaError
from pixsigma.model.checkpoint import load_transformer, save_transformer
from pixsigma.pipeline import SigmaPipeline
from pixsigma.pngmeta import read_png_params
from tests.tiny_components import build_pipeline_folder

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "a photo of a red cat sitting on a wooden table"
# PixArt-LCM's scheduler, written out here rather than taken from pixsigma's table.
RELEASE_LCM = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
               "prediction_type": "epsilon", "original_inference_steps": 50, "timestep_scaling": 10.0,
               "timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True, "clip_sample": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_pipeline_folder(tmp_path_factory.mktemp("lcm") / "p")


@pytest.fixture(scope="module")
def pipe(folder):
    return SigmaPipeline.from_pretrained(folder, lowercase=True)


def test_lcm_scheduler_settings_and_timesteps():
    scheduler = make_scheduler("lcm")
    assert type(scheduler).__name__ == "LCMScheduler"
    for key, value in RELEASE_LCM.items():
        assert scheduler.config[key] == value, key
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]  # 50 DDIM timesteps (skip 20), every 12.5th


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_parity_with_diffusers_lcm(pipe, folder, guidance):
    """Same latents, generator (the LCM step injects noise) and prompt: images within 1e-4."""
    from diffusers import LCMScheduler, PixArtSigmaPipeline

    theirs = PixArtSigmaPipeline.from_pretrained(folder, scheduler=LCMScheduler(**RELEASE_LCM))
    theirs.set_progress_bar_config(disable=True)
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    common = dict(height=32, width=32, guidance_scale=guidance, num_inference_steps=4, max_sequence_length=16,
                  output_type="np")
    ours = pipe(PROMPT, latents=lat, sampler="lcm", generator=torch.Generator().manual_seed(3), **common).images
    ref = theirs(PROMPT, latents=lat.clone(), use_resolution_binning=False, clean_caption=False,
                 generator=torch.Generator().manual_seed(3), **common).images
    assert np.abs(ours - ref).mean() < 1e-4
    other = pipe(PROMPT, latents=lat, sampler="lcm", generator=torch.Generator().manual_seed(4), **common).images
    assert np.abs(other - ref).mean() > 1e-3  # the generator matters: the comparison can fail


def _batches(pipe, **kwargs):
    sizes = []
    hook = pipe.transformer.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    try:
        out = pipe(PROMPT, seed=0, output_type="latent", **kwargs)
    finally:
        hook.remove()
    return sizes, out


def _lcm_folder(folder, tmp_path):
    dst = tmp_path / "lcm"
    shutil.copytree(folder, dst)
    index = json.loads((dst / "model_index.json").read_text())
    (dst / "model_index.json").write_text(json.dumps({**index, LCM_INDEX_KEY: "lcm"}))
    return dst


def test_a_folder_that_records_lcm_samples_with_lcm_and_no_guidance(folder, tmp_path):
    plain = SigmaPipeline.from_pretrained(folder)
    sizes, out = _batches(plain, num_inference_steps=2)
    assert out.info["sampler"] == "dpm-solver" and out.info["guidance_scale"] == 4.5 and sizes == [2, 2]
    lcm = SigmaPipeline.from_pretrained(_lcm_folder(folder, tmp_path))
    sizes, out = _batches(lcm)
    assert out.info["sampler"] == "lcm" and out.info["steps"] == 4 and out.info["guidance_scale"] == 1.0
    assert sizes == [1, 1, 1, 1]  # no unconditional pass
    sizes, out = _batches(lcm, sampler="dpm-solver", guidance_scale=4.5, num_inference_steps=2)  # a call may override
    assert out.info["sampler"] == "dpm-solver" and sizes == [2, 2]


def test_a_checkpoint_history_or_lcm_scheduler_marks_an_lcm_model(folder, tmp_path):
    model = load_transformer(folder / "transformer")
    model.history = [{"action": LCM_ACTION, "teacher": "abc"}]
    path = save_transformer(model, tmp_path / "student.safetensors")
    pipe = SigmaPipeline.from_pretrained(folder, transformer=path)
    assert pipe.lcm and pipe.default_sampler == "lcm" and pipe.default_guidance_scale == 1.0
    assert is_lcm_model(scheduler_config={"_class_name": "LCMScheduler"})
    assert not is_lcm_model([{"action": "kv-compress"}], {"pixsigma_unconditional": "null_caption"},
                            {"_class_name": "DPMSolverMultistepScheduler"})


def test_lcm_step_limit_is_a_clear_error(pipe):
    with pytest.raises(PixsigmaError, match="lcm cannot run 60 steps"):
        pipe(PROMPT, sampler="lcm", num_inference_steps=60, seed=0, output_type="latent")


def test_cli_generate_with_lcm_sampler(folder, tmp_path):
    out = tmp_path / "l.png"
    assert cli.main(["generate", "a cat", "--model", str(folder), "-o", str(out), "--sampler", "lcm", "--seed", "2"]) == 0
    params = read_png_params(out)
    assert params["sampler"] == "lcm" and params["steps"] == 4 and params["cfg"] == 4.5  # this folder is no LCM model
