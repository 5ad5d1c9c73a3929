#!/usr/bin/env python
"""RAE stage 2 on the embedded digits, end to end: a tiny RAE, then a DiT^DH trained on its latents.

Stage 1 (`dit_hf.rae.train_digits_rae`, skipped when `--rae` already holds an RAE): the digits DINOv2 of
`dit_hf.repa` as the frozen encoder of an `AutoencoderRAE` (64 × 4 × 4 latents for an 8×8 digit read at 16 px) and a
ViT decoder trained with L1 + L2 and noise_tau; its held-out reconstruction MSE. Stage 2: `train_dit.py --vae <RAE>
--model DiTDH-S` narrowed for a CPU (trunk 128 × 4, DDT head 2 × 128) with `--objective flow --time_shift auto`
and logit-normal noise levels, latents cached once; the trainer's final samples (`--samples_per_class` per digit,
Euler 50 steps, guidance 4) decode through the RAE decoder and are scored by the digits classifier of
`dit_hf.evaluation`.

    python bench/rae_digits.py     # stage 1 about 6 min, stage 2 about 5 min of CPU time (2 cores)
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, markdown_table, write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE2 = [
    "--recipe", "digits", "--image_channels", "3",
    "--model", "DiTDH-S", "--hidden_size", "128", "--depth", "4", "--num_heads", "4",
    "--head_hidden_size", "128", "--head_num_heads", "4",
    "--objective", "flow", "--time_shift", "auto", "--timestep_sampling", "logit_normal", "--latent_norm", "scale",
    "--sample_scheduler", "euler", "--num_inference_steps", "50", "--guidance_scale", "4",
    "--validation_steps", "0", "--report_to", "none",
]  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rae", default="outputs/digits-rae", help="The stage-1 RAE; trained here if absent.")
    p.add_argument("--rae_steps", type=int, default=3000)
    p.add_argument("--steps", type=int, default=3000, help="Stage-2 training steps.")
    p.add_argument("--samples_per_class", type=int, default=20)
    p.add_argument("--runs_dir", default="outputs/rae-stage2")
    p.add_argument("--out", default="bench/results/rae-digits.json")
    return p.parse_args(argv)


def cpu_seconds(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> dict:
    import torch

    from dit_hf.rae import SUMMARY_FILE, train_digits_rae

    args = parse_args(argv)
    if not os.path.isfile(os.path.join(args.rae, "config.json")):
        c0 = cpu_seconds(resource.RUSAGE_SELF)
        stage1 = train_digits_rae(args.rae, max_steps=args.rae_steps)
        stage1["cpu_s"] = round(cpu_seconds(resource.RUSAGE_SELF) - c0, 1)
    else:
        with open(os.path.join(args.rae, SUMMARY_FILE)) as f:
            stage1 = json.load(f)

    out = os.path.join(args.runs_dir, f"ditdh-{args.steps}")
    cmd = [
        sys.executable, os.path.join(ROOT, "train_dit.py"), *STAGE2, "--vae", args.rae,
        "--cache_latents", os.path.join(args.runs_dir, "cache"), "--output_dir", out,
        "--max_train_steps", str(args.steps), "--checkpointing_steps", str(args.steps),
        "--num_samples_per_class", str(args.samples_per_class),
    ]  # fmt: skip
    print(" ".join(cmd), flush=True)
    t0, c0 = time.time(), cpu_seconds(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True)
    stage2 = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(cpu_seconds(resource.RUSAGE_CHILDREN) - c0, 1)}
    with open(os.path.join(out, "summary.json")) as f:
        stage2.update(json.load(f))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    stage2["img_per_s"] = sum(r["img_per_s"] for r in rows if "img_per_s" in r) / max(
        1, sum("img_per_s" in r for r in rows)
    )
    stage2["final_loss"] = [r["loss"] for r in rows if "loss" in r][-1]

    env = environment(torch.device("cpu"))
    rows = [
        ["RAE stage 1: held-out reconstruction MSE", stage1["reconstruction_mse"]],
        ["RAE stage 1: MSE of the mean image (scale)", stage1["mean_image_mse"]],
        ["RAE stage 1: wall / CPU s", f"{stage1['total_time_s']} / {stage1.get('cpu_s')}"],
        [f"stage 2: class accuracy of {10 * args.samples_per_class} samples", f"{stage2['digits_accuracy']:.1%}"],
        [f"stage 2: {args.steps} steps, wall / CPU s", f"{stage2['wall_s']} / {stage2['cpu_s']}"],
    ]
    table = (
        f"Digits RAE stage 2 (DiT^DH on 64x4x4 RAE latents) — {env['device']}, torch {env['torch']}\n\n"
        + markdown_table(["", "value"], rows)
    )
    payload = {"environment": env, "settings": vars(args), "stage1": stage1, "stage2": stage2, "command": cmd}
    write_results(args.out, payload, table)
    return payload


if __name__ == "__main__":
    main()
