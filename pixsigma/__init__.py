"""pixsigma: PixArt-Σ text-to-image generation, conversion and training in PyTorch."""

from pixsigma.errors import PixsigmaError
from pixsigma.model import (
    SMALL,
    TINY,
    XL_2,
    KVCompressConfig,
    PixArtSigmaTransformer,
    TransformerConfig,
    add_kv_compression,
    change_caption_tokens,
    change_resolution,
    convert,
    count_parameters,
    grow_depth,
    load_transformer,
    save_transformer,
    xl2_at,
)
from pixsigma.pipeline import SigmaOutput, SigmaPipeline
from pixsigma.text import TextEncoder, minilm_path
from pixsigma.vae import VAE
from pixsigma.diffusion.gaussian import GaussianDiffusion
from pixsigma.train import TrainConfig, load_config  # training API: pixsigma.train.train(config)

__version__ = "0.1.0"
