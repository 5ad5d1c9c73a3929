"""DiTPipeline: sampling, classifier-free guidance, schedulers, outputs, labels, VAE, saving and remote code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ID2LABEL, ddpm_scheduler, gen, make_pipe, tiny_dit
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from dit_hf import DiTModel, DiTPipeline
from dit_hf.objective import make_objective, make_scheduler

REPO = Path(__file__).resolve().parents[1]
LABELS = [3, 7]


def sample(pipe, labels=LABELS, seed=0, steps=2, output_type="latent", **kwargs):
    return pipe(labels, num_inference_steps=steps, generator=gen(seed), output_type=output_type, **kwargs).images


def manual_sample(
    model, labels, seed=0, steps=2, guidance_scale=1.0, guidance_channels=None, scheduler=None, interval=(0.0, 1.0)
):
    """The sampler written out: separate conditional and unconditional forwards, guidance on the first k channels."""
    scheduler = scheduler or ddpm_scheduler()
    scheduler.set_timesteps(steps)
    generator = gen(seed)
    channels, size = model.config.in_channels, model.config.sample_size
    x = torch.randn((len(labels), channels, size, size), generator=generator, dtype=model.dtype)
    cond_labels = torch.tensor(labels)
    null_labels = torch.full_like(cond_labels, model.config.num_classes)
    learned_variance = isinstance(scheduler, DDPMScheduler)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(x, t, cond_labels).sample
            eps, variance = out[:, :channels], out[:, channels:]
            if guidance_scale != 1.0 and interval[0] <= t / 1000 <= interval[1]:
                k = guidance_channels or channels
                eps_u = model(x, t, null_labels).sample[:, :channels]
                eps = torch.cat([eps_u[:, :k] + guidance_scale * (eps[:, :k] - eps_u[:, :k]), eps[:, k:]], dim=1)
            model_output = torch.cat([eps, variance], dim=1) if learned_variance else eps
            x = scheduler.step(model_output, t, x, generator=generator).prev_sample
    return x


# -------------------------------------------------------------------------------------------------------------------
# Sampling and classifier-free guidance


def test_expected_slice(pipe):
    images = sample(pipe, guidance_scale=4.0, output_type="np")
    assert images.shape == (2, 8, 8, 3)
    # Many pixels of a random tiny model are clamped to 0 or 1; these top-left pixels include unclamped values.
    expected_0 = np.array([[0.0, 0.0, 0.868456], [0.0, 0.290473, 0.0], [0.0, 1.0, 0.61501]])
    expected_1 = np.array([[0.661657, 1.0, 0.758271], [1.0, 0.0, 0.803957], [0.639663, 1.0, 0.855425]])
    np.testing.assert_allclose(images[0, 0, :3], expected_0, atol=1e-4)
    np.testing.assert_allclose(images[1, 0, :3], expected_1, atol=1e-4)


def test_guidance_one_is_the_conditional_model(pipe):
    latents = sample(pipe, guidance_scale=1.0)
    expected = manual_sample(pipe.transformer, LABELS)
    torch.testing.assert_close(latents, expected, atol=1e-6, rtol=0)
    guided = sample(pipe, guidance_scale=4.0)
    assert (guided - latents).abs().max() > 1e-2


def test_guidance_is_one_batched_forward(pipe, monkeypatch):
    calls = []
    forward = pipe.transformer.forward

    def recording_forward(hidden_states, timestep, class_labels=None, **kwargs):
        calls.append((hidden_states.shape[0], class_labels.clone()))
        return forward(hidden_states, timestep, class_labels, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", recording_forward)
    sample(pipe, labels=[1, 2, 5], guidance_scale=3.0)
    assert len(calls) == 2  # one forward per step
    for batch, labels in calls:
        assert batch == 6
        assert labels.tolist() == [1, 2, 5, 10, 10, 10]  # null class = config.num_classes

    calls.clear()
    sample(pipe, labels=[1, 2, 5], guidance_scale=1.0)
    assert [(batch, labels.tolist()) for batch, labels in calls] == [(3, [1, 2, 5])] * 2


def test_guidance_interval_guides_only_inside_it(pipe, monkeypatch):
    # 4 DDPM steps at t = 750, 500, 250, 0 (noise levels 0.75 .. 0): guide only the middle two.
    interval = (0.2, 0.6)
    latents = sample(pipe, steps=4, guidance_scale=4.0, guidance_interval=interval)
    expected = manual_sample(pipe.transformer, LABELS, steps=4, guidance_scale=4.0, interval=interval)
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)
    everywhere = sample(pipe, steps=4, guidance_scale=4.0)
    assert (latents - everywhere).abs().max() > 1e-3

    batches = []
    forward = pipe.transformer.forward

    def recording_forward(x, t, labels=None, **kwargs):
        batches.append(x.shape[0])
        return forward(x, t, labels, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", recording_forward)
    sample(pipe, steps=4, guidance_scale=4.0, guidance_interval=interval)
    assert batches == [2, 4, 4, 2]  # the unconditional half runs only inside the interval
    with pytest.raises(ValueError, match="guidance_interval"):
        sample(pipe, guidance_interval=(0.7, 0.2))


def test_guided_noise_matches_separate_forwards():
    # float64 so that the batched and the separate forwards agree far below the tolerance at t = 999, where the
    # DDIM step divides by sqrt(alpha_bar) ~ 0.006.
    model = tiny_dit().double()
    config = ddpm_scheduler().config
    pipe = make_pipe(model, DDIMScheduler.from_config(config, timestep_spacing="trailing"))
    latents = sample(pipe, steps=1, guidance_scale=4.0)
    scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing")
    expected = manual_sample(model, LABELS, steps=1, guidance_scale=4.0, scheduler=scheduler)
    assert scheduler.timesteps.tolist() == [999]
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)
    unguided = manual_sample(model, LABELS, steps=1, scheduler=scheduler)
    assert (latents - unguided).abs().max() > 1.0


def test_guidance_channels_guides_only_the_first_channels():
    model = tiny_dit(in_channels=4)
    pipe = make_pipe(model)
    latents = sample(pipe, guidance_scale=4.0, guidance_channels=3)
    expected = manual_sample(model, LABELS, guidance_scale=4.0, guidance_channels=3)
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)
    all_channels = sample(pipe, guidance_scale=4.0)
    torch.testing.assert_close(all_channels, manual_sample(model, LABELS, guidance_scale=4.0), atol=1e-5, rtol=0)
    assert (all_channels - latents).abs().max() > 1e-2
    with pytest.raises(ValueError, match="guidance_channels"):
        sample(pipe, guidance_channels=5)


# -------------------------------------------------------------------------------------------------------------------
# Schedulers


def test_scheduler_swap(pipe):
    results = {}
    for scheduler_cls in (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler):
        pipe.scheduler = scheduler_cls.from_config(ddpm_scheduler().config)
        first = sample(pipe, output_type="np")
        assert np.isfinite(first).all()
        np.testing.assert_array_equal(first, sample(pipe, output_type="np"))
        results[scheduler_cls.__name__] = sample(pipe)
    names = sorted(results)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (results[a] - results[b]).abs().max() > 1e-2, f"{a} and {b} gave the same samples"


def test_dpm_solver_on_4_channel_latents():
    # DPM-Solver with the DDPM config's variance_type="learned_range" would keep only 3 channels of the noise.
    pipe = make_pipe(tiny_dit(in_channels=4))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="variance_type=None"):
        sample(pipe)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, variance_type=None)
    latents = sample(pipe)
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()


def test_learned_variance_scheduler_needs_a_variance_prediction():
    pipe = make_pipe(tiny_dit(learn_sigma=False))
    with pytest.raises(ValueError, match="fixed_small"):
        sample(pipe)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type="fixed_small")
    assert torch.isfinite(sample(pipe)).all()


@pytest.mark.parametrize("family", ["ddpm", "ddim"])
def test_v_prediction_pipeline_matches_manual_loop(family):
    # DDPM takes [v, variance] and uses the learned variance; DDIM takes v alone.
    model = tiny_dit()
    scheduler = make_scheduler(make_objective("ddpm_v"), family)
    assert scheduler.config.prediction_type == "v_prediction"
    pipe = DiTPipeline(transformer=model, scheduler=scheduler, objective="ddpm_v")
    pipe.set_progress_bar_config(disable=True)
    latents = sample(pipe, steps=3, guidance_scale=4.0)
    manual_scheduler = make_scheduler(make_objective("ddpm_v"), family)
    expected = manual_sample(model, LABELS, steps=3, guidance_scale=4.0, scheduler=manual_scheduler)
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)
    # Read as ε, the same outputs give other samples.
    as_eps = make_pipe(model, make_scheduler(make_objective(), family))
    assert (sample(as_eps, steps=3, guidance_scale=4.0) - latents).abs().max() > 1e-2


# -------------------------------------------------------------------------------------------------------------------
# Generators and latents


def test_generator_list_reproduces_single_runs(pipe):
    labels = [1, 4, 9]
    batch = pipe(labels, num_inference_steps=2, generator=[gen(10 + i) for i in range(3)], output_type="latent")
    for i, label in enumerate(labels):
        single = sample(pipe, labels=[label], seed=10 + i)
        # Batch size changes the float rounding of the forward; the last DDPM step amplifies it (latents ~ 20).
        torch.testing.assert_close(batch.images[i : i + 1], single, atol=1e-5, rtol=1e-5)
    assert (batch.images[0] - batch.images[1]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="generators"):
        pipe(labels, num_inference_steps=2, generator=[gen(0), gen(1)])


def test_explicit_latents(pipe):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # deterministic steps: latents decide all
    noise = torch.randn((2, 3, 8, 8), generator=gen(5))
    first = pipe(LABELS, num_inference_steps=2, latents=noise.clone(), output_type="latent").images
    second = pipe(LABELS, num_inference_steps=2, latents=noise.clone(), output_type="latent").images
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    torch.testing.assert_close(first, sample(pipe, seed=5), atol=0, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        pipe(LABELS, num_inference_steps=2, latents=torch.zeros(1, 3, 8, 8))


# -------------------------------------------------------------------------------------------------------------------
# Outputs


def test_output_types(pipe):
    latents = sample(pipe)
    pt = sample(pipe, output_type="pt")
    arrays = sample(pipe, output_type="np")
    pils = sample(pipe, output_type="pil")
    assert isinstance(latents, torch.Tensor) and latents.shape == (2, 3, 8, 8)
    assert latents.abs().max() > 1  # not decoded or clamped
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, 8, 8)
    torch.testing.assert_close(pt, (latents / 2 + 0.5).clamp(0, 1))
    assert isinstance(arrays, np.ndarray) and arrays.shape == (2, 8, 8, 3) and arrays.dtype == np.float32
    assert 0 <= arrays.min() and arrays.max() <= 1
    np.testing.assert_array_equal(arrays, pt.permute(0, 2, 3, 1).numpy())
    assert len(pils) == 2 and all(isinstance(im, PIL.Image.Image) for im in pils)
    assert pils[0].mode == "RGB" and pils[0].size == (8, 8)
    np.testing.assert_array_equal(np.asarray(pils[1]), (arrays[1] * 255).round().astype(np.uint8))
    (as_tuple,) = pipe(LABELS, num_inference_steps=2, generator=gen(0), output_type="latent", return_dict=False)
    torch.testing.assert_close(as_tuple, latents, atol=0, rtol=0)


def test_one_channel_model_gives_grayscale_images():
    pipe = make_pipe(tiny_dit(in_channels=1))
    images = sample(pipe, output_type="pil")
    arrays = sample(pipe, output_type="np")
    assert [im.mode for im in images] == ["L", "L"] and images[0].size == (8, 8)
    np.testing.assert_array_equal(np.asarray(images[0]), (arrays[0, ..., 0] * 255).round().astype(np.uint8))


def test_bad_output_type(pipe):
    with pytest.raises(ValueError, match="output_type"):
        sample(pipe, output_type="tensor")


# -------------------------------------------------------------------------------------------------------------------
# Labels


def test_label_names(pipe):
    assert pipe.get_label_ids(["tabby", "tabby cat", "golden retriever", 7]) == [0, 0, 1, 7]
    assert pipe.get_label_ids("goldfish") == [2]
    torch.testing.assert_close(
        sample(pipe, labels=["tabby cat", "goldfish"]), sample(pipe, labels=[0, 2]), atol=0, rtol=0
    )
    with pytest.raises(ValueError, match="Unknown class name 'cat'") as err:
        pipe.get_label_ids(["cat"])
    for name in ("tabby", "tabby cat", "golden retriever", "goldfish"):
        assert repr(name) in str(err.value)
    with pytest.raises(ValueError, match="Unknown class name"):
        make_pipe().get_label_ids("tabby")  # no id2label at all


def test_class_ids_must_be_whole_numbers(pipe):
    assert pipe.get_label_ids([np.int64(3), torch.tensor(4), 5.0]) == [3, 4, 5]
    for bad, match in [(1.5, "1.5 is not a whole number"), (float("nan"), "nan is not a whole number"),
                       (True, "True is a boolean"), (None, "None is not a number")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"Class id {match}"):
            pipe.get_label_ids([0, bad])


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0])
def test_guidance_scale_must_be_finite(pipe, scale):
    with pytest.raises(ValueError, match=r"`guidance_scale` must be a finite number >= 0"):
        sample(pipe, guidance_scale=scale)


@pytest.mark.parametrize("class_id", [10, -1])
def test_label_id_out_of_range(pipe, class_id):
    with pytest.raises(ValueError, match=r"0\.\.9"):
        sample(pipe, labels=[1, class_id])


def test_conditional_model_needs_labels(pipe):
    with pytest.raises(ValueError, match="class_labels"):
        pipe(num_inference_steps=2, num_images=2)


def test_unconditional_model():
    pipe = make_pipe(tiny_dit(num_classes=0))
    images = pipe(num_images=3, num_inference_steps=2, generator=gen(0), output_type="latent").images
    assert images.shape == (3, 3, 8, 8) and torch.isfinite(images).all()
    assert (images[0] - images[1]).abs().max() > 1e-2
    # No unconditional branch to guide with: the guidance scale has no effect.
    unguided = pipe(num_images=3, num_inference_steps=2, generator=gen(0), guidance_scale=1.0, output_type="latent")
    torch.testing.assert_close(unguided.images, images, atol=0, rtol=0)
    with pytest.raises(ValueError, match="unconditional"):
        pipe([1], num_inference_steps=2)


def test_guidance_needs_label_dropout():
    pipe = make_pipe(tiny_dit(class_dropout_prob=0.0))
    with pytest.raises(ValueError, match="class_dropout_prob"):
        sample(pipe, guidance_scale=4.0)
    assert torch.isfinite(sample(pipe, guidance_scale=1.0)).all()


# -------------------------------------------------------------------------------------------------------------------
# VAE and train/eval mode


def tiny_vae() -> AutoencoderKL:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=16,
            scaling_factor=0.5,
        ).eval()


def test_vae_decoding():
    vae = tiny_vae()
    pipe = make_pipe(tiny_dit(in_channels=4), vae=vae)
    latents = sample(pipe)
    images = sample(pipe, output_type="pt")
    with torch.no_grad():
        expected = vae.decode(latents / 0.5).sample
    torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)
    downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
    assert downsampling == 2 and latents.shape == (2, 4, 8, 8) and images.shape == (2, 3, 16, 16)
    assert sample(pipe, output_type="pil")[0].size == (16, 16)


def test_samples_in_eval_mode_and_restores_the_mode():
    # With a high dropout rate, a train-mode forward would almost surely replace some labels by the null class.
    model = tiny_dit(class_dropout_prob=0.9)
    pipe = make_pipe(model)
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    model.train()
    from_train = sample(pipe, labels=[1, 2, 3, 4])
    assert model.training and modes == [False, False]
    model.eval()
    from_eval = sample(pipe, labels=[1, 2, 3, 4])
    assert not model.training
    torch.testing.assert_close(from_train, from_eval, atol=0, rtol=0)


# -------------------------------------------------------------------------------------------------------------------
# Saving, loading and the Hub custom code


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "pipeline_dit.py").is_file() and (tmp_path / "transformer" / "modeling_dit.py").is_file()
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_dit", "DiTPipeline"]
    assert index["transformer"] == ["modeling_dit", "DiTModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]

    loaded = DiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer, DiTModel) and loaded.vae is None
    assert loaded.config.id2label == ID2LABEL and loaded.get_label_ids("tabby") == [0]
    torch.testing.assert_close(sample(loaded, guidance_scale=4.0), sample(pipe, guidance_scale=4.0), atol=0, rtol=0)

    ddim = DiTPipeline.from_pretrained(tmp_path, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    assert isinstance(ddim.scheduler, DDIMScheduler)


REMOTE_SCRIPT = """
import json, sys
sys.modules["dit_hf"] = None  # `import dit_hf` now raises ImportError, as in a Python without dit_hf
import torch
from diffusers import DiffusionPipeline

results = []
for folder in sys.argv[1:]:
    try:
        DiffusionPipeline.from_pretrained(folder)
        refusal = None
    except Exception as err:
        refusal = f"{type(err).__name__}: {err}"
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    modules = [type(pipe).__module__, type(pipe.transformer).__module__]
    assert not any(module.startswith("dit_hf") for module in modules), modules
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(class_labels=["goldfish", 7], num_inference_steps=2, guidance_scale=4.0)
    images = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="np").images
    latents = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").images
    results.append({
        "refusal": refusal, "modules": modules, "objective": pipe.config.objective,
        "scheduler": type(pipe.scheduler).__name__, "np": images.tolist(), "latent": latents.tolist(),
    })
print(json.dumps(results))
"""


def test_loads_as_remote_code_without_dit_hf(saved_pipeline, tmp_path):
    # A flow-matching pipeline too: its objective must reach __init__ through diffusers' own loader.
    flow_folder = tmp_path / "tiny-dit-flow"
    flow = DiTPipeline(
        tiny_dit(learn_sigma=False), FlowMatchEulerDiscreteScheduler(), id2label=ID2LABEL, objective="flow"
    )
    flow.save_pretrained(flow_folder)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(saved_pipeline), str(flow_folder)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(r["objective"], r["scheduler"]) for r in results] == [
        ("ddpm_eps", "DDPMScheduler"),
        ("flow", "FlowMatchEulerDiscreteScheduler"),
    ]
    for folder, result in zip((saved_pipeline, flow_folder), results):
        assert result["refusal"] is not None and "trust_remote_code" in result["refusal"]
        assert all(module.endswith(("pipeline_dit", "modeling_dit")) for module in result["modules"])

        pipe = DiTPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        labels = ["goldfish", 7]
        expected_np = sample(pipe, labels, guidance_scale=4.0, output_type="np")
        np.testing.assert_allclose(result["np"], expected_np, atol=1e-6)
        np.testing.assert_allclose(result["latent"], sample(pipe, labels, guidance_scale=4.0).numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["pipeline_dit.py", "scheduling_dit.py", "modeling_dit.py"])
def test_hub_code_copies_are_identical(name, saved_pipeline):
    source = REPO / "src" / "dit_hf" / name
    copy = REPO / "pipelines" / name
    refresh = "cp src/dit_hf/pipeline_dit.py src/dit_hf/scheduling_dit.py src/dit_hf/modeling_dit.py pipelines/"
    assert copy.is_file(), f"{copy} is missing: create it with `{refresh}`."
    assert copy.read_bytes() == source.read_bytes(), (
        f"pipelines/{name} differs from src/dit_hf/{name}: run `{refresh}`."
    )
    saved = saved_pipeline / "transformer" / name if name == "modeling_dit.py" else saved_pipeline / name
    assert saved.read_bytes() == source.read_bytes()
