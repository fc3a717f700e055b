"""peft's LoRA layer with an inference fast path, and the row slice of a quantized fused projection.

peft creates, trains, saves, merges and scales the adapters; `FastLoraLinear` is peft's own
`lora.Linear` (registered through peft's custom-module mapping) whose forward takes a shorter road
when nothing needs peft's general one: no autograd graph to record, no dropout in training mode,
no DoRA or other variant, nothing merged, no autocast. It then computes

    y = base(x) + (x · A_catᵀ) · B_catᵀ,   A_cat = [A_1; A_2; ...],  B_cat = [s_1·B_1, s_2·B_2, ...]

the active adapters' low-rank paths batched into one thin matmul and one in-place addmm (no
separate dropout, scale, add and cast passes). s_i is peft's `scaling[adapter]`, which already
includes any set_adapters weight. A_cat and B_cat are cached and rebuilt when an adapter
tensor changes (tracked by identity, storage and in-place version), the scales change, or the
active set changes. The same path serves a split fused projection (`split_forward`): its base
pieces run as matmuls straight into their column slices of one output (no torch.cat), or, for a
quantized fused layer kept whole, as ONE call of that layer.

A quantized model's fused qkv / kv projection is not split into quantized pieces: it stays one
layer, and each diffusers piece (to_q, to_k, to_v) becomes a `RowSlice` of its output, which
peft wraps like any linear. The base runs once per call on the fast path.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.lora import Linear as PeftLinear
from peft.tuners.lora import LoraLayer
from torch import nn


_FAST = [True]


@contextmanager
def peft_path():
    """Run every LoRA layer through peft's own forward inside the block (for comparisons)."""
    _FAST[0] = False
    try:
        yield
    finally:
        _FAST[0] = True


class RowSlice(nn.Module):
    """Output features [start, stop) of a fused projection that stays whole (a quantized one).

    The source layer is owned (registered) by the SplitLinear holding this slice; the slice keeps
    a plain reference, so its weights appear once in the state dict."""

    def __init__(self, source: nn.Module, start: int, stop: int):
        super().__init__()
        object.__setattr__(self, "source", source)  # not a submodule: no second copy of its weights
        self.in_features, self.out_features, self.start, self.stop = source.in_features, stop - start, start, stop

    @property
    def qweight(self) -> torch.Tensor:
        """The source's stored weight: where peft looks for a quantized layer's device."""
        return getattr(self.source, "qweight", None) if hasattr(self.source, "qweight") else self.source.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.source(x)[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.stop} of {type(self.source).__name__}"


class FastLoraLinear(PeftLinear):
    """peft's LoRA Linear, with the batched inference path of the module doc; also wraps linear-like
    layers that are not nn.Linear (quantized layers, RowSlice) by their in/out features."""

    def _get_in_out_features(self, module: nn.Module):
        return module.in_features, module.out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not args and not kwargs:
            terms = active_terms([self], x)
            if terms is not None:
                x2 = x.reshape(-1, x.shape[-1])
                out = self.base_layer(x2)
                if out.dtype == x.dtype:
                    add_low_rank(self, out, x2, [self.out_features], terms)
                    return out.view(*x.shape[:-1], out.shape[-1])
        return super().forward(x, *args, **kwargs)


def _layer_terms(layer: nn.Module, dtype: torch.dtype) -> list | None:
    """[(A (r, in), B (out, r), scaling)] of a peft layer's active adapters; [] for a plain layer;
    None when only peft's own forward is right for it."""
    if not isinstance(layer, LoraLayer):
        return []
    if layer.disable_adapters or layer.merged:
        return None
    terms = []
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        dropout, a, b = layer.lora_dropout[name], layer.lora_A[name], layer.lora_B[name]
        if name in layer.lora_variant or b.bias is not None or (dropout.training and not isinstance(dropout, nn.Identity)):
            return None
        if a.weight.dtype != dtype or b.weight.dtype != dtype:
            return None
        terms.append((a.weight, b.weight, layer.scaling[name]))
    return terms


def active_terms(layers: list[nn.Module], x: torch.Tensor) -> list[list] | None:
    """Each layer's active low-rank terms, or None when the fast path does not apply to the call."""
    if not _FAST[0] or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return None
    terms = [_layer_terms(layer, x.dtype) for layer in layers]
    if any(t is None for t in terms):
        return None
    if torch.is_grad_enabled():  # only where no graph would be recorded: training takes peft's path
        tensors = [x] + [w for t in terms for a, b, _ in t for w in (a, b)]
        tensors += [p for layer in layers for p in _base(layer).parameters(recurse=False)]
        if any(t.requires_grad for t in tensors):
            return None
    return terms


def _base(layer: nn.Module) -> nn.Module:
    return layer.get_base_layer() if isinstance(layer, LoraLayer) else layer


def _low_rank_factors(owner: nn.Module, outs: list[int], terms: list[list]):
    """(A_cat (R, in), [B_i (out_i, R_i) with scalings folded in, column slices of R]), cached on owner."""
    key = tuple((id(w), w.data_ptr(), w._version, tuple(w.shape)) for t in terms for a, b, _ in t for w in (a, b))
    key += tuple(s for t in terms for _, _, s in t)
    cache = getattr(owner, "_fast_lora_cache", None)
    if cache is not None and cache[0] == key:
        return cache[2], cache[3]
    with torch.no_grad():
        a_cat = torch.cat([a for t in terms for a, _, _ in t]) if any(terms) else None
        pieces, col = [], 0
        for t in terms:
            r = sum(a.shape[0] for a, _, _ in t)
            b = torch.cat([b * s for _, b, s in t], dim=1) if t else None
            pieces.append((b, slice(col, col + r)))
            col += r
    # the tensors stay referenced in the cache, so that no new tensor can take their address
    owner._fast_lora_cache = (key, [w for t in terms for a, b, _ in t for w in (a, b)], a_cat, pieces)
    return a_cat, pieces


def add_low_rank(owner: nn.Module, out: torch.Tensor, x2: torch.Tensor, outs: list[int], terms: list[list]) -> None:
    """out (rows, Σ outs) += each slice's Σ s·B(A x), in place: one matmul for all A's, one addmm per slice."""
    a_cat, pieces = _low_rank_factors(owner, outs, terms)
    if a_cat is None:
        return
    h = x2 @ a_cat.t()  # (rows, R)
    row = 0
    for n, (b, cols) in zip(outs, pieces):
        if b is not None:
            target = out if n == out.shape[1] else out[:, row:row + n]
            target.addmm_(h[:, cols], b.t())
        row += n


def split_forward(split: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """A SplitLinear's output on the fast path (None: take the pieces one by one). The base is one
    call of the whole layer it keeps (`split.whole`), else each piece's matmul into its slice."""
    layers = split.pieces()
    terms = active_terms(layers, x)
    if terms is None:
        return None
    x2 = x.reshape(-1, x.shape[-1])
    outs = [layer.out_features for layer in layers]
    if split.whole is not None:
        out = split.whole(x2)
    else:
        bases = [_base(layer) for layer in layers]
        if any(b.weight.dtype != x.dtype for b in bases):
            return None
        out = x2.new_empty(x2.shape[0], sum(outs))
        row = 0
        for base, n in zip(bases, outs):
            target = out[:, row:row + n]
            if base.bias is not None:
                torch.addmm(base.bias, x2, base.weight.t(), out=target)
            else:
                torch.mm(x2, base.weight.t(), out=target)
            row += n
    if out.dtype != x.dtype:
        return None
    add_low_rank(split, out, x2, outs, terms)
    return out.view(*x.shape[:-1], out.shape[-1])
