# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Which schedulers sample a DiT trained with which objective, and the guidance scale's range: the one place of
these rules.

The training objectives (`dit_hf.objective`), the trainer's config (`dit_hf.config`) and the pipeline
(`dit_hf.pipeline_dit`) all read them here. Like `pipeline_dit.py`, this file imports only diffusers and the standard
library: `DiTPipeline.save_pretrained` copies it beside `pipeline_dit.py`, which imports it, into every saved folder.
"""

import math

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SCHEDULING_MODULE = "scheduling_dit"

# Training objectives (see dit_hf.objective) and the `prediction_type` diffusion schedulers need for each.
OBJECTIVES = ("ddpm_eps", "ddpm_v", "flow", "flow_x")
# Flow matching on the straight path; "flow" predicts the velocity ε - x_0, "flow_x" the clean image x_0 (the
# pipeline turns it into the velocity (x_σ - x̂_0) / σ for the scheduler).
FLOW_OBJECTIVES = ("flow", "flow_x")
DDPM_PREDICTION_TYPES = {"ddpm_eps": "epsilon", "ddpm_v": "v_prediction"}
# Scheduler families by name, for `make_matching_scheduler`.
DDPM_FAMILIES = ("ddpm", "ddim", "dpm")
FLOW_FAMILIES = ("euler", "heun")
# The families that can sample each objective; the first is the default.
SAMPLER_FAMILIES = {"ddpm_eps": DDPM_FAMILIES, "ddpm_v": DDPM_FAMILIES, "flow": FLOW_FAMILIES, "flow_x": FLOW_FAMILIES}


def uses_flow_sigmas(scheduler: SchedulerMixin) -> bool:
    """Whether a scheduler integrates the flow-matching path x_σ = (1 - σ) x_0 + σ ε rather than a DDPM chain."""
    return type(scheduler).__name__.startswith("FlowMatch") or bool(scheduler.config.get("use_flow_sigmas"))


def check_scheduler_matches(objective: str, scheduler: SchedulerMixin):
    """Raise a `ValueError` naming the fix when `scheduler` cannot sample a model trained with `objective`."""
    name = type(scheduler).__name__
    prediction_type = scheduler.config.get("prediction_type")
    if objective in FLOW_OBJECTIVES:
        if not uses_flow_sigmas(scheduler):
            raise ValueError(
                f"The model was trained with the {objective!r} objective (flow matching), but {name} is a "
                "diffusion scheduler; use a flow-matching one with the training T and shift, e.g. the one saved "
                "with the model or `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)` "
                "(`FlowMatchHeunDiscreteScheduler` for 2nd order)."
            )
        if prediction_type not in (None, "flow_prediction"):
            raise ValueError(
                f"The model was trained with the {objective!r} objective, but {name} has prediction_type="
                f"{prediction_type!r}; build it with `prediction_type='flow_prediction'`."
            )
        if scheduler.config.get("use_dynamic_shifting"):
            raise ValueError(
                f"DiTPipeline samples with a fixed shift, but {name} has use_dynamic_shifting=True; build it with "
                "`use_dynamic_shifting=False, shift=...`."
            )
        return
    expected = DDPM_PREDICTION_TYPES[objective]
    if uses_flow_sigmas(scheduler):
        raise ValueError(
            f"The model was trained with the {objective!r} objective (prediction_type={expected!r}), but {name} is "
            "a flow-matching scheduler; use a diffusion scheduler (DDPM, DDIM, DPM-Solver) built from the training "
            "schedule, e.g. the one saved with the model: `DDPMScheduler.from_pretrained(model, subfolder="
            "'scheduler')`."
        )
    if (prediction_type or "epsilon") != expected:
        raise ValueError(
            f"The model was trained with the {objective!r} objective, but {name} has prediction_type="
            f"{prediction_type!r}; use `{name}.from_config(pipe.scheduler.config, prediction_type={expected!r})` "
            "or `pipe.matching_scheduler(family)`."
        )


def make_matching_scheduler(objective: str, family: str, config: dict) -> SchedulerMixin:
    """
    A scheduler of the named family that samples a model trained with `objective`.

    Args:
        objective (`str`): `"ddpm_eps"`, `"ddpm_v"`, `"flow"` or `"flow_x"`.
        family (`str`): For the DDPM objectives `"ddpm"` (ancestral; uses a learned variance), `"ddim"` or `"dpm"`
            (DPM-Solver++ multistep). For flow: `"euler"` or `"heun"` (2nd order, 2 model calls per step but
            the last). (`DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")` is
            accepted too, but it feeds the model ⌊σ · T⌋ rather than σ · T, which limits its accuracy.)
        config (`dict`): Config of a scheduler built for the training (e.g. `pipe.scheduler.config`), which gives
            the DDPM beta schedule, or the flow T and `shift` (`{"num_train_timesteps": T, "shift": s}` will do).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown objective {objective!r}; choose one of {list(OBJECTIVES)}.")
    families = SAMPLER_FAMILIES[objective]
    if family not in families:
        raise ValueError(
            f"Unknown scheduler family {family!r} for the {objective!r} objective; choose one of {list(families)}."
        )
    if objective in FLOW_OBJECTIVES:
        if config.get("use_flow_sigmas"):
            shift = config["flow_shift"]
        elif "shift" in config:
            shift = config["shift"]
        else:
            raise ValueError(
                "The scheduler config has no `shift` (it is not a flow-matching scheduler's), so the sampling shift "
                "is unknown; pass `{'num_train_timesteps': T, 'shift': s}` or build the scheduler directly."
            )
        num_train_timesteps = config.get("num_train_timesteps", 1000)
        if family == "euler":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
        return FlowMatchHeunDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    if "beta_schedule" not in config or config.get("use_flow_sigmas"):
        raise ValueError(
            "The scheduler config has no `beta_schedule` (it is not a diffusion scheduler's), so the noise schedule "
            "is unknown; pass the config of the scheduler saved with the model "
            "(`DDPMScheduler.load_config(model, subfolder='scheduler')`)."
        )
    prediction_type = DDPM_PREDICTION_TYPES[objective]
    if family == "ddpm":
        return DDPMScheduler.from_config(config, prediction_type=prediction_type)
    if family == "ddim":
        return DDIMScheduler.from_config(config, prediction_type=prediction_type)
    # DPM-Solver would keep 3 channels of a prediction with a learned variance_type; the pipeline drops them.
    return DPMSolverMultistepScheduler.from_config(config, prediction_type=prediction_type, variance_type=None)


def check_guidance_scale(guidance_scale: float) -> None:
    """`guidance_scale` is a finite number >= 0 (1.0 disables guidance); NaN or inf would give black images."""
    if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(
            f"`guidance_scale` must be a finite number >= 0, got {guidance_scale} (1.0 disables guidance)."
        )
