"""Training-free step caching: reuse what a range of transformer blocks added at a recent step.

Neighbouring sampling steps see nearly the same latents, so a block range's contribution to the
residual stream (its output minus its input, the "delta") changes little from one step to the
next. Every `interval` steps the model runs in full and records the delta of each range it may
skip; at the steps in between, the range is skipped and its recorded delta added to the tokens
that enter it, so the blocks outside the range still see this step's latents.

- "fora" (FORA, Selvaraju et al. 2024): the range is every block; a cached step costs only the
  embeddings and the final layer.
- "delta" (Δ-DiT, Chen et al. 2024): the range is the rear `blocks` blocks early in sampling
  (timestep >= `boundary`, when the front blocks lay out the image) and the front `blocks`
  blocks late (when the rear blocks draw details); the other blocks run at every step.

`interval=1` runs every step in full and is exactly the uncached model. A step whose batch
differs from the recorded one (guidance switched on or off by a guidance interval) runs in full.

    cache = StepCache(StepCacheConfig("delta", interval=2), depth=28)
    for step: cache.start_step(t); out = model(x, t, context, step_cache=cache)

The model calls `before(i, tokens) -> (tokens, run)` before block i and `after(i, tokens)` after
it (see PixArtSigmaTransformer.forward); this module never imports the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pixsigma.errors import PixsigmaError

CACHE_MODES = ("fora", "delta")


@dataclass(frozen=True)
class StepCacheConfig:
    """mode: fora | delta; interval: a full step every `interval` steps (1 = no caching);
    blocks: how many blocks a "delta" range holds (default half the depth); boundary: the
    timestep (0..999) at which "delta" switches from caching the rear blocks to the front ones."""

    mode: str = "delta"
    interval: int = 2
    blocks: int | None = None
    boundary: float = 500.0

    def __post_init__(self):
        if self.mode not in CACHE_MODES:
            raise PixsigmaError(f"unknown step cache {self.mode!r}; expected one of {', '.join(CACHE_MODES)}")
        if not isinstance(self.interval, int) or self.interval < 1:
            raise PixsigmaError(f"step cache interval {self.interval!r}: expected an integer >= 1 (1 = no caching)")
        if self.blocks is not None and (not isinstance(self.blocks, int) or self.blocks < 1):
            raise PixsigmaError(f"step cache blocks {self.blocks!r}: expected a positive integer")
        if not 0 <= float(self.boundary) <= 1000:
            raise PixsigmaError(f"step cache boundary {self.boundary!r}: expected a timestep in 0..1000")


def as_cache_config(value) -> StepCacheConfig | None:
    """A StepCacheConfig from None, a config, a mode name ("fora", "delta", "none") or a dict of its fields."""
    if value is None or isinstance(value, StepCacheConfig):
        return value
    if isinstance(value, str):
        return None if value.strip().lower() in ("", "none", "off") else StepCacheConfig(value.strip().lower())
    if isinstance(value, dict):
        try:
            return StepCacheConfig(**value)
        except TypeError as e:
            raise PixsigmaError(f"step cache {value!r}: {e}; expected fields mode, interval, blocks, boundary") from None
    raise PixsigmaError(f"step cache {value!r}: expected None, 'fora', 'delta', a dict or a StepCacheConfig")


class StepCache:
    """The per-call state: which step this is, which ranges run, the recorded deltas."""

    def __init__(self, config: StepCacheConfig, depth: int):
        self.config = config
        self.depth = depth
        n = min(config.blocks or max(depth // 2, 1), depth)
        self.ranges = [(0, depth)] if config.mode == "fora" else [(0, n), (depth - n, depth)]
        self.step = -1
        self.skip: tuple[int, int] | None = None  # the range skipped at this step, None: a full step
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}  # range -> tokens entering it (full step)
        self.deltas: dict[tuple[int, int], torch.Tensor] = {}  # range -> its recorded contribution
        self.full_steps = 0
        self.skipped_blocks = 0

    def start_step(self, timestep) -> None:
        """A new model evaluation at `timestep`: decide whether it runs in full or skips a range."""
        self.step += 1
        if self.step % self.config.interval == 0:
            self.skip = None
            return
        if self.config.mode == "fora":
            self.skip = self.ranges[0]
        else:
            t = float(torch.as_tensor(timestep).reshape(-1)[0])
            self.skip = self.ranges[1] if t >= self.config.boundary else self.ranges[0]

    def before(self, i: int, tokens: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Called before block i: the tokens that enter it and whether it runs."""
        skip = self.skip
        if skip is not None and skip[0] <= i < skip[1]:
            delta = self.deltas.get(skip)
            if i == skip[0] and (delta is None or delta.shape != tokens.shape):
                self.skip = None  # nothing usable recorded for this batch: this step runs in full
            elif i == skip[0]:
                self.skipped_blocks += skip[1] - skip[0]
                return tokens + delta, False
            else:
                return tokens, False
        if self.skip is None:
            for r in self.ranges:
                if r[0] == i:
                    self.inputs[r] = tokens
        return tokens, True

    def after(self, i: int, tokens: torch.Tensor) -> None:
        """Called after block i ran: record the delta of every range that ends here (full steps)."""
        if self.skip is not None:
            return
        for r in self.ranges:
            if r[1] == i + 1 and r in self.inputs:
                self.deltas[r] = tokens - self.inputs.pop(r)
        if i + 1 == self.depth:
            self.full_steps += 1

    def summary(self) -> dict:
        """What the cache did: steps seen, full steps, block evaluations saved (fraction)."""
        steps = self.step + 1
        return {"mode": self.config.mode, "interval": self.config.interval, "steps": steps, "full_steps": self.full_steps,
                "blocks_skipped": self.skipped_blocks / max(steps * self.depth, 1)}


def with_step_cache(transformer, cache: StepCache):
    """`denoiser(x, t, context)` running `transformer` under `cache`; each call is one step."""

    def denoiser(x, t, context):
        cache.start_step(t)
        return transformer(x, t, context, step_cache=cache)

    return denoiser
