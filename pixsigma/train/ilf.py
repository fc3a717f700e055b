"""Inner Loop Feedback distillation: `IlfTask`, the training task of `pixsigma distill ilf`.

The frozen base is the teacher; the student is the same base with a feedback module
(pixsigma.model.feedback) at block k, and only the module trains. The teacher's many-step run
is DPM-Solver++ at `teacher_steps` (its timestep grid); the student samples `student_steps`
steps on every r-th point of that grid (r = teacher_steps / student_steps). One training sample:

    x0 from the data, a student step s drawn, x_t = q_sample(x0, t_s)    (t_s on the student grid)
    teacher: r first-order (DDIM) steps over its grid from t_s to t_{s+1}, guided   → x_next
    target:  the clean latent x0* whose single DDIM step t_s → t_{s+1} lands on x_next
    loss:    MSE(student's guided x0 prediction at (x_t, t_s), x0*)

so r student steps' worth of teacher work is folded into each student step. Guidance is part
of the function being distilled (`guidance_scale`; the unconditional branch is the model's null
caption). Every random draw comes from the loop's shared generator for the global batch, so
resume and data parallelism behave as in training.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from pixsigma.errors import PixsigmaError
from pixsigma.model.feedback import PREFIX, FeedbackTransformer, check_block_index, save_feedback
from pixsigma.train.task import TrainTask
from pixsigma.vae import scale_latents


def teacher_grid(steps: int, prediction_type: str) -> torch.Tensor:
    """The teacher sampler's timesteps (DPM-Solver++ with the release's settings), as int64."""
    from pixsigma.diffusion.samplers import make_scheduler

    scheduler = make_scheduler("dpm-solver", prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.long().cpu()


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DDP keeps the model as .module


class IlfTask(TrainTask):
    """Feedback-module distillation; checkpoints, EMA and the export hold the module only."""

    name = "ilf"
    export_name = "feedback.safetensors"

    def __init__(self, spec):
        """spec: the config's [ilf] section (pixsigma.train.config.IlfSection), already checked."""
        self.spec = spec
        self._grid = None

    def build(self, cfg, model: nn.Module) -> nn.Module:
        if cfg.distributed.strategy == "fsdp":
            raise PixsigmaError("ILF distillation runs data parallel (distributed.strategy = \"ddp\"); FSDP is for full training")
        depth = model.config.depth
        block = check_block_index(self.spec.block if self.spec.block is not None else depth // 2, depth)
        net = FeedbackTransformer.from_transformer(model, block)
        net.base_model.eval()  # frozen: no caption dropout inside the forward; guidance drops explicitly
        net.feedback.float()
        self._grid = teacher_grid(self.spec.teacher_steps, model.config.prediction_type)
        return net

    def trainable_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        return _unwrap(module).trainable_parameters()

    def make_ema(self, module: nn.Module) -> nn.Module:
        """A copy sharing the frozen base, with its own fp32 feedback module."""
        own = {id(p) for p in module.feedback.parameters()}
        shared = {id(t): t for t in [*module.parameters(), *module.buffers()] if id(t) not in own}
        ema = copy.deepcopy(module, memo=shared).eval()
        for p in ema.feedback.parameters():
            p.requires_grad_(False)
        return ema

    # -- the objective ---------------------------------------------------------------------------
    def _guided_x0(self, model, diffusion, x, t, caption, mask) -> torch.Tensor:
        """The guided clean-latent prediction of `model` at (x, t): one batched forward over
        [null caption; caption] (no guidance at scale <= 1)."""
        b, c, g = x.shape[0], x.shape[1], self.spec.guidance_scale
        if g <= 1.0:
            out = model(x, t, caption, mask, force_drop_ids=torch.zeros(b, dtype=torch.bool, device=x.device))
            pred = out.float()[:, :c]
        else:
            drop = torch.cat([torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)]).to(x.device)
            out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([caption, caption]), torch.cat([mask, mask]),
                        force_drop_ids=drop).float()[:, :c]
            uncond, cond = out.chunk(2)
            pred = uncond + g * (cond - uncond)
        return diffusion.predicted_x0(pred, x, t)

    def _ab(self, diffusion, idx: torch.Tensor, nd: int):
        """(sqrt ᾱ, sqrt(1 − ᾱ)) at teacher-grid positions `idx`; the end of the grid is the clean image (1, 0)."""
        grid = self._grid
        end = idx >= len(grid)
        t = grid[idx.clamp(max=len(grid) - 1)]
        acp = torch.from_numpy(diffusion.alphas_cumprod).float()[t]
        acp = torch.where(end, torch.ones_like(acp), acp)
        shape = (-1, *([1] * (nd - 1)))
        return acp.sqrt().reshape(shape), (1 - acp).clamp(min=0).sqrt().reshape(shape)

    @torch.no_grad()
    def _teacher(self, base, diffusion, x, start: torch.Tensor, caption, mask) -> torch.Tensor:
        """r DDIM steps of the guided teacher along its grid from positions `start`."""
        r = self.spec.teacher_steps // self.spec.student_steps
        for m in range(r):
            i = start + m
            x0 = self._guided_x0(base, diffusion, x, self._grid[i].to(x.device), caption, mask)
            a, s = (v.to(x.device) for v in self._ab(diffusion, i, x.ndim))
            a1, s1 = (v.to(x.device) for v in self._ab(diffusion, i + 1, x.ndim))
            eps = (x - a * x0) / s
            x = a1 * x0 + s1 * eps
        return x

    def loss(self, run, batch: dict, batch_loss) -> torch.Tensor:
        acc, diffusion, device = run.acc, run.diffusion, run.acc.device
        mean, std = batch["mean"], batch["std"]
        b = mean.shape[0]
        gb, sl = b * acc.num_processes, slice(acc.process_index * b, (acc.process_index + 1) * b)
        shape = (gb, *mean.shape[1:])
        xi = torch.randn(shape, generator=run.generator)[sl]
        noise = torch.randn(shape, generator=run.generator)[sl]
        step = torch.randint(0, self.spec.student_steps, (gb,), generator=run.generator)[sl]
        r = self.spec.teacher_steps // self.spec.student_steps
        start = step * r  # teacher-grid position of the student's step
        x0 = scale_latents(mean + std * xi, run.source.vae).to(device)
        t = self._grid[start].to(device)
        x_t = diffusion.q_sample(x0, t, noise.to(device))
        caption, mask = batch["caption"].to(device), batch["mask"].to(device)
        raw = _unwrap(run.model)
        x_next = self._teacher(raw.base_model, diffusion, x_t, start, caption, mask)
        a, s = (v.to(device) for v in self._ab(diffusion, start, x_t.ndim))
        a1, s1 = (v.to(device) for v in self._ab(diffusion, start + r, x_t.ndim))
        target = (x_next - (s1 / s) * x_t) / (a1 - (s1 / s) * a)  # x0* of the single DDIM jump
        pred = self._guided_x0(run.model, diffusion, x_t, t, caption, mask)
        return ((pred - target) ** 2).mean()

    # -- files -----------------------------------------------------------------------------------
    def save_weights(self, module: nn.Module, path, metadata: dict) -> Path:
        return save_feedback(_unwrap(module), path, metadata)

    def load_weights(self, module: nn.Module, tensors: dict) -> None:
        fb = _unwrap(module).feedback
        own = fb.state_dict()
        got = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        if set(got) != set(own):
            diff = sorted(set(own) ^ set(got))
            raise PixsigmaError(f"the checkpoint's feedback weights do not match this run's [ilf] section (first differing: {diff[:3]})")
        fb.load_state_dict(got)

    def export(self, module: nn.Module, path, metadata: dict) -> Path:
        return save_feedback(_unwrap(module), path, {**metadata, "pixsigma_teacher_steps": self.spec.teacher_steps,
                                                     "pixsigma_student_steps": self.spec.student_steps,
                                                     "pixsigma_guidance_scale": self.spec.guidance_scale})



def ilf_task(cfg) -> IlfTask | None:
    """The task of a config with an [ilf] section (None without one)."""
    return IlfTask(cfg.ilf) if getattr(cfg, "ilf", None) is not None else None
