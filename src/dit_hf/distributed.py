# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""FSDP on CPU processes (gloo), for checking a sharded run on a machine without GPUs.

accelerate 1.15 turns `distributed_type: FSDP` (`ACCELERATE_USE_FSDP=true`, set by `accelerate launch` from
`accelerate_configs/fsdp.yaml`) into `DistributedType.FSDP` only for GPU-like devices: `AcceleratorState` sets it in
the branch for MULTI_GPU/NPU/XPU/..., and a CPU run (`ACCELERATE_USE_CPU=1`, `DistributedType.MULTI_CPU`) silently
trains as plain DDP. PyTorch's FSDP2 (`fully_shard`) itself runs on CPU tensors over gloo.
"""

import copy
import os

from accelerate import FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType


def full_tensor(tensor):
    """The whole tensor behind an FSDP-sharded one (a DTensor; a collective: every process must call it); others as
    they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local_tensor(tensor):
    """This process's shard of an FSDP-sharded tensor (a DTensor; no communication); others as they are."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Switch a multi-process CPU `accelerator` to FSDP when the launch asked for it; call before `prepare`.

    Returns whether it switched. Does nothing on GPUs (accelerate handles FSDP there) or without
    `ACCELERATE_USE_FSDP=true`.
    """
    state = accelerator.state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set from the config
    # Every later `AcceleratorState()` copies PartialState's attributes over its own: set both.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    return True


def unsharded_copy(accelerator, model):
    """Under FSDP, a plain copy of `model` (call before `prepare`) that `gather_full_model` fills with whole weights
    for saving and the EMA for exporting; `None` otherwise (the prepared model is whole already)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return copy.deepcopy(model).requires_grad_(False)


def gather_full_model(accelerator, model, plain):
    """`model`, or under FSDP `plain` loaded with `model`'s whole weights (a collective: every process calls it)."""
    if plain is None or not isinstance(accelerator.unwrap_model(model), type(plain)):
        return model
    state_dict = accelerator.get_state_dict(model)  # gathered on the main process, FULL_STATE_DICT or not
    if accelerator.is_main_process:
        plain.load_state_dict(state_dict)
    return plain
