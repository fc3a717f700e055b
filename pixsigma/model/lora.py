"""LoRA adapters on the one PixArt-Σ transformer, with peft underneath.

peft does the adapter layers (LoRA, DoRA, rsLoRA, dropout, merging, several adapters at once);
this module decides where they go, and reads and writes the files the PixArt ecosystem uses.

Where adapters go. Adapters are named by diffusers' module names (`transformer_blocks.3.attn1.to_q`,
`pos_embed.proj`, ...), which every LoRA file uses. Our transformer keeps the official fused
projections (self-attention `qkv`, cross-attention `kv_linear`); a LoRA on diffusers' separate
to_q / to_k / to_v must act on each piece alone, so before adapters attach, a fused projection
is split into a `SplitLinear` holding one Linear per piece (same weights, same output). When the
last adapter is unloaded, or while adapters are fused, the model has its plain structure again.
Target presets (`targets` of `LoraSpec`):
- "attention": self- and cross-attention to_q, to_k, to_v, to_out.0;
- "attention+mlp": also ff.net.0.proj and ff.net.2;
- "all": also the patch embedding conv, the timestep MLP, the adaLN linear, the caption projection
  and proj_out (the target list of the official LoRA script);
or explicit module names, diffusers' or ours, matched whole or as a dotted suffix ("to_q").

Files read (`read_lora_file`):
- this project's file: `transformer.<module>.lora_A.weight` / `.lora_B.weight` / `.alpha`, and
  rank, alpha, targets and the base model's hash in the metadata (`save_lora` writes it; it is
  the layout ComfyUI's PixArt loader reads);
- the official script's `pytorch_lora_weights.safetensors` (`unet.base_model.model.` keys) and a
  PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`, `base_model.model.`
  keys); a file without alpha uses the adapter_config.json beside it, else alpha 8 (peft's
  default, which the official script keeps);
- kohya-style files: `lora_down` / `lora_up` / `alpha`, dotted or `lora_unet_…` underscore names.
Unknown keys, a module missing one of its two matrices, and shapes that do not fit the model
are one-line errors; nothing is loaded partially.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pixsigma.errors import PixsigmaError
from pixsigma.io import write_safetensors, weights_hash
from pixsigma.model.checkpoint import _BLOCK_COPY, _BLOCK_SPLIT, _COPY, _read_safetensors

log = logging.getLogger(__name__)

TARGET_PRESETS = ("attention", "attention+mlp", "all")
DEFAULT_ALPHA = 8.0  # peft's default lora_alpha: what a file without alpha was trained with
FILE_PREFIX = "transformer."  # diffusers' component prefix for the transformer's LoRA keys
KEY_PREFIXES = ("unet.base_model.model.", "base_model.model.", "transformer.", "unet.", "lora_unet_", "lora_transformer_")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
OFFICIAL_WEIGHTS = "pytorch_lora_weights.safetensors"
_SUFFIXES = {  # key suffix -> role
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha",
    ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
}


# ---------------------------------------------------------------------------------------------
# What adapters are: a spec, and the state kept on a model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    """A new adapter to train: rank, alpha (None: = rank, scale 1), dropout, targets (a preset
    name or module names), DoRA / rsLoRA, and the init of A ("gaussian" as the official script,
    or "kaiming", peft's default; B starts at zero either way, so the model starts unchanged)."""

    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention",)
    use_dora: bool = False
    use_rslora: bool = False
    init: str = "gaussian"

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple([self.targets] if isinstance(self.targets, str) else self.targets))
        if self.rank < 1:
            raise PixsigmaError(f"lora rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise PixsigmaError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("gaussian", "kaiming"):
            raise PixsigmaError(f"lora init {self.init!r} is unknown; expected gaussian or kaiming")
        if not self.targets:
            raise PixsigmaError(f"lora targets are empty; expected one of {TARGET_PRESETS} or module names")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


@dataclass
class LoraState:
    """Kept on a model as `model.lora_state` while it has adapters (a plain attribute, not weights)."""

    base_hash: str  # weights_hash of the model the first adapter attached to
    adapters: dict = field(default_factory=dict)  # name -> {"rank", "alpha", "targets", "use_dora", "use_rslora"}
    active: list = field(default_factory=list)
    weights: dict = field(default_factory=dict)  # name -> scale set by set_adapters / load
    fused: list | None = None  # while fused: [(module path, the adapter-carrying module taken out)]


def lora_state(model) -> LoraState | None:
    return getattr(model, "lora_state", None)


def is_quantized(model) -> bool:
    """Whether the transformer's blocks are quantized (pixsigma.model.quantize): adapters then run
    beside the quantized layers in the compute dtype, and cannot be merged into them."""
    return bool(getattr(model, "quantization", None))


def is_adapter_param(name: str) -> bool:
    """Whether a parameter name (of a model with adapters) is an adapter weight."""
    return ".lora_" in name


def adapter_parameters(model) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every adapter weight, in module order (the same order on a deep copy)."""
    return [(n, p) for n, p in model.named_parameters() if is_adapter_param(n)]


# ---------------------------------------------------------------------------------------------
# Split fused projections
# ---------------------------------------------------------------------------------------------


class SplitLinear(nn.Module):
    """A fused projection as one layer per piece, named as diffusers names them (to_q, to_k, to_v).

    forward(x) = cat(piece(x)): the fused layer's output exactly, so a LoRA on one piece changes
    only that piece's rows, as in diffusers. A float fused Linear becomes one Linear per piece
    (its row blocks; merging works on each). A quantized one stays whole (`whole`) and each
    piece is a `RowSlice` of its output (quantized weights are not cut up or re-quantized).
    The forward takes `lora_layers.split_forward`'s fast path where it applies.
    """

    def __init__(self, fused: nn.Module, names: tuple[str, ...], keep_whole: bool = False):
        super().__init__()
        self.names = tuple(names)
        n = len(names)
        self.whole = fused if keep_whole else None
        # pieces and the re-fused layer keep the model's Linear class (its CPU fast path)
        self.layer_type = type(fused) if isinstance(fused, nn.Linear) else nn.Linear
        if keep_whole:
            from pixsigma.model.lora_layers import RowSlice

            size = fused.out_features // n
            for i, name in enumerate(self.names):
                setattr(self, name, RowSlice(fused, i * size, (i + 1) * size))
            return
        weights, biases = fused.weight.detach().chunk(n, dim=0), (fused.bias.detach().chunk(n) if fused.bias is not None else [None] * n)
        for name, w, b in zip(self.names, weights, biases):
            piece = self.layer_type(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                piece.weight.copy_(w)
                if b is not None:
                    piece.bias.copy_(b)
            piece.requires_grad_(fused.weight.requires_grad)
            setattr(self, name, piece)

    def pieces(self) -> list[nn.Module]:
        return [getattr(self, n) for n in self.names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pixsigma.model.lora_layers import split_forward

        out = split_forward(self, x)
        return out if out is not None else torch.cat([piece(x) for piece in self.pieces()], dim=-1)  # (..., n·D)

    def fused(self) -> nn.Module:
        """The fused layer of the pieces' base weights (adapters left out); the kept one if whole."""
        if self.whole is not None:
            return self.whole
        bases = [_base_layer(p) for p in self.pieces()]
        w = torch.cat([b.weight.detach() for b in bases])
        out = self.layer_type(w.shape[1], w.shape[0], bias=bases[0].bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if out.bias is not None:
                out.bias.copy_(torch.cat([b.bias.detach() for b in bases]))
        out.requires_grad_(bases[0].weight.requires_grad)
        return out


def _base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ---------------------------------------------------------------------------------------------
# Module names: diffusers' <-> ours
# ---------------------------------------------------------------------------------------------


def module_names(model) -> dict[str, str]:
    """diffusers module name -> our module path (split pieces as `…qkv.to_q`), for every module an
    adapter may attach to, in model order."""
    names = {}
    for ours, theirs in _COPY.items():
        if hasattr(model, ours.partition(".")[0]):  # the micro-condition embedders only on α 1024-MS models
            names[theirs] = ours
    for i in range(model.config.depth):
        for ours, theirs in _BLOCK_COPY.items():
            names[f"transformer_blocks.{i}.{theirs}"] = f"blocks.{i}.{ours}"
        for fused, pieces in _BLOCK_SPLIT.items():
            for piece in pieces:
                names[f"transformer_blocks.{i}.{piece}"] = f"blocks.{i}.{fused}.{piece.rpartition('.')[2]}"
    return names


def _group(diffusers_name: str) -> str:
    if ".attn1." in diffusers_name or ".attn2." in diffusers_name:
        return "attention"
    if ".ff." in diffusers_name:
        return "mlp"
    return "other"


def resolve_targets(model, targets) -> list[str]:
    """The diffusers module names a target list selects (a preset, or names matched whole or as a
    dotted suffix, in diffusers' naming or ours)."""
    names = module_names(model)
    targets = [targets] if isinstance(targets, str) else list(targets)
    if len(targets) == 1 and targets[0] in TARGET_PRESETS:
        groups = {"attention": {"attention"}, "attention+mlp": {"attention", "mlp"}, "all": {"attention", "mlp", "other"}}[targets[0]]
        return [d for d in names if _group(d) in groups]
    chosen, unmatched = [], []
    for target in targets:
        hits = [d for d, o in names.items() if any(n == target or n.endswith("." + target) for n in (d, o))]
        if not hits:
            unmatched.append(target)
        chosen += [d for d in hits if d not in chosen]
    if unmatched:
        raise PixsigmaError(f"lora targets {unmatched} match no module of this transformer; expected one of {TARGET_PRESETS} "
                            f"or module names such as to_q, attn1.to_out.0, ff.net.2, {next(iter(names))}")
    return chosen


def _split_for(model, paths: list[str]) -> None:
    """Replace each fused projection that a target path lies in by a SplitLinear."""
    for fused, pieces in _BLOCK_SPLIT.items():
        for i in range(model.config.depth):
            path = f"blocks.{i}.{fused}"
            module = model.get_submodule(path)
            if not isinstance(module, SplitLinear) and any(p.startswith(path + ".") for p in paths):
                names = tuple(p.rpartition(".")[2] for p in pieces)
                _set_module(model, path, SplitLinear(module, names, keep_whole=is_quantized(model)))


def _unsplit(model) -> None:
    for path, module in list(model.named_modules()):
        if isinstance(module, SplitLinear):
            _set_module(model, path, module.fused())


# ---------------------------------------------------------------------------------------------
# Attaching adapters (peft)
# ---------------------------------------------------------------------------------------------


def _peft_config(paths: list[str], rank: int, alpha: float, dropout: float = 0.0, use_dora: bool = False,
                 use_rslora: bool = False, init="gaussian", ranks: dict | None = None, alphas: dict | None = None):
    from peft import LoraConfig

    from pixsigma.model.lora_layers import FastLoraLinear, RowSlice
    from pixsigma.model.quantize import SVDQuantLinear

    ranks, alphas = ranks or {}, alphas or {}
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(paths), use_dora=use_dora, use_rslora=use_rslora,
        init_lora_weights={"gaussian": "gaussian", "kaiming": True, "none": False}[init],
        rank_pattern={re.escape(p): r for p, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != alpha},
    )
    # peft's own LoRA Linear with the inference fast path, on float and quantized linears alike
    config._register_custom_module({nn.Linear: FastLoraLinear, RowSlice: FastLoraLinear, SVDQuantLinear: FastLoraLinear})
    return config


def _attach(model, adapter_name: str, paths: list[str], peft_config, info: dict) -> None:
    """Split what needs splitting, inject the peft layers, and record the adapter on the model."""
    from peft import inject_adapter_in_model

    state = lora_state(model)
    if state is not None and state.fused is not None:
        raise PixsigmaError("the model's adapters are fused; unfuse_lora() before adding another adapter")
    if state is not None and adapter_name in state.adapters:
        raise PixsigmaError(f"adapter name {adapter_name!r} is already in use; expected a new name (in use: {sorted(state.adapters)})")
    if state is None:
        from pixsigma.model.quantize import plain_state_dict  # quantized weights hash as their stored tensors

        state = LoraState(base_hash=weights_hash(plain_state_dict(model)))
    _split_for(model, paths)
    with warnings.catch_warnings():  # peft warns on every second adapter; several adapters are intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(peft_config, model, adapter_name=adapter_name)
    if is_quantized(model):  # quantized layers give peft no float weight to take dtype and device from
        from pixsigma.model.quantize import COMPUTE_DTYPE

        device = model.x_embedder.proj.weight.device
        for n, p in adapter_parameters(model):
            if f".{adapter_name}." in n or n.endswith(f".{adapter_name}"):
                p.data = p.data.to(device=device, dtype=COMPUTE_DTYPE)
    state.adapters[adapter_name] = info
    state.weights[adapter_name] = 1.0
    model.lora_state = state
    set_adapters(model, [*state.active, adapter_name], [state.weights[n] for n in state.active] + [1.0])


def add_lora(model, spec: LoraSpec, adapter_name: str = "default") -> list[str]:
    """Attach a new trainable adapter (B = 0: the output is unchanged); only adapter weights keep
    requires_grad. Returns the diffusers names of the adapted modules."""
    if is_quantized(model):
        raise PixsigmaError("adapters train on the float transformer, not a quantized one; expected add_lora before quantizing, "
                            "then load the saved LoRA onto the quantized model")
    targets = resolve_targets(model, spec.targets)
    names = module_names(model)
    paths = [names[d] for d in targets]
    config = _peft_config(paths, spec.rank, spec.lora_alpha, spec.dropout, spec.use_dora, spec.use_rslora, spec.init)
    info = {"rank": spec.rank, "alpha": spec.lora_alpha, "targets": list(spec.targets), "use_dora": spec.use_dora,
            "use_rslora": spec.use_rslora}
    _attach(model, adapter_name, paths, config, info)
    for n, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(n) and f".{adapter_name}." in n)
    return targets


def _layers(model):
    from peft.tuners.lora import LoraLayer

    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLayer)]


def set_adapters(model, names, weights=None) -> None:
    """Make `names` the active adapters, each scaled by its weight (default 1): the output is the
    base plus the weighted sum of their updates."""
    state = _require(model)
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0] * len(names) if weights is None else ([weights] * len(names) if isinstance(weights, (int, float)) else list(weights))
    unknown = [n for n in names if n not in state.adapters]
    if unknown or len(weights) != len(names):
        raise PixsigmaError(f"set_adapters: unknown adapters {unknown} or {len(weights)} weights for {len(names)} names; "
                            f"expected names among {sorted(state.adapters)} and one weight each")
    if state.fused is not None:
        raise PixsigmaError("the model's adapters are fused; unfuse_lora() before changing them")
    for _, layer in _layers(model):
        layer.set_adapter([n for n in names if n in layer.lora_A], inference_mode=True)  # add_lora unfreezes what trains
        for name, weight in zip(names, weights):
            layer.set_scale(name, float(weight))
    state.active, state.weights = names, {**state.weights, **dict(zip(names, map(float, weights)))}


def _require(model) -> LoraState:
    state = lora_state(model)
    if state is None or not state.adapters:
        raise PixsigmaError("the model has no LoRA adapter; load one first (load_lora / pipe.load_lora_weights)")
    return state


# ---------------------------------------------------------------------------------------------
# Fuse / unfuse / unload
# ---------------------------------------------------------------------------------------------


def fuse_lora(model, lora_scale: float = 1.0) -> None:
    """Merge the active adapters (times lora_scale) into the base weights and give the model its
    plain structure (no adapter layers in the forward: a fused model runs as fast as the base).
    `unfuse_lora` restores the adapters and the base weights."""
    state = _require(model)
    if state.fused is not None:
        raise PixsigmaError("the model's adapters are already fused; unfuse_lora() first")
    if is_quantized(model):
        raise PixsigmaError(f"fuse_lora: the transformer is quantized ({model.quantization['mode']}) and merging would re-quantize "
                            "its weights; expected adapters left unfused (they run beside the quantized layers)")
    stash = []
    with torch.no_grad():
        for _, layer in _layers(model):
            layer.scale_layer(lora_scale)
            layer.merge(adapter_names=[n for n in layer.active_adapters if n in layer.lora_A])
        for path, module in list(model.named_modules()):
            if isinstance(module, SplitLinear):
                stash.append((path, module))
                _set_module(model, path, module.fused())
        for path, layer in _layers(model):
            stash.append((path, layer))
            _set_module(model, path, layer.get_base_layer())
    state.fused = stash


def unfuse_lora(model) -> None:
    """Undo `fuse_lora`: the adapter layers come back and the base weights lose the merged updates."""
    state = _require(model)
    if state.fused is None:
        return
    with torch.no_grad():
        for path, module in reversed(state.fused):
            _set_module(model, path, module)
        for _, layer in _layers(model):
            if layer.merged:
                layer.unmerge()
    state.fused = None
    set_adapters(model, state.active, [state.weights[n] for n in state.active])  # the scales fuse_lora multiplied


def unload_lora(model) -> None:
    """Remove every adapter. A fused model keeps the merged weights (as diffusers' fuse then
    unload); otherwise the base weights come back unchanged."""
    state = lora_state(model)
    if state is None:
        return
    if state.fused is None:
        for path, layer in _layers(model):
            _set_module(model, path, layer.get_base_layer())
        _unsplit(model)
    for n, p in model.named_parameters():
        p.requires_grad_(True)
    for attr in ("lora_state", "peft_config"):
        if hasattr(model, attr):
            delattr(model, attr)


def _adapter_layers(model) -> list[tuple[str, nn.Module]]:
    """(path, peft layer) of every adapter layer, fused (set aside) or not."""
    from peft.tuners.lora import LoraLayer

    state = lora_state(model)
    if state is None or state.fused is None:
        return _layers(model)
    out = []
    for path, module in state.fused:
        if isinstance(module, LoraLayer):
            out.append((path, module))
        elif isinstance(module, SplitLinear):
            out += [(f"{path}.{n}", p) for n, p in zip(module.names, module.pieces()) if isinstance(p, LoraLayer)]
    return out


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _locate(path: Path) -> tuple[Path, dict]:
    """(weights file, PEFT adapter_config.json contents or {}) for a LoRA path: a file, a PEFT
    folder, or the official script's output folder (with or without `transformer_lora/`)."""
    if path.is_dir():
        if (path / "transformer_lora").is_dir():
            path = path / "transformer_lora"
        for name in (PEFT_WEIGHTS, OFFICIAL_WEIGHTS):
            if (path / name).is_file():
                return _locate(path / name)
        singles = sorted(path.glob("*.safetensors"))
        if len(singles) != 1:
            raise PixsigmaError(f"{path}: no LoRA weights found; expected {PEFT_CONFIG} + {PEFT_WEIGHTS}, {OFFICIAL_WEIGHTS}, "
                                "or a folder holding one .safetensors file")
        path = singles[0]
    if not path.is_file():
        raise PixsigmaError(f"{path}: does not exist; expected a LoRA .safetensors file or a PEFT adapter folder")
    if path.suffix != ".safetensors":
        raise PixsigmaError(f"{path}: LoRA files are read as .safetensors only (a pickle could run code); convert it first")
    config = {}
    if (path.parent / PEFT_CONFIG).is_file():
        try:
            config = json.loads((path.parent / PEFT_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise PixsigmaError(f"{path.parent / PEFT_CONFIG}: not valid JSON ({e})") from None
    return path, config


def _parse_keys(sd: dict, names: dict[str, str], source: str) -> dict[str, dict]:
    """{diffusers module name: {"A", "B", "alpha"?, "magnitude"?}} from any supported key layout."""
    ours = {o: d for d, o in names.items()}
    underscored = {d.replace(".", "_"): d for d in names}
    suffixes = sorted(_SUFFIXES, key=len, reverse=True)
    modules, unknown = {}, []
    for key, tensor in sd.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        stem = key[: -len(suffix)] if suffix else key
        found = None
        for prefix in ("", *KEY_PREFIXES):
            if stem.startswith(prefix):
                s = stem[len(prefix):]
                found = s if s in names else ours.get(s) or underscored.get(s)
                if found:
                    break
        if suffix is None or found is None:
            unknown.append(key)
            continue
        modules.setdefault(found, {})[_SUFFIXES[suffix]] = tensor
    if unknown:
        raise PixsigmaError(f"{source}: {len(unknown)} of {len(sd)} keys are not LoRA weights of this transformer, first "
                            f"{unknown[:5]}; expected <module>.lora_A/lora_B(.weight) or lora_down/lora_up, with diffusers module names")
    if not modules:
        raise PixsigmaError(f"{source}: holds no LoRA weights; expected <module>.lora_A.weight / lora_B.weight keys")
    half = sorted(d for d, m in modules.items() if not ("A" in m and "B" in m))
    if half:
        raise PixsigmaError(f"{source}: {half[0]} has only one of its two LoRA matrices ({len(half)} such modules); expected lora_A and lora_B")
    return modules


def _base_shape(model, path: str) -> tuple[int, int, tuple]:
    """(in features, out features, conv kernel or ()) of the module at our path, split or not."""
    try:
        base = _base_layer(model.get_submodule(path))
        if isinstance(base, SplitLinear):
            raise AttributeError
    except AttributeError:
        parent, _, piece = path.rpartition(".")
        fused = _base_layer(model.get_submodule(parent))
        pieces = next(p for f, p in _BLOCK_SPLIT.items() if parent.endswith(f))
        return fused.in_features, fused.out_features // len(pieces), ()
    if isinstance(base, nn.Conv2d):
        return base.in_channels, base.out_channels, tuple(base.kernel_size)
    return base.in_features, base.out_features, ()


def _check_shapes(model, modules: dict, names: dict, source: str) -> None:
    for d, m in modules.items():
        fan_in, fan_out, kernel = _base_shape(model, names[d])
        a, b = tuple(m["A"].shape), tuple(m["B"].shape)
        r = a[0]
        ok = a == (r, fan_in, *kernel) and b == (fan_out, r, *((1, 1) if kernel else ()))
        if ok and "magnitude" in m:
            ok = tuple(m["magnitude"].shape) == (fan_out,)
        if not ok:
            raise PixsigmaError(f"{source}: LoRA for {d} has lora_A {a} and lora_B {b}, but this model's {names[d]} maps "
                                f"{fan_in} -> {fan_out} features (expects lora_A ({r}, {fan_in}{''.join(f', {k}' for k in kernel)}) "
                                f"and lora_B ({fan_out}, {r}{', 1, 1' if kernel else ''})); is the LoRA for another base model?")


def read_lora_file(model, path) -> tuple[dict, dict]:
    """({diffusers module name: {"A", "B", "alpha", "magnitude"?}}, file facts) of a LoRA path,
    checked against `model` (names, both matrices, shapes). alpha is per module (a file without
    it takes adapter_config.json's lora_alpha, else 8); file facts: use_rslora, base hash, spec."""
    weights, config = _locate(Path(path))
    sd, meta = _read_safetensors(weights)
    names = module_names(model)
    modules = _parse_keys(sd, names, str(weights))
    _check_shapes(model, modules, names, str(weights))
    default_alpha = float(config.get("lora_alpha", DEFAULT_ALPHA))
    has_alpha = any("alpha" in m for m in modules.values())
    for d, m in modules.items():
        m["alpha"] = float(m["alpha"].float().item()) if "alpha" in m else default_alpha
    spec = json.loads(meta.get("pixsigma_lora", "{}"))
    facts = {
        # an alpha stored per module already includes rsLoRA's rank scaling (see save_lora)
        "use_rslora": bool(config.get("use_rslora", False)) and not has_alpha,
        "base_hash": meta.get("base_model_hash"), "spec": spec, "file": str(weights),
    }
    return modules, facts


def _free_name(model) -> str:
    state = lora_state(model)
    used = set(state.adapters) if state else set()
    return next(f"default_{i}" for i in range(len(used) + 1) if f"default_{i}" not in used)


def load_lora(model, path, scale: float = 1.0, adapter_name: str | None = None) -> str:
    """Attach the LoRA at `path` (any supported file or folder) as a new adapter, active at
    `scale` beside the adapters already active. Returns its adapter name."""
    modules, facts = read_lora_file(model, path)
    name = adapter_name or _free_name(model)
    names = module_names(model)
    paths = [names[d] for d in modules]
    ranks = {names[d]: int(m["A"].shape[0]) for d, m in modules.items()}
    alphas = {names[d]: m["alpha"] for d, m in modules.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    use_dora = any("magnitude" in m for m in modules.values())
    if use_dora and is_quantized(model):
        raise PixsigmaError(f"{facts['file']}: a DoRA adapter needs the float base weights; expected a float transformer "
                            "(load it before quantizing, or use a plain LoRA)")
    state = lora_state(model)
    base = state.base_hash if state else None
    if facts["base_hash"] and base and facts["base_hash"] != base:
        log.warning("%s was trained on base model %s; this model is %s", facts["file"], facts["base_hash"], base)
    config = _peft_config(paths, rank, alpha, use_dora=use_dora, use_rslora=facts["use_rslora"], init="none",
                          ranks=ranks, alphas=alphas)
    info = {"rank": rank, "alpha": alpha, "targets": facts["spec"].get("targets", sorted(modules)), "use_dora": use_dora,
            "use_rslora": facts["use_rslora"], "file": facts["file"]}
    _attach(model, name, paths, config, info)
    with torch.no_grad():
        for d, m in modules.items():
            layer = model.get_submodule(names[d])
            layer.lora_A[name].weight.copy_(m["A"])
            layer.lora_B[name].weight.copy_(m["B"])
            if "magnitude" in m:
                layer.lora_magnitude_vector[name].weight.copy_(m["magnitude"])
    state = lora_state(model)
    set_adapters(model, state.active, [scale if n == name else state.weights[n] for n in state.active])
    log.info("loaded LoRA %s as adapter %r (%d modules, rank %d, scale %g)", facts["file"], name, len(modules), rank, scale)
    return name


def lora_tensors(model, adapter_name: str | None = None) -> tuple[dict, dict]:
    """(tensors in the file layout, metadata) of one adapter: diffusers module names under
    `transformer.`, lora_A / lora_B, one `.alpha` per module (rsLoRA's rank scaling folded in, so
    that every reader's scale alpha / rank is right), DoRA magnitudes."""
    import math

    state = _require(model)
    if adapter_name is None:
        if len(state.adapters) != 1:
            raise PixsigmaError(f"the model has {len(state.adapters)} adapters {sorted(state.adapters)}; name the one to save")
        adapter_name = next(iter(state.adapters))
    if adapter_name not in state.adapters:
        raise PixsigmaError(f"no adapter named {adapter_name!r}; the model has {sorted(state.adapters)}")
    info = state.adapters[adapter_name]
    ours = {o: d for d, o in module_names(model).items()}
    tensors = {}
    for path, layer in _adapter_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        key = FILE_PREFIX + ours[path]
        r, alpha = layer.r[adapter_name], layer.lora_alpha[adapter_name]
        tensors[f"{key}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach().float()
        tensors[f"{key}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach().float()
        tensors[f"{key}.alpha"] = torch.tensor(alpha * math.sqrt(r) if layer.use_rslora.get(adapter_name) else alpha)
        if adapter_name in layer.lora_magnitude_vector:
            tensors[f"{key}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight.detach().float()
    meta = {"format": "pt", "rank": str(info["rank"]), "alpha": str(info["alpha"]), "targets": json.dumps(info["targets"]),
            "base_model_hash": state.base_hash,
            "pixsigma_lora": json.dumps({k: v for k, v in info.items() if k != "file"})}
    return tensors, meta


def save_lora(model, path, adapter_name: str | None = None, extra_metadata: dict | None = None) -> Path:
    """Write one adapter as a LoRA safetensors file (see `lora_tensors`), atomically."""
    tensors, meta = lora_tensors(model, adapter_name)
    return write_safetensors(path, tensors, {**meta, **(extra_metadata or {})})


def merge_lora(base, lora, out, scale: float = 1.0) -> Path:
    """Write base + scale × LoRA as a full pixsigma checkpoint (the base's dtype; merged in fp32)."""
    from pixsigma.model.checkpoint import load_transformer, save_safetensors

    model = load_transformer(base)
    dtype = next(model.parameters()).dtype
    model = model.float()
    load_lora(model, lora, adapter_name="merged")
    fuse_lora(model, scale)
    unload_lora(model)
    model.history = [*model.history, {"transition": "lora_merge", "lora": Path(lora).name, "scale": float(scale)}]
    return save_safetensors(model.to(dtype), out)
