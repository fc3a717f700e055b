"""The VAE: diffusers' AutoencoderKL from a local folder, with this project's tiled decoding.

Latents handled by the rest of the project are *scaled*: z = (posterior − shift) × scaling_factor
(SDXL's VAE: 0.13025, SD's: 0.18215; `shift_factor` only where the config has one).

Large images are decoded tile by tile over the latent: overlapping tiles (by default the largest
of 1024/768/512/256 output pixels whose estimated activations fit the memory budget, with 128
pixels of overlap, converted to latent pixels through the VAE's downsampling factor
2**(levels − 1): 128 latent px with 16 of overlap for SDXL's VAE) are decoded separately and
blended with linear ramps across each overlap, so memory stays bounded by one tile and no seam
shows. Tiling switches on by itself when a side of
the output reaches 2048 px or the estimated decoder activations exceed `memory_budget`.

This module is also the one place that loads an AutoencoderKL (`load_autoencoder`: a VAE folder
or a pipeline folder with vae/) and reads what the rest of the project needs from it
(`vae_info`: downsampling factor, latent channels, scaling and shift factors; `scale_latents`;
`vae_moments`: the posterior's mean and std, which the feature cache stores).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from pixsigma.errors import PixsigmaError

log = logging.getLogger(__name__)

TILE_AUTO_SIDE = 2048  # output pixels: decode tiled from this side length on
TILE_SIDES = (1024, 768, 512, 256)  # candidate tile sides in output pixels, largest first


class VAE:
    """Wraps an `AutoencoderKL`: `decode(latents) -> images in [0, 1]`, `encode(images) -> latents`.

    vae: an AutoencoderKL, or a VAE or pipeline folder (loaded by `load_autoencoder`).
    tile_size / tile_overlap: in output pixels (converted to latent pixels by the factor; tile_size
    None picks it from the memory budget), or give tile_latent / overlap_latent directly.
    memory_budget: bytes of decoder activations above which decoding is tiled.
    """

    def __init__(self, vae, device="cpu", dtype=torch.float32, tile_size: int | None = None, tile_overlap: int = 128,
                 tile_latent: int | None = None, overlap_latent: int | None = None, memory_budget: float = 3 * 2**30):
        from diffusers import AutoencoderKL

        if isinstance(vae, (str, Path)):
            vae = load_autoencoder(vae, dtype=dtype)
        if not isinstance(vae, AutoencoderKL):
            raise PixsigmaError(f"expected a diffusers AutoencoderKL or its folder, got {type(vae).__name__}")
        vae = vae.to(device)
        if vae.dtype != dtype:
            vae = vae.to(dtype)
        self.model = vae.eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        info = vae_info(vae)
        self.factor, self.latent_channels = info["factor"], info["latent_channels"]
        self.scaling_factor, self.shift_factor = info["scaling_factor"], info["shift_factor"]
        self.memory_budget = memory_budget
        if tile_latent is None:
            tile_size = tile_size or self.auto_tile_size()
            tile_latent = max(4, tile_size // self.factor)
        self.tile_latent = int(tile_latent)
        self.overlap_latent = int(overlap_latent if overlap_latent is not None else tile_overlap // self.factor)
        if not 0 <= self.overlap_latent < self.tile_latent:
            raise PixsigmaError(f"tile overlap {self.overlap_latent} must be in 0..{self.tile_latent - 1} latent pixels")

    @property
    def info(self) -> dict:
        """This VAE's latent convention, as `vae_info` gives it (and the feature cache stores it)."""
        return {"factor": self.factor, "latent_channels": self.latent_channels,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}

    # -- helpers ---------------------------------------------------------------------------------
    def activation_bytes(self, height: int, width: int, batch: int = 1) -> int:
        """Rough peak of the decoder at full resolution: a few tensors of the widest full-res width."""
        channels = self.model.config.block_out_channels[0]
        itemsize = torch.finfo(self.dtype).bits // 8
        return 4 * batch * channels * height * width * itemsize

    def auto_tile_size(self) -> int:
        """The largest tile side (output pixels) among 1024/768/512/256 whose decoder activations
        fit the memory budget: bigger tiles waste less work on overlaps."""
        for side in TILE_SIDES:
            if self.activation_bytes(side, side) <= self.memory_budget:
                return side
        return TILE_SIDES[-1]

    def should_tile(self, latent_h: int, latent_w: int) -> bool:
        h, w = latent_h * self.factor, latent_w * self.factor
        if max(h, w) >= TILE_AUTO_SIDE:
            return True
        return self.activation_bytes(h, w) > self.memory_budget

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z, return_dict=False)[0]

    # -- decode ----------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """(B, C, h, w) scaled latents → (B, 3, h·f, w·f) float32 images in [0, 1].

        tiled: None decides from the size (see module doc); True/False forces it.
        """
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise PixsigmaError(f"latents of shape {tuple(latents.shape)}; expected (B, {self.latent_channels}, h, w)")
        z = unscale_latents(latents.to(self.device, self.dtype), self.info)
        if tiled is None:
            tiled = self.should_tile(z.shape[-2], z.shape[-1])
        outs = []
        for i in range(z.shape[0]):  # one image at a time: peak memory of one image
            zi = z[i : i + 1]
            img = self.decode_tiled(zi) if tiled else self._decode_raw(zi).float()
            outs.append(img.mul_(0.5).add_(0.5).clamp_(0, 1))  # in place: one image buffer
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def tile_starts(self, length: int) -> list[int]:
        """Tile start offsets along one latent axis: stride tile − overlap, the last tile flush
        with the end (so it may overlap its neighbour more)."""
        t, o = self.tile_latent, self.overlap_latent
        if length <= t:
            return [0]
        n = math.ceil((length - o) / (t - o))
        starts = [min(i * (t - o), length - t) for i in range(n)]
        return sorted(set(starts))

    @staticmethod
    def _ramp(size: int, ramp_before: int, ramp_after: int, device) -> torch.Tensor:
        """1-D weights: rising linearly over the first `ramp_before` samples, falling over the last
        `ramp_after`, 1 in between; strictly positive."""
        w = torch.ones(size, device=device)
        if ramp_before > 0:
            w[:ramp_before] = torch.minimum(w[:ramp_before], (torch.arange(ramp_before, device=device) + 0.5) / ramp_before)
        if ramp_after > 0:
            w[size - ramp_after :] = torch.minimum(w[size - ramp_after :], (torch.arange(ramp_after, device=device).flip(0) + 0.5) / ramp_after)
        return w

    @torch.no_grad()
    def decode_tiled(self, z: torch.Tensor) -> torch.Tensor:
        """Decode unscaled latents (1, C, h, w) tile by tile → (1, 3, h·f, w·f) in [-1, 1]."""
        f, t = self.factor, self.tile_latent
        _, _, h, w = z.shape
        ys, xs = self.tile_starts(h), self.tile_starts(w)
        ramp = self.overlap_latent * f
        out = torch.zeros(z.shape[0], 3, h * f, w * f, device=z.device, dtype=torch.float32)
        weight = torch.zeros(h * f, w * f, device=z.device, dtype=torch.float32)
        log.debug("tiled VAE decode: %d×%d tiles of %d latent px (overlap %d)", len(ys), len(xs), t, self.overlap_latent)
        for y in ys:
            th = min(t, h - y)
            wy = self._ramp(th * f, ramp if y > 0 else 0, ramp if y + th < h else 0, z.device)
            for x in xs:
                tw = min(t, w - x)
                wx = self._ramp(tw * f, ramp if x > 0 else 0, ramp if x + tw < w else 0, z.device)
                tile = self._decode_raw(z[:, :, y : y + th, x : x + tw]).float()
                wgt = wy[:, None] * wx[None, :]
                out[:, :, y * f : (y + th) * f, x * f : (x + tw) * f] += tile * wgt
                weight[y * f : (y + th) * f, x * f : (x + tw) * f] += wgt
                del tile
        return out.div_(weight)

    # -- encode ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] → scaled latents (B, C, H/f, W/f) (posterior mean, or a
        sample with `sample=True`)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise PixsigmaError(f"images of shape {tuple(images.shape)}; expected (B, 3, H, W) in [0, 1]")
        if images.shape[-1] % self.factor or images.shape[-2] % self.factor:
            raise PixsigmaError(f"image size {images.shape[-2]}x{images.shape[-1]} is not a multiple of the VAE factor {self.factor}")
        x = images.to(self.device, self.dtype) * 2 - 1
        dist = self.model.encode(x).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        return scale_latents(z.float(), self.info)


# ---------------------------------------------------------------------------------------------
# Loading an AutoencoderKL and reading its latent convention
# ---------------------------------------------------------------------------------------------


def vae_folder(path) -> Path:
    """The AutoencoderKL folder for `path`: itself, or its vae/ when `path` is a pipeline folder."""
    path = Path(path)
    if (path / "vae").is_dir() and not (path / "config.json").is_file():
        path = path / "vae"
    return path


def load_autoencoder(folder, dtype=torch.float32, frozen: bool = False):
    """diffusers AutoencoderKL from a VAE folder (config.json + weights) or a pipeline folder with
    vae/, with one-line errors. frozen: eval mode with gradients off (encoding only); otherwise the
    parameters keep requires_grad so the caller may train it."""
    from diffusers import AutoencoderKL

    folder = vae_folder(folder)
    if not (folder / "config.json").is_file():
        raise PixsigmaError(f"{folder}: no config.json; expected a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)")
    if not any(folder.glob("diffusion_pytorch_model*")):
        raise PixsigmaError(f"{folder}: no diffusion_pytorch_model.safetensors beside config.json; expected a diffusers AutoencoderKL folder")
    try:
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PixsigmaError(f"{folder}: cannot load the VAE ({msg})") from None
    return vae.eval().requires_grad_(False) if frozen else vae


def autoencoder(vae):
    """The diffusers AutoencoderKL inside `vae` (a wrapper holding it as .vae/.model/.autoencoder,
    such as `VAE`, or the AutoencoderKL itself)."""
    for attr in ("vae", "model", "autoencoder"):
        inner = getattr(vae, attr, None)
        if inner is not None and hasattr(inner, "encode") and hasattr(inner, "config"):
            return inner
    if not (hasattr(vae, "encode") and hasattr(vae, "config")):
        raise PixsigmaError(f"{type(vae).__name__} is not a diffusers AutoencoderKL (or a wrapper holding one)")
    return vae


def config_info(config: Mapping) -> dict:
    """Factor, latent channels, scaling and shift factor from an AutoencoderKL config (a dict, as
    in config.json, or the model's `.config`); the factor is 2**(levels − 1), a missing
    shift_factor is 0 and a missing scaling_factor diffusers' default 0.18215."""
    shift = config.get("shift_factor")
    return {
        "factor": 2 ** (len(config["block_out_channels"]) - 1),
        "latent_channels": int(config["latent_channels"]),
        "scaling_factor": float(config.get("scaling_factor", 0.18215)),
        "shift_factor": float(shift) if shift is not None else 0.0,
    }


def vae_info(vae) -> dict:
    """`config_info` of the AutoencoderKL in `vae`; a wrapper's own `scaling_factor`, when set,
    takes precedence over the config's."""
    ae = autoencoder(vae)
    info = config_info(ae.config)
    own = getattr(vae, "scaling_factor", None) if ae is not vae else None
    if own:
        info["scaling_factor"] = float(own)
    return info


def scale_latents(z: torch.Tensor, info: Mapping) -> torch.Tensor:
    """Posterior latents → the scaled latents the transformer sees: (z − shift) × scaling."""
    return (z - info["shift_factor"]) * info["scaling_factor"]


def unscale_latents(z: torch.Tensor, info: Mapping) -> torch.Tensor:
    """Scaled latents → the posterior latents the decoder takes: z / scaling + shift."""
    return z / info["scaling_factor"] + info["shift_factor"]


@torch.no_grad()
def vae_moments(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled, float32) of images in [-1, 1], (B, 3, H, W)."""
    ae = autoencoder(vae)
    p = next(ae.parameters())
    dist = ae.encode(images.to(p.device, p.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()
