"""train_dit.py end to end on tiny settings: outputs, exact resume, atomic checkpoints, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from dit_hf import DiTModel, DiTPipeline
from dit_hf.training import list_checkpoints, make_adamw, resolve_resume_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_dit  # noqa: E402

# A DiT of 2 blocks × 32 wide on 64 digits: a step takes milliseconds.
TINY_ARGS = [
    "--hidden_size", "32", "--depth", "2", "--num_heads", "2",
    "--train_batch_size", "8", "--max_train_samples", "64",
    "--num_inference_steps", "2", "--num_samples_per_class", "1",
    "--logging_steps", "1", "--report_to", "none", "--validation_steps", "0",
]  # fmt: skip


def run(output_dir, *extra):
    return train_dit.main(train_dit.parse_args([*TINY_ARGS, "--output_dir", str(output_dir), *extra]))


def losses(output_dir) -> dict[int, float]:
    """Step -> loss from metrics.jsonl; a resumed run re-logs steps, and the last entry wins."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f) if "loss" in row}


def final_weights(output_dir):
    return load_file(os.path.join(output_dir, "transformer", "diffusion_pytorch_model.safetensors"))


def test_default_run_writes_pipeline_samples_logs_and_checkpoints(tmp_path):
    summary = run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2", "--ema_decay", "0.9,0.99")
    assert summary["steps"] == 4
    for name in ("model_index.json", "pipeline_dit.py", "samples.png", "metrics.jsonl", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 4]
    ckpt = tmp_path / "checkpoints" / "checkpoint-4"
    # Checkpoint folders load with from_pretrained: the model and one folder per EMA rate.
    raw = DiTModel.from_pretrained(ckpt / "transformer")
    ema_first = DiTModel.from_pretrained(ckpt / "ema_0.9")
    DiTModel.from_pretrained(ckpt / "ema_0.99")
    # The exported pipeline carries the first EMA rate; the other rate is an extra folder.
    pipe = DiTPipeline.from_pretrained(tmp_path)
    for name, param in pipe.transformer.state_dict().items():
        assert torch.equal(param, ema_first.state_dict()[name])
    assert not torch.equal(
        raw.state_dict()["final_layer.linear.weight"], ema_first.state_dict()["final_layer.linear.weight"]
    )
    DiTModel.from_pretrained(tmp_path / "transformer_ema_0.99")
    assert pipe.get_label_ids(["7"]) == [7]
    assert set(losses(tmp_path)) == {1, 2, 3, 4}
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "lr", "img_per_s", "grad_norm", "skipped_steps"} <= set(row)
    assert any(key.startswith("loss_q") for key in row)
    assert 0.0 <= summary["digits_accuracy"] <= 1.0


def test_resume_is_exact(tmp_path):
    # The warm-up spans the interruption, so the restored scheduler state matters; a schedule that does not
    # depend on the total lets a 3-step run stand for the first half of a 6-step one.
    common = ["--checkpointing_steps", "3", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "5"]
    run(tmp_path / "straight", "--max_train_steps", "6", *common)
    run(tmp_path / "split", "--max_train_steps", "3", *common)
    run(tmp_path / "split", "--max_train_steps", "6", "--resume_from_checkpoint", "latest", *common)
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    raw_a = load_file(tmp_path / "straight/checkpoints/checkpoint-6/transformer/diffusion_pytorch_model.safetensors")
    raw_b = load_file(tmp_path / "split/checkpoints/checkpoint-6/transformer/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)


def test_resume_after_sigkill_is_exact(tmp_path):
    """Kill the trainer (SIGKILL) right after its first checkpoint, resume, and match an uninterrupted run."""
    # Same arguments for all three runs; a cosine schedule over the whole run.
    common = ["--checkpointing_steps", "2", "--max_train_steps", "30", "--lr_scheduler", "cosine"]
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "HF_HUB_OFFLINE": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train_dit.py"), *TINY_ARGS, *common, "--output_dir", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "checkpoint-2").is_dir():
        assert proc.poll() is None and time.time() < deadline, "trainer died or never checkpointed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints").is_dir() and not (killed / "model_index.json").exists()
    run(killed, *common, "--resume_from_checkpoint", "latest")
    run(tmp_path / "straight", *common)
    assert losses(killed) == losses(tmp_path / "straight")
    a, b = final_weights(killed), final_weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import accelerate

    real_save_state = accelerate.Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        if output_dir.endswith("checkpoint-4"):
            os.makedirs(output_dir, exist_ok=True)
            open(os.path.join(output_dir, "optimizer.bin"), "wb").write(b"half written")
            raise OSError("disk full")
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2")
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-2"]  # the partial folder is gone
    assert resolve_resume_path("latest", str(tmp_path / "checkpoints")).endswith("checkpoint-2")
    monkeypatch.setattr(accelerate.Accelerator, "save_state", real_save_state)
    summary = run(
        tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"
    )
    assert summary["steps"] == 4


def test_checkpoints_total_limit(tmp_path):
    run(tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2")
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [5, 6]


@pytest.mark.parametrize(
    "extra, error, match",
    [
        (["--mixed_precision", "fp16"], ValueError, "fp16"),
        (["--resolution", "9"], ValueError, "resolution"),
        (["--num_classes", "5"], ValueError, "num_classes"),
        (["--image_column", "pixels"], ValueError, "pixels"),
        (["--label_column", "digit"], ValueError, "digit"),
        (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], FileNotFoundError, "checkpoint"),
        (["--ema_decay", "1.5"], ValueError, "ema_decay"),
        (["--train_batch_size", "4096"], ValueError, "train_batch_size"),
    ],
)
def test_bad_input_gives_clear_error(tmp_path, extra, error, match):
    if "fp16" in extra and torch.cuda.is_available():
        pytest.skip("fp16 is valid on a CUDA machine")
    with pytest.raises(error, match=match):
        run(tmp_path, "--max_train_steps", "1", *extra)


def test_output_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="--output_dir"):
        run(blocker / "out", "--max_train_steps", "1")


def test_resume_with_another_model_is_refused(tmp_path):
    run(tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2")
    with pytest.raises(ValueError, match="hidden_size"):
        train_dit.main(
            train_dit.parse_args(
                [*TINY_ARGS, "--hidden_size", "64", "--output_dir", str(tmp_path), "--max_train_steps", "3",
                 "--resume_from_checkpoint", "latest"]
            )
        )  # fmt: skip


def test_image_folder_with_a_corrupt_file_and_unconditional_data(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    for cls in ("cats", "dogs"):
        (data / cls).mkdir(parents=True)
        for i in range(8):
            color = (40 * i, 100 if cls == "cats" else 200, 30)
            Image.new("RGB", (20, 16), color).save(data / cls / f"{i}.png")
    (data / "dogs" / "broken.png").write_bytes(b"not a png at all")
    summary = run(
        tmp_path / "out", "--train_data_dir", str(data), "--resolution", "8", "--model", "DiT-S/2",
        "--max_train_steps", "2", "--max_bad_image_fraction", "0.2", "--ema_decay", "0.9",
    )  # fmt: skip
    assert summary["steps"] == 2
    pipe = DiTPipeline.from_pretrained(tmp_path / "out")
    assert pipe.transformer.config.num_classes == 2 and pipe.transformer.config.in_channels == 3
    assert pipe.get_label_ids(["dogs"]) == [1]
    with pytest.raises(ValueError, match="max_bad_image_fraction"):
        run(tmp_path / "out2", "--train_data_dir", str(data), "--resolution", "8", "--max_train_steps", "1",
            "--max_bad_image_fraction", "0.01")  # fmt: skip
    # Without a label column the model is unconditional.
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(8):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(flat / f"{i}.png")
    run(tmp_path / "uncond", "--train_data_dir", str(flat), "--resolution", "8", "--model", "DiT-S/2",
        "--max_train_steps", "1", "--ema_decay", "0.9")  # fmt: skip
    assert DiTPipeline.from_pretrained(tmp_path / "uncond").transformer.config.num_classes == 0


def test_empty_image_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no image files"):
        run(tmp_path / "out", "--train_data_dir", str(tmp_path / "empty"), "--max_train_steps", "1")
    with pytest.raises(FileNotFoundError, match="--train_data_dir"):
        run(tmp_path / "out", "--train_data_dir", str(tmp_path / "missing"), "--max_train_steps", "1")


def tiny_vae(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), scaling_factor=0.5,
    )  # fmt: skip
    vae.save_pretrained(path)
    return path


def test_latent_space_training_with_a_latent_cache(tmp_path):
    vae = tiny_vae(tmp_path / "vae")
    cache = tmp_path / "cache"
    common = ["--vae", str(vae), "--resolution", "16", "--image_channels", "3", "--max_train_samples", "16",
              "--max_train_steps", "2", "--cache_latents", str(cache)]  # fmt: skip
    run(tmp_path / "a", *common)
    info = cache / "cache_info.json"
    assert json.loads(info.read_text())["num_samples"] == 16
    stamp = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    run(tmp_path / "b", *common)  # a complete, matching cache is reused as it is
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamp
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    pipe = DiTPipeline.from_pretrained(tmp_path / "a")
    assert pipe.vae is not None and pipe.transformer.config.sample_size == 8  # 16 px / VAE factor 2
    image = pipe(class_labels=[3], num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)
    # Another resolution would need other latents: the cache refuses instead of being silently reused.
    with pytest.raises(ValueError, match="resolution"):
        run(tmp_path / "c", *[a if a != "16" else "8" for a in common])
    # Without the cache, the VAE encodes every batch; the posterior noise comes from the same per-step draws.
    run(tmp_path / "d", *[a for a in common if a not in ("--cache_latents", str(cache))])
    assert set(losses(tmp_path / "d")) == {1, 2}


def test_resolution_must_fit_vae_and_patch(tmp_path):
    vae = tiny_vae(tmp_path / "vae")
    with pytest.raises(ValueError, match="resolution"):
        run(
            tmp_path / "out", "--vae", str(vae), "--resolution", "6", "--image_channels", "3", "--max_train_steps", "1"
        )


def test_wandb_without_credentials_logs_offline(tmp_path, monkeypatch, caplog):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    args = [a for a in TINY_ARGS if a not in ("--report_to", "none")]
    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        train_dit.main(train_dit.parse_args([*args, "--output_dir", str(out), "--max_train_steps", "2"]))
    # Offline through wandb.init's arguments: the caller's environment is left as it was.
    assert "WANDB_MODE" not in os.environ and "WANDB_DIR" not in os.environ
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert "wandb sync" in caplog.text


def test_tensorboard_logs_scalars_and_validation_grids(tmp_path):
    pytest.importorskip("tensorboard")
    args = [a for a in TINY_ARGS if a not in ("--report_to", "none", "--validation_steps", "0")]
    out = tmp_path / "run"
    train_dit.main(train_dit.parse_args([*args, "--report_to", "tensorboard", "--validation_steps", "2",
                                         "--output_dir", str(out), "--max_train_steps", "4"]))  # fmt: skip
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"loss", "lr", "img_per_s", "grad_norm"} <= set(events.Tags()["scalars"])
    assert {"samples", "final_samples"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path):
    """--compile (regional torch.compile of each DiT block): same losses as eager within float tolerance."""
    run(tmp_path / "eager", "--max_train_steps", "3")
    run(tmp_path / "compiled", "--max_train_steps", "3", "--compile")
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys()
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4)


def test_make_adamw_is_fused_on_cpu_and_matches_the_reference_update():
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 2, 4)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-8)

    def train(build):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = build(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        return optimizer, params

    fused, ours = train(lambda params: make_adamw(params, "cpu", **hyper))
    assert fused.param_groups[0]["fused"] is True
    _, reference = train(lambda params: torch.optim.AdamW(params, foreach=False, **hyper))
    for a, b, p0 in zip(ours, reference, start):
        assert not torch.equal(a, p0)  # the parameters moved
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # A device type without a fused kernel gets PyTorch's default implementation.
    assert make_adamw([torch.nn.Parameter(torch.zeros(2))], "meta", lr=1e-3).param_groups[0]["fused"] in (None, False)


def test_cache_images_is_the_digits_default_and_trains_identically(tmp_path):
    assert train_dit.parse_args([]).cache_images is True
    assert train_dit.parse_args(["--dataset_name", "user/data", "--recipe", "paper"]).cache_images is False
    assert train_dit.parse_args(["--vae", "some/vae", "--cache_latents", str(tmp_path)]).cache_images is False
    with pytest.raises(ValueError, match="--cache_images and --cache_latents .* drop --cache_images"):
        train_dit.parse_args(["--vae", "some/vae", "--cache_latents", str(tmp_path), "--cache_images"])

    run(tmp_path / "cached", "--max_train_steps", "3")
    run(tmp_path / "decoded", "--max_train_steps", "3", "--no-cache_images")
    assert losses(tmp_path / "cached") == losses(tmp_path / "decoded")
    assert len(losses(tmp_path / "cached")) == 3
