"""The samplers against independent references: the PixArt-Σ release's scheduler settings written
out here, and the IDDPM step against a float64 formula and diffusers' DDPMScheduler."""

import math

import numpy as np
import pytest
import torch

from pixsigma.diffusion.gaussian import GaussianDiffusion, linear_betas
from pixsigma.diffusion.iddpm import IDDPMSchedule
from pixsigma.diffusion.samplers import make_scheduler, sample
from pixsigma.errors import PixsigmaError

# The release's schedule (its scheduler/scheduler_config.json and the training config): 1000
# linear betas from 1e-4 to 0.02, epsilon prediction (the learned variance is not a scheduler
# setting: diffusers' PixArt pipeline drops that half of the output).
RELEASE_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                    "prediction_type": "epsilon", "trained_betas": None}
# The release's DPMSolverMultistepScheduler (its scheduler_config.json: diffusers' defaults).
RELEASE_DPM_SOLVER = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                      "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
                      "use_lu_lambdas": False, "thresholding": False, "timestep_spacing": "linspace",
                      "steps_offset": 0, "variance_type": None, "lambda_min_clipped": -math.inf}
# The release's SA-Solver (its demo: from the DPM-Solver config, data prediction, predictor and
# corrector order 2, tau = 1 on timesteps 200..800 and 0 elsewhere).
RELEASE_SA_SOLVER = {"algorithm_type": "data_prediction", "predictor_order": 2, "corrector_order": 2,
                     "timestep_spacing": "linspace", "steps_offset": 0, "lower_order_final": True,
                     "use_karras_sigmas": False, "thresholding": False}
# DDIM and Euler are not in the release: the schedule above with diffusers' usual spacing for it.
DDIM = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
        "thresholding": False}
EULER = {"timestep_spacing": "linspace", "steps_offset": 0, "use_karras_sigmas": False, "interpolation_type": "linear"}


def release_scheduler(sampler: str):
    """diffusers' scheduler for `sampler` built from the literal values above (not from pixsigma's
    config), for the parity tests."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, SASolverScheduler

    schedule = {k: v for k, v in RELEASE_SCHEDULE.items() if k != "trained_betas"}
    if sampler == "dpm-solver":
        return DPMSolverMultistepScheduler(**schedule, **RELEASE_DPM_SOLVER)
    if sampler == "sa-solver":
        return SASolverScheduler(**schedule, **RELEASE_SA_SOLVER, tau_func=lambda t: 1 if 200 <= t <= 800 else 0)
    if sampler == "ddim":
        return DDIMScheduler(**schedule, **DDIM)
    return EulerDiscreteScheduler(**schedule, **EULER)


@pytest.mark.parametrize("sampler,extra,cls", [
    ("dpm-solver", RELEASE_DPM_SOLVER, "DPMSolverMultistepScheduler"),
    ("sa-solver", RELEASE_SA_SOLVER, "SASolverScheduler"),
    ("ddim", DDIM, "DDIMScheduler"),
    ("euler", EULER, "EulerDiscreteScheduler"),
])
def test_scheduler_settings_are_the_release_values(sampler, extra, cls):
    scheduler = make_scheduler(sampler)
    assert type(scheduler).__name__ == cls
    for key, value in {**RELEASE_SCHEDULE, **extra}.items():
        assert scheduler.config[key] == value, (sampler, key, scheduler.config[key], value)
    if sampler == "sa-solver":
        taus = [scheduler.tau_func(t) for t in (0, 199, 200, 500, 800, 801, 999)]
        assert taus == [0, 0, 1, 1, 1, 0, 0]
    betas = scheduler.betas.double().numpy()
    np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-6)


def test_a_folder_scheduler_config_sets_the_schedule():
    """A pipeline folder's scheduler config: its schedule is used by every sampler."""
    config = {"_class_name": "DPMSolverMultistepScheduler", "beta_end": 0.012, "prediction_type": "v_prediction"}
    for sampler in ("dpm-solver", "sa-solver", "ddim", "euler"):
        s = make_scheduler(sampler, config)
        assert s.config["beta_end"] == 0.012 and s.config["prediction_type"] == "v_prediction"
        assert s.config["beta_start"] == 0.0001 and s.config["num_train_timesteps"] == 1000
    with pytest.raises(PixsigmaError, match="prediction_type 'x0' is not supported"):
        make_scheduler("ddim", {"prediction_type": "x0"})


# ---------------------------------------------------------------------------------------------
# the IDDPM step
# ---------------------------------------------------------------------------------------------


def _iddpm_step_float64(steps, i, x, eps, v, noise):
    """x_{t-1} = posterior mean + exp(log σ² / 2)·noise on the respaced schedule, in float64,
    written from the formulas: ᾱ over the kept timesteps, β_i = 1 − ᾱ_i / ᾱ_{i−1},
    x̂0 = (x − sqrt(1 − ᾱ_i)·ε) / sqrt(ᾱ_i), mean = (sqrt(ᾱ_{i−1})·β_i·x̂0 + sqrt(1 − β_i)·(1 − ᾱ_{i−1})·x) / (1 − ᾱ_i),
    log σ² = frac·log β_i + (1 − frac)·log β̃ (β̃ = β_i·(1 − ᾱ_{i−1}) / (1 − ᾱ_i), step 1's at step 0)."""
    acp_full = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    kept = np.round(np.linspace(0, 999, steps)).astype(int)
    acp = acp_full[kept]
    prev = np.concatenate([[1.0], acp[:-1]])
    beta = 1 - acp / prev
    x0 = (x - np.sqrt(1 - acp[i]) * eps) / np.sqrt(acp[i])
    mean = (np.sqrt(prev[i]) * beta[i] * x0 + np.sqrt(1 - beta[i]) * (1 - prev[i]) * x) / (1 - acp[i])
    if i == 0:
        return mean
    tilde = beta * (1 - prev) / (1 - acp)
    frac = (v + 1) / 2
    log_var = frac * np.log(beta[i]) + (1 - frac) * np.log(tilde[i])
    return mean + np.exp(0.5 * log_var) * noise


@pytest.mark.parametrize("i", [0, 1, 13, 49])
def test_iddpm_step_matches_the_float64_formula(i):
    g = torch.Generator().manual_seed(i)
    x, eps, noise = (torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64) for _ in range(3))
    v = torch.rand(2, 4, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    sched = IDDPMSchedule(linear_betas(1000), 50)
    got = sched.step(i, x.float(), eps.float(), v.float(), noise.float()).double()
    ref = torch.from_numpy(_iddpm_step_float64(50, i, x.numpy(), eps.numpy(), v.numpy(), noise.numpy()))
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    j = i + 1 if i < 49 else i - 1  # the neighbouring step is far outside the tolerance
    other = sched.step(j, x.float(), eps.float(), v.float(), noise.float()).double()
    assert (other - ref).abs().max() > 1e-3 * ref.abs().max()


def test_iddpm_sampler_matches_diffusers_ddpm_learned_range():
    """diffusers' DDPMScheduler(variance_type="learned_range") on the same respaced timesteps, the
    same model and the same generator gives the same latents up to its float32 tables."""
    from diffusers import DDPMScheduler

    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(3)) * 0.3

    def model_fn(x, t):
        eps = torch.tanh(torch.einsum("oc,bchw->bohw", w, x)) + 0.1 * x
        return torch.cat([eps, torch.tanh(x[:, :4] - float(t) / 1000)], dim=1)

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sample(model_fn, x, "iddpm", steps=20, generator=torch.Generator().manual_seed(1))
    ddpm = DDPMScheduler(**RELEASE_SCHEDULE, variance_type="learned_range",
                         clip_sample=False, timestep_spacing="linspace")
    ddpm.set_timesteps(timesteps=[int(t) for t in np.round(np.linspace(0, 999, 20)).astype(int)[::-1]])
    g = torch.Generator().manual_seed(1)
    y = x.clone()
    for t in ddpm.timesteps:
        y = ddpm.step(model_fn(y, t), t, y, generator=g, return_dict=False)[0]
    assert (ours - y).abs().max() <= 1e-5 * y.abs().max()  # float32 tables: about 5e-7
    assert (ours - x).abs().max() > 0.1  # it moved


def test_one_linear_schedule_for_training_and_sampling():
    """The training objective and the IDDPM sampler share one float64 linear schedule, equal to
    numpy's linspace(1e-4, 0.02, 1000); IDDPM's rescaling applies to other step counts only."""
    ref = np.linspace(1e-4, 0.02, 1000)
    assert np.array_equal(GaussianDiffusion().betas, ref)
    full = IDDPMSchedule(linear_betas(1000))
    assert np.array_equal(full.alphas_cumprod, np.cumprod(1.0 - ref))
    np.testing.assert_allclose(full.betas, ref, rtol=1e-12)
    np.testing.assert_allclose(linear_betas(500), np.linspace(2e-4, 0.04, 500), rtol=1e-15)
    np.testing.assert_allclose(linear_betas(500, rescale=False), np.linspace(1e-4, 0.02, 500), rtol=1e-15)
