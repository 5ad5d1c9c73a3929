"""Two CPU processes (torchrun + gloo) train the same weights as one process with gradient accumulation."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--hidden_size", "32", "--depth", "2", "--num_heads", "2", "--max_train_samples", "64",
    "--num_inference_steps", "2", "--num_samples_per_class", "1", "--logging_steps", "1",
    "--report_to", "none", "--validation_steps", "0", "--max_train_steps", "5", "--checkpointing_steps", "5",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(output_dir, nproc: int, *extra):
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), os.path.join(ROOT, "train_dit.py"), *TINY,
           "--output_dir", str(output_dir), *extra]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_match_one_process_with_accumulation(tmp_path):
    launch(tmp_path / "two", 2, "--train_batch_size", "4")
    launch(tmp_path / "one", 1, "--train_batch_size", "4", "--gradient_accumulation_steps", "2")

    def metrics(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    two, one = metrics("two"), metrics("one")
    assert [row["step"] for row in two] == [1, 2, 3, 4, 5]  # logged once, by the main process
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    weights = {
        name: load_file(tmp_path / name / "transformer" / "diffusion_pytorch_model.safetensors")
        for name in ("two", "one")
    }
    for key, value in weights["two"].items():
        torch.testing.assert_close(value, weights["one"][key], atol=1e-5, rtol=1e-4)
    assert not torch.equal(
        weights["two"]["final_layer.linear.weight"], torch.zeros_like(weights["two"]["final_layer.linear.weight"])
    )

    # Every process saved its RNG state, and the processes were seeded differently.
    ckpt = tmp_path / "two" / "checkpoints" / "checkpoint-5"
    states = []
    for rank in (0, 1):
        # accelerate writes these with torch.save and reads them weights-only, allowing the numpy array types.
        states.append(accelerate_load(ckpt / f"random_states_{rank}.pkl", weights_only=True)["torch_manual_seed"])
    assert not torch.equal(states[0], states[1])
