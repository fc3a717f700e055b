"""The IDDPM ancestral sampler's math (respaced schedule, posterior, learned-range variance).

Tables in float64 numpy, as the original improved-diffusion code computes them; the betas come
from the training objective's `linear_betas` (gaussian.py), the one schedule of the package. A
model with learned variance outputs, per latent channel, epsilon and v ∈ [-1, 1]; the sampler's
log-variance is
    frac = (v + 1) / 2
    log σ² = frac · log β_t + (1 − frac) · log σ̃²_t (posterior variance, clipped at t = 0)

diffusers' DDPMScheduler(variance_type="learned_range") takes the same step, with its tables in
float32; this sampler keeps float64 tables, so its outputs do not depend on that rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from pixsigma.diffusion.gaussian import linear_betas
from pixsigma.errors import PixsigmaError

__all__ = ["IDDPMSchedule", "linear_betas", "space_timesteps"]


def space_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps evenly spread over 0..T−1, both ends included (IDDPM respacing)."""
    if not 1 <= steps <= num_train_timesteps:
        raise PixsigmaError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    if steps == 1:
        return [num_train_timesteps - 1]
    stride = (num_train_timesteps - 1) / (steps - 1)
    return sorted({int(round(i * stride)) for i in range(steps)})


class IDDPMSchedule:
    """A (respaced) discrete diffusion: tables indexed by the respaced step 0..S−1; `timesteps`
    maps each step to the original timestep the model was trained with."""

    def __init__(self, betas: np.ndarray, steps: int | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        T = len(betas)
        acp_full = np.cumprod(1.0 - betas)
        self.timesteps = np.array(space_timesteps(T, steps or T))
        acp = acp_full[self.timesteps]
        acp_prev = np.append(1.0, acp[:-1])
        self.betas = 1.0 - acp / acp_prev
        self.alphas_cumprod = acp
        self.alphas_cumprod_prev = acp_prev
        self.posterior_variance = self.betas * (1.0 - acp_prev) / (1.0 - acp)
        # The variance at step 0 is 0: clip its log to the next step's value.
        if len(self.posterior_variance) > 1:
            self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        else:
            self.posterior_log_variance_clipped = np.log(np.maximum(self.betas, 1e-20))
        self.posterior_mean_coef1 = self.betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(1.0 - self.betas) / (1.0 - acp)
        self.sqrt_recip_acp = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_acp = np.sqrt(1.0 / acp - 1.0)

    def __len__(self) -> int:
        return len(self.timesteps)

    def learned_log_variance(self, i: int, v: torch.Tensor) -> torch.Tensor:
        """Learned-range log variance at respaced step i from the model's v ∈ [-1, 1]."""
        min_log = float(self.posterior_log_variance_clipped[i])
        max_log = float(np.log(self.betas[i]))
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def step(self, i: int, x: torch.Tensor, eps: torch.Tensor, v: torch.Tensor, noise: torch.Tensor | None,
             clip_denoised: bool = False) -> torch.Tensor:
        """x_t (at respaced step i) → x_{t−1}: posterior mean + learned std × noise (none at i=0)."""
        x0 = float(self.sqrt_recip_acp[i]) * x - float(self.sqrt_recipm1_acp[i]) * eps
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = float(self.posterior_mean_coef1[i]) * x0 + float(self.posterior_mean_coef2[i]) * x
        if i == 0 or noise is None:
            return mean
        log_var = self.learned_log_variance(i, v)
        return mean + torch.exp(0.5 * log_var) * noise
