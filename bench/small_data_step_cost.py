# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""What a larger small-recipe model costs per training step on this machine, against the recipe as it stands.

Each variant is the small recipe's model and batch at 32×32×3 with some trainer flags changed (wider MLP, width,
depth, batch), built by the trainer's own `build_model`; its bf16-autocast step (forward, MSE, backward, AdamW, as in
`small_data_precision.py`) is timed in blocks of 8 steps that take turns across all variants in one process, so a
drifting machine shifts every variant alike. Prints and writes the median time per step and per image, and the
ratio to the recipe's step. A screening run's accuracy gain is worth its cost only when it beats what the same time
spent on more steps would give.

    python bench/small_data_step_cost.py        # about two minutes on 2 cores
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from small_data_precision import machine_record, step_timer  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "small-data-step-cost.json")
VARIANTS = {
    "recipe": (),
    "mlp_ratio 4": ("--mlp_ratio", "4"),
    "mlp_ratio 8": ("--mlp_ratio", "8"),
    "width 160, 5 heads": ("--hidden_size", "160", "--num_heads", "5"),
    "width 192, 6 heads": ("--hidden_size", "192", "--num_heads", "6"),
    "depth 6": ("--depth", "6"),
    "batch 32": ("--train_batch_size", "32"),
    "batch 128": ("--train_batch_size", "128"),
}


def batch_size(flags: tuple[str, ...]) -> int:
    return int(flags[flags.index("--train_batch_size") + 1]) if "--train_batch_size" in flags else 64


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=4, help="rounds of 8 steps per variant")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    timers = {name: step_timer(32, 3, flags) for name, flags in VARIANTS.items()}
    for run in timers.values():
        run("bf16", 2)  # warm-up
    times = {name: [] for name in VARIANTS}
    for _ in range(args.blocks):
        for name, run in timers.items():
            times[name].append(run("bf16", 8))
    base = statistics.median(times["recipe"])
    results = {**machine_record(), "shape": "32x32x3", "precision": "bf16", "variants": {}}
    for name, flags in VARIANTS.items():
        ms = statistics.median(times[name])
        per_image = ms / batch_size(flags)
        results["variants"][name] = {
            "flags": " ".join(flags),
            "step_ms": round(ms, 1),
            "image_ms": round(per_image, 2),
            "step_ratio": round(ms / base, 2),
        }
        print(f"{name:20s} {ms:7.1f} ms per step, {per_image:.2f} ms per image, {ms / base:.2f}x the recipe's step")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
