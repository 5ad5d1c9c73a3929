# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""FP8 training matmuls through torchao's `Float8Linear`, in the layers of a DiT where they can pay.

On Hopper and Ada GPUs (compute capability 8.9+) the FP8 matrix-product peak is twice the bf16 one. torchao's
`Float8Linear` casts a linear layer's input and weight to `float8_e4m3fn` (and the output gradient to `float8_e5m2`)
with one dynamic scale per tensor, multiplies with `torch._scaled_mm`, and keeps the weights, gradients and optimizer
states in their usual precision, so checkpoints are unchanged.

Only the token-wise layers of the transformer blocks are converted: attention `qkv` and `proj` and the MLP (`fc1`,
`fc2`, or SwiGLU's `w12`, `w3`), which hold nearly all of the FLOPs. The adaLN modulation, the embedders and the final
layer act on one vector per sample or are small: in FP8 their cast overhead would exceed the gain, and they set the
scale and shift of every activation, where precision matters most. `_scaled_mm` needs both dimensions divisible by
16, so layers that are not are left alone too.

In `train_dit.py` this is `--mixed_precision fp8` (on a GPU, bf16 autocast around the FP8 layers); accelerate converts
the model in `prepare` with the recipe of [`fp8_recipe`]. On a CPU the FP8 casts are emulated, much slower than
float32: it runs, for checking a configuration, not for training.
"""

import importlib.util

import torch
from torch import nn

# Block-level module names that see every token (dit_hf.modeling_dit.DiTBlock and its MLP variants).
TOKEN_WISE_LAYERS = ("qkv", "proj", "fc1", "fc2", "w12", "w3")


def fp8_capable_linear(module: nn.Module) -> bool:
    """A linear layer that `torch._scaled_mm` can multiply: both widths multiples of 16."""
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def dit_fp8_module_filter(module: nn.Module, fqn: str) -> bool:
    """Whether `module` (named `fqn` inside a `DiTModel`) should run its matmuls in FP8: see the module docstring."""
    parts = fqn.split(".")
    return parts[0] in ("blocks", "head_blocks") and parts[-1] in TOKEN_WISE_LAYERS and fp8_capable_linear(module)


def check_fp8_available(device: torch.device | None = None) -> None:
    """Raise, naming the fix, when FP8 training cannot run: no torchao, or `device` a CUDA GPU older than sm 8.9."""
    if importlib.util.find_spec("torchao") is None:
        raise ImportError(
            "--mixed_precision fp8 runs the block matmuls through torchao's Float8Linear, and torchao is not "
            "installed: `pip install torchao` (or `pip install dit-hf[fp8]`), or train with --mixed_precision bf16."
        )
    if device is not None and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ValueError(
                f"--mixed_precision fp8 needs a GPU with FP8 matmuls (compute capability 8.9 or higher: H100, H200, "
                f"L4, L40S, RTX 4090); {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. "
                "Use --mixed_precision bf16."
            )


def fp8_config():
    """torchao's default recipe (dynamic per-tensor scales), without the FSDP2 FP8 all-gather.

    The all-gather option turns every converted weight into a tensor subclass, which only FSDP2 needs; the trainer's
    EMA keeps full, plain weights on every process.
    """
    from torchao.float8 import Float8LinearConfig

    return Float8LinearConfig(enable_fsdp_float8_all_gather=False)


def fp8_recipe():
    """The accelerate handler for `Accelerator(mixed_precision="fp8", kwargs_handlers=[fp8_recipe()])`."""
    from accelerate.utils import AORecipeKwargs

    return AORecipeKwargs(config=fp8_config(), module_filter_func=dit_fp8_module_filter)


def convert_to_fp8(model: nn.Module, module_filter=dit_fp8_module_filter) -> nn.Module:
    """Swap the layers that `module_filter(module, name)` selects for `Float8Linear`, in place (outside accelerate)."""
    from torchao.float8 import convert_to_float8_training

    return convert_to_float8_training(model, config=fp8_config(), module_filter_fn=module_filter)


def is_fp8_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "Float8Linear" and isinstance(module, nn.Linear)


def count_fp8_linears(model: nn.Module) -> tuple[int, int]:
    """(FP8 layers, all linear layers) in `model`."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(is_fp8_linear(m) for m in linears), len(linears)


def strip_fp8(model: nn.Module) -> nn.Module:
    """Swap every `Float8Linear` back to a plain `nn.Linear` holding the same parameters, in place; returns `model`.

    For sampling and saving: a pipeline should compute, and a saved folder should load, exactly like a model that
    was never converted.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_fp8_linear(child):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                linear.weight = child.weight
                linear.bias = child.bias
                linear.train(child.training)
                setattr(parent, name, linear)
    return model
