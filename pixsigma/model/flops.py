"""Arithmetic cost of the transformer (multiply-adds counted as 2 FLOPs).

Used by the benchmarks to set measured times beside the FLOP-predicted ones; the count covers
the matmuls and the attention, which are all but a rounding error of the work.
"""

from __future__ import annotations

import math

from pixsigma.model.transformer import TransformerConfig


def kv_tokens(h: int, w: int, ratio: int) -> int:
    """Keys/values left after merging an h×w token grid over ratio×ratio windows (padded)."""
    return math.ceil(h / ratio) * math.ceil(w / ratio) if ratio > 1 else h * w


def block_flops(config: TransformerConfig, h: int, w: int, caption_tokens: int, compress_ratio: int = 1,
                include_caption_kv: bool = True) -> int:
    """FLOPs of one block for one sample on an h×w token grid."""
    d, n, L = config.hidden_size, h * w, caption_tokens
    m = kv_tokens(h, w, compress_ratio)
    mlp = int(d * config.mlp_ratio)
    linear = 2 * n * d * (3 * d + d + d + d) + 2 * n * d * mlp * 2  # qkv, proj, cross q, cross proj, MLP
    attention = 4 * n * m * d + 4 * n * L * d  # QKᵀ and AV, self and cross
    compression = 2 * 2 * m * d * compress_ratio**2 if compress_ratio > 1 else 0  # depthwise conv on K and V
    caption_kv = 2 * L * d * 2 * d if include_caption_kv else 0
    return linear + attention + compression + caption_kv


def forward_flops(config: TransformerConfig, latent_h: int, latent_w: int, caption_tokens: int, batch: int = 1,
                  include_caption_kv: bool = True) -> int:
    """FLOPs of a whole forward pass (blocks, embedders, final layer)."""
    p, d = config.patch_size, config.hidden_size
    h, w = latent_h // p, latent_w // p
    kv = config.kv_compress
    total = sum(block_flops(config, h, w, caption_tokens, kv.ratio if kv.enabled and i in kv.layers else 1,
                            include_caption_kv) for i in range(config.depth))
    total += 2 * h * w * d * config.in_channels * p * p  # patch embedding
    total += 2 * h * w * d * p * p * config.out_channels  # final linear
    total += 2 * caption_tokens * d * (config.caption_channels + d)  # caption projection
    total += 2 * (256 * d + d * d + d * 6 * d)  # timestep path
    return total * batch
