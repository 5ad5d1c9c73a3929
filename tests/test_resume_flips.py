"""Exact resume with random flips (images decoded, cached in RAM or as VAE latents) and one metrics row per step."""

import json

import pytest
import torch
from test_train import final_weights, losses, run, tiny_vae


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def straight_and_split(tmp_path, *common, steps: int = 6, split: int = 3):
    """An uninterrupted run and one stopped at `split` and resumed; both with `common` arguments."""
    common = ["--checkpointing_steps", str(split), *common]
    run(tmp_path / "straight", "--max_train_steps", str(steps), *common)
    run(tmp_path / "split", "--max_train_steps", str(split), *common)
    run(tmp_path / "split", "--max_train_steps", str(steps), "--resume_from_checkpoint", "latest", *common)
    return tmp_path / "straight", tmp_path / "split"


def test_resume_with_flips_is_exact_with_images_in_ram(tmp_path):
    # 64 digits in batches of 8: the split falls inside the first epoch, the run crosses into the second.
    straight, split = straight_and_split(tmp_path, "--random_flip", "--cache_images", steps=10, split=5)
    assert losses(straight) == losses(split)
    assert same_weights(final_weights(straight), final_weights(split))


def test_resume_with_flips_is_exact_with_decoded_images(tmp_path):
    straight, split = straight_and_split(tmp_path, "--random_flip", "--no-cache_images")
    assert losses(straight) == losses(split)
    assert same_weights(final_weights(straight), final_weights(split))


def test_flips_do_not_depend_on_the_cache_building_run_and_resume_exactly(tmp_path):
    vae = tiny_vae(tmp_path / "vae")
    cache = tmp_path / "cache"
    common = ["--vae", str(vae), "--resolution", "16", "--image_channels", "3", "--max_train_samples", "16",
              "--train_batch_size", "4", "--cache_latents", str(cache), "--random_flip"]  # fmt: skip
    run(tmp_path / "builds", "--max_train_steps", "6", *common)  # encodes the cache, then trains
    assert (cache / "cache_info.json").is_file()
    straight, split = straight_and_split(tmp_path, *common)  # both reuse it
    assert losses(tmp_path / "builds") == losses(straight) == losses(split)
    built = final_weights(tmp_path / "builds")
    assert same_weights(built, final_weights(straight)) and same_weights(built, final_weights(split))


def test_metrics_hold_each_step_once_after_a_resume(tmp_path):
    # Checkpoint at 2, logged up to 3 when the run is cut short; the resumed run logs 3 again.
    run(tmp_path, "--max_train_steps", "3", "--checkpointing_steps", "2")
    (tmp_path / "checkpoints" / "checkpoint-3").rename(tmp_path / "checkpoints" / "stale")
    run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow  # DataLoader workers start for each of the three runs
def test_resume_with_flips_is_exact_with_dataloader_workers(tmp_path):
    straight, split = straight_and_split(
        tmp_path, "--random_flip", "--no-cache_images", "--dataloader_num_workers", "2"
    )
    assert losses(straight) == losses(split)
    assert same_weights(final_weights(straight), final_weights(split))
