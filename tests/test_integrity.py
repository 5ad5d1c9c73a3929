"""Checkpoint integrity: manifests written last and verified on resume, state that cannot be read fully, and settings
a resume must refuse (they change what the weights mean) or apply and list."""

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_train import TINY_ARGS, losses, run

import train_dit
from dit_hf import training
from dit_hf.manifest import MANIFEST, CorruptCheckpointError, file_sha256, verify_manifest
from dit_hf.training import TrainerState, resolve_resume_path

WEIGHTS = os.path.join("transformer", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (copied by each test that alters it)."""
    out = tmp_path_factory.mktemp("two-checkpoints")
    run(out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3")
    return out


def copy_run(source, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out


def checkpoint_files(checkpoint) -> list[str]:
    found = [os.path.relpath(os.path.join(r, n), checkpoint) for r, _, files in os.walk(checkpoint) for n in files]
    return sorted(name for name in found if name != MANIFEST)


def test_every_checkpoint_file_is_in_the_manifest_written_last(tmp_path, monkeypatch):
    seen = []
    write_manifest = training.write_manifest

    def recording_write_manifest(directory):
        seen.append(checkpoint_files(directory))  # what exists when the manifest is written
        return write_manifest(directory)

    monkeypatch.setattr(training, "write_manifest", recording_write_manifest)
    run(tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2")
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    manifest = json.loads((checkpoint / MANIFEST).read_text())["files"]
    assert seen == [sorted(manifest)] == [checkpoint_files(checkpoint)]
    saved = {"trainer_state.json", "training_config.json", "random_states_0.pkl", "optimizer.bin", WEIGHTS}
    assert saved <= set(manifest)
    entry = manifest[WEIGHTS]
    assert entry["size"] == os.path.getsize(checkpoint / WEIGHTS)
    assert entry["sha256"] == file_sha256(checkpoint / WEIGHTS)
    assert verify_manifest(str(checkpoint)) is True


def damage(path, how: str):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one flipped bit in the middle of the file: same size, different hash
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_latest_skips_a_damaged_checkpoint_and_names_the_file(two_checkpoints, tmp_path, how):
    """Each file of the newest checkpoint in turn: `latest` falls back to the previous one and says which file."""
    out = copy_run(two_checkpoints, tmp_path)
    newest = out / "checkpoints" / "checkpoint-4"
    for name in checkpoint_files(newest) + [MANIFEST]:
        target = newest / name
        original = target.read_bytes()
        damage(target, how)
        warnings = []
        assert resolve_resume_path("latest", str(out / "checkpoints"), warn=warnings.append).endswith("checkpoint-2")
        assert len(warnings) == 1 and str(target) in warnings[0], (name, warnings)
        with pytest.raises(ValueError, match=f"Checkpoint file {target}"):  # named explicitly: refused
            resolve_resume_path(str(newest), str(out / "checkpoints"))
        target.write_bytes(original)
    assert resolve_resume_path("latest", str(out / "checkpoints")).endswith("checkpoint-4")


def test_a_file_added_to_a_checkpoint_fails_verification(two_checkpoints, tmp_path):
    out = copy_run(two_checkpoints, tmp_path)
    extra = out / "checkpoints" / "checkpoint-4" / "transformer" / "extra.safetensors"
    extra.write_bytes(b"from another run")
    with pytest.raises(CorruptCheckpointError, match=f"Checkpoint file {extra} is not in the checkpoint's manifest"):
        verify_manifest(str(out / "checkpoints" / "checkpoint-4"))


def test_resume_falls_back_past_a_corrupt_checkpoint_and_continues_exactly(two_checkpoints, tmp_path, caplog):
    out = copy_run(two_checkpoints, tmp_path)
    # Copied: load_file maps the file, which damage() rewrites in place.
    expected = {k: v.clone() for k, v in load_file(out / "checkpoints" / "checkpoint-4" / WEIGHTS).items()}
    damage(out / "checkpoints" / "checkpoint-4" / WEIGHTS, "bitflip")
    with caplog.at_level(logging.WARNING):
        run(out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3",
            "--resume_from_checkpoint", "latest")  # fmt: skip
    assert f"Skipping checkpoint {out / 'checkpoints' / 'checkpoint-4'}" in caplog.text
    assert str(out / "checkpoints" / "checkpoint-4" / WEIGHTS) in caplog.text
    # Steps 3 and 4 trained again from checkpoint 2 rewrite checkpoint 4 exactly as it was.
    rewritten = load_file(out / "checkpoints" / "checkpoint-4" / WEIGHTS)
    assert all(torch.equal(expected[k], rewritten[k]) for k in expected)
    assert verify_manifest(str(out / "checkpoints" / "checkpoint-4"))


def test_a_checkpoint_without_manifest_loads_with_a_warning(two_checkpoints, tmp_path, caplog):
    out = copy_run(two_checkpoints, tmp_path)
    for step in (2, 4):
        (out / "checkpoints" / f"checkpoint-{step}" / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING):
        summary = run(out, "--max_train_steps", "5", "--checkpointing_steps", "2", "--learning_rate", "1e-3",
                      "--resume_from_checkpoint", "latest")  # fmt: skip
    assert summary["steps"] == 5
    assert "checkpoint-4 has no manifest" in caplog.text and "cannot be verified" in caplog.text


@pytest.mark.parametrize(
    "content, reason",
    [
        ("", "Expecting value"),
        ('{"global_step": 4, "epoch": 0', "Expecting"),
        ("{}", "missing \\['epoch', 'global_step', 'samples_in_epoch'\\]"),
        ('{"global_step": "4", "epoch": 0, "samples_in_epoch": 32}', "not a count >= 0 \\['global_step'\\]"),
        ("[4]", "expected a JSON object"),
    ],
)
def test_a_trainer_state_that_cannot_be_read_fully_is_refused(tmp_path, content, reason):
    (tmp_path / "trainer_state.json").write_text(content)
    with pytest.raises(ValueError, match=f"Checkpoint file {tmp_path / 'trainer_state.json'} cannot be read fully.*"):
        TrainerState.load(str(tmp_path))
    with pytest.raises(ValueError, match=reason):
        TrainerState.load(str(tmp_path))


def test_resume_refuses_an_empty_trainer_state_of_an_unverified_checkpoint(two_checkpoints, tmp_path):
    out = copy_run(two_checkpoints, tmp_path)
    checkpoint = out / "checkpoints" / "checkpoint-4"
    (checkpoint / MANIFEST).unlink()
    (checkpoint / "trainer_state.json").write_text("")
    with pytest.raises(ValueError, match=f"Checkpoint file {checkpoint / 'trainer_state.json'} cannot be read fully"):
        run(out, "--max_train_steps", "5", "--learning_rate", "1e-3", "--resume_from_checkpoint", "latest")
    assert not (out / "checkpoints" / "checkpoint-5").exists()


def test_resume_refuses_a_missing_rng_state(two_checkpoints, tmp_path):
    out = copy_run(two_checkpoints, tmp_path)
    checkpoint = out / "checkpoints" / "checkpoint-4"
    (checkpoint / MANIFEST).unlink()  # an older checkpoint; with a manifest the missing file fails verification
    (checkpoint / "random_states_0.pkl").unlink()
    with pytest.raises(ValueError, match=f"Checkpoint file {checkpoint / 'random_states_0.pkl'} is missing"):
        run(out, "--max_train_steps", "5", "--learning_rate", "1e-3", "--resume_from_checkpoint", "latest")


@pytest.mark.parametrize(
    "flag, old, new",
    [("--objective", "ddpm_eps", "ddpm_v"), ("--beta_schedule", "linear", "squaredcos_cap_v2")],
)
def test_resume_refuses_settings_that_change_what_the_weights_mean(two_checkpoints, tmp_path, flag, old, new):
    out = copy_run(two_checkpoints, tmp_path)
    with pytest.raises(ValueError, match=f"{flag} '{old}' in the checkpoint, '{new}' now"):
        run(out, "--max_train_steps", "5", "--learning_rate", "1e-3", flag, new, "--resume_from_checkpoint", "latest")
    assert not (out / "checkpoints" / "checkpoint-5").exists()


def test_resume_applies_and_lists_other_changes(two_checkpoints, tmp_path, caplog):
    """A new learning rate reaches the optimizer (the saved state held the old one); each change is one log line."""
    out = copy_run(two_checkpoints, tmp_path)
    with caplog.at_level(logging.INFO):
        run(out, "--max_train_steps", "6", "--checkpointing_steps", "3", "--learning_rate", "2e-3",
            "--resume_from_checkpoint", "latest")  # fmt: skip
    changes = [r.getMessage().removeprefix("[RANK 0] ") for r in caplog.records if "changed setting" in r.getMessage()]
    assert changes == [
        "Resumed with a changed setting: --checkpointing_steps 2 -> 3 (applied)",
        "Resumed with a changed setting: --learning_rate 0.001 -> 0.002 (applied)",
        "Resumed with a changed setting: --max_train_steps 4 -> 6 (applied)",
    ]
    lrs = {json.loads(line)["step"]: json.loads(line).get("lr") for line in open(out / "metrics.jsonl")}
    assert lrs[4] == pytest.approx(1e-3) and lrs[5] == pytest.approx(2e-3) and lrs[6] == pytest.approx(2e-3)
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]


def test_an_explicit_checkpoint_path_is_verified_too(two_checkpoints, tmp_path):
    out = copy_run(two_checkpoints, tmp_path)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    damage(checkpoint / "optimizer.bin", "bitflip")
    args = [
        *TINY_ARGS,
        "--output_dir",
        str(out),
        "--max_train_steps",
        "5",
        "--resume_from_checkpoint",
        str(checkpoint),
    ]
    with pytest.raises(ValueError, match=f"Checkpoint file {checkpoint / 'optimizer.bin'} does not match its SHA-256"):
        train_dit.main(train_dit.parse_args(args))


def test_a_rollback_skips_a_checkpoint_that_fails_verification(two_checkpoints, tmp_path, caplog):
    """The divergence guard's rollback target verifies too: finite weights beside a damaged optimizer state are no
    state to go back to."""
    from dit_hf.guards import newest_finite_checkpoint

    out = copy_run(two_checkpoints, tmp_path)
    checkpoints = out / "checkpoints"
    assert newest_finite_checkpoint(str(checkpoints)).endswith("checkpoint-4")
    damage(checkpoints / "checkpoint-4" / "optimizer.bin", "bitflip")
    with caplog.at_level(logging.WARNING):
        assert newest_finite_checkpoint(str(checkpoints)).endswith("checkpoint-2")
    assert str(checkpoints / "checkpoint-4" / "optimizer.bin") in caplog.text


def test_a_resume_refuses_another_latent_normalisation():
    """`--latent_norm` decides what the latents the weights were trained on look like: a change is refused."""
    from dit_hf.resume import compare_run_settings

    saved = {"latent_norm": "scale", "vae": "ae", "learning_rate": 1e-3}
    with pytest.raises(ValueError, match="--latent_norm 'scale' in the checkpoint, 'channel' now"):
        compare_run_settings(saved, {**saved, "latent_norm": "channel"})
    assert compare_run_settings(saved, {**saved, "learning_rate": 2e-3}) == [("learning_rate", 1e-3, 2e-3)]
