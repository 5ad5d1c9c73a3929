"""Any diffusers autoencoder as the latent space: the adapter, latent statistics, and each family end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderRAE
from safetensors import safe_open

from dit_hf import DiTPipeline
from dit_hf.autoencoders import (
    channel_statistics,
    encode_moments,
    image_channels,
    latent_shape,
    latents_from_moments,
    load_autoencoder,
    make_latent_norm,
    spatial_factor,
)
from dit_hf.sample_eval import assign_labels, image_seed, sample_for_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_dit  # noqa: E402


def tiny_kl() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), scaling_factor=0.5,
    )  # fmt: skip


def tiny_dc() -> AutoencoderDC:
    torch.manual_seed(0)
    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
        decoder_block_types="ResBlock", encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()), decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.7,
    )  # fmt: skip


def tiny_rae(**kwargs) -> AutoencoderRAE:
    """16 px in, a 4×4 grid of 64-channel DINOv2 tokens, 16 px out."""
    torch.manual_seed(0)
    return AutoencoderRAE(
        encoder_type="dinov2", encoder_hidden_size=64, encoder_patch_size=4, encoder_num_hidden_layers=1,
        decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=64, patch_size=4, encoder_input_size=16, image_size=16, **kwargs,
    ).eval()  # fmt: skip


FAMILIES = {"kl": tiny_kl, "dc": tiny_dc, "rae": tiny_rae}


def images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_encode_moments_per_family():
    x = images()
    kl, dc, rae = tiny_kl(), tiny_dc(), tiny_rae()
    with torch.no_grad():
        posterior = kl.encode(x).latent_dist
        torch.testing.assert_close(encode_moments(kl, x), torch.stack([posterior.mean, posterior.logvar], 1))
        torch.testing.assert_close(encode_moments(dc, x), dc.encode(x).latent.unsqueeze(1))
        # An RAE takes [0, 1] images (it applies the ImageNet mean/std itself).
        torch.testing.assert_close(encode_moments(rae, x), rae.encode((x + 1) / 2).latent.unsqueeze(1))
        assert not torch.allclose(encode_moments(rae, x), rae.encode(x).latent.unsqueeze(1))
    assert [latent_shape(vae, 16, 3) for vae in (kl, dc, rae)] == [(4, 8, 8), (4, 8, 8), (64, 4, 4)]
    assert [spatial_factor(vae) for vae in (kl, dc, rae)] == [2, 2, 4]
    assert [image_channels(vae) for vae in (kl, dc, rae)] == [3, 3, 3]
    with pytest.raises(ValueError, match="--resolution 16"):
        latent_shape(rae, 32, 3)  # an RAE decodes to its own image_size whatever it was given


def test_latents_from_moments():
    moments = torch.randn(3, 2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    drawn = latents_from_moments(moments, noise=noise)
    torch.testing.assert_close(drawn, moments[:, 0] + torch.exp(0.5 * moments[:, 1]) * noise)
    torch.testing.assert_close(latents_from_moments(moments[:, :1], noise=noise), moments[:, 0])
    with pytest.raises(ValueError, match="K = 1 or 2"):
        latents_from_moments(moments[0])


def test_channel_statistics():
    generator = torch.Generator().manual_seed(0)
    # (N, flip, K=1, C, h, w) with channel c around c with spread c + 1.
    spread = torch.arange(1.0, 4.0).reshape(1, 1, 1, 3, 1, 1)
    latents = torch.randn(50, 2, 1, 3, 4, 4, generator=generator) * spread + spread - 1
    stats = channel_statistics(latents, chunk=7)
    flat = latents[:, :, 0].transpose(0, 2).reshape(3, -1)
    torch.testing.assert_close(torch.tensor(stats["mean"], dtype=torch.float64), flat.mean(1).double())
    torch.testing.assert_close(torch.tensor(stats["std"], dtype=torch.float64), flat.std(1, correction=0).double())
    # A Gaussian posterior: the statistics of its draws, without drawing (law of total variance).
    logvar = torch.full_like(latents, 2 * np.log(0.5))
    gaussian = channel_statistics(torch.cat([latents, logvar], dim=2))
    draws = latents[:, :, 0] + 0.5 * torch.randn(200, *latents[:, :, 0].shape, generator=generator)
    draws = draws.transpose(0, 3).reshape(3, -1)
    torch.testing.assert_close(torch.tensor(gaussian["mean"], dtype=torch.float64), flat.mean(1).double())
    drawn_std = draws.std(1).double()
    torch.testing.assert_close(torch.tensor(gaussian["std"], dtype=torch.float64), drawn_std, rtol=1e-2, atol=0)


def test_latent_norms():
    kl, rae = tiny_kl(), tiny_rae()
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(make_latent_norm("scale", kl, 4)(z), z * 0.5)
    torch.testing.assert_close(make_latent_norm("none", kl, 4)(z), z)
    stats = {"mean": [0.0, 1.0, 2.0, 3.0], "std": [1.0, 2.0, 4.0, 8.0]}
    channel = make_latent_norm("channel", kl, 4, stats)
    expected = (z - torch.tensor(stats["mean"]).reshape(4, 1, 1)) / torch.tensor(stats["std"]).reshape(4, 1, 1)
    torch.testing.assert_close(channel(z), expected)
    assert channel.pipeline_config() == {"latents_mean": stats["mean"], "latents_std": stats["std"]}
    assert make_latent_norm("scale", kl, 4).pipeline_config() == {}
    # An RAE scales (and maybe normalises) inside encode: `scale` leaves its latents alone.
    w = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(make_latent_norm("scale", rae, 64)(w), w)
    with pytest.raises(ValueError, match="twice"):
        make_latent_norm("channel", tiny_rae(latents_mean=[0.0] * 64, latents_std=[1.0] * 64), 64, stats)
    with pytest.raises(ValueError, match="--cache_latents"):
        make_latent_norm("channel", kl, 4)
    with pytest.raises(ValueError, match="latents have 4"):
        make_latent_norm("channel", kl, 4, {"mean": [0.0], "std": [1.0]})


def test_pipeline_undoes_the_latent_statistics_and_each_family_range():
    from conftest import ddpm_scheduler, make_pipe, tiny_dit

    def pipe_with(vae, **stats):
        return DiTPipeline(tiny_dit(in_channels=4), ddpm_scheduler(), vae=vae, **stats)

    kl, rae = tiny_kl(), tiny_rae()
    mean, std = [0.5, -1.0, 0.0, 2.0], [2.0, 1.0, 0.5, 3.0]
    pipe = pipe_with(kl, latents_mean=mean, latents_std=std)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = latents * torch.tensor(std).reshape(4, 1, 1) + torch.tensor(mean).reshape(4, 1, 1)
        torch.testing.assert_close(pipe.decode(latents), (kl.decode(raw).sample / 2 + 0.5).clamp(0, 1))
        # An RAE decodes to [0, 1] and undoes its own scaling: the pipeline adds nothing.
        rae_pipe = make_pipe(tiny_dit(in_channels=64, sample_size=4), vae=rae)
        z = torch.randn(1, 64, 4, 4)
        torch.testing.assert_close(rae_pipe.decode(z), rae.decode(z).sample.clamp(0, 1))
    with pytest.raises(ValueError, match="both"):
        pipe_with(kl, latents_mean=mean)
    with pytest.raises(ValueError, match="> 0"):
        pipe_with(kl, latents_mean=mean, latents_std=[1.0, 0.0, 1.0, 1.0])


def test_load_autoencoder_reads_the_class_from_the_config(tmp_path):
    tiny_dc().save_pretrained(tmp_path / "dc")
    tiny_rae().save_pretrained(tmp_path / "rae")
    assert type(load_autoencoder(str(tmp_path / "dc"))).__name__ == "AutoencoderDC"
    rae = load_autoencoder(str(tmp_path / "rae"))
    assert type(rae).__name__ == "AutoencoderRAE" and not rae.training
    assert not any(p.requires_grad for p in rae.parameters())
    with pytest.raises(FileNotFoundError, match="--vae"):
        load_autoencoder(str(tmp_path / "missing"))
    (tmp_path / "sched").mkdir()
    (tmp_path / "sched" / "config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    with pytest.raises(ValueError, match="not a diffusers autoencoder"):
        load_autoencoder(str(tmp_path / "sched"))


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--latent_norm", "none"], "also pass --vae"),
        (["--vae", "some/vae", "--latent_norm", "channel"], "--cache_latents"),
    ],
)
def test_latent_norm_arguments(extra, match):
    with pytest.raises(ValueError, match=match):
        train_dit.parse_args(extra)


# ---- each family end to end: trainer -> cache -> resume -> pipeline -> save -> load without dit_hf -------------

TINY_ARGS = [
    "--hidden_size", "32", "--depth", "2", "--num_heads", "2", "--train_batch_size", "8",
    "--max_train_samples", "16", "--num_inference_steps", "2", "--num_samples_per_class", "1",
    "--logging_steps", "1", "--report_to", "none", "--validation_steps", "0", "--resolution", "16",
    "--image_channels", "3", "--objective", "flow", "--checkpointing_steps", "1",
]  # fmt: skip
# (family, --latent_norm, --patch_size)
END_TO_END = [("kl", "none", "2"), ("dc", "channel", "2"), ("rae", "channel", "1")]


def run(output_dir, *extra):
    return train_dit.main(train_dit.parse_args([*TINY_ARGS, "--output_dir", str(output_dir), *extra]))


def losses(output_dir) -> dict[int, float]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f) if "loss" in row}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each family trained for 2 steps from a fresh cache, and for 1 + 1 steps resumed from its checkpoint."""
    root = tmp_path_factory.mktemp("families")
    runs = {}
    for family, norm, patch in END_TO_END:
        vae = root / f"{family}-vae"
        FAMILIES[family]().save_pretrained(vae)
        common = ["--vae", str(vae), "--cache_latents", str(root / f"{family}-cache"), "--latent_norm", norm]
        common += ["--patch_size", patch]
        run(root / f"{family}-straight", *common, "--max_train_steps", "2")
        run(root / f"{family}-split", *common, "--max_train_steps", "1")
        run(root / f"{family}-split", *common, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
        runs[family] = {"vae": vae, "cache": root / f"{family}-cache", "out": root / f"{family}-straight"}
        runs[family]["split"] = root / f"{family}-split"
    return runs


@pytest.mark.parametrize("family", [f for f, _, _ in END_TO_END])
def test_trainer_cache_and_resume(trained, family):
    run_dirs = trained[family]
    assert losses(run_dirs["out"]) == losses(run_dirs["split"]) and set(losses(run_dirs["out"])) == {1, 2}
    info = json.loads((run_dirs["cache"] / "cache_info.json").read_text())
    names = ["mean", "logvar"] if family == "kl" else ["latents"]
    assert info["latent_tensors"] == names
    with safe_open(run_dirs["cache"] / info["shards"][0], framework="pt") as f:
        assert sorted(f.keys()) == sorted(["index", "labels", *names, *("flip_" + n for n in names)])
        # The flipped image's latents are stored, not the flipped latents.
        assert not torch.equal(f.get_tensor(names[0]), f.get_tensor("flip_" + names[0]).flip(-1))
    pipe = DiTPipeline.from_pretrained(run_dirs["out"])
    assert type(pipe.vae).__name__ == {"kl": "AutoencoderKL", "dc": "AutoencoderDC", "rae": "AutoencoderRAE"}[family]
    if family == "kl":  # --latent_norm none: the latents as they are
        assert pipe.config.latents_mean == [0.0] * 4 and pipe.config.latents_std == [1.0] * 4
    else:  # channel: the statistics stored with the cache travel with the pipeline
        stats = json.loads((run_dirs["cache"] / "latent_stats.json").read_text())["stats"]
        assert pipe.config.latents_mean == pytest.approx(stats["mean"], rel=1e-6)
        assert pipe.config.latents_std == pytest.approx(stats["std"], rel=1e-6)
        assert min(stats["std"]) > 0 and len(stats["mean"]) == pipe.transformer.config.in_channels


def test_sample_eval_decodes_through_the_autoencoder(trained, tmp_path):
    # An in-memory pipeline keeps its objective and latent statistics when sample-eval copies it.
    pipe = DiTPipeline.from_pretrained(trained["rae"]["out"])
    pipe.set_progress_bar_config(disable=True)
    sample_for_eval(pipe, tmp_path / "eval", 2, batch_size=2, num_inference_steps=2, guidance_scale=2.0)
    label = assign_labels(2, 10, "uniform", seed=0)[1]
    generator = torch.Generator().manual_seed(image_seed(0, 1))
    image = pipe([label], num_inference_steps=2, guidance_scale=2.0, generator=generator, output_type="np").images[0]
    with PIL.Image.open(tmp_path / "eval" / "images" / "000001.png") as png:
        np.testing.assert_array_equal(np.asarray(png), (image * 255).round().astype(np.uint8))
        assert png.size == (16, 16)


REMOTE_SCRIPT = """
import json, sys
sys.modules["dit_hf"] = None  # as in a Python without dit_hf
import torch
from diffusers import DiffusionPipeline

results = []
for folder in sys.argv[1:]:
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([3, 5], num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    results.append({"modules": [type(pipe).__module__, type(pipe.vae).__module__], "np": images.tolist()})
print(json.dumps(results))
"""


@pytest.mark.slow  # ~15 s: a fresh Python imports diffusers and transformers
def test_saved_folders_load_in_plain_diffusers(trained, tmp_path):
    folders = [str(trained[family]["out"]) for family, _, _ in END_TO_END]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, *folders], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for folder, result in zip(folders, results):
        assert result["modules"][0].endswith("pipeline_dit") and result["modules"][1].startswith("diffusers.")
        pipe = DiTPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        expected = pipe(
            [3, 5], num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images  # fmt: skip
        np.testing.assert_allclose(result["np"], expected, atol=1e-5)
        assert expected.shape == (2, 16, 16, 3) and expected.std() > 0


def test_digits_rae_stage_one(tmp_path):
    from sklearn.model_selection import train_test_split

    from dit_hf.cli import main
    from dit_hf.rae import _digits_rgb

    # A few steps of each stage: the mechanics, not the quality (bench/rae_digits.py measures that).
    summary = main(["train-rae", "--output", str(tmp_path / "rae"), "--max_steps", "3", "--encoder_steps", "3"])
    assert 0 < summary["reconstruction_mse"] and summary["max_steps"] == 3
    rae = load_autoencoder(str(tmp_path / "rae"))
    assert type(rae).__name__ == "AutoencoderRAE" and rae.config.noise_tau == 0.3
    assert latent_shape(rae, 8, 3) == (64, 4, 4)
    # The RAE normalises its latents itself, with the statistics of the training split's tokens.
    images, labels = _digits_rgb()
    train_idx, _ = train_test_split(range(len(labels)), test_size=0.2, random_state=0, stratify=labels.numpy())
    with torch.no_grad():
        z = encode_moments(rae, images[train_idx] * 2 - 1)[:, 0].transpose(0, 1).reshape(64, -1)
    torch.testing.assert_close(z.mean(1), torch.zeros(64), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(1), torch.ones(64), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="twice"):
        make_latent_norm("channel", rae, 64, {"mean": [0.0] * 64, "std": [1.0] * 64})
    with pytest.raises(SystemExit):
        main(["train-rae", "--output", str(tmp_path / "bad"), "--max_steps", "0"])
