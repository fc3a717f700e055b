"""Stage transitions: KV compression, depth, resolution and caption length keep what they should."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from pixsigma import PixsigmaError, load_transformer
from pixsigma.model import transitions
from pixsigma.model.checkpoint import save_safetensors
from pixsigma.model.transformer import KVCompressConfig
from pixsigma.model.transitions import add_kv_compression, change_caption_tokens, change_resolution, grow_depth
from tests.test_checkpoint import SIGMA_LIKE
from tests.test_model import randomized


def test_add_kv_compression_defaults_to_deep_half_with_conv_avg_init():
    model = randomized(SIGMA_LIKE.with_(depth=4))
    new = add_kv_compression(model)
    assert new.config.kv_compress == KVCompressConfig("conv", 2, (2, 3))
    assert new.history[-1] == {"action": "kv-compress", "operator": "conv", "ratio": 2, "layers": [2, 3]}
    for i in (2, 3):
        attn = new.blocks[i].attn
        assert torch.all(attn.sr.weight == 0.25) and torch.all(attn.sr.bias == 0)
        assert torch.all(attn.norm.weight == 1) and torch.all(attn.norm.bias == 0)
    # every weight the old model had is carried unchanged; only the new convs and norms are added
    old, carried = model.state_dict(), new.state_dict()
    assert all(torch.equal(carried[k], v) for k, v in old.items())
    assert set(carried) - set(old) == {f"blocks.{i}.attn.{n}.{p}" for i in (2, 3) for n in ("sr", "norm") for p in ("weight", "bias")}
    # Conv Avg Init: a compressed layer's keys/values are the 2×2 window averages, layer-normed
    # (float64, so equal to rounding)
    attn = new.double().blocks[3].attn
    h, w, c = 6, 8, SIGMA_LIKE.hidden_size
    tokens = torch.randn(3, h * w, c, dtype=torch.float64)
    pooled = F.avg_pool2d(tokens.transpose(1, 2).reshape(3, c, h, w), 2).flatten(2).transpose(1, 2)
    with torch.no_grad():
        assert (attn.compress(tokens, (h, w)) - F.layer_norm(pooled, (c,))).abs().max().item() < 1e-12
    # and on a known input: a 2×2 grid of one channel's values 1, 2, 3, 6 merges to their mean 3
    known = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)[None, :, None].expand(1, 4, c)
    merged = attn.sr.bias + sum(attn.sr.weight[:, 0, i // 2, i % 2] * known[0, i] for i in range(4))
    assert torch.equal(merged, torch.full((c,), 3.0, dtype=torch.float64))


def test_change_resolution_and_tokens():
    model = randomized(SIGMA_LIKE)
    moved = change_resolution(model, sample_size=64)
    assert (moved.config.sample_size, moved.config.pe_interpolation) == (64, 1.0)
    assert moved.history[-1]["action"] == "resolution"
    longer = change_caption_tokens(model, 30)
    null = longer.y_embedder.y_embedding
    assert null.shape == (30, 40) and torch.equal(null[:20], model.y_embedder.y_embedding)
    assert change_caption_tokens(model, 12).y_embedder.y_embedding.shape == (12, 40)


def test_grow_depth_keeps_the_function_and_then_trains(tmp_path):
    model = add_kv_compression(randomized(SIGMA_LIKE.with_(depth=4)))  # compressed: blocks 2, 3
    grown = grow_depth(model, add=2)
    assert grown.config.depth == 6 and grown.config.kv_compress.layers == (3, 4, 5)
    assert grown.history[-1] == {"action": "depth", "from": 4, "depth": 6, "inserted_at": 2, "kv_compress_layers": [3, 4, 5]}
    # old blocks keep their weights under their new index; new ones copy a neighbour
    assert torch.equal(grown.blocks[4].attn.sr.weight, model.blocks[2].attn.sr.weight)
    assert torch.equal(grown.blocks[2].mlp.fc1.weight, model.blocks[1].mlp.fc1.weight)
    assert torch.equal(grown.blocks[3].attn.sr.weight, model.blocks[2].attn.sr.weight)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 10.0]), torch.randn(2, 20, 40)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), grown(x, t, y))
    # the zeroed projections get a gradient at once, so the new blocks can learn
    grown(x, t, y).square().mean().backward()
    assert grown.blocks[2].mlp.fc2.weight.grad.abs().sum() > 0 and grown.blocks[3].attn.proj.weight.grad.abs().sum() > 0
    save_safetensors(grown, tmp_path / "g.safetensors")
    assert load_transformer(tmp_path / "g.safetensors").config.kv_compress.layers == (3, 4, 5)
    with pytest.raises(PixsigmaError, match="at must lie"):
        grow_depth(model, add=1, at=4)
    with pytest.raises(PixsigmaError, match="positive"):
        grow_depth(model, add=0)



def test_transitions_keep_attention_fp32_and_training_mode():
    model = randomized(SIGMA_LIKE).set_runtime_options(attention_fp32=True).train()
    for new in (add_kv_compression(model), grow_depth(model, add=1), change_resolution(model, 64),
                change_caption_tokens(model, 24)):
        assert new.attention_fp32 is True and new.training is True


def test_old_import_path_still_works_with_a_deprecation_warning():
    import pixsigma.model.checkpoint as checkpoint

    for name in ("add_kv_compression", "change_caption_tokens", "change_resolution", "grow_depth"):
        with pytest.warns(DeprecationWarning, match=f"checkpoint.{name} moved to pixsigma.model.transitions"):
            assert getattr(checkpoint, name) is getattr(transitions, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from pixsigma.model import add_kv_compression as current  # the package's name: no warning
    assert current is transitions.add_kv_compression
    with pytest.raises(AttributeError):
        checkpoint.no_such_name
