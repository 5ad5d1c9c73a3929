"""Flow matching and noise-level sampling: the objective against its formulas, the pipeline against written-out
Euler / Heun loops and against the exact ODE solution for Gaussian data, scheduler matching, saving, training."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import gen, tiny_dit
from diffusers import (
    ConfigMixin,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    ModelMixin,
)
from diffusers.configuration_utils import register_to_config

from dit_hf import DiTPipeline
from dit_hf.objective import (
    FlowMatchingObjective,
    TimestepSampler,
    loss_by_timestep_quartile,
    make_objective,
    make_scheduler,
    shift_for_dimension,
    shift_noise_levels,
)

T = 1000
LABELS = [3, 7]


class RecordingModel:
    """Calls a model and keeps the exact x_t and timesteps it was given and the output it returned."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x_t, t, class_labels):
        out = self.model(x_t, t, class_labels)
        self.x_t, self.t, self.output = x_t.detach().clone(), t.clone(), out.sample.detach().clone()
        return out


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = gen(seed)
    return torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)


def flow_pipe(model=None, scheduler=None) -> DiTPipeline:
    pipe = DiTPipeline(
        transformer=model if model is not None else tiny_dit(learn_sigma=False),
        scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(),
        objective="flow",
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, labels=LABELS, seed=0, steps=3, **kwargs):
    return pipe(labels, num_inference_steps=steps, generator=gen(seed), output_type="latent", **kwargs).images


# ---------------------------------------------------------------------------------------------------------------------
# The flow-matching objective
# ---------------------------------------------------------------------------------------------------------------------


def test_interpolation_and_velocity_target():
    objective = FlowMatchingObjective()
    model = RecordingModel(tiny_dit(learn_sigma=False))
    x0, noise = batch()
    timesteps = torch.tensor([0.0, 1.5, 500.0, 1000.0])

    out = objective(model, x0, torch.tensor([0, 1, 2, 3]), timesteps=timesteps, noise=noise)

    sigma = (timesteps.double() / T).reshape(-1, 1, 1, 1)
    expected_x_t = (1 - sigma) * x0.double() + sigma * noise.double()
    np.testing.assert_allclose(model.x_t.double().numpy(), expected_x_t.numpy(), rtol=0, atol=1e-6)
    assert torch.equal(model.t, timesteps) and torch.equal(out.timesteps, timesteps)
    # σ = 0 is the data, σ = 1 pure noise.
    assert torch.equal(model.x_t[0], x0[0]) and torch.equal(model.x_t[3], noise[3])
    torch.testing.assert_close(objective.training_target(x0, noise, timesteps), noise - x0, atol=0, rtol=0)


def test_loss_is_mse_of_the_velocity():
    objective = make_objective("flow")
    model = RecordingModel(tiny_dit(learn_sigma=False))
    x0, noise = batch()
    timesteps = torch.tensor([10.0, 250.0, 600.0, 990.0])

    out = objective(model, x0, torch.tensor([0, 1, 2, 10]), timesteps=timesteps, noise=noise)

    expected = ((model.output.double() - (noise.double() - x0.double())) ** 2).mean(dim=(1, 2, 3))
    np.testing.assert_allclose(out.mse.detach().double().numpy(), expected.numpy(), rtol=1e-6)
    assert torch.equal(out.loss_per_sample, out.mse) and out.vlb is None
    assert out.loss.item() == pytest.approx(expected.mean().item(), rel=1e-6)
    assert out.loss.item() > 0.5  # a random model is far from the target


def test_flow_refuses_a_learned_variance():
    with pytest.raises(ValueError, match="learn_sigma=False"):
        make_objective("flow", learn_sigma=True)
    x0, _ = batch()
    with pytest.raises(ValueError, match="build the model with `learn_sigma=False`"):
        make_objective("flow")(tiny_dit(learn_sigma=True), x0, torch.tensor([0, 1, 2, 3]))


def test_flow_timesteps_are_checked():
    objective = make_objective("flow")
    x0, _ = batch()
    zero_model = lambda x_t, t, y: torch.zeros_like(x_t)  # noqa: E731
    with pytest.raises(ValueError, match=r"\[0, 1000\], got 0.0\.\.1001\.0"):
        objective(zero_model, x0, timesteps=torch.tensor([0.0, 1.0, 2.0, 1001.0]))
    with pytest.raises(ValueError, match="3 timesteps for a batch of 4"):
        objective(zero_model, x0, timesteps=torch.tensor([0.0, 1.0, 2.0]))
    # Integer timesteps (e.g. from a DDPM-style sampler) are read as σ · T.
    out = objective(zero_model, x0, timesteps=torch.tensor([0, 250, 500, 1000]))
    assert out.timesteps.dtype == torch.float32 and out.timesteps.tolist() == [0.0, 250.0, 500.0, 1000.0]


def test_flow_draws_timesteps_then_noise_from_the_generator():
    objective = make_objective("flow", timestep_sampling="logit_normal", shift=2.0)
    model, x0, labels = tiny_dit(learn_sigma=False), batch()[0], torch.tensor([0, 1, 2, 3])

    first = objective(model, x0, labels, generator=gen(3))
    again = objective(model, x0, labels, generator=gen(3))
    assert torch.equal(first.loss_per_sample, again.loss_per_sample)

    generator = gen(3)
    expected_t = objective.timestep_sampler.sample(4, "cpu", generator) * T
    noise = torch.randn(x0.shape, generator=generator)
    assert torch.equal(first.timesteps, expected_t)
    explicit = objective(model, x0, labels, timesteps=expected_t, noise=noise)
    assert torch.equal(explicit.loss_per_sample, first.loss_per_sample)

    per_sample = objective.sample_timesteps(3, "cpu", generator=[gen(s) for s in range(3)])
    singles = torch.cat([objective.sample_timesteps(1, "cpu", generator=gen(s)) for s in range(3)])
    assert torch.equal(per_sample, singles)
    # Float σ · T timesteps go to the loss quartiles like integer ones.
    stats = loss_by_timestep_quartile(torch.tensor([0.0, 249.9, 250.0, 1000.0]), torch.ones(4), T)
    assert stats[1].tolist() == [2.0, 1.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------------
# Noise-level sampling
# ---------------------------------------------------------------------------------------------------------------------


def test_logit_normal_statistics():
    u = TimestepSampler("logit_normal", mean=0.5, std=0.8).sample(200_000, "cpu", gen(0))
    assert u.dtype == torch.float32 and 0 < u.min() and u.max() < 1
    logits = torch.logit(u.double())
    # Standard errors are 0.8 / √200000 = 0.0018 for the mean and ~0.0013 for the std.
    assert logits.mean().item() == pytest.approx(0.5, abs=0.01)
    assert logits.std().item() == pytest.approx(0.8, abs=0.01)

    uniform = TimestepSampler().sample(200_000, "cpu", gen(0))
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.005)
    assert uniform.var().item() == pytest.approx(1 / 12, abs=0.002)
    assert (uniform < 0.25).double().mean().item() == pytest.approx(0.25, abs=0.005)


def test_shift_formula():
    sigma = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.5, 3.0, math.sqrt(48)):
        expected = np.array([s * x / (1 + (s - 1) * x) for x in sigma.tolist()])
        np.testing.assert_allclose(shift_noise_levels(sigma, s).numpy(), expected, rtol=1e-12, atol=1e-15)
    assert shift_noise_levels(torch.tensor([0.0, 0.5, 1.0]), 3.0).tolist() == [0.0, 0.75, 1.0]
    assert torch.equal(shift_noise_levels(sigma, 1.0), sigma)
    # It is the shift of diffusers' flow schedulers, which apply it to an evenly spaced grid.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    grid = torch.linspace(scheduler.sigma_max, scheduler.sigma_min, 5, dtype=torch.float64)
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), shift_noise_levels(grid, 3.0), atol=1e-6, rtol=0)

    plain = TimestepSampler("logit_normal").sample(1000, "cpu", gen(1))
    shifted = TimestepSampler("logit_normal", shift=3.0).sample(1000, "cpu", gen(1))
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    assert shifted.mean() > plain.mean() + 0.1  # towards more noise

    assert shift_for_dimension(4 * 32 * 32) == 1.0
    assert shift_for_dimension(768 * 16 * 16) == pytest.approx(math.sqrt(48))  # RAE: DINOv2-B latents at 256 px
    assert shift_for_dimension(16, base_dim=4) == 2.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="beta"), "Unknown timestep sampling 'beta'"),
        (dict(kind="logit_normal", std=0.0), "std` must be > 0"),
        (dict(shift=0.0), "shift` must be > 0"),
    ],
)
def test_bad_sampler_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TimestepSampler(**kwargs)


def test_ddpm_timesteps_from_noise_levels():
    objective = make_objective("ddpm_eps", timestep_sampling="logit_normal", logit_mean=0.3, shift=1.5)
    t = objective.sample_timesteps(20_000, "cpu", gen(0))
    u = objective.timestep_sampler.sample(20_000, "cpu", gen(0))
    assert t.dtype == torch.long and torch.equal(t, (u * T).floor().long())
    assert 0 <= t.min() and t.max() <= T - 1
    # Logit-normal piles the draws in the middle: P(|n| < 1.1) = 0.73 for n ~ N(0, 1) against 0.5 uniformly.
    middle = make_objective(timestep_sampling="logit_normal").sample_timesteps(20_000, "cpu", gen(0))
    assert ((middle >= 250) & (middle < 750)).double().mean().item() == pytest.approx(0.728, abs=0.02)
    # Uniform with a shift also goes through noise levels.
    shifted = make_objective(shift=3.0).sample_timesteps(4, "cpu", gen(2))
    assert torch.equal(shifted, (shift_noise_levels(torch.rand(4, generator=gen(2)), 3.0) * T).long())


# ---------------------------------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------------------------------


def test_make_objective_flow():
    objective = make_objective("flow", num_train_timesteps=500, timestep_sampling="logit_normal", logit_std=0.5)
    assert isinstance(objective, FlowMatchingObjective) and objective.name == "flow"
    assert not objective.learn_sigma and objective.num_train_timesteps == 500
    assert objective.timestep_sampler == TimestepSampler("logit_normal", mean=0.0, std=0.5, shift=1.0)
    assert make_objective("flow", learn_sigma=False).name == "flow"


def test_make_scheduler():
    ddpm = make_scheduler(make_objective())
    assert isinstance(ddpm, DDPMScheduler) and dict(ddpm.config) == dict(make_objective().scheduler.config)
    v_ddim = make_scheduler(make_objective("ddpm_v", beta_schedule="squaredcos_cap_v2"), "ddim")
    assert isinstance(v_ddim, DDIMScheduler)
    assert v_ddim.config.prediction_type == "v_prediction" and v_ddim.config.beta_schedule == "squaredcos_cap_v2"
    dpm = make_scheduler(make_objective(), "dpm")
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.variance_type is None

    flow = make_objective("flow", num_train_timesteps=500, shift=2.5)
    euler = make_scheduler(flow)
    assert isinstance(euler, FlowMatchEulerDiscreteScheduler)
    assert euler.config.num_train_timesteps == 500 and euler.config.shift == 2.5  # the training shift
    heun = make_scheduler(flow, "heun", shift=1.0)
    assert isinstance(heun, FlowMatchHeunDiscreteScheduler) and heun.config.shift == 1.0

    with pytest.raises(ValueError, match=r"Unknown scheduler family 'ddim' for the 'flow' objective.*'euler', 'heun'"):
        make_scheduler(flow, "ddim")
    with pytest.raises(ValueError, match=r"Unknown scheduler family 'euler'.*'ddpm', 'ddim', 'dpm'"):
        make_scheduler(make_objective(), "euler")
    with pytest.raises(ValueError, match="`shift` applies to flow-matching schedulers only"):
        make_scheduler(make_objective(), shift=2.0)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling: the pipeline against written-out solvers
# ---------------------------------------------------------------------------------------------------------------------


def manual_flow_sample(model, labels, scheduler, seed=0, steps=3, guidance_scale=1.0, channels=None, interval=None):
    """Euler on dx/dσ = v over the scheduler's σ grid, with separate conditional and unconditional forwards."""
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.tolist()
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == steps + 1
    c, size = model.config.in_channels, model.config.sample_size
    x = torch.randn((len(labels), c, size, size), generator=gen(seed), dtype=model.dtype)
    cond = torch.tensor(labels)
    null = torch.full_like(cond, model.config.num_classes)
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.tensor(sigma * T, dtype=torch.float32)  # the model's timestep is σ · T
            v = model(x, t, cond).sample
            if guidance_scale != 1.0 and (interval is None or interval[0] <= sigma <= interval[1]):
                k = channels or c
                v_u = model(x, t, null).sample
                v = torch.cat([v_u[:, :k] + guidance_scale * (v[:, :k] - v_u[:, :k]), v[:, k:]], dim=1)
            x = x + (sigma_next - sigma) * v
    return x


def test_euler_pipeline_matches_manual_loop():
    pipe = flow_pipe(scheduler=FlowMatchEulerDiscreteScheduler(shift=2.0))
    latents = sample(pipe, guidance_scale=1.0)
    expected = manual_flow_sample(pipe.transformer, LABELS, FlowMatchEulerDiscreteScheduler(shift=2.0))
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)
    assert (sample(pipe, guidance_scale=4.0) - latents).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("guidance_channels", "interval"), [(None, None), (2, None), (None, (0.0, 0.6))], ids=["all", "k2", "interval"]
)
def test_euler_pipeline_matches_manual_loop_with_guidance(guidance_channels, interval):
    # float64, so batched (pipeline) and separate (manual) forwards agree far below the tolerance. The scheduler
    # steps in float32, hence 1e-6 rather than 1e-12.
    pipe = flow_pipe(tiny_dit(learn_sigma=False).double())
    latents = sample(
        pipe, steps=4, guidance_scale=4.0, guidance_channels=guidance_channels, guidance_interval=interval
    )
    scheduler = FlowMatchEulerDiscreteScheduler()
    expected = manual_flow_sample(
        pipe.transformer, LABELS, scheduler, steps=4, guidance_scale=4.0, channels=guidance_channels, interval=interval
    )
    assert latents.dtype == torch.float64
    torch.testing.assert_close(latents, expected, atol=1e-6, rtol=0)
    unguided = manual_flow_sample(pipe.transformer, LABELS, FlowMatchEulerDiscreteScheduler(), steps=4)
    assert (latents - unguided).abs().max() > 1e-2


def test_guidance_interval_is_sigma_for_flow(monkeypatch):
    # 4 Euler steps at σ = 1, 0.667, 0.334, 0.001 (timesteps σ · 1000): guide only σ in [0.3, 0.8].
    pipe = flow_pipe()
    batches = []
    forward = pipe.transformer.forward

    def recording_forward(x, t, labels=None, **kwargs):
        batches.append((x.shape[0], round(float(t[0]))))
        return forward(x, t, labels, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", recording_forward)
    sample(pipe, steps=4, guidance_scale=4.0, guidance_interval=(0.3, 0.8))
    assert batches == [(2, 1000), (4, 667), (4, 334), (2, 1)]


def test_heun_pipeline_matches_manual_heun():
    model = tiny_dit(learn_sigma=False).double()
    pipe = flow_pipe(model, FlowMatchHeunDiscreteScheduler(shift=1.5))
    latents = sample(pipe, steps=3, guidance_scale=3.0)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.5)  # the same σ grid, read from the Euler scheduler
    scheduler.set_timesteps(3)
    sigmas = scheduler.sigmas.tolist()
    x = torch.randn((2, 3, 8, 8), generator=gen(0), dtype=torch.float64)
    cond = torch.tensor(LABELS)

    def velocity(x, sigma):
        t = torch.tensor(sigma * T, dtype=torch.float32)
        v_c, v_u = model(x, t, cond).sample, model(x, t, torch.full_like(cond, 10)).sample
        return v_u + 3.0 * (v_c - v_u)

    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            v = velocity(x, sigma)
            if sigma_next == 0:  # the last step is Euler: v at σ = 0 is never needed
                x = x + (sigma_next - sigma) * v
            else:
                x = x + (sigma_next - sigma) * 0.5 * (v + velocity(x + (sigma_next - sigma) * v, sigma_next))
    torch.testing.assert_close(latents, x, atol=1e-6, rtol=0)


class GaussianOracle(ModelMixin, ConfigMixin):
    """The exact minimiser of each objective's loss for data x_0 ~ N(0, s²): E[target | x_t] = x_t Cov / Var.

    With x_t = a x_0 + b ε (a = √ᾱ_t, b = √(1 - ᾱ_t) for DDPM; a = 1 - σ, b = σ for flow), Var(x_t) = a²s² + b²
    and the covariance with the target is b (ε), ab(1 - s²) (v) or b - as² (velocity ε - x_0). The probability-flow
    ODE then maps x at the first noise level to x · s / √(a²s² + b²) at the data.
    """

    @register_to_config
    def __init__(self, objective: str, data_std: float = 0.5, sample_size: int = 4, in_channels: int = 1):
        super().__init__()
        abar = make_objective(objective, learn_sigma=False).scheduler.alphas_cumprod if objective != "flow" else None
        self.register_buffer("alphas_cumprod", torch.zeros(1) if abar is None else abar, persistent=False)
        self.to(torch.float64)

    def forward(self, x, t, class_labels=None):
        s2 = self.config.data_std**2
        a, b = self.signal_and_noise(t.reshape(-1, 1, 1, 1))
        if self.config.objective == "flow":
            cov = b - a * s2
        else:
            cov = b if self.config.objective == "ddpm_eps" else a * b * (1 - s2)
        return SimpleNamespace(sample=x * cov / (a * a * s2 + b * b))

    def signal_and_noise(self, t):
        if self.config.objective == "flow":
            return 1 - t.double() / T, t.double() / T
        abar = self.alphas_cumprod[t.long()]
        return abar.sqrt(), (1 - abar).sqrt()

    def exact_solution(self, x, first_timestep):
        a, b = self.signal_and_noise(first_timestep)
        return x * self.config.data_std / (a * a * self.config.data_std**2 + b * b).sqrt()


def oracle_error(objective: str, family: str, steps: int) -> float:
    model = GaussianOracle(objective)
    pipe = DiTPipeline(
        model, make_scheduler(make_objective(objective, learn_sigma=False), family), objective=objective
    )
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(64, 1, 4, 4, generator=gen(0), dtype=torch.float64)
    out = pipe(num_images=64, num_inference_steps=steps, latents=noise, output_type="latent").images
    return (out - model.exact_solution(noise, pipe.scheduler.timesteps[0])).abs().max().item()


def test_samplers_reach_the_exact_solution_for_gaussian_data():
    # The oracle is built from each objective's parameterisation, so this checks that training target, model
    # timestep and sampler agree end to end. Errors at 16 and 32 steps show each solver's order of convergence.
    euler = [oracle_error("flow", "euler", n) for n in (16, 32)]
    heun = [oracle_error("flow", "heun", n) for n in (16, 32)]
    assert euler[1] < 0.08 and euler[0] / euler[1] == pytest.approx(2, rel=0.1)  # first order
    assert heun[1] < 1e-3 and heun[0] / heun[1] == pytest.approx(4, rel=0.1)  # second order
    for objective in ("ddpm_eps", "ddpm_v"):
        assert oracle_error(objective, "ddim", 32) < 0.14
        assert oracle_error(objective, "dpm", 32) < 0.02
    # ε and v are two parameterisations of the same optimum: identical samples up to rounding.
    assert oracle_error("ddpm_eps", "ddim", 8) == pytest.approx(oracle_error("ddpm_v", "ddim", 8), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Scheduler matching
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("objective", "scheduler", "message"),
    [
        ("flow", DDPMScheduler(), "'flow' objective .* DDPMScheduler is a diffusion scheduler.*FlowMatchEuler"),
        ("flow", DDIMScheduler(), "DDIMScheduler is a diffusion scheduler"),
        ("flow", DPMSolverMultistepScheduler(use_flow_sigmas=True), "prediction_type='flow_prediction'"),
        ("flow", FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), "use_dynamic_shifting=False"),
        ("ddpm_eps", FlowMatchEulerDiscreteScheduler(), "'ddpm_eps' objective .* flow-matching scheduler.*DDPM"),
        ("ddpm_v", FlowMatchHeunDiscreteScheduler(), "'ddpm_v' objective .* flow-matching scheduler"),
        ("ddpm_v", DDIMScheduler(), r"prediction_type='epsilon'; use `DDIMScheduler.from_config\(.*'v_prediction'"),
        ("ddpm_eps", DDPMScheduler(prediction_type="v_prediction"), r"prediction_type='epsilon'\)"),
    ],
)
def test_mismatched_scheduler_is_refused(objective, scheduler, message):
    model = tiny_dit(learn_sigma=False)
    pipe = DiTPipeline(model, scheduler, objective=objective)
    with pytest.raises(ValueError, match=message):
        pipe(LABELS, num_inference_steps=2)


def test_flow_dpm_solver_is_accepted():
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    latents = sample(flow_pipe(scheduler=scheduler))
    assert latents.shape == (2, 3, 8, 8) and torch.isfinite(latents).all()


def test_matching_scheduler_by_family():
    pipe = flow_pipe(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=500, shift=3.0))
    heun = pipe.matching_scheduler("heun")
    assert isinstance(heun, FlowMatchHeunDiscreteScheduler)
    assert heun.config.shift == 3.0 and heun.config.num_train_timesteps == 500
    pipe.scheduler = heun
    assert pipe.matching_scheduler("euler").config.shift == 3.0
    pipe.scheduler = DDPMScheduler()
    with pytest.raises(ValueError, match="not a flow-matching scheduler's"):
        pipe.matching_scheduler("euler")

    v_pipe = DiTPipeline(tiny_dit(), make_scheduler(make_objective("ddpm_v")), objective="ddpm_v")
    for family, cls in (("ddpm", DDPMScheduler), ("ddim", DDIMScheduler), ("dpm", DPMSolverMultistepScheduler)):
        scheduler = v_pipe.matching_scheduler(family)
        assert isinstance(scheduler, cls) and scheduler.config.prediction_type == "v_prediction"
        assert scheduler.config.beta_end == 0.02 and scheduler.config.clip_sample is False
    assert v_pipe.matching_scheduler("ddpm").config.variance_type == "learned_range"
    v_pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="not a diffusion scheduler.s"):
        v_pipe.matching_scheduler("ddim")
    with pytest.raises(ValueError, match="Unknown scheduler family 'heun' for the 'ddpm_v' objective"):
        v_pipe.matching_scheduler("heun")
    with pytest.raises(ValueError, match="Unknown `objective` 'x0'"):
        DiTPipeline(tiny_dit(), DDPMScheduler(), objective="x0")


# ---------------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------------


def test_objective_is_saved_and_reloaded(tmp_path):
    pipe = flow_pipe(scheduler=FlowMatchEulerDiscreteScheduler(shift=2.0))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["objective"] == "flow" and index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]

    loaded = DiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.objective == "flow" and loaded.scheduler.config.shift == 2.0
    torch.testing.assert_close(sample(loaded, guidance_scale=2.0), sample(pipe, guidance_scale=2.0), atol=0, rtol=0)
    heun = DiTPipeline.from_pretrained(tmp_path, scheduler=loaded.matching_scheduler("heun"))
    assert isinstance(heun.scheduler, FlowMatchHeunDiscreteScheduler) and heun.config.objective == "flow"

    # A folder saved before objectives were recorded holds an ε-prediction model.
    del index["objective"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    old = DiTPipeline.from_pretrained(tmp_path)
    assert old.config.objective == "ddpm_eps"
    with pytest.raises(ValueError, match="'ddpm_eps' objective"):
        sample(old)
    assert DiTPipeline.from_pretrained(tmp_path, objective="flow").config.objective == "flow"


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def test_flow_training_reduces_the_loss_on_a_fixed_batch():
    model = tiny_dit(std=0.02, learn_sigma=False, class_dropout_prob=0.0).train()
    objective = make_objective("flow", timestep_sampling="logit_normal")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x0 = torch.randn(8, 3, 8, 8, generator=gen(1)).clamp(-1, 1) * 0.5 + 0.3
    labels = torch.arange(8)
    losses = []
    for _ in range(30):
        # The same timesteps and noise every step: the loss is a fixed function of the weights.
        out = objective(model, x0, labels, generator=gen(100))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert max(losses[-5:]) < min(losses[:5])


# ---------------------------------------------------------------------------------------------------------------------
# flow_x: the model predicts x_0, the loss and the sampler use the velocity it implies
# ---------------------------------------------------------------------------------------------------------------------


class ConstantImage(ModelMixin, ConfigMixin):
    """A 'model' whose output is the same image whatever the input: the oracle x_0 of a one-image data set."""

    @register_to_config
    def __init__(self, in_channels: int = 3, sample_size: int = 8, num_classes: int = 10):
        super().__init__()
        self.image = torch.nn.Parameter(
            torch.linspace(-1, 1, in_channels * sample_size**2).reshape(1, in_channels, 8, 8)
        )

    def forward(self, x, t, class_labels=None):
        return SimpleNamespace(sample=self.image.expand(x.shape[0], -1, -1, -1).to(x.dtype))


def test_flow_x_loss_is_the_velocity_error_of_the_predicted_image():
    objective = make_objective("flow_x")
    assert objective.name == "flow_x" and objective.predict_x0 and not objective.learn_sigma
    model = RecordingModel(tiny_dit(learn_sigma=False))
    x0, noise = batch()
    timesteps = torch.tensor([10.0, 250.0, 600.0, 990.0])
    out = objective(model, x0, torch.tensor([0, 1, 2, 3]), timesteps=timesteps, noise=noise)
    sigma = (timesteps.double() / T).reshape(-1, 1, 1, 1)
    v_hat = (model.x_t.double() - model.output.double()) / sigma
    expected = ((v_hat - (noise.double() - x0.double())) ** 2).mean(dim=(1, 2, 3))
    # Above min_sigma the loss is the error of the implied velocity against ε - x_0 ...
    np.testing.assert_allclose(out.mse[1:].detach().double().numpy(), expected[1:].numpy(), rtol=1e-4)
    # ... below it both velocities are divided by min_sigma (σ = 0.01 here): the x_0 error weighted by 1 / 0.05².
    clipped = ((x0.double() - model.output.double()) / 0.05) ** 2
    assert out.mse[0].item() == pytest.approx(clipped[0].mean().item(), rel=1e-5)
    # The oracle that outputs the clean image has zero loss at every noise level, the clipped ones included.
    oracle = ConstantImage()
    x0 = oracle.image.detach().expand(4, -1, -1, -1)
    out = objective(oracle, x0, torch.tensor([0, 1, 2, 3]), timesteps=timesteps, noise=noise)
    assert out.mse.abs().max() < 1e-10
    # The same oracle is far from the velocity target of plain flow.
    assert make_objective("flow")(oracle, x0, timesteps=timesteps, noise=noise).loss > 0.5


def test_flow_x_pipeline_lands_on_the_predicted_image():
    """Each step turns x̂_0 into the velocity (x_σ - x̂_0) / σ, so a model that always predicts X samples X."""
    oracle = ConstantImage()
    for scheduler in (FlowMatchEulerDiscreteScheduler(), FlowMatchHeunDiscreteScheduler(shift=2.0)):
        pipe = DiTPipeline(transformer=oracle, scheduler=scheduler, objective="flow_x")
        pipe.set_progress_bar_config(disable=True)
        latents = sample(pipe, steps=4, guidance_scale=1.0)
        torch.testing.assert_close(latents, oracle.image.detach().expand(2, -1, -1, -1), atol=1e-5, rtol=0)
        # Read as a velocity (objective "flow"), the same output leads elsewhere.
        pipe = DiTPipeline(transformer=oracle, scheduler=scheduler, objective="flow")
        pipe.set_progress_bar_config(disable=True)
        assert (sample(pipe, steps=4, guidance_scale=1.0) - oracle.image).abs().max() > 0.5


def test_flow_x_samples_with_flow_schedulers_only():
    objective = make_objective("flow_x", shift=2.0)
    euler = make_scheduler(objective)
    assert isinstance(euler, FlowMatchEulerDiscreteScheduler) and euler.config.shift == 2.0
    assert isinstance(make_scheduler(objective, "heun"), FlowMatchHeunDiscreteScheduler)
    with pytest.raises(ValueError, match="'flow_x' objective"):
        DiTPipeline(tiny_dit(learn_sigma=False), DDPMScheduler(), objective="flow_x")([0], num_inference_steps=2)
    with pytest.raises(ValueError, match="'flow_x' objective learns no variance"):
        make_objective("flow_x", learn_sigma=True)
