"""train_dit.py with the modern options: objectives, block options, DDT head, in-training FID."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from test_train import run

from dit_hf import DiTPipeline
from dit_hf.objective import make_objective
from dit_hf.training import StepRandomness


def test_flow_objective_with_lightning_options_and_ddt_head(tmp_path):
    summary = run(
        tmp_path,
        "--max_train_steps", "3", "--objective", "flow", "--timestep_sampling", "logit_normal",
        "--time_shift", "auto", "--qk_norm", "--norm_type", "rms", "--mlp_type", "swiglu",
        "--pos_embed_type", "rope2d", "--head_depth", "1", "--head_hidden_size", "48", "--head_num_heads", "2",
    )  # fmt: skip
    assert summary["steps"] == 3
    pipe = DiTPipeline.from_pretrained(tmp_path)
    assert pipe.config.objective == "flow"
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    # 8×8×1 digits: shift = sqrt(64 / 4096) = 0.125, used for training and saved for sampling.
    assert pipe.scheduler.config.shift == pytest.approx(0.125)
    config = pipe.transformer.config
    assert (config.qk_norm, config.norm_type, config.mlp_type, config.pos_embed_type) == (
        True,
        "rms",
        "swiglu",
        "rope2d",
    )
    assert (config.head_depth, config.head_hidden_size, config.learn_sigma) == (1, 48, False)
    images = pipe([0, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1)  # grayscale digits


def test_v_prediction_objective_saves_a_matching_scheduler(tmp_path):
    run(tmp_path, "--max_train_steps", "2", "--objective", "ddpm_v")
    pipe = DiTPipeline.from_pretrained(tmp_path)
    assert pipe.config.objective == "ddpm_v"
    assert isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.variance_type == "learned_range"


def test_recipe_preset_keeps_its_options_unless_overridden(tmp_path):
    import train_dit

    tiny = ["--model", "LightningDiT-B/2", "--hidden_size", "32", "--depth", "2", "--num_heads", "2"]
    args = train_dit.parse_args([*tiny, "--objective", "flow", "--output_dir", str(tmp_path)])
    model = train_dit.build_model(args, num_classes=10, in_channels=1, sample_size=8)
    assert (model.config.norm_type, model.config.mlp_type, model.config.pos_embed_type) == ("rms", "swiglu", "rope2d")
    args = train_dit.parse_args([*tiny, "--mlp_type", "gelu", "--output_dir", str(tmp_path)])
    model = train_dit.build_model(args, num_classes=10, in_channels=1, sample_size=8)
    assert model.config.mlp_type == "gelu" and model.config.norm_type == "rms"


def test_step_randomness_draws_timesteps_from_the_objective():
    objective = make_objective("flow", timestep_sampling="logit_normal", logit_mean=1.5, logit_std=0.5)

    def draw():
        randomness = StepRandomness(0, 1000, 4096, (1, 2, 2), "cpu", sample_timesteps=objective.sample_timesteps)
        return randomness.rows(0, 0, 4096)["timesteps"]

    t = draw()
    assert t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1000
    logits = torch.logit(t / 1000)
    assert logits.mean().item() == pytest.approx(1.5, abs=0.05) and logits.std().item() == pytest.approx(0.5, abs=0.05)
    # Same step, same draws; the uniform default is still integers in [0, T).
    assert torch.equal(draw(), t)
    plain = StepRandomness(0, 1000, 8, (1, 2, 2), torch.device("cpu")).rows(0, 0, 8)["timesteps"]
    assert plain.dtype == torch.long


class PoolFeatures(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


def test_eval_steps_log_fid_and_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the reference cache goes here
    network = tmp_path / "pool.pt"
    torch.jit.script(PoolFeatures()).save(str(network))
    out = tmp_path / "run"
    summary = run(out, "--max_train_steps", "3", "--eval_steps", "2", "--eval_samples", "20",
                  "--eval_batch_size", "8", "--inception", str(network))  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval/fid" in row]
    assert [row["step"] for row in evals] == [2, 3]  # every 2 steps and at the end
    for row in evals:
        assert row["eval/fid"] > 0 and 0 <= row["eval/digits_accuracy"] <= 1
        assert 0 <= row["eval/precision"] <= 1 and 0 <= row["eval/recall"] <= 1
        # The class probe of the real digits (on the stand-in network's features) scores the samples by class.
        assert 0 <= row["eval/class_accuracy"] <= 1 and row["eval/probe_held_out_accuracy"] > 0.3
    assert summary["eval"]["step"] == 3 and summary["eval"]["fid"] == evals[-1]["eval/fid"]
    cached = sorted(p.name for p in (tmp_path / "hf" / "dit_hf" / "fid").glob("*.npz"))
    assert len(cached) == 2 and sum(name.startswith("probe-") for name in cached) == 1  # statistics and probe
    # The plots were redrawn with the evaluations: FID over steps is there, readable without wandb.
    assert {"loss.png", "lr.png", "eval_fid.png"} <= {p.name for p in (out / "plots").iterdir()}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--objective", "flow", "--learn_sigma"], "flow learns no variance"),
        (["--time_shift", "0"], "--time_shift must be a positive number or 'auto'"),
        (["--eval_samples", "0"], "--eval_samples must be a positive integer"),
    ],
)
def test_bad_recipe_arguments(tmp_path, extra, message):
    import train_dit

    with pytest.raises(ValueError, match=message):
        train_dit.parse_args(["--output_dir", str(tmp_path), *extra])


def tiny_dinov2(path) -> str:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(image_size=8, patch_size=2, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32)  # fmt: skip
    Dinov2Model(config).save_pretrained(path)
    return str(path)


def test_repa_trains_a_projector_and_resumes(tmp_path):
    encoder = tiny_dinov2(tmp_path / "encoder")
    out = tmp_path / "run"
    repa = ["--repa_encoder", encoder, "--repa_depth", "1", "--repa_projector_dim", "24", "--checkpointing_steps", "2"]
    run(out, "--max_train_steps", "2", *repa)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(-1.0 <= row["repa_loss"] <= 1.0 for row in rows)
    projector_dir = out / "checkpoints" / "checkpoint-2" / "repa_projector"
    from dit_hf.repa import REPAProjector

    saved = REPAProjector.from_pretrained(projector_dir)
    assert saved.config.encoder_dim == 16 and saved.config.projector_dim == 24
    # Resuming restores the projector too: two more steps from checkpoint-2 equal an uninterrupted 4-step run.
    run(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *repa)
    straight = tmp_path / "straight"
    run(straight, "--max_train_steps", "4", *repa)
    a = REPAProjector.from_pretrained(out / "checkpoints" / "checkpoint-4" / "repa_projector").state_dict()
    b = REPAProjector.from_pretrained(straight / "checkpoints" / "checkpoint-4" / "repa_projector").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["mlp.0.weight"], saved.state_dict()["mlp.0.weight"])  # it trained


def test_repa_targets_are_cached_with_the_latents(tmp_path):
    from safetensors.torch import load_file
    from test_train import tiny_vae

    from dit_hf.latents import BatchedCachedLatents
    from dit_hf.repa import REPAEncoder

    encoder_path = tiny_dinov2(tmp_path / "encoder")
    vae, cache = tiny_vae(tmp_path / "vae"), tmp_path / "cache"
    summary = run(tmp_path / "out", "--vae", str(vae), "--resolution", "16", "--image_channels", "3",
                  "--max_train_samples", "16", "--max_train_steps", "2", "--cache_latents", str(cache),
                  "--repa_encoder", encoder_path, "--repa_depth", "1", "--repa_projector_dim", "8")  # fmt: skip
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all("repa_loss" in row for row in rows if "loss" in row)
    info = json.loads((cache / "cache_info.json").read_text())
    assert info["feature_shape"] == [16, 4, 4] and encoder_path in info["fingerprint"]["features"]
    shard = load_file(next(cache.glob("shard-*.safetensors")))
    assert shard["features"].dtype == torch.float16
    # The dataset hands out the flipped image's features together with its flipped latents.
    data = BatchedCachedLatents(str(cache), random_flip=True)
    torch.manual_seed(0)
    batch = data.__getitems__(list(range(16)))
    plain = data.gather(list(range(16)), torch.zeros(16, dtype=torch.long))
    flipped = data.gather(list(range(16)), torch.ones(16, dtype=torch.long))
    for k in range(16):
        flip = torch.allclose(batch["moments"][k], flipped["moments"][k])
        assert torch.equal(batch["repa_features"][k], (flipped if flip else plain)["repa_features"][k])
    assert 0 < sum(int(torch.equal(batch["repa_features"][k], flipped["repa_features"][k])) for k in range(16)) < 16
    assert shard["features"][0].shape == REPAEncoder(encoder_path).feature_map(torch.zeros(1, 3, 16, 16))[0].shape


def test_a_recipe_preset_trains_without_an_explicit_patch_size(tmp_path):
    # The trainer used to look the patch size up among the paper's sizes only (KeyError for LightningDiT-*).
    tiny = ["--model", "LightningDiT-B/2", "--hidden_size", "32", "--depth", "2", "--num_heads", "2"]
    summary = run(tmp_path, *tiny, "--objective", "flow", "--max_train_steps", "1")
    assert summary["steps"] == 1
    assert DiTPipeline.from_pretrained(tmp_path).transformer.config.patch_size == 2


def test_repa_classifier_encoder_is_fitted_once_and_its_targets_cached(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import dit_hf.repa as repa

    out = tmp_path / "run"
    repa_args = ["--repa_encoder", "classifier", "--repa_depth", "1", "--repa_projector_dim", "8"]
    fitted, batches = [], []
    fit = repa.fit_classifier_encoder
    monkeypatch.setattr(repa, "fit_classifier_encoder", lambda *a, **k: fitted.append(1) or fit(*a, **k))
    loss = repa.REPALoss.loss
    monkeypatch.setattr(repa.REPALoss, "loss", lambda self, batch, x0: batches.append(batch) or loss(self, batch, x0))
    run(out, "--max_train_steps", "2", "--checkpointing_steps", "2", *repa_args)
    assert fitted == [1] and (out / repa.CLASSIFIER_FILE).is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(-1.0 <= row["repa_loss"] <= 1.0 for row in rows if "loss" in row)
    # Every batch carried the cached targets: the saved classifier's features of exactly those images.
    from dit_hf.evaluation import ImageClassifier

    encoder = repa.ClassifierEncoder(ImageClassifier.load(str(out / repa.CLASSIFIER_FILE)))
    for batch in batches:
        expected = encoder.feature_map(batch["pixel_values"]).half()
        assert batch["repa_features"].dtype == torch.float16 and batch["repa_features"].shape == (8, 128, 2, 2)
        torch.testing.assert_close(batch["repa_features"], expected, atol=2e-3, rtol=2e-3)
    # A resumed run loads the saved classifier instead of fitting another.
    saved = load_file(str(out / repa.CLASSIFIER_FILE))
    run(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *repa_args)
    assert fitted == [1]
    assert all(torch.equal(saved[k], v) for k, v in load_file(str(out / repa.CLASSIFIER_FILE)).items())


def test_repa_classifier_encoder_needs_cached_pixels(tmp_path):
    from dit_hf.config import resolve_config

    base = ["--repa_encoder", "classifier", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="--cache_images"):
        resolve_config([*base, "--no-cache_images"])
    with pytest.raises(ValueError, match="no --vae"):
        resolve_config([*base, "--vae", "stabilityai/sd-vae-ft-ema", "--resolution", "64"])
