#!/usr/bin/env python
"""Training throughput: dit-hf's DiTModel vs diffusers' DiTTransformer2DModel, side by side, same inputs.

Both models carry the same weights (dit-hf's model exported with `dit_to_diffusers`) and run the same full training
step: the DiT objective (ε-MSE + learned-variance VLB, `DDPMObjective`), backward, AdamW (fused on CUDA), gradient
clipping off, and an EMA update (`EMAModels`). Only the model differs, so the ratio is the model's.

    python bench/bench_train.py                                   # CPU: a tiny config, seconds
    python bench/bench_train.py --model DiT-XL/2 --latent_size 32 --batch_size 128 --precision bf16 \\
        --modes eager,compile --out bench/results/train-xl2.json    # one GPU: the paper's 256 px setting
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    apply_device_defaults,
    default_peak_tflops,
    environment,
    markdown_table,
    peak_memory_gib,
    reset_memory,
    time_iterations,
    write_results,
)

from dit_hf import DiTModel  # noqa: E402
from dit_hf.convert import dit_to_diffusers  # noqa: E402
from dit_hf.ema import EMAModels  # noqa: E402
from dit_hf.objective import DDPMObjective, make_ddpm_scheduler  # noqa: E402
from dit_hf.training import dit_train_flops_per_sample  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="A DiT preset (default: DiT-XL/2 on CUDA, a tiny DiT-S/2 on CPU).")
    p.add_argument("--latent_size", type=int, default=None, help="Default: 32 on CUDA (256 px), 8 on CPU.")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=None, help="Default: 128 on CUDA, 16 on CPU.")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="Default: bf16 on CUDA.")
    p.add_argument("--impls", default="dit-hf,diffusers")
    p.add_argument(
        "--modes",
        default="eager",
        help="Comma list of eager, compile (torch.compile of the model), "
        "regional (compile each repeated block; dit-hf only).",
    )
    p.add_argument("--warmup", type=int, default=None, help="Default: 5 (10 with compile).")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--peak_tflops", type=float, default=None, help="For MFU; default: data sheet of known GPUs.")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/train.json")
    return apply_device_defaults(p.parse_args(argv), (128, 16), ("bf16", "fp32"), ("eager", "compile", "regional"))


def build_models(args) -> dict[str, torch.nn.Module]:
    """dit-hf's model and its diffusers export: identical weights and outputs (float32, `timestep_freq_shift=1`)."""
    torch.manual_seed(args.seed)
    ours = DiTModel.from_preset(
        args.model,
        **args.overrides,
        sample_size=args.latent_size,
        in_channels=args.channels,
        num_classes=1000,
        timestep_freq_shift=1,
    )
    # Zero-initialised adaLN layers would make the first steps trivially cheap to compare; perturb them.
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    theirs = dit_to_diffusers(ours)
    return {"dit-hf": ours, "diffusers": theirs}


def run_one(args, name: str, model: torch.nn.Module, mode: str) -> dict:
    device = args.device
    reset_memory(device)
    model = model.to(device).train()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused)
    ema = EMAModels(model, [0.9999])
    if mode == "compile":
        runner = torch.compile(model)
    elif mode == "regional":
        model.compile_repeated_blocks(fullgraph=True)
        runner = model
    else:
        runner = model
    objective = DDPMObjective(make_ddpm_scheduler(learn_sigma=True), learn_sigma=True)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    n, c, s = args.batch_size, args.channels, args.latent_size
    x0 = torch.randn((n, c, s, s), generator=g).to(device)
    labels = torch.randint(0, 1000, (n,), generator=g).to(device)
    timesteps = torch.randint(0, 1000, (n,), generator=g).to(device)
    noise = torch.randn((n, c, s, s), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with autocast:
            loss = objective(runner, x0, labels, timesteps=timesteps, noise=noise).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
        return loss

    warmup = args.warmup if args.warmup is not None else (10 if mode != "eager" else 5)
    timing = time_iterations(step, device, warmup, args.repeats)
    img_s = n / timing["median_s"]
    cfg = model.config
    hidden = cfg.hidden_size if name == "dit-hf" else cfg.num_attention_heads * cfg.attention_head_dim
    depth = cfg.depth if name == "dit-hf" else cfg.num_layers
    tokens = (s // cfg.patch_size) ** 2
    flops = dit_train_flops_per_sample(hidden, depth, tokens)
    peak = args.peak_tflops or default_peak_tflops(device)
    result = {
        "impl": name,
        "mode": mode,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "img_per_s": img_s,
        "step_ms": timing["median_s"] * 1000,
        "step_ms_min": timing["min_s"] * 1000,
        "step_ms_max": timing["max_s"] * 1000,
        "achieved_tflops": img_s * flops / 1e12,
        "mfu": img_s * flops / (peak * 1e12) if peak else None,
        "peak_mem_gib": peak_memory_gib(device),
    }
    model.to("cpu")
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results = []
    for mode in args.modes:
        for name in args.impls:
            if mode == "regional" and name != "dit-hf":
                continue  # diffusers' DiTTransformer2DModel declares no repeated blocks
            torch._dynamo.reset()
            # Fresh weights for every run: the previous run's optimizer steps changed them.
            fresh = build_models(args)[name]
            results.append(run_one(args, name, fresh, mode))
            print(f"{name:9s} {mode:8s} {results[-1]['img_per_s']:9.1f} img/s", flush=True)
    by_key = {(r["impl"], r["mode"]): r for r in results}
    ratios = {}
    for mode in args.modes:
        base = by_key.get(("diffusers", mode))
        if base and ("dit-hf", mode) in by_key:
            ratios[f"dit-hf/diffusers {mode}"] = by_key[("dit-hf", mode)]["img_per_s"] / base["img_per_s"]
    best_theirs = max((r for r in results if r["impl"] == "diffusers"), key=lambda r: r["img_per_s"], default=None)
    best_ours = max((r for r in results if r["impl"] == "dit-hf"), key=lambda r: r["img_per_s"], default=None)
    if best_theirs and best_ours:
        ratios["best dit-hf / best diffusers"] = best_ours["img_per_s"] / best_theirs["img_per_s"]
    env = environment(args.device)
    settings = {
        "model": args.model,
        "overrides": args.overrides,
        "latent": [args.channels, args.latent_size, args.latent_size],
        "batch_size": args.batch_size,
        "precision": args.precision,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "step": "DDPMObjective (eps MSE + VLB) + backward + AdamW + EMA",
    }
    rows = [
        [r["impl"], r["mode"], r["params_m"], r["img_per_s"], r["step_ms"], r["mfu"], r["peak_mem_gib"]]
        for r in results
    ]
    table = (
        f"Training step, {args.model} {settings['latent']} batch {args.batch_size} {args.precision} — "
        f"{env['device']}, torch {env['torch']}, diffusers {env['diffusers']}\n\n"
        + markdown_table(["impl", "mode", "params (M)", "img/s", "step ms (median)", "MFU", "peak GiB"], rows)
        + "\n\n"
        + "\n".join(f"- {k}: {v:.2f}×" for k, v in ratios.items())
    )
    payload = {"environment": env, "settings": settings, "results": results, "ratios": ratios}
    write_results(args.out, payload, table)
    return payload


if __name__ == "__main__":
    main()
