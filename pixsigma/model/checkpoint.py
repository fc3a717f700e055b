"""Checkpoints: load any PixArt-Σ/α layout and save in three.

Layouts
- official: a .pth holding {"state_dict": {...}} or the flat dict, keys as in the official code.
  Read with `torch.load(weights_only=True)`: a pickle that would run code is refused.
- diffusers: a folder with config.json + diffusion_pytorch_model.safetensors (sharded too) as
  `PixArtTransformer2DModel` reads it. diffusers has no place for the null caption, so an export
  keeps it beside the weights in `y_embedding.safetensors` (diffusers ignores that file).
- safetensors: this project's single file, official key names, the config in the metadata.

What the weights tell (depth, widths, patch, channels, caption length, compressed layers and R,
qk_norm, micro-conditions) is read from them; what they cannot tell comes from the file's
metadata or folder config, then from keyword overrides, then from the released files' defaults.

Changing a model between training stages (KV compression, depth, resolution, caption length)
lives in `pixsigma.model.transitions`.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from pixsigma.errors import PixsigmaError
from pixsigma.io import atomic_write, write_json, write_safetensors
from pixsigma.model.transformer import KVCompressConfig, PixArtSigmaTransformer, TransformerConfig

log = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
NULL_CAPTION_FILE = "y_embedding.safetensors"
CONFIG_KEY = "pixsigma_config"
DIFFUSERS_PREDICTION_KEY = "pixsigma_prediction_type"
HISTORY_KEY = "pixsigma_history"
RELEASED_HEAD_DIM = 72


# ---------------------------------------------------------------------------------------------
# Config <-> plain dicts
# ---------------------------------------------------------------------------------------------


def config_to_dict(config: TransformerConfig) -> dict:
    d = asdict(config)
    d["kv_compress"]["layers"] = list(config.kv_compress.layers)
    return d


def config_from_dict(d: dict) -> TransformerConfig:
    d = dict(d)
    kv = d.pop("kv_compress", None) or {}
    known = set(TransformerConfig.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise PixsigmaError(f"unknown transformer config keys {unknown}; expected a subset of {sorted(known)}")
    return TransformerConfig(kv_compress=KVCompressConfig(**kv), **d)


# ---------------------------------------------------------------------------------------------
# Official <-> diffusers key mapping
# ---------------------------------------------------------------------------------------------

_COPY = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
}
_BLOCK_COPY = {
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_BLOCK_SPLIT = {  # official fused tensor -> diffusers pieces, split along dim 0
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}
_NOT_IN_DIFFUSERS = re.compile(r"blocks\.\d+\.attn\.(sr|norm|q_norm|k_norm)\.")


def official_to_diffusers(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        if key == "y_embedder.y_embedding":
            continue
        if _NOT_IN_DIFFUSERS.match(key):
            raise PixsigmaError(
                f"{key}: diffusers' PixArtTransformer2DModel has no place for KV compression or qk_norm weights; "
                "export this model with --to safetensors or --to official"
            )
        module, _, param = key.rpartition(".")
        if module in _COPY:
            out[f"{_COPY[module]}.{param}"] = value
        elif key == "final_layer.scale_shift_table":
            out["scale_shift_table"] = value
        elif m := re.fullmatch(r"blocks\.(\d+)\.(.+)", module if param != "scale_shift_table" else key):
            n, rest = m.groups()
            prefix = f"transformer_blocks.{n}"
            if rest == "scale_shift_table":
                out[f"{prefix}.scale_shift_table"] = value
            elif rest in _BLOCK_COPY:
                out[f"{prefix}.{_BLOCK_COPY[rest]}.{param}"] = value
            elif rest in _BLOCK_SPLIT:
                pieces = _BLOCK_SPLIT[rest]
                for name, chunk in zip(pieces, value.chunk(len(pieces), dim=0)):
                    out[f"{prefix}.{name}.{param}"] = chunk.contiguous()
            else:
                raise PixsigmaError(f"{key}: not a PixArt-Σ weight (no diffusers equivalent)")
        else:
            raise PixsigmaError(f"{key}: not a PixArt-Σ weight (no diffusers equivalent)")
    return out


def diffusers_to_official(sd: dict) -> dict:
    inverse = {v: k for k, v in _COPY.items()}
    block_inverse = {v: k for k, v in _BLOCK_COPY.items()}
    out, pending = {}, {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if key == "scale_shift_table":
            out["final_layer.scale_shift_table"] = value
        elif module in inverse:
            out[f"{inverse[module]}.{param}"] = value
        elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key):
            n, rest = m.groups()
            rest_module, _, _ = rest.rpartition(".")
            if rest == "scale_shift_table":
                out[f"blocks.{n}.scale_shift_table"] = value
            elif rest_module in block_inverse:
                out[f"blocks.{n}.{block_inverse[rest_module]}.{param}"] = value
            else:
                for fused, pieces in _BLOCK_SPLIT.items():
                    if rest_module in pieces:
                        pending.setdefault((f"blocks.{n}.{fused}.{param}", pieces), {})[rest_module] = value
                        break
                else:
                    raise PixsigmaError(f"{key}: not a PixArtTransformer2DModel weight this project knows")
        else:
            raise PixsigmaError(f"{key}: not a PixArtTransformer2DModel weight this project knows")
    for (fused_key, pieces), parts in pending.items():
        missing = [p for p in pieces if p not in parts]
        if missing:
            raise PixsigmaError(f"{fused_key}: the diffusers weights lack {missing}")
        out[fused_key] = torch.cat([parts[p] for p in pieces], dim=0)
    return out


def diffusers_config(config: TransformerConfig) -> dict:
    """The config.json diffusers' PixArtTransformer2DModel needs to hold this model exactly."""
    if config.kv_compress.enabled or config.qk_norm:
        raise PixsigmaError(
            "diffusers' PixArtTransformer2DModel cannot express KV compression or qk_norm; "
            "export this model with --to safetensors or --to official"
        )
    if config.mlp_ratio != 4.0:
        raise PixsigmaError(f"diffusers' PixArtTransformer2DModel has a fixed MLP ratio of 4; this model has {config.mlp_ratio}")
    return {
        "_class_name": "PixArtTransformer2DModel",
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "cross_attention_dim": config.hidden_size,
        "attention_bias": True,
        "sample_size": config.sample_size,
        "patch_size": config.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "upcast_attention": False,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": config.pe_interpolation,
        "use_additional_conditions": config.micro_conditions,
        "caption_channels": config.caption_channels,
        "attention_type": "default",
        # diffusers keeps the prediction type in the scheduler's config; an extra key here (which
        # diffusers ignores) keeps a v-prediction model from being read back as an ε one
        **({DIFFUSERS_PREDICTION_KEY: config.prediction_type} if config.prediction_type != "epsilon" else {}),
    }


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_pth(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the file
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "unpickl" in str(e).lower():
            raise PixsigmaError(f"{path}: refused: the pickle would execute code or build non-tensor objects (only tensors are loaded)") from None
        raise PixsigmaError(f"{path}: not a readable PyTorch checkpoint ({text})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PixsigmaError(f"{path}: expected a dict of tensors (optionally under 'state_dict')")
    return obj


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise PixsigmaError(f"{path}: not a readable safetensors file ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    return sd, meta


def _read_diffusers_folder(folder: Path) -> tuple[dict, dict]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PixsigmaError(
            f"{folder}: no config.json; expected a diffusers transformer folder (config.json + {DIFFUSERS_WEIGHTS}, "
            "or sharded with its .index.json) or a pipeline folder with transformer/"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise PixsigmaError(f"{config_path}: not valid JSON ({e})") from None
    if (folder / DIFFUSERS_INDEX).is_file():
        index = json.loads((folder / DIFFUSERS_INDEX).read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (folder / DIFFUSERS_WEIGHTS).is_file():
        files = [DIFFUSERS_WEIGHTS]
    else:
        raise PixsigmaError(f"{folder}: no {DIFFUSERS_WEIGHTS} (or sharded {DIFFUSERS_INDEX}) beside config.json")
    sd = {}
    for name in files:
        shard = folder / name
        if not shard.is_file():
            raise PixsigmaError(f"{shard}: shard named in {DIFFUSERS_INDEX} is missing")
        sd.update(_read_safetensors(shard)[0])
    official = diffusers_to_official(sd)
    if (folder / NULL_CAPTION_FILE).is_file():
        official.update(_read_safetensors(folder / NULL_CAPTION_FILE)[0])
    return official, config


def infer_config(sd: dict, known: dict, name: str = "") -> TransformerConfig:
    """Build the config from the weights, then `known` (metadata/config/overrides), then defaults."""
    def need(key):
        if key not in sd:
            raise PixsigmaError(f"{name}: missing weight {key!r}; is this a PixArt transformer checkpoint?")
        return sd[key]

    w = need("x_embedder.proj.weight")
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    out_ch = need("final_layer.linear.weight").shape[0] // (patch * patch)
    caption_channels = need("y_embedder.y_proj.fc1.weight").shape[1]
    mlp_hidden = need("blocks.0.mlp.fc1.weight").shape[0] if depth else 4 * hidden
    compressed = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"blocks\.(\d+)\.attn\.sr\.weight", k)))
    kv = dict(known.get("kv_compress") or {})
    if compressed:
        kv = {"operator": "conv", "ratio": sd[f"blocks.{compressed[0]}.attn.sr.weight"].shape[-1], "layers": compressed}
    sample_size, pe = _size_defaults(name)
    num_heads = known.get("num_heads") or max(1, hidden // RELEASED_HEAD_DIM)
    if hidden % num_heads:
        raise PixsigmaError(f"{name}: hidden size {hidden} is not divisible by num_heads {num_heads}; pass num_heads=")
    tokens = sd["y_embedder.y_embedding"].shape[0] if "y_embedder.y_embedding" in sd else known.get("max_caption_tokens", 300)
    try:
        return TransformerConfig(
            depth=depth, hidden_size=hidden, num_heads=num_heads, mlp_ratio=mlp_hidden / hidden,
            patch_size=patch, in_channels=in_ch, learn_sigma=out_ch == 2 * in_ch,
            caption_channels=caption_channels, max_caption_tokens=tokens,
            sample_size=known.get("sample_size") or sample_size,
            pe_interpolation=float(known.get("pe_interpolation") or pe),
            qk_norm="blocks.0.attn.q_norm.weight" in sd,
            micro_conditions="csize_embedder.mlp.0.weight" in sd,
            kv_compress=KVCompressConfig(**kv) if kv else KVCompressConfig(),
            caption_dropout=known.get("caption_dropout", 0.1),
            prediction_type=known.get("prediction_type", "epsilon"),
        )
    except ValueError as e:
        raise PixsigmaError(f"{name}: {e}") from None


def _size_defaults(name: str) -> tuple[int, float]:
    """The released files' sample size and pe_interpolation, read from the 256/512/1024/2K name."""
    base = Path(name).name.lower()
    for token, res in (("2k", 2048), ("2048", 2048), ("1024", 1024), ("512", 512), ("256", 256)):
        if token in base:
            return res // 8, res / 512
    return 128, 2.0


def _known_from_diffusers(config: dict) -> dict:
    known = {}
    if config.get("num_attention_heads"):
        known["num_heads"] = config["num_attention_heads"]
    if config.get("sample_size"):
        known["sample_size"] = config["sample_size"]
    interp = config.get("interpolation_scale")
    known["pe_interpolation"] = interp if interp is not None else max(config.get("sample_size", 128) // 64, 1)
    if config.get(DIFFUSERS_PREDICTION_KEY):
        known["prediction_type"] = config[DIFFUSERS_PREDICTION_KEY]
    return known


def read_checkpoint(path, **overrides) -> tuple[dict, TransformerConfig, list]:
    """(official-layout state dict, config, history) from any supported layout."""
    path = Path(path)
    if not path.exists():
        raise PixsigmaError(
            f"{path}: does not exist; expected an official .pth, a diffusers transformer folder "
            "(config.json + diffusion_pytorch_model.safetensors) or a pixsigma .safetensors file"
        )
    known, history = {}, []
    if path.is_dir():
        if (path / "transformer").is_dir() and not (path / "config.json").is_file():
            path = path / "transformer"
        singles = sorted(path.glob("*.safetensors"))
        if not (path / "config.json").is_file() and len(singles) == 1:
            # a folder holding one pixsigma file (how a pipeline folder ships a KV-compressed
            # transformer, which diffusers' layout cannot express)
            return read_checkpoint(singles[0], **overrides)
        sd, config = _read_diffusers_folder(path)
        if config.get("_class_name") not in (None, "PixArtTransformer2DModel", "Transformer2DModel"):
            raise PixsigmaError(f"{path}/config.json: _class_name is {config.get('_class_name')!r}, expected PixArtTransformer2DModel")
        known = _known_from_diffusers(config)
    elif path.suffix == ".safetensors":
        sd, meta = _read_safetensors(path)
        if CONFIG_KEY in meta:
            known = json.loads(meta[CONFIG_KEY])
            history = json.loads(meta.get(HISTORY_KEY, "[]"))
        elif any(k.startswith("transformer_blocks.") for k in sd):
            sd = diffusers_to_official(sd)
    else:
        sd = _read_pth(path)
    sd = {k: v for k, v in sd.items() if k != "pos_embed"}  # a fixed buffer, recomputed per size
    known.update({k: v for k, v in overrides.items() if v is not None})
    config = infer_config(sd, known, str(path))
    if "y_embedder.y_embedding" not in sd:
        # diffusers folders have no null caption; it only matters for training's caption
        # dropout, so start a fresh one (seeded, so loading is deterministic).
        log.info("%s: no null caption (y_embedding) in the weights; starting a fresh one", path)
        g = torch.Generator().manual_seed(0)
        c = config.caption_channels
        sd["y_embedder.y_embedding"] = torch.randn(config.max_caption_tokens, c, generator=g) / c**0.5
    return sd, config, history


def check_state_dict(model: torch.nn.Module, sd: dict, name: str) -> None:
    """One-line errors naming the first missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in sd:
            raise PixsigmaError(f"{name}: missing key {key} (shape {tuple(tensor.shape)})")
        if sd[key].shape != tensor.shape:
            raise PixsigmaError(f"{name}: key {key} has shape {tuple(sd[key].shape)} but the model expects {tuple(tensor.shape)}")
    extra = [k for k in sd if k not in expected]
    if extra:
        raise PixsigmaError(f"{name}: unexpected key {extra[0]} ({len(extra)} unexpected in all)")


def load_transformer(path, device="cpu", dtype=None, **overrides) -> PixArtSigmaTransformer:
    """Load a PixArt-Σ/α transformer from an official .pth, a diffusers folder or a pixsigma file.

    Overrides for what the weights cannot tell: num_heads, sample_size (latent side at training;
    base size = sample_size // patch), pe_interpolation, max_caption_tokens, kv_compress.
    """
    sd, config, history = read_checkpoint(path, **overrides)
    with torch.device("meta"):
        model = PixArtSigmaTransformer(config)
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd, assign=True)
    model.history = history
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_safetensors(model: PixArtSigmaTransformer, path, extra_metadata: dict | None = None) -> Path:
    """The project's single file: official key names, config + history in the metadata."""
    meta = {CONFIG_KEY: json.dumps(config_to_dict(model.config)), HISTORY_KEY: json.dumps(getattr(model, "history", []))}
    meta.update(extra_metadata or {})
    return write_safetensors(path, model.state_dict(), meta)


def save_official(model: PixArtSigmaTransformer, path) -> Path:
    sd = _contiguous(model.state_dict())
    return atomic_write(path, lambda tmp: torch.save({"state_dict": sd}, tmp))


def save_diffusers(model: PixArtSigmaTransformer, folder) -> Path:
    """A diffusers transformer folder: config.json, the weights, and the null caption beside them."""
    folder = Path(folder)
    config = diffusers_config(model.config)
    sd = _contiguous(model.state_dict())
    write_safetensors(folder / DIFFUSERS_WEIGHTS, official_to_diffusers(sd), {"format": "pt"})
    write_safetensors(folder / NULL_CAPTION_FILE, {"y_embedder.y_embedding": sd["y_embedder.y_embedding"]})
    write_json(folder / "config.json", config)
    return folder


FORMATS = ("diffusers", "safetensors", "official")


def save_transformer(model: PixArtSigmaTransformer, dst, to: str = "safetensors") -> Path:
    if to == "diffusers":
        return save_diffusers(model, dst)
    if to == "safetensors":
        return save_safetensors(model, dst)
    if to == "official":
        return save_official(model, dst)
    raise PixsigmaError(f"unknown checkpoint format {to!r}; expected one of {FORMATS}")


def convert(src, dst, to: str = "safetensors", **overrides) -> Path:
    """Convert a checkpoint between layouts; overrides as in `load_transformer`."""
    if to not in FORMATS:
        raise PixsigmaError(f"unknown checkpoint format {to!r}; expected one of {FORMATS}")
    model = load_transformer(src, **overrides)
    if to == "diffusers":
        diffusers_config(model.config)  # refuse before writing anything
    return save_transformer(model, dst, to)


# ---------------------------------------------------------------------------------------------
# Names that moved to pixsigma.model.transitions
# ---------------------------------------------------------------------------------------------

_MOVED_TO_TRANSITIONS = ("add_kv_compression", "change_caption_tokens", "change_resolution", "grow_depth")


def __getattr__(name: str):
    """The stage transitions moved to `pixsigma.model.transitions`; the old import path still works, with a warning."""
    if name in _MOVED_TO_TRANSITIONS:
        from pixsigma.model import transitions

        warnings.warn(
            f"pixsigma.model.checkpoint.{name} moved to pixsigma.model.transitions.{name}; import it from there "
            "(or from pixsigma.model)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(transitions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
