"""Offline features (`pixsigma extract`) and the two training data sources (raw / cached).

Cache layout (one folder per dataset × base resolution × VAE × text encoder):
- `meta.json`: format version, resolution, bin multiple, VAE (path, factor, channels, scaling and
  shift factors), text encoder path, caption length, dtype, sample count, dataset fingerprint,
  shard size.
- `shard-NNNNN.safetensors`: samples [N·shard_size, (N+1)·shard_size) of the dataset; tensors
  `{i}.mean`, `{i}.std` (the VAE posterior's mean and std, *unscaled*, at the sample's bin size)
  and `{i}.short`, `{i}.long` (text-encoder states of the valid caption tokens only), and
  `{i}.loss_mask` (1, h, w) when the sample has an object mask (its coverage of each latent cell);
  its metadata lists the indices present and those skipped (corrupt images).
- `STALE` (optional): written by `pixsigma adapt vae`; names the new VAE. Training refuses a stale
  cache.

Latents: the cache keeps the posterior mean and std, and training draws z = mean + std·ξ with ξ
from the training generator each time a sample is seen (so a cached run and a raw run with the
same generator see identical latents), then scales: (z − shift) · scaling_factor.

Shards are written atomically (temp + os.replace), so an interrupted extraction resumes by
skipping the shards that exist; several processes split the work by shard (`rank/world_size`:
shard k goes to rank k mod world_size) or by index range (`start/end`: the shards whose first
index lies in [start, end)).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter, OrderedDict
from pathlib import Path

import torch

from pixsigma.data.buckets import assign_bins
from pixsigma.data.datasets import CaptionDataset, load_image, load_loss_mask, use_long_caption
from pixsigma.errors import PixsigmaError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
META = "meta.json"
STALE = "STALE"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PixsigmaError(f"cache dtype {name!r} is unknown; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


# ---------------------------------------------------------------------------------------------
# VAE and text encoder access
# ---------------------------------------------------------------------------------------------


def autoencoder(vae):
    """The diffusers AutoencoderKL inside `vae` (a wrapper holding it as .vae/.model, or itself)."""
    for attr in ("vae", "model", "autoencoder"):
        inner = getattr(vae, attr, None)
        if inner is not None and hasattr(inner, "encode") and hasattr(inner, "config"):
            return inner
    if not (hasattr(vae, "encode") and hasattr(vae, "config")):
        raise PixsigmaError(f"{type(vae).__name__} is not a diffusers AutoencoderKL (or a wrapper holding one)")
    return vae


def vae_info(vae) -> dict:
    ae = autoencoder(vae)
    cfg = ae.config
    return {
        "factor": 2 ** (len(cfg.block_out_channels) - 1),
        "latent_channels": int(cfg.latent_channels),
        "scaling_factor": float((getattr(vae, "scaling_factor", None) if ae is not vae else None) or cfg.scaling_factor),
        "shift_factor": float(getattr(cfg, "shift_factor", None) or 0.0),
    }


@torch.no_grad()
def vae_moments(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled, float32) of images in [-1, 1], (B, 3, H, W)."""
    ae = autoencoder(vae)
    p = next(ae.parameters())
    dist = ae.encode(images.to(p.device, p.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def scale_latents(z: torch.Tensor, info: dict) -> torch.Tensor:
    return (z - info["shift_factor"]) * info["scaling_factor"]


def load_vae(path):
    """A diffusers AutoencoderKL from a VAE folder or a pipeline folder with vae/."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if (path / "vae").is_dir() and not (path / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise PixsigmaError(f"{path}: not a VAE folder (no config.json); expected a diffusers AutoencoderKL folder")
    try:
        return AutoencoderKL.from_pretrained(str(path)).eval().requires_grad_(False)
    except (OSError, ValueError) as e:
        raise PixsigmaError(f"{path}: cannot load the VAE ({' '.join(str(e).split())[:200]})") from None


def load_text_encoder(path, max_length: int | None = None):
    """pixsigma.text.TextEncoder from an encoder folder or a pipeline folder (text_encoder/ + tokenizer/)."""
    from pixsigma.text import TextEncoder

    path = Path(path)
    if (path / "text_encoder").is_dir():
        tok = path / "tokenizer" if (path / "tokenizer").is_dir() else path / "text_encoder"
        return TextEncoder(path / "text_encoder", tok, max_length=max_length)
    return TextEncoder(path, max_length=max_length)


def _valid_tokens(emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return emb[mask.bool()]


def pad_captions(captions: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid-token embeddings (n_i, C) → zero-padded (B, length, C) and mask (B, length)."""
    c = captions[0].shape[-1]
    emb = torch.zeros(len(captions), length, c, dtype=torch.float32)
    mask = torch.zeros(len(captions), length, dtype=torch.long)
    for i, e in enumerate(captions):
        n = min(length, e.shape[0])
        emb[i, :n] = e[:n].float()
        mask[i, :n] = 1
    return emb, mask


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def extract_features(dataset: CaptionDataset, cache_dir, text_encoder, vae, resolution: int, max_length: int,
                     multiple: int | None = None, shard_size: int = 256, batch_size: int = 8,
                     start: int | None = None, end: int | None = None, rank: int = 0, world_size: int = 1,
                     dtype: str = "float32", vae_path: str = "", text_encoder_path: str = "") -> dict:
    """Encode `dataset` once into `cache_dir` (see the module doc); returns a summary dict."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if shard_size < 1 or batch_size < 1:
        raise PixsigmaError(f"shard_size and batch_size must be positive, got {shard_size}, {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise PixsigmaError(f"rank {rank} is outside 0..{world_size - 1}")
    store = _dtype(dtype)
    info = vae_info(vae)
    multiple = multiple or 2 * info["factor"]
    meta = {
        "version": CACHE_VERSION, "resolution": int(resolution), "multiple": int(multiple), "vae": str(vae_path),
        "vae_info": info, "text_encoder": str(text_encoder_path), "max_length": int(max_length), "dtype": dtype,
        "num_samples": len(dataset), "fingerprint": dataset.fingerprint(), "shard_size": int(shard_size),
    }
    meta_path = cache_dir / META
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        diff = [k for k in ("version", "resolution", "multiple", "vae_info", "max_length", "num_samples", "fingerprint", "shard_size", "dtype")
                if old.get(k) != meta[k]]
        if diff:
            raise PixsigmaError(f"{cache_dir}: holds a cache built with different {', '.join(diff)}; use a new cache folder")
    else:
        _write_json_atomic(meta_path, meta)
    if (cache_dir / STALE).is_file():
        raise PixsigmaError(f"{cache_dir}: marked stale ({(cache_dir / STALE).read_text().strip()}); extract into a new folder")

    n_shards = math.ceil(len(dataset) / shard_size)
    lo, hi = (start or 0), (len(dataset) if end is None else end)
    shards = [k for k in range(n_shards) if lo <= k * shard_size < hi and k % world_size == rank]
    bins = assign_bins([dataset.size_of(i) for i in range(len(dataset))], resolution, multiple)
    summary = Counter()
    todo = [k for k in shards if not (cache_dir / shard_name(k)).is_file()]
    summary["shards_already_done"] = len(shards) - len(todo)
    for k in tqdm(todo, desc="extract", unit="shard", disable=not todo):
        idx = list(range(k * shard_size, min((k + 1) * shard_size, len(dataset))))
        tensors, present, skipped = {}, [], []
        by_bin: dict = {}
        for i in idx:
            by_bin.setdefault(bins[i], []).append(i)
        for (bh, bw), members in sorted(by_bin.items()):
            for b0 in range(0, len(members), batch_size):
                chunk, images = [], []
                for i in members[b0:b0 + batch_size]:
                    try:
                        images.append(load_image(dataset[i].path, bh, bw))
                        chunk.append(i)
                    except Exception as e:  # noqa: BLE001 - corrupt image: skipped, counted
                        log.warning("skipping corrupt image %s (%s)", dataset[i].path, " ".join(str(e).split())[:120])
                        skipped.append(i)
                if not chunk:
                    continue
                mean, std = vae_moments(vae, torch.stack(images))
                shorts = [dataset[i].prompt for i in chunk]
                longs = [dataset[i].long_prompt for i in chunk]
                emb_s, mask_s = text_encoder.encode(shorts, max_length)
                long_pos = [j for j, t in enumerate(longs) if t]
                if long_pos:
                    emb_l, mask_l = text_encoder.encode([longs[j] for j in long_pos], max_length)
                for j, i in enumerate(chunk):
                    tensors[f"{i}.mean"] = mean[j].to(store).contiguous()
                    tensors[f"{i}.std"] = std[j].to(store).contiguous()
                    tensors[f"{i}.short"] = _valid_tokens(emb_s[j], mask_s[j]).cpu().to(store).contiguous()
                    present.append(i)
                for jj, j in enumerate(long_pos):
                    tensors[f"{chunk[j]}.long"] = _valid_tokens(emb_l[jj], mask_l[jj]).cpu().to(store).contiguous()
                for i in chunk:
                    m = _try_loss_mask(dataset[i], bh, bw, info["factor"])
                    if m is not None:
                        tensors[f"{i}.loss_mask"] = m.to(store).contiguous()
                        summary["loss_masks"] += 1
        path = cache_dir / shard_name(k)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"indices": json.dumps(sorted(present)), "skipped": json.dumps(sorted(skipped))})
        os.replace(tmp, path)
        summary["shards_written"] += 1
        summary["samples"] += len(present)
        summary["corrupt_images_skipped"] += len(skipped)
    summary = dict(summary)
    log.info("extract %s: %s", cache_dir, ", ".join(f"{k} {v}" for k, v in summary.items()) or "nothing to do")
    return summary


def write_cache(cache_dir, samples: list[dict], resolution: int, vae: dict, max_length: int, shard_size: int = 256,
                dtype: str = "float32", fingerprint: str = "synthetic") -> Path:
    """A cache from ready tensors: samples[i] = {mean, std (C, h, w), short (n, C'), long (m, C') or None,
    optionally loss_mask (1, h, w)}.

    For tests and benchmarks (no images, encoders or VAE involved); `vae` is a `vae_info` dict.
    """
    from safetensors.torch import save_file

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    store = _dtype(dtype)
    meta = {"version": CACHE_VERSION, "resolution": int(resolution), "multiple": 2 * int(vae["factor"]), "vae": "",
            "vae_info": dict(vae), "text_encoder": "", "max_length": int(max_length), "dtype": dtype,
            "num_samples": len(samples), "fingerprint": fingerprint, "shard_size": int(shard_size)}
    for k in range(math.ceil(len(samples) / shard_size)):
        tensors, idx = {}, list(range(k * shard_size, min((k + 1) * shard_size, len(samples))))
        for i in idx:
            s = samples[i]
            for key in ("mean", "std", "short", "long", "loss_mask"):
                if s.get(key) is not None:
                    tensors[f"{i}.{key}"] = s[key].to(store).contiguous()
        path = cache_dir / shard_name(k)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"indices": json.dumps(idx), "skipped": "[]"})
        os.replace(tmp, path)
    _write_json_atomic(cache_dir / META, meta)
    return cache_dir


# ---------------------------------------------------------------------------------------------
# Reading the cache
# ---------------------------------------------------------------------------------------------


def check_not_stale(cache_dir) -> None:
    stale = Path(cache_dir) / STALE
    if stale.is_file():
        raise PixsigmaError(f"{cache_dir}: the feature cache is stale ({' '.join(stale.read_text().split())}); "
                            "re-run pixsigma extract into a new folder for the new VAE")


def is_cache(cache_dir) -> bool:
    return cache_dir is not None and (Path(cache_dir) / META).is_file()


class FeatureCache:
    """Random access to a complete cache; `index` lists the dataset indices present."""

    def __init__(self, cache_dir, max_open: int = 64):
        from safetensors import safe_open

        self.dir = Path(cache_dir)
        if not (self.dir / META).is_file():
            raise PixsigmaError(f"{self.dir}: no feature cache here ({META} missing); run pixsigma extract first")
        check_not_stale(self.dir)
        self.meta = json.loads((self.dir / META).read_text())
        if self.meta.get("version") != CACHE_VERSION:
            raise PixsigmaError(f"{self.dir}: cache format {self.meta.get('version')} is not {CACHE_VERSION}; re-extract")
        n_shards = math.ceil(self.meta["num_samples"] / self.meta["shard_size"])
        missing = [k for k in range(n_shards) if not (self.dir / shard_name(k)).is_file()]
        if missing:
            raise PixsigmaError(f"{self.dir}: cache incomplete, {len(missing)} of {n_shards} shards missing "
                                f"(first {shard_name(missing[0])}); finish pixsigma extract")
        self.index: list[int] = []
        self.shape: dict[int, tuple[int, int]] = {}
        self.skipped = 0
        self.masked = 0  # samples with a loss mask
        for k in range(n_shards):
            with safe_open(str(self.dir / shard_name(k)), framework="pt") as f:
                md = f.metadata() or {}
                self.masked += sum(key.endswith(".loss_mask") for key in f.keys())
                present = json.loads(md.get("indices", "[]"))
                self.skipped += len(json.loads(md.get("skipped", "[]")))
                for i in present:
                    self.shape[i] = tuple(f.get_slice(f"{i}.mean").get_shape()[-2:])
                self.index.extend(present)
        self.index.sort()
        self._open: OrderedDict = OrderedDict()
        self._max_open = max_open
        if self.skipped:
            log.warning("feature cache %s: %d corrupt image(s) were skipped at extraction", self.dir, self.skipped)

    @property
    def vae(self) -> dict:
        return self.meta["vae_info"]

    def _shard(self, i: int):
        """An open (memory-mapped) handle on the shard holding sample i and the set of its keys.

        Samples are read one tensor at a time: a shuffled batch touches most shards, and loading
        whole shards (26 MB each in the toy cache) cost 40% of a toy training step.
        """
        from safetensors import safe_open

        k = i // self.meta["shard_size"]
        if k not in self._open:
            f = safe_open(str(self.dir / shard_name(k)), framework="pt")
            self._open[k] = (f, set(f.keys()))
            while len(self._open) > self._max_open:
                self._open.popitem(last=False)
        self._open.move_to_end(k)
        return self._open[k]

    def get(self, i: int) -> dict:
        f, keys = self._shard(i)
        read = lambda name: f.get_tensor(f"{i}.{name}") if f"{i}.{name}" in keys else None  # noqa: E731
        return {"mean": read("mean"), "std": read("std"), "short": read("short"), "long": read("long"), "loss_mask": read("loss_mask")}


# ---------------------------------------------------------------------------------------------
# Training sources: both return the same batch dict for the same samples
# ---------------------------------------------------------------------------------------------


def _try_loss_mask(sample, height: int, width: int, factor: int) -> torch.Tensor | None:
    """The sample's loss mask on the latent grid, or None (no mask; an unreadable one is warned about)."""
    if sample.loss_mask is None:
        return None
    try:
        return load_loss_mask(sample.loss_mask, height, width, factor)
    except Exception as e:  # noqa: BLE001 - a bad mask only loses the weighting of its sample
        log.warning("unreadable loss mask %s (%s): that sample trains unweighted", sample.loss_mask, " ".join(str(e).split())[:120])
        return None


def _stack_loss_masks(masks: list, latents: torch.Tensor) -> torch.Tensor | None:
    """(B, 1, h, w) masks, zeros (no weighting) for samples without one; None when none has one."""
    if all(m is None for m in masks):
        return None
    zero = torch.zeros(1, *latents.shape[-2:])
    return torch.stack([zero if m is None else m.float() for m in masks])


class CachedSource:
    """Training batches from a feature cache (no text encoder, no VAE)."""

    def __init__(self, cache: FeatureCache, caption_length: int, long_caption_ratio: float, seed: int):
        self.cache = cache
        self.caption_length = caption_length
        self.ratio, self.seed = long_caption_ratio, seed
        self.vae = cache.vae
        self.masked = cache.masked

    def __len__(self) -> int:
        return len(self.cache.index)

    def buckets(self) -> list[tuple[int, int]]:
        """Latent (h, w) of each position 0..len-1."""
        return [self.cache.shape[i] for i in self.cache.index]

    def fetch(self, positions: list[int], epoch: int) -> dict:
        items, captions = [], []
        for p in positions:
            i = self.cache.index[p]
            d = self.cache.get(i)
            items.append(d)
            use_long = d["long"] is not None and use_long_caption(self.seed, epoch, i, self.ratio)
            captions.append(d["long"] if use_long else d["short"])
        emb, mask = pad_captions(captions, self.caption_length)
        mean = torch.stack([d["mean"].float() for d in items])
        return {"mean": mean, "std": torch.stack([d["std"].float() for d in items]), "caption": emb, "mask": mask,
                "loss_mask": _stack_loss_masks([d["loss_mask"] for d in items], mean)}


class RawSource:
    """Training batches encoded on the fly: image → VAE posterior, caption → text encoder."""

    def __init__(self, dataset: CaptionDataset, text_encoder, vae, resolution: int, multiple: int, caption_length: int,
                 long_caption_ratio: float, seed: int, loss_masks: bool = True):
        self.dataset, self.text_encoder, self.vae_model = dataset, text_encoder, vae
        self.loss_masks = loss_masks  # False: skip reading mask files (a plain loss needs none)
        self.vae = vae_info(vae)
        self.caption_length = caption_length
        self.ratio, self.seed = long_caption_ratio, seed
        self.bins = assign_bins([dataset.size_of(i) for i in range(len(dataset))], resolution, multiple)
        self.factor = self.vae["factor"]
        self.masked = sum(s.loss_mask is not None for s in dataset.samples)

    def __len__(self) -> int:
        return len(self.dataset)

    def buckets(self) -> list[tuple[int, int]]:
        return [(h // self.factor, w // self.factor) for h, w in self.bins]

    def fetch(self, positions: list[int], epoch: int) -> dict:
        images, prompts, masks = [], [], []
        for i in positions:
            s = self.dataset[i]
            h, w = self.bins[i]
            masks.append(_try_loss_mask(s, h, w, self.factor) if self.loss_masks else None)
            try:
                images.append(load_image(s.path, h, w))
            except Exception as e:  # noqa: BLE001 - keep the batch shape: a black image, with a warning
                log.warning("corrupt image %s (%s): using a blank image", s.path, " ".join(str(e).split())[:120])
                images.append(torch.zeros(3, h, w))
            use_long = s.long_prompt is not None and use_long_caption(self.seed, epoch, i, self.ratio)
            prompts.append(s.long_prompt if use_long else s.prompt)
        mean, std = vae_moments(self.vae_model, torch.stack(images))
        emb, mask = self.text_encoder.encode(prompts, self.caption_length)
        valid = [_valid_tokens(e.cpu(), m.cpu()) for e, m in zip(emb, mask)]
        emb, mask = pad_captions(valid, self.caption_length)
        return {"mean": mean.cpu(), "std": std.cpu(), "caption": emb, "mask": mask, "loss_mask": _stack_loss_masks(masks, mean)}


# ---------------------------------------------------------------------------------------------
# `pixsigma extract`
# ---------------------------------------------------------------------------------------------


def run_extract(args) -> dict:
    """The CLI command: options from the arguments, unset ones from `--config` (data / model)."""
    d, tokens = {}, None
    if args.config:
        from pixsigma.train.config import load_config

        cfg = load_config(args.config)
        d = vars(cfg.data)
        if "max_caption_tokens" in cfg.model.overrides:
            tokens = int(cfg.model.overrides["max_caption_tokens"])
        elif cfg.model.init_from:
            from pixsigma.model.checkpoint import read_checkpoint

            tokens = read_checkpoint(cfg.model.init_from)[1].max_caption_tokens
        else:
            from pixsigma.model import SMALL, TINY, XL_2

            tokens = {"tiny": TINY, "small": SMALL, "xl_2": XL_2}[cfg.model.preset].max_caption_tokens
    dataset_path = args.dataset or d.get("path")
    cache_dir = args.cache or d.get("cache_dir")
    vae_path = args.vae or d.get("vae")
    te_path = args.text_encoder or d.get("text_encoder")
    resolution = args.resolution or d.get("resolution")
    for name, value in (("dataset", dataset_path), ("--cache", cache_dir), ("--vae", vae_path), ("--text-encoder", te_path),
                        ("--resolution", resolution)):
        if not value:
            raise PixsigmaError(f"extract needs {name} (give it, or a --config that sets it)")
    max_tokens = args.max_tokens or tokens or 300
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dataset = CaptionDataset(dataset_path, args.layout or d.get("layout", "auto"),
                             args.long_caption_key or d.get("long_caption_key", "sharegpt4v"),
                             d.get("max_aspect_ratio", 4.0), d.get("image_root"))
    vae = load_vae(vae_path).to(device)
    text_encoder = load_text_encoder(te_path, max_tokens)
    if hasattr(text_encoder, "model"):
        text_encoder.model.to(device)
        text_encoder.device = torch.device(device)
    multiple = args.patch_size * vae_info(vae)["factor"]
    return extract_features(dataset, cache_dir, text_encoder, vae, int(resolution), max_tokens, multiple=multiple,
                            shard_size=args.shard_size, batch_size=args.batch_size, start=args.start, end=args.end,
                            rank=rank, world_size=world, dtype=args.dtype, vae_path=str(vae_path), text_encoder_path=str(te_path))
