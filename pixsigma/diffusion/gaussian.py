"""The IDDPM training objective PixArt-Σ is trained with (independent of the sampling code).

Schedule: `num_timesteps` (1000) linear betas from 1e-4 to 0.02 (`linear_betas`, which the IDDPM
sampler shares; IDDPM scales both ends by 1000 / num_timesteps so that other step counts keep
the same total noise), all constants kept in float64 and gathered per sample.

The model predicts epsilon (first half of its output channels; or, with prediction_type
"v_prediction", v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x_0, the MSE target then being v) and a "learned
range" variance value v (second half): with frac = (v + 1) / 2,

    log σ²_t = frac · log β_t + (1 − frac) · log β̃_t(clipped)

where β̃_t is the true posterior variance (its value at t = 0, which is 0, replaced by the one at
t = 1 before the log, as in IDDPM). The hybrid loss per sample is

    loss = MSE(ε, ε̂) · w_snr(t) + VB(t) · num_timesteps / 1000

with VB(t) = KL(q(x_{t−1} | x_t, x_0) ‖ p(x_{t−1} | x_t)) in bits for t > 0 and the discretized
Gaussian decoder NLL in bits at t = 0; p's mean is built from a *detached* ε̂ so the VB term only
trains the variance. The decoder NLL uses IDDPM's tanh approximation of the normal CDF over 255
bins on [−1, 1] (as the released training code does; latents are not really bounded, which only
matters at t = 0). `w_snr` is 1, or min(SNR, γ) / SNR with min-SNR-γ weighting, or with
`x0_weight_cap` = c the clamped x0-space weight clamp(1 / SNR, 1, c), normalized to mean 1 over
the timesteps. The last one is for small models learning text conditioning: under the plain ε
loss the noisy timesteps, where the layout and colors an image gets from its caption are
decided, contribute almost nothing, so a caption barely changes the prediction there; weighting
by 1 / SNR is the x0-prediction error, capped so the noisiest steps do not swamp the rest.

Training timesteps are uniform over [0, num_timesteps), or with `timestep_sampling` =
"logit_normal" t = floor(T · sigmoid(m + s·n)), n ~ N(0, 1) (SD3's sampling density): more of the
batch lands on the middle of the schedule, where an image's shapes are decided, and less on the
nearly clean and the pure-noise ends. The shipped recipe uses uniform timesteps
(the project docs record how the two compared).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pixsigma.errors import PixsigmaError

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")

__all__ = ["GaussianDiffusion", "TIMESTEP_SAMPLINGS", "check_prediction_type", "linear_betas", "normal_kl",
           "discretized_gaussian_log_likelihood"]


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 rescale: bool = True) -> np.ndarray:
    """The linear beta schedule in float64: exactly linspace(1e-4, 0.02, 1000) for 1000 steps.

    rescale=True (the training objective, as IDDPM defines it): beta_start and beta_end are the
    ends of a 1000-step schedule and are scaled by 1000 / num_timesteps, so that other step
    counts keep the same total noise. rescale=False (a diffusers scheduler config, which the
    samplers read): they are the ends for num_timesteps steps as given.
    """
    scale = 1000.0 / num_timesteps if rescale else 1.0
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def check_prediction_type(kind: str) -> str:
    """`kind` if the diffusion supports it: "epsilon" (the model predicts the noise ε) or
    "v_prediction" (it predicts v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x_0); a PixsigmaError otherwise."""
    if kind == "epsilon" or kind == "v_prediction":
        return kind
    raise PixsigmaError(f"prediction_type {kind!r} is not supported; expected one of ('epsilon', 'v_prediction')")


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood (nats) of data in [−1, 1] discretized to 255 bins under N(means, e^{2·log_scales})."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


@dataclass
class LossTerms:
    loss: torch.Tensor  # (B,) per-sample total
    mse: torch.Tensor  # (B,)
    vb: torch.Tensor  # (B,) in bits, already multiplied by num_timesteps / 1000


class GaussianDiffusion:
    """Forward process `q_sample` and the hybrid MSE + VB loss of IDDPM (learned range variance)."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 snr_gamma: float | None = None, learn_sigma: bool = True, x0_weight_cap: float | None = None,
                 prediction_type: str = "epsilon", timestep_sampling: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0):
        if num_timesteps < 2:
            raise PixsigmaError(f"num_timesteps must be >= 2, got {num_timesteps}")
        if snr_gamma is not None and snr_gamma <= 0:
            raise PixsigmaError(f"snr_gamma must be positive (or unset), got {snr_gamma}")
        if x0_weight_cap is not None and not x0_weight_cap >= 1:
            raise PixsigmaError(f"x0_weight_cap must be >= 1 (or unset), got {x0_weight_cap}")
        if x0_weight_cap is not None and snr_gamma is not None:
            raise PixsigmaError("snr_gamma and x0_weight_cap are two different loss weightings; set one of them")
        check_prediction_type(prediction_type)
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise PixsigmaError(f"timestep_sampling {timestep_sampling!r} is not supported; expected one of {TIMESTEP_SAMPLINGS}")
        if not logit_std > 0:
            raise PixsigmaError(f"logit_std must be positive, got {logit_std}")
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, float(logit_mean), float(logit_std)
        self.prediction_type = prediction_type
        self.num_timesteps = num_timesteps
        self.snr_gamma = snr_gamma
        self.learn_sigma = learn_sigma
        betas = linear_betas(num_timesteps, beta_start, beta_end)
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        self.betas = betas
        self.alphas_cumprod = ac
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1.0)
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.posterior_variance = post_var
        self.posterior_log_variance_clipped = np.log(np.append(post_var[1], post_var[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        self.log_betas = np.log(betas)
        self.snr = ac / (1.0 - ac)
        self.x0_weight = None
        if x0_weight_cap is not None:
            w = np.clip(1.0 / self.snr, 1.0, x0_weight_cap)
            self.x0_weight = w / w.mean()
        self._torch_cache: dict = {}

    # -- helpers ---------------------------------------------------------------------------------
    def _gather(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """arr[t] as float32 on t's device, shaped (B, 1, 1, ...) for broadcasting."""
        key = (name, t.device)
        if key not in self._torch_cache:
            self._torch_cache[key] = torch.from_numpy(getattr(self, name)).to(t.device)
        out = self._torch_cache[key][t.long()].float()
        return out.reshape(-1, *([1] * (ndim - 1)))

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Integer training timesteps in [0, num_timesteps): uniform or logit-normal (module doc)."""
        if self.timestep_sampling == "uniform":
            return torch.randint(0, self.num_timesteps, (batch,), generator=generator)
        u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(batch, generator=generator, dtype=torch.float64))
        return (u * self.num_timesteps).long().clamp_(0, self.num_timesteps - 1)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) · x_0 + sqrt(1 − ᾱ_t) · ε."""
        nd = x_start.ndim
        return self._gather("sqrt_alphas_cumprod", t, nd) * x_start + self._gather("sqrt_one_minus_alphas_cumprod", t, nd) * noise

    def q_posterior(self, x_start, x_t, t):
        """Mean and clipped log variance of q(x_{t−1} | x_t, x_0)."""
        nd = x_t.ndim
        mean = self._gather("posterior_mean_coef1", t, nd) * x_start + self._gather("posterior_mean_coef2", t, nd) * x_t
        return mean, self._gather("posterior_log_variance_clipped", t, nd)

    def model_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Learned range: interpolate between log β̃_t (clipped) and log β_t with frac = (v + 1) / 2."""
        nd = v.ndim
        min_log = self._gather("posterior_log_variance_clipped", t, nd)
        max_log = self._gather("log_betas", t, nd)
        frac = (v + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE weight: 1, min(SNR, γ) / SNR (min-SNR-γ for ε prediction), or the
        normalized clamp(1 / SNR, 1, cap) (x0_weight_cap)."""
        if self.x0_weight is not None:
            return self._gather("x0_weight", t, 1)
        if self.snr_gamma is None:
            return torch.ones(t.shape[0], device=t.device)
        snr = self._gather("snr", t, 1)
        return torch.clamp(snr, max=self.snr_gamma) / snr

    def predicted_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent a prediction implies (what samplers step with): from ε,
        x_t / sqrt(ᾱ) − sqrt(1/ᾱ − 1)·ε̂; from v, sqrt(ᾱ)·x_t − sqrt(1 − ᾱ)·v̂."""
        nd = x_t.ndim
        if self.prediction_type == "v_prediction":
            return self._gather("sqrt_alphas_cumprod", t, nd) * x_t - self._gather("sqrt_one_minus_alphas_cumprod", t, nd) * pred
        return self._gather("sqrt_recip_alphas_cumprod", t, nd) * x_t - self._gather("sqrt_recipm1_alphas_cumprod", t, nd) * pred

    # -- the objective ---------------------------------------------------------------------------
    def loss_terms(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor | None = None) -> LossTerms:
        """Hybrid loss from a model output (B, 2C, H, W) = [ε̂, v] (or (B, C, H, W) without learned σ).

        weight: optional (B, 1, H, W) spatial weights of the MSE term, each sample's scaled to mean 1
        (so the loss keeps its scale and only where it is paid changes); the VB term is unweighted.
        """
        out = model_output.float()
        x_start, x_t, noise = x_start.float(), x_t.float(), noise.float()
        c = x_start.shape[1]
        if self.learn_sigma:
            if out.shape[1] != 2 * c:
                raise PixsigmaError(f"model output has {out.shape[1]} channels; learned variance needs {2 * c}")
            pred, v = out[:, :c], out[:, c:]
        else:
            pred, v = out, None
        nd = x_t.ndim
        if self.prediction_type == "v_prediction":
            a, s = self._gather("sqrt_alphas_cumprod", t, nd), self._gather("sqrt_one_minus_alphas_cumprod", t, nd)
            target = a * noise - s * x_start
        else:
            target = noise
        sq = (target - pred) ** 2
        if weight is not None:
            weight = weight.float()
            sq = sq * (weight / weight.mean(dim=(1, 2, 3), keepdim=True))
        mse = _mean_flat(sq) * self.snr_weight(t)
        if v is None:
            zero = torch.zeros_like(mse)
            return LossTerms(loss=mse, mse=mse, vb=zero)
        log_var = self.model_log_variance(v, t)
        model_mean, _ = self.q_posterior(self.predicted_x0(pred.detach(), x_t, t), x_t, t)
        true_mean, true_log_var = self.q_posterior(x_start, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, log_var)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * log_var)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl) * (self.num_timesteps / 1000.0)
        return LossTerms(loss=mse + vb, mse=mse, vb=vb)

    def training_loss(self, model, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                      model_kwargs: dict | None = None, weight: torch.Tensor | None = None) -> LossTerms:
        """Noise x_0 to x_t, run `model(x_t, t, **model_kwargs)` and return the loss terms."""
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, t, **(model_kwargs or {}))
        return self.loss_terms(out, x_start, x_t, t, noise, weight)
