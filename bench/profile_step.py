#!/usr/bin/env python
"""Where the training step's time goes: phases (forward, backward, optimizer, EMA) and operator categories.

Runs the step of bench_train.py (same models, inputs and compile modes) and reports, per implementation and mode:

- **phases**: each phase timed on its own (CUDA events on a GPU, a synchronised clock on CPU), median of repeats;
- **operator categories**: device time of every kernel (CPU: self time of every operator) from `torch.profiler`,
  summed into matrix products, attention, normalisation, elementwise and activation work, fused Inductor kernels,
  optimizer and EMA (foreach / fused kernels), copies and casts, random numbers, and the rest;
- the ten most expensive kernels or operators by name.

The categories show what limits a run: a step whose matrix-product share is high and whose matrix products run near
the rate of bench_ceiling.py is at its limit; time outside the matrix products is what fusion can still take away.

    python bench/profile_step.py                                                   # CPU: tiny config
    python bench/profile_step.py --modes eager,compile --out bench/results/profile-xl2.json   # CUDA: DiT-XL/2
"""

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import add_step_args, build_models, make_step, parse_step_args, step_settings  # noqa: E402
from common import (  # noqa: E402
    SDPA_BACKENDS,
    environment,
    markdown_table,
    reset_memory,
    synchronize,
    write_results,
)

PHASES = ("forward", "backward", "optimizer", "ema")
# Checked in this order against the lower-cased kernel or operator name; the first match wins.
CATEGORIES = (
    ("attention", ("attention", "flash", "fmha", "sdpa", "softmax")),
    (
        "matmul",
        (
            "gemm",
            "addmm",
            "aten::mm",
            "aten::bmm",
            "scaled_mm",
            "matmul",
            "cutlass",
            "xmma",
            "nvjet",
            "triton_tem",
            "mkl",
        ),
    ),
    # torchao's dynamic scaling (--fp8): amax reductions and casts to float8 (the FP8 GEMMs match "matmul" above).
    ("FP8 scaling", ("float8", "fp8", "e4m3", "e5m2", "amax", "clamp", "aten::abs")),
    ("optimizer + EMA", ("adam", "_foreach", "multi_tensor", "lerp")),
    ("normalization", ("layer_norm", "layernorm", "rms_norm", "rmsnorm", "group_norm")),
    ("fused (Inductor)", ("triton_", "cpp_fused", "graph_")),
    ("random numbers", ("normal", "uniform", "random", "philox", "bernoulli", "rand")),
    (
        "copy / cast",
        ("copy", "memcpy", "memset", "cat", "contiguous", "clone", "transpose", "permute", "fill", "zero"),
    ),
    (
        "elementwise / activation",
        ("gelu", "silu", "mul", "add", "sub", "div", "exp", "pow", "sqrt", "where", "elementwise", "reduce", "sum"),
    ),
)


def categorize(name: str) -> str:
    lowered = name.lower()
    for category, patterns in CATEGORIES:
        if any(p in lowered for p in patterns):
            return category
    return "other"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p)
    p.add_argument("--modes", default="eager", help="Comma list of eager, compile, regional (dit-hf only).")
    p.add_argument("--sdpa", choices=SDPA_BACKENDS, default="auto")
    p.add_argument("--warmup", type=int, default=None, help="Default: 3 (10 with compile).")
    p.add_argument("--repeats", type=int, default=10, help="Steps timed phase by phase.")
    p.add_argument("--profiled_steps", type=int, default=3, help="Steps recorded by the profiler.")
    p.add_argument("--top", type=int, default=10, help="Most expensive kernels or operators listed per run.")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/profile.json")
    return parse_step_args(p, argv)


class PhaseMarks:
    """The `mark` callback of the step: stamps the end of each phase (a CUDA event, or a synchronised clock)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps = [("start", self._stamp())]

    def _stamp(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        synchronize(self.device)
        return time.perf_counter()

    def __call__(self, phase: str):
        self.stamps.append((phase, self._stamp()))

    def durations_ms(self) -> dict[str, float]:
        synchronize(self.device)
        out = {}
        for (_, t0), (phase, t1) in zip(self.stamps, self.stamps[1:]):
            out[phase] = t0.elapsed_time(t1) if self.device.type == "cuda" else (t1 - t0) * 1000
        return out


def time_phases(steps: dict, device: torch.device, repeats: int) -> dict[str, dict[str, float]]:
    """Median milliseconds of each phase over `repeats` steps, per named step; the steps take turns call by call."""
    samples = {name: defaultdict(list) for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            marks = PhaseMarks(device)
            step(marks)
            for phase, ms in marks.durations_ms().items():
                samples[name][phase].append(ms)
    return {name: {phase: statistics.median(s[phase]) for phase in PHASES} for name, s in samples.items()}


def profile_categories(step, device: torch.device, steps: int, top: int) -> dict:
    """Per-step milliseconds by operator category, and the `top` most expensive names (from torch.profiler)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    per_name = defaultdict(float)
    for event in prof.key_averages():
        if device.type == "cuda":
            # Kernels carry device time of their own; CPU-side operators also report their kernels' time, so only
            # events that ran on the device are counted.
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            per_name[event.key] += us / 1000 / steps
    by_category = defaultdict(float)
    for name, ms in per_name.items():
        by_category[categorize(name)] += ms
    total = sum(by_category.values())
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
    return {
        "total_ms": total,
        "categories": {
            k: {"ms": v, "share": v / total} for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])
        },
        "top": [{"name": name, "ms": ms, "category": categorize(name)} for name, ms in ranked],
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    runs = []
    interleave = args.device.type != "cuda"  # as in bench_train.py: on CPU the implementations take turns
    for mode in args.modes:
        names = [n for n in args.impls if not (mode == "regional" and n != "dit-hf")]
        groups = [names] if interleave else [[n] for n in names]
        for group in groups:
            torch._dynamo.reset()
            reset_memory(args.device)
            prepared = {}
            for name in group:
                model = build_models(args)[name]
                prepared[name] = (model, make_step(args, model, mode, args.sdpa))
            warmup = args.warmup if args.warmup is not None else (10 if mode != "eager" else 3)
            for _, step in prepared.values():
                for _ in range(warmup):
                    step()
            synchronize(args.device)
            phases = time_phases({k: step for k, (_, step) in prepared.items()}, args.device, args.repeats)
            for name, (model, step) in prepared.items():
                ops = profile_categories(step, args.device, args.profiled_steps, args.top)
                runs.append({"impl": name, "mode": mode, "phases_ms": phases[name], **ops})
                model.to("cpu")
                print(f"{name:9s} {mode:8s} step {sum(phases[name].values()):8.2f} ms", flush=True)

    env = environment(args.device)
    unit = "device" if args.device.type == "cuda" else "CPU self"
    sections = [
        f"Training step profile, {args.model} batch {args.batch_size} {args.precision}, sdpa {args.sdpa} — "
        f"{env['device']}, torch {env['torch']}, diffusers {env['diffusers']}",
        "Phases (ms, median of each):\n\n"
        + markdown_table(
            ["impl", "mode", *PHASES, "step"],
            [[r["impl"], r["mode"], *r["phases_ms"].values(), sum(r["phases_ms"].values())] for r in runs],
        ),
    ]
    categories = sorted(
        {c for r in runs for c in r["categories"]},
        key=lambda c: -max(r["categories"].get(c, {"ms": 0})["ms"] for r in runs),
    )
    sections.append(
        f"Operator categories ({unit} ms per step; share of the profiled total):\n\n"
        + markdown_table(
            ["category", *[f"{r['impl']} {r['mode']}" for r in runs]],
            [
                [c]
                + [
                    f"{r['categories'][c]['ms']:.3g} ({r['categories'][c]['share']:.0%})"
                    if c in r["categories"]
                    else "–"
                    for r in runs
                ]
                for c in categories
            ],
        )
    )
    for r in runs:
        sections.append(
            f"Top {args.top}, {r['impl']} {r['mode']} ({unit} ms per step):\n\n"
            + markdown_table(
                ["name", "category", "ms"],
                [[t["name"][:90].replace("|", "/"), t["category"], t["ms"]] for t in r["top"]],
            )
        )
    settings = {
        **step_settings(args),
        "sdpa": args.sdpa,
        "repeats": args.repeats,
        "profiled_steps": args.profiled_steps,
    }
    payload = {"environment": env, "settings": settings, "runs": runs}
    write_results(args.out, payload, "\n\n".join(sections))
    return payload


if __name__ == "__main__":
    main()
