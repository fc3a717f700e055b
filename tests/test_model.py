"""The transformer: parity with diffusers, masks, KV compression, precision, checkpointing."""

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from pixsigma.model.checkpoint import save_diffusers
from pixsigma.model.transformer import (
    TINY,
    XL_2,
    KVCompressConfig,
    PixArtSigmaTransformer,
    TransformerConfig,
    count_parameters,
    sincos_2d,
)


def randomized(config: TransformerConfig, seed: int = 0) -> PixArtSigmaTransformer:
    """A model whose every weight is random (the default init zeroes the output layers)."""
    torch.manual_seed(seed)
    model = PixArtSigmaTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    return model


def diffusers_twin(model, tmp_path):
    from diffusers import PixArtTransformer2DModel

    save_diffusers(model, tmp_path / "transformer")
    return PixArtTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()


def run_diffusers(ref, x, t, y, mask, size=None):
    added = {"resolution": None, "aspect_ratio": None}
    if size is not None:
        added = {"resolution": torch.tensor([size] * x.shape[0], dtype=torch.float32),
                 "aspect_ratio": torch.tensor([[size[0] / size[1]]] * x.shape[0], dtype=torch.float32)}
    with torch.no_grad():
        return ref(x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=added).sample


PARITY_CASES = [
    # (config changes, latent H, W, batch)
    (dict(), 8, 8, 2),
    (dict(depth=3, hidden_size=96, num_heads=3, caption_channels=48, max_caption_tokens=20, pe_interpolation=0.5), 12, 20, 3),
    (dict(patch_size=1, learn_sigma=False, sample_size=8, pe_interpolation=2.0), 6, 10, 2),
    (dict(hidden_size=72, num_heads=2, in_channels=16, sample_size=32), 16, 8, 4),
]


@pytest.mark.parametrize("changes,h,w,batch", PARITY_CASES)
def test_parity_with_diffusers(tmp_path, changes, h, w, batch):
    config = TINY.with_(**changes)
    model = randomized(config)
    ref = diffusers_twin(model, tmp_path)
    g = torch.Generator().manual_seed(1)
    L = config.max_caption_tokens
    x = torch.randn(batch, config.in_channels, h, w, generator=g)
    t = torch.tensor([0.0, 999.0, 0.7, 500.0][:batch])
    y = torch.randn(batch, L, config.caption_channels, generator=g)
    mask = torch.zeros(batch, L)
    for i in range(batch):
        mask[i, : max(1, L - 3 * i - 1)] = 1  # a different valid length for every sample
    with torch.no_grad():
        ours = model(x, t, y, mask)
    theirs = run_diffusers(ref, x, t, y, mask)
    assert ours.shape == (batch, config.out_channels, h, w)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_parity_with_diffusers_micro_conditions(tmp_path):
    """PixArt-α 1024-MS style size / aspect-ratio conditions."""
    config = TINY.with_(hidden_size=96, num_heads=4, micro_conditions=True)
    model = randomized(config)
    ref = diffusers_twin(model, tmp_path)
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([3.0, 990.0])
    y, mask = torch.randn(2, 16, 32), torch.ones(2, 16)
    with torch.no_grad():
        ours = model(x, t, y, mask, hw_pixels=[64, 96], aspect_ratio=[64 / 96])
    theirs = run_diffusers(ref, x, t, y, mask, size=(64.0, 96.0))
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_padding_tokens_have_no_effect():
    model = randomized(TINY)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0])
    y = torch.randn(2, 16, 32)
    mask = torch.zeros(2, 16)
    mask[0, :5], mask[1, :9] = 1, 1
    y_garbage = y.clone()
    y_garbage[mask == 0] = torch.randn(int((mask == 0).sum()), 32) * 100
    with torch.no_grad():
        a, b = model(x, t, y, mask), model(x, t, y_garbage, mask)
        # and each sample equals itself run alone with only its valid tokens (to fp32 rounding:
        # a batch of 1 may take other matmul kernels than a batch of 2; outputs are O(1))
        alone = model(x[:1], t[:1], y[:1, :5], torch.ones(1, 5))
    assert torch.equal(a, b)
    assert (a[:1] - alone).abs().max().item() < 1e-5


def test_count_parameters_xl2():
    assert count_parameters(XL_2) == 610_856_096
    compressed = XL_2.with_(kv_compress=KVCompressConfig("conv", 2, tuple(range(14, 28))))
    extra = count_parameters(compressed) - count_parameters(XL_2)
    assert extra == 14 * (1152 * 4 + 1152 + 2 * 1152)
    assert extra / count_parameters(XL_2) == pytest.approx(0.000185, abs=1e-5)  # "0.018%"


def test_position_embedding_matches_formula():
    h, w, d, base, interp = 3, 5, 16, 4, 2.0
    emb = sincos_2d(d, h, w, base, interp)
    omega = [1 / 10000 ** (k / (d / 4)) for k in range(d // 4)]
    i, j = 2, 3
    row, col = i / (h / base) / interp, j / (w / base) / interp
    expected = [math.sin(col * o) for o in omega] + [math.cos(col * o) for o in omega]
    expected += [math.sin(row * o) for o in omega] + [math.cos(row * o) for o in omega]
    assert torch.allclose(emb[i * w + j], torch.tensor(expected), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# KV compression
# ---------------------------------------------------------------------------------------------


def compressed_config(operator="conv", ratio=2, layers=(1,)):
    return TINY.with_(kv_compress=KVCompressConfig(operator, ratio, layers))


def test_conv_avg_init_equals_average_pooling_then_layernorm():
    attn = PixArtSigmaTransformer(compressed_config()).blocks[1].attn
    h, w, c = 6, 8, 64
    tokens = torch.randn(3, h * w, c)
    with torch.no_grad():
        ours = attn.compress(tokens, (h, w))
    pooled = F.avg_pool2d(tokens.transpose(1, 2).reshape(3, c, h, w), 2).flatten(2).transpose(1, 2)
    expected = F.layer_norm(pooled, (c,))
    assert ours.shape == (3, 12, c)
    assert (ours - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("operator", ["conv", "ave", "uniform"])
def test_compressed_attention_equals_naive_reference(operator):
    torch.manual_seed(0)
    attn = PixArtSigmaTransformer(compressed_config(operator, ratio=2)).blocks[1].attn
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.1)
    h, w, c, heads = 4, 6, 64, 4
    x = torch.randn(2, h * w, c)
    with torch.no_grad():
        ours = attn(x, (h, w))
        q, k, v = attn.qkv(x).chunk(3, dim=-1)
        grid = lambda t: t.reshape(2, h, w, c)
        if operator == "uniform":
            pool = lambda t: grid(t)[:, ::2, ::2].reshape(2, -1, c)
        else:
            def pool(t):  # explicit window loop: mean over each 2×2 window
                g = grid(t)
                return torch.stack([g[:, i:i + 2, j:j + 2].mean((1, 2)) for i in range(0, h, 2) for j in range(0, w, 2)], 1)
        k, v = pool(k), pool(v)
        if operator == "conv":  # conv weights were randomized: apply the depthwise conv by hand
            def conv(t_full):
                g = grid(t_full)
                wgt, b = attn.sr.weight[:, 0], attn.sr.bias  # (C, 2, 2)
                out = [torch.einsum("bpqc,cpq->bc", g[:, i:i + 2, j:j + 2], wgt) + b for i in range(0, h, 2) for j in range(0, w, 2)]
                return attn.norm(torch.stack(out, 1))
            _, k_full, v_full = attn.qkv(x).chunk(3, dim=-1)
            k, v = conv(k_full), conv(v_full)
        qh = q.reshape(2, -1, heads, c // heads).transpose(1, 2)
        kh = k.reshape(2, -1, heads, c // heads).transpose(1, 2)
        vh = v.reshape(2, -1, heads, c // heads).transpose(1, 2)
        weights = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
        assert weights.shape[-1] == (h // 2) * (w // 2)  # N queries over N/R² keys
        naive = attn.proj((weights @ vh).transpose(1, 2).reshape(2, -1, c))
    assert (ours - naive).abs().max().item() < 1e-5


def reference_compress(attn, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """KV compression written out window by window in float64, from the documented rules.

    The grid is padded at the bottom and right to multiples of R: "conv" replicates the edge
    tokens (a window position past the edge reads the last row / column), then takes the
    depthwise weighted sum + bias and the LayerNorm; "ave" averages only the real tokens of a
    window; "uniform" keeps each window's top-left token.
    """
    (h, w), r, (b, _, c) = hw, attn.kv_ratio, tokens.shape
    grid = tokens.double().reshape(b, h, w, c)
    rows, cols = -(-h // r), -(-w // r)
    out = torch.zeros(b, rows * cols, c, dtype=torch.float64)
    for i in range(rows):
        for j in range(cols):
            if attn.kv_operator == "uniform":
                merged = grid[:, i * r, j * r]
            elif attn.kv_operator == "ave":
                real = [grid[:, y, x] for y in range(i * r, min(i * r + r, h)) for x in range(j * r, min(j * r + r, w))]
                merged = sum(real) / len(real)
            else:
                merged = attn.sr.bias.double().expand(b, c)
                for di in range(r):
                    for dj in range(r):
                        merged = merged + grid[:, min(i * r + di, h - 1), min(j * r + dj, w - 1)] * attn.sr.weight[:, 0, di, dj].double()
            out[:, i * cols + j] = merged
    if attn.kv_operator == "conv":
        norm = attn.norm
        mean = out.mean(-1, keepdim=True)
        var = out.var(-1, unbiased=False, keepdim=True)
        out = (out - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()
    return out


@pytest.mark.parametrize("operator", ["conv", "ave", "uniform"])
@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("hw", [(5, 7), (3, 9), (7, 3), (1, 1), (6, 4)])
def test_compression_on_odd_grids_equals_padded_window_reference(operator, ratio, hw):
    """Token grids not divisible by R are padded as documented; random weights, float64, exact to rounding."""
    model = randomized(compressed_config(operator, ratio=ratio, layers=(0, 1))).double()
    attn = model.blocks[1].attn
    tokens = torch.randn(3, hw[0] * hw[1], 64, dtype=torch.float64)
    with torch.no_grad():
        ours = attn.compress(tokens, hw)
        expected = reference_compress(attn, tokens, hw)
    assert ours.shape == (3, -(-hw[0] // ratio) * -(-hw[1] // ratio), 64)
    assert (ours - expected).abs().max().item() < 1e-12


@pytest.mark.parametrize("operator", ["conv", "ave", "uniform"])
@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("hw", [(10, 14), (6, 18), (14, 6), (2, 2)])
def test_odd_latent_sizes_and_aspect_ratios(monkeypatch, operator, ratio, hw):
    """The whole model on latent grids whose token grids (5×7, 3×9, 7×3, 1×1) are not multiples of R,
    random weights: the output equals the model run with the window-by-window reference compression."""
    import pixsigma.model.transformer as tr

    model = randomized(compressed_config(operator, ratio=ratio, layers=(0, 1)))
    x, t = torch.randn(2, 4, *hw), torch.tensor([1.0, 500.0])
    y, mask = torch.randn(2, 16, 32), torch.ones(2, 16)
    with torch.no_grad():
        out = model(x, t, y, mask)
        monkeypatch.setattr(tr.SelfAttention, "compress", lambda self, tokens, grid_hw: reference_compress(self, tokens, grid_hw).float())
        expected = model(x, t, y, mask)
    assert out.shape == (2, 8, *hw)
    assert out.abs().max().item() > 0.1  # random weights: the output is not the zero of the default init
    assert (out - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("hw", [(8, 8), (5, 7)])
def test_conv_compression_equals_the_strided_conv_module(hw):
    """The window multiply-adds give what the checkpoint's Conv2d gives (padded grids included)."""
    attn = PixArtSigmaTransformer(compressed_config("conv", ratio=2)).blocks[1].attn
    torch.manual_seed(1)
    with torch.no_grad():
        attn.sr.weight.normal_()
        attn.sr.bias.normal_()
        (h, w), c = hw, attn.sr.weight.shape[0]
        tokens = torch.randn(3, h * w, c)
        grid = F.pad(tokens.view(3, h, w, c).permute(0, 3, 1, 2), (0, w % 2, 0, h % 2), mode="replicate")
        expected = attn.norm(attn.sr(grid).flatten(2).transpose(1, 2))
        assert (attn.compress(tokens, hw) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_half_precision_attention_matches_fused_kernel(monkeypatch, masked):
    """Short bf16 sequences on CPU take the matmul path; it matches torch's fused kernel."""
    import pixsigma.model.transformer as tr

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 24, 16), torch.randn(2, 3, 24, 16)
    mask = None
    if masked:
        mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
        mask[0, ..., 10:] = False
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    half = [t.bfloat16() for t in (q, k, v)]
    matmul = tr.attention(*half, mask)
    if masked:  # masked-out keys get no weight: changing them changes nothing
        v2 = v.clone()
        v2[0, :, 10:] = 100.0
        assert torch.equal(tr.attention(half[0], half[1], v2.bfloat16(), mask)[0], matmul[0])
    monkeypatch.setattr(tr, "CPU_MATMUL_ATTENTION_MAX_SCORES", 0)  # force the fused kernel
    fused = tr.attention(*half, mask)
    assert matmul.dtype == fused.dtype == torch.bfloat16
    err_matmul = (matmul.float() - exact).abs().max().item()
    err_fused = (fused.float() - exact).abs().max().item()
    assert err_matmul < 3e-2 and err_fused < 3e-2


def test_ave_pads_by_averaging_real_tokens_only():
    attn = PixArtSigmaTransformer(compressed_config("ave", ratio=2)).blocks[1].attn
    tokens = torch.arange(3 * 3, dtype=torch.float32).reshape(1, 9, 1).expand(1, 9, 64)
    out = attn.compress(tokens, (3, 3))[0, :, 0]
    # windows: {0,1,3,4}, {2,5}, {6,7}, {8}
    assert out.tolist() == [2.0, 3.5, 6.5, 8.0]


# ---------------------------------------------------------------------------------------------
# Precision, checkpointing, caption dropout, caption cache
# ---------------------------------------------------------------------------------------------


def test_bf16_weights_and_fp32_attention_stay_close():
    model = randomized(TINY)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0]), torch.randn(2, 16, 32)
    with torch.no_grad():
        ref = model(x, t, y)
        low = randomized(TINY).to(torch.bfloat16).set_runtime_options(attention_fp32=True)
        out = low(x, t, y)
    assert out.dtype == torch.bfloat16
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 3e-2


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = randomized(compressed_config()).train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0]), torch.randn(2, 16, 32)
    no_drop = torch.zeros(2, dtype=torch.bool)

    def grads(flag):
        model.zero_grad()
        model.set_runtime_options(gradient_checkpointing=flag)
        model(x, t, y, force_drop_ids=no_drop).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        assert torch.allclose(a, b, atol=1e-6)


def test_caption_dropout_uses_null_caption():
    model = randomized(TINY)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0]), torch.randn(2, 16, 32)
    null = model.y_embedder.y_embedding[None].expand(2, -1, -1)
    with torch.no_grad():
        dropped = model(x, t, y, force_drop_ids=torch.tensor([1, 0]))
        explicit = model(x, t, torch.stack([null[0], y[1]]))
    assert torch.equal(dropped, explicit)
    model.train()
    torch.manual_seed(0)
    drops = [not torch.equal(model.drop_caption(y), y) for _ in range(100)]
    assert 5 <= sum(drops) <= 40


def test_cached_caption_context_equals_uncached():
    model = randomized(compressed_config())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0]), torch.randn(2, 16, 32)
    mask = torch.ones(2, 16)
    mask[0, 7:] = 0
    with torch.no_grad():
        context = model.prepare_caption(y, mask)
        for step in (999.0, 500.0, 1.0):
            ts = torch.full((2,), step)
            assert torch.equal(model(x, ts, context), model(x, ts, y, mask))


def test_fp32_residual_stream_reduces_bf16_error():
    config = TINY.with_(depth=8, hidden_size=128, num_heads=4)
    model = randomized(config)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([5.0, 600.0]), torch.randn(2, 16, 32)
    with torch.no_grad():
        ref = model(x, t, y)
        low = randomized(config).to(torch.bfloat16)
        errors = {}
        for flag in (True, False):
            low.set_runtime_options(residual_fp32=flag)
            errors[flag] = ((low(x, t, y).float() - ref).norm() / ref.norm()).item()
    assert errors[True] < 0.8 * errors[False], errors


# ---------------------------------------------------------------------------------------------
# Runtime switches take effect
# ---------------------------------------------------------------------------------------------


def test_set_runtime_options_sets_only_what_is_given():
    model = PixArtSigmaTransformer(TINY)
    assert (model.attention_fp32, model.gradient_checkpointing, model.residual_fp32) == (False, False, True)
    assert model.set_runtime_options(attention_fp32=True) is model
    assert (model.attention_fp32, model.gradient_checkpointing, model.residual_fp32) == (True, False, True)
    model.set_runtime_options(gradient_checkpointing=True, residual_fp32=False)
    assert (model.attention_fp32, model.gradient_checkpointing, model.residual_fp32) == (True, True, False)
    model.set_runtime_options()
    assert (model.attention_fp32, model.gradient_checkpointing, model.residual_fp32) == (True, True, False)


def spy_attention_kernels(monkeypatch) -> list:
    """Record the (q, k, v) dtypes of every attention kernel call (fused and matmul paths)."""
    import pixsigma.model.transformer as tr

    seen = []
    fused, matmul = F.scaled_dot_product_attention, tr.cpu_matmul_attention

    def spy_fused(q, k, v, attn_mask=None, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return fused(q, k, v, attn_mask=attn_mask, **kwargs)

    def spy_matmul(q, k, v, mask=None):
        seen.append((q.dtype, k.dtype, v.dtype))
        return matmul(q, k, v, mask)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_fused)
    monkeypatch.setattr(tr, "cpu_matmul_attention", spy_matmul)
    return seen


def test_attention_fp32_runs_every_attention_kernel_in_float32(monkeypatch):
    seen = spy_attention_kernels(monkeypatch)
    model = randomized(compressed_config()).to(torch.bfloat16)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0]), torch.randn(2, 16, 32)
    mask = torch.ones(2, 16)
    mask[0, 5:] = 0
    for flag, kernel_dtype in ((False, torch.bfloat16), (True, torch.float32)):
        seen.clear()
        with torch.no_grad():
            out = model.set_runtime_options(attention_fp32=flag)(x, t, y, mask)
        assert out.dtype == torch.bfloat16
        # one self- and one cross-attention per block, every one in the expected dtype
        assert seen == [(kernel_dtype,) * 3] * (2 * TINY.depth), (flag, seen)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_fp32_equals_float32_kernel_on_upcast_inputs(masked):
    """attention(fp32=True) on bf16 inputs is exactly torch's float32 kernel on the upcast inputs, cast back."""
    import pixsigma.model.transformer as tr

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16).bfloat16() for n in (40, 24, 24))
    mask = None
    if masked:
        mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
        mask[1, ..., 7:] = False
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).bfloat16()
    out = tr.attention(q, k, v, mask, fp32=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    # and it is within bf16 rounding of a float64 computation
    scores = (q.double() @ k.double().transpose(-1, -2)) / 4.0
    if masked:
        scores = scores.masked_fill(~mask, float("-inf"))
    exact = scores.softmax(-1) @ v.double()
    assert (out.double() - exact).abs().max().item() < 2e-2


def test_gradient_checkpointing_recomputes_each_block_in_backward(monkeypatch):
    """With the switch on, in training with gradients, every block goes through
    torch.utils.checkpoint and its layers run twice (forward, then recomputed in backward);
    otherwise once. (Counted on the first layer of each block: the recomputation stops as soon as
    it has rebuilt what backward needs, so a hook on the block itself would not see it.)"""
    import pixsigma.model.transformer as tr

    calls = []
    real = tr.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(tr, "checkpoint", spy)
    model = randomized(compressed_config()).train()
    runs = Counter()
    for i, block in enumerate(model.blocks):
        block.attn.qkv.register_forward_hook(lambda module, inputs, output, i=i: runs.update([i]))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0]), torch.randn(2, 16, 32)
    no_drop = torch.zeros(2, dtype=torch.bool)

    def step(flag, train=True, grad=True):
        calls.clear()
        runs.clear()
        model.set_runtime_options(gradient_checkpointing=flag).train(train)
        with torch.set_grad_enabled(grad):
            out = model(x, t, y, force_drop_ids=no_drop)
            if grad:
                out.square().mean().backward()
        return list(calls), dict(runs)

    everyone_once, everyone_twice = {0: 1, 1: 1}, {0: 2, 1: 2}
    assert step(True) == (list(model.blocks), everyone_twice)
    assert step(False) == ([], everyone_once)
    assert step(True, train=False) == ([], everyone_once)  # eval: no checkpointing
    assert step(True, grad=False) == ([], everyone_once)  # no gradients: no checkpointing
