"""A generation request, checked once for the API and the UI alike, and its run on the pipeline.

Image k of a request with seed S is generated with its own generator seeded S + k, one pipeline
call per image, exactly as `pixsigma generate -n`: the PNG that records seed S + k is then the
one a single request (or the CLI) with that seed makes, bit for bit. One call per image also
lets a cancelled request stop between images.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from pixsigma.diffusion.samplers import default_steps, resolve_sampler
from pixsigma.errors import PixsigmaError
from pixsigma.model.lora import lora_state
from pixsigma.pipeline import check_guidance_scale
from pixsigma.pngmeta import generation_params, png_bytes
from pixsigma.serve.config import ServeConfig
from pixsigma.serve.control import ControlInput
from pixsigma.serve.queue import Job, Progress

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request: n images of the prompt, image k with seed `seed + k`. height/width None:
    the model's resolution (or the prompt's inline --ar / --hw)."""

    prompt: str
    negative_prompt: str
    n: int
    height: int | None
    width: int | None
    steps: int
    guidance_scale: float
    sampler: str
    seed: int
    lora: tuple[tuple[str, float], ...] = ()  # (adapter name, scale) among the server's loaded LoRAs
    control: ControlInput | None = None  # a control image for the server's ControlNet (serve.control)
    # New pipeline options go here, in `check_request` and in `_pipeline_kwargs`, and in the API's
    # request model and the UI's controls.


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    seed: int
    width: int
    height: int
    params: dict


def check_request(config: ServeConfig, resolution: int, prompt: str, negative_prompt: str = "", n: int = 1,
                  height: int | None = None, width: int | None = None, steps: int | None = None,
                  guidance_scale: float = 4.5, sampler: str = "dpm-solver", seed: int | None = None,
                  lora: dict[str, float] | None = None, adapters: tuple[str, ...] = (),
                  control: ControlInput | None = None) -> GenerationRequest:
    """Every field checked against the server's limits; a one-line PixsigmaError naming the bad one.
    A missing seed is drawn at random; `lora` names adapters among `adapters` (the loaded ones);
    `control` is already checked (`serve.control.check_control`)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PixsigmaError("prompt is empty; expected a text description of the image")
    if len(prompt) > config.max_prompt_chars or len(negative_prompt) > config.max_prompt_chars:
        raise PixsigmaError(f"prompt of {max(len(prompt), len(negative_prompt))} characters; expected at most "
                            f"{config.max_prompt_chars}")
    if not 1 <= n <= config.max_images:
        raise PixsigmaError(f"n {n} is out of range; expected 1..{config.max_images} images per request")
    limit = config.side_limit(resolution)
    for name, side in (("width", width), ("height", height)):
        if side is not None and not config.min_side <= side <= limit:
            raise PixsigmaError(f"{name} {side} is out of range; expected {config.min_side}..{limit} pixels")
    sampler = resolve_sampler(sampler)
    steps = default_steps(sampler) if steps is None else steps
    if not 1 <= steps <= config.max_steps:
        raise PixsigmaError(f"steps {steps} is out of range; expected 1..{config.max_steps}")
    guidance_scale = check_guidance_scale(guidance_scale)
    if guidance_scale > config.max_guidance:
        raise PixsigmaError(f"guidance_scale {guidance_scale:g} is out of range; expected 0..{config.max_guidance:g}")
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    if not 0 <= seed <= MAX_SEED - n:
        raise PixsigmaError(f"seed {seed} is out of range; expected 0..{MAX_SEED - n}")
    return GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, n=n, height=height, width=width,
                             steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed,
                             lora=check_lora(lora or {}, adapters), control=control)


def check_lora(lora: dict[str, float], adapters: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """{adapter: scale} as sorted pairs; each name must be a loaded adapter, each scale finite."""
    unknown = sorted(set(lora) - set(adapters))
    if unknown:
        raise PixsigmaError(f"unknown LoRA {unknown[0]!r}; expected one of the server's: {', '.join(adapters) or 'none loaded'}")
    bad = [name for name, scale in lora.items() if not (isinstance(scale, (int, float)) and math.isfinite(scale))]
    if bad:
        raise PixsigmaError(f"LoRA {bad[0]!r} scale {lora[bad[0]]!r}; expected a finite number")
    return tuple(sorted((name, float(scale)) for name, scale in lora.items()))


def loaded_adapters(pipe) -> tuple[str, ...]:
    """The LoRA adapters attached to the pipeline's transformer (`pixsigma serve --lora`)."""
    state = lora_state(pipe.transformer)
    return tuple(state.adapters) if state is not None else ()


def _set_lora(pipe, req: GenerationRequest) -> None:
    """Every loaded adapter at the request's scale (0 when it names none), so nothing carries over."""
    adapters = loaded_adapters(pipe)
    if adapters:
        scales = dict(req.lora)
        pipe.set_adapters(list(adapters), [scales.get(name, 0.0) for name in adapters])


def _pipeline_kwargs(req: GenerationRequest) -> dict:
    """The request's pipeline arguments other than the generator and callback."""
    kwargs = dict(negative_prompt=req.negative_prompt, num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                  height=req.height, width=req.width, sampler=req.sampler, output_type="pil")
    if req.control is not None:
        kwargs.update(req.control.pipeline_kwargs())
    return kwargs


def generate(pipe, job: Job, config: ServeConfig) -> list[GeneratedImage]:
    """Run `job.request` on the pipeline, one call per image; progress goes to `job.progress`, and
    `job.check()` runs after every step, so a cancelled or timed-out job stops there. Progress is
    replaced whole, never changed in place, so a reader on another thread sees a consistent one."""
    req: GenerationRequest = job.request
    job.progress = Progress(image=0, images=req.n, step=0, steps=req.steps)
    _set_lora(pipe, req)
    images = []
    for k in range(req.n):
        job.progress = Progress(image=k, images=req.n, step=0, steps=req.steps)

        def on_step(index, timestep, latents, k=k):
            job.progress = Progress(image=k, images=req.n, step=min(req.steps, index + 1), steps=req.steps)
            job.check()

        out = pipe(req.prompt, generator=torch.Generator("cpu").manual_seed(req.seed + k), callback=on_step,
                   **_pipeline_kwargs(req))
        image = out.images[0]
        params = generation_params(req.prompt, req.negative_prompt, req.seed + k, out.info, image.size, pipe.name,
                                   pipe.weights_hash(), config.dtype, config.version)
        if req.lora:
            params["lora"] = ",".join(f"{name}:{scale:g}" for name, scale in req.lora)
        if req.control is not None:
            params.update(req.control.params())
        images.append(GeneratedImage(png=png_bytes(image, params), seed=req.seed + k, width=image.width,
                                     height=image.height, params=params))
        job.check()
    return images
