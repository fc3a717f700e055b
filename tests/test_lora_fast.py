"""The LoRA inference fast path (pixsigma.model.lora_layers) against peft's own forward on the
same layers: several adapters with weights, scale 0, set_adapters, in-place weight changes,
explicit targets that split a fused projection only partly; DoRA, dropout in training and
autograd take peft's path."""

import pytest
import torch

from pixsigma.model import lora as L
from pixsigma.model.lora_layers import FastLoraLinear, peft_path
from pixsigma.model.transformer import TINY
from tests.test_lora import inputs, randomize_adapters, randomized, with_lora


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def both(model, seed=1):
    """(fast-path output, peft-path output), no grad."""
    with torch.no_grad():
        fast = model(*inputs(seed))
        with peft_path():
            slow = model(*inputs(seed))
    return fast, slow


def fast_layers(model) -> tuple[int, int]:
    """(modules that ran the fast path, modules that could: splits and unsplit LoRA linears)."""
    ran = could = 0
    for path, m in model.named_modules():
        top_level = isinstance(m, L.SplitLinear) or (isinstance(m, FastLoraLinear) and not path.rsplit(".", 1)[0].endswith(("qkv", "kv_linear")))
        could += top_level
        ran += top_level and hasattr(m, "_fast_lora_cache")
    return ran, could


def close(a, b, tol=1e-6):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def test_fast_path_equals_peft_for_weighted_adapters_scale_zero_and_set_adapters(tmp_path):
    for seed, name in ((0, "a"), (1, "b")):
        L.save_lora(with_lora(seed=seed), tmp_path / f"{name}.safetensors")
    model = randomized(TINY)
    L.load_lora(model, tmp_path / "a.safetensors", scale=0.7, adapter_name="a")
    L.load_lora(model, tmp_path / "b.safetensors", scale=-0.4, adapter_name="b")
    base = both(randomized(TINY))[1]
    fast, slow = both(model)
    assert fast_layers(model)[0] == fast_layers(model)[1] > 0  # every adapted layer ran the fast path
    assert close(fast, slow) and (fast - base).abs().max() > 1e-2
    L.set_adapters(model, ["a", "b"], [0.0, 0.0])
    fast, slow = both(model)
    assert close(fast, slow) and close(fast, base)
    L.set_adapters(model, ["b"], [1.5])  # "a" inactive, "b" at a new weight: the cached factors are rebuilt
    fast, slow = both(model)
    assert close(fast, slow) and (fast - base).abs().max() > 1e-2


@pytest.mark.parametrize("targets", [("all",), ("to_k", "attn1.to_out.0", "ff.net.2")])
def test_fast_path_equals_peft_on_every_target_layout(targets):
    """"all" (split pieces, the conv, adaLN, caption and timestep linears) and a list that adapts
    only some pieces of the fused projections."""
    model = with_lora(L.LoraSpec(rank=3, alpha=5, targets=targets))
    L.set_adapters(model, "default", 1.0)
    fast, slow = both(model)
    assert close(fast, slow) and fast_layers(model)[0] > 0


def test_in_place_changes_of_adapter_weights_reach_the_fast_path():
    model = with_lora()
    L.set_adapters(model, "default", 1.0)
    before, _ = both(model)
    randomize_adapters(model, seed=7)  # copy_ in place: same tensors, new values
    fast, slow = both(model)
    assert close(fast, slow) and (fast - before).abs().max() > 1e-2


def test_dora_dropout_and_training_take_the_peft_path():
    dora = with_lora(L.LoraSpec(rank=4, targets=("attention",), use_dora=True))
    fast, slow = both(dora)
    assert torch.equal(fast, slow) and fast_layers(dora)[0] == 0
    dropout = with_lora(L.LoraSpec(rank=4, dropout=0.5, targets=("attention",))).train()
    torch.manual_seed(0)
    with torch.no_grad():
        a = dropout(*inputs())
    assert fast_layers(dropout)[0] == 0  # dropout in training mode: peft's path (random masks)
    trained = with_lora()
    loss = trained(*inputs()).square().mean()
    loss.backward()
    grads = [p.grad for _, p in L.adapter_parameters(trained)]
    assert fast_layers(trained)[0] == 0 and all(g is not None and g.abs().sum() > 0 for g in grads[:4])
    assert torch.isfinite(a).all()


def test_bf16_fast_path_matches_peft_to_bf16_rounding():
    model = with_lora().to(torch.bfloat16)
    L.set_adapters(model, "default", 1.0)
    x, t, y, mask = inputs()
    with torch.no_grad():
        fast = model(x.bfloat16(), t, y.bfloat16(), mask).float()
        with peft_path():
            slow = model(x.bfloat16(), t, y.bfloat16(), mask).float()
    assert fast_layers(model)[0] > 0 and (fast - slow).norm() / slow.norm() < 2e-2
