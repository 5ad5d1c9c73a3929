# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Exponential moving averages (EMA) of a model's weights, at one or several decay rates.

DiT samples from an EMA of the weights (decay 0.9999, updated after every optimizer step): `ema = decay * ema +
(1 - decay) * param`. Tracking several rates at once costs one float32 copy of the parameters per rate and lets one
run compare them (e.g. `--ema_decay 0.999,0.9999`).

Use in an accelerate trainer::

    ema = EMAModels(accelerator.unwrap_model(model), args.ema_decay)
    ...
    if accelerator.sync_gradients:  # once per optimizer step, not per micro-batch of gradient accumulation
        ema.update(accelerator.unwrap_model(model))
    ...
    save_ema(ema, checkpoint_dir, lambda i: ema.averaged_model(accelerator.unwrap_model(model), i))  # checkpoint
    load_ema(ema, checkpoint_dir)  # resume: the exact state back

Checkpoints hold the EMA as safetensors folders and JSON ([`save_ema`]), not as a pickle: accelerate's
`register_for_checkpointing` would store it as `custom_checkpoint_0.pkl` and read that back with
`torch.load(weights_only=False)`, which runs whatever code a crafted file carries.

The caller unwraps: these methods expect the plain module (no DDP `module.` or torch.compile `_orig_mod.` prefix in
the parameter names) and raise ValueError when the names do not match. Sharded parameters (FSDP, DeepSpeed ZeRO-3)
are not supported: each process must hold the full weights.
"""

import copy
import json
import os
from collections.abc import Callable, Sequence
from itertools import zip_longest

import torch
from safetensors.torch import load_file
from torch import nn

from .distributed import full_tensor

EMA_STATE = "ema_state.json"
SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
SAFE_WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def parse_ema_decays(spec: str | float | Sequence[float | str]) -> list[float]:
    """`--ema_decay`: "0.9999" or "0.999,0.9999" (or a float, or a list) -> `[0.999, 0.9999]`.

    Each decay must lie in [0, 1) (0 keeps a plain copy of the latest weights) and the rates must be distinct.
    """
    if isinstance(spec, str):
        items = [item.strip() for item in spec.split(",")]
    elif isinstance(spec, (int, float)):
        items = [spec]
    else:
        items = list(spec)
    decays = []
    for item in items:
        try:
            decays.append(float(item))
        except (TypeError, ValueError):
            raise ValueError(
                f"--ema_decay {spec!r}: {item!r} is not a number; pass decays like 0.9999 or 0.999,0.9999."
            ) from None
    if not decays:
        raise ValueError(f"--ema_decay {spec!r} gives no decay; pass at least one, e.g. 0.9999.")
    for decay in decays:
        if not 0.0 <= decay < 1.0:  # also rejects NaN
            raise ValueError(f"--ema_decay {spec!r}: each decay must lie in [0, 1), got {decay}; DiT uses 0.9999.")
    if len(set(decays)) != len(decays):
        raise ValueError(f"--ema_decay {spec!r} repeats a decay; list each rate once.")
    return decays


class EMAModels:
    """Float32 exponential moving averages of `model`'s parameters, one per decay in `decays`.

    Args:
        model (`nn.Module`): the unwrapped model; its current parameters start every average.
        decays (`str`, `float` or list): parsed by [`parse_ema_decays`].
        warmup (`bool`, defaults to `False`): use `min(decay, (1 + n) / (10 + n))` at the n-th update (the warm-up
            of TensorFlow's `ExponentialMovingAverage(num_updates=...)`). Without it, a decay of 0.999 still holds
            37% of the initial, untrained weights after 1,000 updates; with it, 1% after 100 and 0.02% after 1,000,
            which is what short runs on small data sets need.

    The averages stay float32 whatever the model's dtype (bf16 weights would lose the small `(1 - decay)` increments
    to rounding), on the device of each parameter (move them with [`~EMAModels.to`]). Persistent buffers are copied
    from the model at each update, not averaged; parameters with `requires_grad=False` are averaged like the others
    (they do not change, so their average is themselves).
    """

    def __init__(self, model: nn.Module, decays: str | float | Sequence[float], warmup: bool = False):
        self._decays = parse_ema_decays(decays)
        self.warmup = warmup
        self._param_names = [name for name, _ in model.named_parameters()]
        persistent = model.state_dict(keep_vars=True).keys()
        self._buffer_names = [name for name, _ in model.named_buffers() if name in persistent]
        self._averages = [
            [p.detach().to(dtype=torch.float32, copy=True) for p in model.parameters()] for _ in self._decays
        ]
        buffers = dict(model.named_buffers())
        self._buffers = [buffers[name].detach().clone() for name in self._buffer_names]
        self._num_updates = 0

    @property
    def decays(self) -> list[float]:
        return list(self._decays)

    @property
    def num_updates(self) -> int:
        """How many times [`~EMAModels.update`] ran (restored by `load_state_dict`)."""
        return self._num_updates

    def decay_at(self, decay: float, num_updates: int) -> float:
        """The decay used by the update that follows `num_updates` earlier ones."""
        return min(decay, (1 + num_updates) / (10 + num_updates)) if self.warmup else decay

    def _check_model(self, model: nn.Module) -> list[torch.Tensor]:
        named = list(model.named_parameters())
        names = [name for name, _ in named]
        if names != self._param_names:
            differing = next((a, b) for a, b in zip_longest(names, self._param_names) if a != b)
            raise ValueError(
                f"The model's parameters do not match the EMA's ({len(names)} vs {len(self._param_names)}; first "
                f"difference: {differing[0]!r} vs {differing[1]!r}). Pass the same, unwrapped model "
                "(`accelerator.unwrap_model(model)`, which strips DDP's `module.` and torch.compile's `_orig_mod.`)."
            )
        return [p for _, p in named]

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self._decays):
            raise ValueError(f"EMA index {index} is out of range for the {len(self._decays)} decays {self._decays}.")

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step per decay: `ema = decay * ema + (1 - decay) * param`. Call once per optimizer step.

        With gradient accumulation, call it only when `accelerator.sync_gradients` is true: the weights only change
        then, and updating on every micro-batch would shrink the effective averaging horizon by the accumulation
        factor.
        """
        params = self._check_model(model)
        if params:
            # One float32 copy shared by all rates; `.to` returns the tensor itself when it is already float32 there.
            # FSDP shards parameters (DTensors): average the full tensors, so the EMA holds whole weights.
            params = [full_tensor(p.detach()) for p in params]
            params = [p.to(device=a.device, dtype=torch.float32) for p, a in zip(params, self._averages[0])]
            for decay, average in zip(self._decays, self._averages):
                # lerp(ema, param, 1 - decay) = ema + (1 - decay) * (param - ema): fused, one kernel launch per rate.
                torch._foreach_lerp_(average, params, 1.0 - self.decay_at(decay, self._num_updates))
        buffers = dict(model.named_buffers())
        for name, buffer in zip(self._buffer_names, self._buffers):
            buffer.copy_(buffers[name])
        self._num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module, index: int = 0) -> None:
        """Write the average for `decays[index]` (and the buffers) into `model`, cast to its parameters' dtype."""
        self._check_index(index)
        for param, average in zip(self._check_model(model), self._averages[index]):
            param.copy_(average)
        buffers = dict(model.named_buffers())
        for name, buffer in zip(self._buffer_names, self._buffers):
            buffers[name].copy_(buffer)

    def averaged_model(self, model: nn.Module, index: int = 0) -> nn.Module:
        """A float32 deep copy of `model` holding the average for `decays[index]`, in eval mode with gradients off.

        Ready for `save_pretrained` or sampling; `model` itself is left untouched.
        """
        self._check_index(index)
        averaged = copy.deepcopy(model).float()  # not .to(dtype): diffusers warns on every such call
        self.copy_to(averaged, index)
        return averaged.requires_grad_(False).eval()

    def to(self, device: torch.device | str) -> "EMAModels":
        """Move the averages and buffers to `device` (e.g. "cpu" to spare accelerator memory); returns self."""
        self._averages = [[t.to(device) for t in average] for average in self._averages]
        self._buffers = [b.to(device) for b in self._buffers]
        return self

    def state_dict(self) -> dict:
        """Plain dicts, lists, numbers and tensors; [`save_ema`] writes them as safetensors folders and JSON."""
        return {
            "decays": list(self._decays),
            "num_updates": self._num_updates,
            "averages": [dict(zip(self._param_names, average)) for average in self._averages],
            "buffers": dict(zip(self._buffer_names, self._buffers)),
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a [`~EMAModels.state_dict`]; the decays and parameter names must match this EMA's exactly."""
        saved = [float(d) for d in state_dict["decays"]]
        if saved != self._decays:
            raise ValueError(
                f"The checkpoint's EMA decays {saved} differ from --ema_decay {self._decays}; resume with "
                f"--ema_decay {','.join(map(str, saved))} (or start a new run to change the rates)."
            )
        saved_names = [set(average) for average in state_dict["averages"]] + [set(state_dict["buffers"])]
        expected = [set(self._param_names)] * len(self._averages) + [set(self._buffer_names)]
        if saved_names != expected:
            missing = sorted(set.union(*expected) - set.union(*saved_names))[:5]
            unexpected = sorted(set.union(*saved_names) - set.union(*expected))[:5]
            raise ValueError(
                f"The checkpoint's EMA was taken from a different model (missing {missing}, unexpected "
                f"{unexpected}); resume with the model configuration the checkpoint was trained with."
            )
        for average, saved_average in zip(self._averages, state_dict["averages"]):
            for tensor, name in zip(average, self._param_names):
                tensor.copy_(saved_average[name])
        for buffer, name in zip(self._buffers, self._buffer_names):
            buffer.copy_(state_dict["buffers"][name])
        self._num_updates = int(state_dict["num_updates"])


def ema_folder_name(decay: float) -> str:
    """Subfolder of a checkpoint holding the average for `decay`, e.g. `ema_0.9999`."""
    return f"ema_{decay}"


def export_folder_name(decay: float) -> str:
    """The folder of an extra EMA rate beside a saved pipeline's `transformer/` (`transformer_ema_0.9999`)."""
    return f"transformer_{ema_folder_name(decay)}"


def save_ema(ema: EMAModels, directory: str, averaged_model: Callable[[int], nn.Module]) -> None:
    """Write the whole EMA state into `directory` without pickles: safetensors folders and one JSON file.

    Each average goes to `ema_{decay}/` with `averaged_model(index).save_pretrained` (a diffusers folder that loads
    with `from_pretrained`; `averaged_model(i)` is typically `ema.averaged_model(model, i)`, possibly post-processed),
    and the decays and update count to `ema_state.json`. [`load_ema`] restores the state bit for bit.
    """
    for index, decay in enumerate(ema.decays):
        averaged_model(index).save_pretrained(os.path.join(directory, ema_folder_name(decay)))
    with open(os.path.join(directory, EMA_STATE), "w") as f:
        json.dump({"decays": ema.decays, "num_updates": ema.num_updates}, f, indent=2)


def read_safetensors_folder(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers `save_pretrained` folder (one safetensors file or several shards), on the CPU."""
    index_path = os.path.join(folder, SAFE_WEIGHTS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = [SAFE_WEIGHTS]
    tensors = {}
    for shard in shards:
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the EMA folder {folder} is incomplete.")
        tensors.update(load_file(path))
    return tensors


def load_ema(ema: EMAModels, directory: str, num_updates: int | None = None) -> None:
    """Restore what [`save_ema`] wrote into `directory` (safetensors and JSON only: nothing here can run code).

    `num_updates` stands in for the count of a checkpoint written before `ema_state.json` existed (its averages are
    in the `ema_{decay}` folders all the same); a checkpoint with neither is refused.
    """
    state_path = os.path.join(directory, EMA_STATE)
    if os.path.isfile(state_path):
        with open(state_path) as f:
            saved = json.load(f)
        decays, num_updates = saved["decays"], saved["num_updates"]
    elif num_updates is not None:
        decays = ema.decays
    else:
        raise FileNotFoundError(f"{state_path} is missing: {directory} holds no EMA state to resume from.")
    buffer_names = set(ema.state_dict()["buffers"])
    averages, buffers = [], {}
    for decay in decays:
        folder = os.path.join(directory, ema_folder_name(float(decay)))
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{folder} is missing: the checkpoint holds no average for EMA decay {decay}; resume with the "
                "--ema_decay the checkpoint was trained with."
            )
        tensors = read_safetensors_folder(folder)
        averages.append({name: t for name, t in tensors.items() if name not in buffer_names})
        buffers = {name: t for name, t in tensors.items() if name in buffer_names}
    ema.load_state_dict({"decays": decays, "num_updates": num_updates, "averages": averages, "buffers": buffers})
