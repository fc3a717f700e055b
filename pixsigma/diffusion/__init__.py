"""Diffusion: samplers for generation (samplers.py, iddpm.py); the training objective lives in
gaussian.py (imported on its own, not here)."""

from pixsigma.diffusion.samplers import SAMPLERS, default_steps, make_scheduler, resolve_sampler, sample

__all__ = ["SAMPLERS", "default_steps", "make_scheduler", "resolve_sampler", "sample"]
