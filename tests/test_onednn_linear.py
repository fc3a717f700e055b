"""CPU fast path 3: float32 Linear layers through oneDNN on weights reordered once per call."""

import pytest
import torch

from pixsigma.model.lora import LoraSpec, add_lora
from pixsigma.model.transformer import Linear, PixArtSigmaTransformer, TransformerConfig, onednn_linears
from pixsigma.pipeline import SigmaPipeline
from tests.tiny_components import build_pipeline_folder

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")]


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = PixArtSigmaTransformer(TransformerConfig(depth=2, hidden_size=64, num_heads=4, sample_size=8, caption_channels=32))
    for p in m.parameters():  # no zero-initialised layer: every Linear shapes the output
        torch.nn.init.normal_(p, std=0.05)
    return m.to(dtype).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 6, 32, generator=g),
            torch.ones(2, 6))


def test_inside_the_block_the_output_matches_and_every_layer_is_packed():
    m, args = _model(), _inputs()
    layers = [l for l in m.modules() if isinstance(l, Linear)]
    with torch.no_grad():
        ref = m(*args)
        with onednn_linears(m):
            assert all(l._onednn_weight is not None for l in layers)
            out = m(*args)
    assert all(l._onednn_weight is None for l in layers)  # freed at exit
    assert not torch.equal(out, ref)  # another kernel ran ...
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # ... with the same numbers to fp32 rounding


def test_weights_changed_between_blocks_are_never_stale():
    m, args = _model(), _inputs()
    with torch.no_grad():
        with onednn_linears(m):
            m(*args)
        m.blocks[0].mlp.fc1.weight.data += 0.1  # in place through .data: no version bump
        ref = m(*args)
        with onednn_linears(m):
            out = m(*args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_training_and_half_precision_take_the_plain_path():
    m, args = _model(), _inputs()
    m.train()
    with onednn_linears(m):
        loss = m(*args).square().mean()
        loss.backward()  # autograd through F.linear: gradients exist and are finite
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    half = _model(dtype=torch.bfloat16)
    with onednn_linears(half):
        assert all(l._onednn_weight is None for l in half.modules() if isinstance(l, Linear))


def test_lora_on_top_sees_the_packed_base(tmp_path):
    m, args = _model(), _inputs()
    add_lora(m, LoraSpec(rank=4, targets="attention"))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        ref = m(*args)
        with onednn_linears(m):
            out = m(*args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_pipeline_uses_it_by_default_and_can_switch_it_off(tmp_path):
    pipe = SigmaPipeline.from_pretrained(build_pipeline_folder(tmp_path / "p"))
    assert pipe.onednn_linear
    kw = {"num_inference_steps": 3, "seed": 0, "output_type": "latent"}
    fast = pipe("a red cat", **kw).images
    pipe.onednn_linear = False
    plain = pipe("a red cat", **kw).images
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-3)  # guidance 4.5 amplifies fp32 rounding over the steps
    assert not torch.equal(fast, plain)
