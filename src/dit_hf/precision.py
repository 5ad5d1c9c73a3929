# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Precision names and their compute dtypes: the one map of the trainer, the evaluation sampler and the benchmarks.

The names are accelerate's `mixed_precision` ("no", "fp16", "bf16", and "fp8", whose layers outside the FP8 matmuls
run in bf16) plus "fp32", which the sampler and the benchmarks take. The trainer also takes "auto" (the small
recipe's): bf16 where the device computes it in hardware, else float32 ([`auto_precision`]).
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


def native_bf16(device_type: str) -> bool:
    """Whether a device of this type computes bfloat16 matmuls in hardware: a CUDA GPU with bf16 (Ampere or newer), a
    CPU with AVX512-BF16 or AMX. Elsewhere bf16 is converted in software (not measured here; expect no gain)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def training_device_type() -> str:
    """The device type the run trains on: accelerate's own choice once its state exists (the trainer creates it
    before the Accelerator; it may be "mps" or "xpu" too), else CUDA when a GPU is visible and the launch did not ask
    for the CPU (`ACCELERATE_USE_CPU`)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    if PartialState._shared_state:
        return PartialState().device.type
    return "cuda" if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU") else "cpu"


def auto_precision(launcher_choice: str | None = None, device_type: str | None = None) -> str:
    """What `--mixed_precision auto` trains in: the precision of the accelerate config when it names one (not "no"),
    else bf16 where the device computes it natively ([`native_bf16`]), else "no" (float32)."""
    if launcher_choice and launcher_choice != "no":
        return launcher_choice
    return "bf16" if native_bf16(device_type or training_device_type()) else "no"
