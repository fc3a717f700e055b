"""Samplers: a plain-function API over diffusers' schedulers plus the IDDPM ancestral sampler.

    x0 = sample(model_fn, noise, sampler="dpm-solver", steps=20, generator=g, callback=cb)

`generator` is one torch.Generator or a list with one per image: with a list, every noise draw
a stochastic sampler makes (SA-Solver, IDDPM) is made row by row, image k from generator k
alone, so an image's noise does not depend on the batch it is generated in.

`model_fn(x, t) -> output` is the denoiser (classifier-free guidance already applied), t a
scalar tensor timestep on the 0..999 scale. Its output holds epsilon (or v, with the schedule's
prediction_type "v_prediction") and, for models with
learned variance, a second half of channels (v ∈ [-1, 1]): the ODE / diffusers samplers drop
that half (as diffusers' PixArt pipeline does), the IDDPM sampler uses it. `noise` is standard
normal; it is scaled by the scheduler's initial sigma here.

The schedule is the model's: 1000 training steps, linear betas 1e-4 → 0.02, epsilon prediction
unless the scheduler config or `prediction_type=` says "v_prediction".
"""

from __future__ import annotations

import inspect
import logging

import torch

from pixsigma.diffusion.gaussian import check_prediction_type, linear_betas
from pixsigma.errors import PixsigmaError

log = logging.getLogger(__name__)

DEFAULT_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}

# The PixArt-Σ release's DPMSolverMultistepScheduler settings (scheduler/scheduler_config.json).
DPM_SOLVER_CONFIG = {
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "variance_type": None,
}

SAMPLERS = {  # name -> default number of steps
    "dpm-solver": 20,
    "sa-solver": 25,
    "ddim": 50,
    "euler": 30,
    "iddpm": 100,
    "lcm": 4,
}

# How a model records that it is a latent consistency model (its sampler is "lcm", without
# classifier-free guidance by default): a history entry {"action": LCM_ACTION, ...} in a pixsigma
# checkpoint's metadata, `LCM_INDEX_KEY: "lcm"` in a pipeline folder's model_index.json, or an
# LCMScheduler in the folder's scheduler/ (as diffusers' PixArt-LCM folders ship).
LCM_ACTION = "lcm-distill"
LCM_INDEX_KEY = "pixsigma_distilled"
# LCMScheduler settings of PixArt-δ's LCM: 50 DDIM timesteps of the 1000-step schedule (a skip
# of 20), boundary-condition timestep scaling 10.
LCM_CONFIG = {"original_inference_steps": 50, "timestep_scaling": 10.0, "timestep_spacing": "leading", "steps_offset": 0,
              "set_alpha_to_one": True, "clip_sample": False}
ALIASES = {"dpm": "dpm-solver", "dpmsolver": "dpm-solver", "dpm++": "dpm-solver", "dpm_solver": "dpm-solver",
           "sa": "sa-solver", "sasolver": "sa-solver", "sa_solver": "sa-solver", "ddpm": "iddpm"}


def resolve_sampler(name: str) -> str:
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise PixsigmaError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    return key


def default_steps(sampler: str) -> int:
    return SAMPLERS[resolve_sampler(sampler)]


def is_lcm_model(history=(), index: dict | None = None, scheduler_config: dict | None = None) -> bool:
    """Whether a model records that it is a latent consistency model: a checkpoint `history` entry,
    a model_index.json (`index`) key, or an LCMScheduler config (see LCM_ACTION)."""
    return (any(isinstance(h, dict) and h.get("action") == LCM_ACTION for h in history or ())
            or (index or {}).get(LCM_INDEX_KEY) == "lcm"
            or (scheduler_config or {}).get("_class_name") == "LCMScheduler")


def schedule_from_config(config: dict | None, prediction_type: str | None = None) -> dict:
    """The training schedule (betas, steps, prediction type) from a scheduler config, else defaults;
    `prediction_type`, when given, overrides the config's."""
    schedule = dict(DEFAULT_SCHEDULE)
    for k in DEFAULT_SCHEDULE:
        if config and config.get(k) is not None:
            schedule[k] = config[k]
    if prediction_type is not None:
        schedule["prediction_type"] = prediction_type
    check_prediction_type(schedule["prediction_type"])
    return schedule


def make_scheduler(sampler: str, scheduler_config: dict | None = None, prediction_type: str | None = None):
    """A diffusers scheduler for `sampler`, on the model's schedule.

    scheduler_config: a pipeline folder's scheduler config (dict). Its schedule is used; for
    "dpm-solver" a DPMSolverMultistepScheduler config is used whole, for "lcm" an LCMScheduler one.
    """
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler,
                           SASolverScheduler)

    name = resolve_sampler(sampler)
    schedule = schedule_from_config(scheduler_config, prediction_type)
    if name == "dpm-solver":
        if scheduler_config and scheduler_config.get("_class_name") == "DPMSolverMultistepScheduler":
            return DPMSolverMultistepScheduler.from_config(scheduler_config, prediction_type=schedule["prediction_type"])
        return DPMSolverMultistepScheduler(**schedule, **DPM_SOLVER_CONFIG)
    if name == "sa-solver":
        return SASolverScheduler(**schedule, predictor_order=2, corrector_order=2, algorithm_type="data_prediction",
                                 timestep_spacing="linspace", lower_order_final=True)
    if name == "ddim":
        return DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    if name == "euler":
        return EulerDiscreteScheduler(**schedule, timestep_spacing="linspace")
    if name == "lcm":
        if scheduler_config and scheduler_config.get("_class_name") == "LCMScheduler":
            return LCMScheduler.from_config(scheduler_config, prediction_type=schedule["prediction_type"])
        return LCMScheduler(**schedule, **LCM_CONFIG)
    raise PixsigmaError(f"sampler {name!r} has no diffusers scheduler")


def _check_finite(x: torch.Tensor, i: int, n: int, t) -> None:
    if not torch.isfinite(x).all():
        t = float(t)
        raise PixsigmaError(
            f"sampling diverged: NaN/inf in the latents at step {i + 1}/{n} (timestep {t:g}); "
            "expected finite values (try --dtype fp32, a lower guidance scale or another sampler)"
        )


def _progress(iterable, enabled: bool, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc="denoising", unit="step", leave=False)


def randn(shape, generator=None, device="cpu", draw_device=None) -> torch.Tensor:
    """Standard normal float32 noise of `shape` on `device`.

    generator: None, a torch.Generator, or a list with one per row (shape[0] of them): row k is
    then drawn from generator k alone, as a (1, ...) draw, so it equals what a single-image call
    with that generator draws. Noise is drawn on the generator's device (else `draw_device`, else
    `device`) and moved to `device`.
    """
    device = torch.device(device)
    generator = _check_generators(generator, shape[0])
    if isinstance(generator, list):
        rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32).to(device)
                for g in generator]
        return torch.cat(rows)
    draw = generator.device if generator is not None else torch.device(draw_device or device)
    return torch.randn(tuple(shape), generator=generator, device=draw, dtype=torch.float32).to(device)


def _check_generators(generator, batch: int):
    """A list of generators as a list (diffusers' schedulers take one per row), a single one as is."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise PixsigmaError(f"{len(generator)} generators for {batch} images; expected one per image")
        return list(generator)
    return generator


@torch.no_grad()
def sample(model_fn, latents: torch.Tensor, sampler: str = "dpm-solver", steps: int | None = None,
           generator=None, callback=None, scheduler_config: dict | None = None,
           progress: bool = False, prediction_type: str | None = None) -> torch.Tensor:
    """Run `sampler` for `steps` from standard-normal `latents`; returns the clean latents.

    generator: a torch.Generator, or a list with one per image (module docstring).
    prediction_type: what model_fn's output is ("epsilon" / "v_prediction"); default: the
    scheduler config's, else epsilon.
    callback(step_index, timestep, latents) after each step. NaN/inf in the latents stops
    sampling with a PixsigmaError naming the step.
    """
    name = resolve_sampler(sampler)
    steps = int(steps) if steps is not None else SAMPLERS[name]
    if steps < 1 or steps > 1000:
        raise PixsigmaError(f"steps {steps} is out of range; expected 1..1000")
    generator = _check_generators(generator, latents.shape[0])
    if name == "iddpm":
        return _sample_iddpm(model_fn, latents, steps, generator, callback, scheduler_config, progress, prediction_type)
    channels = latents.shape[1]
    scheduler = make_scheduler(name, scheduler_config, prediction_type)
    try:
        scheduler.set_timesteps(steps, device=latents.device)
    except ValueError as e:  # e.g. LCM: more steps than its original_inference_steps
        raise PixsigmaError(f"{name} cannot run {steps} steps: {' '.join(str(e).split())}") from None
    timesteps = scheduler.timesteps
    # diffusers draws a step's noise with one generator per row when given a list, the same
    # (1, ...) draws `randn` makes.
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    x = latents.float() * scheduler.init_noise_sigma
    n = len(timesteps)
    for i, t in enumerate(_progress(timesteps, progress, n)):
        out = model_fn(scheduler.scale_model_input(x, t), t)
        pred = out[:, :channels] if out.shape[1] == 2 * channels else out
        x = scheduler.step(pred.float(), t, x, **step_kwargs, return_dict=False)[0]
        _check_finite(x, i, n, t)
        if callback is not None:
            callback(i, t, x)
    return x


def _sample_iddpm(model_fn, latents, steps, generator, callback, scheduler_config, progress, prediction_type):
    from pixsigma.diffusion.iddpm import IDDPMSchedule

    schedule = schedule_from_config(scheduler_config, prediction_type)
    if schedule["beta_schedule"] != "linear":
        raise PixsigmaError(f"the IDDPM sampler supports beta_schedule 'linear', got {schedule['beta_schedule']!r}")
    # a scheduler config's beta ends are those of its num_train_timesteps steps (as diffusers reads them)
    betas = linear_betas(schedule["num_train_timesteps"], schedule["beta_start"], schedule["beta_end"], rescale=False)
    sched = IDDPMSchedule(betas, steps)
    channels = latents.shape[1]
    x = latents.float()
    n = len(sched)
    warned = False
    for k, i in enumerate(_progress(list(reversed(range(n))), progress, n)):
        t = torch.tensor(int(sched.timesteps[i]), device=x.device)
        out = model_fn(x, t).float()
        if out.shape[1] == 2 * channels:
            eps, v = out[:, :channels], out[:, channels:]
        else:
            if not warned:
                log.warning("the model has no learned variance: the IDDPM sampler uses the clipped posterior variance")
                warned = True
            eps, v = out, torch.full_like(out, -1.0)
        if schedule["prediction_type"] == "v_prediction":  # ε = sqrt(1−ᾱ)·x_t + sqrt(ᾱ)·v
            acp = float(sched.alphas_cumprod[i])
            eps = (1.0 - acp) ** 0.5 * x + acp ** 0.5 * eps
        noise = randn(x.shape, generator, device=x.device) if i > 0 else None
        x = sched.step(i, x, eps, v, noise)
        _check_finite(x, k, n, t)
        if callback is not None:
            callback(k, t, x)
    return x
