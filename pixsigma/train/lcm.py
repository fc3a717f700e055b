"""Latent consistency distillation (LCM, as PixArt-δ does it): `LcmTask`, run by the one training loop.

A teacher (the checkpoint `model.init_from` names, frozen) is distilled into a student that
starts as the same weights: the whole transformer, or LoRA adapters on it when the config also
has a `[lora]` section (an LCM-LoRA). One training step, per sample:

    n ~ U{0..N-1}, t = τ_n = (n + 1)·k − 1, t' = max(t − k, 0)      N DDIM timesteps, k = T / N
    x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε
    teacher, conditional and unconditional: x̂_0 and ε̂ of each, guided with scale w
        x̂_0 = x̂_0^u + w·(x̂_0^c − x̂_0^u),  ε̂ = ε̂^u + w·(ε̂^c − ε̂^u)
    DDIM step of the teacher's ODE:  x_t' = sqrt(ᾱ_t')·x̂_0 + sqrt(1 − ᾱ_t')·ε̂
    consistency function f(x, s) = c_skip(s)·x + c_out(s)·x̂_0(x, s), with (σ_data = 0.5)
        c_skip(s) = σ_data² / ((s·scaling)² + σ_data²),  c_out(s) = s·scaling / sqrt((s·scaling)² + σ_data²)
    loss = d(f_student(x_t, t), f_target(x_t', t'))        (no gradient through the target)

`d` is the pseudo-Huber loss sqrt(δ² + c²) − c (c = 0.001) or the mean squared error. The
target network is an EMA of the student (decay 0.95), updated after each optimizer step and
kept in the run's checkpoints (key prefix `lcm_target.` in model.safetensors), so a resumed run
ends bit-identical; decay 0 uses the student itself (no copy, as LCM-LoRA does).

Guidance is written as in the pipeline (uncond + w·(cond − uncond)): the LCM paper's w is this
w − 1. The unconditional branch is the null caption (`y_embedding`, the prompt's mask; PixArt-δ)
or the empty prompt's encoding (a model sampled that way, e.g. the shipped default model; needs
`data.text_encoder`). The model's prediction type (ε or v) is the teacher's.

The export is the loop's (EMA or trained weights) with a history entry (`LCM_ACTION`) in a full
checkpoint, or `pixsigma_lcm` metadata in a LoRA file: a pipeline then samples it with "lcm" and
no guidance.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pixsigma.diffusion.gaussian import GaussianDiffusion
from pixsigma.diffusion.samplers import LCM_ACTION
from pixsigma.errors import PixsigmaError
from pixsigma.io import weights_hash, write_safetensors
from pixsigma.pipeline import LCM_LORA_KEY
from pixsigma.train.task import TrainTask, task_for
from pixsigma.vae import scale_latents

log = logging.getLogger(__name__)

SIGMA_DATA = 0.5
TARGET_PREFIX = "lcm_target."


# ---------------------------------------------------------------------------------------------
# The pieces of the objective (pure functions: the tests compute them by hand)
# ---------------------------------------------------------------------------------------------


def ddim_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, t') per DDIM index n: t = (n + 1)·k − 1 with k = T / N, and t' = max(t − k, 0)."""
    if num_ddim_timesteps < 1 or num_train_timesteps % num_ddim_timesteps:
        raise PixsigmaError(f"lcm.num_ddim_timesteps = {num_ddim_timesteps} must divide the {num_train_timesteps} "
                            "training timesteps (e.g. 50: a skip of 20)")
    k = num_train_timesteps // num_ddim_timesteps
    t = torch.arange(1, num_ddim_timesteps + 1) * k - 1
    return t, (t - k).clamp(min=0)


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency parametrization at timesteps t (float64 → float32)."""
    s = t.double() * timestep_scaling
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s / (s**2 + SIGMA_DATA**2).sqrt()
    return c_skip.float(), c_out.float()


def consistency_distance(pred: torch.Tensor, target: torch.Tensor, kind: str = "huber", huber_c: float = 0.001) -> torch.Tensor:
    """Mean over the batch of the pseudo-Huber (sqrt(δ² + c²) − c) or squared error."""
    diff = (pred.float() - target.float()) ** 2
    if kind == "huber":
        return (torch.sqrt(diff + huber_c**2) - huber_c).mean()
    return diff.mean()


def _coef(diffusion: GaussianDiffusion, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return diffusion._gather(name, t, ndim)


def x0_and_eps(diffusion: GaussianDiffusion, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """(x̂_0, ε̂) a model output implies (its first C channels; ε or v per the diffusion)."""
    pred = out[:, : x_t.shape[1]].float()
    x0 = diffusion.predicted_x0(pred, x_t, t)
    a, s = _coef(diffusion, "sqrt_alphas_cumprod", t, x_t.ndim), _coef(diffusion, "sqrt_one_minus_alphas_cumprod", t, x_t.ndim)
    return x0, (x_t - a * x0) / s


def consistency_fn(diffusion: GaussianDiffusion, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   timestep_scaling: float) -> torch.Tensor:
    """f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂_0."""
    x0, _ = x0_and_eps(diffusion, out, x_t, t)
    c_skip, c_out = (c.to(x_t.device).reshape(-1, *[1] * (x_t.ndim - 1)) for c in boundary_scalings(t, timestep_scaling))
    return c_skip * x_t + c_out * x0


def guided_ddim_step(diffusion: GaussianDiffusion, cond: torch.Tensor, uncond: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor, t_prev: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One DDIM step t → t' from the teacher's conditional and unconditional outputs, guided by w (B,)."""
    x0_c, eps_c = x0_and_eps(diffusion, cond, x_t, t)
    x0_u, eps_u = x0_and_eps(diffusion, uncond, x_t, t)
    w = w.to(x_t.device).float().reshape(-1, *[1] * (x_t.ndim - 1))
    x0, eps = x0_u + w * (x0_c - x0_u), eps_u + w * (eps_c - eps_u)
    nd = x_t.ndim
    return _coef(diffusion, "sqrt_alphas_cumprod", t_prev, nd) * x0 + _coef(diffusion, "sqrt_one_minus_alphas_cumprod", t_prev, nd) * eps


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


class LcmTask(TrainTask):
    """Latent consistency distillation on top of another task (`FullTask` for the whole
    transformer, `LoraTask` for an LCM-LoRA): that task decides what trains, how it is
    checkpointed and exported; this one adds the frozen teacher, the target network and the loss."""

    name = "lcm"

    def __init__(self, settings, inner: TrainTask):
        self.settings, self.inner = settings, inner
        self.export_name = inner.export_name
        self.teacher: nn.Module | None = None
        self.student: nn.Module | None = None
        self.target: nn.Module | None = None  # None: the student is its own target
        self.uncond: tuple[torch.Tensor, torch.Tensor] | None = None  # empty prompt (1, L, C), (1, L)
        self.ddim = ddim_timesteps(1000, settings.num_ddim_timesteps)

    # -- build -----------------------------------------------------------------------------------
    def build(self, cfg, model: nn.Module) -> nn.Module:
        if cfg.model.init_from is None:
            raise PixsigmaError("LCM distillation needs a teacher: set model.init_from to the checkpoint to distil")
        if cfg.distributed.strategy == "fsdp":
            raise PixsigmaError("LCM distillation runs data parallel (distributed.strategy = \"ddp\")")
        self.ddim = ddim_timesteps(cfg.schedule.num_timesteps, self.settings.num_ddim_timesteps)
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)  # before any adapter is added
        if self.settings.unconditional == "empty_prompt":
            self.uncond = _empty_prompt(cfg, model.config.max_caption_tokens)
        self.student = self.inner.build(cfg, model)
        if self.settings.target_decay > 0:
            self.target = self.inner.make_ema(self.student)
        log.info("LCM distillation: teacher %s, %s student, guidance %s, %d DDIM timesteps", weights_hash(self.teacher.state_dict()),
                 self.inner.name, self.settings.guidance_range or self.settings.guidance_scale, self.settings.num_ddim_timesteps)
        return self.student

    def trainable_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        return self.inner.trainable_parameters(module)

    def make_ema(self, module: nn.Module) -> nn.Module:
        return self.inner.make_ema(module)

    def after_step(self, run) -> None:
        if self.target is not None:  # target ← decay·target + (1 − decay)·student (the loop's EMA update)
            with torch.no_grad():
                torch._foreach_lerp_(self.trainable_parameters(self.target),
                                     [p.detach().float() for p in self.trainable_parameters(run.raw_model)], 1.0 - self.settings.target_decay)
        self.inner.after_step(run)

    # -- the objective ---------------------------------------------------------------------------
    def loss(self, run, batch: dict, batch_loss) -> torch.Tensor:
        """This rank's mean consistency loss; every draw is made for the global batch."""
        acc, g, s = run.acc, run.generator, self.settings
        mean, std = batch["mean"], batch["std"]
        b = mean.shape[0]
        gb, sl = b * acc.num_processes, slice(acc.process_index * b, (acc.process_index + 1) * b)
        shape = (gb, *mean.shape[1:])
        xi = torch.randn(shape, generator=g)[sl]
        index = torch.randint(0, len(self.ddim[0]), (gb,), generator=g)[sl]
        noise = torch.randn(shape, generator=g)[sl]
        if s.guidance_range:
            lo, hi = s.guidance_range
            w = (lo + (hi - lo) * torch.rand(gb, generator=g, dtype=torch.float64))[sl].float()
        else:
            w = torch.full((b,), float(s.guidance_scale))
        device = acc.device
        x0 = scale_latents(mean + std * xi, run.source.vae).to(device)
        t, t_prev = self.ddim[0][index].to(device), self.ddim[1][index].to(device)
        x_t = run.diffusion.q_sample(x0, t, noise.to(device))
        caption, mask = batch["caption"].to(device), batch["mask"].to(device)
        keep = torch.zeros(b, dtype=torch.bool, device=device)
        student = run.model(x_t, t, caption=caption, caption_mask=mask, force_drop_ids=keep)
        pred = consistency_fn(run.diffusion, student, x_t, t, s.timestep_scaling)
        with torch.no_grad():
            x_prev = self._teacher_step(run, x_t, t, t_prev, caption, mask, w)
            target_net = self.target if self.target is not None else run.raw_model
            with acc.autocast():
                out = target_net(x_prev, t_prev, caption=caption, caption_mask=mask, force_drop_ids=keep)
            target = consistency_fn(run.diffusion, out, x_prev, t_prev, s.timestep_scaling)
        return consistency_distance(pred, target, s.loss, s.huber_c)

    def _teacher_step(self, run, x_t, t, t_prev, caption, mask, w) -> torch.Tensor:
        """The guided DDIM step of the teacher: conditional and unconditional passes in one batch."""
        b = x_t.shape[0]
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x_t.device)
        uncond_caption, uncond_mask = caption, mask  # null caption: the prompt's mask, y_embedding by force_drop_ids
        if self.uncond is not None:
            emb, m = self.uncond
            uncond_caption = emb.to(caption.device, caption.dtype).expand(b, -1, -1)
            uncond_mask = m.to(mask.device, mask.dtype).expand(b, -1)
            drop = torch.zeros_like(drop)
        with run.acc.autocast():
            out = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), caption=torch.cat([caption, uncond_caption]),
                               caption_mask=torch.cat([mask, uncond_mask]), force_drop_ids=drop)
        cond, uncond = out.float().chunk(2)
        return guided_ddim_step(run.diffusion, cond, uncond, x_t, t, t_prev, w)

    # -- weights ---------------------------------------------------------------------------------
    def _target_tensors(self) -> dict:
        ids = {id(p) for p in self.trainable_parameters(self.target)}
        return {TARGET_PREFIX + n: p.detach() for n, p in self.target.named_parameters() if id(p) in ids}

    def save_weights(self, module: nn.Module, path, metadata: dict) -> Path:
        """The inner task's file; the trained module's also holds the target network (`lcm_target.*`)."""
        path = self.inner.save_weights(module, path, metadata)
        if module is self.student and self.target is not None:
            with safe_open(str(path), "pt") as f:
                meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
            path = write_safetensors(path, {**tensors, **self._target_tensors()}, meta)
        return path

    def load_weights(self, module: nn.Module, tensors: dict) -> None:
        target = {k[len(TARGET_PREFIX):]: v for k, v in tensors.items() if k.startswith(TARGET_PREFIX)}
        self.inner.load_weights(module, {k: v for k, v in tensors.items() if not k.startswith(TARGET_PREFIX)})
        if module is self.student and self.target is not None:
            own = {k[len(TARGET_PREFIX):]: p for k, p in self._target_tensors().items()}
            if set(own) != set(target):
                raise PixsigmaError("the checkpoint holds no LCM target network matching this run's; expected one "
                                    "written by the same [lcm] / [lora] settings")
            with torch.no_grad():
                for n, p in own.items():
                    p.copy_(target[n])

    def history_entry(self) -> dict:
        s = self.settings
        return {"action": LCM_ACTION, "num_ddim_timesteps": s.num_ddim_timesteps, "timestep_scaling": s.timestep_scaling,
                "guidance_scale": list(s.guidance_range) if s.guidance_range else s.guidance_scale,
                "unconditional": s.unconditional, "loss": s.loss, "teacher": weights_hash(self.teacher.state_dict())}

    def export(self, module: nn.Module, path, metadata: dict) -> Path:
        """The inner task's export, marked as a latent consistency model."""
        entry = self.history_entry()
        if hasattr(module, "lora_state") and module.lora_state is not None and self.inner.name == "lora":
            return self.inner.export(module, path, {**metadata, LCM_LORA_KEY: json.dumps(entry)})
        history = list(getattr(module, "history", []))
        module.history = [*history, entry]
        try:
            return self.inner.export(module, path, metadata)
        finally:
            module.history = history


def lcm_task(cfg) -> LcmTask | None:
    """The task of a config with an [lcm] section (None without one): LCM distillation of what
    `task_for` picks among the others (the whole model, or LoRA adapters with [lora])."""
    section = getattr(cfg, "lcm", None)
    return None if section is None else LcmTask(section, task_for(cfg))


def _empty_prompt(cfg, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt's embedding and mask, from data.text_encoder."""
    from pixsigma.text import load_text_encoder

    if not cfg.data.text_encoder:
        raise PixsigmaError("lcm.unconditional = \"empty_prompt\" needs data.text_encoder (the encoder the captions were "
                            "made with) to encode the empty prompt; or use \"null_caption\"")
    emb, mask = load_text_encoder(cfg.data.text_encoder, max_length=max_tokens).encode([""], max_tokens)
    return emb.float(), mask
