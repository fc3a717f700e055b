"""What the one training loop trains: the `TrainTask` interface, `FullTask` and `LoraTask`.

`pixsigma.train.loop` runs every kind of training (full training and fine-tuning, LoRA, and
the ControlNet / distillation tasks built the same way): data, the accelerator, the optimizer
step, EMA, logging, checkpoints, resume and the export are the loop's; what is *trained* is the
task's. The loop calls, in this order:

    task = task_for(cfg)
    module = task.build(cfg, base)                 # the trained module, from the model the config names
    ema = task.make_ema(module)                    # (when EMA is on)
    params = task.trainable_parameters(module)     # the optimizer's, EMA's and gradient clipping's
    every micro-batch:  loss = task.loss(run, batch, batch_loss)   # run.model: the (DDP-wrapped) module
    after every optimizer step:  task.after_step(run)
    checkpoint:  task.save_weights(module / ema, path, metadata)   (model.safetensors / ema.safetensors)
    resume:      task.load_weights(module / ema, tensors read back from those files)
    end:         task.export(final module, RUN/<task.export_name>, metadata)

Contract, so that a resumed run ends bit-identical:
- `trainable_parameters` returns the same parameters in the same order for a module and for its
  EMA copy (EMA pairs them by position);
- everything that changes during training and is not an optimizer state, the data position or
  an RNG state must be in what `save_weights` writes (a task with more trained networks, e.g. a
  target network kept as an EMA, writes them into the same file under its own key prefixes) and
  come back through `load_weights`;
- `loss` draws every random number from `run.generator` (shared by the ranks) for the global
  batch, as `batch_loss` does, so N processes compute what one process with N× the batch does.

Subclasses override what differs: a ControlNet task builds base + copied blocks and trains only
those (its batches carry a control latent its `loss` reads); a distillation task keeps a frozen
teacher in `build`, and its own loss. `task_for` picks the task from the config.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from pixsigma.errors import PixsigmaError
from pixsigma.io import write_safetensors
from pixsigma.model.checkpoint import save_safetensors
from pixsigma.model.lora import LoraSpec, adapter_parameters, add_lora, save_lora


class TrainTask:
    """Full training of the transformer: every weight trains; checkpoints and the export are the
    whole model (`save_safetensors`). The default of every hook."""

    name = "full"
    export_name = "model.safetensors"

    def build(self, cfg, model: nn.Module) -> nn.Module:
        """The module to train, made from the transformer `build_model` loaded or created."""
        return model

    def trainable_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        return list(module.parameters())

    def make_ema(self, module: nn.Module) -> nn.Module:
        """The EMA copy (fp32, eval, no gradients) the loop updates after each optimizer step."""
        return copy.deepcopy(module).float().eval().requires_grad_(False)

    def loss(self, run, batch: dict, batch_loss) -> torch.Tensor:
        """This rank's mean loss on one micro-batch: by default the IDDPM objective, the loop's
        `batch_loss` (passed in, so that this module need not import the loop)."""
        cfg, acc = run.cfg, run.acc
        return batch_loss(run.model, run.diffusion, batch, run.source.vae, run.generator, acc.process_index, acc.num_processes,
                          run.raw_model.config.caption_dropout, acc.device, cfg.schedule.object_loss_weight,
                          cfg.schedule.object_mask_margin)

    def after_step(self, run) -> None:
        """Called after every optimizer step (and the EMA update); nothing for full training."""

    def save_weights(self, module: nn.Module, path, metadata: dict) -> Path:
        return save_safetensors(module, path, metadata)

    def load_weights(self, module: nn.Module, tensors: dict) -> None:
        module.load_state_dict(tensors)

    def export(self, module: nn.Module, path, metadata: dict) -> Path:
        return save_safetensors(module, path, metadata)


FullTask = TrainTask


class LoraTask(TrainTask):
    """LoRA fine-tuning: adapters (pixsigma.model.lora) on the loaded transformer; only they train
    (fp32, whatever the autocast), only they are checkpointed, EMA'd and exported (as a LoRA file)."""

    name = "lora"
    export_name = "lora.safetensors"

    def __init__(self, spec: LoraSpec):
        self.spec = spec

    def build(self, cfg, model: nn.Module) -> nn.Module:
        if cfg.distributed.strategy == "fsdp":
            raise PixsigmaError("LoRA training runs data parallel (distributed.strategy = \"ddp\"); FSDP is for full training")
        add_lora(model, self.spec)
        for _, p in adapter_parameters(model):
            p.data = p.data.float()
        return model

    def trainable_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        return [p for _, p in adapter_parameters(module)]

    def make_ema(self, module: nn.Module) -> nn.Module:
        """A copy that shares the frozen base weights with the trained module (no second model in
        memory) and holds its own fp32 adapter weights."""
        adapters = {id(p) for _, p in adapter_parameters(module)}
        shared = {id(t): t for t in [*module.parameters(), *module.buffers()] if id(t) not in adapters}
        ema = copy.deepcopy(module, memo=shared).eval()
        for p in self.trainable_parameters(ema):
            p.requires_grad_(False)
        return ema

    def save_weights(self, module: nn.Module, path, metadata: dict) -> Path:
        tensors = {n: p.detach() for n, p in adapter_parameters(module)}
        return write_safetensors(path, tensors, {**metadata, "pixsigma_lora_spec": json.dumps(vars(self.spec), default=list)})

    def load_weights(self, module: nn.Module, tensors: dict) -> None:
        own = dict(adapter_parameters(module))
        if set(own) != set(tensors):
            diff = sorted(set(own) ^ set(tensors))
            raise PixsigmaError(f"the checkpoint's adapter weights do not match this run's [lora] section (first differing: {diff[:3]})")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(tensors[n])

    def export(self, module: nn.Module, path, metadata: dict) -> Path:
        return save_lora(module, path, extra_metadata=metadata)


def task_for(cfg) -> TrainTask:
    """The task a training config asks for: LoRA with a [lora] section, else full training."""
    lora = getattr(cfg, "lora", None)
    if lora is not None:
        return LoraTask(LoraSpec(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=tuple(lora.targets),
                                 use_dora=lora.use_dora, use_rslora=lora.use_rslora, init=lora.init))
    return FullTask()
