#!/usr/bin/env python
"""Train a class-conditional Diffusion Transformer with accelerate.

The embedded default (scikit-learn's digits in pixel space; a few minutes on a laptop CPU):

    accelerate launch train_dit.py

ImageNet-style folder in the latent space of a VAE, on one GPU (latents encoded once and cached):

    accelerate launch --config_file accelerate_configs/single_gpu.yaml train_dit.py \\
        --train_data_dir /data/imagenet/train --resolution 256 --vae stabilityai/sd-vae-ft-ema \\
        --cache_latents /data/cache/imagenet-256 --model DiT-XL/2 --train_batch_size 256 \\
        --mixed_precision bf16 --ema_decay 0.9999 --max_train_steps 400000 --checkpointing_steps 10000

A recipe file (src/dit_hf/recipes/, by name or path), with any flag overriding it; a run's own config.yaml repeats it:

    accelerate launch train_dit.py --config smoke                       # the whole trainer in seconds on a CPU
    accelerate launch train_dit.py --config lightningdit --train_data_dir /data/imagenet/train --vae PATH
    accelerate launch train_dit.py --config outputs/dit-digits/config.yaml --seed 1 --output_dir outputs/seed-1

Several GPUs or nodes: the same command with another file of accelerate_configs/ (see README.md there).
Resume: add `--resume_from_checkpoint latest`. Publish: add `--push_to_hub --hub_model_id user/name`.

Every flag is declared once, in dit_hf.config.TrainConfig; the loop is dit_hf.trainer.Trainer.train; the periodic
work (logs, checkpoints, grids, FID, plots) is in dit_hf.hooks. This script builds the pieces and exports the result.
"""

import functools
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler

from dit_hf import DiTModel
from dit_hf.autoencoders import cached_channel_statistics, latent_shape, load_autoencoder, make_latent_norm
from dit_hf.config import TrainConfig, launcher_precision, requested_precision, resolve_config
from dit_hf.data import (
    CachedImages,
    ImageLabelDataset,
    build_transform,
    check_labels,
    check_resolution,
    class_names,
    infer_num_classes,
    load_image_dataset,
    resolve_columns,
    select_subset,
)
from dit_hf.distributed import enable_fsdp_on_cpu, unsharded_copy
from dit_hf.ema import EMAModels, export_folder_name, parse_ema_decays
from dit_hf.fp8 import check_fp8_available, count_fp8_linears, fp8_recipe
from dit_hf.guards import EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteStop, Preempted, trim_metrics
from dit_hf.hooks import (
    CheckpointHook,
    EvalHook,
    GuardHook,
    LogHook,
    PlotHook,
    SampleGridHook,
    Sampling,
    log_image,
    sample_grid,
    setup_trackers,
)
from dit_hf.hub import refuse_token_arguments
from dit_hf.image_checks import default_store_dir, drop_unreadable_images_once
from dit_hf.init_from import init_model_from_config
from dit_hf.latents import (
    BatchedCachedLatents,
    cache_covers_dataset,
    cache_fingerprint,
    check_cache,
    encode_to_cache,
)
from dit_hf.modeling_dit import BLOCK_OPTION_KEYS, DIT_PRESETS, RECIPE_PRESETS
from dit_hf.objective import make_objective, shift_for_dimension
from dit_hf.ownership import own_output_dir
from dit_hf.precision import PRECISION_DTYPES
from dit_hf.recipes import estimate_hours, format_duration, measure_matmul_flops, token_warning
from dit_hf.trainer import LatentSpace, Trainer
from dit_hf.training import (
    EpochSampler,
    StepRandomness,
    WriteFailedError,
    dit_train_flops_per_sample,
    make_adamw,
    num_update_steps,
    reporting_write_failures,
)

logger = get_logger(__name__)


def parse_args(input_args: list[str] | None = None) -> TrainConfig:
    """The run's config, resolved and frozen (see dit_hf.config: defaults <- recipe <- --config file <- flags)."""
    # The Hub token comes from HF_TOKEN or `hf auth login` only: a command line gets recorded (trackers, logs).
    refuse_token_arguments(sys.argv[1:] if input_args is None else input_args)
    return resolve_config(input_args, description=__doc__)


ARCHITECTURE_FLAGS = ("hidden_size", "depth", "num_heads", "patch_size", *BLOCK_OPTION_KEYS)


def build_model(config: TrainConfig, num_classes: int, in_channels: int, sample_size: int) -> DiTModel:
    # Flags left unset keep the preset's value (e.g. a LightningDiT preset's RMSNorm and SwiGLU).
    overrides = {k: getattr(config, k) for k in ARCHITECTURE_FLAGS}
    return DiTModel.from_preset(
        config.model,
        **{k: v for k, v in overrides.items() if v is not None},
        sample_size=sample_size,
        in_channels=in_channels,
        mlp_ratio=config.mlp_ratio,
        num_classes=num_classes,
        class_dropout_prob=config.class_dropout_prob if num_classes > 0 else 0.0,
        learn_sigma=config.learn_sigma,
        timestep_freq_shift=config.timestep_freq_shift,
    )


def build_objective(config: TrainConfig, sample_shape: tuple[int, int, int]):
    auto = config.time_shift == "auto"
    shift = shift_for_dimension(math.prod(sample_shape)) if auto else float(config.time_shift)
    return make_objective(
        config.objective,
        learn_sigma=config.learn_sigma,
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        timestep_sampling=config.timestep_sampling,
        logit_mean=config.logit_mean,
        logit_std=config.logit_std,
        shift=shift,
    )


def load_vae(config: TrainConfig, dtype):
    return load_autoencoder(config.vae, config.vae_subfolder, config.cache_dir, dtype)


def log_auto_precision(precision: str, device: str) -> None:
    if launcher_precision() != "no":
        why = f"{precision}, the accelerate config's"
    elif precision == "bf16":
        why = f"bf16, which the {device} computes natively"
    else:
        why = f"float32: the {device} has no native bf16"
    logger.info("--mixed_precision auto: %s.", why)


def make_accelerator(config: TrainConfig) -> Accelerator:
    precision = requested_precision(config)
    fp8 = precision == "fp8"
    previous = AcceleratorState._shared_state.get("_mixed_precision")
    if previous is not None and previous != precision:
        AcceleratorState._reset_state()  # an earlier run in this process (a notebook, a test) used another precision
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=precision,
        log_with=config.trackers,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
        ),
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        # accelerate converts the model in `prepare`: FP8 only in the blocks' token-wise layers (dit_hf.fp8).
        kwargs_handlers=[fp8_recipe()] if fp8 else None,
    )
    enable_fsdp_on_cpu(accelerator)  # accelerate runs an FSDP config on CPU processes as plain DDP otherwise
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if config.mixed_precision == "auto":
        log_auto_precision(precision, accelerator.device.type)
    if fp8:
        check_fp8_available(accelerator.device)
        if accelerator.device.type == "cpu":
            logger.warning("FP8 on a CPU is emulated and slower than float32: use it to check a run, not to train.")
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("fp16 mixed precision needs a CUDA GPU; use bf16 or no on CPU.")
    # Each process seeds its global RNG differently. The diffusion noise (StepRandomness) and the flips (flip_flags)
    # do not draw from it: both are functions of the seed and the position in training, the same for every process
    # layout and across a resume.
    set_seed(config.seed, device_specific=True)
    set_cpu_threads(config.cpu_threads, accelerator)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def set_cpu_threads(cpu_threads: int | None, accelerator: Accelerator) -> None:
    """Torch's intra-op threads of a CPU process: `cpu_threads`, or by default the cores left to each process.

    `accelerate launch` exports OMP_NUM_THREADS=1 for a CPU process unless told otherwise, which leaves all but one
    core of a laptop idle (a 2-core machine trains the small recipe 1.8x slower). Only that value is raised; a thread
    count set any other way is kept.
    """
    if accelerator.device.type != "cpu":
        return
    if cpu_threads is None:
        if os.environ.get("OMP_NUM_THREADS") != "1":
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        cpu_threads = max(1, cores // max(1, local))
        if cpu_threads == torch.get_num_threads():
            return
        logger.info(
            f"CPU: {cpu_threads} torch threads per process ({cores} cores, {local} process(es) on this machine) "
            "instead of the OMP_NUM_THREADS=1 set by accelerate launch; --cpu_threads N to choose."
        )
    torch.set_num_threads(cpu_threads)


@dataclass
class Data:
    """The training data as loaded, before any transform or cache."""

    ds: object  # datasets.Dataset
    image_column: str
    label_column: str | None
    num_classes: int
    names: list[str] | None
    # The data set before unreadable images are dropped: the latent cache's key, known before any image is decoded.
    source_fingerprint: str = ""
    source_len: int = 0

    @property
    def id2label(self) -> dict | None:
        return dict(enumerate(self.names)) if self.names else None


def load_data(config: TrainConfig, accelerator) -> Data:
    with accelerator.main_process_first():
        ds = load_image_dataset(
            config.dataset_name, config.train_data_dir, config.dataset_config_name, cache_dir=config.cache_dir
        )
        image_column, label_column = resolve_columns(ds, config.image_column, config.label_column)
        ds = select_subset(ds, config.max_train_samples, seed=config.seed)
    source_fingerprint, source_len = getattr(ds, "_fingerprint", ""), len(ds)
    if config.has_data and not cache_covers_dataset(config.cache_latents, source_fingerprint, source_len):
        # Decodes every image once per data set, on the main process (in parallel); the answer is stored.
        num_proc = max(1, min(os.cpu_count() or 1, 16)) if len(ds) > 10_000 else None
        ds, bad = drop_unreadable_images_once(
            accelerator, ds, image_column, config.max_bad_image_fraction, default_store_dir(config.cache_dir), num_proc
        )
        if bad:
            logger.warning("Skipped %d unreadable images, e.g. %s", len(bad), [p for _, p in bad[:5]])
    num_classes = config.num_classes if config.num_classes is not None else (infer_num_classes(ds, label_column) or 0)
    if label_column is None:
        num_classes = 0
    check_labels(ds, label_column, num_classes)
    names = class_names(ds, label_column) if num_classes else None
    return Data(ds, image_column, label_column, num_classes, names, source_fingerprint, source_len)


def check_budget(config, accelerator, flops_per_sample: float, global_batch: int, num_samples: int) -> None:
    """Warn when the run would take more than a day on this device; refuse when auto picked such a recipe on a CPU."""
    steps = config.max_train_steps or (config.num_train_epochs or 1) * max(1, num_samples // global_batch)
    device_flops = measure_matmul_flops(accelerator.device) * accelerator.num_processes
    hours = estimate_hours(flops_per_sample, steps * global_batch, device_flops)
    if hours <= 24:
        return
    message = (
        f"The {config.recipe!r} recipe's {config.model} at {config.resolution} px for {steps} steps of "
        f"{global_batch} would take about {format_duration(hours)} on {accelerator.num_processes} "
        f"{accelerator.device.type.upper()} process(es)"
    )
    if accelerator.device.type == "cpu" and config.recipe_picked:
        raise ValueError(
            f"{message}. Use a GPU, or a smaller setting: e.g. --resolution 64 or less without --vae (the small-data "
            "recipe), --model DiT-S/4, fewer --max_train_steps, or --recipe to choose one explicitly."
        )
    logger.warning("%s; lower --max_train_steps or the model size for a shorter run.", message)


@dataclass(frozen=True)
class Geometry:
    """The model's input: channels (image or latent), side in pixels or latents, and patch size."""

    in_channels: int
    sample_size: int
    patch_size: int


def plan_geometry(config: TrainConfig, vae, accelerator, num_samples: int) -> tuple[Geometry, float]:
    """The model's input shape, checked against the data; (geometry, training FLOPs per sample)."""
    latent_factor, in_channels = 1, config.image_channels
    if config.resolution is None:
        raise ValueError("No image of the data set could be read to take the resolution from: pass --resolution.")
    if vae is not None:
        in_channels, latent_size, _ = latent_shape(vae, config.resolution, config.image_channels)
        latent_factor = max(1, config.resolution // latent_size)
    preset = {**DIT_PRESETS, **RECIPE_PRESETS}[config.model]
    patch_size = config.patch_size or preset["patch_size"]
    check_resolution(config.resolution, patch_size, latent_factor)
    sample_size = config.resolution // latent_factor
    few_tokens = token_warning(sample_size, patch_size)
    if few_tokens:
        logger.warning(few_tokens)
    global_batch = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    flops_per_sample = dit_train_flops_per_sample(
        config.hidden_size or preset["hidden_size"], config.depth or preset["depth"], (sample_size // patch_size) ** 2
    )
    check_budget(config, accelerator, flops_per_sample, global_batch, num_samples)
    return Geometry(in_channels, sample_size, patch_size), flops_per_sample


def build_image_dataset(config: TrainConfig, data: Data) -> torch.utils.data.Dataset:
    """The images as the model sees them (cropped, resized, converted), decoded once into RAM with --cache_images."""
    # Flips are a function of (seed, epoch, index): the same in any worker, process layout, resumed or caching run.
    transform = build_transform(
        config.resolution, config.center_crop, config.random_flip and not config.cache_latents, config.image_channels,
        seed=config.seed,
    )  # fmt: skip
    dataset = ImageLabelDataset(data.ds, data.image_column, data.label_column if data.num_classes else None, transform)
    if config.cache_images:
        dataset = CachedImages(dataset)
        logger.info("Cached %d images in RAM (%.1f MiB)", len(dataset), dataset.pixels.nbytes / 2**20)
    return dataset


def latent_data(config: TrainConfig, accelerator, data: Data, images, vae, channels: int, encoder):
    """(the training data set, its latent space): the images in pixel space (None), the images encoded by the
    autoencoder at every step, or with --cache_latents the latents (and REPA targets) encoded once into the cache;
    either way with the `LatentNorm` of --latent_norm for its `channels`-channel latents."""
    if vae is None:
        return images, None
    if not config.cache_latents:
        return images, LatentSpace.of_vae(vae, make_latent_norm(config.latent_norm, vae, channels))
    features_fn = features_id = None
    if encoder is not None:
        from dit_hf.repa import cache_encoder_features

        # REPA targets are cached with the latents (each image and its flip), on the encoder's own grid.
        features_fn = functools.partial(cache_encoder_features, encoder)
        features_id = f"{config.repa_encoder} at {encoder.input_size}"
    fingerprint = cache_fingerprint(
        config.vae, dict(vae.config), data.source_fingerprint, config.resolution, config.center_crop,
        data.source_len, features=features_id,
    )  # fmt: skip
    if not check_cache(config.cache_latents, fingerprint):
        vae.to(accelerator.device)
        encode_to_cache(
            accelerator, vae, images, config.cache_latents, fingerprint=fingerprint, features_fn=features_fn
        )
    accelerator.wait_for_everyone()
    cached = BatchedCachedLatents(config.cache_latents, random_flip=config.random_flip, seed=config.seed)
    stats = None
    if config.latent_norm == "channel":  # computed once per cache, kept beside it
        stats = cached_channel_statistics(config.cache_latents, cached, accelerator.is_main_process)
    return cached, LatentSpace(make_latent_norm(config.latent_norm, vae, channels, stats))


def build_dataloader(config: TrainConfig, dataset) -> tuple[EpochSampler, torch.utils.data.DataLoader]:
    sampler = EpochSampler(len(dataset), seed=config.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=config.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=config.dataloader_num_workers > 0,
        # Cached latents and images come as whole batches (one gather) rather than item by item.
        collate_fn=getattr(dataset, "collate", None),
    )
    if len(dataloader) == 0:
        raise ValueError(
            f"The data set has {len(dataset)} samples, fewer than one batch of {config.train_batch_size}: "
            "lower --train_batch_size or add data."
        )
    return sampler, dataloader


def repa_encoder_name(config: TrainConfig, num_classes: int) -> str | None:
    """--repa_encoder as this run uses it. `auto` (the small recipe's) means the fitted classifier where it can be
    fitted (pixel space, images cached in RAM, at least two classes), else no REPA; the choice is logged."""
    if config.repa_encoder != "auto":
        return config.repa_encoder
    reasons = []
    if num_classes < 2:
        reasons.append("the data set has no class labels" if num_classes == 0 else "the data set has one class")
    if config.vae:
        reasons.append("training runs on --vae latents")
    if not config.cache_images:
        reasons.append("the images are not cached in RAM (--no-cache_images)")
    if reasons:
        logger.info("--repa_encoder auto: no REPA, because %s.", " and ".join(reasons))
        return None
    logger.info("--repa_encoder auto: REPA towards a CNN fitted on the %d labelled classes (classifier).", num_classes)
    return "classifier"


def build_repa_encoder(config: TrainConfig, accelerator, images=None, num_classes: int = 0):
    name = repa_encoder_name(config, num_classes)
    if not name:
        return None
    if name == "classifier":
        return build_classifier_encoder(config, accelerator, images)
    from dit_hf.repa import REPAEncoder

    dtype = PRECISION_DTYPES.get(accelerator.mixed_precision, torch.float32)
    return REPAEncoder(name, dtype=dtype, cache_dir=config.cache_dir).to(accelerator.device)


MAX_CACHED_FEATURES_BYTES = 2 * 2**30


def build_classifier_encoder(config: TrainConfig, accelerator, images):
    """`--repa_encoder classifier`: the main process fits the CNN on the cached training images once per output folder
    (a resumed run reuses the saved file); without random flips, every image's targets are then cached with it."""
    from dit_hf.evaluation import ImageClassifier
    from dit_hf.repa import CLASSIFIER_FILE, ClassifierEncoder, cache_encoder_features, fit_classifier_encoder

    path = os.path.join(config.output_dir, CLASSIFIER_FILE)
    if accelerator.is_main_process and not os.path.isfile(path):
        start = time.perf_counter()
        classifier, accuracy = fit_classifier_encoder(images.pixels, images.labels, seed=config.seed)
        classifier.save(path)
        checked = "no class has two images to hold one out" if math.isnan(accuracy) else (
            f"{accuracy:.1%} accurate on a held-out tenth of them"
        )  # fmt: skip
        logger.info(
            "REPA encoder: a CNN fitted on the training images in %.0f s, %s; saved as %s",
            time.perf_counter() - start, checked, path,
        )  # fmt: skip
    accelerator.wait_for_everyone()
    encoder = ClassifierEncoder(ImageClassifier.load(path)).to(accelerator.device)
    n, _, height, width = images.pixels.shape
    size = n * encoder.hidden_size * (height // 4) * (width // 4) * 2  # float16
    if not config.random_flip and size <= MAX_CACHED_FEATURES_BYTES:
        chunks = torch.split(torch.arange(n), 256)
        pixels = (images.transform.normalize(images.pixels[chunk]).to(accelerator.device) for chunk in chunks)
        images.attach_features(torch.cat([cache_encoder_features(encoder, batch) for batch in pixels]))
        logger.info("REPA targets of the %d images cached in RAM (%.1f MiB)", n, size / 2**20)
    return encoder


def build_guidance_search(config: TrainConfig, accelerator, encoder, images):
    """--guidance_search: the run's fitted classifier and its feature statistics on the training images (main
    process), or None where the run fitted no classifier (the search is then skipped, and logged)."""
    if not config.guidance_search or not accelerator.is_main_process:
        return None
    from dit_hf.evaluation import ImageClassifier
    from dit_hf.guidance_search import GuidanceSearch
    from dit_hf.repa import CLASSIFIER_FILE, ClassifierEncoder

    if not isinstance(encoder, ClassifierEncoder):
        logger.info(
            "--guidance_search skipped: it scores samples with the classifier of --repa_encoder classifier (or auto "
            "on labelled pixel data), which this run does not fit; the pipeline keeps --guidance_scale %s.",
            config.guidance_scale,
        )
        return None
    classifier = ImageClassifier.load(os.path.join(config.output_dir, CLASSIFIER_FILE))
    return GuidanceSearch.from_images(classifier, images.pixels, seed=config.seed)


def search_default_guidance(pipe, search, config: TrainConfig, num_classes: int) -> dict:
    """Samples the final EMA at each --guidance_search scale, keeps the chosen one as the pipeline's default."""
    from dit_hf.guidance_search import choose_guidance

    start = time.perf_counter()
    pipe.set_progress_bar_config(disable=True)
    trials = search.run(pipe, num_classes, config.guidance_search, config.guidance_search_samples,
                        config.eval_batch_size, seed=config.seed)  # fmt: skip
    chosen = choose_guidance(trials, distance_tolerance=config.guidance_search_tolerance)
    pipe.register_to_config(default_guidance_scale=chosen.scale)
    scores = (f"{t.scale:g}: accuracy {t.accuracy:.1%}, feature distance {t.feature_distance:.2f}" for t in trials)
    logger.info(
        "Guidance search (%d samples per scale, %.0f s): %s; the pipeline's default guidance scale is %s",
        config.guidance_search_samples, time.perf_counter() - start, ", ".join(scores), chosen.scale,
    )  # fmt: skip
    return {"chosen": chosen.scale, "trials": [trial.as_dict() for trial in trials]}


def build_aux_losses(config: TrainConfig, model: DiTModel, encoder) -> list:
    """The auxiliary losses of the run (REPA with --repa_encoder), their modules initialised from the seed."""
    if encoder is None:
        return []
    from dit_hf.repa import REPALoss, REPAProjector

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        projector = REPAProjector(model.config.hidden_size, encoder.hidden_size, config.repa_projector_dim)
    return [REPALoss(encoder, projector, config.repa_depth, config.repa_coeff, model.config.patch_size)]


def build_optimization(config: TrainConfig, accelerator, params: list, batches: int):
    """AdamW and its schedule; (optimizer, lr scheduler, max_train_steps, num_epochs) for `batches` per epoch."""
    optimizer = make_adamw(
        params,
        accelerator.device,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    steps_per_epoch = num_update_steps(batches // accelerator.num_processes, config.gradient_accumulation_steps)
    max_train_steps = config.max_train_steps or (config.num_train_epochs or 1) * steps_per_epoch
    # accelerate steps a prepared scheduler once per process: count in process-steps.
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    return optimizer, lr_scheduler, max_train_steps, math.ceil(max_train_steps / steps_per_epoch)


def run_record(config: TrainConfig, accelerator, max_train_steps: int) -> dict:
    """The resolved config with what was decided at run time (the precision accelerate chose, the number of steps):
    what trackers, checkpoints and the model card record."""
    return {**config.to_dict(), "mixed_precision": accelerator.mixed_precision, "max_train_steps": max_train_steps}


def export(trainer: Trainer, sampling: Sampling, data: Data, hooks: dict, start_time: float, search=None) -> dict:
    """On the main process: one pipeline with the first EMA rate (the other rates as extra transformer folders) and,
    with `search`, the guidance scale it chose as its default; the final sample grid, the digits accuracy,
    summary.json and the Hub push."""
    config, accelerator, step = trainer.config, trainer.accelerator, trainer.state.global_step
    summary = {"steps": step, "output_dir": config.output_dir}
    if not accelerator.is_main_process:
        return summary
    pipe = sampling.pipeline(trainer.ema_model(0))
    if search is not None and data.num_classes:
        summary["guidance_search"] = search_default_guidance(pipe.to(accelerator.device), search, config,
                                                             data.num_classes)  # fmt: skip
    with reporting_write_failures(config.output_dir, "the final pipeline"):  # checkpoints stay intact
        pipe.save_pretrained(config.output_dir)
        for i, decay in enumerate(trainer.ema.decays[1:], start=1):
            trainer.ema_model(i).save_pretrained(os.path.join(config.output_dir, export_folder_name(decay)))
    all_classes = list(range(data.num_classes)) if data.num_classes else None
    images, labels, grid = sample_grid(
        pipe, all_classes, config.num_samples_per_class, config, accelerator.device, pipe.config.default_guidance_scale
    )
    grid_path = os.path.join(config.output_dir, "samples.png")
    grid.save(grid_path)
    log_image(accelerator, grid, step, name="final_samples")
    metrics = {}
    if not config.has_data and labels is not None:
        from dit_hf.evaluation import digits_accuracy

        metrics["digits_accuracy"] = digits_accuracy(images, labels)
        accelerator.log({"digits_accuracy": metrics["digits_accuracy"]}, step=step)
    summary.update(metrics)
    if hooks["eval"].last is not None:
        summary["eval"] = hooks["eval"].last
    summary.update(time_s=round(time.time() - start_time, 1), samples=grid_path)
    with open(os.path.join(config.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if config.push_to_hub:
        from dit_hf.hub import safe_push, write_model_card

        write_model_card(config.output_dir, config.hub_model_id, trainer.record, config.data_name, data.num_classes,
                         data.names, "samples.png", metrics)  # fmt: skip
        summary["pushed"] = safe_push(config.output_dir, config.hub_model_id, private=config.hub_private_repo)
    accuracy = f", digit accuracy {metrics['digits_accuracy']:.1%}" if "digits_accuracy" in metrics else ""
    print(
        f"Done: {step} steps in {summary['time_s']:.0f} s{accuracy}. Pipeline: {config.output_dir}, samples: "
        f"{grid_path}, metrics: {os.path.join(config.output_dir, 'metrics.jsonl')}, checkpoints: "
        f"{trainer.checkpoints_dir}"
    )
    return summary


def make_hooks(config: TrainConfig, sampling: Sampling, num_classes: int, flops_per_sample: float) -> dict:
    """The periodic work, in the order it runs after each optimizer step (the guard acts after the step's log and
    checkpoint, and before grids and evaluations)."""
    guard = GuardHook(config)
    log = LogHook(flops_per_sample)
    evaluation = EvalHook(sampling, num_classes)
    classes = config.validation_classes or (list(range(min(num_classes, 10))) if num_classes else None)
    return {"log": log, "checkpoint": CheckpointHook(guard), "guard": guard, "grid": SampleGridHook(sampling, classes),
            "eval": evaluation, "plots": PlotHook(log, evaluation)}  # fmt: skip


def main(config: TrainConfig) -> dict:
    # The run owns --output_dir (lock file; an earlier run's outputs cleared with --overwrite_output_dir) while it
    # trains, also when it fails; nothing is written into the folder before.
    with own_output_dir(config.output_dir, config.resume_from_checkpoint, config.overwrite_output_dir):
        return train(config)


def train(config: TrainConfig) -> dict:
    start_time = time.time()
    accelerator = make_accelerator(config)
    if accelerator.is_main_process:
        config.save(config.output_dir)  # `--config OUTPUT_DIR/config.yaml` repeats the run

    # ---- data and the model's input ----------------------------------------------------------------------------
    data = load_data(config, accelerator)
    vae = load_vae(config, torch.float32) if config.vae else None
    geometry, flops_per_sample = plan_geometry(config, vae, accelerator, len(data.ds))
    images = build_image_dataset(config, data)
    encoder = build_repa_encoder(config, accelerator, images, data.num_classes)
    search = build_guidance_search(config, accelerator, encoder, images)
    dataset, latents = latent_data(config, accelerator, data, images, vae, geometry.in_channels, encoder)
    sampler, dataloader = build_dataloader(config, dataset)

    # ---- model, objective, auxiliary losses, optimisation ------------------------------------------------------
    # Initial weights depend on --seed alone, not on what consumed the global RNG before (e.g. latent caching).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config, data.num_classes, geometry.in_channels, geometry.sample_size)
        with accelerator.main_process_first():  # --init_from: one download of Hub weights; a resumed run skips it
            init_model_from_config(model, config, data.names)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    sample_shape = (geometry.in_channels, geometry.sample_size, geometry.sample_size)
    objective = build_objective(config, sample_shape)
    aux_losses = build_aux_losses(config, model, encoder)
    # Checkpointed by save_ema / load_ema (safetensors + JSON), not through accelerate, which would pickle it.
    ema = EMAModels(model, parse_ema_decays(config.ema_decay), warmup=bool(config.ema_warmup))
    params = [*model.parameters(), *(p for aux in aux_losses for m in aux.modules.values() for p in m.parameters())]
    optimizer, lr_scheduler, max_train_steps, num_epochs = build_optimization(
        config, accelerator, params, len(dataloader)
    )
    if config.compile:
        model.compile_repeated_blocks(fullgraph=True)
    full_model = unsharded_copy(accelerator, model)  # under FSDP: a whole model to checkpoint and export from
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    ema.to(accelerator.device)
    if vae is not None:
        vae.to(accelerator.device)

    # ---- train -------------------------------------------------------------------------------------------------
    sampling = Sampling(objective, vae, data.id2label, config, latents.norm if latents is not None else None)
    hooks = make_hooks(config, sampling, data.num_classes, flops_per_sample)
    randomness = StepRandomness(
        config.seed, config.num_train_timesteps, config.train_batch_size * accelerator.num_processes
        * config.gradient_accumulation_steps, sample_shape, accelerator.device,
        label_dropout=config.class_dropout_prob if data.num_classes else 0.0, posterior_noise=latents is not None,
        sample_timesteps=objective.sample_timesteps,
    )  # fmt: skip
    trainer = Trainer(
        config, accelerator, model, objective, optimizer, lr_scheduler, dataloader, sampler, randomness, ema,
        max_train_steps, num_epochs, data.num_classes, latents=latents, aux_losses=aux_losses,
        hooks=list(hooks.values()), record=run_record(config, accelerator, max_train_steps), full_model=full_model,
    )  # fmt: skip
    trainer.resume()
    if config.resume_from_checkpoint and accelerator.is_main_process:  # rows logged after that checkpoint come again
        trim_metrics(os.path.join(config.output_dir, "metrics.jsonl"), trainer.state.global_step)
    setup_trackers(trainer.record, accelerator)
    if requested_precision(config) == "fp8":
        logger.info("FP8 matmuls in %d of the model's %d linear layers", *count_fp8_linears(trainer.unwrapped))
    logger.info(
        "%d samples, %d classes, model %s (%.2fM parameters), %d steps of %d samples (%d processes)",
        len(dataset), data.num_classes, config.model, sum(p.numel() for p in trainer.unwrapped.parameters()) / 1e6,
        max_train_steps, randomness.global_batch, accelerator.num_processes,
    )  # fmt: skip
    with hooks["guard"].signals_handled():  # from here on a stop signal ends the current step with a checkpoint
        state = trainer.train()
    hooks["guard"].finish(trainer)  # raises NonFiniteStop (weights not finite) or Preempted (a stop signal)
    if state.global_step < max_train_steps:  # a hook stopped the run (e.g. preemption) after its checkpoint
        summary = {"steps": state.global_step, "output_dir": config.output_dir, "stopped": True}
    else:
        summary = export(trainer, sampling, data, hooks, start_time, search)
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    try:
        summary = main(parse_args())
    except (ValueError, FileNotFoundError) as err:
        print(f"train_dit.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except WriteFailedError as err:
        print(f"train_dit.py: error: {err.strerror}", file=sys.stderr)
        sys.exit(1)
    except NonFiniteStop as err:
        print(f"train_dit.py: error: {err}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    except Preempted as err:
        print(f"train_dit.py: {err}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    if summary.get("pushed") is False:
        sys.exit(1)
