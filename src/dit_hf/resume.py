"""What a resume may change: the settings a checkpoint was trained with, compared with the ones given now.

A checkpoint stores the run's resolved settings (`training_config.json`, the run record of `train_dit.run_record`:
the frozen `TrainConfig` with the run-time values). On resume, a setting that changes what the saved weights mean is
refused, naming the old and new values: the objective (ε vs v vs velocity prediction), the noise schedule, the
latent space (`--vae`), REPA's extra module. The model architecture is compared on the model config itself
(`training.check_checkpoint_config`). Every other change (learning rate, steps, logging, evaluation, data...) is
applied and listed, one line each.
"""

import glob
import json
import os

# Settings whose change would reinterpret the saved state rather than continue training it.
MEANING_SETTINGS = (
    "objective",
    "learn_sigma",
    "num_train_timesteps",
    "beta_schedule",
    "vae",
    "vae_subfolder",
    "latent_norm",
    "image_channels",
    "resolution",
    "repa_encoder",
    "repa_projector_dim",
)
# Settings that only say how this invocation runs (a run folder may be moved): never worth a line.
INVOCATION_SETTINGS = ("resume_from_checkpoint", "overwrite_output_dir", "output_dir", "recipe_picked")
# Optimizer hyperparameters kept in the optimizer state: a resume replaces the saved values with the new ones.
OPTIMIZER_SETTINGS = {"adam_weight_decay": "weight_decay", "adam_epsilon": "eps"}


def load_training_config(checkpoint: str) -> dict | None:
    """The settings saved with `checkpoint`; None for a checkpoint written before they were saved."""
    from .trainer import CHECKPOINT_CONFIG, saved_training_config

    try:
        saved = saved_training_config(checkpoint)
        if saved is not None and not isinstance(saved, dict):
            raise ValueError(f"expected a JSON object, got {type(saved).__name__}")
    except ValueError as err:  # json.JSONDecodeError included
        path = os.path.join(checkpoint, CHECKPOINT_CONFIG)
        raise ValueError(
            f"Checkpoint file {path} cannot be read fully ({err}). Resume from another checkpoint."
        ) from None
    return saved


def compare_run_settings(saved: dict, record: dict) -> list[tuple[str, object, object]]:
    """Refuse changes of [`MEANING_SETTINGS`]; return the other changes as (name, old, new), sorted by name.

    `record` is this run's settings as a checkpoint would save them (compared as they read back from JSON).
    """
    now = json.loads(json.dumps(record))
    refused = [(k, saved.get(k), now.get(k)) for k in MEANING_SETTINGS if saved.get(k) != now.get(k)]
    if refused:
        lines = "; ".join(f"--{k} {old!r} in the checkpoint, {new!r} now" for k, old, new in refused)
        raise ValueError(
            f"Cannot resume with settings that change what the checkpoint's weights mean: {lines}. Resume with the "
            "checkpoint's values, or start a new run in another --output_dir (or fine-tune from the exported "
            "pipeline)."
        )
    names = sorted((set(saved) | set(now)) - set(MEANING_SETTINGS) - set(INVOCATION_SETTINGS))
    return [(k, saved.get(k), now.get(k)) for k in names if saved.get(k) != now.get(k)]


def apply_optimizer_settings(optimizer, lr_scheduler, config, changed: list[tuple[str, object, object]]) -> None:
    """Put the new optimizer hyperparameters of `config` (a `TrainConfig`) into the state just loaded from a checkpoint
    (which holds the old ones).

    The learning rate lives in the LR scheduler's base rates and in each parameter group: both are set, and the
    group's current rate is recomputed from the schedule at the saved step. Schedule shape changes (steps, warm-up,
    schedule kind) need nothing: the schedule function is rebuilt from the new flags and not saved.
    """
    names = {name for name, _, _ in changed}
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper or the bare scheduler
    groups = optimizer.param_groups
    if "learning_rate" in names:
        old_bases = list(scheduler.base_lrs)
        scheduler.base_lrs = [config.learning_rate] * len(groups)
        rates = []
        for group, old_base in zip(groups, old_bases):
            group["initial_lr"] = config.learning_rate
            # The schedule's factor at the saved step (current rate over base rate) times the new base rate.
            group["lr"] = config.learning_rate * (group["lr"] / old_base if old_base else 1.0)
            rates.append(group["lr"])
        scheduler._last_lr = rates
    for flag, key in OPTIMIZER_SETTINGS.items():
        if flag in names:
            for group in groups:
                group[key] = getattr(config, flag)
    if names & {"adam_beta1", "adam_beta2"}:
        for group in groups:
            group["betas"] = (config.adam_beta1, config.adam_beta2)


def check_rng_states(checkpoint: str, num_processes: int) -> list[str]:
    """Refuse a checkpoint without the RNG states it should hold; returns warnings for processes it has none for.

    accelerate writes `random_states_{i}.pkl` per process and only logs at INFO level when one is missing, so a
    resume would silently draw other random numbers (e.g. image flips) than an uninterrupted run.
    """
    indices = sorted(
        int(os.path.basename(p)[len("random_states_") : -len(".pkl")])
        for p in glob.glob(os.path.join(checkpoint, "random_states_*.pkl"))
        if os.path.basename(p)[len("random_states_") : -len(".pkl")].isdigit()
    )
    expected = list(range(len(indices)))
    if not indices or indices != expected:
        first_missing = min(set(range(max(indices, default=0) + 1)) - set(indices))
        missing = os.path.join(checkpoint, f"random_states_{first_missing}.pkl")
        raise ValueError(
            f"Checkpoint file {missing} is missing: without the process's RNG state the resumed run would not "
            "continue the interrupted one. Resume from another checkpoint (--resume_from_checkpoint PATH)."
        )
    if num_processes > len(indices):
        return [
            f"Checkpoint {checkpoint} holds RNG states for {len(indices)} process(es); processes {len(indices)} to "
            f"{num_processes - 1} start from fresh ones (data augmentation will differ from an uninterrupted run)."
        ]
    return []


def check_resume(checkpoint: str, record: dict, model_config: dict, num_processes: int):
    """Everything that can refuse `checkpoint` before any of it is loaded into the run.

    `record` is this run's settings as checkpoints save them (`Trainer.record`). Returns the checkpoint's
    [`~training.TrainerState`], the warnings to log, and the changed settings to apply (see
    [`compare_run_settings`]); raises ValueError naming the file or the setting otherwise.
    """
    from .trainer import CHECKPOINT_CONFIG
    from .training import TrainerState, check_checkpoint_config, check_checkpoint_files

    check_checkpoint_config(checkpoint, model_config)
    check_checkpoint_files(checkpoint)  # before anything is unpickled
    state = TrainerState.load(checkpoint)
    warnings = check_rng_states(checkpoint, num_processes)
    saved = load_training_config(checkpoint)
    if saved is None:
        warnings.append(
            f"Checkpoint {checkpoint} has no {CHECKPOINT_CONFIG} (written by an older dit-hf): the objective and "
            "other settings cannot be compared with the ones given now; make sure they are the same."
        )
        changed = []
    else:
        changed = compare_run_settings(saved, record)
    return state, warnings, changed


def describe_change(name: str, old, new) -> str:
    return f"Resumed with a changed setting: --{name} {old!r} -> {new!r} (applied)"


def resolve_resume_once(resume_from_checkpoint: str, checkpoints_dir: str, warn=None) -> str | None:
    """[`~training.resolve_resume_path`] on the main process only (verifying hashes reads every file of the
    checkpoint), its answer or error shared with the other processes."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from .training import resolve_resume_path

    state = PartialState()
    answer = [None, None]
    if state.is_main_process:
        try:
            answer = [resolve_resume_path(resume_from_checkpoint, checkpoints_dir, warn), None]
        except (ValueError, FileNotFoundError) as err:
            answer = [None, (isinstance(err, FileNotFoundError), str(err))]
    if state.num_processes > 1:
        answer = broadcast_object_list(answer)
    if answer[1] is not None:
        not_found, message = answer[1]
        raise (FileNotFoundError if not_found else ValueError)(message)
    return answer[0]
