# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Class-conditional sampling with a DiT: `DiTPipeline`.

Like `modeling_dit.py`, this file imports only torch, diffusers, huggingface_hub, the standard library and its
sibling `scheduling_dit.py`, so `save_pretrained` can copy both into the pipeline folder and
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` can run it where dit_hf is not installed.
"""

import importlib
import inspect
import json
import math
import numbers
import os
import shutil

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMParallelScheduler, DDPMScheduler
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo

# The objective <-> scheduler rules, shared with training; the file travels beside this one into saved folders.
from .scheduling_dit import (
    OBJECTIVES,
    SCHEDULING_MODULE,
    check_guidance_scale,
    check_scheduler_matches,
    make_matching_scheduler,
)

# How the custom code is named inside a saved folder (model_index.json refers to these module names).
PIPELINE_MODULE = "pipeline_dit"
TRANSFORMER_MODULE = "modeling_dit"

# Sampling settings when neither the call nor the saved pipeline (`default_*` config entries) gives them.
NUM_INFERENCE_STEPS = 50
GUIDANCE_SCALE = 4.0
# Schedulers whose `step` takes [prediction, variance] and uses a learned variance (variance_type "learned[_range]").
LEARNED_VARIANCE_SCHEDULERS = (DDPMScheduler, DDPMParallelScheduler)
# Autoencoders that take and give images in [0, 1] and normalise their latents inside `encode` / `decode` (RAE:
# ImageNet mean/std on the pixels; `latents_mean` / `latents_std` and `scaling_factor` on the latents). The others
# (AutoencoderKL, AutoencoderDC, ...) work in [-1, 1] and leave `scaling_factor` / `shift_factor` to the caller.
# dit_hf.autoencoders reads these facts from here: this file must run alone as a saved folder's code.
SELF_NORMALISING_AUTOENCODERS = ("AutoencoderRAE",)


def self_normalising(vae) -> bool:
    """Whether `vae` maps [0, 1] images to latents it has already normalised and scaled (see the constant above)."""
    return type(vae).__name__ in SELF_NORMALISING_AUTOENCODERS


def vae_latent_scale(vae) -> tuple[float, float]:
    """`(shift, scaling)` that bring `vae`'s latents to the DiT's scale as `(z - shift) * scaling`: the config's
    `shift_factor` (0 if None) and `scaling_factor`, or `(0, 1)` for an autoencoder that applies them itself."""
    if self_normalising(vae):
        return 0.0, 1.0
    return float(getattr(vae.config, "shift_factor", None) or 0.0), float(vae.config.scaling_factor)


def decoded_to_unit_range(vae, images: torch.Tensor) -> torch.Tensor:
    """`vae.decode(...).sample` as images in [0, 1]."""
    if self_normalising(vae):
        return images.clamp(0, 1)
    return (images / 2 + 0.5).clamp(0, 1)


def check_latent_statistics(latents_mean: list | None, latents_std: list | None) -> None:
    """Both or neither given, of equal length, every std finite and > 0."""
    if (latents_mean is None) != (latents_std is None):
        raise ValueError("Pass both `latents_mean` and `latents_std` (one value per latent channel), or neither.")
    if latents_mean is None:
        return
    if len(latents_mean) != len(latents_std) or not latents_mean:
        raise ValueError(
            f"`latents_mean` ({len(latents_mean)} values) and `latents_std` ({len(latents_std)}) must both have one "
            "value per latent channel."
        )
    if not all(math.isfinite(m) for m in latents_mean) or not all(math.isfinite(s) and s > 0 for s in latents_std):
        raise ValueError("`latents_mean` must be finite and `latents_std` finite and > 0.")


def flatten_labels(labels) -> list:
    """Class labels as a flat list: one label, a list, a nested list (`[[1], [1]]`, a batch of one-label lists, as
    diffusers' batch tests pass them) or a tensor / array of any shape, flattened like diffusers' DiTPipeline does."""
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        return labels.reshape(-1).tolist()
    if isinstance(labels, (list, tuple)):
        return [label for item in labels for label in flatten_labels(item)]
    return [labels]


def step_kwargs(scheduler: SchedulerMixin, generator) -> dict:
    """`generator=` for the schedulers whose `step` draws noise and takes one; PNDM, LMS, Heun, DEIS, ... have none."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def check_sampling_defaults(num_inference_steps: int | None, guidance_scale: float | None) -> None:
    """Steps >= 1 and a guidance scale >= 0 (or None), for the call and the saved `default_*` config entries."""
    if num_inference_steps is not None:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral):
            raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}.")
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
    if guidance_scale is not None:
        check_guidance_scale(guidance_scale)


def check_guidance_interval(guidance_interval: tuple[float, float] | None) -> None:
    """`guidance_interval` is None or (low, high) noise levels `t / num_train_timesteps` with 0 <= low <= high <= 1."""
    if guidance_interval is None:
        return
    if len(guidance_interval) != 2:
        raise ValueError(f"`guidance_interval` must be two noise levels (low, high), got {guidance_interval!r}.")
    low, high = guidance_interval
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(
            "`guidance_interval` must be (low, high) with 0 <= low <= high <= 1 (noise levels "
            f"t / num_train_timesteps, 1 is pure noise), got {tuple(guidance_interval)}."
        )


def image_grid(images: list[PIL.Image.Image], cols: int) -> PIL.Image.Image:
    """Paste equally sized images into a grid, row by row; the last row may be incomplete."""
    if not images:
        raise ValueError("`images` is empty: nothing to put in a grid.")
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = PIL.Image.new(images[0].mode, size=(cols * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(img, box=(i % cols * w, i // cols * h))
    return grid


def _whole_class_id(item) -> int:
    """`item` as a class id: an int (Python, numpy or a one-element tensor) or a whole float; 1.5 or True refused."""
    if isinstance(item, (bool, np.bool_)):
        raise ValueError(f"Class id {item!r} is a boolean; pass integer class ids or class names.")
    if isinstance(item, torch.Tensor) and item.numel() == 1:
        item = item.item()
    if isinstance(item, (int, np.integer)):
        return int(item)
    try:
        value = float(item)
    except (TypeError, ValueError):
        raise ValueError(f"Class id {item!r} is not a number; pass integer class ids or class names.") from None
    if not value.is_integer():  # also NaN and inf
        raise ValueError(f"Class id {item!r} is not a whole number; pass integer class ids or class names.")
    return int(value)


class DiTPipeline(DiffusionPipeline):
    r"""
    Sample images of given classes from a [`DiTModel`], with classifier-free guidance.

    Args:
        transformer ([`DiTModel`]): The class-conditional denoiser (any model with the same call signature works,
            e.g. diffusers' `DiTTransformer2DModel`).
        scheduler ([`SchedulerMixin`]): A diffusers scheduler that matches `objective` (checked when sampling):
            for `"ddpm_eps"` / `"ddpm_v"` one built for the training schedule with `prediction_type` `"epsilon"` /
            `"v_prediction"`, e.g. `DDPMScheduler` (uses the learned variance), `DDIMScheduler`,
            `DPMSolverMultistepScheduler`; for `"flow"` `FlowMatchEulerDiscreteScheduler` or
            `FlowMatchHeunDiscreteScheduler` with the training T. See [`~DiTPipeline.matching_scheduler`].
        vae (`AutoencoderKL`, `AutoencoderDC`, `AutoencoderRAE`, ..., *optional*): Decodes latents into images.
            `None` for a pixel-space model.
        id2label (`dict[int, str]`, *optional*): Class names; a name may list synonyms separated by commas.
        objective (`str`, defaults to `"ddpm_eps"`): What the model predicts: `"ddpm_eps"` (ε, DiT), `"ddpm_v"`
            (v), `"flow"` (the flow-matching velocity ε - x_0) or `"flow_x"` (flow matching, the model predicts the
            clean image x_0; each step turns it into the velocity (x_σ - x̂_0) / σ). Saved in model_index.json;
            folders saved without it are `"ddpm_eps"`.
        default_num_inference_steps (`int`, *optional*): Steps of a call that gives no `num_inference_steps`
            (e.g. the setting the model was validated with); 50 if None. Saved in model_index.json.
        default_guidance_scale (`float`, *optional*): Guidance scale of a call that gives no `guidance_scale`; 4.0
            if None. Saved in model_index.json.
        default_guidance_interval (`tuple[float, float]`, *optional*): Guidance interval of a call that gives no
            `guidance_interval`; every step is guided if None. Saved in model_index.json.
        latents_mean, latents_std (`list[float]`, *optional*): Per-channel statistics the model's latents were
            normalised with, `(z - mean) / std` (`--latent_norm channel` or `none`); `decode` undoes them. Without
            them the VAE's own `scaling_factor` / `shift_factor` are undone (none for an `AutoencoderRAE`, which
            normalises its latents itself). Saved in model_index.json.

    Loading: `DiTPipeline.from_pretrained(folder_or_repo_id, ...)` is diffusers' loader with all its arguments
    (`dtype`, also per component, `variant`, `device_map`, `low_cpu_mem_usage`, `use_safetensors`, components to
    replace such as `scheduler=...`, ...); it loads dit_hf's installed classes. Without dit_hf, the same folder loads
    with `DiffusionPipeline.from_pretrained(folder_or_repo_id, trust_remote_code=True, ...)` from its own copy of
    the code.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        transformer,
        scheduler,
        vae=None,
        id2label: dict | None = None,
        objective: str = "ddpm_eps",
        default_num_inference_steps: int | None = None,
        default_guidance_scale: float | None = None,
        default_guidance_interval: list[float] | tuple[float, float] | None = None,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"Unknown `objective` {objective!r}; choose one of {list(OBJECTIVES)}.")
        check_sampling_defaults(default_num_inference_steps, default_guidance_scale)
        check_guidance_interval(default_guidance_interval)
        check_latent_statistics(latents_mean, latents_std)
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        # JSON turns int keys into strings: normalise so a reloaded pipeline compares equal.
        id2label = {int(k): str(v) for k, v in id2label.items()} if id2label else None
        self.register_to_config(
            id2label=id2label,
            objective=objective,
            default_num_inference_steps=default_num_inference_steps,
            default_guidance_scale=default_guidance_scale,
            default_guidance_interval=[float(v) for v in default_guidance_interval]
            if default_guidance_interval is not None
            else None,
            latents_mean=[float(m) for m in latents_mean] if latents_mean is not None else None,
            latents_std=[float(s) for s in latents_std] if latents_std is not None else None,
        )
        self.labels = {}
        for class_id, names in (id2label or {}).items():
            for name in names.split(","):
                self.labels[name.strip()] = class_id

    @property
    def num_classes(self) -> int:
        return getattr(self.transformer.config, "num_classes", None) or getattr(
            self.transformer.config, "num_embeds_ada_norm", 0
        )

    def get_label_ids(self, label: str | int | list[str | int]) -> list[int]:
        """Map class names (or ids) to class ids, e.g. `pipe.get_label_ids(["golden retriever", "tabby"])`; nested
        lists and tensors are flattened (see `flatten_labels`)."""
        ids = []
        for item in flatten_labels(label):
            if isinstance(item, str):
                if item not in self.labels:
                    valid = sorted(self.labels) if self.labels else "none (this pipeline has no `id2label`)"
                    raise ValueError(f"Unknown class name {item!r}. Valid names: {valid}.")
                ids.append(self.labels[item])
            else:
                class_id = _whole_class_id(item)
                if not 0 <= class_id < self.num_classes:
                    raise ValueError(f"Class id {class_id} is out of range: valid ids are 0..{self.num_classes - 1}.")
                ids.append(class_id)
        return ids

    def matching_scheduler(self, family: str) -> SchedulerMixin:
        """
        A scheduler of the named family for this pipeline's objective, built from the current scheduler's config
        (which keeps the training schedule): `pipe.scheduler = pipe.matching_scheduler("dpm")`. Families:
        `"ddpm"`, `"ddim"`, `"dpm"` for the DDPM objectives; `"euler"`, `"heun"` for `"flow"`.
        """
        return make_matching_scheduler(self.config.objective, family, self.scheduler.config)

    def _sample_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        size = self.transformer.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return (batch_size, self.transformer.config.in_channels, height, width)

    def _uses_learned_variance(self) -> bool:
        """Whether the scheduler consumes the variance channels (DDPM with learned or learned_range variance)."""
        return isinstance(self.scheduler, LEARNED_VARIANCE_SCHEDULERS) and self.scheduler.config.variance_type in (
            "learned",
            "learned_range",
        )

    def _check_scheduler(self, latent_channels: int):
        """Reject a scheduler for another objective, or one that would drop channels of the prediction (the
        pipeline already removes the variance channels)."""
        check_scheduler_matches(self.config.objective, self.scheduler)
        name = type(self.scheduler).__name__
        variance_type = self.scheduler.config.get("variance_type")
        # DPM-Solver with a learned variance_type keeps `model_output[:, :3]`, which assumes 3 latent channels.
        # (DDIM and others only carry the key over from a DDPM config and ignore it.)
        takes_variance = "variance_type" in inspect.signature(type(self.scheduler).__init__).parameters
        learned = variance_type in ("learned", "learned_range") and not self._uses_learned_variance()
        if takes_variance and learned and latent_channels != 3:
            raise ValueError(
                f"{name} with variance_type={variance_type!r} keeps only 3 channels of the model output, but the "
                f"model has {latent_channels}: build it with `{name}.from_config(pipe.scheduler.config, "
                "variance_type=None)`."
            )

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | list[str] | int | str | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_channels: int | None = None,
        num_images: int | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Args:
            class_labels (`list[int]`, `list[str]`, `int` or `str`, *optional*): One image per entry. Names are
                looked up in `id2label`; nested lists (`[[1], [1]]`) and tensors are flattened. Must be `None` for
                an unconditional model.
            guidance_scale (`float`, *optional*): Classifier-free guidance scale; 1.0 samples the conditional model
                alone (no unconditional pass). Defaults to the config's `default_guidance_scale`, else 4.0.
            num_inference_steps (`int`, *optional*): Denoising steps. Defaults to the config's
                `default_num_inference_steps`, else 50.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): One generator, or one per image.
            latents (`torch.Tensor`, *optional*): Starting noise of shape `(batch, channels, height, width)`.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (NHWC floats in [0, 1]), `"pt"` (NCHW floats
                in [0, 1]) or `"latent"` (the denoised latents, not decoded).
            return_dict (`bool`, defaults to `True`): Return an [`ImagePipelineOutput`] instead of a tuple.
            guidance_channels (`int`, *optional*): Guide only the first k noise channels and take the others from
                the conditional branch. `None` guides all; 3 reproduces the released DiT sampler on 4-channel latents.
            num_images (`int`, *optional*): Batch size for an unconditional model (`class_labels=None`).
            guidance_interval (`tuple[float, float]`, *optional*): Apply guidance only at steps whose noise level
                `t / num_train_timesteps` lies in `[low, high]` (1.0 is pure noise; for flow schedulers t = σ · T, so
                the level is σ); other steps run the conditional model alone, which also saves their unconditional
                forward. Defaults to the config's `default_guidance_interval`, else every step; `(0.0, 1.0)` guides
                every step whatever was saved.

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the images.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        num_inference_steps, guidance_scale, guidance_interval = self._sampling_settings(
            num_inference_steps, guidance_scale, guidance_interval
        )
        label_ids = self._label_ids(class_labels)
        conditional = label_ids is not None
        batch_size = len(label_ids) if conditional else num_images or 1
        do_cfg = conditional and guidance_scale != 1.0
        device = self._execution_device
        dtype = self.transformer.dtype
        shape = self._sample_shape(batch_size)
        self._check_guidance(do_cfg, guidance_channels, shape[1])
        self._check_scheduler(shape[1])
        # Timesteps first: the starting noise scale (`init_noise_sigma`) of σ-parametrised schedulers depends on them.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self._prepare_latents(shape, generator, latents, device, dtype)

        labels = self._label_batch(label_ids, do_cfg, device)
        # Label dropout is a training-time augmentation: sample in eval mode whatever mode the model was left in.
        was_training = self.transformer.training
        self.transformer.eval()
        try:
            latents = self._denoise(
                latents, labels, do_cfg, guidance_scale, guidance_channels, generator, guidance_interval
            )
        finally:
            self.transformer.train(was_training)

        images = latents if output_type == "latent" else self._to_images(self.decode(latents), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _check_guidance(self, do_cfg: bool, guidance_channels: int | None, latent_channels: int) -> None:
        if do_cfg and getattr(self.transformer.config, "class_dropout_prob", 0.1) == 0:
            raise ValueError(
                "Classifier-free guidance needs a model trained with label dropout (`class_dropout_prob` > 0); "
                "use `guidance_scale=1.0`."
            )
        if guidance_channels is not None and not 0 < guidance_channels <= latent_channels:
            raise ValueError(f"`guidance_channels` must be in 1..{latent_channels} or None, got {guidance_channels}.")

    def _label_batch(self, label_ids: list[int] | None, do_cfg: bool, device) -> torch.Tensor | None:
        """The labels of the denoiser's batch: with guidance, the conditional and unconditional halves go through one
        batched forward (the null class is `num_classes`)."""
        if label_ids is None:
            return None
        labels = torch.tensor(label_ids, device=device)
        if do_cfg:
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        return labels

    def _prepare_latents(self, shape, generator, latents, device, dtype) -> torch.Tensor:
        """The starting noise: drawn from `generator` or given, times the scheduler's `init_noise_sigma`."""
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(f"Got {len(generator)} generators for {shape[0]} images: pass one per image.")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        else:
            latents = latents.to(device=device, dtype=dtype)
        # Flow-matching schedulers start from unit noise and define no `init_noise_sigma`.
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def _label_ids(self, class_labels) -> list[int] | None:
        """The call's labels as class ids (None for an unconditional model), or the error naming what to pass."""
        if self.num_classes > 0:
            if class_labels is None:
                raise ValueError("This model is class-conditional: pass `class_labels` (ids or names, one per image).")
            return self.get_label_ids(class_labels)
        if class_labels is not None:
            raise ValueError("This model is unconditional: pass `class_labels=None` and `num_images`.")
        return None

    def _to_images(self, images: torch.Tensor, output_type: str):
        """Images in [0, 1] (NCHW) as the call asked: tensors ("pt"), NHWC numpy ("np") or PIL images ("pil")."""
        if output_type == "pt":
            return images
        images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        return self.numpy_to_pil(images) if output_type == "pil" else images

    def _sampling_settings(
        self, num_inference_steps: int | None, guidance_scale: float | None, guidance_interval=None
    ) -> tuple[int, float, tuple[float, float] | None]:
        """The call's values, else the saved `default_*` config entries, else 50 steps, guidance 4.0 and guidance at
        every step. (A folder saved before these entries existed has none: `config.get`.)"""
        check_sampling_defaults(num_inference_steps, guidance_scale)
        check_guidance_interval(guidance_interval)
        if guidance_interval is None:
            guidance_interval = self.config.get("default_guidance_interval")
        if num_inference_steps is None:
            saved = self.config.get("default_num_inference_steps")
            num_inference_steps = NUM_INFERENCE_STEPS if saved is None else saved
        if guidance_scale is None:
            saved = self.config.get("default_guidance_scale")
            guidance_scale = GUIDANCE_SCALE if saved is None else saved
        return num_inference_steps, guidance_scale, guidance_interval

    def _guided_at(self, t: torch.Tensor, guidance_interval: tuple[float, float] | None) -> bool:
        if guidance_interval is None:
            return True
        level = float(t) / self.scheduler.config.num_train_timesteps
        return guidance_interval[0] <= level <= guidance_interval[1]

    def _denoise(
        self, latents, labels, do_cfg, guidance_scale, guidance_channels, generator, guidance_interval=None
    ) -> torch.Tensor:
        latent_channels = latents.shape[1]
        learned_variance = self._uses_learned_variance()
        extra_step_kwargs = step_kwargs(self.scheduler, generator)
        for t in self.progress_bar(self.scheduler.timesteps):
            guide = do_cfg and self._guided_at(t, guidance_interval)
            model_input = torch.cat([latents, latents]) if guide else latents
            if hasattr(self.scheduler, "scale_model_input"):  # flow-matching schedulers have none
                model_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = t.to(latents.device).reshape(1).expand(model_input.shape[0])
            step_labels = labels if guide or labels is None else labels[: latents.shape[0]]
            out = self.transformer(model_input, timesteps, step_labels).sample  # (B, C or 2C, H, W)
            # The prediction is ε, v, the flow velocity or x_0; guidance extrapolates any of them linearly.
            pred, rest = out[:, :latent_channels], out[:, latent_channels:]
            if self.config.objective == "flow_x":  # x̂_0 -> the velocity the flow scheduler integrates
                sigma = (t.to(latents.device).float() / self.scheduler.config.num_train_timesteps).clamp_min(1e-4)
                pred = ((model_input[:, :latent_channels] - pred.float()) / sigma).to(pred.dtype)
            if guide:
                k = guidance_channels or latent_channels
                cond, uncond = pred.chunk(2)
                guided = uncond[:, :k] + guidance_scale * (cond[:, :k] - uncond[:, :k])
                pred = torch.cat([guided, cond[:, k:]], dim=1)
                rest = rest.chunk(2)[0]
            if learned_variance:
                # DDPM with a learned variance takes [prediction, variance]; other schedulers the prediction alone.
                if rest.shape[1] != latent_channels:
                    raise ValueError(
                        f"The scheduler's variance_type={self.scheduler.config.variance_type!r} needs a model that "
                        "predicts the variance (`learn_sigma=True`); for this model build the scheduler with "
                        "`variance_type='fixed_small'`."
                    )
                model_output = torch.cat([pred, rest], dim=1)
            else:
                model_output = pred
            latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs).prev_sample
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (NCHW); pixel-space models map [-1, 1] to [0, 1] directly."""
        if self.vae is None:
            return (latents / 2 + 0.5).clamp(0, 1)
        # A folder saved before these entries existed has none: `config.get`.
        mean, std = self.config.get("latents_mean"), self.config.get("latents_std")
        latents = latents.to(self.vae.dtype)
        if mean is not None:
            stats = torch.tensor([mean, std], device=latents.device, dtype=latents.dtype).reshape(2, 1, -1, 1, 1)
            if stats.shape[2] != latents.shape[1]:
                raise ValueError(
                    f"The pipeline's `latents_mean` has {stats.shape[2]} channels, the latents {latents.shape[1]}."
                )
            latents = latents * stats[1] + stats[0]
        else:
            shift, scaling = vae_latent_scale(self.vae)
            latents = latents / scaling + shift
        return decoded_to_unit_range(self.vae, self.vae.decode(latents).sample)

    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
        """NHWC floats in [0, 1] -> PIL images; one channel gives grayscale ("L") images."""
        images = (images * 255).round().astype("uint8")
        if images.shape[-1] == 1:
            return [PIL.Image.fromarray(image[..., 0], mode="L") for image in images]
        return [PIL.Image.fromarray(image) for image in images]

    # ------------------------------------------------------------------------------------------------------------
    # Saving with the custom code, and loading with the installed classes through diffusers' own loader.

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        **kwargs,
    ):
        """Save like diffusers, plus the code of the pipeline and transformer so the folder runs without dit_hf."""
        super().save_pretrained(
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            use_flashpack=use_flashpack,
        )
        self.write_custom_code(save_directory)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            token = kwargs.pop("token", None)
            repo_id = create_repo(repo_id, exist_ok=True, private=kwargs.pop("private", None), token=token).repo_id
            self._upload_folder(
                save_directory,
                repo_id,
                token=token,
                commit_message=kwargs.pop("commit_message", None),
                create_pr=kwargs.pop("create_pr", False),
            )

    def write_custom_code(self, save_directory: str | os.PathLike):
        """Copy this file (with the scheduling rules it imports) and the transformer's module into the folder and
        point model_index.json at them."""
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        pipeline_file = inspect.getsourcefile(type(self))
        shutil.copyfile(pipeline_file, os.path.join(save_directory, f"{PIPELINE_MODULE}.py"))
        # The module this file imports relatively: diffusers copies it along when it loads the folder's code.
        rules = os.path.join(os.path.dirname(pipeline_file), f"{SCHEDULING_MODULE}.py")
        shutil.copyfile(rules, os.path.join(save_directory, f"{SCHEDULING_MODULE}.py"))
        index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
        transformer_cls = type(self.transformer)
        if transformer_cls.__module__.split(".")[-1] == TRANSFORMER_MODULE:
            target = os.path.join(save_directory, "transformer", f"{TRANSFORMER_MODULE}.py")
            shutil.copyfile(inspect.getsourcefile(transformer_cls), target)
            index["transformer"] = [TRANSFORMER_MODULE, transformer_cls.__name__]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")

    # `DiTPipeline.from_pretrained` is diffusers' own, with all its arguments. A saved folder's model_index.json names
    # the copies of this file and of modeling_dit.py that travel inside it, which diffusers runs only with
    # `trust_remote_code=True`. With dit_hf installed, the two hooks below make diffusers' loader take the installed
    # classes instead: the pipeline class is the one `from_pretrained` is called on, and the transformer is dit_hf's
    # `DiTModel`, so no code from the folder runs. Without dit_hf (this file running as a folder's remote code) they
    # change nothing.

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict:
        # diffusers reads model_index.json through this method both in `download` (for a Hub repo) and in
        # `load_config`; a `[module, class]` pair as `_class_name` would make either fetch and run the folder's copy.
        config = super()._dict_from_json_file(json_file)
        if installed_model_class() is not None and config.get("_class_name") == [PIPELINE_MODULE, cls.__name__]:
            config["_class_name"] = cls.__name__
        return config

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' `load_config`; with dit_hf installed, a transformer saved as the folder's `modeling_dit.DiTModel`
        copy is listed as dit_hf's installed `DiTModel` (the class `from_pretrained` then loads it with)."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        model_cls = installed_model_class()
        if model_cls is not None:
            for name, value in config.items():
                if value == [TRANSFORMER_MODULE, model_cls.__name__]:
                    config[name] = [model_cls.__module__, model_cls.__name__]
        return loaded


def installed_model_class() -> type | None:
    """dit_hf's `DiTModel` when dit_hf is installed, else None (this file then runs as a saved folder's code)."""
    try:
        # No import statement on purpose: diffusers scans this file's imports when it travels as remote code.
        return importlib.import_module("dit_hf.modeling_dit").DiTModel
    except ImportError:
        return None
