"""ControlNet checkpoints: read and write three layouts, and `load_controlnet`.

Layouts
- official: the state dict of PixArt-δ's `ControlPixArtHalf` (a .pth, `{"state_dict": ...}` or
  flat; a .safetensors with the same keys reads too): `base_model.*` (the whole base),
  `controlnet.{i}.copied_block.*`, `controlnet.0.before_proj.*`, `controlnet.{i}.after_proj.*`.
- controlnet: this project's ControlNet-only .safetensors: the `controlnet.*` keys alone, and in
  the metadata the number of blocks, the base's config, dtype and `weights_hash` (the base is
  named, not stored; loading checks it).
- diffusers: the research `PixArtControlNetAdapterModel` folder (config.json with
  `num_layers`, diffusion_pytorch_model.safetensors) or its single .safetensors:
  `controlnet_blocks.{i}.transformer_block.*` in diffusers' block names,
  `controlnet_blocks.0.before_proj.*`, `controlnet_blocks.{i}.after_proj.*`.

The base comes from the file (official) or from `base=` (a loaded transformer or anything
`load_transformer` reads, with the same overrides: num_heads, sample_size, pe_interpolation).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from pixsigma.errors import PixsigmaError
from pixsigma.io import atomic_write, dtype_name, weights_hash, write_json, write_safetensors
from pixsigma.model.checkpoint import (
    DIFFUSERS_WEIGHTS,
    _read_pth,
    _read_safetensors,
    check_state_dict,
    config_to_dict,
    diffusers_to_official,
    infer_config,
    load_transformer,
    official_to_diffusers,
)
from pixsigma.model.controlnet import ControlNetTransformer
from pixsigma.model.transformer import PixArtSigmaTransformer

log = logging.getLogger(__name__)

META_KEY = "pixsigma_controlnet"
ADAPTER_CLASS = "PixArtControlNetAdapterModel"
FORMATS = ("controlnet", "official", "diffusers")
BASE_PREFIX = "base_model."


# ---------------------------------------------------------------------------------------------
# Key mapping: official `controlnet.*` <-> diffusers adapter `controlnet_blocks.*`
# ---------------------------------------------------------------------------------------------


# (prefix, name of the copied block, whole-model block prefix, block key mapper) per side
_OFFICIAL = ("controlnet", "copied_block", "blocks", official_to_diffusers)
_ADAPTER = ("controlnet_blocks", "transformer_block", "transformer_blocks", diffusers_to_official)


def _remap(sd: dict, src: tuple, dst: tuple, what: str) -> dict:
    """Rename ControlNet keys from one side's layout to the other's; the copied blocks go through
    the whole-model block mapping of checkpoint.py (as `<blocks>.<i>.*` keys)."""
    prefix, block_name, blocks_prefix, convert = src
    out_prefix, out_block = dst[:2]
    out, blocks = {}, {}
    for key, value in sd.items():
        m = re.fullmatch(rf"{prefix}\.(\d+)\.({block_name}|before_proj|after_proj)\.(.+)", key)
        if not m:
            raise PixsigmaError(f"{key}: not a {what} weight (expected {prefix}.<i>.{block_name}/before_proj/after_proj)")
        i, part, rest = m.groups()
        if part == block_name:
            blocks[f"{blocks_prefix}.{i}.{rest}"] = value
        else:
            out[f"{out_prefix}.{i}.{part}.{rest}"] = value
    for key, value in convert(blocks).items():
        i, rest = re.fullmatch(r"[a-z_]+\.(\d+)\.(.+)", key).groups()
        out[f"{out_prefix}.{i}.{out_block}.{rest}"] = value
    return out


def official_to_adapter(sd: dict) -> dict:
    """`controlnet.{i}.*` keys → the diffusers adapter's (copied blocks in diffusers' block names)."""
    return _remap(sd, _OFFICIAL, _ADAPTER, "ControlNet")


def adapter_to_official(sd: dict) -> dict:
    """The diffusers adapter's keys → `controlnet.{i}.*`."""
    return _remap(sd, _ADAPTER, _OFFICIAL, ADAPTER_CLASS)


def count_blocks(sd: dict, name: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(r"controlnet\.(\d+)\.", k))}
    if not found:
        raise PixsigmaError(f"{name}: no controlnet.<i>.* weights; is this a ControlNet checkpoint?")
    return max(found) + 1


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_adapter_folder(folder: Path) -> tuple[dict, dict]:
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PixsigmaError(f"{config_path}: not a readable config.json ({' '.join(str(e).split())})") from None
    if config.get("_class_name") != ADAPTER_CLASS:
        raise PixsigmaError(f"{config_path}: _class_name is {config.get('_class_name')!r}; expected {ADAPTER_CLASS}")
    weights = folder / DIFFUSERS_WEIGHTS
    if not weights.is_file():
        raise PixsigmaError(f"{folder}: no {DIFFUSERS_WEIGHTS} beside config.json")
    meta = {"base_hash": config.get("pixsigma_base_hash"), "base_dtype": config.get("pixsigma_base_dtype")}
    return adapter_to_official(_read_safetensors(weights)[0]), meta


def read_controlnet(path) -> tuple[dict, dict, dict]:
    """(the `controlnet.*` weights, the file's base weights or {}, the file's metadata) from any layout."""
    path = Path(path)
    if not path.exists():
        raise PixsigmaError(f"{path}: does not exist; expected a ControlNet checkpoint (official .pth, pixsigma "
                            f".safetensors, or a diffusers {ADAPTER_CLASS} folder)")
    meta = {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PixsigmaError(f"{path}: no config.json; expected a diffusers {ADAPTER_CLASS} folder")
        sd, meta = _read_adapter_folder(path)
    elif path.suffix == ".safetensors":
        sd, file_meta = _read_safetensors(path)
        if META_KEY in file_meta:
            meta = json.loads(file_meta[META_KEY])
        if any(k.startswith("controlnet_blocks.") for k in sd):
            sd = adapter_to_official(sd)
    else:
        sd = _read_pth(path)
    base = {k[len(BASE_PREFIX):]: v for k, v in sd.items() if k.startswith(BASE_PREFIX)}
    base.pop("pos_embed", None)  # a fixed buffer in the official code, recomputed per size here
    own = {k: v for k, v in sd.items() if not k.startswith(BASE_PREFIX)}
    return own, base, meta


def _base_from_weights(sd: dict, name: str, overrides: dict) -> PixArtSigmaTransformer:
    config = infer_config(sd, {k: v for k, v in overrides.items() if v is not None}, name)
    with torch.device("meta"):
        model = PixArtSigmaTransformer(config)
    check_state_dict(model, sd, f"{name} (base_model)")
    model.load_state_dict(sd, assign=True)
    return model


def _resolve_base(base, file_base: dict, meta: dict, name: str, overrides: dict) -> PixArtSigmaTransformer:
    """The base model: the given one (a module or a path), else the file's, else the error that one is needed."""
    if isinstance(base, PixArtSigmaTransformer):
        model = base
    elif base is not None:
        model = load_transformer(base, **overrides)
    elif file_base:
        return _base_from_weights(file_base, name, overrides)
    else:
        named = f" (weights hash {meta['base_hash']})" if meta.get("base_hash") else ""
        raise PixsigmaError(f"{name}: holds no base model; pass base= (the transformer this ControlNet was trained on{named})")
    check_base(model, meta, file_base, name)
    return model


def check_base(model: PixArtSigmaTransformer, meta: dict, file_base: dict, name: str) -> None:
    """A one-line error when `model` is not the base the ControlNet names (by hash) or holds (by shapes)."""
    if file_base:
        check_state_dict(model, file_base, f"{name} (its base_model against the given base)")
        if weights_hash(file_base) != weights_hash(model.state_dict()):
            log.warning("%s: the given base's weights differ from the file's base_model; using the given base", name)
    want = meta.get("base_hash")
    if not want:
        return
    sd = model.state_dict()
    dtypes = {dtype_name(v.dtype) for v in sd.values() if v.is_floating_point()}
    if meta.get("base_dtype") and dtypes != {meta["base_dtype"]}:
        log.warning("%s: the base is in %s, the ControlNet was saved against %s weights: hash not checked",
                    name, "/".join(sorted(dtypes)), meta["base_dtype"])
        return
    got = weights_hash(sd)
    if got != want:
        raise PixsigmaError(f"{name}: trained on the base with weights hash {want}, but the given base has {got}; "
                            "expected the same base model")


def load_controlnet(path, base=None, device="cpu", dtype=None, **overrides) -> ControlNetTransformer:
    """A ControlNetTransformer from any supported layout (module docstring).

    base: a PixArtSigmaTransformer or a path `load_transformer` reads; needed unless the file
    holds the base (official layout). Overrides as `load_transformer`'s (num_heads,
    sample_size, pe_interpolation, ...) for the base. The whole model, base included, is frozen
    and in eval mode; call `requires_grad_` on `trainable_parameters()` to train it.
    """
    name = str(path)
    own, file_base, meta = read_controlnet(path)
    model = _resolve_base(base, file_base, meta, name, overrides)
    n = count_blocks(own, name)
    if meta.get("num_blocks") not in (None, n):
        raise PixsigmaError(f"{name}: metadata names {meta['num_blocks']} blocks but the weights hold {n}")
    if model.config.depth <= n:
        raise PixsigmaError(f"{name}: {n} copied blocks need a base deeper than {n} blocks; the base has {model.config.depth}")
    net = ControlNetTransformer(model, n)
    check_state_dict(torch.nn.ModuleDict({"controlnet": net.controlnet}), own, f"{name} (the ControlNet on this base)")
    net.controlnet.load_state_dict({k.removeprefix("controlnet."): v for k, v in own.items()})
    net.requires_grad_(False)
    if dtype is not None:
        net = net.to(dtype)
    return net.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def controlnet_metadata(net: ControlNetTransformer) -> dict:
    base_sd = net.base_model.state_dict()
    dtypes = sorted({dtype_name(v.dtype) for v in base_sd.values() if v.is_floating_point()})
    return {"num_blocks": net.num_blocks, "base_hash": weights_hash(base_sd), "base_dtype": "/".join(dtypes),
            "base_config": config_to_dict(net.config)}


def save_controlnet(net: ControlNetTransformer, path, to: str = "controlnet", extra_metadata: dict | None = None) -> Path:
    """Write `net` as `to`: "controlnet" (ControlNet-only .safetensors naming its base by hash;
    `extra_metadata` strings join its metadata), "official" (.pth with the base) or "diffusers" (a
    PixArtControlNetAdapterModel folder)."""
    if to == "controlnet":
        meta = {**(extra_metadata or {}), META_KEY: json.dumps(controlnet_metadata(net))}
        return write_safetensors(path, net.controlnet_state_dict(), meta)
    if to == "official":
        sd = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
        return atomic_write(path, lambda tmp: torch.save({"state_dict": sd}, tmp))
    if to == "diffusers":
        folder = Path(path)
        weights = official_to_adapter(net.controlnet_state_dict())  # refuses what diffusers cannot hold, before writing
        write_safetensors(folder / DIFFUSERS_WEIGHTS, weights, {"format": "pt"})
        meta = controlnet_metadata(net)
        write_json(folder / "config.json", {"_class_name": ADAPTER_CLASS, "num_layers": net.num_blocks,
                                            "pixsigma_base_hash": meta["base_hash"], "pixsigma_base_dtype": meta["base_dtype"]})
        return folder
    raise PixsigmaError(f"unknown ControlNet checkpoint format {to!r}; expected one of {FORMATS}")
