"""The PixArt-Σ Diffusion Transformer, top to bottom.

Latents are cut into patches, each patch becomes a token; the tokens go through `depth` blocks of
(self-attention → cross-attention to the caption → MLP), all modulated by one shared timestep
embedding (adaLN-single), and a final layer turns tokens back into a latent-sized prediction of
the noise (and of the variance range when `learn_sigma`).

KV token compression (the paper's contribution) lives in `SelfAttention`: in the chosen layers,
keys and values are merged over R×R windows of the token grid before attention, so N queries
attend over about N/R² keys.

The file reads in order: configuration and presets, embedding layers, the CPU fast paths,
attention, blocks, the model. Shapes in comments use B batch, C channels, H×W the token grid,
N = H·W image tokens, L caption tokens, D the hidden size, R the KV compression ratio.

Checkpoint keys follow the official PixArt code (x_embedder, t_block, blocks.N.attn.qkv, ...), so
an official state dict loads with `load_state_dict` directly; other layouts are converted in
`pixsigma.model.checkpoint`, and stage transitions live in `pixsigma.model.transitions`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

KV_OPERATORS = ("conv", "ave", "uniform")
PREDICTION_TYPES = ("epsilon", "v_prediction")


# ---------------------------------------------------------------------------------------------
# Configuration and presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVCompressConfig:
    """Which self-attention layers merge their keys/values, how, and over what window."""

    operator: str = "conv"  # conv | ave | uniform
    ratio: int = 2  # R: keys/values merged over R×R token windows
    layers: tuple[int, ...] = ()  # block indices (0-based) that compress

    def __post_init__(self):
        if self.operator not in KV_OPERATORS:
            raise ValueError(f"kv_compress operator {self.operator!r} is unknown; expected one of {KV_OPERATORS}")
        if int(self.ratio) < 1:
            raise ValueError(f"kv_compress ratio must be >= 1, got {self.ratio}")
        object.__setattr__(self, "layers", tuple(sorted(int(i) for i in self.layers)))

    @property
    def enabled(self) -> bool:
        return bool(self.layers) and self.ratio > 1


@dataclass(frozen=True)
class TransformerConfig:
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 2
    in_channels: int = 4
    learn_sigma: bool = True  # output 2×in_channels: epsilon + variance range
    caption_channels: int = 4096
    max_caption_tokens: int = 300
    sample_size: int = 128  # latent side the model was trained at; base_size = sample_size // patch
    pe_interpolation: float = 2.0  # resolution / 512 for the released models
    qk_norm: bool = False
    micro_conditions: bool = False  # PixArt-α 1024-MS size / aspect-ratio conditions
    kv_compress: KVCompressConfig = field(default_factory=KVCompressConfig)
    caption_dropout: float = 0.1  # probability of replacing a caption by y_embedding in training
    # What the first output half predicts: "epsilon" (the released models) or "v_prediction"
    # (v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0). With ε, the x0 a sampler derives at the noisiest step is
    # x_t/sqrt(ᾱ) minus ε̂ scaled by sqrt((1−ᾱ)/ᾱ) ≈ 157 at t = 999, so a small error in ε̂
    # becomes a large error in the layout; v keeps that error at its own size. Samplers and the
    # loss read it.
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if isinstance(self.kv_compress, dict):
            object.__setattr__(self, "kv_compress", KVCompressConfig(**self.kv_compress))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 for the 2-D sin-cos embedding")
        if self.micro_conditions and self.hidden_size % 3:
            raise ValueError(f"micro_conditions need hidden_size divisible by 3, got {self.hidden_size}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}")
        bad = [i for i in self.kv_compress.layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"kv_compress layers {bad} are outside 0..{self.depth - 1}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def base_size(self) -> int:
        return self.sample_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def with_(self, **changes) -> "TransformerConfig":
        return replace(self, **changes)


def deep_half(depth: int) -> tuple[int, ...]:
    """The paper's default compressed layers: the deep half (14..27 of 28)."""
    return tuple(range(depth // 2, depth))


def pe_interpolation_for(resolution: int) -> float:
    """The released models' rule: pe_interpolation = resolution / 512 (0.5 at 256px, 4 at 2K)."""
    return resolution / 512


# The released 0.6B PixArt-Σ XL/2 (1024px). Other resolutions change only sample_size and
# pe_interpolation: use `xl2_at(resolution)`.
XL_2 = TransformerConfig()


def xl2_at(resolution: int, **changes) -> TransformerConfig:
    return XL_2.with_(sample_size=resolution // 8, pe_interpolation=pe_interpolation_for(resolution), **changes)


# Small configs for tests and for the shipped toy model.
TINY = TransformerConfig(
    depth=2, hidden_size=64, num_heads=4, patch_size=2, caption_channels=32, max_caption_tokens=16,
    sample_size=16, pe_interpolation=1.0,
)
SMALL = TransformerConfig(
    depth=6, hidden_size=192, num_heads=6, patch_size=2, caption_channels=64, max_caption_tokens=32,
    sample_size=32, pe_interpolation=1.0,
)


# The named presets, by the names training configs use.
PRESETS: dict[str, TransformerConfig] = {"tiny": TINY, "small": SMALL, "xl_2": XL_2}


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin(pos·ω), cos(pos·ω)] with ω_k = 1 / 10000^(k / (dim/2)); computed in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.reshape(-1, 1).to(torch.float64) * omega[None]  # (P, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (P, dim)


def sincos_2d(dim: int, h: int, w: int, base_size: int, pe_interpolation: float) -> torch.Tensor:
    """Fixed 2-D position embedding (h·w, dim), row-major over the token grid.

    Positions are rescaled so that a grid of any size spans the same range as the training grid
    (base_size), then divided by pe_interpolation: this is what lets one model work at
    several resolutions and aspect ratios. The first half of the channels encodes the column,
    the second half the row (the layout of the released checkpoints).
    """
    rows = torch.arange(h, dtype=torch.float64) / (h / base_size) / pe_interpolation
    cols = torch.arange(w, dtype=torch.float64) / (w / base_size) / pe_interpolation
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")  # (H, W) each
    emb = torch.cat([sincos_1d(dim // 2, grid_cols), sincos_1d(dim // 2, grid_rows)], dim=1)  # (H·W, dim)
    return emb.float()


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] sinusoid of (possibly fractional) timesteps, in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimestepEmbedder(nn.Module):
    """Sinusoid → Linear → SiLU → Linear; also used for α's size / aspect-ratio conditions."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(Linear(frequency_dim, hidden_size), nn.SiLU(), Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_sinusoid(t, self.frequency_dim).to(self.mlp[0].weight.dtype)  # (B, 256)
        return self.mlp(freq)  # (B, D)


class SizeEmbedder(TimestepEmbedder):
    """Embeds each of a (B, k) set of scalars separately and concatenates: (B, k·hidden)."""

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        b = s.shape[0]
        return super().forward(s.reshape(-1)).reshape(b, -1)  # (B·k, D) → (B, k·D)


class CaptionEmbedder(nn.Module):
    """Projects text-encoder states to the hidden size; holds the null caption for CFG dropout."""

    def __init__(self, caption_channels: int, hidden_size: int, max_tokens: int):
        super().__init__()
        self.y_proj = nn.Module()
        self.y_proj.fc1 = Linear(caption_channels, hidden_size)
        self.y_proj.act = nn.GELU(approximate="tanh")
        self.y_proj.fc2 = Linear(hidden_size, hidden_size)
        # A buffer, as in the released checkpoints: saved and loaded, not optimized.
        self.register_buffer("y_embedding", torch.randn(max_tokens, caption_channels) / caption_channels**0.5)

    def project(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj.fc2(self.y_proj.act(self.y_proj.fc1(y)))  # (B, L, caption_channels) → (B, L, D)


# ---------------------------------------------------------------------------------------------
# CPU fast paths
#
# Two rewrites that give the same numbers as the plain code (to rounding) and run faster on CPU,
# where the toy model trains; benchmarks/cpu_training.py times each against the code it replaces
# (it switches them off by setting CPU_MATMUL_ATTENTION_MAX_SCORES to 0 and replacing
# `depthwise_window_conv` by nn.Conv2d's kernel).
# 1. Half-precision attention over short sequences as two matmuls instead of torch's fused
#    kernel, which is slower on CPU for such shapes in bf16/fp16, forward and backward.
# 2. The KV-compression conv (depthwise, kernel = stride = R) as R² strided multiply-adds over
#    the windows instead of the conv kernel.
# 3. float32 inference of the Linear layers through oneDNN on weights it reordered once
#    (`onednn_linears`), instead of F.linear's BLAS call: the BLAS torch ships (MKL) takes a slow
#    generic path on some CPUs (AMD), where oneDNN is much faster per layer
#    (benchmarks/onednn_linear.py times a layer, benchmarks/pipeline_overhead.py a whole call).
# ---------------------------------------------------------------------------------------------


# Largest score matrix (B·heads·Nq·Nk elements, 64 MiB in bf16) that takes the matmul path:
# below it, materialising the scores costs little memory. Larger grids keep the fused kernel.
CPU_MATMUL_ATTENTION_MAX_SCORES = 2**25


def cpu_matmul_attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attention` takes the matmul path: half precision on CPU, a small score matrix."""
    b, h, nq, _ = q.shape
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == v.dtype == q.dtype
            and b * h * nq * k.shape[-2] <= CPU_MATMUL_ATTENTION_MAX_SCORES)


def cpu_matmul_attention(q, k, v, mask=None) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v with the scores materialised: (B, heads, Nq, d)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, Nq, Nk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # every row keeps a valid column
    return scores.softmax(dim=-1) @ v  # the CPU softmax accumulates half precision in fp32


class Linear(nn.Linear):
    """nn.Linear that multiplies by a oneDNN-reordered copy of its weight while `onednn_linears`
    holds one (fast path 3): float32 inputs on CPU, outside autograd and autocast. Otherwise,
    and in training, it is F.linear."""

    _onednn_weight = None  # set and cleared by onednn_linears

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._onednn_weight
        if (packed is not None and x.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and not torch.is_autocast_enabled("cpu")):
            return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _onednn_packable(layer: nn.Module) -> bool:
    w = getattr(layer, "weight", None)
    return (isinstance(layer, Linear) and w is not None and type(w.data) is torch.Tensor and w.device.type == "cpu"
            and w.dtype == torch.float32 and (layer.bias is None or layer.bias.dtype == torch.float32))


@contextlib.contextmanager
def onednn_linears(*modules: nn.Module):
    """Within the block, every float32 CPU `Linear` inside `modules` runs on a weight oneDNN
    reordered at entry (fast path 3). The copies are freed at exit, so weights changed outside
    the block (a LoRA fused, a checkpoint loaded) are never stale; inside it they must not change.
    The copies take as much memory as the weights they mirror."""
    layers = {id(m): m for module in modules if module is not None for m in module.modules() if _onednn_packable(m)}
    if not torch.backends.mkldnn.is_available():
        layers = {}
    try:
        for layer in layers.values():
            layer._onednn_weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None)
        yield
    finally:
        for layer in layers.values():
            layer._onednn_weight = None


def depthwise_window_conv(grid: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`Conv2d(C, C, kernel_size=R, stride=R, groups=C)` as R² multiply-adds: (B, C, H, W) → (B, H/R·W/R, C).

    H and W must be multiples of R. `grid` may be a channels-last view; each output token is the
    weighted sum of the R² tokens of its window plus the bias, exactly what the conv computes.
    """
    b, c, h, w = grid.shape
    r = weight.shape[-1]
    windows = grid.permute(0, 2, 3, 1).reshape(b, h // r, r, w // r, r, c)  # (B, H/R, R, W/R, R, C)
    weight = weight.to(windows.dtype).view(c, r, r)
    merged = bias.to(windows.dtype)
    for i in range(r):
        for j in range(r):
            merged = merged + windows[:, :, i, :, j] * weight[:, i, j]  # (B, H/R, W/R, C)
    return merged.reshape(b, -1, c)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def attention(q, k, v, mask=None, fp32: bool = False):
    """Scaled dot-product attention over (B, heads, N, head_dim) tensors.

    `mask` is boolean (True = attend) and broadcastable to (B, heads, Nq, Nk). `fp32` runs the
    kernel in float32 for half-precision weights (the paper trains with fp32 attention); the
    result comes back in q's dtype.
    """
    dtype = q.dtype
    if fp32 and dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    if cpu_matmul_attention_applies(q, k, v):
        out = cpu_matmul_attention(q, k, v, mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.to(dtype)  # (B, heads, Nq, head_dim)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # (B, heads, N, C/heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, N, heads·d)


def conv_avg_init(conv: nn.Conv2d) -> None:
    """Conv Avg Init: start the compression conv as an R×R average (weights 1/R², bias 0)."""
    r = conv.kernel_size[0]
    with torch.no_grad():
        conv.weight.fill_(1.0 / (r * r))
        conv.bias.zero_()


class SelfAttention(nn.Module):
    """Multi-head self-attention over image tokens, with optional KV token compression.

    With compression, the keys and values (never the queries) are laid back on the (H, W) token
    grid and merged over R×R windows: by a depthwise strided conv + LayerNorm shared by K and V
    ("conv"), average pooling ("ave") or keeping one token per window ("uniform"). Grids whose
    sides are not multiples of R are padded (conv: edge replication; ave: windows average only
    real tokens; uniform: the last partial window keeps its first token), so any size works.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, kv_operator: str | None = None, kv_ratio: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3)
        self.proj = Linear(dim, dim)
        if qk_norm:
            self.q_norm = nn.LayerNorm(dim, eps=1e-5)
            self.k_norm = nn.LayerNorm(dim, eps=1e-5)
        else:
            self.q_norm = self.k_norm = None
        self.kv_operator = kv_operator if kv_ratio > 1 else None
        self.kv_ratio = kv_ratio
        if self.kv_operator == "conv":
            self.sr = nn.Conv2d(dim, dim, kernel_size=kv_ratio, stride=kv_ratio, groups=dim)
            self.norm = nn.LayerNorm(dim)
            conv_avg_init(self.sr)

    def compress(self, t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Merge (B, H·W, C) tokens over R×R windows → (B, ceil(H/R)·ceil(W/R), C)."""
        r, (h, w) = self.kv_ratio, hw
        b, n, c = t.shape
        if self.kv_operator == "uniform":
            return t.view(b, h, w, c)[:, ::r, ::r].reshape(b, -1, c)
        # A permuted view, not a copy: (B, C, H, W) in channels-last memory, which the pooling and
        # the window multiply-adds take as is.
        grid = t.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        if self.kv_operator == "ave":
            pooled = F.avg_pool2d(grid, r, r, ceil_mode=True, count_include_pad=False)  # (B, C, H/R, W/R)
            return pooled.permute(0, 2, 3, 1).reshape(b, -1, c)
        pad_h, pad_w = (-h) % r, (-w) % r
        if pad_h or pad_w:
            grid = F.pad(grid, (0, pad_w, 0, pad_h), mode="replicate")  # (B, C, H + pad_h, W + pad_w)
        return self.norm(depthwise_window_conv(grid, self.sr.weight, self.sr.bias))

    def forward(self, x: torch.Tensor, hw: tuple[int, int], attention_fp32: bool = False) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, D) each
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.kv_operator is not None:
            # K and V share the operator: merge them in one call over a doubled batch.
            k, v = self.compress(torch.cat([k, v]), hw).chunk(2)  # (B, N/R², D) each
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))  # (B, heads, N or N/R², D/heads)
        out = attention(q, k, v, fp32=attention_fp32)  # (B, heads, N, D/heads)
        return self.proj(merge_heads(out))  # (B, N, D)


@dataclass
class CaptionContext:
    """A caption prepared for the blocks: per-block cross-attention keys/values and the mask.

    The caption does not change across the denoising steps of one prompt, so the pipeline builds
    this once and reuses it (`PixArtSigmaTransformer.prepare_caption`).
    """

    kv: list  # per block: (k, v), each (B, heads, L, head_dim)
    mask: torch.Tensor | None  # (B, 1, 1, L) bool, None when every token is valid


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to the projected caption tokens (keys/values)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = Linear(dim, dim)
        self.kv_linear = Linear(dim, dim * 2)  # K first, then V
        self.proj = Linear(dim, dim)

    def caption_kv(self, y: torch.Tensor):
        k, v = self.kv_linear(y).chunk(2, dim=-1)  # (B, L, D) each
        return split_heads(k, self.num_heads), split_heads(v, self.num_heads)  # (B, heads, L, D/heads)

    def forward(self, x, kv, mask, attention_fp32: bool = False):
        q = split_heads(self.q_linear(x), self.num_heads)  # (B, heads, N, D/heads)
        out = attention(q, kv[0], kv[1], mask, fp32=attention_fp32)  # (B, heads, N, D/heads)
        return self.proj(merge_heads(out))  # (B, N, D)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))  # (B, N, D) → (B, N, mlp_ratio·D) → (B, N, D)


class PixArtBlock(nn.Module):
    """Self-attention, cross-attention to the caption, MLP; adaLN-single modulation and gates."""

    def __init__(self, config: TransformerConfig, index: int):
        super().__init__()
        d = config.hidden_size
        kv = config.kv_compress
        compressed = kv.enabled and index in kv.layers
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(
            d, config.num_heads, qk_norm=config.qk_norm,
            kv_operator=kv.operator if compressed else None, kv_ratio=kv.ratio if compressed else 1,
        )
        self.cross_attn = CrossAttention(d, config.num_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, int(d * config.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, d) / d**0.5)

    def forward(self, x, t6, caption_kv, caption_mask, hw, attention_fp32: bool = False):
        b = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t6.reshape(b, 6, -1)
        ).chunk(6, dim=1)  # (B, 1, D) each
        # x may be a float32 residual stream around half-precision weights (see
        # PixArtSigmaTransformer.set_runtime_options): each sub-layer gets its input in the
        # weights' dtype and its output is added back in x's dtype. In fp32 the casts are no-ops.
        w = self.scale_shift_table.dtype
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa).to(w), hw, attention_fp32)  # (B, N, D)
        x = x + self.cross_attn(x.to(w), caption_kv, caption_mask, attention_fp32)  # (B, N, D)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp).to(w))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x, t):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        x = modulate(self.norm_final(x), shift, scale).to(self.linear.weight.dtype)  # (B, N, D)
        return self.linear(x)  # (B, N, p·p·out_channels)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class PixArtSigmaTransformer(nn.Module):
    """PixArt-Σ: `model(x, timestep, caption, caption_mask) -> (B, out_channels, H, W)`.

    x: (B, in_channels, H, W) latents, H and W multiples of the patch size (any aspect ratio);
    timestep: (B,) in [0, 1000); caption: (B, L, caption_channels) text-encoder states, or a
    `CaptionContext` from `prepare_caption`; caption_mask: (B, L), 1 valid / 0 padding.
    Runtime switches (fp32 attention, gradient checkpointing, fp32 residual stream) are set with
    `set_runtime_options`.
    """

    def __init__(self, config: TransformerConfig = XL_2):
        super().__init__()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.attention_fp32 = False
        self.gradient_checkpointing = False
        self.residual_fp32 = True
        self.history: list[dict] = []  # stage transitions applied to this model (saved in metadata)
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(config.in_channels, d, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), Linear(d, 6 * d))
        self.y_embedder = CaptionEmbedder(config.caption_channels, d, config.max_caption_tokens)
        if config.micro_conditions:
            self.csize_embedder = SizeEmbedder(d // 3)
            self.ar_embedder = SizeEmbedder(d // 3)
        self.blocks = nn.ModuleList(PixArtBlock(config, i) for i in range(config.depth))
        self.final_layer = FinalLayer(d, p, config.out_channels)
        self._pos_cache: dict = {}
        self.initialize_weights()

    def set_runtime_options(self, *, attention_fp32: bool | None = None, gradient_checkpointing: bool | None = None,
                            residual_fp32: bool | None = None) -> "PixArtSigmaTransformer":
        """Set how the forward pass runs; the weights and the function stay the same. None leaves a switch as it is.

        attention_fp32 (default off): with half-precision weights, run every attention kernel
            in float32 and cast its output back (the paper trains with fp32 attention).
        gradient_checkpointing (default off): in training with gradients enabled, keep only each
            block's inputs and recompute the block in the backward pass (less memory, one more
            forward per block).
        residual_fp32 (default on): with half-precision weights, carry the residual stream (the
            sum every block adds to) in float32; rounding it to bf16 after every block is most of
            bf16's error, and it costs little.

        The current values are readable as the attributes of the same names. Returns the model.
        """
        if attention_fp32 is not None:
            self.attention_fp32 = bool(attention_fp32)
        if gradient_checkpointing is not None:
            self.gradient_checkpointing = bool(gradient_checkpointing)
        if residual_fp32 is not None:
            self.residual_fp32 = bool(residual_fp32)
        return self

    # -- init ----------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """The from-scratch init of the reference (xavier Linear, zero-init output layers)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for embedder in [self.t_embedder] + ([self.csize_embedder, self.ar_embedder] if self.config.micro_conditions else []):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
            if block.attn.kv_operator == "conv":
                conv_avg_init(block.attn.sr)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- pieces ----------------------------------------------------------------------------------
    def pos_embed(self, h: int, w: int, device, dtype) -> torch.Tensor:
        """The (H·W, D) position embedding of an H×W token grid; the last grid's is cached."""
        key = (h, w, self.config.base_size, self.config.pe_interpolation)
        if torch.compiler.is_compiling():
            # traced into the compiled graph as a constant; the cache would only add a guard on
            # its contents and a recompile on the second call
            return sincos_2d(self.config.hidden_size, h, w, self.config.base_size, self.config.pe_interpolation).to(device=device, dtype=dtype)
        if key not in self._pos_cache:
            self._pos_cache.clear()
            self._pos_cache[key] = sincos_2d(self.config.hidden_size, h, w, self.config.base_size, self.config.pe_interpolation)
        return self._pos_cache[key].to(device=device, dtype=dtype)

    def embed_timestep(self, timestep, batch: int, hw_pixels=None, aspect_ratio=None):
        """t (B, D) for the final layer and t6 (B, 6D) for the blocks."""
        timestep = torch.as_tensor(timestep, device=self.t_block[1].weight.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        t = self.t_embedder(timestep)  # (B, D)
        if self.config.micro_conditions:
            dtype, device = t.dtype, t.device
            csize = torch.as_tensor(hw_pixels, dtype=torch.float32, device=device).reshape(-1, 2).expand(batch, 2)
            ar = torch.as_tensor(aspect_ratio, dtype=torch.float32, device=device).reshape(-1, 1).expand(batch, 1)
            t = t + torch.cat([self.csize_embedder(csize), self.ar_embedder(ar)], dim=1).to(dtype)  # (B, D)
        return t, self.t_block(t)  # (B, D), (B, 6D)

    def drop_caption(self, caption: torch.Tensor, force_drop_ids=None) -> torch.Tensor:
        """Replace whole captions by the null caption (training dropout or forced for CFG)."""
        if force_drop_ids is None:
            if not (self.training and self.config.caption_dropout > 0):
                return caption
            drop = torch.rand(caption.shape[0], device=caption.device) < self.config.caption_dropout
        else:
            drop = torch.as_tensor(force_drop_ids, device=caption.device).bool()
        null = self.y_embedder.y_embedding[: caption.shape[1]].to(caption.dtype)  # (L, caption_channels)
        return torch.where(drop[:, None, None], null[None], caption)  # (B, L, caption_channels)

    def prepare_caption(self, caption: torch.Tensor, caption_mask: torch.Tensor | None = None,
                        extra_blocks=()) -> CaptionContext:
        """Project the caption and compute every block's cross-attention K/V once.

        `extra_blocks` (blocks outside the model, e.g. a ControlNet's copies) get their K/V
        appended after the model's own, in order.

        Token columns that are padding for every sample are dropped (exact: they get zero
        weight anyway) so typical prompts attend over tens of tokens rather than 300; when the
        remaining columns are valid for every sample no mask is passed, which keeps the attention
        on torch's fastest kernel.
        """
        mask = None
        if caption_mask is not None:
            valid = caption_mask.to(caption.device).bool()  # (B, L)
            keep = valid.any(dim=0)
            if not keep.all():
                caption, valid = caption[:, keep], valid[:, keep]
            if valid.shape[1] == 0:
                caption, valid = caption[:, :1], valid[:, :1]
            # A sample with no valid token attends uniformly over the columns (as diffusers'
            # additive mask does) instead of producing NaN.
            valid = valid | ~valid.any(dim=1, keepdim=True)
            if not valid.all():
                mask = valid[:, None, None, :]  # (B, 1, 1, L)
        y = self.y_embedder.project(caption.to(self.y_embedder.y_proj.fc1.weight.dtype))  # (B, L, D)
        kv = [block.cross_attn.caption_kv(y) for block in [*self.blocks, *extra_blocks]]
        return CaptionContext(kv=kv, mask=mask)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, H·W, p·p·C) tokens → (B, C, H·p, W·p) latents."""
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (B, H, W, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        caption,
        caption_mask: torch.Tensor | None = None,
        force_drop_ids=None,
        hw_pixels=None,
        aspect_ratio=None,
        block_hook=None,
        step_cache=None,
    ) -> torch.Tensor:
        """`block_hook(index, tokens, t6, context, (h, w)) -> tokens`, when given, is called before
        each block and its result enters the block (how a ControlNet adds its residuals).
        `step_cache` (a `pixsigma.diffusion.cache.StepCache`) may skip a range of blocks, adding
        the range's contribution recorded at an earlier step instead."""
        p = self.config.patch_size
        b, _, height, width = x.shape
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {p}")
        h, w = height // p, width // p
        dtype = self.x_embedder.proj.weight.dtype
        tokens = self.x_embedder.proj(x.to(dtype)).flatten(2).transpose(1, 2)  # (B, N, D), N = H·W tokens
        tokens = tokens + self.pos_embed(h, w, x.device, dtype)  # (B, N, D)
        if self.residual_fp32:
            tokens = tokens.float()
        if self.config.micro_conditions and hw_pixels is None:
            hw_pixels = [height * 8, width * 8]  # the VAE's factor 8, as in the α pipelines
            aspect_ratio = [height / width]
        t, t6 = self.embed_timestep(timestep, b, hw_pixels, aspect_ratio)  # (B, D), (B, 6D)
        if isinstance(caption, CaptionContext):
            context = caption
        else:
            context = self.prepare_caption(self.drop_caption(caption, force_drop_ids), caption_mask)
        if context.mask is not None and context.mask.shape[0] != b:
            raise ValueError(f"caption batch {context.mask.shape[0]} does not match latent batch {b}")
        for i, (block, kv) in enumerate(zip(self.blocks, context.kv)):
            if block_hook is not None:
                tokens = block_hook(i, tokens, t6, context, (h, w))
            if step_cache is not None:
                tokens, run = step_cache.before(i, tokens)
                if not run:
                    continue
            args = (tokens, t6, kv, context.mask, (h, w), self.attention_fp32)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, *args, use_reentrant=False)  # (B, N, D)
            else:
                tokens = block(*args)  # (B, N, D)
            if step_cache is not None:
                step_cache.after(i, tokens)
        out = self.final_layer(tokens, t)  # (B, N, p·p·out_channels)
        return self.unpatchify(out.to(dtype), h, w)  # (B, out_channels, H·p, W·p)


def count_parameters(config_or_model) -> int:
    """Trainable parameters (the null caption `y_embedding` is a buffer, so it is not counted)."""
    model = config_or_model
    if isinstance(model, TransformerConfig):
        with torch.device("meta"):
            model = PixArtSigmaTransformer(config_or_model)
    return sum(p.numel() for p in model.parameters())
