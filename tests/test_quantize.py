"""Quantized inference: int8 / int4 weight-only layers against hand-computed quantization,
SVDQuant's pieces against an independent SVD and a hand-written W4A4 forward, checkpoints read
back bit-identically without re-quantizing, the pipeline and CLI in every mode, one-line errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pixsigma.errors import PixsigmaError
from pixsigma.model import quantize as qz
from pixsigma.model.quantize import (
    NAIVE_W4A4, SVDQuantConfig, SVDQuantLinear, load_quantized, pack_int4, quantize_linears, quantize_transformer,
    save_quantized, unpack_int4,
)
from pixsigma.model.transformer import PixArtSigmaTransformer, TransformerConfig

CFG = TransformerConfig(depth=2, hidden_size=64, num_heads=2, patch_size=2, caption_channels=64, max_caption_tokens=8,
                        sample_size=8, pe_interpolation=1.0)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def rel(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def tiny_model(seed=0) -> PixArtSigmaTransformer:
    torch.manual_seed(seed)
    model = PixArtSigmaTransformer(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-initialised layers get weights too
    return model


def tiny_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700, 50]), torch.randn(2, 5, 64, generator=g),
            torch.ones(2, 5))


# -- weight-only layers vs hand-computed quantization ---------------------------------------------


def test_int8_linear_matches_hand_per_channel_quantization():
    torch.manual_seed(0)
    lin = nn.Linear(128, 48, bias=False).bfloat16()
    w = lin.weight.detach().float()
    scale = (lin.weight.detach().abs().amax(dim=1, keepdim=True) / 127.5).float()  # symmetric, per output channel (bf16)
    hand = (torch.clamp(torch.round(w / scale), -128, 127) * scale).bfloat16().float()
    m = nn.Sequential(lin)
    assert quantize_linears(m, "int8") == ["0"]
    assert m[0].weight.qdata.dtype == torch.int8
    with torch.no_grad():
        deq = m(torch.eye(128, dtype=torch.bfloat16)).float().T  # the weights the layer multiplies by
    assert torch.equal(deq, hand)  # exactly those levels
    err = (deq - w).abs() / scale
    assert err.max() <= 1 and err.mean() > 0.1  # a step of the float weights at most (bf16 spacing included), and quantized


def test_int4_linear_matches_hand_group_quantization():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False).bfloat16()
    w = lin.weight.detach()
    g = w.reshape(64, 2, 64)  # groups of 64 input weights
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    # asymmetric 4-bit with a float zero point at the middle level, computed in bf16 as torchao does
    scale = (hi - lo) / 15
    zero = lo + scale * 8
    q = torch.clamp(torch.round((g - (zero - scale * 8)) / scale), 0, 15)
    hand = ((q.float() - 8) * scale.float() + zero.float()).reshape(64, 128)
    m = nn.Sequential(lin)
    quantize_linears(m, "int4")
    with torch.no_grad():
        deq = m(torch.eye(128, dtype=torch.bfloat16)).float().T  # the weights the kernel multiplies by
    assert (deq - hand).abs().max() < 0.05 * scale.float().amax()  # the same levels up to bf16 rounding
    err = (deq - w.float()).reshape(64, 2, 64).abs() / scale.float()
    assert err.max() <= 0.75 and err.mean() > 0.1  # about half a step of the float weights at most, and quantized


def test_int4_layers_not_multiple_of_group_stay_unquantized():
    m = nn.Sequential(nn.Linear(96, 16), nn.Linear(64, 16))
    assert quantize_linears(m, "int4") == ["1"]
    assert type(m[0].weight) is nn.Parameter


# -- SVDQuant ---------------------------------------------------------------------------------------


def test_pack_int4_round_trip():
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32)
    assert torch.equal(unpack_int4(packed), q)


def test_low_rank_branch_is_top_r_svd_of_smoothed_weight():
    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    amax = torch.rand(128) * 5 + 0.1
    q = SVDQuantLinear.from_linear(lin, SVDQuantConfig(rank=16, alpha=0.5), amax)
    w = lin.weight.detach().double().numpy()
    lam = amax.double().numpy() ** 0.5 / np.abs(w).max(axis=0) ** 0.5  # λ_j = max|X_j|^α / max|W_j|^(1-α)
    assert np.allclose(q.smooth.double().numpy(), lam, rtol=1e-5)
    u, s, vt = np.linalg.svd(w * lam[None, :], full_matrices=False)
    top = (u[:, :16] * s[:16]) @ vt[:16]
    branch = (q.up.double() @ q.down.double()).numpy()
    assert np.linalg.norm(branch - top) / np.linalg.norm(top) < 1e-2  # bf16 factors
    assert np.linalg.norm(branch - (u[:, :15] * s[:15]) @ vt[:15]) > 5 * np.linalg.norm(branch - top)


def test_svdquant_forward_matches_hand_w4a4():
    torch.manual_seed(0)
    lin = nn.Linear(128, 32)
    q = SVDQuantLinear.from_linear(lin, SVDQuantConfig(rank=4, group_size=64), torch.rand(128) + 0.5)
    x = torch.randn(3, 128)

    def q4(t):  # symmetric 4-bit per group of 64 along the last dim, written out
        g = t.reshape(*t.shape[:-1], -1, 64)
        s = g.abs().amax(-1, keepdim=True) / 7
        return (torch.clamp(torch.round(g / s), -8, 7) * s).reshape(t.shape)

    xs = x / q.smooth
    smoothed = lin.weight.detach() * q.smooth
    residual = smoothed - q.up.float() @ q.down.float()
    expected = q4(xs) @ q4(residual).T + xs @ (q.up.float() @ q.down.float()).T + lin.bias.detach().bfloat16().float()
    with torch.no_grad():
        y = q(x)
    assert rel(y, expected) < 1e-5
    assert rel(y, lin(x).detach()) > 1e-3  # it is quantized


def outlier_layer_and_input():
    """A weight with a few dominant directions and outlier input channels, as trained DiT layers
    have; the activations carry 20x outliers on 2% of the channels."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * 0.02
    w += 0.5 * torch.randn(256, 8, generator=g) @ torch.randn(8, 512, generator=g) / 8  # low-rank outliers
    lin = nn.Linear(512, 256)
    with torch.no_grad():
        lin.weight.copy_(w)
    x = torch.randn(64, 512, generator=g)
    x[:, torch.randperm(512, generator=g)[:10]] *= 20
    return lin, x


def test_svdquant_rank32_error_at_most_a_third_of_naive_w4a4():
    lin, x = outlier_layer_and_input()
    with torch.no_grad():
        ref = lin(x)
        naive = SVDQuantLinear.from_linear(lin, NAIVE_W4A4)(x)
        svd = SVDQuantLinear.from_linear(lin, SVDQuantConfig(rank=32), x.abs().amax(0))(x)
    assert rel(svd, ref) <= rel(naive, ref) / 3


# -- the transformer: modes, checkpoints, errors -----------------------------------------------------


@pytest.mark.parametrize("mode", qz.MODES)
def test_quantized_transformer_close_and_round_trip_bit_identical(mode, tmp_path, monkeypatch):
    model = tiny_model()
    x, t, cap, mask = tiny_inputs()
    with torch.no_grad():
        ref = model.to(torch.bfloat16)(x, t, cap, mask).float()
    model.float()
    quantize_transformer(model, mode, calibrate=lambda: model(x, t, cap, mask))
    with torch.no_grad():
        y = model(x, t, cap, mask)
    assert 0 < rel(y, ref) < {"int8": 0.02, "int4": 0.15, "svdquant": 0.3}[mode]
    path = save_quantized(model, tmp_path / "q.safetensors")

    def no_quantizing(*a, **k):
        raise AssertionError("loading re-quantized")
    with monkeypatch.context() as patched:
        for name in ("quantize_groups", "low_rank", "quantize_linears", "smoothing_factors"):
            patched.setattr(qz, name, no_quantizing)
        loaded = load_quantized(path, model=tiny_model(1))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cap, mask), y)
    assert loaded.quantization["mode"] == mode
    assert qz.transformer_bytes(loaded) == qz.transformer_bytes(model)


def test_weight_bytes_shrink():
    base = tiny_model().to(torch.bfloat16)
    full = qz.transformer_bytes(base)
    blocks = sum(m.weight.numel() * 2 for m in qz.target_linears(base).values())
    int8 = qz.transformer_bytes(quantize_transformer(copy.deepcopy(base), "int8"))
    int4 = qz.transformer_bytes(quantize_transformer(copy.deepcopy(base), "int4"))
    assert full - blocks / 2 <= int8 < full - blocks / 2 * 0.9  # each block weight: 1 byte instead of 2, plus scales
    assert int4 < full - blocks * 0.6


def test_shape_mismatch_and_bad_modes_are_one_line_errors(tmp_path):
    model = quantize_transformer(tiny_model(), "int8")
    path = save_quantized(model, tmp_path / "q.safetensors")
    other = PixArtSigmaTransformer(CFG.with_(depth=3))
    with pytest.raises(PixsigmaError, match="depth=2 but the model has depth=3") as e:
        load_quantized(path, model=other)
    assert "\n" not in str(e.value)
    for bad in (lambda: quantize_transformer(tiny_model(), "int3"), lambda: qz.check_quantize_args(None, "svdquant", "cpu"),
                lambda: qz.check_quantize_args("int4", None, "cuda"), lambda: quantize_transformer(model, "int8"),
                lambda: load_quantized(tmp_path / "nope.safetensors"), lambda: SVDQuantConfig(rank=-1)):
        with pytest.raises(PixsigmaError) as e:
            bad()
        assert "\n" not in str(e.value)
    with pytest.raises(PixsigmaError, match="unknown quantization mode 'int3'; expected one of int8, int4, svdquant"):
        qz.check_mode("int3")


def test_text_encoder_int8_int4_close_to_bf16():
    from tests.tiny_components import build_text_encoder

    ids = torch.randint(0, 96, (2, 12))
    for mode, tol in (("int8", 0.03), ("int4", 0.25)):
        enc = build_text_encoder(96, d_model=64)
        with torch.no_grad():
            ref = enc.to(torch.bfloat16)(input_ids=ids).last_hidden_state.float()
            names = qz.quantize_text_encoder(enc, mode)
            y = enc(input_ids=ids).last_hidden_state.float()
        assert names and 0 < rel(y, ref) < tol, (mode, rel(y, ref))
