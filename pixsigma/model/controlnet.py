"""ControlNet-Transformer (PixArt-δ) around the one PixArt-Σ transformer.

The first N blocks of a frozen base model are copied (13 of 28 in the paper). The control
image's VAE latent goes through the base's own patch embedding and position embedding; a
zero-initialised linear layer (`before_proj`) adds it to the hidden state that leaves base
block 0, and that sum enters copy 0. Copy i's output feeds copy i+1 and, through a zero-
initialised linear layer (`after_proj`), is added to the input of base block i+1:

    x = base.blocks[0](x)
    c = copy[0](x + before_proj(embed(control)))     ->  x = base.blocks[1](x + after_proj[0](c))
    c = copy[i](c)                                   ->  x = base.blocks[i+1](x + after_proj[i](c))
    ... base blocks N+1.. as usual

Because both projections start at zero, a fresh ControlNet returns exactly the base model's
output. Submodule names follow the official `ControlPixArtHalf`, so `state_dict()` is the
official checkpoint layout: `base_model.*`, `controlnet.{i}.copied_block.*`,
`controlnet.0.before_proj.*`, `controlnet.{i}.after_proj.*`. The copies are instances of the
base's own block class (deep copies), and the forward pass is the base's, with the copies run
from its `block_hook`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pixsigma.errors import PixsigmaError
from pixsigma.model.attached import AttachedToBase
from pixsigma.model.transformer import CaptionContext, PixArtBlock, PixArtSigmaTransformer

DEFAULT_NUM_BLOCKS = 13


def zero_linear(dim: int) -> nn.Linear:
    layer = nn.Linear(dim, dim)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ControlBlock(nn.Module):
    """One copied block with its zero-initialised output projection (and, first, input projection)."""

    def __init__(self, block: PixArtBlock, index: int, hidden_size: int):
        super().__init__()
        self.index = index
        if index == 0:
            self.before_proj = zero_linear(hidden_size)
        self.copied_block = block
        self.after_proj = zero_linear(hidden_size)


class ControlNetTransformer(AttachedToBase):
    """`model(x, t, caption, caption_mask=None, control=None, control_scale=1.0) -> (B, out, H, W)`.

    x, t, caption, caption_mask: as for `PixArtSigmaTransformer`; control: the control image's
    VAE latent, (B or 1, in_channels, H, W) at x's size (a batch of 1 is shared by every sample,
    and a batch that divides B is repeated, as with classifier-free guidance); control_scale: a
    float or a (B,) tensor multiplying every residual. Without control (or at scale 0) this is
    the base model's forward.
    """

    def __init__(self, base: PixArtSigmaTransformer, num_blocks: int = DEFAULT_NUM_BLOCKS):
        super().__init__()
        depth = base.config.depth
        if not 1 <= int(num_blocks) <= depth - 1:
            raise PixsigmaError(f"num_blocks {num_blocks} is out of range for a {depth}-block base; expected 1..{depth - 1} "
                                "(copy i feeds base block i+1)")
        self.base_model = base
        self.num_blocks = int(num_blocks)
        d = base.config.hidden_size
        self.controlnet = nn.ModuleList(ControlBlock(copy.deepcopy(base.blocks[i]), i, d) for i in range(self.num_blocks))

    @classmethod
    def from_transformer(cls, base: PixArtSigmaTransformer, num_blocks: int = DEFAULT_NUM_BLOCKS) -> "ControlNetTransformer":
        """A new ControlNet on `base`: copies of its first `num_blocks` blocks, zero projections,
        the base frozen (only `trainable_parameters()` require gradients)."""
        model = cls(base, num_blocks)
        return model.freeze_base(model.controlnet)

    # -- facts -----------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What ControlNet training optimises: the copied blocks and the projections."""
        return list(self.controlnet.parameters())

    def controlnet_state_dict(self) -> dict[str, torch.Tensor]:
        """The ControlNet's own weights (`controlnet.*` keys), without the base."""
        return {f"controlnet.{k}": v for k, v in self.controlnet.state_dict().items()}

    # -- pieces ----------------------------------------------------------------------------------
    def prepare_caption(self, caption: torch.Tensor, caption_mask: torch.Tensor | None = None) -> CaptionContext:
        """The base's caption context with the copies' cross-attention K/V appended (after the base's)."""
        return self.base_model.prepare_caption(caption, caption_mask,
                                               extra_blocks=[b.copied_block for b in self.controlnet])

    def embed_control(self, control: torch.Tensor, batch: int, hw: tuple[int, int]) -> torch.Tensor:
        """The control latent through the base's patch + position embedding: (B, N, D)."""
        base, cfg = self.base_model, self.config
        if control.ndim != 4 or control.shape[1] != cfg.in_channels:
            raise PixsigmaError(f"control latent of shape {tuple(control.shape)}; expected (B, {cfg.in_channels}, H, W), "
                                "the VAE latent of the control image")
        p = cfg.patch_size
        if tuple(control.shape[-2:]) != (hw[0] * p, hw[1] * p):
            raise PixsigmaError(f"control latent is {control.shape[-2]}x{control.shape[-1]} but the latents are "
                                f"{hw[0] * p}x{hw[1] * p}; expected the same size")
        if batch % control.shape[0]:
            raise PixsigmaError(f"control batch {control.shape[0]} does not divide the latent batch {batch}")
        dtype = base.x_embedder.proj.weight.dtype
        c = base.x_embedder.proj(control.to(dtype)).flatten(2).transpose(1, 2)  # (Bc, N, D)
        c = c + base.pos_embed(hw[0], hw[1], c.device, dtype)  # (Bc, N, D)
        return c.repeat(batch // c.shape[0], 1, 1)  # (B, N, D)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x, timestep, caption, caption_mask=None, control=None, control_scale=1.0,
                force_drop_ids=None, hw_pixels=None, aspect_ratio=None, **base_options) -> torch.Tensor:
        """`base_options` go to the base's forward as they are (e.g. a step cache)."""
        base = self.base_model
        off = control is None or (not torch.is_tensor(control_scale) and float(control_scale) == 0.0)
        if off:
            return base(x, timestep, caption, caption_mask, force_drop_ids, hw_pixels, aspect_ratio, **base_options)
        if isinstance(caption, CaptionContext):
            context = caption
        else:
            context = self.prepare_caption(base.drop_caption(caption, force_drop_ids), caption_mask)
        expected = self.config.depth + self.num_blocks
        if len(context.kv) != expected:
            raise PixsigmaError(f"the caption context holds {len(context.kv)} blocks' keys/values; expected {expected} "
                                "(build it with ControlNetTransformer.prepare_caption)")
        p = self.config.patch_size
        hw = (x.shape[-2] // p, x.shape[-1] // p)
        hook = _ControlPass(self, self.embed_control(control, x.shape[0], hw), control_scale)
        return base(x, timestep, context, None, None, hw_pixels, aspect_ratio, block_hook=hook, **base_options)


class _ControlPass:
    """One forward's control branch, run from the base's block hook: before base block i (1..N)
    it advances the copies by one block and returns the tokens plus the scaled residual."""

    def __init__(self, net: ControlNetTransformer, control_tokens: torch.Tensor, scale):
        self.net = net
        self.c = control_tokens  # (B, N, D): the embedded control, then the last copy's output
        self.scale = scale

    def __call__(self, index: int, tokens: torch.Tensor, t6, context: CaptionContext, hw) -> torch.Tensor:
        net = self.net
        if not 1 <= index <= net.num_blocks:
            return tokens
        block = net.controlnet[index - 1]
        if block.index == 0:
            w = block.before_proj.weight.dtype
            inp = tokens + block.before_proj(self.c.to(w)).to(tokens.dtype)  # (B, N, D)
        else:
            inp = self.c
        base = net.base_model
        args = (inp, t6, context.kv[net.config.depth + index - 1], context.mask, hw, base.attention_fp32)
        if base.gradient_checkpointing and net.training and torch.is_grad_enabled():
            self.c = checkpoint(block.copied_block, *args, use_reentrant=False)  # (B, N, D)
        else:
            self.c = block.copied_block(*args)  # (B, N, D)
        skip = block.after_proj(self.c.to(block.after_proj.weight.dtype)).to(tokens.dtype)  # (B, N, D)
        scale = self.scale
        if torch.is_tensor(scale) and scale.ndim:
            scale = scale.to(tokens.device, tokens.dtype).reshape(-1, 1, 1)
        return tokens + scale * skip


def check_control_scale(scale) -> float:
    """The ControlNet conditioning scale as a float; a one-line error unless it is a finite number."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise PixsigmaError(f"controlnet conditioning scale {scale!r} is not a number") from None
    if not math.isfinite(value):
        raise PixsigmaError(f"controlnet conditioning scale {scale} must be a finite number")
    return value


def control_steps(steps: int, start: float = 0.0, end: float = 1.0) -> list[bool]:
    """Which of `steps` sampling steps apply the control: step i when i/steps >= start and
    (i+1)/steps <= end (diffusers' control_guidance_start/end rule)."""
    if not 0.0 <= float(start) < float(end) <= 1.0:
        raise PixsigmaError(f"control guidance start {start} / end {end}; expected 0 <= start < end <= 1")
    return [i / steps >= start and (i + 1) / steps <= end for i in range(steps)]


class ControlledDenoiser:
    """`denoiser(x, t, context)` for a sampler's guided model function: the ControlNet with a fixed
    control latent on the steps `active` marks (one call per sampling step), the base alone on
    the others. The context must come from `ControlNetTransformer.prepare_caption`."""

    def __init__(self, net: ControlNetTransformer, control: torch.Tensor, scale=1.0, active: list[bool] | None = None):
        self.net, self.control, self.scale, self.active = net, control, scale, active
        self.step = 0

    def __call__(self, x, t, context, **base_options):
        on = self.active is None or (self.step < len(self.active) and self.active[self.step])
        self.step += 1
        if not on:
            return self.net.base_model(x, t, context, **base_options)
        return self.net(x, t, context, control=self.control, control_scale=self.scale, **base_options)
