# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Exponential moving averages (EMA) of a model's weights, at one or several decay rates.

DiT samples from an EMA of the weights (decay 0.9999, updated after every optimizer step): `ema = decay * ema +
(1 - decay) * param`. Tracking several rates at once costs one float32 copy of the parameters per rate and lets one
run compare them (e.g. `--ema_decay 0.999,0.9999`).

Use in an accelerate trainer::

    ema = EMAModels(accelerator.unwrap_model(model), args.ema_decay)
    accelerator.register_for_checkpointing(ema)  # state_dict/load_state_dict round-trip exactly
    ...
    if accelerator.sync_gradients:  # once per optimizer step, not per micro-batch of gradient accumulation
        ema.update(accelerator.unwrap_model(model))
    ...
    ema.averaged_model(accelerator.unwrap_model(model)).save_pretrained(...)

The caller unwraps: these methods expect the plain module (no DDP `module.` or torch.compile `_orig_mod.` prefix in
the parameter names) and raise ValueError when the names do not match. Sharded parameters (FSDP, DeepSpeed ZeRO-3)
are not supported: each process must hold the full weights.
"""

import copy
from collections.abc import Sequence
from itertools import zip_longest

import torch
from torch import nn


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
            params = [p.detach().to(device=a.device, dtype=torch.float32) for p, a in zip(params, self._averages[0])]
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
        """Plain dicts, lists, numbers and tensors (loads with `torch.load(..., weights_only=True)`)."""
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
