"""Train a small diffusers AutoencoderKL (the shipped default model's VAE).

The first weak-to-strong transition of the paper swaps the VAE; the shipped toy model needs a
VAE of its own. :func:`train_vae` trains one on any stream of images (the ``pixsigma train-vae``
command feeds it the synthetic captioned images of ``pixsigma.toy``): reconstruction (L1 + MSE)
plus a small KL term, AdamW, then the scaling factor is set from the latents' std on a fixed
calibration set so that scaled latents have unit variance, as the released VAEs' factors do.

    pixsigma train-vae OUT_DIR --steps 3000 --size 64
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pixsigma.errors import PixsigmaError
from pixsigma.io import atomic_dir, write_json
from pixsigma.vae import load_autoencoder

log = logging.getLogger(__name__)

CALIBRATION_BATCHES = 4  # batches whose latents set the scaling factor, when none are given


@dataclass
class VAETrainConfig:
    size: int = 64  # training image side (px)
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # 3 levels → downsampling factor 4
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    steps: int = 3000
    batch_size: int = 24
    lr: float = 1e-3
    kl_weight: float = 1e-6
    seed: int = 0
    save_every: int = 500
    # Fine-tune only the decoder (with `init_from`): the encoder, hence the latent space and its
    # scaling factor, stays bit-identical, so feature caches and a transformer trained on them
    # stay valid while reconstructions improve.
    decoder_only: bool = False
    # Loss weight of pixels off the image's background color (objects cover a few percent of a
    # toy image but carry everything the evaluator reads: thin cross arms, triangle tips).
    object_weight: float = 1.0


def build_vae(config: VAETrainConfig):
    from diffusers import AutoencoderKL

    n = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=config.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups, sample_size=config.size,
    )


# --------------------------------------------------------------------------- images


def images_to_tensor(images) -> torch.Tensor:
    """(B, 3, H, W) float32 in [-1, 1] from PIL images or HxWx3 uint8 arrays of one size."""
    arrays = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im, dtype=np.float32) for im in images]
    shape = arrays[0].shape
    if len(shape) != 3 or shape[2] != 3 or any(a.shape != shape for a in arrays):
        raise PixsigmaError(f"training images have shapes {sorted({a.shape for a in arrays})}; "
                            "expected RGB images of one size (H, W, 3)")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def image_batches(images: Iterable, batch_size: int, repeat: bool = True) -> Iterator[torch.Tensor]:
    """Batches of `images_to_tensor` from `images`, in order.

    With `repeat` the stream never ends: a collection that can be iterated again (a list, a
    dataset) starts over when it runs out; a one-shot iterator that runs out is an error.
    Without it the batches end with the images and the last one may be short.
    """
    pending: list = []
    while True:
        iterator, count = iter(images), 0
        for image in iterator:
            count += 1
            pending.append(image)
            if len(pending) == batch_size:
                yield images_to_tensor(pending)
                pending = []
        if not repeat:
            if pending:
                yield images_to_tensor(pending)
            return
        if count == 0:
            raise PixsigmaError("no training images; expected an iterable of images (PIL or HxWx3 uint8 arrays)")
        if iterator is images:
            raise PixsigmaError(f"the training images ran out after {count}; expected an endless stream or a "
                                "collection that can be iterated again")


def _calibration_batches(calibration, images, batch_size: int) -> list[torch.Tensor]:
    """The fixed batches whose latents set the scaling factor: `calibration`, else the first
    CALIBRATION_BATCHES × batch_size images of a re-iterable `images` (all of them if fewer)."""
    if calibration is None:
        if iter(images) is images:
            raise PixsigmaError("the training images are a one-shot iterator; pass calibration= images "
                                "(a list) to measure the VAE's scaling factor on")
        calibration = itertools.islice(images, CALIBRATION_BATCHES * batch_size)
    batches = list(image_batches(calibration, batch_size, repeat=False))
    if not batches:
        raise PixsigmaError("no calibration images; expected at least one image to measure the scaling factor on")
    return batches


def object_mask_weight(images: torch.Tensor, object_weight: float) -> torch.Tensor:
    """(B, 1, H, W) loss weights: `object_weight` where a pixel is off its image's background
    color (the per-image median, as the toy backgrounds are plain), 1 elsewhere."""
    if object_weight == 1.0:
        return torch.ones_like(images[:, :1])
    background = images.flatten(2).median(dim=2).values[:, :, None, None]
    off = (images - background).abs().amax(dim=1, keepdim=True) > 0.1
    return 1.0 + (object_weight - 1.0) * off.float()


@torch.no_grad()
def latent_std(vae, batches, n_batches: int = 4) -> float:
    latents = [vae.encode(next(batches)).latent_dist.mean for _ in range(n_batches)]
    return torch.cat(latents).std().item()


# --------------------------------------------------------------------------- training steps


def _check_config(config: VAETrainConfig, init_from) -> None:
    if config.decoder_only and init_from is None:
        raise PixsigmaError("decoder-only training fine-tunes an existing VAE; pass --init-from VAE_FOLDER")
    if config.object_weight < 1.0:
        raise PixsigmaError(f"object_weight must be >= 1 (1 = plain loss), got {config.object_weight}")
    if config.size % (2 ** (len(config.block_out_channels) - 1)):
        raise PixsigmaError(f"image size {config.size} is not divisible by the VAE's downsampling factor")
    for name in ("steps", "batch_size", "save_every"):
        if getattr(config, name) < 1:
            raise PixsigmaError(f"{name} must be at least 1, got {getattr(config, name)}")
    if not config.lr > 0:
        raise PixsigmaError(f"learning rate must be > 0, got {config.lr}")


def _setup(config: VAETrainConfig, init_from):
    """The VAE (new, or loaded from `init_from`), its trainable parameters and the optimizer."""
    torch.manual_seed(config.seed)
    vae = (build_vae(config) if init_from is None else load_autoencoder(init_from)).train()
    if config.decoder_only:
        for module in (vae.encoder, vae.quant_conv):
            if module is not None:
                module.requires_grad_(False)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    return vae, trainable, torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)


def _lr(config: VAETrainConfig, step: int) -> float:
    """Cosine decay to 10%: late steps do not undo fine detail."""
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / config.steps)))


def _train_step(vae, opt, trainable, images: torch.Tensor, config: VAETrainConfig, step: int):
    """One optimizer step on a batch; returns the (reconstruction, KL per element) losses."""
    if tuple(images.shape[1:]) != (3, config.size, config.size):
        raise PixsigmaError(f"training images are {images.shape[3]}x{images.shape[2]} pixels; expected "
                            f"{config.size}x{config.size} (the config's size)")
    with torch.set_grad_enabled(not config.decoder_only):
        posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample()).sample
    weight = object_mask_weight(images, config.object_weight)
    rec = (weight * ((recon - images).abs() + (recon - images).pow(2))).mean() / weight.mean()
    kl = posterior.kl().mean() / images[0].numel()
    loss = rec if config.decoder_only else rec + config.kl_weight * kl * images[0].numel()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    for group in opt.param_groups:
        group["lr"] = _lr(config, step)
    opt.step()
    return rec, kl


def _save(vae, out: Path, meta: dict) -> None:
    """Write the diffusers folder atomically: built aside, then swapped in for the old one."""
    with atomic_dir(out) as tmp:
        vae.save_pretrained(tmp)
        write_json(tmp / "pixsigma_train.json", meta, indent=2)


def _checkpoint(vae, out: Path, config: VAETrainConfig, step: int, history: list, calibration) -> None:
    """Set the scaling factor (kept as is when only the decoder trains: same encoder, same
    latents, the factor the feature caches were built with) and save."""
    vae.eval()
    if config.decoder_only:
        std = 1.0 / vae.config.scaling_factor
    else:
        std = latent_std(vae, iter(calibration), n_batches=len(calibration))
        vae.register_to_config(scaling_factor=1.0 / std)
    _save(vae, out, {"config": asdict(config), "step": step, "latent_std": std, "history": history})
    vae.train()


def train_vae(out_dir, images: Iterable, config: VAETrainConfig = VAETrainConfig(), init_from=None,
              calibration: Iterable | None = None) -> Path:
    """Train (or, with `init_from` = a VAE folder, continue training) and save to `out_dir`.

    `images`: the training images in order (PIL images or HxWx3 uint8 arrays of `config.size`
    pixels), `config.batch_size` per step; a one-shot iterator must last `steps × batch_size`
    images, a list or dataset is gone through again as often as needed. `calibration`: the
    images whose latents set the scaling factor at each save (default: the first
    CALIBRATION_BATCHES × batch_size images of `images`, which must then be re-iterable).
    """
    if isinstance(images, VAETrainConfig):
        raise PixsigmaError("train_vae(out_dir, images, config): the training images come first; "
                            "`pixsigma train-vae` builds the toy images")
    _check_config(config, init_from)
    out = Path(out_dir)
    calibration = None if config.decoder_only else _calibration_batches(calibration, images, config.batch_size)
    vae, trainable, opt = _setup(config, init_from)
    batches = image_batches(images, config.batch_size)
    history = []
    start = time.time()
    bar = tqdm(range(1, config.steps + 1), desc="train-vae")
    for step in bar:
        rec, kl = _train_step(vae, opt, trainable, next(batches), config, step)
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.3f}")
        if step % 50 == 0:
            history.append({"step": step, "rec": rec.item(), "kl": kl.item(), "seconds": time.time() - start})
            log.debug("step %d rec %.4f kl %.3f", step, rec.item(), kl.item())
        if step % config.save_every == 0 or step == config.steps:
            _checkpoint(vae, out, config, step, history, calibration)
    log.info("VAE saved to %s (scaling factor %.4f)", out, vae.config.scaling_factor)
    return out
