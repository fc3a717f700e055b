"""Diffusion: samplers for generation (samplers.py, iddpm.py) and the training objective with the
one noise schedule (gaussian.py, imported by its users as pixsigma.diffusion.gaussian)."""

from pixsigma.diffusion.samplers import SAMPLERS, default_steps, make_scheduler, resolve_sampler, sample

__all__ = ["SAMPLERS", "default_steps", "make_scheduler", "resolve_sampler", "sample"]
