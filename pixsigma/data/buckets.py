"""Multi-aspect buckets and the batch sampler that keeps every batch inside one bucket.

Bins: for a base resolution in `assets/aspect_ratios.json` (256, 512, 1024, 2048, 2880, 4096) the
released table; for any other resolution (the toy 32px / 64px stages) the closest table scaled
by resolution / table size, each side rounded to a multiple of `multiple` = patch size × VAE
downsampling factor (so latents split into whole tokens), never below one multiple. At 32px with
the patch-2 / factor-8 latent this makes a square image 32×32 and a 1:4 image 16×64. Each image
goes to the bin whose ratio (h/w) is nearest its own, is resized to cover the bin and
center-cropped.

Sampler: the global batch (per-process batch × world size) always comes from one bin. Per epoch,
each bin's indices are shuffled with a generator seeded from (seed, epoch), cut into global
batches, and the list of batches is shuffled; a bin's last partial batch is filled with
(shuffled) samples of the same bin, so every sample appears at least once per epoch and exactly
once when bins divide evenly (`drop_last=True` drops partial batches instead). Each rank takes its
slice [rank·b, (rank+1)·b) of every global batch, so all ranks see the same bin at each step.
"""

from __future__ import annotations

import math

import numpy as np

from pixsigma.errors import PixsigmaError
from pixsigma.resolution import aspect_ratio_bins, nearest_bin

# The bins themselves are the generation side's (one rule for training and sampling).
aspect_bins = aspect_ratio_bins


def assign_bins(sizes, resolution: int, multiple: int) -> list[tuple[int, int]]:
    """The bin (height, width) of each (height, width) in `sizes`."""
    bins = aspect_bins(resolution, multiple)
    return [nearest_bin(h, w, bins) for h, w in sizes]


class BucketBatchSampler:
    """Yields this rank's index lists; each global batch lies inside one bucket (see module doc).

    buckets: the bucket key of every sample (anything hashable and sortable, e.g. (h, w)).
    `batches(epoch, start)` yields (batch_index_in_epoch, local indices) from `start`;
    `len(sampler)` is the number of global batches per epoch.
    """

    def __init__(self, buckets, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise PixsigmaError(f"bad sampler setup: batch_size {batch_size}, rank {rank}, world_size {world_size}")
        self.buckets = list(buckets)
        if not self.buckets:
            raise PixsigmaError("the dataset is empty: no sample to train on")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.drop_last = drop_last
        groups: dict = {}
        for i, key in enumerate(self.buckets):
            groups.setdefault(key, []).append(i)
        self.groups = {k: np.asarray(v) for k, v in sorted(groups.items())}
        if drop_last and all(len(v) < self.global_batch for v in self.groups.values()):
            raise PixsigmaError(f"no bucket holds a full global batch of {self.global_batch} with drop_last")

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        out = []
        gb = self.global_batch
        for key, idx in self.groups.items():
            idx = rng.permutation(idx)
            n_full, rest = divmod(len(idx), gb)
            for b in range(n_full):
                out.append(idx[b * gb:(b + 1) * gb].tolist())
            if rest and not self.drop_last:
                tail = idx[n_full * gb:]
                fill = rng.permutation(idx)
                fill = np.resize(fill, gb - rest)  # repeats when the bucket is smaller than a batch
                out.append(tail.tolist() + fill.tolist())
        order = rng.permutation(len(out))
        return [out[i] for i in order]

    def batches(self, epoch: int, start: int = 0):
        for i, batch in enumerate(self.global_batches(epoch)):
            if i < start:
                continue
            yield i, batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __len__(self) -> int:
        gb = self.global_batch
        return sum((len(v) // gb) if self.drop_last else math.ceil(len(v) / gb) for v in self.groups.values())
