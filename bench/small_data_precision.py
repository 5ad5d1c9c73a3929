# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""float32 against bf16 autocast for the small recipe's training step on this machine (`--mixed_precision auto`).

The small recipe's model and batch (built by the trainer from the recipe: width 128, 4 blocks, 4 heads, patch 4,
batch 64 and its block design, when measured) on 28×28×1 and 32×32×3 inputs: forward,
an MSE on the output, backward and AdamW. Both precisions run in one process, in blocks of 10 steps that alternate
(fp32 first, then bf16 first), so that a machine whose speed drifts during the run shifts both alike; separate
processes on the same machine were seen to differ by a quarter. Prints and writes the median step time of each.

    python bench/small_data_precision.py        # about a minute on 2 cores
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "src"))  # an uninstalled checkout
sys.path.insert(0, ROOT)
import train_dit  # noqa: E402
from dit_hf.precision import native_bf16  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "small-data-precision.json")
SHAPES = {"gray28": (28, 1), "rgb32": (32, 3)}


def step_timer(resolution: int, channels: int, flags: tuple[str, ...] = ()):
    """One timed step function of the small recipe's model and batch at this image size (with `flags`, trainer flags
    that change them, e.g. `("--mlp_ratio", "8")`)."""
    # The trainer's own config resolution and model builder: the recipe's sizes, patch and block design.
    with tempfile.TemporaryDirectory() as out:  # resolving a config checks that its output folder is writable
        config = train_dit.parse_args(["--recipe", "small", "--resolution", str(resolution), "--image_channels",
                                       str(channels), "--output_dir", out, *flags])  # fmt: skip
    torch.manual_seed(0)
    model = train_dit.build_model(config, num_classes=10, in_channels=channels, sample_size=resolution)
    batch_size = config.train_batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, channels, resolution, resolution)
    t, y = torch.rand(batch_size) * 1000, torch.randint(0, 10, (batch_size,))

    def run(precision: str, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
            with autocast:
                loss = (model(x, t, y).sample.float() - x).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return (time.perf_counter() - start) / steps * 1000

    return run


def machine_record() -> dict:
    """What a step time was measured on: CPU, threads, torch, and whether the CPU computes bf16 natively."""
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "native_bf16": native_bf16("cpu")}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=6, help="alternating blocks of 10 steps per precision")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    results = {**machine_record(), "shapes": {}}
    for name, (resolution, channels) in SHAPES.items():
        run = step_timer(resolution, channels)
        run("fp32", 3), run("bf16", 3)  # warm-up
        times = {"fp32": [], "bf16": []}
        for block in range(args.blocks):
            for precision in ("fp32", "bf16") if block % 2 == 0 else ("bf16", "fp32"):
                times[precision].append(run(precision, 10))
        fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
        results["shapes"][name] = {
            "fp32_ms": round(fp32, 1),
            "bf16_ms": round(bf16, 1),
            "speedup": round(fp32 / bf16, 2),
        }
        print(f"{name}: float32 {fp32:.1f} ms, bf16 autocast {bf16:.1f} ms per step ({fp32 / bf16:.2f}x)")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
