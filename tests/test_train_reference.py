"""The digits default trains bit-identically to the trainer before its refactoring into a library.

`fixtures/reference_run.json` was recorded with train_dit.py as it stood before the trainer became a library
(torch 2.13 CPU, one thread): the logged losses of a short run of the digits default that checkpoints, resumes and
finishes, and a SHA-256 of every tensor of the exported (EMA) transformer and of the last checkpoint's raw weights.
Re-record (only after an intended change of the numbers) with `python tests/test_train_reference.py`.
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
# The digits default (DiT-S/2 of 4 blocks × 128 on all 1,797 digits, batch 64); only the run's length, outputs and
# sampling cost are shortened.
SHORT = [
    "--max_train_steps", "4", "--checkpointing_steps", "2", "--logging_steps", "1", "--report_to", "none",
    "--validation_steps", "0", "--num_inference_steps", "2", "--num_samples_per_class", "1",
]  # fmt: skip


def tensor_hashes(path: str) -> dict[str, str]:
    tensors = sorted(load_file(path).items())
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k, v in tensors}


def reference_record(output_dir: str) -> dict:
    """Run 2 steps, resume to 4, and record the losses and the hashes of the final weights."""
    train_dit.main(train_dit.parse_args([*SHORT, "--max_train_steps", "2", "--output_dir", output_dir]))
    train_dit.main(train_dit.parse_args([*SHORT, "--resume_from_checkpoint", "latest", "--output_dir", output_dir]))
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    weights = "diffusion_pytorch_model.safetensors"
    return {
        "losses": {str(row["step"]): row["loss"] for row in rows if "loss" in row},
        "grad_norms": {str(row["step"]): row["grad_norm"] for row in rows if "grad_norm" in row},
        "ema_weights": tensor_hashes(os.path.join(output_dir, "transformer", weights)),
        "raw_weights": tensor_hashes(os.path.join(output_dir, "checkpoints", "checkpoint-4", "transformer", weights)),
    }


def test_digits_default_reproduces_the_reference_run(tmp_path):
    with open(FIXTURE) as f:
        expected = json.load(f)
    got = reference_record(str(tmp_path))
    assert got["losses"] == expected["losses"]
    assert got["grad_norms"] == expected["grad_norms"]
    assert got["raw_weights"] == expected["raw_weights"]
    assert got["ema_weights"] == expected["ema_weights"]


if __name__ == "__main__":
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(1)  # as tests/conftest.py: float sums depend on the thread count
    with tempfile.TemporaryDirectory() as tmp:
        record = reference_record(tmp)
    with open(FIXTURE, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"Wrote {FIXTURE}: losses {record['losses']}")
