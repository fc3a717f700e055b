"""Per-image seeds: image k of a batch generated with a list of generators is the single-image
call with generator k, for every sampler, in the sampler, the pipeline, diffusers and the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

from pixsigma import cli
from pixsigma.diffusion.samplers import SAMPLERS, randn, sample
from pixsigma.errors import PixsigmaError
from pixsigma.pipeline import SigmaPipeline
from tests.test_samplers import release_scheduler
from tests.tiny_components import build_pipeline_folder

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a red cat", "a blue house"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_pipeline_folder(tmp_path_factory.mktemp("seeds") / "p")


@pytest.fixture(scope="module")
def pipe(folder):
    return SigmaPipeline.from_pretrained(folder, lowercase=True)


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _rowwise_model(x, t):
    """A denoiser that treats every batch row alone with elementwise operations only, so a row's
    output is bitwise the same in any batch; a learned-variance half for the IDDPM sampler."""
    s = float(t) / 1000.0
    eps = torch.tanh(0.7 * x + s) + 0.05 * x
    return torch.cat([eps, torch.tanh(x - s)], dim=1)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampler_rows_follow_their_own_generator_exactly(sampler):
    """With a row-independent denoiser the batched run equals each single run bit for bit: every
    noise draw after the initial latents comes from the row's own generator."""
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seeds = [11, 12, 13, 14]
    batch = sample(_rowwise_model, x, sampler, steps=6, generator=_gens(seeds))
    for k, s in enumerate(seeds):
        single = sample(_rowwise_model, x[k:k + 1], sampler, steps=6, generator=torch.Generator().manual_seed(s))
        assert torch.equal(batch[k:k + 1], single), (sampler, k)


def test_stochastic_samplers_use_the_generator():
    """SA-Solver and IDDPM draw noise after the initial latents (so the test above can fail for
    them); the ODE samplers do not."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for sampler, stochastic in (("sa-solver", True), ("iddpm", True), ("dpm-solver", False), ("ddim", False),
                                ("euler", False)):
        a = sample(_rowwise_model, x, sampler, steps=6, generator=torch.Generator().manual_seed(1))
        b = sample(_rowwise_model, x, sampler, steps=6, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b) != stochastic, sampler


def test_generator_list_length_is_checked():
    x = torch.randn(3, 4, 8, 8)
    with pytest.raises(PixsigmaError, match="2 generators for 3 images"):
        sample(_rowwise_model, x, "sa-solver", steps=2, generator=_gens([1, 2]))
    with pytest.raises(PixsigmaError, match="one per image"):
        randn((3, 4, 2, 2), _gens([1, 2, 3, 4]))


def test_randn_rows_are_single_draws():
    """Row k of a list draw is what torch draws for one (1, ...) tensor from generator k."""
    rows = randn((3, 4, 5, 5), _gens([7, 8, 9]))
    for k, s in enumerate([7, 8, 9]):
        ref = torch.randn((1, 4, 5, 5), generator=torch.Generator().manual_seed(s))
        assert torch.equal(rows[k:k + 1], ref)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_pipeline_image_k_is_the_single_call_with_generator_k(pipe, sampler):
    """2 prompts x 2 images with 4 generators: image k equals the single call with generator k.

    The transformer and the text encoder give a row results that differ in the last float bits
    between batch sizes (matmul blocking depends on the batch: about 1e-6 relative per forward),
    and the random tiny model amplifies them over the steps, so the comparison allows 1e-5 of the
    latents' scale; another seed moves the latents by more than 1e-2 of it."""
    seeds = [21, 22, 23, 24]
    batch = pipe(PROMPTS, num_images_per_prompt=2, generator=_gens(seeds), sampler=sampler, num_inference_steps=4,
                 negative_prompt="ugly", output_type="latent").images
    for k, s in enumerate(seeds):
        single = pipe(PROMPTS[k // 2], generator=torch.Generator().manual_seed(s), sampler=sampler,
                      num_inference_steps=4, negative_prompt="ugly", output_type="latent").images
        scale = single.abs().max()
        assert (batch[k:k + 1] - single).abs().max() <= 1e-5 * scale, (sampler, k)
        other = pipe(PROMPTS[k // 2], generator=torch.Generator().manual_seed(s + 100), sampler=sampler,
                     num_inference_steps=4, negative_prompt="ugly", output_type="latent").images
        assert (other - single).abs().max() > 1e-2 * scale  # the tolerance is far below a seed's effect


def test_batched_cfg_leaves_dpm_solver_unchanged(pipe):
    """A single generator and a one-element list give the same images, bit for bit."""
    kw = dict(num_inference_steps=4, output_type="latent", sampler="dpm-solver")
    a = pipe("a red cat", generator=torch.Generator().manual_seed(5), **kw).images
    b = pipe("a red cat", generator=_gens([5]), **kw).images
    c = pipe("a red cat", seed=5, **kw).images
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("sampler", ["sa-solver", "dpm-solver"])
def test_generator_list_parity_with_diffusers(folder, pipe, sampler):
    """diffusers' PixArtSigmaPipeline, with its scheduler built from the release's literal values,
    for 2 prompts x 2 images and a list of 4 generators: the same latents (SA-Solver draws noise
    at every step from each image's generator in both)."""
    from diffusers import PixArtSigmaPipeline

    theirs = PixArtSigmaPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    theirs.scheduler = release_scheduler(sampler)
    seeds = [31, 32, 33, 34]
    common = dict(height=32, width=32, guidance_scale=4.5, negative_prompt="blurry", max_sequence_length=16,
                  num_images_per_prompt=2, num_inference_steps=5, output_type="latent")
    ours = pipe(PROMPTS, generator=_gens(seeds), sampler=sampler, **common).images
    ref = theirs(PROMPTS, generator=_gens(seeds), use_resolution_binning=False, clean_caption=False, **common).images
    assert ours.shape == ref.shape == (4, 4, 16, 16)
    assert (ours - ref).abs().mean() <= 1e-4 * ref.abs().mean()
    # every image differs from its neighbours: the generators are used one per image
    assert all((ours[k] - ours[k + 1]).abs().mean() > 1e-2 * ref.abs().mean() for k in range(3))


def test_cli_image_k_equals_its_seed_alone(folder, tmp_path):
    """`generate -n 3 --seed S` writes image k as `--seed S+k` alone does (decoded pixels equal)."""
    base = ["generate", "a red cat", "--model", str(folder), "--steps", "3", "--sampler", "sa-solver"]
    assert cli.main(base + ["-n", "3", "--seed", "40", "-o", str(tmp_path / "batch.png")]) == 0
    for k in range(3):
        assert cli.main(base + ["--seed", str(40 + k), "-o", str(tmp_path / f"one{k}.png")]) == 0
        batch = np.asarray(Image.open(tmp_path / f"batch-{k:03d}.png"))
        alone = np.asarray(Image.open(tmp_path / f"one{k}.png"))
        assert np.array_equal(batch, alone), k
    first = np.asarray(Image.open(tmp_path / "batch-000.png")).astype(int)
    assert np.abs(first - np.asarray(Image.open(tmp_path / "batch-001.png"))).mean() > 1
