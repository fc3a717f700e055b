"""Offline features (`pixsigma extract`) and the two training data sources (raw / cached).

Cache layout (one folder per dataset × base resolution × VAE × text encoder):
- `meta.json`: format version, resolution, bin multiple, VAE (path, factor, channels, scaling and
  shift factors), text encoder path, caption length, dtype, sample count, dataset fingerprint,
  shard size.
- `shard-NNNNN.safetensors`: samples [N·shard_size, (N+1)·shard_size) of the dataset; tensors
  `{i}.mean`, `{i}.std` (the VAE posterior's mean and std, *unscaled*, at the sample's bin size)
  and `{i}.short`, `{i}.long` (text-encoder states of the valid caption tokens only), and
  `{i}.loss_mask` (1, h, w) when the sample has an object mask (its coverage of each latent cell);
  and `{i}.control` (C, h, w) when the sample has a control image (the VAE posterior mean of the
  control image, cropped as the picture, *unscaled*; see `load_control`);
  its metadata lists the indices present and those skipped (corrupt images).
- `STALE` (optional): written by `pixsigma adapt vae`; names the new VAE. Training refuses a stale
  cache.

Latents: the cache keeps the posterior mean and std, and training draws z = mean + std·ξ with ξ
from the training generator each time a sample is seen (so a cached run and a raw run with the
same generator see identical latents), then scales: (z − shift) · scaling_factor.

Shards are written atomically (`pixsigma.io`), so an interrupted extraction resumes by
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
from dataclasses import dataclass
from pathlib import Path

import torch

from pixsigma.data.buckets import assign_bins
from pixsigma.data.datasets import CaptionDataset, load_control, load_image, load_loss_mask, use_long_caption
from pixsigma.errors import PixsigmaError
from pixsigma.io import as_dtype, dtype_name, write_json, write_safetensors
from pixsigma.text import load_text_encoder
# VAE helpers live in pixsigma.vae; autoencoder and scale_latents are also imported from here by callers
from pixsigma.vae import autoencoder, load_autoencoder, scale_latents, vae_info, vae_moments  # noqa: F401

log = logging.getLogger(__name__)

CACHE_VERSION = 1
META = "meta.json"
STALE = "STALE"
# meta.json entries that must agree for an extraction to resume into an existing cache folder
RESUME_KEYS = ("version", "resolution", "multiple", "vae_info", "max_length", "num_samples", "fingerprint", "shard_size", "dtype")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


# ---------------------------------------------------------------------------------------------
# Encoders and caption tensors
# ---------------------------------------------------------------------------------------------


def load_vae(path):
    """A frozen (eval, no gradients) AutoencoderKL from a VAE folder or a pipeline folder with vae/:
    `pixsigma.vae.load_autoencoder(path, frozen=True)`."""
    return load_autoencoder(path, frozen=True)


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


def _meta(resolution: int, multiple: int, vae: dict, max_length: int, dtype, num_samples: int, fingerprint: str,
          shard_size: int, vae_path: str = "", text_encoder_path: str = "") -> dict:
    """The meta.json of a cache (see the module doc)."""
    return {"version": CACHE_VERSION, "resolution": int(resolution), "multiple": int(multiple), "vae": str(vae_path),
            "vae_info": dict(vae), "text_encoder": str(text_encoder_path), "max_length": int(max_length),
            "dtype": dtype_name(dtype), "num_samples": int(num_samples), "fingerprint": fingerprint, "shard_size": int(shard_size)}


def _write_meta(cache_dir: Path, meta: dict) -> None:
    write_json(cache_dir / META, meta, indent=1)


def _open_cache(cache_dir: Path, meta: dict) -> None:
    """Start a cache in `cache_dir` (write its meta.json) or, when one is there, check that it was
    built with the same settings so the extraction can resume into it."""
    meta_path = cache_dir / META
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        diff = [k for k in RESUME_KEYS if old.get(k) != meta[k]]
        if diff:
            raise PixsigmaError(f"{cache_dir}: holds a cache built with different {', '.join(diff)}; use a new cache folder")
    else:
        _write_meta(cache_dir, meta)
    if (cache_dir / STALE).is_file():
        raise PixsigmaError(f"{cache_dir}: marked stale ({(cache_dir / STALE).read_text().strip()}); extract into a new folder")


def _my_shards(num_samples: int, shard_size: int, start: int | None, end: int | None, rank: int, world_size: int) -> list[int]:
    """The shards of this process: first index in [start, end), and shard k mod world_size == rank."""
    lo, hi = (start or 0), (num_samples if end is None else end)
    return [k for k in range(math.ceil(num_samples / shard_size)) if lo <= k * shard_size < hi and k % world_size == rank]


def _write_shard(path: Path, tensors: dict, present: list[int], skipped: list[int]) -> None:
    write_safetensors(path, tensors, {"indices": json.dumps(sorted(present)), "skipped": json.dumps(sorted(skipped))})


@dataclass
class _ShardEncoder:
    """Encodes the samples of one shard: images grouped by aspect bin and batched through the VAE,
    their captions through the text encoder, and their loss masks; tensors stored in `store`."""

    dataset: CaptionDataset
    text_encoder: object
    vae: object
    bins: list[tuple[int, int]]
    max_length: int
    batch_size: int
    store: torch.dtype
    factor: int
    control_type: str | None = "none"  # None: no control latents; else load_control's kind

    def encode(self, indices) -> tuple[dict, list[int], list[int], int]:
        """(tensors, indices encoded, indices skipped as corrupt images, loss masks stored)."""
        tensors, present, skipped, masks = {}, [], [], 0
        by_bin: dict = {}
        for i in indices:
            by_bin.setdefault(self.bins[i], []).append(i)
        for (bh, bw), members in sorted(by_bin.items()):
            for b0 in range(0, len(members), self.batch_size):
                chunk, images = self._load_images(members[b0:b0 + self.batch_size], bh, bw, skipped)
                if not chunk:
                    continue
                tensors.update(self._features(chunk, torch.stack(images)))
                tensors.update(self._controls(chunk, bh, bw))
                present.extend(chunk)
                for i in chunk:
                    m = _try_loss_mask(self.dataset[i], bh, bw, self.factor)
                    if m is not None:
                        tensors[f"{i}.loss_mask"] = m.to(self.store).contiguous()
                        masks += 1
        return tensors, present, skipped, masks

    def _load_images(self, indices: list[int], height: int, width: int, skipped: list[int]) -> tuple[list[int], list]:
        """The readable images of `indices` at the bin size; unreadable ones are warned about and
        appended to `skipped`."""
        chunk, images = [], []
        for i in indices:
            try:
                images.append(load_image(self.dataset[i].path, height, width))
                chunk.append(i)
            except Exception as e:  # noqa: BLE001 - corrupt image: skipped, counted
                log.warning("skipping corrupt image %s (%s)", self.dataset[i].path, " ".join(str(e).split())[:120])
                skipped.append(i)
        return chunk, images

    def _controls(self, chunk: list[int], height: int, width: int) -> dict:
        """`{i}.control`: the VAE posterior mean of each sample's control image (those that have one)."""
        if self.control_type is None:
            return {}
        controls = {i: _try_control(self.dataset[i], height, width, self.control_type) for i in chunk}
        controls = {i: c for i, c in controls.items() if c is not None}
        if not controls:
            return {}
        mean, _ = vae_moments(self.vae, torch.stack(list(controls.values())))
        return {f"{i}.control": mean[j].to(self.store).contiguous() for j, i in enumerate(controls)}

    def _features(self, chunk: list[int], images: torch.Tensor) -> dict:
        """VAE posterior mean/std and the valid caption tokens (short, and long where there is one)."""
        mean, std = vae_moments(self.vae, images)
        emb, mask = self.text_encoder.encode([self.dataset[i].prompt for i in chunk], self.max_length)
        out = {}
        for j, i in enumerate(chunk):
            out[f"{i}.mean"] = mean[j].to(self.store).contiguous()
            out[f"{i}.std"] = std[j].to(self.store).contiguous()
            out[f"{i}.short"] = _valid_tokens(emb[j], mask[j]).cpu().to(self.store).contiguous()
        longs = [i for i in chunk if self.dataset[i].long_prompt]
        if longs:
            emb, mask = self.text_encoder.encode([self.dataset[i].long_prompt for i in longs], self.max_length)
            for j, i in enumerate(longs):
                out[f"{i}.long"] = _valid_tokens(emb[j], mask[j]).cpu().to(self.store).contiguous()
        return out


def extract_features(dataset: CaptionDataset, cache_dir, text_encoder, vae, resolution: int, max_length: int,
                     multiple: int | None = None, shard_size: int = 256, batch_size: int = 8,
                     start: int | None = None, end: int | None = None, rank: int = 0, world_size: int = 1,
                     dtype: str = "float32", vae_path: str = "", text_encoder_path: str = "",
                     control_type: str | None = "none") -> dict:
    """Encode `dataset` once into `cache_dir` (see the module doc); returns a summary dict.

    text_encoder: a `TextEncoder`; vae: an AutoencoderKL (or a wrapper holding one). multiple: the
    bin side multiple (default 2 × the VAE factor). Shards already on disk are skipped, so a rerun
    resumes; `start`/`end` and `rank`/`world_size` select this process's shards. control_type:
    how control latents are made (`load_control`'s kind; None stores none).
    """
    from tqdm import tqdm

    if shard_size < 1 or batch_size < 1:
        raise PixsigmaError(f"shard_size and batch_size must be positive, got {shard_size}, {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise PixsigmaError(f"rank {rank} is outside 0..{world_size - 1}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    info = vae_info(vae)
    multiple = multiple or 2 * info["factor"]
    _open_cache(cache_dir, _meta(resolution, multiple, info, max_length, dtype, len(dataset), dataset.fingerprint(),
                                 shard_size, vae_path, text_encoder_path))
    shards = _my_shards(len(dataset), shard_size, start, end, rank, world_size)
    todo = [k for k in shards if not (cache_dir / shard_name(k)).is_file()]
    bins = assign_bins([dataset.size_of(i) for i in range(len(dataset))], resolution, multiple)
    encoder = _ShardEncoder(dataset, text_encoder, vae, bins, max_length, batch_size, as_dtype(dtype), info["factor"], control_type)
    summary = Counter(shards_already_done=len(shards) - len(todo))
    for k in tqdm(todo, desc="extract", unit="shard", disable=not todo):
        tensors, present, skipped, masks = encoder.encode(range(k * shard_size, min((k + 1) * shard_size, len(dataset))))
        _write_shard(cache_dir / shard_name(k), tensors, present, skipped)
        if masks:
            summary["loss_masks"] += masks
        summary["shards_written"] += 1
        summary["samples"] += len(present)
        summary["corrupt_images_skipped"] += len(skipped)
    summary = dict(summary)
    log.info("extract %s: %s", cache_dir, ", ".join(f"{k} {v}" for k, v in summary.items()) or "nothing to do")
    return summary


def write_cache(cache_dir, samples: list[dict], resolution: int, vae: dict, max_length: int, shard_size: int = 256,
                dtype: str = "float32", fingerprint: str = "synthetic") -> Path:
    """A cache from ready tensors: samples[i] = {mean, std (C, h, w), short (n, C'), long (m, C') or None,
    optionally loss_mask (1, h, w) and control (C, h, w)}.

    For tests and benchmarks (no images, encoders or VAE involved); `vae` is a `vae_info` dict.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    store = as_dtype(dtype)
    meta = _meta(resolution, 2 * int(vae["factor"]), vae, max_length, dtype, len(samples), fingerprint, shard_size)
    for k in range(math.ceil(len(samples) / shard_size)):
        tensors, idx = {}, list(range(k * shard_size, min((k + 1) * shard_size, len(samples))))
        for i in idx:
            for key in ("mean", "std", "short", "long", "loss_mask", "control"):
                if samples[i].get(key) is not None:
                    tensors[f"{i}.{key}"] = samples[i][key].to(store).contiguous()
        _write_shard(cache_dir / shard_name(k), tensors, idx, [])
    _write_meta(cache_dir, meta)
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
        self.controlled = 0  # samples with a control latent
        for k in range(n_shards):
            with safe_open(str(self.dir / shard_name(k)), framework="pt") as f:
                md = f.metadata() or {}
                self.masked += sum(key.endswith(".loss_mask") for key in f.keys())
                self.controlled += sum(key.endswith(".control") for key in f.keys())
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

        Samples are read one tensor at a time: a shuffled batch touches most shards, so loading
        whole shards would read far more than the batch needs.
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
        return {"mean": read("mean"), "std": read("std"), "short": read("short"), "long": read("long"), "loss_mask": read("loss_mask"),
                "control": read("control")}


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


def _try_control(sample, height: int, width: int, kind: str) -> torch.Tensor | None:
    """The sample's control image (`load_control`), or None (none; an unreadable one is warned about)."""
    try:
        return load_control(sample, height, width, kind)
    except Exception as e:  # noqa: BLE001 - a bad control image: that sample trains as if its control were dropped
        log.warning("unreadable control image of %s (%s): that sample has no control", sample.path, " ".join(str(e).split())[:120])
        return None


def _stack_controls(controls: list) -> torch.Tensor | None:
    """(B, C, h, w) control latents, zeros for samples without one; None when none has one."""
    if all(c is None for c in controls):
        return None
    like = next(c for c in controls if c is not None)
    return torch.stack([torch.zeros_like(like, dtype=torch.float32) if c is None else c.float() for c in controls])


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
        self.controlled = cache.controlled

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
                "loss_mask": _stack_loss_masks([d["loss_mask"] for d in items], mean),
                "control": _stack_controls([d["control"] for d in items])}


class RawSource:
    """Training batches encoded on the fly: image → VAE posterior, caption → text encoder."""

    def __init__(self, dataset: CaptionDataset, text_encoder, vae, resolution: int, multiple: int, caption_length: int,
                 long_caption_ratio: float, seed: int, loss_masks: bool = True, control_type: str | None = None):
        self.dataset, self.text_encoder, self.vae_model = dataset, text_encoder, vae
        self.loss_masks = loss_masks  # False: skip reading mask files (a plain loss needs none)
        self.control_type = control_type  # None: no control latents (only ControlNet training reads them)
        self.vae = vae_info(vae)
        self.caption_length = caption_length
        self.ratio, self.seed = long_caption_ratio, seed
        self.bins = assign_bins([dataset.size_of(i) for i in range(len(dataset))], resolution, multiple)
        self.factor = self.vae["factor"]
        self.masked = sum(s.loss_mask is not None for s in dataset.samples)
        self.controlled = 0 if control_type is None else sum(s.control is not None or control_type != "none" for s in dataset.samples)

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
        return {"mean": mean.cpu(), "std": std.cpu(), "caption": emb, "mask": mask, "loss_mask": _stack_loss_masks(masks, mean),
                "control": self._controls(positions)}

    def _controls(self, positions: list[int]) -> torch.Tensor | None:
        """(B, C, h, w) unscaled posterior means of the control images (zeros where a sample has none), or None."""
        if self.control_type is None:
            return None
        controls = [_try_control(self.dataset[i], *self.bins[i], self.control_type) for i in positions]
        present = [c for c in controls if c is not None]
        if not present:
            return None
        means = iter(vae_moments(self.vae_model, torch.stack(present))[0].cpu())
        return _stack_controls([None if c is None else next(means) for c in controls])


# ---------------------------------------------------------------------------------------------
# `pixsigma extract`
# ---------------------------------------------------------------------------------------------


def extract(dataset, cache_dir, vae, text_encoder, resolution: int, max_length: int = 300, *, layout: str = "auto",
            long_caption_key: str = "sharegpt4v", max_aspect_ratio: float = 4.0, image_root=None, patch_size: int = 2,
            shard_size: int = 256, batch_size: int = 8, start: int | None = None, end: int | None = None,
            rank: int | None = None, world_size: int | None = None, dtype: str = "float32", device=None,
            control_type: str | None = "none") -> dict:
    """`pixsigma extract`: load the dataset and both encoders from their paths, then `extract_features`.

    dataset: data_info.json (or its folder), an image folder with .txt captions, or a .jsonl file
    (read with layout / long_caption_key / max_aspect_ratio / image_root as `CaptionDataset`).
    vae / text_encoder: their folders, or a pipeline folder with vae/, text_encoder/ and tokenizer/.
    patch_size: the transformer's patch; bins are multiples of patch × VAE factor pixels.
    rank / world_size: this process's share of the shards (default $RANK / $WORLD_SIZE, else 0 / 1).
    device: where the encoders run (default cuda when available). control_type: how the control
    latents of a ControlNet dataset are made (`extract_features`). Returns the summary dict.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = CaptionDataset(dataset, layout, long_caption_key, max_aspect_ratio, image_root)
    ae = load_vae(vae).to(device)
    text = load_text_encoder(text_encoder, max_length, device=device)
    return extract_features(data, cache_dir, text, ae, int(resolution), max_length, multiple=patch_size * vae_info(ae)["factor"],
                            shard_size=shard_size, batch_size=batch_size, start=start, end=end, rank=rank,
                            world_size=world_size, dtype=dtype, vae_path=str(vae), text_encoder_path=str(text_encoder),
                            control_type=control_type)
