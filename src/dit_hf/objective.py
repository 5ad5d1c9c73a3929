# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""The DiT training objective: ε-prediction MSE plus, with a learned variance, the improved-DDPM VLB term.

References:
    Ho et al., 2020, "Denoising Diffusion Probabilistic Models" (DDPM), eqs. (4)-(7) and (12).
    Nichol & Dhariwal, 2021, "Improved Denoising Diffusion Probabilistic Models" (iDDPM), eqs. (9)-(16).
    Peebles & Xie, 2023, "Scalable Diffusion Models with Transformers" (DiT), Sec. 3.1.

The noise schedule comes from a diffusers [`DDPMScheduler`], so the scheduler that trains the model is the one that
is saved with the pipeline and samples from it.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")


def make_ddpm_scheduler(
    num_train_timesteps: int = 1000, beta_schedule: str = "linear", learn_sigma: bool = True
) -> DDPMScheduler:
    """
    Build the [`DDPMScheduler`] DiT trains with.

    Args:
        num_train_timesteps (`int`, defaults to 1000): Number of diffusion steps T.
        beta_schedule (`str`, defaults to `"linear"`): `"linear"` (DDPM, betas from 1e-4 to 0.02 at T = 1000) or
            `"squaredcos_cap_v2"` (iDDPM cosine schedule, eq. 17).
        learn_sigma (`bool`, defaults to `True`): Whether the model also predicts the variance interpolation;
            selects `variance_type="learned_range"`, else `"fixed_small"`.
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"Unknown `beta_schedule` {beta_schedule!r}; choose one of {list(BETA_SCHEDULES)}.")
    if num_train_timesteps < 2:
        raise ValueError(f"`num_train_timesteps` must be >= 2, got {num_train_timesteps}.")
    # As in DiT / iDDPM's `get_named_beta_schedule`, the linear endpoints scale with 1000 / T so that a shorter or
    # longer chain spans the same range of noise levels; at T = 1000 they are exactly 1e-4 and 0.02.
    scale = 1000 / num_train_timesteps
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=0.0001 * scale,
        beta_end=0.02 * scale,
        beta_schedule=beta_schedule,
        variance_type="learned_range" if learn_sigma else "fixed_small",
        clip_sample=False,
        prediction_type="epsilon",
    )


@dataclass
class DiffusionLossOutput(BaseOutput):
    """
    Output of [`DDPMObjective`].

    Args:
        loss (`torch.Tensor`, scalar): `loss_per_sample` averaged over the batch; call `backward()` on this.
        loss_per_sample (`torch.Tensor` of shape `(N,)`): `mse + vlb_weight * vlb` (or `mse` alone).
        timesteps (`torch.LongTensor` of shape `(N,)`): The timesteps the batch was noised to.
        mse (`torch.Tensor` of shape `(N,)`): Mean squared error of the predicted noise (DDPM eq. 14, "L_simple").
        vlb (`torch.Tensor` of shape `(N,)`, *optional*): The sampled step's VLB term in bits per dimension, with
            the mean stopped from receiving its gradient; `None` when the variance is not learned.
    """

    loss: torch.Tensor
    loss_per_sample: torch.Tensor
    timesteps: torch.Tensor
    mse: torch.Tensor
    vlb: torch.Tensor | None = None


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor | float, mean2: torch.Tensor, logvar2: torch.Tensor | float
) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    logvar1 = torch.as_tensor(logvar1, dtype=mean1.dtype, device=mean1.device)
    logvar2 = torch.as_tensor(logvar2, dtype=mean1.dtype, device=mean1.device)
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) by the tanh approximation Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))) used by DDPM / iDDPM."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """
    Elementwise log-likelihood (nats) of 8-bit data `x`, scaled to [-1, 1], under N(means, exp(log_scales)²): the
    Gaussian mass of the width-2/255 bin around each value, the outermost bins extended to ±∞ (DDPM eq. 13).

    Args:
        x (`torch.Tensor`): Data in [-1, 1] (256 levels).
        means (`torch.Tensor`): Gaussian means, broadcastable to `x`.
        log_scales (`torch.Tensor`): Log standard deviations, broadcastable to `x`.
    """
    half_bin = 1.0 / 255
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - half_bin))
    # The clamps keep log() finite where the approximate CDF saturates to exactly 0 or 1.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # ±0.999 rather than ±1 so the outermost levels are caught despite rounding; the next levels are ±0.992.
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class DDPMObjective:
    r"""
    The DiT / iDDPM training loss on top of a [`DDPMScheduler`].

    Without a learned variance the loss is DDPM's L_simple, the per-sample mean of (ε̂ - ε)². With one (the model
    outputs ε̂ followed by v in [-1, 1]) it is iDDPM's L_hybrid (eq. 16), `mse + vlb_weight * vlb`, where `vlb` is
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL -log p(x_0 | x_1) for
    t = 0, both in bits per dimension. As in iDDPM (Sec. 3.1) `vlb` trains only the variance: ε̂ is detached inside
    it, so the mean is learned from L_simple alone. This is improved-diffusion's `training_losses` with
    `LossType.MSE`, as used by DiT (`vlb_weight=1`, no 1/1000 rescaling). The t = 0 term assumes 8-bit data in
    [-1, 1]; DiT applies it unchanged to VAE latents, and so does this class.

    Args:
        scheduler ([`DDPMScheduler`]): Source of the noise schedule and of `add_noise`; must predict `"epsilon"`.
            See [`make_ddpm_scheduler`].
        learn_sigma (`bool`, defaults to `True`): Whether the model output carries the variance half.
        vlb_weight (`float`, defaults to 1.0): Weight of the per-step VLB term. DiT uses 1.0; iDDPM's λ = 0.001 on
            the full L_vlb = T·E_t[L_t] corresponds to `vlb_weight = T / 1000` (its `RESCALED_MSE`).
    """

    def __init__(self, scheduler: DDPMScheduler, learn_sigma: bool = True, vlb_weight: float = 1.0):
        if not isinstance(scheduler, DDPMScheduler):
            raise ValueError(
                f"`scheduler` must be a `DDPMScheduler`, got {type(scheduler).__name__}; build one with "
                "`make_ddpm_scheduler()` (other schedulers can still be used for sampling)."
            )
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(
                f"The objective trains ε-prediction but the scheduler has "
                f"prediction_type={scheduler.config.prediction_type!r}; create it with `prediction_type='epsilon'`."
            )
        expected_variance = "learned_range" if learn_sigma else "fixed_small"
        if scheduler.config.variance_type != expected_variance:
            raise ValueError(
                f"learn_sigma={learn_sigma} needs a scheduler with variance_type={expected_variance!r}, got "
                f"{scheduler.config.variance_type!r}; use `make_ddpm_scheduler(learn_sigma={learn_sigma})`."
            )
        if vlb_weight < 0:
            raise ValueError(f"`vlb_weight` must be >= 0, got {vlb_weight}.")

        self.scheduler = scheduler
        self.learn_sigma = learn_sigma
        self.vlb_weight = vlb_weight
        self.num_train_timesteps = len(scheduler.betas)
        if self.num_train_timesteps < 2:
            raise ValueError(f"The scheduler needs at least 2 training timesteps, got {self.num_train_timesteps}.")

        # The scheduler keeps its betas in float32 (rounded, but that is the schedule) and its ᾱ_t as a float32
        # cumulative product, whose 1 - ᾱ_t loses ~1e-4 relative accuracy at small t. Rebuilding the product in
        # float64 from the same betas keeps the posterior terms below accurate to ~1e-7, as in improved-diffusion.
        betas = scheduler.betas.detach().cpu().to(torch.float64)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        if alphas_cumprod[-1] <= 0:
            raise ValueError(
                "ᾱ_T is 0 (zero terminal SNR), where ε-prediction cannot recover x_0; create the scheduler with "
                "`rescale_betas_zero_snr=False`."
            )
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])

        self.betas = betas
        self.log_betas = torch.log(betas)
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = alphas_cumprod_prev
        # x_0 from x_t and ε (DDPM eq. 4 solved for x_0).
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, β̃_t) (DDPM eqs. 6-7).
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # β̃_0 = 0, so its log is replaced by log β̃_1; this is the lower end of the learned range at t = 0.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod)

    @staticmethod
    def _extract(buffer: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """buffer[t] as float32 on t's device, shaped (N, 1, ..., 1) to broadcast against an ndim-d batch."""
        # Cast before moving: some accelerators (MPS) have no float64.
        values = buffer.to(torch.float32).to(t.device)[t]
        return values.reshape(-1, *([1] * (ndim - 1)))

    def sample_timesteps(
        self,
        batch_size: int,
        device: torch.device | str,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.LongTensor:
        """
        Timesteps drawn uniformly from {0, ..., T - 1}.

        Args:
            batch_size (`int`): Number of timesteps.
            device (`torch.device` or `str`): Device of the result.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): One generator, on any device, or
                one per sample (as for `randn_tensor`).
        """
        high = self.num_train_timesteps
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size}; pass one per sample.")
            draws = [torch.randint(0, high, (1,), generator=g, device=g.device).to(device) for g in generator]
            return torch.cat(draws)
        # Draw where the generator lives so a CPU generator gives the same timesteps whatever the training device.
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, high, (batch_size,), generator=generator, device=gen_device).to(device)

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Mean, variance β̃_t and clipped log-variance of the forward-process posterior q(x_{t-1} | x_t, x_0)
        (DDPM eqs. 6-7), in float32, each shaped like `x_t`.
        """
        x0, x_t = x0.float(), x_t.float()
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t.ndim) * x0
            + self._extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t.ndim).expand_as(x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t.ndim).expand_as(x_t)
        return mean, variance, log_variance

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The model's reverse step p(x_{t-1} | x_t) = N(mean, variance).

        With `learn_sigma` the output is (ε̂, v) along channels and log σ² = frac·log β_t + (1 - frac)·log β̃_t
        with frac = (v + 1) / 2 (iDDPM eq. 15, diffusers' "learned_range"); otherwise σ² = β̃_t ("fixed_small").
        The mean is the posterior mean at x̂_0 = (x_t - √(1 - ᾱ_t) ε̂) / √ᾱ_t (DDPM eq. 11), unclipped.

        Returns:
            `tuple`: (mean, variance, log_variance, pred_x0), float32, each shaped like `x_t`.
        """
        model_output, x_t = model_output.float(), x_t.float()
        if self.learn_sigma:
            eps, var_values = model_output.chunk(2, dim=1)
            min_log = self._extract(self.posterior_log_variance_clipped, t, x_t.ndim)
            max_log = self._extract(self.log_betas, t, x_t.ndim)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = model_output
            variance = self._extract(self.posterior_variance, t, x_t.ndim).expand_as(x_t)
            log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t.ndim).expand_as(x_t)
        pred_x0 = (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
        )
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return mean, variance, log_variance, pred_x0

    def vb_terms_bpd(
        self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample VLB term of step t (iDDPM eqs. 10-13) in bits per dimension: the KL for t > 0, the decoder
        NLL for t = 0. Gradients flow through whatever `model_output` carries; the caller detaches ε̂."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        mean, _, log_variance, _ = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0.float(), means=mean, log_scales=0.5 * log_variance)
        ) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def __call__(
        self,
        model: Callable,
        x0: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> DiffusionLossOutput:
        """
        Noise `x0` to random timesteps, run `model` and return the loss.

        Args:
            model (`Callable`): Called as `model(x_t, timesteps, class_labels)`; may return a tensor, a tuple or an
                output with `.sample` (e.g. [`DiTModel`]) of shape `(N, 2C or C, H, W)`.
            x0 (`torch.Tensor` of shape `(N, C, H, W)`): Clean samples (DiT: scaled VAE latents).
            class_labels (`torch.LongTensor` of shape `(N,)`, *optional*): Passed through to the model.
            timesteps (`torch.LongTensor` of shape `(N,)`, *optional*): Defaults to uniform samples.
            noise (`torch.Tensor` shaped like `x0`, *optional*): Defaults to standard normal samples.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): Drives the default timesteps
                (drawn first) and noise; a CPU generator gives the same draws on any device.
        """
        n = x0.shape[0]
        if timesteps is None:
            timesteps = self.sample_timesteps(n, x0.device, generator=generator)
        else:
            timesteps = torch.as_tensor(timesteps).long().reshape(-1)
            if timesteps.shape[0] != n:
                raise ValueError(f"Got {timesteps.shape[0]} timesteps for a batch of {n}; pass one per sample.")
            # Range-checked only on the CPU: on an accelerator the check would stall every step on a sync.
            if timesteps.device.type == "cpu" and (timesteps.min() < 0 or timesteps.max() >= self.num_train_timesteps):
                low, high = timesteps.min().item(), timesteps.max().item()
                raise ValueError(f"`timesteps` must lie in [0, {self.num_train_timesteps}), got {low}..{high}.")
            timesteps = timesteps.to(x0.device)
        if noise is None:
            noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        elif noise.shape != x0.shape:
            raise ValueError(f"`noise` has shape {tuple(noise.shape)} but `x0` has {tuple(x0.shape)}.")

        # Noise in float32 whatever the data dtype: add_noise would otherwise round √ᾱ_t to e.g. bfloat16.
        x_t = self.scheduler.add_noise(x0.float(), noise.float(), timesteps).to(x0.dtype)
        model_output = model(x_t, timesteps, class_labels)
        if hasattr(model_output, "sample"):
            model_output = model_output.sample
        elif isinstance(model_output, tuple):
            model_output = model_output[0]
        # Losses in float32 even when the model ran in reduced precision.
        model_output = model_output.float()

        channels = x0.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[1] != expected or model_output.shape[2:] != x0.shape[2:]:
            raise ValueError(
                f"With learn_sigma={self.learn_sigma} the model output must have shape "
                f"{(n, expected, *x0.shape[2:])}, got {tuple(model_output.shape)}; check the model's `learn_sigma`."
            )

        eps = model_output[:, :channels]
        mse = mean_flat((eps - noise.float()) ** 2)
        if self.learn_sigma:
            # iDDPM Sec. 3.1: L_vlb must not pull on the mean, so ε̂ is frozen here and only v gets its gradient.
            frozen_output = torch.cat([eps.detach(), model_output[:, channels:]], dim=1)
            vlb = self.vb_terms_bpd(frozen_output, x0, x_t, timesteps)
            loss_per_sample = mse + self.vlb_weight * vlb
        else:
            vlb = None
            loss_per_sample = mse
        return DiffusionLossOutput(
            loss=loss_per_sample.mean(), loss_per_sample=loss_per_sample, timesteps=timesteps, mse=mse, vlb=vlb
        )


def loss_by_timestep_quartile(timesteps: torch.Tensor, losses: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """
    Sums and counts of per-sample losses in each quarter of [0, T): bucket k holds kT/4 <= t < (k+1)T/4.

    Returns a float64 tensor of shape (2, 4) on the losses' device: row 0 the sums, row 1 the counts. It stays on
    the device (no host synchronisation on the training hot path), and sums and counts rather than means can be
    added over steps and processes (e.g. `accelerator.reduce(..., "sum")`) before dividing: averaging per-process
    means would over-weight processes that drew few samples in a bucket. Log `sums[k] / counts[k]` as `loss_q{k}`.

    Args:
        timesteps (`torch.LongTensor` of shape `(N,)`): Timesteps of the samples.
        losses (`torch.Tensor` of shape `(N,)`): Per-sample losses, e.g. `DiffusionLossOutput.loss_per_sample`.
        num_train_timesteps (`int`): T.
    """
    if timesteps.shape != losses.shape:
        raise ValueError(f"`timesteps` {tuple(timesteps.shape)} and `losses` {tuple(losses.shape)} must match.")
    buckets = (timesteps.to(losses.device).long() * 4 // num_train_timesteps).clamp(0, 3)
    stats = torch.zeros(2, 4, dtype=torch.float64, device=losses.device)
    stats[0].index_add_(0, buckets, losses.detach().to(torch.float64))
    stats[1].index_add_(0, buckets, torch.ones_like(buckets, dtype=torch.float64))
    return stats
