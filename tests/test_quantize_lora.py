"""LoRA on a quantized transformer (int8, int4, svdquant): each adapted layer adds exactly the
adapters' low-rank update to its quantized output, the model's LoRA delta matches the float
model's within the quantization error, scale 0 and unload give the quantized base back, and
the orders and merges that cannot work are one-line errors."""

from __future__ import annotations

import pytest
import torch

from pixsigma.errors import PixsigmaError
from pixsigma.model import lora as L
from pixsigma.model.lora_layers import FastLoraLinear, RowSlice, peft_path
from pixsigma.model.quantize import MODES, quantize_transformer, save_quantized
from tests.test_quantize import tiny_inputs, tiny_model


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A rank-4 LoRA on every target ("all": split qkv / kv pieces, MLP, the float embedders), random B."""
    model = tiny_model()
    L.add_lora(model, L.LoraSpec(rank=4, alpha=4, targets=("all",)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in L.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return L.save_lora(model, tmp_path_factory.mktemp("qlora") / "a.safetensors")


def run(model, dtype=torch.bfloat16):
    x, t, y, mask = tiny_inputs()
    with torch.no_grad():
        return model(x.to(dtype), t, y.to(dtype), mask).float()


@pytest.fixture(scope="module")
def float_delta(lora_file):
    """(float base output, float LoRA delta), fp32."""
    model = tiny_model()
    base = run(model, torch.float32)
    L.load_lora(model, lora_file)
    return base, run(model, torch.float32) - base


@pytest.mark.parametrize("mode", MODES)
def test_lora_delta_on_a_quantized_model_matches_the_float_delta(mode, lora_file, float_delta):
    """The LoRA'd quantized output minus the quantized base equals the float model's LoRA delta up
    to the error quantization itself makes: ||Δq − Δf|| ≤ 2·||base_q − base_f|| + 2% of ||Δf||
    (bf16 rounding of the adapter path). The adapters see the quantized model's activations, so
    the delta inherits that error but adds none of its own; an adapter missing or misplaced on the
    quantized layers would move Δq by a large part of ||Δf||, far above the bound."""
    base_f, delta_f = float_delta
    model = quantize_transformer(tiny_model(), mode)
    base_q = run(model)
    name = L.load_lora(model, lora_file)
    delta_q = run(model) - base_q
    bound = 2 * (base_q - base_f).norm() + 0.02 * delta_f.norm()
    assert (delta_q - delta_f).norm() <= bound, (mode, float((delta_q - delta_f).norm() / delta_f.norm()))
    assert delta_f.norm() > 5 * bound  # the adapter's effect is far larger than the tolerance
    with peft_path():  # peft's own forward on the same quantized layers agrees to bf16 rounding
        assert ((run(model) - base_q) - delta_q).norm() <= 0.03 * delta_q.norm()
    L.set_adapters(model, [name], [0.0])
    assert torch.equal(run(model), base_q)
    L.set_adapters(model, [name], [1.0])
    L.unload_lora(model)
    assert torch.equal(run(model), base_q) and not [m for m in model.modules() if isinstance(m, (FastLoraLinear, RowSlice))]


@pytest.mark.parametrize("mode", MODES)
def test_each_quantized_layer_adds_exactly_its_low_rank_update(mode, lora_file):
    """The fused qkv stays one quantized layer (the pieces are row slices of its output) and
    out − base(x) = x·Aᵀ·Bᵀ·s per piece, computed by hand in fp32, to bf16 rounding of the output."""
    model = quantize_transformer(tiny_model(), mode)
    quantized = model.blocks[0].attn.qkv
    L.load_lora(model, lora_file, scale=0.8)
    split = model.blocks[0].attn.qkv
    assert split.whole is quantized and all(isinstance(p.base_layer, RowSlice) for p in split.pieces())
    x = torch.randn(2, 7, quantized.in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        delta = (split(x).float() - quantized(x).float()).reshape(14, -1)
    hand = []
    for piece in split.pieces():
        a, b, s = piece.lora_A["default_0"].weight.float(), piece.lora_B["default_0"].weight.float(), piece.scaling["default_0"]
        hand.append(x.float().reshape(14, -1) @ a.t() @ b.t() * s)
    hand = torch.cat(hand, dim=1)
    ulp = quantized(x).float().abs().max() * 2**-7  # one bf16 rounding of the output
    assert (delta - hand).abs().max() <= ulp and hand.abs().max() > 20 * ulp


def test_merging_training_and_lora_then_quantize_are_one_line_errors(lora_file, tmp_path):
    model = quantize_transformer(tiny_model(), "int8")
    L.load_lora(model, lora_file)
    for call, message in ((lambda: L.fuse_lora(model), "merging would re-quantize"),
                          (lambda: L.add_lora(model, L.LoraSpec(rank=2)), "adapters train on the float transformer"),
                          (lambda: save_quantized(model, tmp_path / "q.safetensors"), "expected unload_lora first")):
        with pytest.raises(PixsigmaError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    float_model = tiny_model()
    L.load_lora(float_model, lora_file)
    with pytest.raises(PixsigmaError, match="expected quantizing first and loading the LoRA afterwards"):
        quantize_transformer(float_model, "int8")
