"""Train a small diffusers AutoencoderKL (the shipped default model's VAE).

The first weak-to-strong transition of the paper swaps the VAE; the shipped toy model needs a
VAE of its own, trained here on the synthetic captioned images (`pixsigma.toy`): reconstruction
(L1 + MSE) plus a small KL term, AdamW, then the scaling factor is set from the latents' std so
that scaled latents have unit variance, as the released VAEs' factors do.

    pixsigma train-vae OUT_DIR --steps 3000 --size 64
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pixsigma.errors import PixsigmaError

log = logging.getLogger(__name__)


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


def toy_batches(config: VAETrainConfig, start: int = 0):
    """Endless batches of synthetic images in [-1, 1], (B, 3, size, size), deterministic."""
    from pixsigma.toy.render import generate

    index = start
    while True:
        images = [np.asarray(img, dtype=np.float32) for img, *_ in generate(config.batch_size, seed=config.seed, size=config.size, start=index)]
        index += config.batch_size
        yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0


def _save(vae, out: Path, meta: dict) -> None:
    """Write the diffusers folder atomically: a temp folder renamed over the old one."""
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    vae.save_pretrained(tmp)
    (tmp / "pixsigma_train.json").write_text(json.dumps(meta, indent=2))
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


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


def train_vae(out_dir, config: VAETrainConfig = VAETrainConfig(), init_from=None) -> Path:
    """Train (or, with `init_from` = a VAE folder, continue training) and save to `out_dir`."""
    if config.decoder_only and init_from is None:
        raise PixsigmaError("decoder-only training fine-tunes an existing VAE; pass --init-from VAE_FOLDER")
    if config.object_weight < 1.0:
        raise PixsigmaError(f"object_weight must be >= 1 (1 = plain loss), got {config.object_weight}")
    if config.size % (2 ** (len(config.block_out_channels) - 1)):
        raise PixsigmaError(f"image size {config.size} is not divisible by the VAE's downsampling factor")
    out = Path(out_dir)
    torch.manual_seed(config.seed)
    if init_from is not None:
        from pixsigma.vae import load_autoencoder

        vae = load_autoencoder(init_from).train()
    else:
        vae = build_vae(config).train()
    if config.decoder_only:
        for module in (vae.encoder, vae.quant_conv):
            if module is not None:
                module.requires_grad_(False)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    # a continued run sees new images (start offset from the seed's stream)
    batches = toy_batches(config, start=0 if init_from is None else 5 * 10**6)
    history = []
    start = time.time()
    bar = tqdm(range(1, config.steps + 1), desc="train-vae")
    for step in bar:
        images = next(batches)
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
        # cosine decay to 10% keeps late steps from undoing fine detail
        for group in opt.param_groups:
            group["lr"] = config.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / config.steps)))
        opt.step()
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.3f}")
        if step % 50 == 0:
            history.append({"step": step, "rec": rec.item(), "kl": kl.item(), "seconds": time.time() - start})
            log.debug("step %d rec %.4f kl %.3f", step, rec.item(), kl.item())
        if step % config.save_every == 0 or step == config.steps:
            vae.eval()
            if config.decoder_only:  # same encoder, same latents: keep the factor the caches were built with
                std = 1.0 / vae.config.scaling_factor
            else:
                std = latent_std(vae, toy_batches(config, start=10**7))
                vae.register_to_config(scaling_factor=1.0 / std)
            _save(vae, out, {"config": asdict(config), "step": step, "latent_std": std, "history": history})
            vae.train()
    log.info("VAE saved to %s (scaling factor %.4f)", out, vae.config.scaling_factor)
    return out
