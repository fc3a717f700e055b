"""Tiny random components for tests and benchmarks (no downloads): a T5 encoder with a
sentencepiece tokenizer trained on a few sentences, a small AutoencoderKL, a small PixArt-Σ
transformer, and a whole diffusers-layout pipeline folder built from them.

Everything is deterministic given the seed. Reusable by other test modules:

    from tests.tiny_components import build_pipeline_folder
    folder = build_pipeline_folder(tmp_path / "pipe")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SENTENCES = [
    "a photo of a red cat sitting on a wooden table",
    "a painting of a blue house by the sea at sunset",
    "an astronaut riding a horse on the moon",
    "a small cactus with a happy face in the desert",
    "a bowl of fruit with apples, oranges and bananas",
    "a city street at night with neon lights and rain",
    "a portrait of an old man with a white beard",
    "a mountain landscape with snow and a clear lake",
    "two dogs playing in the park on a sunny day",
    "a futuristic car parked in front of a glass building",
    "a cup of coffee next to an open book",
    "a forest path covered with autumn leaves",
    "The Quick Brown Fox Jumps Over The Lazy Dog",
    "green trees, yellow flowers and a purple sky",
]


def build_tokenizer(folder, vocab_size: int = 96):
    """Train a sentencepiece unigram model on SENTENCES and save a T5 tokenizer in `folder`."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 4) + "\n")
    prefix = folder / "spm"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2, num_threads=1,
    )
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    vocab = [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    out = folder / "tokenizer"
    tok.save_pretrained(out)
    return tok, out


def build_text_encoder(vocab_size: int, d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=32,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                   is_encoder_decoder=False, tie_word_embeddings=False)
    return T5EncoderModel(cfg).eval()


def build_vae(levels: int = 2, channels: int = 32, groups: int = 32, seed: int = 0, layers_per_block: int = 1,
              mid_attention: bool = True):
    """AutoencoderKL with `levels` resolution levels: downsampling factor 2**(levels-1).
    mid_attention=False drops the mid-block self-attention (whose cost is quadratic in the
    latent pixels: an untiled 4K decode on CPU would take minutes with it)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(channels,) * levels, layers_per_block=layers_per_block, norm_num_groups=groups,
        sample_size=64, scaling_factor=0.13025, mid_block_add_attention=mid_attention,
    ).eval()


def build_transformer(caption_channels: int = 32, sample_size: int = 16, hidden: int = 32, depth: int = 2,
                      heads: int = 2, max_tokens: int = 16, kv_compress=None, seed: int = 0):
    """A small PixArt-Σ transformer with random (non-zero) output layers so outputs vary."""
    from pixsigma.model.transformer import KVCompressConfig, PixArtSigmaTransformer, TransformerConfig

    torch.manual_seed(seed)
    cfg = TransformerConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=2, in_channels=4,
                            caption_channels=caption_channels, max_caption_tokens=max_tokens,
                            sample_size=sample_size, pe_interpolation=1.0,
                            kv_compress=kv_compress or KVCompressConfig())
    model = PixArtSigmaTransformer(cfg)
    with torch.no_grad():  # the from-scratch init zeroes these: randomize so every path matters
        for block in model.blocks:
            torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.5)
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.3)
        torch.nn.init.normal_(model.final_layer.linear.bias, std=0.02)
    return model.eval()


def scheduler_config() -> dict:
    from pixsigma.diffusion.samplers import DEFAULT_SCHEDULE, DPM_SOLVER_CONFIG

    return {"_class_name": "DPMSolverMultistepScheduler", **DEFAULT_SCHEDULE, **DPM_SOLVER_CONFIG}


def build_pipeline_folder(folder, sample_size: int = 16, vae_levels: int = 2, vae_channels: int = 32,
                          vae_groups: int = 32, hidden: int = 32, depth: int = 2, max_tokens: int = 16,
                          with_text: bool = True, seed: int = 0, vae_layers_per_block: int = 1,
                          vae_mid_attention: bool = True, caption_channels: int = 32) -> Path:
    """A diffusers-layout PixArt-Σ pipeline folder of tiny random components.

    Written through diffusers' PixArtSigmaPipeline.save_pretrained (model_index.json etc.), then
    the transformer folder is rewritten by pixsigma's exporter (adds the null caption).
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    from pixsigma.model.checkpoint import save_transformer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok, _ = build_tokenizer(folder / "_spm")
    text_encoder = build_text_encoder(len(tok), d_model=caption_channels, seed=seed)
    vae = build_vae(vae_levels, vae_channels, vae_groups, seed=seed, layers_per_block=vae_layers_per_block,
                    mid_attention=vae_mid_attention)
    model = build_transformer(text_encoder.config.d_model, sample_size, hidden, depth, max_tokens=max_tokens, seed=seed)
    save_transformer(model, folder / "_transformer", to="diffusers")
    dtransformer = PixArtTransformer2DModel.from_pretrained(folder / "_transformer")
    scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config())
    pipe = PixArtSigmaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=dtransformer, scheduler=scheduler)
    pipe.save_pretrained(folder)
    save_transformer(model, folder / "transformer", to="diffusers")
    if not with_text:
        import shutil

        shutil.rmtree(folder / "text_encoder")
        shutil.rmtree(folder / "tokenizer")
        index = json.loads((folder / "model_index.json").read_text())
        index.pop("text_encoder", None)
        index.pop("tokenizer", None)
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
