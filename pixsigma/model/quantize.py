"""Quantized inference: 8-bit and 4-bit weights, and SVDQuant's W4A4 with a low-rank branch.

Modes (`quantize_transformer(model, mode)`):
- "int8": weight-only; each output channel's weights as symmetric int8 with one scale
  (torchao `Int8WeightOnlyConfig`); activations stay bf16.
- "int4": weight-only; groups of 64 input weights as asymmetric 4-bit values (scale and zero per
  group), packed two per byte for torch's CPU int4 matmul `_weight_int4pack_mm_for_cpu`
  (torchao `PrototypeInt4WeightOnlyConfig`); activations stay bf16. CPU only.
- "svdquant": weights AND activations in 4 bits (W4A4), SVDQuant-style. Per input channel j the
  activation outliers move into the weights (smoothing: X/λ, W·diag(λ), λ_j = max|X_j|^α /
  max|W_j|^(1−α), X's maxima measured on calibration prompts); the top-r singular components
  of the smoothed weight stay in bf16 as a low-rank branch (up @ down); only the residual is
  quantized, per group of 64 input channels, symmetric 4-bit; the smoothed activations entering
  the residual matmul are quantized the same way, per token and group, at run time. No W4A4
  kernel exists for CPU in torch or torchao, so this mode is SIMULATED: weights are stored in
  4 bits (packed two per byte) and dequantized for each call, activations are rounded to their
  4-bit values and multiplied in bf16. It measures the method's error and storage, not its speed.

Every mode replaces the `nn.Linear` layers inside the transformer blocks (attention, cross-
attention, MLP: nearly all of the weights and the compute); the embedders, adaLN and the final
layer stay in bf16, the compute dtype of a quantized model.

LoRA adapters load on top of a quantized model (quantize first, then `load_lora`): each adapted
layer computes quantized base(x) + Σ s·B(A x) with the adapters in the compute dtype; they cannot
be fused into the integer weights (see pixsigma.model.lora).

A quantized model saves to one safetensors file with its integer weights, scales and low-rank
factors (`save_quantized`) and loads back without re-quantizing (`load_quantized`). The text
encoder's linears take the int8 / int4 weight-only modes through `quantize_linears`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pixsigma.errors import PixsigmaError
from pixsigma.io import as_dtype, dtype_name, write_safetensors
from pixsigma.model.checkpoint import CONFIG_KEY, HISTORY_KEY, check_state_dict, config_from_dict, config_to_dict
from pixsigma.model.transformer import PixArtSigmaTransformer

log = logging.getLogger(__name__)

MODES = ("int8", "int4", "svdquant")
TEXT_MODES = ("int8", "int4")
COMPUTE_DTYPE = torch.bfloat16
INT4_GROUP = 64  # input weights per int4 scale/zero group (weight-only int4)
QUANT_KEY = "pixsigma_quantize"
# Shapes a quantized checkpoint must share with a model it is loaded into.
SHAPE_FIELDS = ("depth", "hidden_size", "num_heads", "mlp_ratio", "patch_size", "in_channels", "learn_sigma",
                "caption_channels", "max_caption_tokens", "qk_norm", "micro_conditions", "kv_compress")


@dataclass(frozen=True)
class SVDQuantConfig:
    """rank: singular components kept in bf16 (0: none); group_size: input channels per 4-bit
    scale (weights and activations); alpha: smoothing strength (None: no smoothing). rank 0 with
    alpha None is naive W4A4."""

    rank: int = 32
    group_size: int = 64
    alpha: float | None = 0.5

    def __post_init__(self):
        if int(self.rank) < 0:
            raise PixsigmaError(f"svdquant rank {self.rank} must be >= 0")
        if int(self.group_size) < 2 or int(self.group_size) % 2:
            raise PixsigmaError(f"svdquant group_size {self.group_size} must be an even number >= 2")
        if self.alpha is not None and not 0.0 <= float(self.alpha) <= 1.0:
            raise PixsigmaError(f"svdquant alpha {self.alpha} must be in [0, 1] (or None for no smoothing)")


NAIVE_W4A4 = SVDQuantConfig(rank=0, alpha=None)

# svdquant calibration: the pipeline generates these with the float model (a few steps each)
# and the blocks' input maxima set the smoothing. They describe the shipped model's world in its
# training captions' phrasing (not the held-out "a photo of ..." phrasing); pass prompts of a
# real model's domain instead.
CALIBRATION_PROMPTS = (
    "a red circle in the top left", "a blue square at the bottom right", "a green triangle in the center",
    "a yellow cross on the left", "two purple circles above an orange square", "a white triangle to the right of a black cross",
    "three pink squares at the top", "a cyan cross below a red triangle",
)
CALIBRATION_STEPS = 8


def check_quantize_args(mode: str | None, text_mode: str | None, device) -> None:
    """One-line errors for a transformer / text-encoder mode that is unknown or cannot run on
    `device`, before anything is loaded. svdquant runs anywhere (simulated)."""
    if mode is not None:
        check_mode(mode)
    if text_mode is not None:
        check_mode(text_mode, TEXT_MODES, "text encoder quantization")
    if "int4" in (mode, text_mode):
        check_int4_kernel(device)


def check_mode(mode: str, modes: tuple[str, ...] = MODES, what: str = "quantization") -> str:
    """The mode, or a one-line error naming the modes there are."""
    if mode not in modes:
        raise PixsigmaError(f"unknown {what} mode {mode!r}; expected one of {', '.join(modes)}")
    return mode


# ---------------------------------------------------------------------------------------------
# 4-bit groups (SVDQuant's residual and activations)
# ---------------------------------------------------------------------------------------------


def quantize_groups(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit per group of `group_size` along the last dim: (int8 values in -8..7,
    float32 scales (..., K/group)); x ≈ values · scale, scale = max|x_group| / 7."""
    *lead, k = x.shape
    g = x.float().reshape(*lead, k // group_size, group_size)
    scale = g.abs().amax(dim=-1).clamp_min(1e-12) / 7.0  # (..., K/group)
    q = torch.clamp(torch.round(g / scale[..., None]), -8, 7).to(torch.int8)
    return q.reshape(*lead, k), scale


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, group_size: int, dtype=torch.float32) -> torch.Tensor:
    *lead, k = q.shape
    g = q.to(dtype).reshape(*lead, k // group_size, group_size) * scale.to(dtype)[..., None]
    return g.reshape(*lead, k)


def fake_quantize_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x rounded to its 4-bit group values, in x's dtype (the simulated activation quantizer)."""
    q, scale = quantize_groups(x, group_size)
    return dequantize_groups(q, scale, group_size, x.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in -8..7 → uint8, two per byte (even index in the low nibble): (..., K/2)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    low = (p & 0x0F).to(torch.int8) - 8
    high = (p >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


# ---------------------------------------------------------------------------------------------
# SVDQuant layer
# ---------------------------------------------------------------------------------------------


def smoothing_factors(act_amax: torch.Tensor | None, weight: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """λ (in_features,) float32: max|X_j|^α / max_i|W_ij|^(1−α); ones without smoothing or data."""
    ones = torch.ones(weight.shape[1])
    if alpha is None or act_amax is None:
        return ones
    w_amax = weight.float().abs().amax(dim=0).clamp_min(1e-5)
    lam = act_amax.float().clamp_min(1e-5) ** alpha / w_amax ** (1.0 - alpha)
    return torch.where(torch.isfinite(lam) & (lam > 0), lam, ones)


def low_rank(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, r), down (r, in)) float32 with up @ down the top-r SVD approximation of weight;
    each factor carries √σ."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


class SVDQuantLinear(nn.Module):
    """y = Q4(x/λ) · Q4(R)ᵀ + ((x/λ) · downᵀ) · upᵀ + b, with R = W·diag(λ) − up·down.

    Q4 is symmetric per-group 4-bit (weights per output row, activations per token); simulated:
    the packed residual is dequantized to bf16 per call. Built by `from_linear`; the empty
    constructor gives the shapes a saved checkpoint loads into."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, group_size: int,
                 dtype=COMPUTE_DTYPE, device=None):
        super().__init__()
        if in_features % group_size:
            raise PixsigmaError(f"svdquant: in_features {in_features} is not a multiple of group_size {group_size}")
        self.in_features, self.out_features, self.rank, self.group_size = in_features, out_features, rank, group_size
        kw = {"device": device}
        self.register_buffer("smooth", torch.ones(in_features, **kw))
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, **kw))
        self.register_buffer("wscale", torch.ones(out_features, in_features // group_size, **kw))
        self.register_buffer("down", torch.zeros(rank, in_features, dtype=dtype, **kw))
        self.register_buffer("up", torch.zeros(out_features, rank, dtype=dtype, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: SVDQuantConfig, act_amax: torch.Tensor | None = None,
                    dtype=COMPUTE_DTYPE) -> "SVDQuantLinear":
        w = linear.weight.detach().float().cpu()
        out = cls(w.shape[1], w.shape[0], linear.bias is not None, config.rank, config.group_size, dtype)
        lam = smoothing_factors(None if act_amax is None else act_amax.cpu(), w, config.alpha)
        smoothed = w * lam[None, :]  # (out, in)
        up, down = low_rank(smoothed, config.rank)
        up, down = up.to(dtype), down.to(dtype)
        residual = smoothed - up.float() @ down.float()  # absorbs the factors' bf16 rounding too
        q, scale = quantize_groups(residual, config.group_size)
        out.smooth.copy_(lam)
        out.qweight.copy_(pack_int4(q))
        out.wscale.copy_(scale)
        out.down.copy_(down)
        out.up.copy_(up)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        return out.to(linear.weight.device)

    def residual_weight(self, dtype) -> torch.Tensor:
        """The dequantized 4-bit residual (out, in)."""
        return dequantize_groups(unpack_int4(self.qweight), self.wscale, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x / self.smooth.to(x.dtype)  # (..., in)
        y = F.linear(fake_quantize_groups(xs, self.group_size), self.residual_weight(x.dtype))  # (..., out)
        if self.rank:
            y = y + F.linear(F.linear(xs, self.down.to(x.dtype)), self.up.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, group={self.group_size}, W4A4 simulated"


# ---------------------------------------------------------------------------------------------
# Weight-only int8 / int4 through torchao
# ---------------------------------------------------------------------------------------------


def _torchao():
    """torchao's quantize_ and the two configs, imported with its start-up chatter hidden (it logs
    a warning per GPU-only extension it cannot load on a CPU build)."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise PixsigmaError(f"int8/int4 quantization needs torchao ({e}); expected `pip install torchao`") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return quantize_, Int8WeightOnlyConfig, PrototypeInt4WeightOnlyConfig


def torchao_tensor_classes() -> dict[str, type]:
    """The torchao weight classes a saved checkpoint may name, by class name."""
    _torchao()
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization import Int8Tensor

    return {"Int8Tensor": Int8Tensor, "Int4OpaqueTensor": Int4OpaqueTensor}


def check_int4_kernel(device) -> None:
    """A one-line error unless torch's CPU int4 matmul can run here."""
    if torch.device(device).type != "cpu":
        raise PixsigmaError(f"int4 weight-only quantization runs on CPU only (torch's CPU int4 kernel); got device "
                            f"{device}; expected --device cpu, or int8 / svdquant")
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise PixsigmaError("int4 weight-only quantization needs torch's CPU int4 kernel (_weight_int4pack_mm_for_cpu), "
                            "which this torch build lacks; expected int8, or svdquant (simulated)")


def quantize_text_encoder(model: nn.Module, mode: str) -> list[str]:
    """A Hugging Face text encoder (T5, MiniLM, ...) in bf16 with its linears int8 / int4
    weight-only (embeddings and norms stay bf16), in place; the names quantized."""
    check_mode(mode, TEXT_MODES, "text encoder quantization")
    model.to(COMPUTE_DTYPE)
    return quantize_linears(model, mode)


def quantize_linears(module: nn.Module, mode: str, names: list[str] | None = None) -> list[str]:
    """Quantize `module`'s nn.Linear layers in place (all of them, or those named), weight-only
    int8 or int4; returns the names quantized. The layers are cast to bf16 first (the int4 kernel
    takes bf16 activations); an int4 layer whose in_features is not a multiple of 64 (or out_features
    of 16, the kernel's tile) is left unquantized."""
    check_mode(mode, TEXT_MODES, "weight-only quantization")
    quantize_, Int8Config, Int4Config = _torchao()
    linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    chosen = [n for n in (names if names is not None else linears) if n in linears]
    if mode == "int4":
        check_int4_kernel(next(module.parameters()).device)
        skipped = [n for n in chosen if linears[n].in_features % INT4_GROUP or linears[n].out_features % 16]
        if skipped:
            log.info("int4: %d layer(s) with in_features not a multiple of %d or out_features not of 16 stay unquantized (%s)",
                     len(skipped), INT4_GROUP, skipped[0])
        chosen = [n for n in chosen if n not in skipped]
    config = Int8Config(set_inductor_config=False) if mode == "int8" else Int4Config(group_size=INT4_GROUP, set_inductor_config=False)
    chosen_set = set(chosen)
    for n in chosen:
        linears[n].to(COMPUTE_DTYPE)
    quantize_(module, config, filter_fn=lambda m, fqn: fqn in chosen_set)
    return chosen


# ---------------------------------------------------------------------------------------------
# The transformer
# ---------------------------------------------------------------------------------------------


def target_linears(model: PixArtSigmaTransformer) -> dict[str, nn.Linear]:
    """The linears a mode quantizes: every nn.Linear inside the blocks, by name."""
    return {n: m for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, nn.Linear)}


def collect_activation_amax(model: nn.Module, names: list[str], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """max |x| per input channel (in_features,) seen by each named linear while `run()` runs the model."""
    amax: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook(name):
        def record(_module, args):
            x = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).cpu()
            amax[name] = x if name not in amax else torch.maximum(amax[name], x)
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return amax


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _svdquant_layers(model, names: list[str], config: SVDQuantConfig, amax: dict) -> None:
    from tqdm.auto import tqdm

    linears = dict(model.named_modules())
    for n in tqdm(names, desc=f"svdquant rank {config.rank}", disable=len(names) < 16, leave=False):
        _set_module(model, n, SVDQuantLinear.from_linear(linears[n], config, amax.get(n)))


def quantize_transformer(model: PixArtSigmaTransformer, mode: str, calibrate: Callable[[], None] | None = None,
                         svdquant: SVDQuantConfig = SVDQuantConfig(),
                         act_amax: dict[str, torch.Tensor] | None = None) -> PixArtSigmaTransformer:
    """Quantize the blocks' linears in place (see the module doc) and cast the rest to bf16.

    calibrate: for "svdquant", a function that runs the (still unquantized) model on a few inputs
    of its own domain, e.g. the pipeline generating calibration prompts; the activation maxima
    it produces set the smoothing; act_amax: those maxima already collected (by
    `collect_activation_amax`), instead. Without either svdquant runs unsmoothed (logged). The mode is
    recorded as `model.quantization` (saved by `save_quantized`). Returns the model.
    """
    check_mode(mode)
    if getattr(model, "quantization", None):
        raise PixsigmaError(f"the transformer is already quantized ({model.quantization['mode']}); expected a float model")
    if getattr(model, "lora_state", None) is not None:
        raise PixsigmaError("the transformer has LoRA adapters; expected quantizing first and loading the LoRA afterwards "
                            "(or fuse_lora and unload_lora before quantizing, to quantize the merged weights)")
    device = next(model.parameters()).device
    if mode == "int4":
        check_int4_kernel(device)
    names = list(target_linears(model))
    record = {"mode": mode}
    if mode == "svdquant":
        amax = dict(act_amax or {})
        if not amax and calibrate is not None and svdquant.alpha is not None:
            amax = collect_activation_amax(model, names, calibrate)
        elif not amax and svdquant.alpha is not None:
            log.warning("svdquant without calibration data: smoothing is off")
        _svdquant_layers(model, names, svdquant, amax)
        record["svdquant"] = asdict(svdquant)
        record["calibrated"] = bool(amax)
        log.info("svdquant W4A4 is simulated on this machine (no W4A4 kernel): weights stored in 4 bits, "
                 "dequantized per call")
    model.to(COMPUTE_DTYPE)
    if mode != "svdquant":
        quantize_linears(model, mode, names)
    model.quantization = record
    return model.eval().requires_grad_(False)


def transformer_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights and buffers as stored (quantized tensors count their integer
    data, scales and zeros)."""
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
            names, _ = t.__tensor_flatten__()
            total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
        else:
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _encode(value):
    """torchao's flatten context as JSON (dtypes and sizes tagged)."""
    if isinstance(value, torch.dtype):
        return {"__dtype__": dtype_name(value) if value.is_floating_point else str(value).removeprefix("torch.")}
    if isinstance(value, torch.Size):
        return {"__size__": list(value)}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise PixsigmaError(f"cannot store a quantized weight attribute of type {type(value).__name__}")


def _decode(value):
    if isinstance(value, dict) and "__dtype__" in value:
        name = value["__dtype__"]
        return as_dtype(name) if name in ("float32", "bfloat16", "float16") else getattr(torch, name)
    if isinstance(value, dict) and "__size__" in value:
        return torch.Size(value["__size__"])
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _flatten_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Plain tensors for safetensors: torchao weights split into their inner tensors
    (`key.qdata`, `key.scale`, ...) with their class and attributes described alongside."""
    tensors, packed = {}, {}
    for key, t in model.state_dict().items():
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
            names, ctx = t.__tensor_flatten__()
            for n in names:
                tensors[f"{key}.{n}"] = getattr(t, n)
            packed[key] = {"class": type(t).__name__, "inner": list(names), "ctx": _encode(ctx),
                           "shape": list(t.shape), "stride": list(t.stride())}
        else:
            tensors[key] = t
    return tensors, packed


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with quantized weights as their stored tensors (a float model's is unchanged)."""
    return _flatten_state(model)[0]


def save_quantized(model: PixArtSigmaTransformer, path) -> Path:
    """A quantized transformer as one safetensors file: integer weights, scales, zeros, smoothing
    factors and low-rank factors, with the config and the quantization in the metadata."""
    record = getattr(model, "quantization", None)
    if not record:
        raise PixsigmaError("save_quantized: the transformer is not quantized; expected quantize_transformer first")
    if getattr(model, "lora_state", None) is not None:
        raise PixsigmaError("save_quantized: the transformer has LoRA adapters; expected unload_lora first (save the LoRA "
                            "on its own with save_lora)")
    tensors, packed = _flatten_state(model)
    import torchao

    meta = {CONFIG_KEY: json.dumps(config_to_dict(model.config)), HISTORY_KEY: json.dumps(getattr(model, "history", [])),
            QUANT_KEY: json.dumps({**record, "packed": packed, "torch": torch.__version__, "torchao": torchao.__version__})}
    return write_safetensors(path, tensors, meta)


def quantized_file(src) -> Path | None:
    """The quantized checkpoint at `src` (a file, or a folder holding exactly one .safetensors
    file), or None when it is a float checkpoint."""
    src = Path(src)
    if src.is_dir() and not (src / "config.json").is_file():
        files = sorted(src.glob("*.safetensors"))
        src = files[0] if len(files) == 1 else src
    return src if read_quantize_record(src) is not None else None


def read_quantize_record(path) -> dict | None:
    """The quantization record of a safetensors file, or None for a float checkpoint."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - not ours to judge here; the float loader reports it
        return None
    return json.loads(meta[QUANT_KEY]) if QUANT_KEY in meta else None


def _check_same_shape(config, model: PixArtSigmaTransformer, path) -> None:
    for name in SHAPE_FIELDS:
        mine, theirs = getattr(config, name), getattr(model.config, name)
        if mine != theirs:
            raise PixsigmaError(f"{path}: quantized checkpoint has {name}={mine} but the model has {name}={theirs}; "
                                "expected a model of the same shape")


def _empty_quantized(config, record: dict) -> PixArtSigmaTransformer:
    """A meta-device model with the quantized layers in place, to take the saved tensors."""
    with torch.device("meta"):
        model = PixArtSigmaTransformer(config).to(COMPUTE_DTYPE)
    if record["mode"] == "svdquant":
        svd = SVDQuantConfig(**record["svdquant"])
        for n, lin in target_linears(model).items():
            _set_module(model, n, SVDQuantLinear(lin.in_features, lin.out_features, lin.bias is not None, svd.rank,
                                                 svd.group_size, device="meta"))
    return model


def load_quantized(path, model: PixArtSigmaTransformer | None = None, device="cpu") -> PixArtSigmaTransformer:
    """A quantized transformer from `save_quantized`'s file, as stored (nothing is re-quantized).
    `model`: a float model it is meant for; a checkpoint of another shape is a one-line error."""
    from safetensors import safe_open

    path = Path(path)
    record = read_quantize_record(path)
    if record is None:
        raise PixsigmaError(f"{path}: not a quantized pixsigma checkpoint; expected a file written by save_quantized")
    check_mode(record.get("mode"))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = config_from_dict(json.loads(meta[CONFIG_KEY]))
    if model is not None:
        _check_same_shape(config, model, path)
    new = _empty_quantized(config, record)
    classes = torchao_tensor_classes() if record["packed"] else {}
    sd = {k: v for k, v in tensors.items()}
    for key, desc in record["packed"].items():
        inner = {n: sd.pop(f"{key}.{n}") for n in desc["inner"]}
        sd[key] = classes[desc["class"]].__tensor_unflatten__(inner, _decode(desc["ctx"]), torch.Size(desc["shape"]),
                                                              tuple(desc["stride"]))
    check_state_dict(new, {k: v for k, v in sd.items() if k not in record["packed"]}
                     | {k: torch.empty(desc["shape"], device="meta") for k, desc in record["packed"].items()}, str(path))
    for key in record["packed"]:
        mod_name, _, attr = key.rpartition(".")
        setattr(new.get_submodule(mod_name), attr, nn.Parameter(sd.pop(key), requires_grad=False))
    new.load_state_dict(sd, strict=False, assign=True)
    new.history = json.loads(meta.get(HISTORY_KEY, "[]"))
    new.quantization = {k: v for k, v in record.items() if k not in ("packed", "torch", "torchao")}
    return new.to(device).eval().requires_grad_(False)
