#!/usr/bin/env python
"""Sampling throughput: dit-hf's DiTPipeline vs diffusers' DiTPipeline, same weights, scheduler and noise.

The diffusers pipeline gets dit-hf's transformer exported with `dit_to_diffusers` (identical outputs in float32) and
the same VAE; both sample the same class labels from the same generator seed with classifier-free guidance. The
script reports images/s (VAE decode included, as users run it) and the largest difference between the two
pipelines' images, which must be at float32 rounding level in fp32 and within bf16/fp16 tolerance otherwise.

    python bench/bench_sample.py                                            # CPU: tiny config
    python bench/bench_sample.py --model DiT-XL/2 --latent_size 32 --batch_size 64 --precision fp16 \\
        --scheduler ddim --steps 50 --modes eager,compile --out bench/results/sample-xl2.json
"""

import argparse
import copy
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    SDPA_BACKENDS,
    add_model_args,
    apply_device_defaults,
    environment,
    markdown_table,
    peak_memory_gib,
    reset_memory,
    sdpa_context,
    time_interleaved,
    time_iterations,
    write_results,
)

from dit_hf import DiTModel, DiTPipeline  # noqa: E402
from dit_hf.convert import dit_to_diffusers  # noqa: E402
from dit_hf.precision import precision_dtypes  # noqa: E402

MODES = ("eager", "compile", "regional", "cudagraphs")
DTYPES = precision_dtypes()
# The sd-vae-ft-ema/mse architecture (random weights: the cost is the same); a small one on CPU.
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
)
TINY_VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    batch_help = "Images per batch. Default: 64 on CUDA, 8 on CPU."
    add_model_args(p, batch_help, tuple(sorted(DTYPES)), "Default: fp16 on CUDA, fp32 on CPU.")
    p.add_argument("--scheduler", choices=("ddim", "dpm"), default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--impls", default="dit-hf,diffusers")
    p.add_argument(
        "--modes",
        default="eager",
        help="Comma list of eager, compile (torch.compile of the transformer), regional (each repeated block "
        "compiled; dit-hf only), cudagraphs (torch.compile mode='reduce-overhead': CUDA graphs replay each step).",
    )
    p.add_argument("--sdpa", choices=SDPA_BACKENDS, default="auto", help="Attention backend for both pipelines.")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/sample.json")
    return apply_device_defaults(p.parse_args(argv), (64, 8), ("fp16", "fp32"), MODES)


def make_scheduler(name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from dit_hf.objective import make_ddpm_scheduler

    # Learned variance is a DDPM-only feature: the other solvers take ε alone (both pipelines drop the rest).
    config = make_ddpm_scheduler(learn_sigma=True).config
    if name == "ddim":
        return DDIMScheduler.from_config(config, variance_type=None)
    return DPMSolverMultistepScheduler.from_config(config, variance_type=None)


def build(args):
    from diffusers import AutoencoderKL
    from diffusers import DiTPipeline as DiffusersDiTPipeline

    torch.manual_seed(args.seed)
    ours = DiTModel.from_preset(
        args.model,
        **args.overrides,
        sample_size=args.latent_size,
        in_channels=4,
        num_classes=1000,
        timestep_freq_shift=1,  # diffusers' timestep features, so the export is exact
    )
    with torch.no_grad():  # a zero-initialised model would make every sample the same; perturb it
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    # Eval mode, as from_pretrained leaves models: diffusers' label embedder drops labels at random in train mode.
    ours.eval()
    theirs = dit_to_diffusers(ours)
    vae = AutoencoderKL(**(SD_VAE if args.device.type == "cuda" else TINY_VAE))
    dtype = DTYPES[args.precision]
    pipes = {
        "dit-hf": DiTPipeline(transformer=ours, scheduler=make_scheduler(args.scheduler), vae=vae),
        "diffusers": DiffusersDiTPipeline(transformer=theirs, vae=vae, scheduler=make_scheduler(args.scheduler)),
    }
    for pipe in pipes.values():
        pipe.to(args.device, dtype)
        pipe.set_progress_bar_config(disable=True)
    return pipes


def compiled_variant(mode: str, transformer):
    """The transformer that `mode` runs: compiled wrappers share the weights; regional compiles in place."""
    if mode == "compile":
        return torch.compile(transformer)
    if mode == "cudagraphs":
        return torch.compile(transformer, mode="reduce-overhead")
    if mode == "regional":
        transformer.compile_repeated_blocks(fullgraph=True)
    return transformer


def uncompile_blocks(transformer) -> None:
    for block in transformer.modules():  # back to the eager blocks after a regional compile
        block._compiled_call_impl = None


def compare(results: list[dict], images: dict, modes: list[str]) -> tuple[dict, dict]:
    """(speed ratios, largest pixel differences): dit-hf against diffusers in each mode, and each compiled dit-hf
    mode against eager dit-hf."""
    by_key = {(r["impl"], r["mode"]): r for r in results}
    ratios, max_diff = {}, {}
    for mode in modes:
        if ("dit-hf", mode) in by_key and ("diffusers", mode) in by_key:
            ratios[f"dit-hf/diffusers {mode}"] = (
                by_key[("dit-hf", mode)]["images_per_s"] / by_key[("diffusers", mode)]["images_per_s"]
            )
            max_diff[mode] = (images[("dit-hf", mode)] - images[("diffusers", mode)]).abs().max().item()
        if mode != "eager" and ("dit-hf", mode) in images and ("dit-hf", "eager") in images:
            # Compiled kernels reorder floating-point sums: the images must still match the eager ones closely.
            max_diff[f"dit-hf {mode} vs eager"] = (
                (images[("dit-hf", mode)] - images[("dit-hf", "eager")]).abs().max().item()
            )
    if ("diffusers", "eager") in by_key:
        best = max((r for r in results if r["impl"] == "dit-hf"), key=lambda r: r["images_per_s"], default=None)
        if best:
            ratios["best dit-hf / diffusers eager"] = (
                best["images_per_s"] / by_key[("diffusers", "eager")]["images_per_s"]
            )
    return ratios, max_diff


def report(args, env: dict, results: list[dict], ratios: dict, max_diff: dict) -> str:
    """The markdown written next to the JSON: the settings, a table of the runs, the ratios and differences."""
    rows = [[r["impl"], r["mode"], r["images_per_s"], r["s_per_batch"], r["peak_mem_gib"]] for r in results]
    return (
        f"Sampling, {args.model} latents {args.latent_size}² batch {args.batch_size} {args.precision}, "
        f"{args.scheduler} {args.steps} steps, guidance {args.guidance_scale} — {env['device']}, "
        f"torch {env['torch']}, diffusers {env['diffusers']}\n\n"
        + markdown_table(["impl", "mode", "images/s", "s per batch", "peak GiB"], rows)
        + "\n\n"
        + "\n".join(f"- {k}: {v:.2f}×" for k, v in ratios.items())
        + "\n"
        + "\n".join(
            f"- largest pixel difference, {m if ' vs ' in m else f'dit-hf vs diffusers ({m})'}: {d:.2e}"
            for m, d in max_diff.items()
        )
    )


def run_one_by_one(args, pipes, eager: dict, variants: list, call, record) -> None:
    """GPU: time one variant at a time, so that each peak memory is its own."""
    for name, mode in variants:
        torch._dynamo.reset()
        pipes[name].transformer = compiled_variant(mode, eager[name])
        reset_memory(args.device)
        record(name, mode, time_iterations(functools.partial(call, name), args.device, args.warmup, args.repeats))
        pipes[name].transformer = eager[name]
        uncompile_blocks(eager[name])


def run_in_turns(args, pipes, eager: dict, variants: list, call, record) -> None:
    """CPU: the variants take turns call by call, so that the machine's other load reaches all of them alike; a
    regional run gets its own copy of the weights, since that compile changes the module in place."""
    prepared = {
        (n, m): compiled_variant(m, copy.deepcopy(eager[n]) if m == "regional" else eager[n]) for n, m in variants
    }

    def run_variant(name, mode):
        pipes[name].transformer = prepared[(name, mode)]
        try:
            return call(name)
        finally:
            pipes[name].transformer = eager[name]

    fns = {v: functools.partial(run_variant, *v) for v in variants}
    timings = time_interleaved(fns, args.device, args.warmup, args.repeats)
    for name, mode in variants:
        pipes[name].transformer = prepared[(name, mode)]
        record(name, mode, timings[(name, mode)])
        pipes[name].transformer = eager[name]


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    pipes = build(args)
    labels = [(i * 37) % 1000 for i in range(args.batch_size)]

    def call(name):
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        if args.device.type == "cuda":
            generator = torch.Generator(device=args.device).manual_seed(args.seed)
        with sdpa_context(args.sdpa):
            return pipes[name](
                class_labels=labels,
                guidance_scale=args.guidance_scale,
                num_inference_steps=args.steps,
                generator=generator,
                output_type="pt" if name == "dit-hf" else "np",
            ).images

    results, images = [], {}

    def record(name: str, mode: str, timing: dict):
        out = call(name)
        out = out if torch.is_tensor(out) else torch.from_numpy(out).permute(0, 3, 1, 2)
        images[(name, mode)] = out.float().cpu()
        results.append(
            {
                "impl": name,
                "mode": mode,
                "images_per_s": args.batch_size / timing["median_s"],
                "s_per_batch": timing["median_s"],
                "peak_mem_gib": peak_memory_gib(args.device),
            }
        )
        print(f"{name:9s} {mode:10s} {results[-1]['images_per_s']:8.2f} images/s", flush=True)

    # diffusers' DiTTransformer2DModel declares no repeated blocks: no regional run for it.
    variants = [(n, m) for m in args.modes for n in args.impls if not (m == "regional" and n != "dit-hf")]
    torch._dynamo.reset()
    eager = {name: pipes[name].transformer for name in args.impls}
    run_variants = run_one_by_one if args.device.type == "cuda" else run_in_turns
    run_variants(args, pipes, eager, variants, call, record)

    ratios, max_diff = compare(results, images, args.modes)
    env = environment(args.device)
    keys = ("model", "overrides", "latent_size", "batch_size", "precision", "scheduler", "steps", "guidance_scale")
    settings = {key: getattr(args, key) for key in (*keys, "sdpa", "warmup", "repeats")}
    payload = {"environment": env, "settings": settings, "results": results, "ratios": ratios, "max_diff": max_diff}
    write_results(args.out, payload, report(args, env, results, ratios, max_diff))
    return payload


if __name__ == "__main__":
    main()
