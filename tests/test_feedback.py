"""Inner Loop Feedback (pixsigma.model.feedback): a zero scale is exactly the base model, a
non-zero one changes it in the way the hand-computed feedback says, feedback files name their
base and block, and bad input gives one-line errors."""

import pytest
import torch
from safetensors import safe_open

from pixsigma.errors import PixsigmaError
from pixsigma.model.feedback import (FeedbackTransformer, feedback_base_hash, load_feedback, save_feedback)
from pixsigma.model.transformer import TINY, PixArtSigmaTransformer
from tests.test_model import randomized

CFG = TINY.with_(depth=4)


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([999, 10][:batch])
    cap = torch.randn(batch, 6, CFG.caption_channels, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]][:batch])
    return x, t, cap, mask


def test_zero_scale_is_exactly_the_base_model(single_thread):
    base = randomized(CFG)
    x, t, cap, mask = inputs()
    with torch.no_grad():
        ref = base(x, t, cap, mask)
        net = FeedbackTransformer.from_transformer(base, 1)
        with torch.no_grad():  # make the copied block differ from block 1, so only the zero scale hides it
            for p in net.feedback.block.parameters():
                p.add_(0.05)
        assert net.feedback.scale.item() == 0.0
        assert torch.equal(net(x, t, cap, mask), ref)
        assert torch.equal(net(x, t, net.prepare_caption(cap, mask)), ref)  # with a prepared caption too


def test_nonzero_scale_feeds_the_predicted_features_into_the_next_block(single_thread):
    base = randomized(CFG)
    x, t, cap, mask = inputs()
    net = FeedbackTransformer.from_transformer(base, 2)
    with torch.no_grad():
        net.feedback.scale.fill_(0.5)
        out = net(x, t, cap, mask)
        assert not torch.allclose(out, base(x, t, cap, mask))
        # by hand: blocks 0..2, then h + s·(F(h) − h) with F the copied block, then block 3
        ctx = net.prepare_caption(cap, mask)
        seen = {}

        def record(i, tokens, t6, context, hw):
            if i == 3:
                seen["h"], seen["t6"], seen["hw"] = tokens, t6, hw
                fb = net.feedback.block(tokens, t6, ctx.kv[CFG.depth], context.mask, hw)
                return tokens + 0.5 * (fb - tokens)
            return tokens

        expected = base(x, t, ctx, block_hook=record)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_only_the_feedback_module_has_gradients(single_thread):
    base = randomized(CFG)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    net = FeedbackTransformer.from_transformer(base, 0)
    net.feedback.scale.data.fill_(0.1)
    x, t, cap, mask = inputs()
    net(x, t, cap, mask).pow(2).mean().backward()
    assert all(p.grad is None for p in base.parameters())
    assert net.feedback.scale.grad is not None and all(p.grad is not None for p in net.trainable_parameters())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_file_round_trip_names_base_and_block(tmp_path, single_thread):
    base = randomized(CFG)
    net = FeedbackTransformer.from_transformer(base, 1)
    with torch.no_grad():
        net.feedback.scale.fill_(0.3)
        net.feedback.block.mlp.fc2.bias.add_(1.0)
    path = save_feedback(net, tmp_path / "fb.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["pixsigma_feedback_block"] == "1" and meta["pixsigma_base_hash"] == feedback_base_hash(base)
    assert keys == {"feedback." + k for k in net.feedback.state_dict()}
    # the same base in bf16 has the same name, and the module loads onto it
    other = randomized(CFG)
    other.load_state_dict(base.state_dict())
    loaded = load_feedback(path, other.to(torch.bfloat16))
    assert loaded.block_index == 1 and loaded.feedback.scale.item() == pytest.approx(0.3)
    fresh = load_feedback(path, base)
    x, t, cap, mask = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, cap, mask), net(x, t, cap, mask))


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_base_and_bad_block_are_one_line_errors(tmp_path, single_thread):
    base = randomized(CFG)
    path = save_feedback(FeedbackTransformer.from_transformer(base, 2), tmp_path / "fb.safetensors")
    with pytest.raises(PixsigmaError) as e:
        load_feedback(path, randomized(CFG, seed=7))
    assert "trained on base" in one_line(e)
    with pytest.raises(PixsigmaError) as e:
        load_feedback(path, randomized(CFG.with_(depth=3)))  # block 2 feeds block 3, which a 3-block model lacks
    assert "out of range" in one_line(e) and "0..1" in one_line(e)
    for bad in (-1, 3, 4):
        with pytest.raises(PixsigmaError) as e:
            FeedbackTransformer(PixArtSigmaTransformer(CFG), bad)
        assert "out of range" in one_line(e)
    (tmp_path / "x.safetensors").write_bytes(b"not a file")
    with pytest.raises(PixsigmaError) as e:
        load_feedback(tmp_path / "x.safetensors", base)
    one_line(e)
    with pytest.raises(PixsigmaError) as e:
        load_feedback(tmp_path / "missing.safetensors", base)
    assert "does not exist" in one_line(e)
