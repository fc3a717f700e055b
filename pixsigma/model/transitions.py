"""Stage transitions: change a model between training stages, keeping every weight that still fits.

Each function returns a new `PixArtSigmaTransformer` (the input is left as it is) whose `history`
gains one entry describing the change; the history is saved in a pixsigma checkpoint's metadata.
`pixsigma adapt ...` exposes them as commands.

- `add_kv_compression`: turn on KV token compression in some layers (Conv Avg Init for new convs);
- `grow_depth`: insert blocks that add nothing until trained, so the function is unchanged;
- `change_resolution`: move to a new training resolution (the position embedding is recomputed);
- `change_caption_tokens`: change the caption length (the null caption is cut or extended).
"""

from __future__ import annotations

import torch

from pixsigma.errors import PixsigmaError
from pixsigma.model.transformer import (
    KVCompressConfig,
    PixArtSigmaTransformer,
    TransformerConfig,
    conv_avg_init,
    deep_half,
)


def _rebuild(model: PixArtSigmaTransformer, config: TransformerConfig, action: dict, state: dict | None = None) -> PixArtSigmaTransformer:
    """A new model with `config`, holding every weight of `state` (default: `model`'s) that still fits."""
    param = next(model.parameters())
    new = PixArtSigmaTransformer(config).to(device=param.device, dtype=param.dtype)
    missing, unexpected = new.load_state_dict(model.state_dict() if state is None else state, strict=False)
    if unexpected:
        raise PixsigmaError(f"cannot carry weights {unexpected[:3]} into the new config")
    new.history = list(getattr(model, "history", [])) + [action]
    new.set_runtime_options(attention_fp32=model.attention_fp32)
    new.train(model.training)
    return new


def add_kv_compression(model, layers=None, operator: str = "conv", ratio: int = 2) -> PixArtSigmaTransformer:
    """Turn on KV compression in `layers` (default: the deep half); new convs get Conv Avg Init."""
    layers = tuple(deep_half(model.config.depth) if layers is None else layers)
    try:
        kv = KVCompressConfig(operator=operator, ratio=ratio, layers=layers)
        config = model.config.with_(kv_compress=kv)
    except ValueError as e:
        raise PixsigmaError(str(e)) from None
    new = _rebuild(model, config, {"action": "kv-compress", "operator": operator, "ratio": ratio, "layers": list(kv.layers)})
    for block in new.blocks:
        if block.attn.kv_operator == "conv":
            conv_avg_init(block.attn.sr)
            torch.nn.init.ones_(block.attn.norm.weight)
            torch.nn.init.zeros_(block.attn.norm.bias)
    return new


def grow_depth(model, add: int, at: int | None = None) -> PixArtSigmaTransformer:
    """Insert `add` blocks before block `at` (default: after the shallow half), keeping the function.

    Each new block is a copy of a neighbour (the first half of them of block at-1, the rest of
    block at) with its three residual output projections (attention, cross-attention, MLP)
    zeroed, so it adds nothing until training moves them; like adaLN-zero, the gradient still
    reaches those projections at once. A new block compresses keys/values iff its source does.
    """
    depth = model.config.depth
    at = depth // 2 if at is None else at
    if add <= 0:
        raise PixsigmaError(f"add must be a positive number of blocks, got {add}")
    if not 0 < at < depth:
        raise PixsigmaError(f"at must lie in 1..{depth - 1} (a new block copies a neighbour on each side), got {at}")
    # new block index -> the old block whose weights it starts from
    sources = list(range(at)) + [at - 1 if k < add // 2 else at for k in range(add)] + list(range(at, depth))
    inserted = range(at, at + add)
    kv = model.config.kv_compress
    layers = tuple(i for i, s in enumerate(sources) if s in kv.layers)
    config = model.config.with_(depth=depth + add, kv_compress=KVCompressConfig(operator=kv.operator, ratio=kv.ratio, layers=layers))
    old = model.state_dict()
    state = {k: v for k, v in old.items() if not k.startswith("blocks.")}
    for i, s in enumerate(sources):
        prefix = f"blocks.{s}."
        state.update({f"blocks.{i}.{k[len(prefix):]}": v.clone() for k, v in old.items() if k.startswith(prefix)})
        if i in inserted:
            for name in ("attn.proj", "cross_attn.proj", "mlp.fc2"):
                state[f"blocks.{i}.{name}.weight"].zero_()
                state[f"blocks.{i}.{name}.bias"].zero_()
    return _rebuild(model, config, {"action": "depth", "from": depth, "depth": depth + add, "inserted_at": at,
                                    "kv_compress_layers": list(layers)}, state)


def change_resolution(model, sample_size: int, pe_interpolation: float | None = None) -> PixArtSigmaTransformer:
    """Move to a new training resolution: the position embedding is recomputed on the new grid
    (positions rescaled to base_size and divided by pe_interpolation), nothing else changes."""
    if sample_size <= 0 or sample_size % model.config.patch_size:
        raise PixsigmaError(f"sample_size {sample_size} must be a positive multiple of the patch size {model.config.patch_size}")
    pe = pe_interpolation if pe_interpolation is not None else model.config.pe_interpolation * sample_size / model.config.sample_size
    config = model.config.with_(sample_size=sample_size, pe_interpolation=float(pe))
    return _rebuild(model, config, {"action": "resolution", "from_sample_size": model.config.sample_size,
                                    "sample_size": sample_size, "pe_interpolation": float(pe)})


def change_caption_tokens(model, max_caption_tokens: int) -> PixArtSigmaTransformer:
    """Change the caption length (e.g. 120 → 300): the null caption is cut, or extended by
    repeating its last row (the null caption's tail is where padding lives)."""
    if max_caption_tokens <= 0:
        raise PixsigmaError(f"max_caption_tokens must be positive, got {max_caption_tokens}")
    old = model.y_embedder.y_embedding.detach()
    if max_caption_tokens <= old.shape[0]:
        null = old[:max_caption_tokens]
    else:
        null = torch.cat([old, old[-1:].expand(max_caption_tokens - old.shape[0], -1)])
    config = model.config.with_(max_caption_tokens=max_caption_tokens)
    state = {**model.state_dict(), "y_embedder.y_embedding": null.clone()}
    return _rebuild(model, config, {"action": "tokens", "from": old.shape[0], "max_caption_tokens": max_caption_tokens}, state)
