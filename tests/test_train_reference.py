"""The trainer trains bit-identically to the trainer before its refactoring into a library.

`fixtures/reference_run.json` was recorded with train_dit.py as it stood before the trainer became a library
(torch 2.13 CPU, one thread): for the digits default and for a tiny REPA run, each trained 2 steps, checkpointed,
resumed and finished at step 4, the logged losses and gradient norms, and a SHA-256 of every tensor of the exported
(EMA) transformer and of the last checkpoint's raw weights. Re-record (only after an intended change of the numbers)
with `python tests/test_train_reference.py`.
"""

import hashlib
import json
import os
import sys

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_dit  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "reference_run.json")
WEIGHTS = "diffusion_pytorch_model.safetensors"
# The digits default (DiT-S/2 of 4 blocks × 128 on all 1,797 digits, batch 64); only the run's length, outputs and
# sampling cost are shortened.
SHORT = [
    "--max_train_steps", "4", "--checkpointing_steps", "2", "--logging_steps", "1", "--report_to", "none",
    "--validation_steps", "0", "--num_inference_steps", "2", "--num_samples_per_class", "1",
    # One thread, as recorded: otherwise OMP_NUM_THREADS=1 in the environment is raised to the core count (the rule
    # for `accelerate launch`), and a different summation order changes the last bits.
    "--cpu_threads", "1",
]  # fmt: skip
# REPA on a 2-block DiT of width 32 with a tiny DINOv2 (tests/test_train_recipes.py), 32 digits.
TINY_REPA = ["--hidden_size", "32", "--depth", "2", "--num_heads", "2", "--train_batch_size", "8",
             "--max_train_samples", "32", "--repa_depth", "1", "--repa_projector_dim", "24"]  # fmt: skip


def tensor_hashes(path: str) -> dict[str, str]:
    tensors = sorted(load_file(path).items())
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k, v in tensors}


def record_run(output_dir: str, *extra: str, folders=("transformer",)) -> dict:
    """Run 2 steps, resume to 4, and record the logged values and the hashes of the final weights."""
    args = [*SHORT, *extra, "--output_dir", output_dir]
    train_dit.main(train_dit.parse_args([*args, "--max_train_steps", "2"]))
    train_dit.main(train_dit.parse_args([*args, "--resume_from_checkpoint", "latest"]))
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    record = {
        key: {str(row["step"]): row[key] for row in rows if key in row}
        for key in ("loss", "grad_norm", "repa_loss")
        if any(key in row for row in rows)
    }
    record["ema_weights"] = tensor_hashes(os.path.join(output_dir, "transformer", WEIGHTS))
    for folder in folders:
        record[f"raw_{folder}"] = tensor_hashes(
            os.path.join(output_dir, "checkpoints", "checkpoint-4", folder, WEIGHTS)
        )
    return record


def digits_record(tmp: str) -> dict:
    return record_run(os.path.join(tmp, "digits"))


def repa_record(tmp: str) -> dict:
    from test_train_recipes import tiny_dinov2

    encoder = tiny_dinov2(os.path.join(tmp, "encoder"))
    return record_run(
        os.path.join(tmp, "repa"), *TINY_REPA, "--repa_encoder", encoder, folders=("transformer", "repa_projector")
    )


def expected(name: str) -> dict:
    with open(FIXTURE) as f:
        return json.load(f)[name]


def test_digits_default_reproduces_the_reference_run(tmp_path):
    got, want = digits_record(str(tmp_path)), expected("digits")
    assert got["loss"] == want["loss"] and got["grad_norm"] == want["grad_norm"]
    assert got == want  # weights: every tensor's hash


def test_repa_run_reproduces_the_reference_run(tmp_path):
    got, want = repa_record(str(tmp_path)), expected("repa")
    assert got["loss"] == want["loss"] and got["repa_loss"] == want["repa_loss"]
    assert got == want


if __name__ == "__main__":
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(1)  # as tests/conftest.py: float sums depend on the thread count
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        records = {"digits": digits_record(tmp), "repa": repa_record(tmp)}
    with open(FIXTURE, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    print(f"Wrote {FIXTURE}: losses {[r['loss'] for r in records.values()]}")
