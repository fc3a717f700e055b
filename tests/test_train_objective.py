"""The IDDPM hybrid loss against a float64 numpy computation written from the formulas."""

import math

import numpy as np
import torch

from pixsigma.diffusion.gaussian import GaussianDiffusion


def _phi(x):  # IDDPM's tanh approximation of the standard normal CDF
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def reference_loss(x0, eps_true, out, t, snr_gamma=None, x0_cap=None):
    T = 1000
    betas = np.linspace(1e-4, 0.02, T)
    abar = np.cumprod(1 - betas)
    if x0_cap is not None:  # clamp(1/SNR, 1, cap), normalized to mean 1 over the T timesteps
        inv_snr = (1 - abar) / abar
        norm = sum(min(max(v, 1.0), x0_cap) for v in inv_snr) / T
    losses = []
    for i in range(x0.shape[0]):
        ti = int(t[i])
        a_t, b_t = abar[ti], betas[ti]
        a_prev = abar[ti - 1] if ti > 0 else 1.0
        xt = math.sqrt(a_t) * x0[i] + math.sqrt(1 - a_t) * eps_true[i]
        c = x0.shape[1]
        eps, v = out[i, :c], out[i, c:]
        mse = np.mean((eps_true[i] - eps) ** 2)
        if snr_gamma is not None:
            snr = a_t / (1 - a_t)
            mse *= min(snr, snr_gamma) / snr
        if x0_cap is not None:
            mse *= min(max((1 - a_t) / a_t, 1.0), x0_cap) / norm
        def post_var(k):
            ap = abar[k - 1] if k > 0 else 1.0
            return betas[k] * (1 - ap) / (1 - abar[k])
        log_post = math.log(post_var(ti) if ti > 0 else post_var(1))
        frac = (v + 1) / 2
        logvar = frac * math.log(b_t) + (1 - frac) * log_post
        x0_hat = xt / math.sqrt(a_t) - math.sqrt(1 / a_t - 1) * eps
        c1 = b_t * math.sqrt(a_prev) / (1 - a_t)
        c2 = (1 - a_prev) * math.sqrt(1 - b_t) / (1 - a_t)
        mean_p = c1 * x0_hat + c2 * xt
        mean_q = c1 * x0[i] + c2 * xt
        if ti == 0:
            x = x0[i]
            inv = np.exp(-0.5 * logvar)
            cp = _phi(inv * (x - mean_p + 1 / 255))
            cm = _phi(inv * (x - mean_p - 1 / 255))
            lp = np.where(x < -0.999, np.log(np.maximum(cp, 1e-12)),
                          np.where(x > 0.999, np.log(np.maximum(1 - cm, 1e-12)), np.log(np.maximum(cp - cm, 1e-12))))
            vb = -np.mean(lp) / math.log(2)
        else:
            kl = 0.5 * (-1 + logvar - log_post + np.exp(log_post - logvar) + (mean_q - mean_p) ** 2 * np.exp(-logvar))
            vb = np.mean(kl) / math.log(2)
        losses.append(mse + vb)
    return np.array(losses)


def test_hybrid_loss_matches_formulas():
    rng = np.random.default_rng(0)
    b, c, h, w = 6, 4, 4, 4
    x0 = rng.uniform(-1.2, 1.2, (b, c, h, w))
    eps = rng.standard_normal((b, c, h, w))
    out = np.concatenate([rng.standard_normal((b, c, h, w)), rng.uniform(-1, 1, (b, c, h, w))], axis=1)
    t = np.array([0, 1, 7, 250, 600, 999])
    for gamma, cap in ((None, None), (5.0, None), (None, 10.0)):
        d = GaussianDiffusion(snr_gamma=gamma, x0_weight_cap=cap)
        x0_t, eps_t, out_t, t_t = (torch.tensor(a, dtype=torch.float32) for a in (x0, eps, out, t))
        t_t = t_t.long()
        xt = d.q_sample(x0_t, t_t, eps_t)
        terms = d.loss_terms(out_t, x0_t, xt, t_t, eps_t)
        ref = reference_loss(x0, eps, out, t, gamma, cap)
        np.testing.assert_allclose(terms.loss.double().numpy(), ref, rtol=2e-4, atol=2e-5)


def test_vb_trains_only_variance():
    d = GaussianDiffusion()
    x0 = torch.randn(2, 4, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([3, 500])
    out = torch.randn(2, 8, 4, 4, requires_grad=True)
    terms = d.loss_terms(out, x0, d.q_sample(x0, t, noise), t, noise)
    (g,) = torch.autograd.grad(terms.vb.sum(), out)
    assert g[:, :4].abs().max() == 0 and g[:, 4:].abs().max() > 0


def test_x0_weight_cap_emphasizes_noisy_steps_and_rejects_bad_settings():
    import pytest

    from pixsigma.errors import PixsigmaError

    d = GaussianDiffusion(x0_weight_cap=10.0)
    w = d.snr_weight(torch.arange(1000))
    assert abs(w.double().mean().item() - 1.0) < 1e-5
    assert w[900] / w[50] == pytest.approx(10.0, rel=1e-5)  # the cap over the floor of 1
    assert torch.all(w[1:] >= w[:-1])  # never less weight for a noisier step
    with pytest.raises(PixsigmaError, match="x0_weight_cap must be >= 1"):
        GaussianDiffusion(x0_weight_cap=0.5)
    with pytest.raises(PixsigmaError, match="set one of them"):
        GaussianDiffusion(snr_gamma=5.0, x0_weight_cap=10.0)


def test_v_prediction_loss_targets_v_and_keeps_the_vb_of_the_implied_eps():
    """A v-prediction output is scored against v = sqrt(ᾱ)ε − sqrt(1−ᾱ)x0 (float64 reference), and its VB
    term equals the ε model's VB for the ε that v implies (so the variance head trains the same)."""
    import pytest

    from pixsigma.errors import PixsigmaError

    rng = np.random.default_rng(1)
    b, c = 5, 4
    x0 = rng.uniform(-1.2, 1.2, (b, c, 4, 4))
    eps_true = rng.standard_normal(x0.shape)
    eps_hat = rng.standard_normal(x0.shape)
    var_half = rng.uniform(-1, 1, x0.shape)
    t = np.array([0, 5, 300, 800, 999])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t][:, None, None, None]
    a, s = np.sqrt(abar), np.sqrt(1 - abar)
    xt = a * x0 + s * eps_true
    v_hat = (eps_hat - s * xt) / a  # the v output whose implied ε is eps_hat
    v_true = a * eps_true - s * x0
    ref = reference_loss(x0, eps_true, np.concatenate([eps_hat, var_half], 1), t)
    ref_mse = np.mean((eps_true - eps_hat) ** 2, axis=(1, 2, 3))

    d_v = GaussianDiffusion(prediction_type="v_prediction")
    tt = lambda a_: torch.tensor(a_, dtype=torch.float32)  # noqa: E731
    terms = d_v.loss_terms(tt(np.concatenate([v_hat, var_half], 1)), tt(x0), tt(xt), torch.tensor(t), tt(eps_true))
    np.testing.assert_allclose(terms.mse.double().numpy(), np.mean((v_true - v_hat) ** 2, axis=(1, 2, 3)), rtol=1e-4)
    # VB: the ε model's total minus its MSE (t = 999's v → ε factor is large: loose atol)
    np.testing.assert_allclose(terms.vb.double().numpy(), ref - ref_mse, rtol=2e-3, atol=2e-4)
    with pytest.raises(PixsigmaError, match="prediction_type 'sample' is not supported"):
        GaussianDiffusion(prediction_type="sample")


def test_logit_normal_timesteps_follow_their_cdf_and_uniform_is_unchanged():
    import pytest

    from pixsigma.errors import PixsigmaError

    n, T = 200_000, 1000
    d = GaussianDiffusion(timestep_sampling="logit_normal", logit_mean=-0.3, logit_std=0.8)
    t = d.sample_timesteps(n, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= T - 1
    for k in (100, 300, 500, 700, 900):  # P(t < k) = Φ((logit(k / T) − m) / s)
        z = (math.log(k / (T - k)) + 0.3) / 0.8
        cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))
        assert abs(float((t < k).double().mean()) - cdf) < 0.005, k
    # uniform stays torch.randint on the same generator (earlier runs resume bit-identically)
    u = GaussianDiffusion().sample_timesteps(64, torch.Generator().manual_seed(3))
    assert torch.equal(u, torch.randint(0, T, (64,), generator=torch.Generator().manual_seed(3)))
    with pytest.raises(PixsigmaError, match="timestep_sampling 'lognormal' is not supported"):
        GaussianDiffusion(timestep_sampling="lognormal")
    with pytest.raises(PixsigmaError, match="logit_std must be positive"):
        GaussianDiffusion(timestep_sampling="logit_normal", logit_std=0.0)


def test_object_weighted_mse_pays_more_where_the_mask_is_and_keeps_its_scale():
    from pixsigma.train.loop import object_weights

    d = GaussianDiffusion(learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([300, 700])
    xt = d.q_sample(x0, t, noise)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:4, 2:4] = 1.0  # a 2×2-cell object
    weight = object_weights(mask, 5.0, margin=1)  # grown to 4×4 cells: weight 5 there, 1 on the other 48
    assert weight.shape == (2, 1, 8, 8) and weight.sum().item() == 2 * (16 * 5 + 48)
    assert object_weights(mask, 1.0, 1) is None and object_weights(None, 5.0, 1) is None
    assert torch.equal(object_weights(mask, 3.0, margin=0), 1 + 2 * mask)

    def mse(err_in_object: float, err_outside: float, w):
        pred = noise.clone()  # ε̂ = ε + error: the squared error is err² where it is put
        inside = weight.expand_as(noise) > 1
        pred[inside] += err_in_object
        pred[~inside] += err_outside
        out = torch.cat([pred, torch.zeros_like(pred)], 1)
        return d.loss_terms(out, x0, xt, t, noise, w).mse

    plain = mse(1.0, 1.0, None)
    torch.testing.assert_close(mse(1.0, 1.0, weight), plain)  # a uniform error costs what it did
    torch.testing.assert_close(mse(1.0, 1.0, torch.ones(2, 1, 8, 8)), plain)
    # an error only inside the weighted 16 cells: 16/64 of the plain loss, times 5 / mean weight (128/64)
    torch.testing.assert_close(mse(1.0, 0.0, weight), plain * (16 / 64) * 5 / 2)
    torch.testing.assert_close(mse(0.0, 1.0, weight), plain * (48 / 64) * 1 / 2)
