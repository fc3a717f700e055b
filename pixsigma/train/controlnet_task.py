"""ControlNet training in the one loop: `ControlNetTask` (a `pixsigma.train.task.TrainTask`).

The loaded transformer becomes the frozen base of a `ControlNetTransformer`; only the copied
blocks and the zero-initialised projections train, are EMA'd, checkpointed and exported (as a
ControlNet-only .safetensors that names its base by weights hash, `save_controlnet`).

Batches carry `control`: the control images' unscaled VAE posterior means (from the feature
cache or encoded on the fly, `pixsigma.data.cache`), zeros for a sample without one. The loss is
the IDDPM objective with the scaled control latent as the model's `control` input. Conditioning
dropout: a fraction of the samples, drawn from the run's shared generator for the global batch,
train with a zero control latent, so the ControlNet learns to stay neutral when its map carries
nothing (as samples without a control image do).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn

from pixsigma.errors import PixsigmaError
from pixsigma.io import write_safetensors
from pixsigma.model.controlnet import ControlNetTransformer
from pixsigma.model.controlnet_checkpoint import save_controlnet
from pixsigma.train.task import TrainTask
from pixsigma.vae import scale_latents

_OWN = re.compile(r"(^|\.)controlnet\.")  # the ControlNet's own parameter names (under any wrapper prefix)


def controlnet_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the copied blocks and projections of a ControlNetTransformer, also
    when it is wrapped (DDP's `module.` prefix), in a fixed order."""
    return [(n, p) for n, p in module.named_parameters() if _OWN.search(n)]


class ControlNetTask(TrainTask):
    """ControlNet training (module doc): `num_blocks` copies; `dropout` is the fraction of
    samples trained with a zero control latent."""

    name = "controlnet"
    export_name = "controlnet.safetensors"

    def __init__(self, num_blocks: int, dropout: float = 0.0):
        self.num_blocks, self.dropout = int(num_blocks), float(dropout)

    def build(self, cfg, model: nn.Module) -> nn.Module:
        if cfg.distributed.strategy == "fsdp":
            raise PixsigmaError("ControlNet training runs data parallel (distributed.strategy = \"ddp\"); FSDP is for full training")
        if cfg.model.init_from is None:
            raise PixsigmaError("ControlNet training needs a trained base: set model.init_from to the transformer to control")
        net = ControlNetTransformer.from_transformer(model, self.num_blocks)
        return net.train()

    def trainable_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        return [p for _, p in controlnet_parameters(module)]

    def make_ema(self, module: nn.Module) -> nn.Module:
        """A copy sharing the frozen base with the trained module (no second base in memory),
        with its own fp32 copy of the ControlNet weights."""
        own = {id(p) for p in self.trainable_parameters(module)}
        shared = {id(t): t for t in [*module.parameters(), *module.buffers()] if id(t) not in own}
        ema = copy.deepcopy(module, memo=shared).eval()
        for p in self.trainable_parameters(ema):
            p.requires_grad_(False)
            p.data = p.data.float()
        return ema

    def loss(self, run, batch: dict, batch_loss) -> torch.Tensor:
        control = batch.get("control")
        if control is None and not getattr(run.source, "controlled", 0):
            raise PixsigmaError("ControlNet training found no control images in the training data; expected a `control` "
                                "image per record (or NAME.control.png), extracted into the feature cache, or "
                                "controlnet.condition = \"canny\" / \"mask\" to compute them from the pictures")
        acc = run.acc
        b = batch["mean"].shape[0]
        gb, sl = b * acc.num_processes, slice(acc.process_index * b, (acc.process_index + 1) * b)
        keep = (torch.rand(gb, generator=run.generator) >= self.dropout)[sl]  # drawn for the global batch
        if control is None:
            latent = torch.zeros_like(batch["mean"])
        else:
            latent = scale_latents(control.float(), run.source.vae) * keep.view(-1, 1, 1, 1).float()
        cfg = run.cfg
        return batch_loss(run.model, run.diffusion, batch, run.source.vae, run.generator, acc.process_index, acc.num_processes,
                          run.raw_model.config.caption_dropout, acc.device, cfg.schedule.object_loss_weight,
                          cfg.schedule.object_mask_margin, model_kwargs={"control": latent.to(acc.device)})

    def save_weights(self, module: nn.Module, path, metadata: dict) -> Path:
        return write_safetensors(path, {n: p.detach() for n, p in controlnet_parameters(module)}, metadata)

    def load_weights(self, module: nn.Module, tensors: dict) -> None:
        own = dict(controlnet_parameters(module))
        if set(own) != set(tensors):
            diff = sorted(set(own) ^ set(tensors))
            raise PixsigmaError(f"the checkpoint's ControlNet weights do not match this run's [controlnet] section "
                                f"(first differing: {diff[:3]})")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(tensors[n])

    def export(self, module: nn.Module, path, metadata: dict) -> Path:
        return save_controlnet(module, path, extra_metadata=metadata)


def controlnet_task(cfg) -> ControlNetTask | None:
    """The task of a config with a [controlnet] section, else None (`pixsigma.train.task.task_for`
    picks among the others; this module builds on that one, so it cannot pick this one)."""
    section = getattr(cfg, "controlnet", None)
    return None if section is None else ControlNetTask(section.num_blocks, section.conditioning_dropout)
