#!/usr/bin/env python
"""Measured ceilings of the device, against which the training throughput is judged.

Data-sheet peaks overstate what a chip sustains; this script measures, on the machine at hand:

- the matrix-multiply rate: one large square product in the training precision (TFLOP/s), and the same product in
  FP8 (`torch._scaled_mm`, e4m3 operands with per-tensor scales, bf16 result) where the device has it: the rate that
  `bench_train.py --fp8` can approach;
- device-memory bandwidth: a large device-to-device copy, bytes read plus bytes written (GB/s);
- every matrix product of a DiT training step at the model's own shapes (forward, and the two backward products of
  each linear layer), and attention forward + backward through each scaled-dot-product backend that accepts the
  shape (flash, memory-efficient, cuDNN, math) — head dim 72 at DiT-XL/2 is an unusual size for fused kernels;
- from those, the **shape-limited throughput**: images/s if the step did nothing but its linear layers and its
  attention at the measured rates (embedders, norms, elementwise work, optimizer and EMA cost nothing). No
  implementation of the step can be faster, so `bench_train.py --ceiling_json` reports each run against it.

    python bench/bench_ceiling.py                                          # CPU: tiny shapes, fp32
    python bench/bench_ceiling.py --out bench/results/ceiling-xl2.json     # CUDA: DiT-XL/2, batch 128, bf16
"""

import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    SDPA_BACKENDS,
    add_model_args,
    apply_device_defaults,
    environment,
    markdown_table,
    sdpa_context,
    sdpa_refused,
    time_iterations,
    write_results,
)

from dit_hf.modeling_dit import DIT_PRESETS  # noqa: E402
from dit_hf.precision import precision_dtypes  # noqa: E402
from dit_hf.training import dit_train_flops_per_sample  # noqa: E402

DTYPES = precision_dtypes()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, "Default: 128 on CUDA, 16 on CPU.", tuple(sorted(DTYPES)), "Default: bf16 on CUDA, fp32 on CPU.")
    p.add_argument("--matmul_size", type=int, default=None, help="Side of the square product (8192 CUDA, 512 CPU).")
    p.add_argument("--copy_mib", type=int, default=None, help="Bytes copied per call (2048 MiB CUDA, 64 MiB CPU).")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="bench/results/ceiling.json")
    args = p.parse_args(argv)
    args.impls, args.modes = "", ""  # not used here; apply_device_defaults expects them
    args = apply_device_defaults(args, (128, 16), ("bf16", "fp32"), ())
    on_gpu = args.device.type == "cuda"
    args.matmul_size = args.matmul_size or (8192 if on_gpu else 512)
    args.copy_mib = args.copy_mib or (2048 if on_gpu else 64)
    return args


def model_shape(args) -> dict:
    """Width, depth, heads and tokens of the benchmarked model (the CPU default keeps bench_train's tiny width)."""
    if args.model not in DIT_PRESETS:
        raise SystemExit(f"--model: {args.model!r} is not a DiT preset; use one of {', '.join(DIT_PRESETS)}.")
    preset = {**DIT_PRESETS[args.model], **args.overrides}
    tokens = (args.latent_size // preset["patch_size"]) ** 2
    return dict(hidden=preset["hidden_size"], depth=preset["depth"], heads=preset["num_heads"], tokens=tokens)


def time_matmul(m: int, k: int, n: int, dtype, device, warmup: int, repeats: int) -> dict:
    """(m, k) @ (k, n) on random data (zeros can run faster than real data)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    timing = time_iterations(functools.partial(torch.matmul, a, b), device, warmup, repeats)
    return {"shape": [m, k, n], "s": timing["median_s"], "tflops": 2 * m * k * n / timing["median_s"] / 1e12}


def time_fp8_matmul(size: int, device, warmup: int, repeats: int) -> dict | None:
    """A size³ FP8 product as torchao's Float8Linear runs it; None where `torch._scaled_mm` refuses the device."""
    a = torch.randn(size, size, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(size, size, device=device).to(torch.float8_e4m3fn).t()  # the second operand column-major
    one = torch.ones((), device=device)
    call = functools.partial(torch._scaled_mm, a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    try:
        call()
    except RuntimeError:
        return None
    timing = time_iterations(call, device, warmup, repeats)
    return {"shape": [size] * 3, "s": timing["median_s"], "tflops": 2 * size**3 / timing["median_s"] / 1e12}


def time_copy(mib: int, device, warmup: int, repeats: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the bytes read and the bytes written."""
    src = torch.randn(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    timing = time_iterations(functools.partial(dst.copy_, src), device, warmup, repeats)
    return 2 * src.numel() * 4 / timing["median_s"] / 1e9


def time_attention(backend: str, n: int, heads: int, tokens: int, head_dim: int, dtype, device, warmup, repeats):
    """Forward + backward of one attention layer through one SDPA backend; None when it refuses the shape."""
    q, k, v = (
        torch.randn(n, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    grad = torch.randn(n, heads, tokens, head_dim, device=device, dtype=dtype)

    def step():
        with sdpa_context(backend):
            out = F.scaled_dot_product_attention(q, k, v)
        q.grad = k.grad = v.grad = None
        out.backward(grad)

    try:
        step()
    except RuntimeError as e:
        if sdpa_refused(e):
            return None
        raise
    timing = time_iterations(step, device, warmup, repeats)
    # Forward: QK^T and PV, 2 T² d multiply-adds per head; backward twice that.
    flops = 3 * 4 * n * heads * tokens**2 * head_dim
    return {"backend": backend, "s": timing["median_s"], "tflops": flops / timing["median_s"] / 1e12}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = args.device, DTYPES[args.precision]
    torch.backends.cuda.matmul.allow_tf32 = True
    w, r = args.warmup, args.repeats
    size = args.matmul_size
    square = time_matmul(size, size, size, dtype, device, w, r)
    fp8 = time_fp8_matmul(size, device, w, r)
    copy_gbps = time_copy(args.copy_mib, device, w, r)

    shape = model_shape(args)
    d, depth, heads, tokens = shape["hidden"], shape["depth"], shape["heads"], shape["tokens"]
    m = args.batch_size * tokens
    # Each linear layer of a block: (in, out). Training runs y = x W (m,in,out), dX = dY Wᵀ (m,out,in) and
    # dW = Xᵀ dY (in,m,out); all three cost 2·m·in·out FLOPs.
    layers = {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, 4 * d), "fc2": (4 * d, d)}
    gemms, block_gemm_s = [], 0.0
    for name, (fan_in, fan_out) in layers.items():
        for role, (a, b, c) in {
            "forward": (m, fan_in, fan_out),
            "grad input": (m, fan_out, fan_in),
            "grad weight": (fan_in, m, fan_out),
        }.items():
            result = time_matmul(a, b, c, dtype, device, w, r)
            gemms.append({"layer": name, "role": role, **result})
            block_gemm_s += result["s"]

    attention = []
    for backend in SDPA_BACKENDS:
        if backend == "auto":
            continue
        result = time_attention(backend, args.batch_size, heads, tokens, d // heads, dtype, device, w, r)
        if result is not None:
            attention.append(result)
    best_attention = min(attention, key=lambda a: a["s"])

    step_s = depth * (block_gemm_s + best_attention["s"])
    flops_per_sample = dit_train_flops_per_sample(d, depth, tokens)
    payload = {
        "environment": environment(device),
        "settings": {
            "model": args.model,
            **shape,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "matmul_size": size,
            "copy_mib": args.copy_mib,
        },
        "matmul_tflops": square["tflops"],
        "fp8_matmul_tflops": fp8["tflops"] if fp8 else None,
        "copy_gbps": copy_gbps,
        "gemms": gemms,
        "attention": attention,
        "best_attention_backend": best_attention["backend"],
        "shape_limited_step_s": step_s,
        "shape_limited_img_per_s": args.batch_size / step_s,
        # The same step at the square product's rate: the "physical limit" convention of the baselines.
        "matmul_limited_img_per_s": square["tflops"] * 1e12 / flops_per_sample,
        "fp8_matmul_limited_img_per_s": fp8["tflops"] * 1e12 / flops_per_sample if fp8 else None,
        "flops_per_sample": flops_per_sample,
    }
    env = payload["environment"]
    rows = [[f"{g['layer']} {g['role']}", "×".join(map(str, g["shape"])), g["s"] * 1e3, g["tflops"]] for g in gemms]
    rows += [[f"attention fwd+bwd ({a['backend']})", "", a["s"] * 1e3, a["tflops"]] for a in attention]
    table = (
        f"Ceilings, {args.model} training shapes, batch {args.batch_size} {args.precision} — {env['device']}, "
        f"torch {env['torch']}\n\n"
        f"- matmul {size}³ {args.precision}: {square['tflops']:.1f} TFLOP/s\n"
        + (f"- matmul {size}³ fp8 (e4m3, `torch._scaled_mm`): {fp8['tflops']:.1f} TFLOP/s\n" if fp8 else "")
        + f"- device copy: {copy_gbps:,.0f} GB/s (read + write)\n"
        f"- step limited by the measured matmul rate: {payload['matmul_limited_img_per_s']:,.0f} img/s\n"
        f"- step limited by its own GEMM and attention shapes ({best_attention['backend']} attention): "
        f"{payload['shape_limited_img_per_s']:,.0f} img/s\n\n"
        + markdown_table(["product", "m×k×n", "ms (median)", "TFLOP/s"], rows)
    )
    write_results(args.out, payload, table)
    return payload


if __name__ == "__main__":
    main()
