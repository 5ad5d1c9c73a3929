#!/usr/bin/env python
"""Training memory of dit-hf and diffusers' DiT, counted exactly on any device and extrapolated to any batch.

What a training step holds at its peak, apart from the allocator's workspace and fragmentation:

- **model states**, independent of the batch: float32 parameters, their gradients, AdamW's two moments and one
  float32 EMA, 20 bytes per parameter;
- **saved tensors**: what the forward keeps for the backward, counted through
  `torch.autograd.graph.saved_tensors_hooks` (each storage once, parameters excluded) on the real model at two small
  batches, and split into a part that grows with the batch (activations, per image) and a fixed part (e.g.
  autocast's low-precision weight copies).

So a CPU, in seconds, predicts what DiT-XL/2 at batch 128 keeps on a GPU, and the largest batch that fits in a given
memory. bench_train.py measures the real peak on a GPU (`torch.cuda.max_memory_allocated`); this script explains it
and compares the two models on equal terms. In bf16 the counts follow the autocast rules of the device it runs on
(CPU autocast keeps a few more operations in float32 than CUDA autocast).

    python bench/bench_memory.py                                  # DiT-XL/2 at 256 px, bf16 autocast
    python bench/bench_memory.py --gradient_checkpointing         # what recomputation saves
"""

import argparse
import os
import sys

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import add_step_args, build_models, check_fp8_args, make_forward, step_settings  # noqa: E402
from common import environment, markdown_table, write_results  # noqa: E402

from dit_hf.fp8 import convert_to_fp8, dit_fp8_module_filter  # noqa: E402

# fp32 parameter + fp32 gradient + AdamW exp_avg and exp_avg_sq + fp32 EMA.
STATE_BYTES_PER_PARAM = 4 + 4 + 8 + 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p)
    p.add_argument("--target_batch", type=int, default=128, help="Batch to predict the memory of.")
    p.add_argument("--memory_gib", type=float, default=80.0, help="Device memory for the largest-batch column.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/memory.json")
    args = p.parse_args(argv)
    # The paper's setting wherever this runs: the counts do not depend on the device's speed.
    args.device = torch.device(args.device)
    args.model = args.model or "DiT-XL/2"
    args.latent_size = args.latent_size or 32
    args.batch_size = args.batch_size or 2  # the larger of the two measured batches
    if args.batch_size < 2:
        raise SystemExit("--batch_size must be at least 2: the fixed part is separated from two batch sizes.")
    args.precision = args.precision or "bf16"
    args.overrides = {}
    args.impls = [s for s in args.impls.split(",") if s]
    check_fp8_args(args)
    return args


def storages_of(t: torch.Tensor):
    """The storages behind a tensor, looking inside tensor subclasses (torchao's FP8 tensors wrap their data)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from storages_of(getattr(t, name))
    else:
        yield t.untyped_storage()


def saved_tensor_bytes(forward, params: set[int]) -> int:
    """Bytes of the distinct storages that `forward()` saves for its backward, parameters excluded."""
    seen: dict[int, int] = {}

    def pack(t):
        for storage in storages_of(t):
            key = storage.data_ptr()
            if key not in params:
                seen[key] = max(seen.get(key, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss  # frees the graph before the next count
    return sum(seen.values())


def measure(args, name: str, model: torch.nn.Module) -> dict:
    model = model.to(args.device).train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if name in args.fp8:
        from bench_train import diffusers_fp8_module_filter

        convert_to_fp8(model, dit_fp8_module_filter if name == "dit-hf" else diffusers_fp8_module_filter)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    small, large = args.batch_size // 2, args.batch_size
    saved = {n: saved_tensor_bytes(make_forward(args, model, n), params) for n in (small, large)}
    per_image = (saved[large] - saved[small]) / (large - small)
    fixed = max(saved[large] - per_image * large, 0.0)
    n_params = sum(p.numel() for p in model.parameters())
    states = STATE_BYTES_PER_PARAM * n_params
    free = args.memory_gib * 2**30 - states - fixed
    return {
        "impl": name,
        "params_m": n_params / 1e6,
        "model_states_gib": states / 2**30,
        "saved_fixed_gib": fixed / 2**30,
        "activations_mib_per_image": per_image / 2**20,
        "predicted_gib": (states + fixed + per_image * args.target_batch) / 2**30,
        "max_batch": int(free // per_image) if per_image > 0 else None,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    models = build_models(args)
    results = [measure(args, name, models[name]) for name in args.impls]
    by_impl = {r["impl"]: r for r in results}
    ratios = {}
    if {"dit-hf", "diffusers"} <= by_impl.keys():
        ours, theirs = by_impl["dit-hf"], by_impl["diffusers"]
        ratios["predicted memory dit-hf / diffusers"] = ours["predicted_gib"] / theirs["predicted_gib"]
        ratios["activations per image dit-hf / diffusers"] = (
            ours["activations_mib_per_image"] / theirs["activations_mib_per_image"]
        )
    env = environment(args.device)
    settings = {**step_settings(args), "target_batch": args.target_batch, "memory_gib": args.memory_gib}
    header = [
        "impl",
        "params (M)",
        "model states GiB",
        "saved, fixed GiB",
        "activations MiB/image",
        f"predicted GiB at batch {args.target_batch}",
        f"largest batch in {args.memory_gib:g} GiB",
    ]
    rows = [
        [r["impl"], r["params_m"], r["model_states_gib"], r["saved_fixed_gib"], r["activations_mib_per_image"]]
        + [r["predicted_gib"], r["max_batch"]]
        for r in results
    ]
    options = [args.precision] + (["gradient checkpointing"] if args.gradient_checkpointing else [])
    options += [f"FP8 blocks in {' and '.join(args.fp8)}"] if args.fp8 else []
    table = (
        f"Training memory, {args.model} {settings['latent']} ({', '.join(options)}): model states + tensors saved "
        f"for the backward, counted on {env['device']}, torch {env['torch']}, diffusers {env['diffusers']}\n\n"
        + markdown_table(header, rows)
        + "\n\n"
        + "\n".join(f"- {k}: {v:.3f}" for k, v in ratios.items())
    )
    payload = {"environment": env, "settings": settings, "results": results, "ratios": ratios}
    write_results(args.out, payload, table)
    return payload


if __name__ == "__main__":
    main()
