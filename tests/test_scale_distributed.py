"""The shipped accelerate configs on CPU processes (gloo): FSDP trains the same weights as DDP and resumes exactly, and
2 nodes × 2 processes (two launchers on one machine) train the same weights as 4 processes on one node."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import TINY, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "accelerate_configs")


def accelerate_launch(config: str, output_dir, launch_args, *train_args, steps: int = 5, wait: bool = True):
    """`accelerate launch --config_file accelerate_configs/<config> <launch_args> train_dit.py <train_args>` on CPU
    processes, float32."""
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = [a for a in TINY if a not in ("--max_train_steps", "5", "--checkpointing_steps")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, config),
           "--mixed_precision", "no", *launch_args, os.path.join(ROOT, "train_dit.py"), *args,
           "--max_train_steps", str(steps), "--checkpointing_steps", "3", "--output_dir", str(output_dir),
           *train_args]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return finish(proc) if wait else proc


def finish(proc):
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def losses(output_dir) -> dict[int, float]:
    rows = map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def weights(folder):
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key  # whole tensors, not shards
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


@pytest.mark.slow
def test_fsdp_config_trains_like_ddp_and_resumes_exactly(tmp_path):
    port = str(free_port())
    common = ("--num_processes", "2", "--main_process_port", port)
    accelerate_launch("multi_gpu.yaml", tmp_path / "ddp", common, "--train_batch_size", "4")
    accelerate_launch("fsdp.yaml", tmp_path / "fsdp", common, "--train_batch_size", "4")
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert list(fsdp) == [1, 2, 3, 4, 5]
    assert all(fsdp[step] == pytest.approx(ddp[step], rel=1e-5, abs=1e-7) for step in ddp)
    # FSDP really ran: accelerate's sharded-model checkpoint file is there (and only there).
    assert (tmp_path / "fsdp" / "checkpoints" / "checkpoint-3" / "pytorch_model_fsdp.bin").is_file()
    assert not (tmp_path / "ddp" / "checkpoints" / "checkpoint-3" / "pytorch_model_fsdp.bin").exists()
    # The exported pipeline (EMA weights) and the checkpoint's model and EMA folders hold whole tensors equal to DDP's.
    assert_same_weights(weights(tmp_path / "fsdp"), weights(tmp_path / "ddp"), atol=1e-5)
    for sub in ("transformer", "ema_0.999"):
        checkpoint = [tmp_path / run / "checkpoints" / "checkpoint-3" / sub for run in ("fsdp", "ddp")]
        files = [next(folder.glob("*.safetensors")) for folder in checkpoint]
        assert_same_weights(load_file(files[0]), load_file(files[1]), atol=1e-5)
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "checkpoint-3"
    ema = load_file(next((checkpoint / "ema_0.999").glob("*.safetensors")))
    model = load_file(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(ema["final_layer.linear.weight"], model["final_layer.linear.weight"])  # a real average

    # Stopped at step 3 and resumed from its checkpoint: the same losses and bit-identical weights.
    accelerate_launch("fsdp.yaml", tmp_path / "resumed", common, "--train_batch_size", "4", steps=3)
    accelerate_launch("fsdp.yaml", tmp_path / "resumed", common, "--train_batch_size", "4",
                      "--resume_from_checkpoint", "latest")  # fmt: skip
    assert losses(tmp_path / "resumed") == fsdp
    assert_same_weights(weights(tmp_path / "resumed"), weights(tmp_path / "fsdp"), atol=0)


@pytest.mark.slow
def test_two_nodes_of_two_processes_equal_four_processes_on_one_node(tmp_path):
    one_node = ("--num_processes", "4", "--main_process_port", str(free_port()))
    accelerate_launch("multi_gpu.yaml", tmp_path / "one_node", one_node, "--train_batch_size", "2")
    # The multi-node config with a rendezvous on this machine: one launcher per "node", each starting 2 processes.
    port = str(free_port())
    launchers = []
    for rank in (0, 1):
        node = ("--num_machines", "2", "--num_processes", "4", "--machine_rank", str(rank),
                "--main_process_ip", "127.0.0.1", "--main_process_port", port)  # fmt: skip
        launchers.append(
            accelerate_launch("multi_node.yaml", tmp_path / "two_nodes", node, "--train_batch_size", "2", wait=False)
        )
    for proc in launchers:
        finish(proc)
    one, two = losses(tmp_path / "one_node"), losses(tmp_path / "two_nodes")
    assert list(two) == [1, 2, 3, 4, 5]
    assert all(two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-7) for step in one)
    assert_same_weights(weights(tmp_path / "two_nodes"), weights(tmp_path / "one_node"), atol=1e-5)
    ranks = sorted(p.name for p in (tmp_path / "two_nodes" / "checkpoints" / "checkpoint-3").glob("random_states_*"))
    assert ranks == [f"random_states_{r}.pkl" for r in range(4)]  # 4 processes in all, across the two launchers


@pytest.mark.slow
def test_images_are_checked_by_one_process_once(tmp_path):
    from PIL import Image

    for cls in ("cats", "dogs"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (16, 16), (30 * i, 90 if cls == "cats" else 180, 0)).save(
                tmp_path / "data" / cls / f"{i}.png"
            )
    (tmp_path / "data" / "dogs" / "broken.png").write_bytes(b"not a png")
    data = ("--train_data_dir", str(tmp_path / "data"), "--resolution", "8", "--model", "DiT-S/2",
            "--max_bad_image_fraction", "0.2", "--cache_dir", str(tmp_path / "hf"),
            "--train_batch_size", "4")  # fmt: skip
    launch = ("--num_processes", "2", "--main_process_port", str(free_port()))
    first = accelerate_launch("multi_gpu.yaml", tmp_path / "a", launch, *data, steps=1)
    # datasets' progress bar of the scan starts once, on the main process; the other process got its answer. (Its
    # 100% line may be printed twice, by the last update and by the close.)
    assert first.count("Checking images:   0%") == 1 and "Checking images: 100%" in first
    assert losses(tmp_path / "a")  # both processes trained on the 16 readable images
    second = accelerate_launch("multi_gpu.yaml", tmp_path / "b", launch, *data, steps=1)
    assert "Checking images" not in second
