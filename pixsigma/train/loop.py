"""The training loop: `train(config) -> path of the exported final model`.

One explicit loop (nanoGPT style) run by every process under accelerate (`accelerate launch` or
torchrun; a plain `python` run is one process):

    for each step: lr = warmup-then-constant(step)
        for each micro-batch (grad_accum): fetch this rank's slice of a one-bin global batch,
            draw the posterior sample, timesteps, noise and caption drops for the *global* batch
            from one generator shared by all ranks and keep this rank's slice,
            loss = IDDPM hybrid loss, backward (gradients synchronized on the last micro-batch)
        clip, optimizer step, EMA update, log, checkpoint, validate

Because every random draw of the data path comes from the shared generator over the global
batch, N processes with per-process batch b compute the same update as one process with batch
N·b (to float tolerance), and a resumed run replays exactly what an uninterrupted run would.
The model's own caption dropout is used through `force_drop_ids` with drops drawn from that
generator (probability `model.config.caption_dropout`, 10% by default).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixsigma.data.buckets import BucketBatchSampler
from pixsigma.data.cache import CachedSource, FeatureCache, RawSource, check_not_stale, is_cache
from pixsigma.data.datasets import CaptionDataset
from pixsigma.diffusion.gaussian import GaussianDiffusion
from pixsigma.errors import PixsigmaError
from pixsigma.io import atomic_write, write_json, weights_hash
from pixsigma.model.checkpoint import load_transformer
from pixsigma.model.transformer import PRESETS, KVCompressConfig, PixArtSigmaTransformer
from pixsigma.train.checkpointing import latest_checkpoint, load_checkpoint, optimizer_from_files, rng_state, save_checkpoint, set_rng_state
from pixsigma.train import distributed
from pixsigma.train.config import TrainConfig
from pixsigma.train.controlnet_task import controlnet_task
from pixsigma.train.ilf import ilf_task
from pixsigma.train.lcm import lcm_task
from pixsigma.train.task import task_for
from pixsigma.text import load_text_encoder
from pixsigma.vae import autoencoder, load_autoencoder, scale_latents, vae_info

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, vae_factor: int, resolution: int | None = None):
    """The transformer: a preset (sized for data.resolution) or `model.init_from`."""
    overrides = dict(cfg.model.overrides)
    if cfg.model.init_from:
        # the output's meaning may change (fine-tuning ε → v); the shapes may not
        structural = sorted(set(overrides) - {"caption_dropout", "prediction_type"})
        if structural:
            raise PixsigmaError(f"model.overrides {structural} cannot change a loaded checkpoint; "
                                "use pixsigma adapt (resolution / kv-compress / tokens) to make a new one")
        # fp32 master weights whatever the file stores (released checkpoints are often fp16);
        # mixed precision comes from autocast, not from the parameters' dtype
        model = load_transformer(cfg.model.init_from, dtype=torch.float32)
        if overrides:
            try:
                model.config = model.config.with_(**overrides)
            except (TypeError, ValueError) as e:
                raise PixsigmaError(f"model.overrides: {e}") from None
        return model.train()
    base = PRESETS[cfg.model.preset]
    res = resolution or cfg.data.resolution
    if res is not None and "sample_size" not in overrides:
        overrides["sample_size"] = res // vae_factor
        if cfg.model.preset == "xl_2" and "pe_interpolation" not in overrides:
            overrides["pe_interpolation"] = res / 512
    if "kv_compress" in overrides and isinstance(overrides["kv_compress"], dict):
        overrides["kv_compress"] = KVCompressConfig(**overrides["kv_compress"])
    try:
        config = base.with_(**overrides)
    except (TypeError, ValueError) as e:
        raise PixsigmaError(f"model.overrides: {e}") from None
    return PixArtSigmaTransformer(config).train()


def make_optimizer(cfg: TrainConfig, params):
    o = cfg.optim
    if o.name == "came":
        from came_pytorch import CAME

        betas = tuple(o.betas) if len(o.betas) == 3 else (o.betas[0], o.betas[1], 0.9999)
        eps = tuple(o.eps) if len(o.eps) == 2 else (o.eps[0], 1e-16)
        return CAME(params, lr=o.lr, betas=betas, eps=eps, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.adamw_eps, weight_decay=o.weight_decay,
                             foreach=False)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over optim.warmup_steps, then constant (the paper's schedule) or cosine decay."""
    o, w = cfg.optim, cfg.optim.warmup_steps
    if step < w:
        return o.lr * (step + 1) / w
    if o.decay == "constant":
        return o.lr
    progress = min(1.0, (step - w) / max(1, cfg.schedule.max_steps - w))
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema_params, params, decay: float) -> None:
    torch._foreach_lerp_(ema_params, [p.detach().float() for p in params], 1.0 - decay)


def object_weights(loss_mask: torch.Tensor | None, object_weight: float, margin: int) -> torch.Tensor | None:
    """(B, 1, h, w) MSE weights: `object_weight` on latent cells an object covers or lies within
    `margin` cells of, 1 elsewhere; None for a plain loss (weight 1 or no masks in the batch)."""
    if loss_mask is None or object_weight == 1.0:
        return None
    m = loss_mask.float()
    if margin > 0:  # the rim just outside an object decides its shape as much as the rim inside
        m = torch.nn.functional.max_pool2d(m, 2 * margin + 1, stride=1, padding=margin)
    return 1.0 + (object_weight - 1.0) * m


def batch_loss(model, diffusion: GaussianDiffusion, batch: dict, vae: dict, generator: torch.Generator, rank: int, world: int,
               caption_dropout: float, device, object_weight: float = 1.0, object_margin: int = 1,
               model_kwargs: dict | None = None) -> torch.Tensor:
    """Mean hybrid loss of this rank's slice; every draw is made for the global batch. model_kwargs:
    more inputs of the model's forward (a task's, e.g. the ControlNet's control latent)."""
    mean, std = batch["mean"], batch["std"]
    b = mean.shape[0]
    gb, sl = b * world, slice(rank * b, (rank + 1) * b)
    shape = (gb, *mean.shape[1:])
    xi = torch.randn(shape, generator=generator)[sl]
    t = diffusion.sample_timesteps(gb, generator)[sl]
    noise = torch.randn(shape, generator=generator)[sl]
    drop = (torch.rand(gb, generator=generator) < caption_dropout)[sl]
    x0 = scale_latents(mean + std * xi, vae).to(device)
    t, noise = t.to(device), noise.to(device)
    kwargs = {"caption": batch["caption"].to(device), "caption_mask": batch["mask"].to(device), "force_drop_ids": drop.to(device),
              **(model_kwargs or {})}
    weight = object_weights(batch.get("loss_mask"), object_weight, object_margin)
    weight = None if weight is None else weight.to(device)
    return diffusion.training_loss(model, x0, t, noise, kwargs, weight).loss.mean()


class DataPosition:
    """(epoch, next batch index in the epoch) over a bucket sampler; advances across epochs."""

    def __init__(self, sampler: BucketBatchSampler, epoch: int = 0, index: int = 0):
        self.sampler, self.epoch, self.index = sampler, epoch, index
        self._iter = None

    def next(self) -> tuple[int, list[int]]:
        while True:
            if self._iter is None:
                self._iter = self.sampler.batches(self.epoch, self.index)
            try:
                i, positions = next(self._iter)
                self.index = i + 1
                return self.epoch, positions
            except StopIteration:
                self.epoch, self.index, self._iter = self.epoch + 1, 0, None


def _setup_data(cfg: TrainConfig, text_encoder, vae, device):
    """(kind, data, VAE factor, resolution): ('cache', FeatureCache, ...) or ('raw', (dataset, text encoder,
    VAE), ...); the resolution is None when neither the cache nor data.resolution fixes it."""
    d = cfg.data
    if d.cache_dir and is_cache(d.cache_dir):
        check_not_stale(d.cache_dir)
        cache = FeatureCache(d.cache_dir)
        if d.resolution is not None and d.resolution != cache.meta["resolution"]:
            raise PixsigmaError(f"{d.cache_dir}: cache was extracted at {cache.meta['resolution']}px but data.resolution is {d.resolution}")
        log.info("training from the feature cache %s (%d samples; no text encoder or VAE loaded)", d.cache_dir, len(cache.index))
        return "cache", cache, cache.vae["factor"], cache.meta["resolution"]
    if d.cache_dir and d.path is None:
        raise PixsigmaError(f"{d.cache_dir}: no feature cache there (no meta.json) and no data.path; run pixsigma extract first")
    if d.cache_dir:
        log.warning("data.cache_dir %s holds no cache yet: encoding %s on the fly", d.cache_dir, d.path)
    dataset = CaptionDataset(d.path, d.layout, d.long_caption_key, d.max_aspect_ratio, d.image_root)
    if vae is None:
        if not d.vae:
            raise PixsigmaError("training from raw images needs data.vae (an AutoencoderKL folder) or a feature cache")
        vae = load_autoencoder(d.vae, frozen=True)
    if text_encoder is None:
        if not d.text_encoder:
            raise PixsigmaError("training from raw images needs data.text_encoder (a text encoder folder) or a feature cache")
        text_encoder = load_text_encoder(d.text_encoder)
    autoencoder(vae).to(device)
    return "raw", (dataset, text_encoder, vae), vae_info(vae)["factor"], d.resolution


# ---------------------------------------------------------------------------------------------
# Validation (optional: needs the pipeline and the encoders)
# ---------------------------------------------------------------------------------------------


def validate(cfg: TrainConfig, model, text_encoder, vae, run_dir: Path, step: int, writer=None) -> Path | None:
    """Sample the fixed prompts with fixed seeds and save a grid PNG; skipped with a log line
    when the pipeline is missing or no text encoder / VAE is loaded (cache training)."""
    if text_encoder is None or vae is None:
        log.info("validation skipped at step %d: no text encoder / VAE loaded (training from the feature cache)", step)
        return None
    try:
        from pixsigma.pipeline import SigmaPipeline
    except Exception as e:  # noqa: BLE001 - optional dependency inside the project
        log.info("validation skipped at step %d: pixsigma.pipeline is not available (%s)", step, type(e).__name__)
        return None
    was_training = model.training
    try:
        from pixsigma.vae import VAE

        wrapped = vae if isinstance(vae, VAE) else VAE(autoencoder(vae), device=next(model.parameters()).device)
        pipe = SigmaPipeline(transformer=model, text_encoder=text_encoder, vae=wrapped, device=next(model.parameters()).device)
        images = []
        seeds = list(cfg.validation.seeds) or [0]
        for i, prompt in enumerate(cfg.validation.prompts):
            out = pipe(prompt, num_inference_steps=cfg.validation.steps, guidance_scale=cfg.validation.guidance_scale,
                       sampler=cfg.validation.sampler, seed=seeds[i % len(seeds)])
            images.append(out.images[0])
    except Exception as e:  # noqa: BLE001 - validation never stops training
        log.warning("validation failed at step %d (%s); training continues", step, " ".join(str(e).split())[:200])
        return None
    finally:
        model.train(was_training)
    from PIL import Image

    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        grid.paste(im, (i * w, 0))
    out_dir = run_dir / "validation"
    path = atomic_write(out_dir / f"step-{step:08d}.png", lambda tmp: grid.save(tmp, format="PNG"))
    if writer is not None:
        writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    log.info("validation grid %s", path)
    return path


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    # FSDP (distributed.strategy = fsdp) is applied by pixsigma.train.distributed, not by accelerate
    try:
        return Accelerator(mixed_precision=cfg.precision.mixed, cpu=not torch.cuda.is_available())
    except ValueError as e:
        raise PixsigmaError(f"accelerate cannot set up this run: {' '.join(str(e).split())}") from None


@dataclass
class Run:
    """Everything one training process holds between steps."""

    cfg: TrainConfig
    acc: Any  # accelerate.Accelerator
    run_dir: Path
    source: Any  # CachedSource | RawSource
    sampler: BucketBatchSampler
    generator: torch.Generator  # shared by all ranks: every data-path draw comes from it
    model: torch.nn.Module  # as prepared by accelerate (wrapped under DDP / FSDP)
    raw_model: torch.nn.Module
    ema: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    diffusion: GaussianDiffusion
    text_encoder: Any = None  # loaded for raw-image training only (validation needs them)
    vae: Any = None
    task: Any = None  # pixsigma.train.task.TrainTask: what is trained, checkpointed and exported
    step: int = 0
    position: DataPosition | None = None
    metrics: Any = None  # log.jsonl, open on the main process
    writer: Any = None  # TensorBoard SummaryWriter or None
    logged_step: int = 0  # step and time of the last log line (throughput)
    logged_at: float = 0.0

    @property
    def fsdp(self) -> bool:
        return distributed.is_sharded(self.model)


def _start(cfg: TrainConfig, resume: bool):
    """Check the config and the output folder, seed every RNG, and return the accelerator."""
    cfg.validate()
    run_dir = Path(cfg.output.dir)
    if not resume and latest_checkpoint(run_dir) is not None:
        raise PixsigmaError(f"{run_dir}: holds checkpoints of an earlier run; pass --resume to continue it or choose another --output")
    if cfg.schedule.deterministic:
        torch.use_deterministic_algorithms(True)
    acc = _accelerator(cfg)
    seed = cfg.schedule.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # identical init on every rank
    return acc


def _make_source(cfg: TrainConfig, kind: str, data, mc, vae_factor: int, resolution: int):
    """(sample source, text encoder, VAE) for a model with config `mc`; the encoders are None on a cache."""
    ratio, seed, object_weight = cfg.data.long_caption_ratio, cfg.schedule.seed, cfg.schedule.object_loss_weight
    if kind == "cache":
        source, text_encoder, vae = CachedSource(data, mc.max_caption_tokens, ratio, seed), None, None
    else:
        dataset, text_encoder, vae = data
        control = cfg.controlnet.condition if getattr(cfg, "controlnet", None) is not None else None  # ControlNet training
        source = RawSource(dataset, text_encoder, vae, resolution, mc.patch_size * vae_factor, mc.max_caption_tokens, ratio, seed,
                           loss_masks=object_weight != 1.0, control_type=control)
    if object_weight != 1.0:
        if not source.masked:
            raise PixsigmaError(f"schedule.object_loss_weight = {object_weight:g} needs object masks, but the training "
                                "data has none; give the dataset records a loss_mask and extract into a new cache folder")
        if source.masked < len(source):
            log.warning("%d of %d samples have no loss mask; they train with a plain loss", len(source) - source.masked, len(source))
    if source.vae["latent_channels"] != mc.in_channels:
        raise PixsigmaError(f"the VAE gives {source.vae['latent_channels']} latent channels but the model takes {mc.in_channels}")
    return source, text_encoder, vae


def _make_diffusion(cfg: TrainConfig, mc) -> GaussianDiffusion:
    s = cfg.schedule
    return GaussianDiffusion(s.num_timesteps, snr_gamma=s.snr_gamma, learn_sigma=mc.learn_sigma, x0_weight_cap=s.x0_weight_cap,
                             prediction_type=mc.prediction_type, timestep_sampling=s.timestep_sampling,
                             logit_mean=s.timestep_logit_mean, logit_std=s.timestep_logit_std)


def _setup(cfg: TrainConfig, resume: bool, text_encoder, vae) -> Run:
    """Data, model, EMA, optimizer and the shared generator, made in a fixed order (so every rank,
    and a resumed run, starts from the same random state)."""
    acc = _start(cfg, resume)
    seed = cfg.schedule.seed
    kind, data, vae_factor, resolution = _setup_data(cfg, text_encoder, vae, acc.device)
    task = controlnet_task(cfg) or ilf_task(cfg) or lcm_task(cfg) or task_for(cfg)  # what trains: the whole model, adapters, a ControlNet (pixsigma.train.task)
    model = task.build(cfg, build_model(cfg, vae_factor, resolution))
    mc = model.config
    resolution = resolution or cfg.data.resolution or mc.sample_size * vae_factor
    if mc.sample_size * vae_factor != resolution:
        log.warning("the model's training size (sample_size %d × %d = %dpx) differs from the data resolution %dpx; "
                    "pixsigma adapt resolution makes a model for it", mc.sample_size, vae_factor, mc.sample_size * vae_factor, resolution)
    source, text_encoder, vae = _make_source(cfg, kind, data, mc, vae_factor, resolution)
    sampler = BucketBatchSampler(source.buckets(), cfg.schedule.batch_size, seed, acc.process_index, acc.num_processes,
                                 cfg.data.drop_last)
    torch.manual_seed(seed + acc.process_index)  # per-rank global RNG from here on (nothing in the data path uses it)
    generator = torch.Generator().manual_seed(seed)  # shared: identical draws on every rank

    model.set_runtime_options(attention_fp32=cfg.precision.attention_fp32, gradient_checkpointing=cfg.model.gradient_checkpointing)
    ema = None
    if cfg.optim.ema_decay > 0 and not distributed.wants_sharding(cfg.distributed.strategy, acc.num_processes):
        ema = task.make_ema(model)
    elif cfg.optim.ema_decay > 0:
        log.warning("EMA is not kept under FSDP (weights are sharded); the exported model is the trained one")
    # the optimizer gets the task's trainable parameters of the (prepared, same) module
    model, optimizer = distributed.prepare(acc, model, lambda _: make_optimizer(cfg, task.trainable_parameters(model)), cfg.distributed.strategy,
                                           cfg.precision.mixed, cfg.distributed.cpu_offload)
    return Run(cfg=cfg, acc=acc, run_dir=Path(cfg.output.dir), source=source, sampler=sampler, generator=generator, model=model,
               raw_model=acc.unwrap_model(model), ema=ema, optimizer=optimizer, diffusion=_make_diffusion(cfg, mc),
               text_encoder=text_encoder, vae=vae, position=DataPosition(sampler), task=task)


def _resume(run: Run) -> None:
    """Load the latest checkpoint of the run folder into `run`: weights, EMA, optimizer, loss
    scaler, data position and RNG states. With no checkpoint there the run starts at step 0."""
    path = latest_checkpoint(run.run_dir)
    if path is None:
        log.warning("--resume: no checkpoint in %s; starting from step 0", run.run_dir)
        return
    ck = load_checkpoint(path, run.acc.process_index)
    if run.fsdp:
        distributed.load_sharded(path / distributed.SHARDED, run.model, run.optimizer)
    else:
        run.task.load_weights(run.raw_model, ck["model"])
    if run.ema is not None and ck["ema"] is not None:
        run.task.load_weights(run.ema, ck["ema"])
    if ck["optimizer"] is not None:
        run.optimizer.load_state_dict(optimizer_from_files(*ck["optimizer"], like=run.optimizer.state_dict()))
    st = ck["state"]
    run.step = st["step"]
    run.position = DataPosition(run.sampler, st["epoch"], st["batch_in_epoch"])
    if st.get("scaler") and run.acc.scaler is not None:
        run.acc.scaler.load_state_dict(st["scaler"])
    if ck["rng"] is not None:
        set_rng_state(ck["rng"], run.generator)
    log.info("resumed from %s (step %d, epoch %d, batch %d)", path, run.step, st["epoch"], st["batch_in_epoch"])


def _open_logs(run: Run) -> None:
    """config.json, log.jsonl (appended to) and TensorBoard, on the main process."""
    run.logged_step, run.logged_at = run.step, time.perf_counter()
    if not run.acc.is_main_process:
        return
    write_json(run.run_dir / "config.json", run.cfg.to_dict(), indent=1)
    if run.cfg.output.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            run.writer = SummaryWriter(str(run.run_dir / "tb"))
        except Exception as e:  # noqa: BLE001 - logging is optional
            log.warning("TensorBoard logging off (%s)", type(e).__name__)
    run.metrics = open(run.run_dir / "log.jsonl", "a")


def _train_step(run: Run) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step over grad_accum micro-batches, then the EMA update.

    Returns (this rank's mean loss, gradient norm before clipping, learning rate)."""
    cfg, acc, accum = run.cfg, run.acc, run.cfg.schedule.grad_accum
    lr = lr_at(cfg, run.step)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    total = 0.0
    for micro in range(accum):
        epoch, positions = run.position.next()
        batch = run.source.fetch(positions, epoch)
        with distributed.gradient_sync(run.model, acc, micro == accum - 1):  # sync on the last micro-batch
            loss = run.task.loss(run, batch, batch_loss)
            acc.backward(loss / accum)
        total += loss.detach().float() / accum
    if cfg.optim.grad_clip > 0:
        grad_norm = acc.clip_grad_norm_(run.task.trainable_parameters(run.model), cfg.optim.grad_clip)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.task.trainable_parameters(run.model), float("inf"))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None and not acc.optimizer_step_was_skipped:
        ema_update(run.task.trainable_parameters(run.ema), run.task.trainable_parameters(run.raw_model), cfg.optim.ema_decay)
    run.task.after_step(run)
    run.step += 1
    return total, distributed.total_norm(grad_norm), lr


def _log(run: Run, loss: torch.Tensor, grad_norm, lr: float, bar) -> None:
    """Loss averaged over ranks, lr, gradient norm and throughput to log.jsonl, TensorBoard and the bar."""
    loss_all = run.acc.reduce(loss.to(run.acc.device), "mean").item()
    now = time.perf_counter()
    samples = (run.step - run.logged_step) * run.cfg.schedule.batch_size * run.acc.num_processes * run.cfg.schedule.grad_accum
    rate = samples / max(now - run.logged_at, 1e-9)
    run.logged_step, run.logged_at = run.step, now
    if not run.acc.is_main_process:
        return
    gn = float(grad_norm) if grad_norm is not None else float("nan")
    bar.set_postfix(loss=f"{loss_all:.4f}", lr=f"{lr:.2e}")
    run.metrics.write(json.dumps({"step": run.step, "loss": loss_all, "lr": lr, "grad_norm": gn, "samples_per_s": rate}) + "\n")
    run.metrics.flush()
    if run.writer is not None:
        for name, value in (("loss", loss_all), ("lr", lr), ("grad_norm", gn), ("samples_per_s", rate)):
            run.writer.add_scalar(f"train/{name}", value, run.step)


def _checkpoint(run: Run) -> None:
    acc, cfg = run.acc, run.cfg
    state = {"epoch": run.position.epoch, "batch_in_epoch": run.position.index, "lr": lr_at(cfg, run.step),
             "scaler": acc.scaler.state_dict() if acc.scaler is not None else None, "config": cfg.to_dict(),
             "world_size": acc.num_processes}
    sharded = (lambda folder: distributed.save_sharded(folder / distributed.SHARDED, run.model, run.optimizer)) if run.fsdp else None
    save_checkpoint(run.run_dir, run.step, model=None if run.fsdp else run.raw_model, ema=run.ema,
                    optimizer_state=None if run.fsdp else run.optimizer.state_dict(), state=state, rng=rng_state(run.generator),
                    rank=acc.process_index, barrier=acc.wait_for_everyone, keep=cfg.checkpointing.keep, sharded=sharded,
                    write_weights=run.task.save_weights)


def _export(run: Run) -> Path:
    """Check that the ranks agree, write RUN/model.safetensors (EMA or trained weights) and close the run."""
    acc = run.acc
    digests = rank_digests(acc, run.raw_model)
    export = run.run_dir / run.task.export_name
    use_ema = run.cfg.checkpointing.export == "ema" and run.ema is not None
    final = run.ema if use_ema else _model_to_save(acc, run.model, run.raw_model)
    if acc.is_main_process:
        run.metrics.write(json.dumps({"step": run.step, "rank_weight_digests": digests}) + "\n")
        if len(set(digests)) > 1:
            log.warning("ranks hold different weights at the end of training: %s", digests)
        run.task.export(final, export, {"pixsigma_step": str(run.step), "pixsigma_weights": "ema" if use_ema else "model"})
        log.info("exported %s (%s weights, step %d)", export, "EMA" if use_ema else "trained", run.step)
        run.metrics.close()
        if run.writer is not None:
            run.writer.close()
    acc.wait_for_everyone()
    # Free the DDP wrapper (its reducer holds the process group) before the group is destroyed:
    # a gloo group released by a reducer after destroy_process_group can deadlock in its destructor.
    run.model = run.optimizer = None
    acc.free_memory()
    gc.collect()
    acc.end_training()
    return export


def train(cfg: TrainConfig, resume: bool = False, text_encoder=None, vae=None) -> Path:
    """Train as `cfg` says; returns the exported final model (.safetensors, EMA by default).

    text_encoder / vae: already-built objects for raw-image training (else loaded from
    data.text_encoder / data.vae; not needed with a feature cache). resume: continue from the
    latest checkpoint in output.dir (a fresh start, with a warning, when there is none).
    """
    from tqdm import tqdm

    run = _setup(cfg, resume, text_encoder, vae)
    if resume:
        _resume(run)
    _open_logs(run)
    s, every = cfg.schedule, cfg.checkpointing.every
    bar = tqdm(total=s.max_steps, initial=run.step, desc="train", unit="step", disable=not run.acc.is_main_process)
    while run.step < s.max_steps:
        loss, grad_norm, lr = _train_step(run)
        bar.update(1)
        if run.step % s.log_every == 0 or run.step == s.max_steps:
            _log(run, loss, grad_norm, lr, bar)
        if every and run.step % every == 0 and run.step < s.max_steps:
            _checkpoint(run)
        if cfg.validation.every and run.step % cfg.validation.every == 0 and run.acc.is_main_process:
            validate(cfg, run.ema if run.ema is not None else run.raw_model, run.text_encoder, run.vae, run.run_dir, run.step, run.writer)
    bar.close()
    _checkpoint(run)
    return _export(run)


def rank_digests(acc, model) -> list[str]:
    """Every rank's weight hash (gathered), to check that data-parallel ranks stayed identical."""
    if distributed.is_sharded(model):
        return []
    digest = bytes.fromhex(weights_hash(model.state_dict(), length=32))  # 16 bytes = two int64 per rank
    local = torch.frombuffer(bytearray(digest), dtype=torch.int64).to(acc.device)
    gathered = acc.gather(local).reshape(-1, 2).cpu()
    return [row.numpy().tobytes().hex() for row in gathered]


def _model_to_save(acc, model, raw_model):
    """The module to write: the unwrapped model, or (FSDP) a full copy gathered onto rank 0."""
    return distributed.gathered_model(model) if distributed.is_sharded(model) else raw_model


def train_from_file(path, overrides=(), resume: bool = False, max_steps: int | None = None, output: str | None = None) -> Path:
    from pixsigma.train.config import load_config

    extra = list(overrides)
    if max_steps is not None:
        extra.append(f"schedule.max_steps={int(max_steps)}")
    if output is not None:
        extra.append(f"output.dir={json.dumps(str(output))}")
    return train(load_config(path, extra), resume=resume)

