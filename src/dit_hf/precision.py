# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Precision names and their compute dtypes: the one map of the trainer, the evaluation sampler and the benchmarks.

The names are accelerate's `mixed_precision` ("no", "fp16", "bf16", and "fp8", whose layers outside the FP8 matmuls
run in bf16) plus "fp32", which the sampler and the benchmarks take.
"""

import torch

PRECISION_DTYPES = {
    "no": torch.float32,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8": torch.bfloat16,
}
# What the sampler and the benchmarks accept: plain dtypes, no FP8.
SAMPLING_PRECISIONS = ("fp32", "bf16", "fp16")


def precision_dtypes(names=SAMPLING_PRECISIONS) -> dict[str, torch.dtype]:
    """The name -> dtype map restricted to `names`."""
    return {name: PRECISION_DTYPES[name] for name in names}
