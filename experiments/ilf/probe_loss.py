"""Did the feedback module learn anything? The distillation loss of every student step on fixed
samples (the last 16 of the cache, one noise draw), with the trained module and with its scale
set to 0 (= the base model's single jump).

    OMP_NUM_THREADS=1 python experiments/ilf/probe_loss.py runs/ilf/distill/feedback.safetensors experiments/ilf/distill.toml
"""

import sys

import torch

from pixsigma.data.cache import CachedSource, FeatureCache
from pixsigma.diffusion.gaussian import GaussianDiffusion
from pixsigma.model.checkpoint import load_transformer
from pixsigma.model.feedback import load_feedback
from pixsigma.train.config import load_config
from pixsigma.train.ilf import IlfTask, teacher_grid
from pixsigma.vae import scale_latents

cfg = load_config(sys.argv[2])
torch.set_num_threads(1)
base = load_transformer(cfg.model.init_from, dtype=torch.float32).eval()
net = load_feedback(sys.argv[1], base)
task = IlfTask(cfg.ilf)
task._grid = teacher_grid(cfg.ilf.teacher_steps, base.config.prediction_type)
diffusion = GaussianDiffusion(1000, learn_sigma=base.config.learn_sigma, prediction_type=base.config.prediction_type)
source = CachedSource(FeatureCache(cfg.data.cache_dir), base.config.max_caption_tokens, 0.0, 0)
n = len(source)
batch = source.fetch(list(range(n - 16, n)), 0)
g = torch.Generator().manual_seed(123)
x0 = scale_latents(batch["mean"] + batch["std"] * torch.randn(batch["mean"].shape, generator=g), source.vae)
noise = torch.randn(x0.shape, generator=g)
r = cfg.ilf.teacher_steps // cfg.ilf.student_steps
trained_scale = net.feedback.scale.item()
print(f"trained scale {trained_scale:+.4f}")
print("step  t     loss(base jump)  loss(ILF jump)  ratio")
with torch.no_grad():
    for s in range(cfg.ilf.student_steps):
        start = torch.full((x0.shape[0],), s * r)
        t = task._grid[start]
        x_t = diffusion.q_sample(x0, t, noise)
        x_next = task._teacher(base, diffusion, x_t, start, batch["caption"], batch["mask"])
        a, sg = task._ab(diffusion, start, 4)
        a1, s1 = task._ab(diffusion, start + r, 4)
        target = (x_next - (s1 / sg) * x_t) / (a1 - (s1 / sg) * a)
        losses = []
        for scale in (0.0, trained_scale):
            net.feedback.scale.fill_(scale)
            pred = task._guided_x0(net, diffusion, x_t, t, batch["caption"], batch["mask"])
            losses.append(((pred - target) ** 2).mean().item())
        print(f"{s:4d}  {int(t[0]):4d}  {losses[0]:15.6f}  {losses[1]:14.6f}  {losses[1] / losses[0]:.4f}")
