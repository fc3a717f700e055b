"""Weak-to-strong transitions (`pixsigma adapt ...`): each reads a transformer checkpoint (any
layout `load_transformer` reads), changes it, and writes a pixsigma .safetensors that
`load_transformer` and `train` (`model.init_from`) accept. What was done is appended to the
model's history (saved in the file's metadata) with the details below.

1. vae: keep the transformer; record the new VAE (path, scaling/shift factor, downsampling
   factor) and mark feature caches built with the old VAE stale (a `STALE` file naming the new
   VAE; training refuses such a cache).
2. resolution: new base resolution → sample_size = resolution / VAE factor and pe_interpolation
   (default: scaled with the size, i.e. resolution / 512 for the released models); the new
   aspect-ratio bins are stored in the metadata (`pixsigma_bins`).
3. kv-compress: KV compression on chosen layers (default the deep half), operator conv / ave /
   uniform, ratio R (default conv, R = 2, Conv Avg Init).
4. tokens: caption length (e.g. 120 → 300).
5. depth: more blocks, inserted as identities (not a transition of the paper: a way to give a
   trained small model more capacity without starting over).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pixsigma.data.buckets import aspect_bins
from pixsigma.data.cache import META, STALE
from pixsigma.errors import PixsigmaError
from pixsigma.io import write_text
from pixsigma.model.checkpoint import load_transformer, save_safetensors
from pixsigma.model.transformer import deep_half
from pixsigma.model.transitions import add_kv_compression, change_caption_tokens, change_resolution, grow_depth
from pixsigma.vae import config_info, vae_folder

log = logging.getLogger(__name__)


def _load(src):
    return load_transformer(src)


def _save(model, dst, extra: dict | None = None) -> Path:
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise PixsigmaError(f"{dst}: the adapted checkpoint is a pixsigma .safetensors file; name it *.safetensors")
    meta = {"pixsigma_adapt": json.dumps(model.history[-1])}
    meta.update(extra or {})
    save_safetensors(model, dst, meta)
    log.info("wrote %s (%s)", dst, model.history[-1].get("action"))
    return dst


def vae_factor_of(model, default: int = 8) -> int:
    """The VAE downsampling factor recorded by the last `adapt vae`, else `default`."""
    for h in reversed(getattr(model, "history", [])):
        if h.get("action") == "vae" and h.get("factor"):
            return int(h["factor"])
    return default


def read_vae_config(path) -> dict:
    """Scaling/shift factor, latent channels and downsampling factor from a VAE folder's config.json."""
    path = vae_folder(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise PixsigmaError(f"{path}: not a VAE folder (no config.json); expected a diffusers AutoencoderKL folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise PixsigmaError(f"{cfg_file}: not valid JSON ({e})") from None
    if "latent_channels" not in cfg or "block_out_channels" not in cfg:
        raise PixsigmaError(f"{cfg_file}: not an AutoencoderKL config (no latent_channels / block_out_channels)")
    info = config_info(cfg)
    # key order kept: the dict lands in checkpoint history and cache metadata as JSON
    return {"vae": str(path.resolve()), **{k: info[k] for k in ("scaling_factor", "shift_factor", "latent_channels", "factor")}}


def adapt_vae(src, dst, vae, caches=()) -> Path:
    model = _load(src)
    info = read_vae_config(vae)
    if info["latent_channels"] != model.config.in_channels:
        raise PixsigmaError(f"{vae}: the VAE has {info['latent_channels']} latent channels but the transformer takes "
                            f"{model.config.in_channels}")
    model.history = list(model.history) + [{"action": "vae", **info}]
    out = _save(model, dst, {"pixsigma_vae": json.dumps(info)})
    for cache in caches:
        mark_stale(cache, f"VAE changed to {info['vae']} (scaling factor {info['scaling_factor']:g}) by pixsigma adapt vae")
    return out


def mark_stale(cache_dir, reason: str) -> Path:
    """Write the cache's STALE file (`reason`): training then refuses the cache."""
    cache_dir = Path(cache_dir)
    if not (cache_dir / META).is_file():
        raise PixsigmaError(f"{cache_dir}: not a feature cache (no {META})")
    path = write_text(cache_dir / STALE, reason + "\n")
    log.info("marked %s stale", cache_dir)
    return path


def adapt_resolution(src, dst, resolution: int, pe_interpolation: float | None = None, vae_factor: int | None = None) -> Path:
    model = _load(src)
    factor = vae_factor or vae_factor_of(model)
    if resolution <= 0 or resolution % (factor * model.config.patch_size):
        raise PixsigmaError(f"resolution {resolution} must be a positive multiple of {factor * model.config.patch_size} "
                            f"(VAE factor {factor} × patch {model.config.patch_size})")
    new = change_resolution(model, resolution // factor, pe_interpolation)
    bins = aspect_bins(resolution, factor * model.config.patch_size)
    new.history[-1].update({"resolution": resolution, "vae_factor": factor, "num_bins": len(set(bins.values()))})
    return _save(new, dst, {"pixsigma_resolution": str(resolution), "pixsigma_bins": json.dumps(bins)})


def parse_layers(text: str | None, depth: int):
    """'deep' / None → the deep half; 'all'; '14-27'; '3,5,7' (0-based block indices)."""
    if text is None or text == "deep":
        return deep_half(depth)
    if text == "all":
        return tuple(range(depth))
    layers = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-")
                layers.extend(range(int(a), int(b) + 1))
            elif part:
                layers.append(int(part))
    except ValueError:
        raise PixsigmaError(f"layers {text!r}: expected 'deep', 'all', a range like 14-27 or a list like 3,5,7") from None
    bad = [i for i in layers if not 0 <= i < depth]
    if bad or not layers:
        raise PixsigmaError(f"layers {text!r}: indices must lie in 0..{depth - 1}")
    return tuple(sorted(set(layers)))


def adapt_kv_compress(src, dst, layers=None, operator: str = "conv", ratio: int = 2) -> Path:
    model = _load(src)
    if isinstance(layers, str) or layers is None:
        layers = parse_layers(layers, model.config.depth)
    return _save(add_kv_compression(model, layers=layers, operator=operator, ratio=ratio), dst)


def adapt_tokens(src, dst, tokens: int) -> Path:
    return _save(change_caption_tokens(_load(src), tokens), dst)


def adapt_depth(src, dst, add: int, at: int | None = None) -> Path:
    return _save(grow_depth(_load(src), add, at), dst)
