# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Training objectives for DiT, chosen by name with [`make_objective`]:

- `"ddpm_eps"` (default, as DiT): ε-prediction MSE plus, with a learned variance, the improved-DDPM VLB term.
- `"ddpm_v"`: the same diffusion with v-prediction, v = √ᾱ_t ε - √(1 - ᾱ_t) x_0; a learned variance is supported.
- `"flow"`: flow matching / rectified flow with a velocity target on the straight path from data to noise.
- `"flow_x"`: the same flow matching, but the model predicts the clean image x_0 and the loss is taken on the
  velocity it implies, (x_σ - x̂_0) / σ (JiT's x-prediction with a v-loss). Clean images are easier to predict than
  noise where data are flat: a black background is a constant in x_0 but (x_σ + 1) / σ in velocity terms.

References:
    Ho et al., 2020, "Denoising Diffusion Probabilistic Models" (DDPM), eqs. (4)-(7) and (12).
    Nichol & Dhariwal, 2021, "Improved Denoising Diffusion Probabilistic Models" (iDDPM), eqs. (9)-(16).
    Salimans & Ho, 2022, "Progressive Distillation for Fast Sampling of Diffusion Models" (v-prediction).
    Lipman et al., 2023, "Flow Matching for Generative Modeling"; Liu et al., 2023, "Flow Straight and Fast".
    Li & He, 2025, "Back to Basics: Let Denoising Generative Models Denoise" (JiT): x-prediction with a v-loss.
    Esser et al., 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3), Sec. 3.1
        (logit-normal noise levels) and Sec. 5.3.2 (resolution-dependent shift).
    Zheng et al., 2025, "Diffusion Transformers with Representation Autoencoders" (RAE): the shift from the latent
        dimension, √(dim / 4096).
    Peebles & Xie, 2023, "Scalable Diffusion Models with Transformers" (DiT), Sec. 3.1.

The DDPM objectives take their noise schedule from a diffusers [`DDPMScheduler`]; the flow objective uses the
convention of diffusers' [`FlowMatchEulerDiscreteScheduler`] (x_t = (1 - σ) x_0 + σ ε, velocity ε - x_0, model
timestep σ · T). Either way [`make_scheduler`] builds the sampler that matches the training, for the pipeline.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .scheduling_dit import DDPM_PREDICTION_TYPES, FLOW_OBJECTIVES, OBJECTIVES, make_matching_scheduler

BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
# The latent dimension at which RAE's shift is 1: a 32 × 32 × 4 SD-VAE latent (256-pixel images).
SHIFT_BASE_DIM = 4096

Generators = torch.Generator | list[torch.Generator] | None


def make_ddpm_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    learn_sigma: bool = True,
    prediction_type: str = "epsilon",
) -> DDPMScheduler:
    """
    Build the [`DDPMScheduler`] DiT trains with.

    Args:
        num_train_timesteps (`int`, defaults to 1000): Number of diffusion steps T.
        beta_schedule (`str`, defaults to `"linear"`): `"linear"` (DDPM, betas from 1e-4 to 0.02 at T = 1000) or
            `"squaredcos_cap_v2"` (iDDPM cosine schedule, eq. 17).
        learn_sigma (`bool`, defaults to `True`): Whether the model also predicts the variance interpolation;
            selects `variance_type="learned_range"`, else `"fixed_small"`.
        prediction_type (`str`, defaults to `"epsilon"`): `"epsilon"` or `"v_prediction"`.
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"Unknown `beta_schedule` {beta_schedule!r}; choose one of {list(BETA_SCHEDULES)}.")
    if num_train_timesteps < 2:
        raise ValueError(f"`num_train_timesteps` must be >= 2, got {num_train_timesteps}.")
    if prediction_type not in DDPM_PREDICTION_TYPES.values():
        raise ValueError(
            f"Unknown `prediction_type` {prediction_type!r}; choose one of {list(DDPM_PREDICTION_TYPES.values())}."
        )
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
        prediction_type=prediction_type,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Noise-level sampling
# ---------------------------------------------------------------------------------------------------------------------


def shift_noise_levels(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = sσ / (1 + (s - 1)σ) (SD3 Sec. 5.3.2): s > 1 moves noise levels towards 1 (more noise), keeping 0 and 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def shift_for_dimension(dim: int, base_dim: int = SHIFT_BASE_DIM) -> float:
    """
    RAE's shift s = √(dim / base_dim) for a latent of `dim` = channels × height × width numbers: at a fixed noise
    level, more numbers carry more signal, so larger latents need more noise for the same difficulty.

    Args:
        dim (`int`): Size of one training sample, e.g. 4 × 32 × 32 for SD-VAE latents of 256-pixel images.
        base_dim (`int`, defaults to 4096): The size at which the shift is 1.
    """
    if dim < 1 or base_dim < 1:
        raise ValueError(f"`dim` and `base_dim` must be >= 1, got dim={dim}, base_dim={base_dim}.")
    return math.sqrt(dim / base_dim)


def _draw(draw: Callable, batch_size: int, device: torch.device | str, generator: Generators) -> torch.Tensor:
    """`draw((n,), generator=..., device=...)` (e.g. `torch.rand`) for a batch, from one generator or one per
    sample (as for `randn_tensor`)."""
    if isinstance(generator, list):
        if len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size}; pass one per sample.")
        return torch.cat([draw((1,), generator=g, device=g.device).to(device) for g in generator])
    # Draw where the generator lives so a CPU generator gives the same numbers whatever the training device.
    gen_device = generator.device if generator is not None else device
    return draw((batch_size,), generator=generator, device=gen_device).to(device)


@dataclass(frozen=True)
class TimestepSampler:
    """
    The distribution of training noise levels u in [0, 1) (1 is pure noise), before they become timesteps.

    Args:
        kind (`str`, defaults to `"uniform"`): `"uniform"`, or `"logit_normal"`: u = sigmoid(n) with
            n ~ N(`mean`, `std`²), which favours the middle noise levels (SD3; LightningDiT).
        mean (`float`, defaults to 0.0): Mean of n for `"logit_normal"`; > 0 favours more noise.
        std (`float`, defaults to 1.0): Standard deviation of n for `"logit_normal"`.
        shift (`float`, defaults to 1.0): Applied last, u' = s·u / (1 + (s - 1)·u) ([`shift_noise_levels`]);
            see [`shift_for_dimension`].
    """

    kind: str = "uniform"
    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0

    def __post_init__(self):
        if self.kind not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"Unknown timestep sampling {self.kind!r}; choose one of {list(TIMESTEP_SAMPLINGS)}.")
        if not self.std > 0:
            raise ValueError(f"The logit-normal `std` must be > 0, got {self.std}.")
        if not self.shift > 0:
            raise ValueError(f"`shift` must be > 0 (1 for none), got {self.shift}.")

    @property
    def is_plain_uniform(self) -> bool:
        return self.kind == "uniform" and self.shift == 1.0

    def sample(self, batch_size: int, device: torch.device | str, generator: Generators = None) -> torch.Tensor:
        """`batch_size` float32 noise levels on `device`; `generator` as in [`DDPMObjective.sample_timesteps`]."""
        if self.kind == "uniform":
            u = _draw(torch.rand, batch_size, device, generator)
        else:
            u = torch.sigmoid(self.mean + self.std * _draw(torch.randn, batch_size, device, generator))
        return shift_noise_levels(u, self.shift)


# ---------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DiffusionLossOutput(BaseOutput):
    """
    Output of [`DDPMObjective`] and [`FlowMatchingObjective`].

    Args:
        loss (`torch.Tensor`, scalar): `loss_per_sample` averaged over the batch; call `backward()` on this.
        loss_per_sample (`torch.Tensor` of shape `(N,)`): `mse + vlb_weight * vlb` (or `mse` alone).
        timesteps (`torch.Tensor` of shape `(N,)`): The model's timestep input: integer steps in [0, T) for the
            DDPM objectives, σ · T in [0, T] (float) for flow matching.
        mse (`torch.Tensor` of shape `(N,)`): Mean squared error of the prediction (ε, v or velocity) against its
            target (DDPM eq. 14, "L_simple", for ε).
        vlb (`torch.Tensor` of shape `(N,)`, *optional*): The sampled step's VLB term in bits per dimension, with
            the mean stopped from receiving its gradient; `None` when the variance is not learned.
    """

    loss: torch.Tensor
    loss_per_sample: torch.Tensor
    timesteps: torch.Tensor
    mse: torch.Tensor
    vlb: torch.Tensor | None = None


def _resolve_noise(x0: torch.Tensor, noise: torch.Tensor | None, generator: Generators) -> torch.Tensor:
    if noise is None:
        return randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    if noise.shape != x0.shape:
        raise ValueError(f"`noise` has shape {tuple(noise.shape)} but `x0` has {tuple(x0.shape)}.")
    return noise


def _predict(model: Callable, x_t: torch.Tensor, timesteps: torch.Tensor, class_labels) -> torch.Tensor:
    """The model output as a float32 tensor, from a tensor, a tuple or an output with `.sample`."""
    model_output = model(x_t, timesteps, class_labels)
    if hasattr(model_output, "sample"):
        model_output = model_output.sample
    elif isinstance(model_output, tuple):
        model_output = model_output[0]
    # Losses in float32 even when the model ran in reduced precision.
    return model_output.float()


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


# ---------------------------------------------------------------------------------------------------------------------
# DDPM: ε- and v-prediction
# ---------------------------------------------------------------------------------------------------------------------


class DDPMObjective:
    r"""
    The DiT / iDDPM training loss on top of a [`DDPMScheduler`], predicting ε or v.

    Without a learned variance the loss is the per-sample mean of (ε̂ - ε)² (DDPM's L_simple) or of (v̂ - v)² with
    v = √ᾱ_t ε - √(1 - ᾱ_t) x_0 (Salimans & Ho, 2022). With one (the model outputs the prediction followed by the
    variance interpolation r in [-1, 1]) it is iDDPM's L_hybrid (eq. 16), `mse + vlb_weight * vlb`, where `vlb` is
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL -log p(x_0 | x_1) for
    t = 0, both in bits per dimension. The reverse-step mean depends only on x̂_0, which v̂ gives as
    √ᾱ_t x_t - √(1 - ᾱ_t) v̂, so the VLB is the same function of x̂_0 for both predictions. As in iDDPM (Sec. 3.1)
    `vlb` trains only the variance: the prediction is detached inside it. With ε and `vlb_weight=1` this is
    improved-diffusion's `training_losses` with `LossType.MSE`, as used by DiT (no 1/1000 rescaling). The t = 0
    term assumes 8-bit data in [-1, 1]; DiT applies it unchanged to VAE latents, and so does this class.

    Args:
        scheduler ([`DDPMScheduler`]): Source of the noise schedule and of `add_noise`; its `prediction_type`
            (`"epsilon"` or `"v_prediction"`) selects the target. See [`make_ddpm_scheduler`].
        learn_sigma (`bool`, defaults to `True`): Whether the model output carries the variance half.
        vlb_weight (`float`, defaults to 1.0): Weight of the per-step VLB term. DiT uses 1.0; iDDPM's λ = 0.001 on
            the full L_vlb = T·E_t[L_t] corresponds to `vlb_weight = T / 1000` (its `RESCALED_MSE`).
        timestep_sampler ([`TimestepSampler`], *optional*): Distribution of the training timesteps; a noise level
            u becomes t = ⌊u·T⌋. Defaults to uniform integers, drawn directly as DiT does.
    """

    def __init__(
        self,
        scheduler: DDPMScheduler,
        learn_sigma: bool = True,
        vlb_weight: float = 1.0,
        timestep_sampler: TimestepSampler | None = None,
    ):
        if not isinstance(scheduler, DDPMScheduler):
            raise ValueError(
                f"`scheduler` must be a `DDPMScheduler`, got {type(scheduler).__name__}; build one with "
                "`make_ddpm_scheduler()` (other schedulers can still be used for sampling)."
            )
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in DDPM_PREDICTION_TYPES.values():
            raise ValueError(
                f"The objective trains ε- or v-prediction but the scheduler has prediction_type={prediction_type!r};"
                " create it with `prediction_type='epsilon'` or `prediction_type='v_prediction'`."
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
        self.prediction_type = prediction_type
        self.learn_sigma = learn_sigma
        self.vlb_weight = vlb_weight
        self.timestep_sampler = timestep_sampler or TimestepSampler()
        self.num_train_timesteps = len(scheduler.betas)
        if self.num_train_timesteps < 2:
            raise ValueError(f"The scheduler needs at least 2 training timesteps, got {self.num_train_timesteps}.")

        # The scheduler keeps its betas in float32 (rounded, but that is the schedule) and its ᾱ_t as a float32
        # cumulative product, whose 1 - ᾱ_t loses ~1e-4 relative accuracy at small t. Rebuilding the product in
        # float64 from the same betas keeps the posterior terms below accurate to ~1e-7, as in improved-diffusion.
        betas = scheduler.betas.detach().cpu().to(torch.float64)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        # v-prediction recovers x_0 = -v at ᾱ_T = 0; ε-prediction would divide by √ᾱ_T.
        if alphas_cumprod[-1] <= 0 and prediction_type == "epsilon":
            raise ValueError(
                "ᾱ_T is 0 (zero terminal SNR), where ε-prediction cannot recover x_0; create the scheduler with "
                "`rescale_betas_zero_snr=False` or use `prediction_type='v_prediction'`."
            )
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])

        self.betas = betas
        self.log_betas = torch.log(betas)
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = alphas_cumprod_prev
        # x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε (DDPM eq. 4), and the v target built from the same coefficients.
        self.sqrt_alphas_cumprod = torch.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - alphas_cumprod)
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

    @property
    def name(self) -> str:
        """`"ddpm_eps"` or `"ddpm_v"`, as [`make_objective`] and `DiTPipeline(objective=...)` name it."""
        return "ddpm_eps" if self.prediction_type == "epsilon" else "ddpm_v"

    @staticmethod
    def _extract(buffer: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """buffer[t] as float32 on t's device, shaped (N, 1, ..., 1) to broadcast against an ndim-d batch."""
        # Cast before moving: some accelerators (MPS) have no float64.
        values = buffer.to(torch.float32).to(t.device)[t]
        return values.reshape(-1, *([1] * (ndim - 1)))

    def sample_timesteps(
        self, batch_size: int, device: torch.device | str, generator: Generators = None
    ) -> torch.LongTensor:
        """
        Training timesteps in {0, ..., T - 1} from the objective's [`TimestepSampler`].

        Args:
            batch_size (`int`): Number of timesteps.
            device (`torch.device` or `str`): Device of the result.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): One generator, on any device, or
                one per sample (as for `randn_tensor`).
        """
        high = self.num_train_timesteps
        if self.timestep_sampler.is_plain_uniform:
            # Integers drawn directly, as DiT does (and earlier versions of this class: same seed, same timesteps).
            return _draw(functools.partial(torch.randint, 0, high), batch_size, device, generator)
        u = self.timestep_sampler.sample(batch_size, device, generator)
        return (u * high).long().clamp(max=high - 1)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model learns to output for x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε: ε, or v = √ᾱ_t ε - √(1 - ᾱ_t) x_0."""
        if self.prediction_type == "epsilon":
            return noise.float()
        sqrt_abar = self._extract(self.sqrt_alphas_cumprod, timesteps, x0.ndim)
        sqrt_one_minus_abar = self._extract(self.sqrt_one_minus_alphas_cumprod, timesteps, x0.ndim)
        return sqrt_abar * noise.float() - sqrt_one_minus_abar * x0.float()

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

        With `learn_sigma` the output is (prediction, r) along channels and log σ² = frac·log β_t +
        (1 - frac)·log β̃_t with frac = (r + 1) / 2 (iDDPM eq. 15, diffusers' "learned_range"); otherwise
        σ² = β̃_t ("fixed_small"). The mean is the posterior mean at x̂_0 (DDPM eq. 11), unclipped, where
        x̂_0 = (x_t - √(1 - ᾱ_t) ε̂) / √ᾱ_t for ε, and x̂_0 = √ᾱ_t x_t - √(1 - ᾱ_t) v̂ for v.

        Returns:
            `tuple`: (mean, variance, log_variance, pred_x0), float32, each shaped like `x_t`.
        """
        model_output, x_t = model_output.float(), x_t.float()
        if self.learn_sigma:
            prediction, var_values = model_output.chunk(2, dim=1)
            min_log = self._extract(self.posterior_log_variance_clipped, t, x_t.ndim)
            max_log = self._extract(self.log_betas, t, x_t.ndim)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            prediction = model_output
            variance = self._extract(self.posterior_variance, t, x_t.ndim).expand_as(x_t)
            log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t.ndim).expand_as(x_t)
        if self.prediction_type == "epsilon":
            pred_x0 = (
                self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * prediction
            )
        else:
            pred_x0 = (
                self._extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * prediction
            )
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return mean, variance, log_variance, pred_x0

    def vb_terms_bpd(
        self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample VLB term of step t (iDDPM eqs. 10-13) in bits per dimension: the KL for t > 0, the decoder
        NLL for t = 0. Gradients flow through whatever `model_output` carries; the caller detaches the prediction."""
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
        generator: Generators = None,
    ) -> DiffusionLossOutput:
        """
        Noise `x0` to random timesteps, run `model` and return the loss.

        Args:
            model (`Callable`): Called as `model(x_t, timesteps, class_labels)`; may return a tensor, a tuple or an
                output with `.sample` (e.g. [`DiTModel`]) of shape `(N, 2C or C, H, W)`.
            x0 (`torch.Tensor` of shape `(N, C, H, W)`): Clean samples (DiT: scaled VAE latents).
            class_labels (`torch.LongTensor` of shape `(N,)`, *optional*): Passed through to the model.
            timesteps (`torch.LongTensor` of shape `(N,)`, *optional*): Defaults to [`sample_timesteps`].
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
        noise = _resolve_noise(x0, noise, generator)

        # Noise in float32 whatever the data dtype: add_noise would otherwise round √ᾱ_t to e.g. bfloat16.
        x_t = self.scheduler.add_noise(x0.float(), noise.float(), timesteps).to(x0.dtype)
        model_output = _predict(model, x_t, timesteps, class_labels)

        channels = x0.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[1] != expected or model_output.shape[2:] != x0.shape[2:]:
            raise ValueError(
                f"With learn_sigma={self.learn_sigma} the model output must have shape "
                f"{(n, expected, *x0.shape[2:])}, got {tuple(model_output.shape)}; check the model's `learn_sigma`."
            )

        prediction = model_output[:, :channels]
        mse = mean_flat((prediction - self.training_target(x0, noise, timesteps)) ** 2)
        if self.learn_sigma:
            # iDDPM Sec. 3.1: L_vlb must not pull on the mean, so the prediction is frozen and only r is trained.
            frozen_output = torch.cat([prediction.detach(), model_output[:, channels:]], dim=1)
            vlb = self.vb_terms_bpd(frozen_output, x0, x_t, timesteps)
            loss_per_sample = mse + self.vlb_weight * vlb
        else:
            vlb = None
            loss_per_sample = mse
        return DiffusionLossOutput(
            loss=loss_per_sample.mean(), loss_per_sample=loss_per_sample, timesteps=timesteps, mse=mse, vlb=vlb
        )


# ---------------------------------------------------------------------------------------------------------------------
# Flow matching
# ---------------------------------------------------------------------------------------------------------------------


class FlowMatchingObjective:
    r"""
    Flow matching (rectified flow) with a velocity target, in diffusers' convention: at noise level σ in [0, 1]
    x_σ = (1 - σ) x_0 + σ ε, the model gets timestep σ · T and learns the velocity dx_σ/dσ = ε - x_0; the loss is
    the per-sample mean of (v̂ - (ε - x_0))². [`FlowMatchEulerDiscreteScheduler`] with the same T integrates
    x ← x + (σ_next - σ) v̂ from σ = 1, so it samples from a model trained here without conversion.

    With `predict_x0=True` (objective `"flow_x"`) the model outputs x̂_0 instead, and the loss is the velocity error
    with both velocities written through the clean image, v̂ = (x_σ - x̂_0) / s and v = (x_σ - x_0) / s with
    s = max(σ, `min_sigma`): the x_0 error weighted by 1 / s² (for σ >= `min_sigma`, v = ε - x_0 exactly).
    [`DiTPipeline`] turns x̂_0 into the velocity the same way before each scheduler step.

    Args:
        num_train_timesteps (`int`, defaults to 1000): T, the scale of the model's timestep input.
        timestep_sampler ([`TimestepSampler`], *optional*): Distribution of σ. Defaults to uniform.
        predict_x0 (`bool`, defaults to `False`): The model predicts x_0 (`"flow_x"`) rather than the velocity.
        min_sigma (`float`, defaults to 0.05): With `predict_x0`, the smallest σ the x_0 error is divided by, which
            bounds the loss weight at 1 / min_sigma² (JiT clips the same way).
    """

    learn_sigma = False

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        timestep_sampler: TimestepSampler | None = None,
        predict_x0: bool = False,
        min_sigma: float = 0.05,
    ):
        if num_train_timesteps < 1:
            raise ValueError(f"`num_train_timesteps` must be >= 1, got {num_train_timesteps}.")
        if not 0 < min_sigma < 1:
            raise ValueError(f"`min_sigma` must be in (0, 1), got {min_sigma}.")
        self.num_train_timesteps = num_train_timesteps
        self.timestep_sampler = timestep_sampler or TimestepSampler()
        self.predict_x0, self.min_sigma = predict_x0, min_sigma

    @property
    def name(self) -> str:
        return "flow_x" if self.predict_x0 else "flow"

    def sample_timesteps(
        self, batch_size: int, device: torch.device | str, generator: Generators = None
    ) -> torch.FloatTensor:
        """Training timesteps σ · T (float32, in [0, T]); arguments as in [`DDPMObjective.sample_timesteps`]."""
        return self.timestep_sampler.sample(batch_size, device, generator) * self.num_train_timesteps

    def noise_levels(self, timesteps: torch.Tensor) -> torch.Tensor:
        """σ = timesteps / T, float32."""
        return timesteps.float() / self.num_train_timesteps

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity ε - x_0, the same at every noise level on the straight path."""
        return noise.float() - x0.float()

    def __call__(
        self,
        model: Callable,
        x0: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: Generators = None,
    ) -> DiffusionLossOutput:
        """
        Move `x0` to random noise levels, run `model` and return the loss; arguments as in
        [`DDPMObjective.__call__`], except that `timesteps` are σ · T, floats in [0, T] (integers are accepted).
        """
        n = x0.shape[0]
        if timesteps is None:
            timesteps = self.sample_timesteps(n, x0.device, generator=generator)
        else:
            timesteps = torch.as_tensor(timesteps).float().reshape(-1)
            if timesteps.shape[0] != n:
                raise ValueError(f"Got {timesteps.shape[0]} timesteps for a batch of {n}; pass one per sample.")
            if timesteps.device.type == "cpu" and (timesteps.min() < 0 or timesteps.max() > self.num_train_timesteps):
                low, high = timesteps.min().item(), timesteps.max().item()
                raise ValueError(f"`timesteps` = σ·T must lie in [0, {self.num_train_timesteps}], got {low}..{high}.")
            timesteps = timesteps.to(x0.device)
        noise = _resolve_noise(x0, noise, generator)

        sigmas = self.noise_levels(timesteps).reshape(-1, *([1] * (x0.ndim - 1)))
        x_t = ((1 - sigmas) * x0.float() + sigmas * noise.float()).to(x0.dtype)
        model_output = _predict(model, x_t, timesteps, class_labels)
        if model_output.shape != x0.shape:
            raise ValueError(
                f"The model output must have the shape of `x0` {tuple(x0.shape)}, got {tuple(model_output.shape)}; "
                "flow matching learns no variance: build the model with `learn_sigma=False`."
            )
        if self.predict_x0:  # (x_σ - x̂_0) / s - (x_σ - x_0) / s
            error = (x0.float() - model_output.float()) / sigmas.clamp_min(self.min_sigma)
        else:
            error = model_output - self.training_target(x0, noise, timesteps)
        mse = mean_flat(error**2)
        return DiffusionLossOutput(loss=mse.mean(), loss_per_sample=mse, timesteps=timesteps, mse=mse, vlb=None)


# ---------------------------------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------------------------------

Objective = DDPMObjective | FlowMatchingObjective


def make_objective(
    name: str = "ddpm_eps",
    learn_sigma: bool | None = None,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    vlb_weight: float = 1.0,
    timestep_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
) -> Objective:
    """
    Build a training objective by name.

    Args:
        name (`str`, defaults to `"ddpm_eps"`): `"ddpm_eps"` (DiT), `"ddpm_v"`, `"flow"` or `"flow_x"`.
        learn_sigma (`bool`, *optional*): Whether the model predicts the variance (DDPM objectives only). Defaults
            to `True` for the DDPM objectives, as DiT, and `False` for flow, which cannot use it.
        num_train_timesteps (`int`, defaults to 1000): T: the DDPM chain length, or the flow timestep scale.
        beta_schedule (`str`, defaults to `"linear"`): DDPM noise schedule, see [`make_ddpm_scheduler`].
        vlb_weight (`float`, defaults to 1.0): Weight of the VLB term with a learned variance.
        timestep_sampling (`str`, defaults to `"uniform"`): `"uniform"` or `"logit_normal"`, see [`TimestepSampler`].
        logit_mean (`float`, defaults to 0.0): Mean of the logit-normal noise levels.
        logit_std (`float`, defaults to 1.0): Standard deviation of the logit-normal noise levels.
        shift (`float`, defaults to 1.0): Noise-level shift, e.g. `shift_for_dimension(C * H * W)`.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; choose one of {list(OBJECTIVES)}.")
    sampler = TimestepSampler(timestep_sampling, mean=logit_mean, std=logit_std, shift=shift)
    if name in FLOW_OBJECTIVES:
        if learn_sigma:
            raise ValueError(
                f"The {name!r} objective learns no variance: pass learn_sigma=False (and build the model with "
                "`learn_sigma=False`), or use 'ddpm_eps' / 'ddpm_v' to learn one."
            )
        return FlowMatchingObjective(num_train_timesteps, timestep_sampler=sampler, predict_x0=name == "flow_x")
    learn_sigma = True if learn_sigma is None else learn_sigma
    scheduler = make_ddpm_scheduler(num_train_timesteps, beta_schedule, learn_sigma, DDPM_PREDICTION_TYPES[name])
    return DDPMObjective(scheduler, learn_sigma=learn_sigma, vlb_weight=vlb_weight, timestep_sampler=sampler)


def make_scheduler(objective: Objective, family: str | None = None, shift: float | None = None) -> SchedulerMixin:
    """
    The inference scheduler that matches a training objective, to save with the pipeline or sample with.

    Args:
        objective ([`DDPMObjective`] or [`FlowMatchingObjective`]): The training objective.
        family (`str`, *optional*): `"ddpm"` (default; with a learned variance it samples with it), `"ddim"` or
            `"dpm"` (DPM-Solver++) for the DDPM objectives; `"euler"` (default) or `"heun"` (2nd order) for flow.
        shift (`float`, *optional*): Flow only: the shift of the sampling noise levels. Defaults to the training
            shift, as RAE and SD3 sample with the shift they train with.
    """
    if isinstance(objective, FlowMatchingObjective):
        shift = objective.timestep_sampler.shift if shift is None else shift
        config = {"num_train_timesteps": objective.num_train_timesteps, "shift": shift}
        return make_matching_scheduler(objective.name, family or "euler", config)
    if shift is not None:
        raise ValueError(f"`shift` applies to flow-matching schedulers only; the objective is {objective.name!r}.")
    return make_matching_scheduler(objective.name, family or "ddpm", objective.scheduler.config)


def loss_by_timestep_quartile(timesteps: torch.Tensor, losses: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """
    Sums and counts of per-sample losses in each quarter of [0, T): bucket k holds kT/4 <= t < (k+1)T/4 (flow
    timesteps σ · T = T go to the last bucket).

    Returns a float64 tensor of shape (2, 4) on the losses' device: row 0 the sums, row 1 the counts. It stays on
    the device (no host synchronisation on the training hot path), and sums and counts rather than means can be
    added over steps and processes (e.g. `accelerator.reduce(..., "sum")`) before dividing: averaging per-process
    means would over-weight processes that drew few samples in a bucket. Log `sums[k] / counts[k]` as `loss_q{k}`.

    Args:
        timesteps (`torch.Tensor` of shape `(N,)`): Timesteps of the samples (integers, or flow's σ · T).
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
