#!/usr/bin/env python
"""Training throughput: dit-hf's DiTModel vs diffusers' DiTTransformer2DModel, side by side, same inputs.

Both models carry the same weights (dit-hf's model exported with `dit_to_diffusers`) and run the same full training
step: the DiT objective (ε-MSE + learned-variance VLB, `DDPMObjective`), then the trainer's own `update_step`
(backward, AdamW fused as the trainer builds it, gradient clipping off) and an EMA update (`EMAModels`). Only the model
differs, so the ratio is the model's. `--fp8 dit-hf` runs the blocks' token-wise matmuls of dit-hf in FP8 (torchao;
`--fp8 dit-hf,diffusers` applies the same to both models). `--sdpa` repeats the runs per attention backend;
`--ceiling_json` (from bench_ceiling.py) adds each run's share of the measured matmul ceiling and of the step's
shape-limited throughput.

    python bench/bench_train.py                                   # CPU: a tiny config, seconds
    python bench/bench_train.py --model DiT-XL/2 --latent_size 32 --batch_size 128 --precision bf16 \\
        --modes eager,compile --out bench/results/train-xl2.json    # one GPU: the paper's 256 px setting
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    SDPA_BACKENDS,
    add_model_args,
    apply_device_defaults,
    default_peak_tflops,
    environment,
    markdown_table,
    peak_memory_gib,
    reset_memory,
    sdpa_context,
    sdpa_refused,
    time_interleaved,
    time_iterations,
    write_results,
)

from dit_hf import DiTModel  # noqa: E402
from dit_hf.convert import dit_to_diffusers  # noqa: E402
from dit_hf.ema import EMAModels  # noqa: E402
from dit_hf.fp8 import (  # noqa: E402
    check_fp8_available,
    convert_to_fp8,
    count_fp8_linears,
    dit_fp8_module_filter,
    fp8_capable_linear,
)
from dit_hf.objective import DDPMObjective, make_ddpm_scheduler  # noqa: E402
from dit_hf.trainer import update_step  # noqa: E402
from dit_hf.training import dit_train_flops_per_sample, make_adamw  # noqa: E402


def add_step_args(p):
    """Options of the benchmarked step, shared with profile_step.py."""
    add_model_args(p, "Default: 128 on CUDA, 16 on CPU.", ("fp32", "bf16"), "Default: bf16 on CUDA.")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--impls", default="dit-hf,diffusers")
    p.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute each block in the backward (both models): less activation memory for a larger batch.",
    )
    p.add_argument(
        "--fp8",
        default="",
        help="Comma list of implementations (dit-hf, diffusers) whose blocks run their token-wise linear layers "
        "(attention in/out, MLP) as torchao Float8Linear: FP8 matmuls with per-tensor scales, bf16 elsewhere. "
        "Needs --precision bf16, torchao and a GPU of compute capability 8.9+ (a CPU emulates FP8, slowly).",
    )


def parse_step_args(p: argparse.ArgumentParser, argv=None):
    """Parse, fill the device defaults of the step and check --fp8 (shared with profile_step.py)."""
    args = apply_device_defaults(p.parse_args(argv), (128, 16), ("bf16", "fp32"), ("eager", "compile", "regional"))
    check_fp8_args(args)
    return args


def check_fp8_args(args) -> None:
    """Parse `--fp8` into a list and refuse what cannot run, naming the fix."""
    args.fp8 = [s for s in args.fp8.split(",") if s]
    unknown = sorted(set(args.fp8) - {"dit-hf", "diffusers"})
    if unknown:
        raise SystemExit(f"--fp8: unknown implementation(s) {unknown}; use dit-hf, diffusers or both.")
    if args.fp8 and args.precision != "bf16":
        raise SystemExit(f"--fp8 runs the other layers in bf16 autocast: add --precision bf16 (got {args.precision}).")
    if args.fp8:
        try:
            check_fp8_available(args.device)
        except (ImportError, ValueError) as e:
            raise SystemExit(str(e).replace("--mixed_precision fp8", "--fp8")) from None


def diffusers_fp8_module_filter(module: torch.nn.Module, fqn: str) -> bool:
    """The token-wise layers of diffusers' DiT blocks (attn1.to_q/k/v/out, ff), as dit_fp8_module_filter picks."""
    parts = fqn.split(".")
    return parts[0] == "transformer_blocks" and parts[2] in ("attn1", "ff") and fp8_capable_linear(module)


def step_settings(args) -> dict:
    """The settings of the benchmarked step, for the result files."""
    return {
        "model": args.model,
        "overrides": args.overrides,
        "latent": [args.channels, args.latent_size, args.latent_size],
        "batch_size": args.batch_size,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "fp8": args.fp8,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p)
    p.add_argument(
        "--modes",
        default="eager",
        help="Comma list of eager, compile (torch.compile of the model), "
        "regional (compile each repeated block; dit-hf only).",
    )
    p.add_argument("--warmup", type=int, default=None, help="Default: 5 (10 with compile).")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--peak_tflops", type=float, default=None, help="For MFU; default: data sheet of known GPUs.")
    p.add_argument(
        "--sdpa",
        default="auto",
        help=f"Comma list of attention backends to run each mode with: {', '.join(SDPA_BACKENDS)}.",
    )
    p.add_argument(
        "--ceiling_json",
        default=None,
        help="Output of bench_ceiling.py on this device: adds each run's share of the measured ceilings.",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/train.json")
    return parse_step_args(p, argv)


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


def make_forward(args, model, batch_size: int):
    """The step's forward: the DiT objective (ε-MSE + VLB) on a fixed random batch, in the run's precision."""
    objective = DDPMObjective(make_ddpm_scheduler(learn_sigma=True), learn_sigma=True)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    n, c, s, device = batch_size, args.channels, args.latent_size, args.device
    x0 = torch.randn((n, c, s, s), generator=g).to(device)
    labels = torch.randint(0, 1000, (n,), generator=g).to(device)
    timesteps = torch.randint(0, 1000, (n,), generator=g).to(device)
    noise = torch.randn((n, c, s, s), generator=g).to(device)

    def forward() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            return objective(model, x0, labels, timesteps=timesteps, noise=noise).loss

    return forward


def make_step(args, model: torch.nn.Module, mode: str, sdpa: str = "auto"):
    """The benchmarked training step for `model` (moved to the device, compiled as `mode` says).

    Returns `step(mark=None)`; `mark(phase)`, when given, is called after each phase ("forward", "backward",
    "optimizer", "ema") so that bench/profile_step.py can time the phases of exactly this step.
    """
    device = args.device
    model = model.to(device).train()
    impl = "dit-hf" if isinstance(model, DiTModel) else "diffusers"
    if impl in args.fp8:  # before compiling, as torchao expects
        convert_to_fp8(model, dit_fp8_module_filter if impl == "dit-hf" else diffusers_fp8_module_filter)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = make_adamw(model.parameters(), device, lr=1e-4, weight_decay=0.0)  # as train_dit.py builds it
    ema = EMAModels(model, [0.9999])
    if mode == "compile":
        runner = torch.compile(model)
    elif mode == "regional":
        model.compile_repeated_blocks(fullgraph=True)
        runner = model
    else:
        runner = model
    forward = make_forward(args, runner, args.batch_size)

    def step(mark=None):
        # The backend is picked in the forward (when compiled graphs are traced, too); backward follows it.
        with sdpa_context(sdpa):
            loss = forward()
        if mark:
            mark("forward")
        update_step(loss, optimizer, mark=mark)  # the trainer's step: backward, optimizer step, zeroed gradients
        ema.update(model)
        if mark:
            mark("ema")
        return loss

    return step


def describe(args, name: str, model: torch.nn.Module, mode: str, sdpa: str, timing: dict) -> dict:
    n, s, device = args.batch_size, args.latent_size, args.device
    img_s = n / timing["median_s"]
    cfg = model.config
    hidden = cfg.hidden_size if name == "dit-hf" else cfg.num_attention_heads * cfg.attention_head_dim
    depth = cfg.depth if name == "dit-hf" else cfg.num_layers
    tokens = (s // cfg.patch_size) ** 2
    flops = dit_train_flops_per_sample(hidden, depth, tokens)
    peak = args.peak_tflops or default_peak_tflops(device)
    return {
        "impl": name,
        "fp8_layers": count_fp8_linears(model)[0],
        "mode": mode,
        "sdpa": sdpa,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "img_per_s": img_s,
        "step_ms": timing["median_s"] * 1000,
        "step_ms_min": timing["min_s"] * 1000,
        "step_ms_max": timing["max_s"] * 1000,
        "achieved_tflops": img_s * flops / 1e12,
        "mfu": img_s * flops / (peak * 1e12) if peak else None,
        "peak_mem_gib": peak_memory_gib(device),
    }


def run_setting(args, mode: str, sdpa: str) -> list[dict]:
    """Both implementations in one mode and attention backend.

    On a GPU one after the other, each alone in memory so that its peak memory is its own. On CPU, where nothing
    measures memory and timings drift with the machine's other load, the two steps take turns call by call.
    """
    names = [n for n in args.impls if not (mode == "regional" and n != "dit-hf")]  # diffusers has no repeated blocks
    warmup = args.warmup if args.warmup is not None else (10 if mode != "eager" else 5)
    interleave = args.device.type != "cuda"
    torch._dynamo.reset()
    prepared, results = {}, []
    for name in names:
        if not interleave:
            torch._dynamo.reset()
            reset_memory(args.device)
        model = build_models(args)[name]  # fresh weights for every run: earlier runs' steps changed them
        step = make_step(args, model, mode, sdpa)
        try:
            step()  # the first call also finds out whether the attention backend takes this shape
        except RuntimeError as e:
            if not sdpa_refused(e):
                raise
            print(f"{name:9s} {mode:8s} sdpa={sdpa}: backend refuses this shape/dtype, skipped", flush=True)
            model.to("cpu")
            continue
        if interleave:
            prepared[name] = (model, step)
        else:
            timing = time_iterations(step, args.device, warmup, args.repeats)
            results.append(describe(args, name, model, mode, sdpa, timing))
            model.to("cpu")
    if prepared:
        timings = time_interleaved({k: step for k, (_, step) in prepared.items()}, args.device, warmup, args.repeats)
        results += [describe(args, k, model, mode, sdpa, timings[k]) for k, (model, _) in prepared.items()]
    return results


def load_ceiling(args) -> dict | None:
    """bench_ceiling.py's result for this model, batch and precision; refused when it was measured for others."""
    if not args.ceiling_json:
        return None
    with open(args.ceiling_json) as f:
        ceiling = json.load(f)
    measured = ceiling["settings"]
    wanted = {"model": args.model, "batch_size": args.batch_size, "precision": args.precision}
    mismatch = {k: measured.get(k) for k, v in wanted.items() if measured.get(k) != v}
    if mismatch:
        raise SystemExit(
            f"--ceiling_json {args.ceiling_json} was measured for {mismatch}, this run is {wanted}: rerun "
            f"bench_ceiling.py with --model {args.model} --batch_size {args.batch_size} --precision {args.precision}."
        )
    return ceiling


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ceiling = load_ceiling(args)
    backends = [b for b in args.sdpa.split(",") if b]
    for backend in backends:
        sdpa_context(backend)  # unknown names fail here, before any model is built
    results = []
    for sdpa in backends:
        for mode in args.modes:
            for result in run_setting(args, mode, sdpa):
                if ceiling:
                    result["of_matmul_ceiling"] = result["achieved_tflops"] / ceiling["matmul_tflops"]
                    result["of_shape_limit"] = result["img_per_s"] / ceiling["shape_limited_img_per_s"]
                results.append(result)
                print(f"{result['impl']:9s} {mode:8s} sdpa={sdpa:9s} {result['img_per_s']:9.1f} img/s", flush=True)
    if not results:
        raise SystemExit("No run completed: every --sdpa backend refused this shape, dtype or device.")

    def best(impl, mode=None):
        runs = [r for r in results if r["impl"] == impl and mode in (None, r["mode"])]
        return max(runs, key=lambda r: r["img_per_s"], default=None)

    ratios = {}
    for mode in args.modes:
        for sdpa in backends:
            pair = [
                next((r for r in results if (r["impl"], r["mode"], r["sdpa"]) == (impl, mode, sdpa)), None)
                for impl in ("dit-hf", "diffusers")
            ]
            if all(pair):
                suffix = "" if len(backends) == 1 else f" sdpa={sdpa}"
                ratios[f"dit-hf/diffusers {mode}{suffix}"] = pair[0]["img_per_s"] / pair[1]["img_per_s"]
    if best("dit-hf") and best("diffusers", "compile"):
        # The project's training target: the best dit-hf run against the best compiled diffusers run.
        ratios["best dit-hf / best compiled diffusers"] = (
            best("dit-hf")["img_per_s"] / best("diffusers", "compile")["img_per_s"]
        )
    if best("dit-hf") and best("diffusers"):
        ratios["best dit-hf / best diffusers"] = best("dit-hf")["img_per_s"] / best("diffusers")["img_per_s"]
    env = environment(args.device)
    settings = {
        **step_settings(args),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "sdpa": backends,
        "step": "DDPMObjective (eps MSE + VLB) + backward + AdamW + EMA",
    }
    header = ["impl", "FP8 layers", "mode", "sdpa", "params (M)", "img/s", "step ms (median)", "MFU", "peak GiB"]
    rows = [
        [r["impl"], r["fp8_layers"], r["mode"], r["sdpa"], r["params_m"], r["img_per_s"], r["step_ms"]]
        + [r["mfu"], r["peak_mem_gib"]]
        for r in results
    ]
    if ceiling:
        header += ["of measured matmul ceiling", "of shape limit"]
        for row, r in zip(rows, results):
            row += [r["of_matmul_ceiling"], r["of_shape_limit"]]
    table = (
        f"Training step, {args.model} {settings['latent']} batch {args.batch_size} {args.precision}"
        f"{', FP8 matmuls in the blocks of ' + ' and '.join(args.fp8) if args.fp8 else ''}"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''} — "
        f"{env['device']}, torch {env['torch']}, diffusers {env['diffusers']}\n\n"
        + markdown_table(header, rows)
        + "\n\n"
        + "\n".join(f"- {k}: {v:.2f}×" for k, v in ratios.items())
    )
    if ceiling:
        table += (
            f"\n- measured ceilings (bench_ceiling.py): matmul {ceiling['matmul_tflops']:.1f} TFLOP/s, i.e. "
            f"{ceiling['matmul_limited_img_per_s']:,.0f} img/s; this step's GEMM + attention shapes "
            f"{ceiling['shape_limited_img_per_s']:,.0f} img/s"
        )
    payload = {"environment": env, "settings": settings, "results": results, "ratios": ratios, "ceiling": ceiling}
    write_results(args.out, payload, table)
    return payload


if __name__ == "__main__":
    main()
