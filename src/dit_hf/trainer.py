# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""The training loop of `train_dit.py`, as a library: [`Trainer.train`] reads in one screen.

    batch -> x0 ([`make_x0`]: pixels, VAE or cache) -> loss (objective + [`AuxiliaryLoss`] terms)
          -> [`update_step`] (backward, clip, optimizer, schedule, EMA) -> hooks ([`Hook`]: log, checkpoint, ...)

What plugs in, without an edit of the loop:

- An auxiliary loss (REPA: `dit_hf.repa.REPALoss`) is an [`AuxiliaryLoss`]: its trained modules (prepared, optimised
  and checkpointed in their own subfolder), a context that captures what it needs from the model's forward, its loss
  term and the metrics it logs.
- Periodic work is a [`Hook`] (`dit_hf.hooks`): `on_train_start`, `allow_update` (asked on every process before an
  optimizer step; all must agree, e.g. the non-finite guard `dit_hf.hooks.GuardHook`), `on_step_end` (after each
  optimizer step: logging, checkpoints, grids, FID, the guard's stop on a signal), `on_train_end`.
- How x0 is made from a batch is a [`LatentSpace`] (None in pixel space): the moments of any diffusers autoencoder
  (`dit_hf.autoencoders`: encoded at each step, or read from the latent cache) and the --latent_norm that scales them.

Exact resume (see `dit_hf.training`) is kept here: the sampler restarts at `TrainerState.samples_in_epoch` of
`TrainerState.epoch`, and every random draw of a step comes from [`StepRandomness`] keyed by the optimizer step and
the sample's place in the global batch, so a resumed run continues the interrupted one bit for bit.
"""

import contextlib
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from .autoencoders import encode_moments, latents_from_moments
from .distributed import full_tensor, gather_full_model
from .ema import load_ema, save_ema
from .fp8 import strip_fp8
from .guards import tensors_finite
from .objective import loss_by_timestep_quartile
from .resume import apply_optimizer_settings, check_resume, describe_change, resolve_resume_once
from .training import TrainerState, atomic_checkpoint, sample_offset

logger = get_logger(__name__)

TRANSFORMER_FOLDER = "transformer"
# The resolved config inside each checkpoint (JSON: checkpoints hold only JSON, safetensors and weights-only states).
CHECKPOINT_CONFIG = "training_config.json"


# ---- x0 -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentSpace:
    """Where a model trains when not on pixels: `encode(pixels)` gives moments (N, K, C, h, w), a Gaussian
    posterior's `[mean, logvar]` (K = 2) or a deterministic encoder's latents (K = 1) (`dit_hf.autoencoders`), and
    `norm` (a `LatentNorm`, --latent_norm) brings the latents to the DiT's scale. Cached batches carry their moments
    already."""

    norm: Callable[[torch.Tensor], torch.Tensor]
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def of_vae(cls, vae, norm: Callable[[torch.Tensor], torch.Tensor]) -> "LatentSpace":
        return cls(norm, functools.partial(encode_moments, vae))


def make_x0(batch: dict, latents: LatentSpace | None, posterior_noise: torch.Tensor | None) -> torch.Tensor:
    """The clean sample x0 of a batch: its pixels, or its (cached or freshly encoded) latents at the DiT's scale, a
    Gaussian posterior drawn from with the step's `posterior_noise` (so the draw is part of the step's reproducible
    randomness)."""
    if latents is None:
        return batch["pixel_values"]
    with torch.no_grad():
        moments = batch["moments"] if "moments" in batch else latents.encode(batch["pixel_values"])
        return latents.norm(latents_from_moments(moments, noise=posterior_noise))


def batch_size_of(batch: dict) -> int:
    return (batch["moments"] if "moments" in batch else batch["pixel_values"]).shape[0]


# ---- auxiliary losses ---------------------------------------------------------------------------------------------


class AuxiliaryLoss:
    """A loss term added to the objective's, with its own trained modules. Subclass and set `name` and `weight`.

    The trainer prepares `modules` with accelerate (pass them unprepared, and their parameters to the optimizer),
    saves each in the checkpoint subfolder named by its key (`save_pretrained` / `from_pretrained`), wraps the
    objective's forward in `capture(model)`, adds `weight * loss(...)[0]`, and averages the returned metrics over the
    micro-batches it logs.
    """

    name: str = "aux"
    weight: float = 1.0
    modules: dict[str, torch.nn.Module] = {}

    def capture(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """A context around the objective's forward of `model` (unwrapped) that records what `loss` needs."""
        return contextlib.nullcontext()

    def loss(self, batch: dict, x0: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the unweighted loss term, metrics to log as micro-batch means)."""
        raise NotImplementedError


# ---- named metrics ------------------------------------------------------------------------------------------------


class RunningSums:
    """Named float64 sums kept on the device between log steps: no host synchronisation inside the loop."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        if name not in self.sums:
            shape = value.shape if isinstance(value, torch.Tensor) else ()
            self.sums[name] = torch.zeros(shape, dtype=torch.float64, device=self.device)
        if isinstance(value, torch.Tensor):
            value = value.detach().to(self.device, torch.float64)
        self.sums[name] += value

    def reduce(self, accelerator) -> dict[str, torch.Tensor]:
        """The sums over all processes, on the host (one all-reduce for every name)."""
        names = sorted(self.sums)
        flat = torch.cat([self.sums[name].reshape(-1) for name in names])
        flat = accelerator.reduce(flat, reduction="sum").cpu()
        out, start = {}, 0
        for name in names:
            size = self.sums[name].numel()
            out[name] = flat[start : start + size].reshape(self.sums[name].shape)
            start += size
        return out

    def reset(self) -> None:
        for value in self.sums.values():
            value.zero_()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: value.clone() for name, value in self.sums.items()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Put back the sums of `snapshot`; those started since then go back to zero."""
        for name, value in self.sums.items():
            if name in snapshot:
                value.copy_(snapshot[name])
            else:
                value.zero_()


# ---- one optimizer step -------------------------------------------------------------------------------------------


def update_step(
    loss: torch.Tensor,
    optimizer,
    *,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    clip: Callable[[], torch.Tensor] | None = None,
    lr_scheduler=None,
    sync: bool = True,
    allow_update: Callable[[torch.Tensor, torch.Tensor | None], bool] | None = None,
    mark: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """Backward, then (on a step that syncs gradients) clip, optimizer step, schedule step and zero the gradients.

    The training step of `train_dit.py` and of `bench/bench_train.py`. `allow_update(loss, grad_norm)` (asked on
    synchronising steps only, after clipping) can veto the update; the gradients are then dropped. `mark(phase)` is
    called after "backward" and "optimizer", for profiling. Returns (the gradient norm before clipping or None,
    whether the update ran).
    """
    backward(loss)
    if mark:
        mark("backward")
    grad_norm = clip() if sync and clip is not None else None
    applied = allow_update(loss, grad_norm) if sync and allow_update is not None else True
    if applied:
        # Under accelerate, `step` on a step that accumulates is a no-op of the prepared optimizer and scheduler.
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if mark:
        mark("optimizer")
    return grad_norm, applied


# ---- hooks --------------------------------------------------------------------------------------------------------


class Hook:
    """Periodic work around the loop; every method is optional."""

    def on_train_start(self, trainer: "Trainer") -> None:
        pass

    def allow_update(self, trainer: "Trainer", loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """Asked on every process before each optimizer step, after clipping (`grad_norm`: the norm before it, None
        without clipping; `loss`: this process's last micro-batch). All processes must return the same answer: reduce
        across them (`trainer.accelerator.reduce`) before deciding. False skips the update and the EMA, and leaves the
        step's metrics out of the logged averages."""
        return True

    def on_step_end(self, trainer: "Trainer") -> None:
        pass

    def on_train_end(self, trainer: "Trainer") -> None:
        pass


def is_due(step: int, every: int | None, last_step: int | None = None) -> bool:
    """Whether a hook that runs every `every` steps (and, given `last_step`, at the last step) runs at `step`."""
    return bool(every) and step % every == 0 or step == last_step


# ---- the trainer --------------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """Everything the loop touches, built by `train_dit.py`; `max_train_steps` and `num_epochs` are run-time values
    (from `--max_train_steps`, or from `--num_train_epochs` and the data's length)."""

    config: object  # dit_hf.config.TrainConfig
    accelerator: object
    model: torch.nn.Module  # prepared
    objective: object
    optimizer: object
    lr_scheduler: object
    dataloader: object
    sampler: object  # dit_hf.training.EpochSampler
    randomness: object  # dit_hf.training.StepRandomness
    ema: object  # dit_hf.ema.EMAModels
    max_train_steps: int
    num_epochs: int
    num_classes: int
    latents: LatentSpace | None = None
    aux_losses: list[AuxiliaryLoss] = field(default_factory=list)
    hooks: list[Hook] = field(default_factory=list)
    record: dict = field(default_factory=dict)  # the resolved config with the run-time values, as trackers see it
    state: TrainerState = field(default_factory=TrainerState)
    stop: bool = False  # set by a hook to end the run after this step (e.g. preemption, once it has checkpointed)
    # Under FSDP (`dit_hf.distributed.unsharded_copy`): an unprepared copy of the model that checkpoints and the EMA
    # export fill with whole weights; None otherwise.
    full_model: torch.nn.Module | None = None

    def __post_init__(self):
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        # The auxiliary modules are prepared after the model, so accelerate saves and loads them after it.
        for aux in self.aux_losses:
            aux.modules = {name: self.accelerator.prepare(module) for name, module in aux.modules.items()}
        self.sums = RunningSums(self.accelerator.device)
        # optimizer steps (all, and those applied, whose metrics the sums hold) and samples since the last log
        self.window = {"sync": 0, "applied": 0, "samples": 0}
        self.last_checkpoint: str | None = None  # the checkpoint the last save_checkpoint wrote
        self.checkpoints_dir = os.path.join(self.config.output_dir, "checkpoints")
        self.accelerator.register_save_state_pre_hook(self._save_models)
        self.accelerator.register_load_state_pre_hook(self._load_models)

    # -- the loop -------------------------------------------------------------------------------------------------

    def train(self) -> TrainerState:
        acc, state = self.accelerator, self.state
        trained = self.trained_modules()
        # The prepared modules' parameters: FSDP swaps in sharded ones in `prepare`.
        clip = functools.partial(self.clip_grad_norm, [p for module in trained for p in module.parameters()])
        self.progress = tqdm(total=self.max_train_steps, initial=state.global_step, desc="train",
                             disable=not acc.is_local_main_process)  # fmt: skip
        for hook in self.hooks:
            hook.on_train_start(self)
        self.model.train()
        done = state.global_step >= self.max_train_steps
        micro_step = 0
        for epoch in range(state.epoch, self.num_epochs):
            if done:
                break
            state.epoch = epoch
            self.sampler.set_position(epoch, start=state.samples_in_epoch)  # exact resume: skip what was seen
            for batch in self.dataloader:
                if micro_step == 0:  # the metrics before this step: a vetoed step's are dropped from the averages
                    kept = self.sums.snapshot()
                # batch -> x0, with the draws of this process's rows of the global batch (any process layout alike)
                n = batch_size_of(batch)
                offset = sample_offset(micro_step, acc.process_index, acc.num_processes, n)
                draws = self.randomness.rows(state.global_step, offset, n)
                x0 = make_x0(batch, self.latents, draws.get("posterior_noise"))

                # loss (objective + auxiliary terms) -> backward, clip, update (unless a hook vetoes it); every hook
                # is asked, not a short-circuit, as each may take part in a collective operation
                with acc.accumulate(*trained):
                    out, loss, aux_metrics = self.compute_loss(batch, x0, draws)
                    grad_norm, applied = update_step(
                        loss,
                        self.optimizer,
                        backward=acc.backward,
                        clip=clip if self.config.max_grad_norm > 0 else None,
                        lr_scheduler=self.lr_scheduler,
                        sync=acc.sync_gradients,
                        allow_update=lambda *step: all([hook.allow_update(self, *step) for hook in self.hooks]),
                    )
                self.record_micro_batch(out, aux_metrics, grad_norm, n)
                micro_step += 1
                state.samples_in_epoch += n * acc.num_processes
                if not acc.sync_gradients:
                    continue

                # an optimizer step is done: EMA, counters, then the hooks (log, checkpoint, grids, FID, plots)
                micro_step = 0
                if not applied:
                    self.sums.restore(kept)
                if not applied or acc.optimizer_step_was_skipped:
                    state.skipped_steps += 1  # fp16 overflow or a hook's veto: neither the update nor the EMA
                else:
                    self.ema.update(self.unwrapped)
                state.global_step += 1
                self.window["sync"] += 1
                self.window["applied"] += applied
                self.progress.update(1)
                for hook in self.hooks:
                    hook.on_step_end(self)
                if state.global_step >= self.max_train_steps or self.stop:
                    done = True
                    break
            if not done:
                state.samples_in_epoch = 0
        self.progress.close()
        acc.wait_for_everyone()
        for hook in self.hooks:
            hook.on_train_end(self)
        return state

    def trained_modules(self) -> tuple[torch.nn.Module, ...]:
        """The model and the auxiliary losses' modules (prepared)."""
        return (self.model, *(m for aux in self.aux_losses for m in aux.modules.values()))

    def clip_grad_norm(self, params: list) -> torch.Tensor:
        """Clip to `--max_grad_norm`; the norm before clipping, whole (under FSDP a sharded tensor until gathered)."""
        return full_tensor(self.accelerator.clip_grad_norm_(params, self.config.max_grad_norm))

    def compute_loss(self, batch: dict, x0: torch.Tensor, draws: dict) -> tuple[object, torch.Tensor, dict]:
        """The objective's loss plus every auxiliary term: (objective output, total loss, auxiliary metrics)."""
        labels = batch.get("class_labels") if self.num_classes else None
        # Label dropout drawn by StepRandomness rather than inside the model, for the same reason as the noise.
        denoiser = functools.partial(self.model, force_drop_ids=draws.get("drop"))
        with contextlib.ExitStack() as captures:
            for aux in self.aux_losses:
                captures.enter_context(aux.capture(self.unwrapped))
            out = self.objective(denoiser, x0, labels, timesteps=draws["timesteps"], noise=draws["noise"])
        loss, metrics = out.loss, {}
        for aux in self.aux_losses:
            term, aux_metrics = aux.loss(batch, x0)
            loss = loss + aux.weight * term
            metrics.update(aux_metrics)
        return out, loss, metrics

    def record_micro_batch(self, out, aux_metrics: dict, grad_norm: torch.Tensor | None, n: int) -> None:
        self.sums.add("loss", out.loss)
        self.sums.add("micro_batches", 1)
        for name, value in aux_metrics.items():
            self.sums.add(name, value)
        if grad_norm is not None:
            self.sums.add("grad_norm", grad_norm)
        self.sums.add("loss_by_quartile", loss_by_timestep_quartile(out.timesteps, out.loss_per_sample,
                                                                    self.config.num_train_timesteps))  # fmt: skip
        self.window["samples"] += n * self.accelerator.num_processes

    # -- models, checkpoints, resume ------------------------------------------------------------------------------

    def ema_model(self, index: int) -> torch.nn.Module:
        """EMA weights in plain linear layers (no FP8): the model a user loads from the saved folder."""
        model = self.unwrapped if self.full_model is None else self.full_model  # FSDP: the whole model's structure
        return strip_fp8(self.ema.averaged_model(model, index))

    def _subfolder(self, module: torch.nn.Module) -> str:
        module = self.accelerator.unwrap_model(module)
        if module is self.unwrapped or module is self.full_model:
            return TRANSFORMER_FOLDER
        for aux in self.aux_losses:
            for name, owned in aux.modules.items():
                if self.accelerator.unwrap_model(owned) is module:
                    return name
        raise ValueError(f"{type(module).__name__} is not a module of the trainer or of an auxiliary loss.")

    def _save_models(self, models, weights, output_dir):
        # Checkpoints hold diffusers folders (loadable with from_pretrained) instead of raw state dicts.
        models = [gather_full_model(self.accelerator, m, self.full_model) for m in models]  # FSDP: every process
        if self.accelerator.is_main_process:
            for m in models:
                self.accelerator.unwrap_model(m).save_pretrained(os.path.join(output_dir, self._subfolder(m)))
        weights.clear()

    def _load_models(self, models, input_dir):
        for _ in range(len(models)):
            m = self.accelerator.unwrap_model(models.pop())
            saved = type(m).from_pretrained(input_dir, subfolder=self._subfolder(m), use_safetensors=True)
            m.load_state_dict(saved.state_dict())

    def _write_checkpoint_extras(self, directory: str) -> None:
        save_ema(self.ema, directory, self.ema_model)
        with open(os.path.join(directory, CHECKPOINT_CONFIG), "w") as f:
            json.dump(self.record, f, indent=2)
        self.state.save(directory)  # then atomic_checkpoint writes the manifest of every file, last

    def weights_finite(self) -> bool:
        """Whether the trained weights and every EMA average are finite on every process (a collective)."""
        trained = [p for module in self.trained_modules() for p in module.parameters()]
        averages = [list(average.values()) for average in self.ema.state_dict()["averages"]]
        return tensors_finite(self.accelerator, trained, *averages)

    def save_checkpoint(self) -> str | None:
        """`checkpoints/checkpoint-{step}`, written atomically (see `atomic_checkpoint`); on every process. None, and
        the older checkpoints left as they are, when the weights hold NaN/inf: they are no state to resume from."""
        if not self.weights_finite():
            logger.error("Step %d: the weights are not finite; no checkpoint written.", self.state.global_step)
            self.last_checkpoint = None
            return None
        self.last_checkpoint = atomic_checkpoint(self.accelerator, self.checkpoints_dir, self.state.global_step,
                                                 self._write_checkpoint_extras)  # fmt: skip
        return self.last_checkpoint

    def resume(self) -> str | None:
        """Load `--resume_from_checkpoint` (model, optimizer, scheduler, RNG, EMA, position); None: nothing to load.

        The checkpoint is verified and checked against this run's settings first (`dit_hf.resume`): settings that
        change what its weights mean are refused; the other changes are applied (a new learning rate replaces the
        saved one in the optimizer) and logged one line each."""
        if not self.config.resume_from_checkpoint:
            return None
        # Verified against its manifest (by the main process); `latest` skips (and names) damaged checkpoints.
        path = resolve_resume_once(self.config.resume_from_checkpoint, self.checkpoints_dir, warn=logger.warning)
        if path is None:
            logger.info("No checkpoint in %s yet: starting from scratch.", self.checkpoints_dir)
            return None
        # Refused before anything is loaded: another model or objective, unreadable state; other changes listed.
        state, warnings, changed = check_resume(
            path, self.record, dict(self.unwrapped.config), self.accelerator.num_processes
        )
        for warning in warnings:
            logger.warning(warning)
        self.accelerator.load_state(path)
        self.state = state
        load_ema(self.ema, path, num_updates=state.global_step - state.skipped_steps)
        apply_optimizer_settings(self.optimizer, self.lr_scheduler, self.config, changed)
        for change in changed:
            logger.info(describe_change(*change))
        logger.info("Resumed from %s at step %d.", path, state.global_step)
        return path


def saved_training_config(checkpoint: str) -> dict | None:
    """The resolved config a checkpoint was written with (None for checkpoints of older dit-hf versions)."""
    path = os.path.join(checkpoint, CHECKPOINT_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
