"""pixsigma: PixArt-Σ text-to-image generation, conversion and training in PyTorch."""

from pixsigma.errors import PixsigmaError
from pixsigma.model import (
    SMALL,
    TINY,
    XL_2,
    ControlNetTransformer,
    KVCompressConfig,
    PixArtSigmaTransformer,
    TransformerConfig,
    add_kv_compression,
    change_caption_tokens,
    change_resolution,
    convert,
    count_parameters,
    grow_depth,
    load_controlnet,
    load_transformer,
    save_transformer,
    xl2_at,
)
from pixsigma.model.lora import load_lora, save_lora
from pixsigma.model.feedback import FeedbackTransformer, load_feedback, save_feedback
from pixsigma.model.quantize import SVDQuantConfig, load_quantized, quantize_transformer, save_quantized
from pixsigma.pipeline import SigmaOutput, SigmaPipeline
from pixsigma.text import TextEncoder, minilm_path
from pixsigma.vae import VAE
from pixsigma.diffusion.gaussian import GaussianDiffusion
from pixsigma.train import TrainConfig, load_config  # training API: pixsigma.train.train(config)

__version__ = "0.1.0"
