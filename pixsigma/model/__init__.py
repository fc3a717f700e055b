"""The PixArt-Σ transformer (transformer.py) and its checkpoints (checkpoint.py)."""

from pixsigma.model.checkpoint import (
    add_kv_compression,
    change_caption_tokens,
    change_resolution,
    convert,
    load_transformer,
    save_transformer,
)
from pixsigma.model.transformer import (
    SMALL,
    TINY,
    XL_2,
    CaptionContext,
    KVCompressConfig,
    PixArtSigmaTransformer,
    TransformerConfig,
    count_parameters,
    deep_half,
    xl2_at,
)
