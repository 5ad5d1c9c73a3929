# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Guards of a training run against divergence and preemption, and the metrics log on resume.

The trainer's `dit_hf.hooks.GuardHook` makes one collective check per optimizer step ([`StepGuard.check`], asked by
the trainer before the update): the non-finite flags of every process and whether any process received a stop
signal are all-reduced into one small tensor and read once (the only host synchronisation the loop adds). Every
process therefore takes the same decision at the same step:

- **Non-finite loss or gradient norm** on any process: the update is skipped everywhere (no optimizer, LR scheduler
  or EMA step), counted (`nonfinite_steps`) and logged. After `--max_nonfinite_steps` such steps in a row the run
  stops with [`EXIT_NONFINITE`] and names the last good checkpoint, or (`--on_nonfinite rollback`) reloads it with
  [`roll_back`] and goes on. With fp16's GradScaler, non-finite gradients are the scaler's overflow signal: it skips
  the step and lowers the scale (`skipped_steps`), and the guard watches the loss only.
- **A stop signal** (SIGTERM, and those of `--save_on_signal`) on any process: every process finishes the step,
  writes a checkpoint and exits with [`EXIT_PREEMPTED`]; `--resume_from_checkpoint latest` continues bit-exactly.

Checkpoints are only written from finite weights ([`tensors_finite`], in `Trainer.save_checkpoint`), and pruning
keeps the newest checkpoint whose weights are finite ([`newest_finite_checkpoint`]).
"""

import json
import logging
import os
import signal
import threading
from dataclasses import dataclass

import torch
from safetensors import safe_open

from .distributed import local_tensor
from .training import list_checkpoints

logger = logging.getLogger(__name__)

# Exit statuses of train_dit.py besides 0 (done), 1 (push failed) and 2 (bad input).
EXIT_NONFINITE = 3  # stopped after --max_nonfinite_steps non-finite steps in a row; resume from an earlier checkpoint
EXIT_PREEMPTED = 75  # stopped by a signal after writing a checkpoint: rerun with --resume_from_checkpoint latest
# (75 is EX_TEMPFAIL of sysexits.h, "temporary failure, retry"; not 128 + 15, which a shell reports for a process
# that SIGTERM killed before it could save.)

ON_NONFINITE = ("stop", "rollback")
UNCATCHABLE_SIGNALS = ("SIGKILL", "SIGSTOP")


class NonFiniteStop(RuntimeError):
    """Raised on every process when training stops after too many non-finite steps in a row."""


class Preempted(Exception):
    """Raised on every process after a stop signal, once the checkpoint `checkpoint` of step `step` is written."""

    def __init__(self, step: int, checkpoint: str | None, signal_name: str):
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (the weights were not finite)"
        super().__init__(
            f"{signal_name} received: stopped after step {step} and wrote {where}. Continue with "
            "--resume_from_checkpoint latest."
        )


def parse_signals(names: list[str] | None) -> list[signal.Signals]:
    """SIGTERM plus the `--save_on_signal` names ("SIGUSR1" or "USR1"), as `signal.Signals`."""
    found = [signal.SIGTERM]
    for name in names or []:
        full = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        if full in UNCATCHABLE_SIGNALS or not hasattr(signal, full) or full.startswith("SIG_"):
            raise ValueError(
                f"--save_on_signal {name!r} is not a signal a process can catch; use names like SIGUSR1, SIGUSR2, "
                "SIGINT or SIGHUP (SIGTERM is always handled)."
            )
        if getattr(signal, full) not in found:
            found.append(getattr(signal, full))
    return found


class StopSignals:
    """Handlers that only note a signal; the training loop stops at the end of the step ([`StepGuard.check`]).

    Install them right before the loop and restore the previous ones after it: outside the loop (data loading, cache
    encoding, export) a signal keeps its usual effect.
    """

    def __init__(self, names: list[str] | None = None):
        self.signals = parse_signals(names)
        self.received: str | None = None
        self._previous = {}

    def _note(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            # Python lets only the main thread set handlers (e.g. training started from a thread of a notebook).
            logger.warning("Training runs outside the main thread: %s keep their usual effect.", self.names())
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._note)

    def names(self) -> str:
        return ", ".join(sig.name for sig in self.signals)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


@dataclass
class StepCheck:
    """The decision every process reads from [`StepGuard.check`]."""

    skip: bool  # a non-finite loss or gradient norm somewhere: do not apply this step
    stop: str | None  # the name of a stop signal some process received, else None
    nonfinite_loss_ranks: list[int]
    nonfinite_grad_ranks: list[int]


class StepGuard:
    """One collective decision per optimizer step; the counters of non-finite steps.

    Args:
        accelerator: the run's `Accelerator` (its process count, device, `reduce` and grad scaler).
        stop_signals: the [`StopSignals`] whose note stops the run, or None.
        max_nonfinite_steps: non-finite steps in a row after which `on_nonfinite` acts.
        on_nonfinite: "stop" or "rollback".
    """

    def __init__(self, accelerator, stop_signals: StopSignals | None, max_nonfinite_steps: int, on_nonfinite: str):
        self.accelerator = accelerator
        self.stop_signals = stop_signals
        self.max_nonfinite_steps = max_nonfinite_steps
        self.on_nonfinite = on_nonfinite
        self.in_a_row = 0
        self._loss_bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)

    @property
    def watches_gradients(self) -> bool:
        # With a GradScaler (fp16), inf/NaN gradients are routine overflows that the scaler skips itself.
        return self.accelerator.scaler is None

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Note a micro-batch's loss (on the device: no synchronisation)."""
        self._loss_bad |= ~torch.isfinite(loss.detach()).all()

    def grad_norm(self, params) -> torch.Tensor:
        """The total gradient norm without clipping (`--max_grad_norm 0`), unscaled first under fp16."""
        self.accelerator.unscale_gradients()
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.accelerator.device)
        return torch.nn.utils.get_total_norm(grads)

    def check(self, grad_norm: torch.Tensor | None) -> StepCheck:
        """All-reduce this process's flags with the others' and return the common decision (one host sync)."""
        n, rank = self.accelerator.num_processes, self.accelerator.process_index
        flags = torch.zeros(3, n, dtype=torch.float32, device=self.accelerator.device)
        flags[0, rank] = self._loss_bad.float()
        if grad_norm is not None and self.watches_gradients:
            flags[1, rank] = (~torch.isfinite(grad_norm.detach())).float().to(flags.device)
        received = self.stop_signals.received if self.stop_signals is not None else None
        if received is not None:
            flags[2, rank] = float(self.stop_signals.signals.index(signal.Signals[received]) + 1)
        if n > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        flags = flags.cpu()
        self._loss_bad.zero_()
        loss_ranks = [r for r in range(n) if flags[0, r] > 0]
        grad_ranks = [r for r in range(n) if flags[1, r] > 0]
        stop = None
        for r in range(n):  # the signal of the lowest rank that received one: the same name on every process
            if flags[2, r] > 0:
                stop = self._signal_name(int(flags[2, r].item()) - 1)
                break
        return StepCheck(bool(loss_ranks or grad_ranks), stop, loss_ranks, grad_ranks)

    def _signal_name(self, position: int) -> str:
        if self.stop_signals is None or not 0 <= position < len(self.stop_signals.signals):
            return "a stop signal"
        return self.stop_signals.signals[position].name

    def skip_update(self) -> None:
        """Leave the weights, optimizer and LR scheduler as they are; under fp16 let the scaler record the step.

        The scaler has unscaled this step's gradients (clipping or [`grad_norm`] did); `update()` closes the step as
        an overflow would, lowering the scale if the gradients were not finite.
        """
        scaler = self.accelerator.scaler
        if scaler is not None:
            scaler.update()

    def record(self, check: StepCheck, step: int, total: int) -> bool:
        """Log a skipped step and count it in a row; True when `on_nonfinite` must act now."""
        if not check.skip:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        what = []
        if check.nonfinite_loss_ranks:
            what.append(f"loss on process(es) {check.nonfinite_loss_ranks}")
        if check.nonfinite_grad_ranks:
            what.append(f"gradient norm on process(es) {check.nonfinite_grad_ranks}")
        if self.accelerator.is_main_process:
            logger.warning(
                "Step %d: non-finite %s; update skipped on every process (%d in a row, %d in all, limit %d in a row).",
                step,
                " and ".join(what),
                self.in_a_row,
                total,
                self.max_nonfinite_steps,
            )
        return self.in_a_row >= self.max_nonfinite_steps

    def act_on_divergence(self, step: int, checkpoints_dir: str, lr_scheduler, lr_factor: float, load_ema_state):
        """After `max_nonfinite_steps` in a row: raise [`NonFiniteStop`] naming the last good checkpoint, or (with
        "rollback" and such a checkpoint) [`roll_back`] to it and return its path. Call it on every process."""
        from accelerate.utils import broadcast_object_list

        target = [newest_finite_checkpoint(checkpoints_dir) if self.accelerator.is_main_process else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(target)
        target = target[0]
        if self.on_nonfinite == "stop" or target is None:
            self.accelerator.wait_for_everyone()  # a collective last: gloo's threads finish the ones before
            reason = "" if self.on_nonfinite == "stop" else " and there is no checkpoint to roll back to"
            raise NonFiniteStop(nonfinite_stop_message(step, self.max_nonfinite_steps, target, reason))
        roll_back(self.accelerator, target, lr_scheduler, lr_factor, load_ema_state)
        self.in_a_row = 0
        if self.accelerator.is_main_process:
            logger.warning(
                "Step %d: rolled back to %s; learning rate now %g.", step, target, lr_scheduler.get_last_lr()[0]
            )
        return target

    def weights_finite(self, *tensor_groups) -> bool:
        return tensors_finite(self.accelerator, *tensor_groups)


def tensors_finite(accelerator, *tensor_groups) -> bool:
    """Whether every tensor of every group is finite on every process (at checkpoint time only: it syncs)."""
    bad = torch.zeros((), dtype=torch.float32, device=accelerator.device)
    for group in tensor_groups:
        for t in group:
            # FSDP: each process checks its own shard (the sum over processes below covers the whole tensor).
            bad += (~torch.isfinite(local_tensor(t.detach()))).any().float().to(bad.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bad.item() == 0


def safetensors_finite(path: str) -> bool:
    """Whether every floating-point tensor in a safetensors file is finite (one tensor in memory at a time)."""
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return False
    return True


def checkpoint_finite(checkpoint: str, subfolder: str = "transformer") -> bool:
    """Whether the model weights of a checkpoint are all finite; unreadable or missing weights count as not."""
    folder = os.path.join(checkpoint, subfolder)
    if not os.path.isdir(folder):
        return False
    files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    try:
        return bool(files) and all(safetensors_finite(os.path.join(folder, name)) for name in files)
    except Exception:  # a truncated or corrupt file: not a checkpoint to fall back on
        return False


def newest_finite_checkpoint(checkpoints_dir: str) -> str | None:
    """The newest complete checkpoint that verifies against its manifest and whose model weights are all finite, or
    None (reads newest first; a damaged one is skipped with a warning naming the file)."""
    from .manifest import CorruptCheckpointError
    from .training import verify_checkpoint

    for _, path in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify_checkpoint(path)
        except CorruptCheckpointError as err:
            logger.warning("Not rolling back to %s: %s", path, err)
            continue
        if checkpoint_finite(path):
            return path
    return None


def nonfinite_stop_message(step: int, max_nonfinite_steps: int, checkpoint: str | None, reason: str = "") -> str:
    fallback = (
        f"The last good checkpoint is {checkpoint}: resume from it with --resume_from_checkpoint {checkpoint} and a "
        "lower --learning_rate, or rerun with --on_nonfinite rollback --rollback_lr_factor 0.5."
        if checkpoint
        else "No checkpoint with finite weights exists yet: restart with a lower --learning_rate."
    )
    return (
        f"Training diverged: {max_nonfinite_steps} steps in a row up to step {step} had a non-finite loss or gradient "
        f"norm (their updates were skipped){reason}. {fallback}"
    )


def roll_back(accelerator, checkpoint: str, lr_scheduler, lr_factor: float, load_ema_state) -> None:
    """Reload the weights and optimizer state of `checkpoint`; keep the step, data position and LR schedule going.

    As PaLM does after a loss spike (Chowdhery et al. 2022, sec. 5.1: restart from a checkpoint before the spike and
    skip the batches around it), training goes on with the batches after the divergent ones, not by replaying those
    that led there. The step count, the data order, the per-step noise and the LR schedule continue (their state is
    put back after `load_state`); every learning rate, now and later, is multiplied by `lr_factor`.
    `load_ema_state(checkpoint)` restores the EMA.
    """
    schedule = lr_scheduler.scheduler if hasattr(lr_scheduler, "scheduler") else lr_scheduler
    schedule_state = schedule.state_dict()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    accelerator.load_state(checkpoint)
    schedule.load_state_dict(schedule_state)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    schedule.base_lrs = [lr * lr_factor for lr in schedule.base_lrs]
    schedule._last_lr = [lr * lr_factor for lr in schedule.get_last_lr()]
    for group, lr in zip(schedule.optimizer.param_groups, schedule.get_last_lr()):
        group["lr"] = lr
        if "initial_lr" in group:
            group["initial_lr"] *= lr_factor
    load_ema_state(checkpoint)


def trim_metrics(path: str, last_step: int) -> int:
    """Drop the rows of `metrics.jsonl` past `last_step` (logged after the checkpoint a run resumes from) and any
    unreadable row (cut short by a kill), so that each step is logged once; returns how many rows went."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                keep = int(row["step"]) <= last_step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return dropped
