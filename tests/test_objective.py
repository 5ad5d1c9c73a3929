# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Tests for `dit_hf.objective` against an independent float64 NumPy reference written from the DDPM / iDDPM
formulas (Ho et al., 2020; Nichol & Dhariwal, 2021), not from the module under test."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_dit
from diffusers import DDIMScheduler, DDPMScheduler

from dit_hf.objective import (
    DDPMObjective,
    DiffusionLossOutput,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    loss_by_timestep_quartile,
    make_ddpm_scheduler,
    make_objective,
    normal_kl,
)

T = 1000
# Includes both ends of the chain: t = 0 takes the decoder-NLL branch, t = T - 1 the noisiest KL.
TIMESTEPS = [0, 1, 500, T - 1]


# ---------------------------------------------------------------------------------------------------------------------
# Float64 reference
# ---------------------------------------------------------------------------------------------------------------------


def ref_betas(schedule: str, num_steps: int = T) -> np.ndarray:
    if schedule == "linear":
        return np.linspace(1e-4, 0.02, num_steps, dtype=np.float64)

    # iDDPM eq. 17 with s = 0.008, betas capped at 0.999.
    def alpha_bar(s):
        return np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2

    steps = np.arange(num_steps, dtype=np.float64)
    betas = 1 - alpha_bar((steps + 1) / num_steps) / alpha_bar(steps / num_steps)
    return np.minimum(betas, 0.999)


def ref_schedule(schedule: str) -> dict[str, np.ndarray]:
    # diffusers stores betas in float32, so that rounding is part of the schedule; everything after is float64.
    # (It matters at the cosine schedule's capped β = 0.999, where 1 - β moves by 3e-5 relative.)
    betas = ref_betas(schedule).astype(np.float32).astype(np.float64)
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)  # β̃_t, DDPM eq. 7
    return {
        "betas": betas,
        "alphas_cumprod": abar,
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.concatenate([[post_var[1]], post_var[1:]])),
        "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1 - abar),
        "posterior_mean_coef2": (1 - abar_prev) * np.sqrt(alphas) / (1 - abar),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / abar - 1),
    }


def col(values: np.ndarray, t) -> np.ndarray:
    return values[np.asarray(t)][:, None, None, None]


def ref_q_posterior(ref, x0, x_t, t):
    mean = col(ref["posterior_mean_coef1"], t) * x0 + col(ref["posterior_mean_coef2"], t) * x_t
    return mean, col(ref["posterior_variance"], t), col(ref["posterior_log_variance_clipped"], t)


def ref_p_mean_variance(ref, out, x_t, t, learn_sigma=True):
    c = x_t.shape[1]
    eps = out[:, :c]
    if learn_sigma:
        frac = (out[:, c:] + 1) / 2  # iDDPM eq. 15
        log_var = frac * col(np.log(ref["betas"]), t) + (1 - frac) * col(ref["posterior_log_variance_clipped"], t)
    else:
        # "fixed_small" as in improved-diffusion: σ² = β̃_t (0 at t = 0) but log σ² clipped to log β̃_1 there.
        log_var = col(ref["posterior_log_variance_clipped"], t) + 0 * x_t
        var = col(ref["posterior_variance"], t) + 0 * x_t
    pred_x0 = (x_t - col(np.sqrt(1 - ref["alphas_cumprod"]), t) * eps) / col(np.sqrt(ref["alphas_cumprod"]), t)
    mean, _, _ = ref_q_posterior(ref, pred_x0, x_t, t)
    return mean, (np.exp(log_var) if learn_sigma else var), log_var, pred_x0


def ref_normal_kl(m1, lv1, m2, lv2):
    # KL(N(m1, v1) || N(m2, v2)) = ½ [log(v2 / v1) + (v1 + (m1 - m2)²) / v2 - 1]
    v1, v2 = np.exp(lv1), np.exp(lv2)
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)


def ref_cdf(z):
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def ref_discretized_log_likelihood(x, mean, log_scale):
    std = np.exp(log_scale)
    upper = ref_cdf((x + 1 / 255 - mean) / std)
    lower = ref_cdf((x - 1 / 255 - mean) / std)
    # The outermost bins of [-1, 1] extend to ±∞.
    prob = np.where(x < -0.999, upper, np.where(x > 0.999, 1 - lower, upper - lower))
    return np.log(np.maximum(prob, 1e-12))


def ref_hybrid_loss(ref, x0, x_t, eps, out, t):
    """Per-sample (mse, vb in bits/dim) of iDDPM's L_hybrid as DiT uses it."""
    c = x0.shape[1]
    mse = ((out[:, :c] - eps) ** 2).mean(axis=(1, 2, 3))
    mean_q, _, log_var_q = ref_q_posterior(ref, x0, x_t, t)
    mean_p, _, log_var_p, _ = ref_p_mean_variance(ref, out, x_t, t)
    kl = ref_normal_kl(mean_q, log_var_q, mean_p, log_var_p).mean(axis=(1, 2, 3)) / np.log(2)
    nll = -ref_discretized_log_likelihood(x0, mean_p, 0.5 * log_var_p).mean(axis=(1, 2, 3)) / np.log(2)
    return mse, np.where(np.asarray(t) == 0, nll, kl)


def f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------------


class RecordingModel:
    """Calls a model and keeps the exact x_t it was given and the output it returned."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x_t, t, class_labels):
        out = self.model(x_t, t, class_labels)
        self.x_t, self.output = x_t.detach().clone(), out.sample.detach().clone()
        return out


def quantised_images(n: int = 4, seed: int = 0) -> torch.Tensor:
    """8-bit levels scaled to [-1, 1], with the extreme levels ±1 present in every image."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, (n, 3, 8, 8), generator=generator).float() / 127.5 - 1
    x0[:, 0, 0, 0], x0[:, 0, 0, 1] = -1.0, 1.0
    return x0


# ---------------------------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_scheduler_matches_reference(schedule):
    scheduler = make_ddpm_scheduler(T, schedule, learn_sigma=True)
    ref = ref_schedule(schedule)
    # torch.linspace in float32 may land one ulp from the rounded float64 linspace.
    np.testing.assert_allclose(f64(scheduler.betas), ref["betas"], rtol=2e-7)
    # The scheduler's own float32 cumulative product drifts slowly from the float64 one.
    np.testing.assert_allclose(f64(scheduler.alphas_cumprod), ref["alphas_cumprod"], rtol=2e-6)
    # Against the unrounded betas only the cosine schedule's last step (capped β) moves, by 1.3e-5.
    np.testing.assert_allclose(f64(scheduler.alphas_cumprod), np.cumprod(1 - ref_betas(schedule)), rtol=2e-5)
    assert scheduler.config.clip_sample is False
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.variance_type == "learned_range"
    assert make_ddpm_scheduler(T, schedule, learn_sigma=False).config.variance_type == "fixed_small"


def test_linear_schedule_scales_with_num_timesteps():
    # DiT / iDDPM keep the linear schedule's noise range when T changes: endpoints are scaled by 1000 / T.
    betas = make_ddpm_scheduler(250).betas
    np.testing.assert_allclose([betas[0].item(), betas[-1].item()], [4e-4, 0.08], rtol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_objective_buffers_match_reference(schedule):
    objective = DDPMObjective(make_ddpm_scheduler(T, schedule))
    ref = ref_schedule(schedule)
    for name in [
        "alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
    ]:
        buffer = getattr(objective, name)
        assert buffer.dtype == torch.float64, name
        np.testing.assert_allclose(buffer.numpy(), ref[name], rtol=1e-6, err_msg=name)
    # β̃_0 = 0 exactly; its log is clipped to log β̃_1.
    assert objective.posterior_variance[0].item() == 0.0
    assert objective.posterior_log_variance_clipped[0] == objective.posterior_log_variance_clipped[1]


# ---------------------------------------------------------------------------------------------------------------------
# Math helpers
# ---------------------------------------------------------------------------------------------------------------------


def test_normal_kl():
    generator = torch.Generator().manual_seed(0)
    m1, lv1, m2, lv2 = torch.randn(4, 50, generator=generator, dtype=torch.float64)
    np.testing.assert_allclose(f64(normal_kl(m1, lv1, m2, lv2)), ref_normal_kl(*map(f64, (m1, lv1, m2, lv2))))
    # Closed forms: KL(N(1, 1) || N(0, 1)) = ½, KL(N(0, e) || N(0, 1)) = ½ (e - 1 - 1).
    zero = torch.zeros(1, dtype=torch.float64)
    assert normal_kl(zero + 1, 0.0, zero, 0.0).item() == pytest.approx(0.5)
    assert normal_kl(zero, 1.0, zero, 0.0).item() == pytest.approx(0.5 * (math.e - 2))
    assert normal_kl(m1, lv1, m1, lv1).abs().max().item() < 1e-12


def test_approx_standard_normal_cdf():
    z = torch.linspace(-6, 6, 241, dtype=torch.float64)
    np.testing.assert_allclose(f64(approx_standard_normal_cdf(z)), ref_cdf(f64(z)), rtol=1e-12, atol=1e-15)
    exact = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    # The tanh approximation is within 2e-4 of Φ everywhere.
    assert (approx_standard_normal_cdf(z) - exact).abs().max().item() < 2e-4


def test_discretized_gaussian_log_likelihood():
    generator = torch.Generator().manual_seed(0)
    x = quantised_images(2).double()
    means = x + 0.02 * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    log_scales = -4 + torch.rand(x.shape, generator=generator, dtype=torch.float64)
    out = discretized_gaussian_log_likelihood(x, means, log_scales)
    np.testing.assert_allclose(f64(out), ref_discretized_log_likelihood(f64(x), f64(means), f64(log_scales)))
    assert (out <= 0).all()

    # The 256 bins, edge bins open to ±∞, partition the real line: their probabilities sum to 1.
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in [(0.3, -3.0), (-0.99, -5.0), (0.999, -1.0)]:
        log_probs = discretized_gaussian_log_likelihood(levels, torch.tensor(mean), torch.tensor(log_scale))
        assert log_probs.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# Posterior and reverse step
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_q_posterior_mean_variance(schedule):
    objective = DDPMObjective(make_ddpm_scheduler(T, schedule))
    ref = ref_schedule(schedule)
    generator = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(2, 4, 3, 8, 8, generator=generator)
    t = torch.tensor(TIMESTEPS)

    mean, variance, log_variance = objective.q_posterior_mean_variance(x0, x_t, t)
    ref_mean, ref_var, ref_log_var = ref_q_posterior(ref, f64(x0), f64(x_t), TIMESTEPS)
    assert mean.dtype == torch.float32 and variance.shape == x_t.shape
    np.testing.assert_allclose(f64(mean), ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f64(variance), np.broadcast_to(ref_var, x_t.shape), rtol=1e-5)
    np.testing.assert_allclose(f64(log_variance), np.broadcast_to(ref_log_var, x_t.shape), rtol=1e-5)
    # At t = 0 the posterior is a point mass at x_0.
    torch.testing.assert_close(mean[0], x0[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_p_mean_variance(learn_sigma):
    objective = DDPMObjective(make_ddpm_scheduler(T, learn_sigma=learn_sigma), learn_sigma=learn_sigma)
    ref = ref_schedule("linear")
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 3, 8, 8, generator=generator)
    out = torch.randn(4, 6 if learn_sigma else 3, 8, 8, generator=generator)
    if learn_sigma:
        out[:, 3:] = torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1  # v in [-1, 1]
    t = torch.tensor(TIMESTEPS)

    mean, variance, log_variance, pred_x0 = objective.p_mean_variance(out, x_t, t)
    ref_mean, ref_var, ref_log_var, ref_pred_x0 = ref_p_mean_variance(ref, f64(out), f64(x_t), TIMESTEPS, learn_sigma)
    # At t = T - 1, x̂_0 ≈ 158 (x_t - ε̂) cancels in float32, hence the absolute tolerance.
    np.testing.assert_allclose(f64(pred_x0), ref_pred_x0, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(f64(mean), ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(log_variance), ref_log_var, rtol=1e-5)
    np.testing.assert_allclose(f64(variance), ref_var, rtol=1e-5)
    if learn_sigma:
        # v = ±1 are the ends of the learned range: σ² = β_t and σ² = β̃_t (clipped at t = 0).
        ends = torch.cat([out[:, :3], torch.full_like(x_t, 1.0)], dim=1)
        _, var_hi, _, _ = objective.p_mean_variance(ends, x_t, t)
        np.testing.assert_allclose(f64(var_hi[:, 0, 0, 0]), ref["betas"][TIMESTEPS], rtol=1e-5)
        ends[:, 3:] = -1.0
        _, var_lo, _, _ = objective.p_mean_variance(ends, x_t, t)
        expected = np.exp(ref["posterior_log_variance_clipped"][TIMESTEPS])
        np.testing.assert_allclose(f64(var_lo[:, 0, 0, 0]), expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Full loss
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_hybrid_loss_matches_reference(schedule):
    objective = DDPMObjective(make_ddpm_scheduler(T, schedule))
    ref = ref_schedule(schedule)
    model = RecordingModel(tiny_dit())
    x0 = quantised_images()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(TIMESTEPS)

    output = objective(model, x0, class_labels=torch.tensor([0, 1, 2, 10]), timesteps=t, noise=noise)

    assert isinstance(output, DiffusionLossOutput)
    assert output.timesteps.dtype == torch.long and output.timesteps.tolist() == TIMESTEPS
    # x_t is the forward process q(x_t | x_0) (DDPM eq. 4), here through the scheduler's float32 ᾱ_t.
    abar = col(ref["alphas_cumprod"], TIMESTEPS)
    np.testing.assert_allclose(f64(model.x_t), np.sqrt(abar) * f64(x0) + np.sqrt(1 - abar) * f64(noise), atol=1e-5)

    # The reference sees the same x_t and model output, so only the loss math is compared.
    ref_mse, ref_vb = ref_hybrid_loss(ref, f64(x0), f64(model.x_t), f64(noise), f64(model.output), TIMESTEPS)
    np.testing.assert_allclose(f64(output.mse), ref_mse, rtol=1e-5)
    np.testing.assert_allclose(f64(output.vlb), ref_vb, rtol=1e-5)
    np.testing.assert_allclose(f64(output.loss_per_sample), ref_mse + ref_vb, rtol=1e-5)
    assert output.loss.item() == pytest.approx((ref_mse + ref_vb).mean(), rel=1e-5)
    # Non-trivial values, so the comparison above exercises both VLB branches.
    assert (ref_vb > 1e-3).all()


def test_vlb_weight():
    x0 = quantised_images()
    t = torch.tensor(TIMESTEPS)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    model = tiny_dit()
    full = DDPMObjective(make_ddpm_scheduler())(model, x0, labels, timesteps=t, noise=noise)
    weighted = DDPMObjective(make_ddpm_scheduler(), vlb_weight=0.25)(model, x0, labels, timesteps=t, noise=noise)
    torch.testing.assert_close(weighted.loss_per_sample, full.mse + 0.25 * full.vlb)


def test_epsilon_only_loss_is_plain_mse():
    objective = DDPMObjective(make_ddpm_scheduler(learn_sigma=False), learn_sigma=False)
    model = RecordingModel(tiny_dit(learn_sigma=False))
    x0 = quantised_images()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))

    output = objective(model, x0, torch.tensor([0, 1, 2, 3]), timesteps=torch.tensor(TIMESTEPS), noise=noise)

    expected = ((model.output - noise) ** 2).mean(dim=(1, 2, 3))
    assert output.vlb is None
    torch.testing.assert_close(output.mse, expected)
    torch.testing.assert_close(output.loss_per_sample, expected)
    torch.testing.assert_close(output.loss, expected.mean())
    assert output.loss.item() > 0.1


def test_loss_is_float32_for_bfloat16_model_output():
    objective = DDPMObjective(make_ddpm_scheduler(learn_sigma=False), learn_sigma=False)
    x0 = quantised_images()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    prediction = (noise + 0.1).to(torch.bfloat16)

    output = objective(lambda x_t, t, y: prediction, x0, timesteps=torch.tensor(TIMESTEPS), noise=noise)

    assert output.loss.dtype == torch.float32
    expected = ((prediction.float() - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(output.mse, expected)


def test_vlb_trains_only_the_variance():
    objective = DDPMObjective(make_ddpm_scheduler())
    x0 = quantised_images()
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(4, 6, 8, 8, generator=generator).requires_grad_()

    def run():
        return objective(lambda x_t, t, y: prediction, x0, timesteps=torch.tensor(TIMESTEPS), generator=generator)

    (grad_vb,) = torch.autograd.grad(run().vlb.sum(), prediction)
    assert grad_vb[:, :3].abs().max().item() == 0.0
    assert (grad_vb[:, 3:] != 0).all()

    # And the MSE trains only ε̂.
    (grad_mse,) = torch.autograd.grad(run().mse.sum(), prediction)
    assert grad_mse[:, 3:].abs().max().item() == 0.0
    assert grad_mse[:, :3].abs().max().item() > 0.0


def test_model_output_channels_are_checked():
    objective = DDPMObjective(make_ddpm_scheduler())
    x0 = quantised_images()
    with pytest.raises(ValueError, match="learn_sigma"):
        objective(lambda x_t, t, y: torch.zeros_like(x_t), x0)


# ---------------------------------------------------------------------------------------------------------------------
# v-prediction
# ---------------------------------------------------------------------------------------------------------------------


def ref_v(ref, x0, eps, t):
    """v = √ᾱ_t ε - √(1 - ᾱ_t) x_0 (Salimans & Ho, 2022), in float64."""
    abar = col(ref["alphas_cumprod"], t)
    return np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_v_target_matches_float64(schedule):
    objective = DDPMObjective(make_ddpm_scheduler(T, schedule, False, "v_prediction"), learn_sigma=False)
    assert objective.name == "ddpm_v"
    ref = ref_schedule(schedule)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 8, 8, generator=generator)
    target = objective.training_target(x0, noise, torch.tensor(TIMESTEPS))
    assert target.dtype == torch.float32
    np.testing.assert_allclose(f64(target), ref_v(ref, f64(x0), f64(noise), TIMESTEPS), rtol=1e-6, atol=1e-6)
    # At t = 0 v is almost ε (√(1 - ᾱ_0) = 0.01); at t = T - 1 almost -x_0.
    assert (target[0] - noise[0]).abs().max() < 0.05 and (target[3] + x0[3]).abs().max() < 0.05

    model = RecordingModel(tiny_dit(learn_sigma=False))
    out = objective(model, x0, torch.tensor([0, 1, 2, 3]), timesteps=torch.tensor(TIMESTEPS), noise=noise)
    expected = ((f64(model.output) - ref_v(ref, f64(x0), f64(noise), TIMESTEPS)) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(f64(out.mse), expected, rtol=1e-5)
    assert out.vlb is None and torch.equal(out.loss_per_sample, out.mse)


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_v_hybrid_loss_matches_reference(schedule):
    # With a learned variance the VLB needs x̂_0 from v̂. The reference converts v̂ to ε̂ = √(1 - ᾱ_t) x_t + √ᾱ_t v̂
    # in float64 and reuses the ε-prediction reference, so the two paths to x̂_0 are independent.
    objective = DDPMObjective(make_ddpm_scheduler(T, schedule, True, "v_prediction"))
    ref = ref_schedule(schedule)
    model = RecordingModel(tiny_dit())
    x0 = quantised_images()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))

    out = objective(model, x0, torch.tensor([0, 1, 2, 10]), timesteps=torch.tensor(TIMESTEPS), noise=noise)

    x_t, v_hat, r = f64(model.x_t), f64(model.output[:, :3]), f64(model.output[:, 3:])
    abar = col(ref["alphas_cumprod"], TIMESTEPS)
    eps_hat = np.sqrt(1 - abar) * x_t + np.sqrt(abar) * v_hat
    _, ref_vb = ref_hybrid_loss(ref, f64(x0), x_t, f64(noise), np.concatenate([eps_hat, r], axis=1), TIMESTEPS)
    ref_mse = ((v_hat - ref_v(ref, f64(x0), f64(noise), TIMESTEPS)) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(f64(out.mse), ref_mse, rtol=1e-5)
    # At t = T - 1 a bounded x̂_0 makes the KL tiny (3e-7 bits), where float32 leaves an absolute error of 3e-8.
    np.testing.assert_allclose(f64(out.vlb), ref_vb, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f64(out.loss_per_sample), ref_mse + ref_vb, rtol=1e-5)
    assert (ref_vb[:3] > 1e-4).all()

    _, _, _, pred_x0 = objective.p_mean_variance(model.output, model.x_t, torch.tensor(TIMESTEPS))
    np.testing.assert_allclose(f64(pred_x0), np.sqrt(abar) * x_t - np.sqrt(1 - abar) * v_hat, rtol=1e-5, atol=1e-5)


def test_v_vlb_trains_only_the_variance():
    objective = DDPMObjective(make_ddpm_scheduler(prediction_type="v_prediction"))
    prediction = torch.randn(4, 6, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    out = objective(lambda x_t, t, y: prediction, quantised_images(), timesteps=torch.tensor(TIMESTEPS))
    (grad_vb,) = torch.autograd.grad(out.vlb.sum(), prediction)
    assert grad_vb[:, :3].abs().max().item() == 0.0 and grad_vb[:, 3:].abs().sum().item() > 0.0


def test_v_prediction_allows_zero_terminal_snr():
    # ε-prediction is refused at ᾱ_T = 0 (see test_rejects_zero_terminal_snr); v = -x_0 there, which is learnable.
    objective = DDPMObjective(
        DDPMScheduler(variance_type="learned_range", rescale_betas_zero_snr=True, prediction_type="v_prediction")
    )
    x0 = quantised_images()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((4,), T - 1)
    torch.testing.assert_close(objective.training_target(x0, noise, t), -x0, atol=0, rtol=0)
    out = objective(lambda x_t, t, y: torch.zeros(4, 6, 8, 8), x0, timesteps=t, noise=noise)
    torch.testing.assert_close(out.mse, (x0**2).mean(dim=(1, 2, 3)))
    assert torch.isfinite(out.vlb).all()


def test_make_objective_builds_each_ddpm_objective():
    eps = make_objective()
    assert isinstance(eps, DDPMObjective) and eps.name == "ddpm_eps" and eps.learn_sigma
    assert dict(eps.scheduler.config) == dict(make_ddpm_scheduler().config)
    v = make_objective("ddpm_v", learn_sigma=False, num_train_timesteps=250, beta_schedule="squaredcos_cap_v2")
    assert v.name == "ddpm_v" and not v.learn_sigma and v.num_train_timesteps == 250
    assert v.scheduler.config.prediction_type == "v_prediction" and v.scheduler.config.variance_type == "fixed_small"
    assert make_objective(vlb_weight=0.5).vlb_weight == 0.5
    with pytest.raises(ValueError, match=r"Unknown objective 'eps'.*'ddpm_eps', 'ddpm_v', 'flow'"):
        make_objective("eps")


def test_default_objective_reproduces_earlier_results():
    # make_objective() must draw and compute exactly what DDPMObjective(make_ddpm_scheduler()) always did:
    # timesteps by torch.randint on the generator, then the noise.
    model, x0, labels = tiny_dit(), quantised_images(), torch.tensor([0, 1, 2, 3])
    new = make_objective()(model, x0, labels, generator=torch.Generator().manual_seed(7))
    old = DDPMObjective(make_ddpm_scheduler())(model, x0, labels, generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    expected_t = torch.randint(0, T, (4,), generator=generator)
    assert torch.equal(new.timesteps, expected_t)
    assert torch.equal(new.loss_per_sample, old.loss_per_sample) and torch.equal(new.vlb, old.vlb)
    noise = torch.randn(x0.shape, generator=generator)
    explicit = make_objective()(model, x0, labels, timesteps=expected_t, noise=noise)
    assert torch.equal(explicit.loss_per_sample, new.loss_per_sample)


# ---------------------------------------------------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------------------------------------------------


def test_same_generator_seed_gives_same_loss():
    objective = DDPMObjective(make_ddpm_scheduler())
    model = tiny_dit()
    x0, labels = quantised_images(), torch.tensor([0, 1, 2, 3])

    first = objective(model, x0, labels, generator=torch.Generator().manual_seed(42))
    second = objective(model, x0, labels, generator=torch.Generator().manual_seed(42))
    other = objective(model, x0, labels, generator=torch.Generator().manual_seed(43))

    assert torch.equal(first.timesteps, second.timesteps)
    assert torch.equal(first.loss_per_sample, second.loss_per_sample)
    assert not torch.equal(first.timesteps, other.timesteps)
    # Timesteps are drawn before the noise, from the same generator.
    expected_t = objective.sample_timesteps(4, "cpu", generator=torch.Generator().manual_seed(42))
    assert torch.equal(first.timesteps, expected_t)


def test_sample_timesteps():
    objective = DDPMObjective(make_ddpm_scheduler())
    t = objective.sample_timesteps(4000, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (4000,)
    assert t.min().item() >= 0 and t.max().item() <= T - 1
    # Uniform: each quarter of [0, T) gets about a quarter of the draws.
    counts = torch.bincount(t * 4 // T, minlength=4)
    assert ((counts - 1000).abs() < 100).all(), counts

    per_sample = [torch.Generator().manual_seed(s) for s in range(3)]
    t_list = objective.sample_timesteps(3, "cpu", generator=per_sample)
    singles = [objective.sample_timesteps(1, "cpu", torch.Generator().manual_seed(s)).item() for s in range(3)]
    assert t_list.tolist() == singles


def test_loss_by_timestep_quartile():
    t = torch.tensor([0, 249, 250, 999, 500, 749, 750])
    losses = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
    stats = loss_by_timestep_quartile(t, losses, T)
    assert stats.dtype == torch.float64
    assert stats.tolist() == [[3.0, 4.0, 48.0, 72.0], [2.0, 1.0, 2.0, 2.0]]
    # Empty buckets report (0, 0), and a bucket boundary that is not an integer (T = 10: 2.5, 5, 7.5).
    stats = loss_by_timestep_quartile(torch.tensor([2, 3]), torch.tensor([1.0, 1.0]), 10)
    assert stats.tolist() == [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_beta_schedule():
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        make_ddpm_scheduler(beta_schedule="cosine")


def test_rejects_non_ddpm_scheduler():
    with pytest.raises(ValueError, match="make_ddpm_scheduler"):
        DDPMObjective(DDIMScheduler())


def test_rejects_sample_prediction():
    # ε and v are trained; x_0-prediction ("sample") is not.
    scheduler = DDPMScheduler(prediction_type="sample", variance_type="learned_range")
    with pytest.raises(ValueError, match="prediction_type='epsilon'` or `prediction_type='v_prediction'"):
        DDPMObjective(scheduler)


def test_rejects_variance_type_mismatch():
    with pytest.raises(ValueError, match=r"make_ddpm_scheduler\(learn_sigma=True\)"):
        DDPMObjective(make_ddpm_scheduler(learn_sigma=False), learn_sigma=True)


def test_rejects_zero_terminal_snr():
    scheduler = DDPMScheduler(variance_type="learned_range", rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=False"):
        DDPMObjective(scheduler)


def test_rejects_out_of_range_timesteps():
    objective = DDPMObjective(make_ddpm_scheduler())
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        objective(lambda x_t, t, y: torch.zeros(4, 6, 8, 8), quantised_images(), timesteps=torch.tensor([0, 1, 2, T]))
