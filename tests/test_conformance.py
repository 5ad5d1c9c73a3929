"""DiTPipeline and DiTModel under the habits of diffusers users: loading arguments, swapped schedulers, layerwise
casting, offloading and batched labels behave as with diffusers' own pipelines and models."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from conftest import ID2LABEL, ddpm_scheduler, gen, make_pipe, tiny_dit
from diffusers import DDIMScheduler, DiTTransformer2DModel
from diffusers import DiTPipeline as DiffusersDiTPipeline
from test_pipeline import tiny_vae

from dit_hf import DiTModel, DiTPipeline
from dit_hf.convert import dit_to_diffusers

REPO = Path(__file__).resolve().parents[1]
LABELS = [3, 7]


def sample(pipe, labels=LABELS, seed=0, steps=3, output_type="latent", **kwargs):
    return pipe(labels, num_inference_steps=steps, generator=gen(seed), output_type=output_type, **kwargs).images


def latent_pipe(**config) -> DiTPipeline:
    """A latent-space pipeline (4 channels, tiny VAE) with a DDPM scheduler of fixed variance."""
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
    pipe = DiTPipeline(tiny_dit(in_channels=4), scheduler, vae=tiny_vae(), id2label=ID2LABEL, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_without_dit_hf(script: str, *args, cwd: Path) -> list:
    """Run `script` in a Python where `import dit_hf` fails; it prints one JSON line, returned parsed."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "modules"), OMP_NUM_THREADS="1")
    prelude = 'import sys\nsys.modules["dit_hf"] = None  # `import dit_hf` raises ImportError\n'
    proc = subprocess.run(
        [sys.executable, "-c", prelude + script, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------------------------------
# from_pretrained: diffusers' own loader and all its arguments


SAVED_DEFAULTS = dict(default_num_inference_steps=3, default_guidance_scale=2.0)


@pytest.fixture(scope="module")
def latent_folder(tmp_path_factory):
    """A saved latent pipeline with sampling defaults, the main weights and, as variant "ema", other transformer
    weights."""
    folder = tmp_path_factory.mktemp("latent") / "tiny-dit-vae"
    pipe = latent_pipe(**SAVED_DEFAULTS)
    pipe.save_pretrained(folder)
    pipe.transformer = tiny_dit(seed=1, in_channels=4)
    pipe.save_pretrained(folder, variant="ema")
    return folder


@pytest.mark.parametrize(
    "kwargs, transformer_dtype, vae_dtype",
    [
        (dict(dtype=torch.float16), torch.float16, torch.float16),
        (dict(dtype={"transformer": torch.bfloat16, "default": torch.float16}), torch.bfloat16, torch.float16),
        (dict(dtype={"vae": torch.bfloat16}), torch.float32, torch.bfloat16),
        (dict(torch_dtype=torch.float16), torch.float16, torch.float16),
    ],
)
def test_from_pretrained_dtype(latent_folder, kwargs, transformer_dtype, vae_dtype):
    pipe = DiTPipeline.from_pretrained(latent_folder, **kwargs)
    assert type(pipe) is DiTPipeline and type(pipe.transformer) is DiTModel
    assert pipe.transformer.dtype == transformer_dtype and pipe.vae.dtype == vae_dtype
    reference = DiTPipeline.from_pretrained(latent_folder).transformer
    weight = pipe.transformer.blocks[0].attn.qkv.weight
    torch.testing.assert_close(weight.float(), reference.blocks[0].attn.qkv.weight.to(transformer_dtype).float())


def test_from_pretrained_variant(latent_folder):
    main = DiTPipeline.from_pretrained(latent_folder)
    ema = DiTPipeline.from_pretrained(latent_folder, variant="ema")
    expected = tiny_dit(seed=1, in_channels=4).state_dict()
    for name, value in ema.transformer.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=0, rtol=0)
    assert not torch.equal(main.transformer.final_layer.linear.weight, ema.transformer.final_layer.linear.weight)
    with pytest.raises(ValueError, match=r"variant=fp8.*no such modeling files"):
        DiTPipeline.from_pretrained(latent_folder, variant="fp8")
    # The model class takes the same arguments, from the pipeline folder's subfolder.
    model = DiTModel.from_pretrained(latent_folder, subfolder="transformer", variant="ema", dtype=torch.bfloat16)
    torch.testing.assert_close(model.final_layer.linear.weight, ema.transformer.final_layer.linear.weight.bfloat16())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(device_map="cpu"),
        dict(low_cpu_mem_usage=False),
        dict(low_cpu_mem_usage=True, use_safetensors=True, disable_mmap=True),
        dict(local_files_only=True, force_download=False, revision=None, cache_dir=None, token=None),
    ],
    ids=["device_map", "low_cpu_mem_usage", "safetensors_options", "hub_options"],
)
def test_from_pretrained_loading_options(latent_folder, kwargs):
    pipe = DiTPipeline.from_pretrained(latent_folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if "device_map" in kwargs:
        assert pipe.hf_device_map == "cpu"
    assert type(pipe.transformer) is DiTModel
    expected = sample(latent_pipe(), output_type="pt", guidance_scale=4.0)
    torch.testing.assert_close(sample(pipe, output_type="pt", guidance_scale=4.0), expected, atol=1e-6, rtol=0)


def test_from_pretrained_pickled_weights(tmp_path):
    pipe = latent_pipe()
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.bin").is_file()
    loaded = DiTPipeline.from_pretrained(tmp_path, use_safetensors=False)
    torch.testing.assert_close(sample(loaded), sample(pipe), atol=0, rtol=0)
    with pytest.raises(EnvironmentError, match="safetensors"):
        DiTPipeline.from_pretrained(tmp_path, use_safetensors=True)


def test_from_pretrained_replaces_components_and_config(saved_pipeline):
    scheduler = DDIMScheduler.from_config(ddpm_scheduler().config)
    transformer = tiny_dit(seed=2)
    pipe = DiTPipeline.from_pretrained(
        saved_pipeline, scheduler=scheduler, transformer=transformer, id2label={0: "cat"}, default_guidance_scale=2.0
    )
    assert pipe.scheduler is scheduler and pipe.transformer is transformer
    assert pipe.config.id2label == {0: "cat"} and pipe.get_label_ids("cat") == [0]
    assert pipe.config.default_guidance_scale == 2.0


def test_from_pretrained_checks_quantization_config_like_diffusers(saved_pipeline):
    # No quantization backend is installed here; the argument reaches diffusers' loader, which checks its type.
    with pytest.raises(ValueError, match="must be an instance of `PipelineQuantizationConfig`"):
        DiTPipeline.from_pretrained(saved_pipeline, quantization_config={"load_in_8bit": True})


def test_from_pretrained_custom_pipeline(saved_pipeline):
    # `custom_pipeline` names the pipeline code to run: here the folder's own copy, as diffusers allows.
    pipe = DiTPipeline.from_pretrained(saved_pipeline, custom_pipeline="pipeline_dit", trust_remote_code=True)
    assert type(pipe).__name__ == "DiTPipeline" and not type(pipe).__module__.startswith("dit_hf")
    assert type(pipe.transformer) is DiTModel  # the installed model: model_index.json names the transformer
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(sample(pipe), sample(make_pipe()), atol=0, rtol=0)


# -------------------------------------------------------------------------------------------------------------------
# Saved sampling defaults, and the same loading without dit_hf


def test_saved_sampling_defaults(latent_folder):
    index = json.loads((latent_folder / "model_index.json").read_text())
    assert {key: index[key] for key in SAVED_DEFAULTS} == SAVED_DEFAULTS

    pipe = DiTPipeline.from_pretrained(latent_folder)
    pipe.set_progress_bar_config(disable=True)
    assert {key: pipe.config[key] for key in SAVED_DEFAULTS} == SAVED_DEFAULTS
    by_default = pipe(LABELS, generator=gen(0), output_type="latent").images
    explicit = pipe(LABELS, num_inference_steps=3, guidance_scale=2.0, generator=gen(0), output_type="latent").images
    torch.testing.assert_close(by_default, explicit, atol=0, rtol=0)
    # A pipeline without saved defaults samples 50 steps at guidance 4, and so do explicit values here.
    old_defaults = latent_pipe()(LABELS, generator=gen(0), output_type="latent").images
    assert (by_default - old_defaults).abs().max() > 1e-2
    overridden = pipe(LABELS, num_inference_steps=50, guidance_scale=4.0, generator=gen(0), output_type="latent")
    torch.testing.assert_close(overridden.images, old_defaults, atol=0, rtol=0)
    # A saved guidance of 0 is a value, not "unset".
    zero = DiTPipeline(tiny_dit(), ddpm_scheduler(), default_guidance_scale=0.0)
    zero.set_progress_bar_config(disable=True)
    torch.testing.assert_close(sample(zero), sample(zero, guidance_scale=0.0), atol=0, rtol=0)
    assert (sample(zero) - sample(zero, guidance_scale=4.0)).abs().max() > 1e-2


LOAD_WITHOUT_DIT_HF = """
import json
import torch
from diffusers import DiffusionPipeline

folder = sys.argv[1]
results = {}
for name, kwargs in {
    "dtype": dict(dtype={"transformer": torch.bfloat16, "default": torch.float16}),
    "variant": dict(variant="ema", device_map="cpu", low_cpu_mem_usage=True, use_safetensors=True),
    "plain": {},
}.items():
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    results[name] = {
        "module": type(pipe.transformer).__module__,
        "dtypes": [str(pipe.transformer.dtype), str(pipe.vae.dtype)],
        "device_map": getattr(pipe, "hf_device_map", None),
        "weight": pipe.transformer.final_layer.linear.weight.float().flatten()[:4].tolist(),
        "defaults": [pipe.config.default_num_inference_steps, pipe.config.default_guidance_scale],
    }
images = pipe([3, 7], generator=torch.Generator().manual_seed(0), output_type="latent").images
results["latents"] = images.tolist()
try:
    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, variant="fp8")
except ValueError as err:
    results["wrong_variant"] = str(err)
print(json.dumps(results))
"""


def test_remote_code_takes_the_same_arguments_and_defaults(latent_folder, tmp_path):
    results = run_without_dit_hf(LOAD_WITHOUT_DIT_HF, latent_folder, cwd=tmp_path)
    assert all(not results[name]["module"].startswith("dit_hf") for name in ("dtype", "variant", "plain"))
    assert results["dtype"]["dtypes"] == ["torch.bfloat16", "torch.float16"]
    main = DiTModel.from_pretrained(latent_folder, subfolder="transformer").final_layer.linear.weight
    np.testing.assert_allclose(results["dtype"]["weight"], main.bfloat16().float().flatten()[:4].tolist(), atol=0)
    assert results["variant"]["device_map"] == "cpu"
    ema = tiny_dit(seed=1, in_channels=4).final_layer.linear.weight.flatten()[:4].tolist()
    np.testing.assert_allclose(results["variant"]["weight"], ema, atol=0)
    assert "no such modeling files" in results["wrong_variant"]
    # The saved sampling defaults reach the folder's own copy of the pipeline too.
    assert results["plain"]["defaults"] == [3, 2.0]
    pipe = DiTPipeline.from_pretrained(latent_folder)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(LABELS, generator=gen(0), output_type="latent").images
    np.testing.assert_allclose(results["latents"], expected.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(default_num_inference_steps=0), "num_inference_steps"),
        (dict(default_num_inference_steps=2.5), "num_inference_steps"),
        (dict(default_guidance_scale=-1.0), "guidance_scale"),
    ],
)
def test_bad_sampling_defaults(config, match):
    with pytest.raises(ValueError, match=match):
        DiTPipeline(tiny_dit(), ddpm_scheduler(), **config)


# -------------------------------------------------------------------------------------------------------------------
# Schedulers: every one that takes the model's ε (v, flow) output


def reference_sample(model, scheduler, labels, steps, guidance_scale=4.0, seed=0, learned_variance=False):
    """The sampler of diffusers' scheduler contract written out: start from noise times `init_noise_sigma`, feed the
    model `scale_model_input(x, t)`, step the unscaled x, and give `step` the generator only where it takes one."""
    scheduler.set_timesteps(steps)
    generator = gen(seed)
    channels, size = model.config.in_channels, model.config.sample_size
    x = torch.randn((len(labels), channels, size, size), generator=generator)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    labels = torch.tensor(labels + [model.config.num_classes] * len(labels))
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            out = model(torch.cat([x_in, x_in]), t, labels).sample
            cond, uncond = out[:, :channels].chunk(2)
            prediction = uncond + guidance_scale * (cond - uncond)
            if learned_variance:
                prediction = torch.cat([prediction, out[: len(x), channels:]], dim=1)
            kwargs = {"generator": generator} if takes_generator else {}
            x = scheduler.step(prediction, t, x, **kwargs).prev_sample
    return x


# The schedulers of diffusers' Karras-scheduler test (KarrasDiffusionSchedulers), then the other samplers of
# ε / v models. `STOCHASTIC` draw noise in `step`; `SIGMA_SCALED` start from noise of scale σ_max and scale the model
# input.
KARRAS_SCHEDULERS = [scheduler.name for scheduler in diffusers.schedulers.scheduling_utils.KarrasDiffusionSchedulers]
EPS_SCHEDULERS = KARRAS_SCHEDULERS + [
    "EDMDPMSolverMultistepScheduler",
    "DDIMParallelScheduler",
    "DDPMParallelScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "SASolverScheduler",
    "IPNDMScheduler",
]
STOCHASTIC = {
    "DDPMScheduler",
    "DDPMParallelScheduler",
    "EulerAncestralDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "SASolverScheduler",
}
SIGMA_SCALED = {
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
    "EDMEulerScheduler",
    "EDMDPMSolverMultistepScheduler",
}
# The variants of DPM-Solver multistep; the "sde-" ones draw noise in `step`.
DPM_SOLVER_ALGORITHMS = ["dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"]


def takes_generator_noise(name: str) -> bool:
    """Whether `step` draws noise from the generator (DPMSolverSDE draws from its own seeded Brownian tree)."""
    return name in STOCHASTIC - {"DPMSolverSDEScheduler"} or name == "FlowMatchLCMScheduler"


def make_scheduler(name: str, config: dict, **overrides):
    scheduler_cls = getattr(diffusers, name)
    if name == "PNDMScheduler":
        overrides.setdefault("skip_prk_steps", True)  # the Runge-Kutta warm-up needs more than 3 steps
    if name == "DPMSolverSDEScheduler":
        overrides.setdefault("noise_sampler_seed", 0)  # its `step` takes no generator: seed its Brownian tree
    return scheduler_cls.from_config(config, **overrides)


def assert_scheduler_runs(pipe, model, make, stochastic, learned_variance=False):
    """The pipeline is reproducible, finite, and equals the written-out sampler; from the same starting noise, the
    generator changes the samples exactly when `step` draws noise from it."""
    pipe.scheduler = make()
    first = sample(pipe, guidance_scale=4.0)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(sample(pipe, guidance_scale=4.0), first, atol=0, rtol=0)
    expected = reference_sample(model, make(), LABELS, steps=3, learned_variance=learned_variance)
    torch.testing.assert_close(first, expected, atol=1e-4, rtol=1e-5)

    noise = torch.randn(first.shape, generator=gen(5))
    runs = [
        pipe(LABELS, num_inference_steps=3, latents=noise, generator=gen(seed), output_type="latent")
        for seed in (1, 2)
    ]
    difference = (runs[0].images - runs[1].images).abs().max()
    assert difference > 1e-3 if stochastic else difference == 0


# torchsde (DPMSolverSDE) warns of float rounding at the end of its Brownian interval.
@pytest.mark.filterwarnings("ignore:Should have tb<=t1")
@pytest.mark.parametrize("name", EPS_SCHEDULERS)
def test_every_eps_scheduler_runs(name):
    # As diffusers' scheduler test does: each scheduler built from the pipeline's saved config (here DDPM with
    # learned_range variance, which DDPM itself uses and the others ignore).
    model = tiny_dit()
    pipe = make_pipe(model)
    config = pipe.scheduler.config
    make = lambda: make_scheduler(name, config)  # noqa: E731
    learned = name in ("DDPMScheduler", "DDPMParallelScheduler")
    assert_scheduler_runs(pipe, model, make, takes_generator_noise(name), learned_variance=learned)
    assert (pipe.scheduler.init_noise_sigma > 1) == (name in SIGMA_SCALED)


@pytest.mark.parametrize("algorithm", DPM_SOLVER_ALGORITHMS)
def test_dpm_solver_variants_run(algorithm):
    model = tiny_dit()
    pipe = make_pipe(model)
    # The DPM-Solver (not ++) variants cannot step to σ = 0.
    final = "zero" if algorithm.endswith("++") else "sigma_min"
    overrides = dict(algorithm_type=algorithm, final_sigmas_type=final, variance_type=None)
    config = pipe.scheduler.config
    make = lambda: make_scheduler("DPMSolverMultistepScheduler", config, **overrides)  # noqa: E731
    assert_scheduler_runs(pipe, model, make, stochastic=algorithm.startswith("sde"))


V_SCHEDULERS = [
    name
    for name in EPS_SCHEDULERS
    if "prediction_type" in inspect.signature(getattr(diffusers, name).__init__).parameters
    and not name.startswith("EDM")  # EDM preconditioning: v of the EDM parametrisation, not of the DDPM one
]


# torchsde (DPMSolverSDE) warns of float rounding at the end of its Brownian interval.
@pytest.mark.filterwarnings("ignore:Should have tb<=t1")
@pytest.mark.parametrize("name", V_SCHEDULERS)
def test_every_v_scheduler_runs(name):
    model = tiny_dit()
    make = lambda: make_scheduler(name, ddpm_scheduler().config, prediction_type="v_prediction")  # noqa: E731
    pipe = DiTPipeline(model, make(), objective="ddpm_v")
    pipe.set_progress_bar_config(disable=True)
    learned = name in ("DDPMScheduler", "DDPMParallelScheduler")
    assert_scheduler_runs(pipe, model, make, takes_generator_noise(name), learned_variance=learned)


FLOW_SCHEDULERS = {
    "FlowMatchEulerDiscreteScheduler": {},
    "FlowMatchHeunDiscreteScheduler": {},
    "FlowMatchLCMScheduler": {},
    # Multistep solvers on the flow path (σ-parametrised like the FlowMatch schedulers).
    **{
        name: dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0)
        for name in (
            "DPMSolverMultistepScheduler",
            "DPMSolverSinglestepScheduler",
            "UniPCMultistepScheduler",
            "DEISMultistepScheduler",
            "SASolverScheduler",
        )
    },
}


@pytest.mark.parametrize("name", sorted(FLOW_SCHEDULERS))
def test_every_flow_scheduler_runs(name):
    model = tiny_dit(learn_sigma=False)
    overrides = FLOW_SCHEDULERS[name]
    make = lambda: make_scheduler(name, {"num_train_timesteps": 1000}, **overrides)  # noqa: E731
    pipe = DiTPipeline(model, make(), objective="flow")
    pipe.set_progress_bar_config(disable=True)
    assert_scheduler_runs(pipe, model, make, takes_generator_noise(name))


# Deterministic samplers that start from unit noise and feed the model x itself: diffusers' DiTPipeline samples these
# correctly. (It neither multiplies the first noise by `init_noise_sigma` nor keeps x apart from the scaled model
# input, so its images from the SIGMA_SCALED schedulers differ from the schedulers' own recipe, which `DiTPipeline`
# follows and `reference_sample` writes out; the STOCHASTIC ones draw from the global RNG there.)
DIFFUSERS_COMPARABLE = [
    name
    for name in EPS_SCHEDULERS
    if name not in STOCHASTIC | SIGMA_SCALED and name not in ("DDPMScheduler", "DDPMParallelScheduler")
]


@pytest.fixture(scope="module")
def exported():
    """A latent DiT with 1000 classes (diffusers' DiTPipeline hard-codes the null class 1000), its export to
    `DiTTransformer2DModel`, and a tiny VAE."""
    model = tiny_dit(in_channels=4, num_classes=1000, timestep_freq_shift=1)
    return model, dit_to_diffusers(model), tiny_vae()


@pytest.mark.parametrize("name", DIFFUSERS_COMPARABLE)
def test_images_match_diffusers_dit_pipeline(name, exported):
    model, transformer, vae = exported
    assert isinstance(transformer, DiTTransformer2DModel)
    config = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False).config
    theirs = DiffusersDiTPipeline(transformer=transformer, vae=vae, scheduler=make_scheduler(name, config))
    ours = DiTPipeline(transformer=model, vae=vae, scheduler=make_scheduler(name, config))
    for pipe in (theirs, ours):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=[1, 999], num_inference_steps=3, guidance_scale=4.0, output_type="pt")
    expected = theirs(generator=gen(0), **kwargs).images
    images = ours(generator=gen(0), **kwargs).images
    assert expected.std() > 1e-3
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)


# -------------------------------------------------------------------------------------------------------------------
# Layerwise casting, group offloading and CPU offloading


def rounded_copy(model: DiTModel, storage_dtype: torch.dtype) -> DiTModel:
    """`model` with the weights that layerwise casting stores (every linear, conv and embedding layer except the
    patch embedding, see `_skip_layerwise_casting_patterns`) rounded through `storage_dtype`."""
    copy = tiny_dit()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, module in copy.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)) and "x_embedder" not in name:
                for param in module.parameters(recurse=False):
                    param.copy_(param.to(storage_dtype).float())
    return copy


@pytest.mark.parametrize("storage_dtype", [torch.float16, torch.float8_e4m3fn])
def test_layerwise_casting(storage_dtype):
    model = tiny_dit()
    footprint = model.get_memory_footprint()
    x = torch.randn(2, 3, 8, 8, generator=gen(1))
    t, y = torch.tensor([10, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        full = model(x, t, y).sample
    model.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=torch.float32)
    assert model.blocks[0].attn.qkv.weight.dtype == storage_dtype
    assert model.x_embedder.proj.weight.dtype == torch.float32 and model.dtype == torch.float32
    with torch.no_grad():
        cast = model(x, t, y).sample
        expected = rounded_copy(tiny_dit(), storage_dtype)(x, t, y).sample
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, expected, atol=1e-5, rtol=1e-5)
    assert (cast - full).abs().max() > 0  # the weights really are stored at the lower precision
    # Storage of the cast layers: 2 (float16) or 1 (float8) bytes per weight instead of 4.
    ratio = model.get_memory_footprint() / footprint
    assert ratio < (0.55 if storage_dtype == torch.float16 else 0.3)

    pipe = make_pipe(model)
    rounded = make_pipe(rounded_copy(tiny_dit(), storage_dtype))
    torch.testing.assert_close(
        sample(pipe, guidance_scale=4.0), sample(rounded, guidance_scale=4.0), atol=1e-3, rtol=1e-5
    )


OFFLOADS = {
    "group_block": lambda pipe: pipe.transformer.enable_group_offload(
        torch.device("cpu"), torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    ),
    "group_leaf": lambda pipe: pipe.transformer.enable_group_offload(
        torch.device("cpu"), torch.device("cpu"), offload_type="leaf_level"
    ),
    "pipeline_group": lambda pipe: pipe.enable_group_offload(
        torch.device("cpu"), torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    ),
    "model_cpu_offload": lambda pipe: pipe.enable_model_cpu_offload(device="cpu"),
}


@pytest.mark.parametrize("storage_dtype", [None, torch.float16])
@pytest.mark.parametrize("offload", sorted(OFFLOADS))
def test_offloading_on_cpu(offload, storage_dtype):
    # diffusers' own tests of these need an accelerator; offloading from the CPU to the CPU runs every hook.
    # (`enable_sequential_cpu_offload` cannot: accelerate fails there for diffusers' own DiTPipeline too.) Each also
    # combined with layerwise casting, as diffusers tests group offloading.
    pipe = latent_pipe()
    if storage_dtype is not None:
        pipe.transformer.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=torch.float32)
    expected = sample(pipe, output_type="pt", guidance_scale=4.0)
    OFFLOADS[offload](pipe)
    torch.testing.assert_close(sample(pipe, output_type="pt", guidance_scale=4.0), expected, atol=1e-6, rtol=0)
    if offload == "model_cpu_offload":
        assert hasattr(pipe.transformer, "_hf_hook") and pipe._offload_device.type == "cpu"
    else:
        assert hasattr(pipe.transformer, "_diffusers_hook")
    if storage_dtype is not None:
        assert pipe.transformer.blocks[0].mlp.fc1.weight.dtype == storage_dtype


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="offloads to a CUDA device; on a CPU accelerate's sequential offload fails for diffusers' pipelines too",
)
@pytest.mark.parametrize("offload", ["model", "sequential", "group_stream"])
def test_offloading_to_gpu(offload):
    pipe = latent_pipe()
    expected = sample(pipe.to("cuda"), output_type="pt", guidance_scale=4.0).cpu()
    pipe = latent_pipe()
    if offload == "model":
        pipe.enable_model_cpu_offload()
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    else:
        pipe.enable_group_offload(torch.device("cuda"), offload_type="leaf_level", use_stream=True)
    images = sample(pipe, output_type="pt", guidance_scale=4.0).cpu()
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)
    if offload != "sequential":  # (sequential offloading leaves meta tensors in the module)
        assert pipe.transformer.device.type == "cpu"  # the weights wait on the CPU between uses


# -------------------------------------------------------------------------------------------------------------------
# Batched labels and a quiet import


def test_nested_and_tensor_labels_are_flattened(pipe):
    expected = sample(pipe, labels=[1, 2])
    for labels in ([[1], [2]], [(1,), [2]], torch.tensor([[1], [2]]), np.array([1, 2])):
        torch.testing.assert_close(sample(pipe, labels=labels), expected, atol=0, rtol=0)
    assert pipe.get_label_ids([["tabby"], ["goldfish", 7]]) == [0, 2, 7]


def test_import_prints_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [sys.executable, "-c", "import dit_hf"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "", f"`import dit_hf` printed:\n{proc.stdout}{proc.stderr}"
