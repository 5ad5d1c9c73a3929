"""Pieces of the training loop that `train_dit.py` orchestrates: data order, per-step randomness, checkpoints.

Two choices make runs reproducible across interruptions and process counts:

- The data order is a permutation drawn from (seed, epoch) alone ([`EpochSampler`]); resuming starts the
  permutation at the saved position instead of loading and discarding the batches already seen. Each index it yields
  carries its epoch ([`SampleIndex`]), so a sample's random flip is a function of (seed, epoch, index)
  ([`flip_flags`]), not of an RNG state that prefetching, DataLoader workers or latent caching would advance.
- The random draws of an optimizer step (timesteps, noise, label dropout, latent sampling) are made for the whole
  global batch from a generator on the training device seeded by (seed, step) ([`StepRandomness`]); each process
  takes the rows of its own samples. So 2 processes × batch 4 train exactly like 1 process × batch 4 × 2
  accumulation steps.
"""

import errno
import json
import logging
import math
import netrc
import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from .manifest import MANIFEST, CorruptCheckpointError, verify_manifest, write_manifest

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
# accelerate reads these back with `torch.load(weights_only=False)`: a crafted one runs code on resume.
CUSTOM_STATE_PATTERN = re.compile(r"^custom_checkpoint_\d+\.pkl$")
# Files that torch.load reads, i.e. pickles (accelerate's optimizer, scheduler, scaler and RNG states).
PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation of `range(num_samples)` per epoch, fixed by (seed, epoch), optionally started mid-way."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    # Not named `set_epoch`: accelerate's data loader calls `set_epoch(its own counter)` on samplers at each pass.
    def set_position(self, epoch: int, start: int = 0):
        """Select the epoch's permutation and skip its first `start` samples (global count, all processes)."""
        self.epoch = epoch
        self.start = start

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        for index in order[self.start :].tolist():
            yield SampleIndex(index, self.epoch)

    def __len__(self) -> int:
        return self.num_samples - self.start


class SampleIndex(int):
    """A data set index that also carries the epoch it is drawn in (`.epoch`), as [`EpochSampler`] yields them.

    It is an `int` everywhere else, and it survives the DataLoader's batching and its trip to worker processes, where
    the data set reads the epoch to draw the sample's flip ([`flip_flags`]).
    """

    def __new__(cls, index: int, epoch: int = 0):
        obj = super().__new__(cls, index)
        obj.epoch = epoch
        return obj

    def __reduce__(self):
        return (SampleIndex, (int(self), self.epoch))

    def __repr__(self) -> str:
        return f"SampleIndex({int(self)}, epoch={self.epoch})"


_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    # The SplitMix64 finaliser (Steele et al., "Fast splittable pseudorandom number generators", 2014): every input
    # bit flips each output bit with probability about 1/2. uint64 arrays wrap around silently, as the mix needs.
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def flip_flags(seed: int, indices) -> torch.Tensor:
    """Whether to flip each sample: a fair coin per (seed, epoch, index), the same in any process, worker or run.

    `indices` are data set indices; the epoch is each one's `.epoch` ([`SampleIndex`]), 0 for a plain `int`. A hash
    instead of an RNG stream: nothing that draws other numbers, prefetches a batch or encodes a cache can shift it,
    and a resumed run flips exactly what an uninterrupted one does.
    """
    index = np.array([int(i) for i in indices], dtype=np.uint64)
    epoch = np.array([getattr(i, "epoch", 0) for i in indices], dtype=np.uint64)
    h = _mix64(np.full(len(index), seed & _MASK64, dtype=np.uint64))
    h = _mix64(_mix64(h ^ epoch) ^ index)
    return torch.from_numpy((h >> np.uint64(63)).astype(bool))


class StepRandomness:
    """Draws every random number of one optimizer step for the global batch, then hands out per-process rows.

    Args:
        seed: Run seed. num_train_timesteps: T. global_batch: per-process batch × processes × accumulation.
        sample_shape: shape of one training sample (C, H, W). device: where the tensors go.
        label_dropout: probability of replacing a label by the null class (0 disables).
        posterior_noise: also draw a noise tensor for sampling cached VAE posteriors.
        sample_timesteps: `objective.sample_timesteps` (batch_size, device, generator) -> timesteps, for objectives
            with their own timestep distribution (logit-normal, shifted, flow); default uniform integers in [0, T).
    """

    def __init__(
        self,
        seed: int,
        num_train_timesteps: int,
        global_batch: int,
        sample_shape: tuple[int, ...],
        device: torch.device,
        label_dropout: float = 0.0,
        posterior_noise: bool = False,
        sample_timesteps=None,
    ):
        self.seed = seed
        self.num_train_timesteps = num_train_timesteps
        self.global_batch = global_batch
        self.sample_shape = tuple(sample_shape)
        self.device = device
        self.label_dropout = label_dropout
        self.posterior_noise = posterior_noise
        self.sample_timesteps = sample_timesteps
        self._step = None
        self._draws = None

    def _draw(self, step: int) -> dict[str, torch.Tensor]:
        # A generator on the training device, seeded alike on every process: each process draws the same numbers
        # (at GPU speed, with no host-to-device copy), so the split of the global batch does not matter. Runs on
        # different device types (CPU vs CUDA) draw different numbers.
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + step)
        n, device = self.global_batch, self.device
        if self.sample_timesteps is None:
            timesteps = torch.randint(0, self.num_train_timesteps, (n,), generator=g, device=device)
        else:
            timesteps = self.sample_timesteps(n, device, generator=g)
        draws = {"timesteps": timesteps, "noise": torch.randn((n, *self.sample_shape), generator=g, device=device)}
        if self.label_dropout > 0:
            draws["drop"] = torch.rand(n, generator=g, device=device) < self.label_dropout
        if self.posterior_noise:
            draws["posterior_noise"] = torch.randn((n, *self.sample_shape), generator=g, device=device)
        return draws

    def rows(self, step: int, offset: int, batch_size: int) -> dict[str, torch.Tensor]:
        """The draws for samples `offset : offset + batch_size` of step `step`'s global batch."""
        if offset + batch_size > self.global_batch:
            raise ValueError(f"Rows {offset}:{offset + batch_size} exceed the global batch of {self.global_batch}.")
        if step != self._step:
            self._step, self._draws = step, self._draw(step)
        return {k: v[offset : offset + batch_size] for k, v in self._draws.items()}


def sample_offset(micro_step: int, process_index: int, num_processes: int, batch_size: int) -> int:
    """Position of a process's micro-batch in the global batch.

    accelerate hands batch j of the sampler to process j % num_processes, so within one optimizer step the k-th
    micro-batch of process r is batch k * num_processes + r.
    """
    return (micro_step * num_processes + process_index) * batch_size


@dataclass
class TrainerState:
    """What a checkpoint records besides the accelerate state: where training is."""

    global_step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0  # global count of samples of this epoch already consumed
    skipped_steps: int = 0  # fp16 steps with inf/NaN gradients, not applied
    nonfinite_steps: int = 0  # steps with a non-finite loss or gradient norm on some process, not applied
    rollbacks: int = 0  # reloads of an earlier checkpoint after non-finite steps (--on_nonfinite rollback)

    def save(self, directory: str):
        with open(os.path.join(directory, TRAINER_STATE), "w") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def load(cls, directory: str) -> "TrainerState":
        """Read the state back, refusing one that is empty, partial or malformed (it would restart at step 0)."""
        path = os.path.join(directory, TRAINER_STATE)
        known = {f.name for f in fields(cls)}
        try:
            with open(path) as f:
                saved = json.load(f)
            if not isinstance(saved, dict):
                raise ValueError(f"expected a JSON object, got {type(saved).__name__}")
            counts = {"global_step", "epoch", "samples_in_epoch"}
            missing = sorted(counts - set(saved))
            unknown = sorted(set(saved) - known)
            wrong = sorted(k for k in counts & set(saved) if type(saved[k]) is not int or saved[k] < 0)
            if missing or unknown or wrong:
                raise ValueError(f"missing {missing}, unknown {unknown}, not a count >= 0 {wrong}")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} is missing: {directory} is not a complete checkpoint. Resume from another one."
            ) from None
        except ValueError as err:  # json.JSONDecodeError included
            raise ValueError(
                f"Checkpoint file {path} cannot be read fully ({err}): the checkpoint is damaged and would restart "
                "training at the wrong step. Resume from another checkpoint (--resume_from_checkpoint PATH)."
            ) from None
        return cls(**saved)


def list_checkpoints(checkpoints_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (those with a trainer state) as sorted (step, path) pairs; partial ones are ignored."""
    return [
        (step, path)
        for step, path in checkpoint_folders(checkpoints_dir)
        if os.path.isfile(os.path.join(path, TRAINER_STATE))
    ]


def checkpoint_folders(checkpoints_dir: str) -> list[tuple[int, str]]:
    """Every `checkpoint-N` folder, complete or not, as sorted (step, path) pairs."""
    if not os.path.isdir(checkpoints_dir):
        return []
    found = []
    for name in os.listdir(checkpoints_dir):
        match = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(checkpoints_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def verify_checkpoint(path: str, warn: Callable[[str], None] | None = None) -> None:
    """Check `path` against its manifest (raises [`CorruptCheckpointError`] naming the file); warn if it has none."""
    if not verify_manifest(path):
        if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
            raise CorruptCheckpointError(
                f"Checkpoint {path} is incomplete: it has neither a manifest nor {TRAINER_STATE}."
            )
        (warn or logger.warning)(
            f"Checkpoint {path} has no manifest (written by an older dit-hf): its files cannot be verified."
        )


def latest_verified_checkpoint(checkpoints_dir: str, warn: Callable[[str], None] | None = None) -> str | None:
    """The newest checkpoint whose files match its manifest; corrupt ones are reported (by file) and skipped.

    None when the folder holds no checkpoint at all. When there are checkpoints but none verifies, raises a
    ValueError listing each one's problem: starting over silently would overwrite them.
    """
    warn = warn or logger.warning
    problems = []
    for _, path in reversed(checkpoint_folders(checkpoints_dir)):
        try:
            verify_checkpoint(path, warn)
        except CorruptCheckpointError as err:
            warn(f"Skipping checkpoint {path}: {err}")
            problems.append(str(err))
            continue
        return path
    if problems:
        raise ValueError(
            f"No checkpoint in {checkpoints_dir} can be resumed: {' '.join(problems)} Resume from a copy of a good "
            "checkpoint (--resume_from_checkpoint PATH), or start over with --overwrite_output_dir."
        )
    return None


def resolve_resume_path(
    resume_from_checkpoint: str, checkpoints_dir: str, warn: Callable[[str], None] | None = None
) -> str | None:
    """`latest` -> the newest verified checkpoint (None if there is none yet); a path -> that checkpoint, verified.

    A named checkpoint that fails verification is refused with the file; one without a manifest (older dit-hf)
    loads with a warning.
    """
    if resume_from_checkpoint == "latest":
        return latest_verified_checkpoint(checkpoints_dir, warn)
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(checkpoints_dir, path)):
        path = os.path.join(checkpoints_dir, path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r}: no such checkpoint folder. Pass 'latest' or a "
            f"folder like {os.path.join(checkpoints_dir, 'checkpoint-1000')}."
        )
    if not os.path.isfile(os.path.join(path, TRAINER_STATE)) and not os.path.isfile(os.path.join(path, MANIFEST)):
        raise ValueError(
            f"--resume_from_checkpoint {path!r} is not a complete checkpoint (no {TRAINER_STATE}); it may be from an "
            "interrupted save. Pass 'latest' to use the newest complete one."
        )
    try:
        verify_checkpoint(path, warn)
    except CorruptCheckpointError as err:
        raise ValueError(
            f"--resume_from_checkpoint {path}: {err} Pass 'latest' to use the newest checkpoint that verifies."
        ) from None
    return path


def check_checkpoint_config(checkpoint: str, model_config: dict, subfolder: str = "transformer"):
    """Refuse to resume a checkpoint of a different model: list the differing config entries."""
    path = os.path.join(checkpoint, subfolder, "config.json")
    with open(path) as f:
        saved = json.load(f)
    differ = {}
    for key, value in model_config.items():
        if key.startswith("_"):
            continue
        old = saved.get(key)
        if isinstance(value, tuple):
            value = list(value)
        if old != value:
            differ[key] = (old, value)
    if differ:
        lines = ", ".join(f"{k}: checkpoint {old!r} vs now {new!r}" for k, (old, new) in sorted(differ.items()))
        raise ValueError(
            f"Checkpoint {checkpoint} was trained with a different model ({lines}). Use the same model arguments "
            "to resume, or start a new run in another --output_dir."
        )


def _weights_only_reason(error: Exception) -> str:
    """The line of a `torch.load(weights_only=True)` error that says what was refused (not its advice to bypass)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    refusal = [line for line in lines if "WeightsUnpickler error" in line]
    return (refusal or lines or [type(error).__name__])[0]


def check_checkpoint_files(checkpoint: str) -> None:
    """Refuse a checkpoint holding a pickle that could run code when loaded, or that cannot be read; name the file.

    accelerate writes the optimizer, LR scheduler, grad scaler and RNG states with `torch.save` and reads them with
    `weights_only=True`, which refuses any object but tensors, plain containers and a few numpy types. A refused or
    corrupt optimizer state would fail with a message that names no file, and a refused RNG state would be skipped
    with an INFO line. Reading every such file here first (onto the meta device: no tensor data is read) turns both
    into one clear error before anything is loaded. Pickled custom states (`custom_checkpoint_*.pkl`), which
    accelerate reads with `weights_only=False`, are refused outright: the trainer writes none.
    """
    from accelerate.utils import load as accelerate_load

    for root, dirs, files in os.walk(checkpoint):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if root == checkpoint and CUSTOM_STATE_PATTERN.match(name):
                raise ValueError(
                    f"Checkpoint file {path} is a pickled state that accelerate would load with weights_only=False, "
                    "which can run code; dit-hf checkpoints hold none (the EMA is in the ema_* folders and "
                    f"ema_state.json). Delete {path} if the checkpoint comes from an older dit-hf, or resume from a "
                    "checkpoint you wrote yourself."
                )
            if not name.endswith(PICKLE_SUFFIXES):
                continue
            try:
                # The same allow-list of globals as accelerate's own load; weights_only=True stated, not assumed.
                accelerate_load(path, map_location="meta", weights_only=True)
            except Exception as err:
                raise ValueError(
                    f"Checkpoint file {path} cannot be read safely ({_weights_only_reason(err)}): it is corrupt, or "
                    "holds objects other than tensors and plain containers, which could run code when loaded. "
                    "Resume from another checkpoint (--resume_from_checkpoint PATH)."
                ) from None


# How torch.save (C++ streams) and safetensors report a failed write, e.g. a full disk, instead of an OSError.
WRITE_FAILURE_MARKERS = ("basic_ios", "PytorchStreamWriter failed", "file write failed", "IoError", "No space left")


def is_write_failure(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return True
    stream_error = isinstance(err, RuntimeError) or type(err).__name__ == "SafetensorError"
    return stream_error and any(marker in str(err) for marker in WRITE_FAILURE_MARKERS)


def free_space(path: str) -> str:
    """Free bytes on the file system holding `path` (or its nearest existing parent), in words."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        return f"{shutil.disk_usage(probe).free / 2**30:.2f} GiB free on {probe}"
    except OSError:
        return f"free space on {probe} unknown"


class WriteFailedError(OSError):
    """Writing a checkpoint or an export failed (disk full, quota, I/O error); the message names path and space."""


def write_failure(path: str, what: str, err: BaseException) -> WriteFailedError:
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err):
        cause = "the disk is full"
    else:
        cause = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    return WriteFailedError(
        code or errno.EIO,
        f"Could not write {what} to {path}: {cause} ({free_space(path)}). Free space or choose another "
        "--output_dir, then resume with --resume_from_checkpoint latest.",
    )


@contextmanager
def reporting_write_failures(path: str, what: str):
    """Turn a failed write inside the block (OSError, or torch's 'basic_ios::clear') into a [`WriteFailedError`]."""
    try:
        yield
    except WriteFailedError:
        raise
    except Exception as err:
        if not is_write_failure(err):
            raise
        raise write_failure(path, what, err) from err


def atomic_checkpoint(accelerator, checkpoints_dir: str, step: int, write_extra) -> str:
    """Save the accelerate state into a hidden temporary folder, then rename it to `checkpoint-{step}`.

    `write_extra(tmp_dir)` runs on the main process after `save_state` (trainer state, EMA folders). Once every
    process has written its files, the main process writes the manifest (sizes and SHA-256 of all files) last; only
    a renamed folder counts as a checkpoint, so a crash or a failed write (reported with the path and the free
    space) at any point leaves the previous checkpoints and `latest` intact.
    """
    final = os.path.join(checkpoints_dir, f"checkpoint-{step}")
    tmp = os.path.join(checkpoints_dir, f".tmp-checkpoint-{step}")
    if accelerator.is_main_process:
        os.makedirs(checkpoints_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        with reporting_write_failures(tmp, f"checkpoint {step}"):
            accelerator.save_state(tmp)
            if accelerator.is_main_process:
                write_extra(tmp)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_manifest(tmp)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if os.path.isdir(final):  # re-saving a step (e.g. after a resume): swap, then drop the old copy
            old = os.path.join(checkpoints_dir, f".old-checkpoint-{step}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(checkpoints_dir: str, total_limit: int | None, keep: str | None = None) -> list[str]:
    """Delete the oldest complete checkpoints beyond `total_limit`, never `keep` (e.g. the newest one with finite
    weights, see `dit_hf.guards.newest_finite_checkpoint`); returns the removed paths."""
    if not total_limit:
        return []
    found = list_checkpoints(checkpoints_dir)
    keep = os.path.abspath(keep) if keep else None
    oldest = found[: max(0, len(found) - total_limit)]
    removed = [path for _, path in oldest if os.path.abspath(path) != keep]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# Devices with a fused AdamW kernel: one launch per step on CUDA; on CPU a vectorised loop that is 4.5× faster than
# the default per-tensor loop for the digits model (1.3M parameters in 51 tensors, 2 cores: 1.2 ms vs 5.2 ms).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def make_adamw(params, device: torch.device | str, **hyperparameters) -> torch.optim.AdamW:
    """AdamW with the fused implementation where `device` (where the parameters will train) has one.

    The fused update computes the same function as the per-tensor loop up to float rounding.
    """
    fused = torch.device(device).type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(params, fused=fused, **hyperparameters)


def dit_train_flops_per_sample(hidden_size: int, depth: int, num_tokens: int) -> float:
    """FLOPs of one training step per sample: 3 × forward (forward + backward ≈ 2 × forward).

    Per block and token: qkv + proj + MLP are 12 d² multiply-adds (24 d² FLOPs); attention scores and their
    application are 2 T d multiply-adds (4 T d FLOPs). Embedders and the final layer are negligible.
    """
    forward = depth * (24 * num_tokens * hidden_size**2 + 4 * num_tokens**2 * hidden_size)
    return 3.0 * forward


def wandb_has_credentials() -> bool:
    """Whether wandb can log online: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def num_update_steps(batches_per_epoch: int, gradient_accumulation_steps: int) -> int:
    return max(1, math.ceil(batches_per_epoch / gradient_accumulation_steps))
