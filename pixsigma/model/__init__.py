"""The PixArt-Σ transformer (transformer.py), its checkpoints (checkpoint.py) and the stage
transitions between training stages (transitions.py)."""

from pixsigma.model.checkpoint import (
    convert,
    load_transformer,
    save_transformer,
)
from pixsigma.model.controlnet import ControlNetTransformer
from pixsigma.model.controlnet_checkpoint import load_controlnet, save_controlnet
from pixsigma.model.transformer import (
    PRESETS,
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
from pixsigma.model.transitions import (
    add_kv_compression,
    change_caption_tokens,
    change_resolution,
    grow_depth,
)
