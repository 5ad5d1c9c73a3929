"""Hostile and unlucky inputs to the trainer: crafted pickles in checkpoints, secrets, odd data sets."""

import errno
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train import losses, run

from dit_hf.training import PICKLE_SUFFIXES, check_checkpoint_files


class PlantedCode:
    """Unpickling this creates `marker`: proof that loading a file ran code chosen by whoever wrote it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: str, marker: str, fmt: str):
    if fmt == "torch":
        torch.save({"state": PlantedCode(marker)}, path)
    else:  # a bare pickle, as torch's legacy format reads it
        with open(path, "wb") as f:
            pickle.dump(PlantedCode(marker), f, protocol=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run with its checkpoint at step 2 (copied by each test that alters it)."""
    out = tmp_path_factory.mktemp("trained")
    run(out, "--max_train_steps", "2", "--checkpointing_steps", "2", "--ema_decay", "0.9,0.99")
    return out


def checkpoint_files(checkpoint) -> list[str]:
    found = [os.path.join(root, name) for root, _, files in os.walk(checkpoint) for name in files]
    return sorted(os.path.relpath(path, checkpoint) for path in found)


def test_checkpoints_hold_only_safetensors_json_and_weights_only_states(trained):
    checkpoint = trained / "checkpoints" / "checkpoint-2"
    files = checkpoint_files(checkpoint)
    pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    # accelerate's own states, each read with weights_only=True; the EMA is no longer a pickle.
    assert pickles == ["optimizer.bin", "random_states_0.pkl", "scheduler.bin"]
    others = set(files) - set(pickles)
    assert all(name.endswith((".safetensors", ".json")) for name in others), others
    assert {"ema_state.json", "ema_0.9/diffusion_pytorch_model.safetensors", "ema_0.99/config.json"} <= others
    check_checkpoint_files(str(checkpoint))  # nothing to refuse in a checkpoint the trainer wrote


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_a_crafted_pickle_in_a_checkpoint_never_runs(trained, tmp_path, name, fmt):
    """Each pickle a checkpoint holds (and the EMA pickle older versions wrote), replaced by one that runs code."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    marker = str(tmp_path / "code-ran")
    target = out / "checkpoints" / "checkpoint-2" / name
    plant(str(target), marker, fmt)
    with pytest.raises(ValueError, match=f"Checkpoint file {target}") as info:
        run(out, "--max_train_steps", "3", "--ema_decay", "0.9,0.99", "--resume_from_checkpoint", "latest")
    assert not os.path.exists(marker), "unpickling a checkpoint file ran code"
    # The reason, without torch's advice to load with weights_only=False.
    assert "weights_only=False" not in str(info.value).replace("would load with weights_only=False", "")
    assert not os.path.exists(out / "checkpoints" / "checkpoint-3")  # refused before any training


def test_corrupt_state_file_is_named_without_a_manifest(trained, tmp_path):
    """A checkpoint of an older dit-hf (no manifest) still has every state file read safely, by name, first."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "checkpoints" / "checkpoint-2" / "manifest.json").unlink()
    target = out / "checkpoints" / "checkpoint-2" / "optimizer.bin"
    target.write_bytes(target.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=f"Checkpoint file {target} cannot be read safely"):
        run(out, "--max_train_steps", "3", "--ema_decay", "0.9,0.99", "--resume_from_checkpoint", "latest")


def test_resume_restores_the_ema_from_safetensors(trained, tmp_path):
    """The EMA continues exactly: resuming at step 2 ends like running 3 steps straight."""
    out = tmp_path / "split"
    shutil.copytree(trained, out)
    run(out, "--max_train_steps", "3", "--ema_decay", "0.9,0.99", "--resume_from_checkpoint", "latest")
    run(tmp_path / "straight", "--max_train_steps", "3", "--checkpointing_steps", "2", "--ema_decay", "0.9,0.99")
    assert losses(out) == losses(tmp_path / "straight")
    for decay in ("0.9", "0.99"):
        folder = os.path.join("checkpoints", "checkpoint-3", f"ema_{decay}", "diffusion_pytorch_model.safetensors")
        a, b = load_file(out / folder), load_file(tmp_path / "straight" / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sample_grids_run_in_bounded_batches(tmp_path, monkeypatch):
    """The final grid holds every class (10 digits here) but no forward sees more than --eval_batch_size images."""
    from dit_hf import DiTModel

    sampling_batches = []
    forward = DiTModel.forward

    def recording_forward(self, hidden_states, *args, **kwargs):
        if not torch.is_grad_enabled():
            sampling_batches.append(hidden_states.shape[0])
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(DiTModel, "forward", recording_forward)
    summary = run(tmp_path, "--max_train_steps", "1", "--eval_batch_size", "4", "--ema_decay", "0.9")
    assert 0.0 <= summary["digits_accuracy"] <= 1.0  # judged on a grid of all 10 classes
    assert sampling_batches and max(sampling_batches) == 8  # 4 images and their unconditional copies


@pytest.mark.parametrize("scale", ["nan", "inf"])
def test_trainer_refuses_a_non_finite_guidance_scale_up_front(tmp_path, scale):
    import train_dit

    with pytest.raises(ValueError, match=f"`guidance_scale` must be a finite number >= 0, got {scale}"):
        train_dit.parse_args(["--output_dir", str(tmp_path), "--guidance_scale", scale])


def failing_writes(monkeypatch, module, name: str, where: str, error: Exception):
    """Make `module.name` (a save function taking (obj, path, ...)) fail for paths containing `where`."""
    real = getattr(module, name)

    def save(obj, path, *args, **kwargs):
        if where in str(path):
            raise error
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(module, name, save)


@pytest.mark.parametrize(
    "error, cause",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
        # How torch.save's C++ stream reports a full disk.
        (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0 basic_ios::clear"), "basic"),
    ],
)
def test_a_full_disk_while_checkpointing_is_reported_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, error, cause
):
    from dit_hf.manifest import verify_manifest
    from dit_hf.training import WriteFailedError, list_checkpoints, resolve_resume_path

    failing_writes(monkeypatch, torch, "save", ".tmp-checkpoint-4", error)
    tmp = tmp_path / "checkpoints" / ".tmp-checkpoint-4"
    with pytest.raises(WriteFailedError, match=f"Could not write checkpoint 4 to {tmp}: .*{cause}") as info:
        run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2")
    assert re.search(r"\(\d+\.\d\d GiB free on /", str(info.value)), str(info.value)
    assert "--resume_from_checkpoint latest" in str(info.value)
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-2"]
    assert verify_manifest(str(tmp_path / "checkpoints" / "checkpoint-2"))
    assert resolve_resume_path("latest", str(tmp_path / "checkpoints")).endswith("checkpoint-2")
    assert not (tmp_path / ".dit-hf.lock").exists()


def test_a_full_disk_while_exporting_names_the_folder_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    import safetensors.torch

    from dit_hf.manifest import verify_manifest
    from dit_hf.training import WriteFailedError

    failing_writes(
        monkeypatch, safetensors.torch, "save_file", str(tmp_path / "transformer"), OSError(errno.ENOSPC, "full")
    )
    with pytest.raises(WriteFailedError, match=f"Could not write the final pipeline to {tmp_path}: the disk is full"):
        run(tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2")
    assert verify_manifest(str(tmp_path / "checkpoints" / "checkpoint-2"))
    monkeypatch.undo()
    summary = run(tmp_path, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")  # exports again
    assert summary["steps"] == 2 and (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow  # a trainer subprocess: ~15 s on 2 cores
def test_the_command_line_prints_a_write_failure_without_a_traceback(tmp_path):
    """`python train_dit.py` into a folder that cannot take the checkpoint: one line, exit status 1."""
    from test_train import ROOT, TINY_ARGS

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".tmp-checkpoint-1").write_text("a file where the checkpoint folder goes")
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "train_dit.py"), *TINY_ARGS, "--max_train_steps", "1",
           "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert re.search(r"train_dit.py: error: Could not write checkpoint 1 to .*GiB free", result.stderr)
