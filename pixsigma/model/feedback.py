"""Inner Loop Feedback (ILF) on the one PixArt-Σ transformer.

A feedback module is a copy of one backbone block (all its settings and, to start, its weights)
plus a learnable scalar `scale` initialised to zero. In every forward pass it reads the output h
of backbone block k, predicts from it the features of a later denoising step, F(h), and feeds
the prediction back into the pass: block k+1 receives

    h + scale · (F(h) − h)

so a fresh module (scale 0) leaves the base model's output exactly as it was, and training moves
`scale` and F together. Only the module trains (the backbone stays frozen), by distillation
against the teacher's many-step trajectory (pixsigma.train.ilf), so that a sampler with fewer
steps lands where the teacher's many steps do. The cost is one extra block per step.

`FeedbackTransformer` wraps a base model like the ControlNet does: the forward pass is the
base's own, with the module run from its `block_hook`; the module's cross-attention keys/values
are appended to the caption context by `prepare_caption`. Feedback files are safetensors with
the module's weights (`feedback.*` keys) and metadata naming the block index and the base by
`feedback_base_hash` (the base's weights rounded to bf16 and hashed, so the same base loaded in
fp32, fp16 or bf16 has one name).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from pixsigma.errors import PixsigmaError
from pixsigma.io import weights_hash, write_safetensors
from pixsigma.model.attached import AttachedToBase
from pixsigma.model.transformer import CaptionContext, PixArtBlock, PixArtSigmaTransformer

FORMAT = "pixsigma-ilf-feedback"
PREFIX = "feedback."


def feedback_base_hash(base: PixArtSigmaTransformer) -> str:
    """The base's name in feedback files: `weights_hash` of its state dict with floating-point
    tensors rounded to bf16 (identical for the fp32, fp16 and bf16 copies of one model)."""
    sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in base.state_dict().items()}
    return weights_hash(sd)


def check_block_index(block: int, depth: int) -> int:
    """The feedback block index as an int; a one-line error unless 0 <= block <= depth - 2."""
    if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block <= depth - 2:
        raise PixsigmaError(f"feedback block index {block!r} is out of range for a {depth}-block model; expected "
                            f"0..{depth - 2} (the module reads block k's output and feeds block k+1)")
    return block


class FeedbackModule(nn.Module):
    """A copied backbone block and its zero-initialised feedback scale."""

    def __init__(self, block: PixArtBlock, index: int):
        super().__init__()
        self.index = index  # the backbone block whose output it reads
        self.block = block
        self.scale = nn.Parameter(torch.zeros(1))  # 1-D: state-dict hashing views tensors as bytes

    def forward(self, tokens, t6, kv, mask, hw, attention_fp32: bool = False) -> torch.Tensor:
        predicted = self.block(tokens, t6, kv, mask, hw, attention_fp32)  # (B, N, D), in tokens' dtype
        return tokens + self.scale.to(tokens.dtype) * (predicted - tokens)  # (B, N, D)


class FeedbackTransformer(AttachedToBase):
    """`model(x, t, caption, caption_mask=None) -> (B, out, H, W)`: the base with feedback at block k.

    Arguments as for `PixArtSigmaTransformer`; a prepared caption must come from this module's
    `prepare_caption` (it holds the feedback block's keys/values after the base's)."""

    def __init__(self, base: PixArtSigmaTransformer, block: int):
        super().__init__()
        block = check_block_index(block, base.config.depth)
        self.base_model = base
        self.feedback = FeedbackModule(copy.deepcopy(base.blocks[block]), block)

    @classmethod
    def from_transformer(cls, base: PixArtSigmaTransformer, block: int) -> "FeedbackTransformer":
        """A new feedback module on `base` at `block`; the base frozen, only the module trains."""
        model = cls(base, block)
        return model.freeze_base(model.feedback)

    @property
    def block_index(self) -> int:
        return self.feedback.index


    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.feedback.parameters())

    def feedback_state_dict(self) -> dict[str, torch.Tensor]:
        return {PREFIX + k: v for k, v in self.feedback.state_dict().items()}

    def prepare_caption(self, caption: torch.Tensor, caption_mask: torch.Tensor | None = None) -> CaptionContext:
        """The base's caption context with the feedback block's cross-attention K/V appended."""
        return self.base_model.prepare_caption(caption, caption_mask, extra_blocks=[self.feedback.block])

    def forward(self, x, timestep, caption, caption_mask=None, force_drop_ids=None, hw_pixels=None, aspect_ratio=None,
                **base_options) -> torch.Tensor:
        base = self.base_model
        if isinstance(caption, CaptionContext):
            context = caption
        else:
            context = self.prepare_caption(base.drop_caption(caption, force_drop_ids), caption_mask)
        depth = self.config.depth
        if len(context.kv) != depth + 1:
            raise PixsigmaError(f"the caption context holds {len(context.kv)} blocks' keys/values; expected {depth + 1} "
                                "(build it with FeedbackTransformer.prepare_caption)")
        fb, kv = self.feedback, context.kv[depth]

        def hook(index, tokens, t6, ctx, hw):
            if index != fb.index + 1:
                return tokens
            return fb(tokens, t6, kv, ctx.mask, hw, base.attention_fp32)

        return base(x, timestep, context, None, None, hw_pixels, aspect_ratio, block_hook=hook, **base_options)


def save_feedback(model: FeedbackTransformer, path, extra_metadata: dict | None = None, module=None) -> Path:
    """Write the feedback module (`module`'s weights when given, e.g. an EMA copy's) with its base's hash."""
    weights = (module or model).feedback_state_dict()
    cfg = model.config
    meta = {"pixsigma_format": FORMAT, "pixsigma_feedback_block": str(model.block_index),
            "pixsigma_base_hash": feedback_base_hash(model.base_model),
            "pixsigma_base_weights_hash": weights_hash(model.base_model.state_dict()),  # exact, in the base's dtype
            "pixsigma_base_shape": json.dumps({"depth": cfg.depth, "hidden_size": cfg.hidden_size}),
            **{k: str(v) for k, v in (extra_metadata or {}).items()}}
    return write_safetensors(path, weights, meta)


def read_feedback(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A feedback file's tensors and metadata; a one-line error for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise PixsigmaError(f"{path}: feedback file does not exist; expected a .safetensors file from pixsigma distill ilf")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise PixsigmaError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:120]})") from None
    if meta.get("pixsigma_format") != FORMAT:
        raise PixsigmaError(f"{path}: not an ILF feedback file (metadata pixsigma_format is {meta.get('pixsigma_format')!r}, "
                            f"expected {FORMAT!r})")
    return tensors, meta


def load_feedback(path, base: PixArtSigmaTransformer, check_base: bool = True) -> FeedbackTransformer:
    """A FeedbackTransformer on `base` with the file's module; one-line errors when the file names
    another base (by hash) or a block index `base` does not have."""
    tensors, meta = read_feedback(path)
    try:
        block = int(meta.get("pixsigma_feedback_block", ""))
    except ValueError:
        raise PixsigmaError(f"{path}: feedback file has no valid pixsigma_feedback_block metadata") from None
    check_block_index(block, base.config.depth)
    if check_base:
        want, have = meta.get("pixsigma_base_hash"), feedback_base_hash(base)
        if want != have:
            raise PixsigmaError(f"{path}: feedback module was trained on base {want} but this model is {have}; "
                                "expected the base model it was distilled from")
    dtype = base.x_embedder.proj.weight.dtype
    model = FeedbackTransformer(base, block).to(device=base.x_embedder.proj.weight.device)
    own = model.feedback.state_dict()
    got = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    if set(got) != set(own) or any(got[k].shape != own[k].shape for k in own):
        diff = sorted(set(got) ^ set(own)) or [k for k in own if got[k].shape != own[k].shape]
        raise PixsigmaError(f"{path}: feedback weights do not fit this model's block {block} (first differing: {diff[:3]})")
    model.feedback.load_state_dict(got)
    model.feedback.block.to(dtype)
    return model.eval()
