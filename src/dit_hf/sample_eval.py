# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Sample many images for FID-style evaluation, as in the ADM / DiT protocol: `sample_for_eval`.

One PNG per sample under `OUT/images/`, then one `samples_{N}x{H}x{W}x3.npz` that the ADM evaluation suite
(guided-diffusion `evaluations/evaluator.py`) reads, and `sample_eval.json` with the settings. Launch commands:

    dit-hf sample-eval outputs/dit --num_samples 50000 --guidance_scale 1.5 --out eval/dit-cfg1.5
    accelerate launch -m dit_hf.cli sample-eval outputs/dit --num_samples 50000 --batch_size 64 --out eval/dit
    torchrun --nproc_per_node 8 -m dit_hf.cli sample-eval outputs/dit --num_samples 50000 --out eval/dit

Sample i starts from its own generator seeded from (seed, i) and has a label fixed by (seed, i), so the set of
images does not depend on the number of processes or the batch size, and an interrupted run can be resumed by
running the same command again.
"""

import hashlib
import json
import os
import shutil
import zipfile

import numpy as np
import PIL.Image
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from huggingface_hub import snapshot_download
from tqdm.auto import tqdm

from .autoencoders import image_channels, spatial_factor
from .ema import export_folder_name
from .pipeline_dit import DiTPipeline, check_guidance_interval, check_guidance_scale
from .precision import precision_dtypes

# The pipeline's config entries besides its components: an in-memory pipeline is copied with all of them.
PIPELINE_SETTINGS = (
    "id2label",
    "objective",
    "default_num_inference_steps",
    "default_guidance_scale",
    "default_guidance_interval",
    "latents_mean",
    "latents_std",
)

DEFAULT_WEIGHTS = "transformer"
EMA_PREFIX = export_folder_name("")  # transformer_ema_<rate>
LABEL_MODES = ("balanced", "uniform")
PRECISIONS = precision_dtypes()
SETTINGS_FILE = "sample_eval.json"
# Recorded in the settings file but not compared on resume: the same weights may be reached by another path.
UNCOMPARED = ("pipeline", "weights")
# Separate random streams derived from the user's seed: per-image noise, and the uniform labels.
IMAGE_STREAM, LABEL_STREAM = 0, 1


def derive_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed mixed from (seed, *keys) with numpy's SeedSequence, so nearby seeds give unrelated streams."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0])


def image_seed(seed: int, index: int) -> int:
    """The seed of sample `index`'s generator: it depends on nothing but (seed, index)."""
    return derive_seed(seed, IMAGE_STREAM, index)


def assign_labels(num_samples: int, num_classes: int, mode: str | None, seed: int) -> list[int] | None:
    """Class of every sample: `balanced` gives sample i the class i % num_classes (num_samples must be a multiple of
    num_classes, so every class has the same count); `uniform` draws them from a generator seeded by `seed` alone,
    so every process computes the same list; `None` (unconditional model) gives no labels."""
    if mode is None:
        return None
    if mode == "balanced":
        if num_samples % num_classes:
            lower = num_samples // num_classes * num_classes
            nearest = " or ".join(str(n) for n in (lower, lower + num_classes) if n)
            raise ValueError(
                f"--labels balanced needs num_samples to be a multiple of the {num_classes} classes, got "
                f"{num_samples}: use {nearest}, or --labels uniform."
            )
        return [i % num_classes for i in range(num_samples)]
    if mode == "uniform":
        generator = torch.Generator().manual_seed(derive_seed(seed, LABEL_STREAM))
        return torch.randint(num_classes, (num_samples,), generator=generator).tolist()
    raise ValueError(f"`labels` must be one of {LABEL_MODES} or None, got {mode!r}.")


def shard(indices: list[int], num_processes: int, process_index: int) -> list[int]:
    """Process `process_index`'s share of `indices`: every `num_processes`-th one, so shares differ by at most one."""
    return indices[process_index::num_processes]


def batches(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def resolve_weights(folder: str, weights: str) -> str:
    """The subfolder of `folder` that holds the chosen transformer weights.

    `"ema"` means the single `transformer_ema_<rate>/` folder; any other value is a subfolder name, e.g.
    `"transformer"` (the pipeline's own weights) or `"transformer_ema_0.9999"`.
    """
    names = sorted(os.listdir(folder))
    ema = [n for n in names if n.startswith(EMA_PREFIX) and os.path.isdir(os.path.join(folder, n))]
    if weights == "ema":
        if len(ema) == 1:
            return ema[0]
        if not ema:
            raise ValueError(
                f"--weights ema: {folder} has no {EMA_PREFIX}<rate>/ folder. The dit-hf trainer saves its first EMA "
                f"rate as the pipeline's own transformer/: use --weights {DEFAULT_WEIGHTS}."
            )
        raise ValueError(f"--weights ema is ambiguous: {folder} has {ema}; pass one of them as --weights.")
    if not os.path.isfile(os.path.join(folder, weights, "config.json")):
        found = [n for n in names if n.startswith("transformer") and os.path.isdir(os.path.join(folder, n))]
        raise FileNotFoundError(
            f"--weights {weights!r}: {folder} has no {weights}/ model folder. Weights found there: {found or 'none'}."
        )
    return weights


def load_pipeline(path: str | os.PathLike, weights: str, dtype: torch.dtype) -> tuple[DiTPipeline, str]:
    """Load a saved pipeline (local folder or Hub repo id) with the transformer taken from subfolder `weights`."""
    folder = str(path)
    if not os.path.isdir(folder):
        try:
            folder = snapshot_download(folder)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"Pipeline {folder!r} is neither a local folder nor a Hub repo that can be downloaded ({err}). "
                "Pass the folder written by DiTPipeline.save_pretrained (the trainer's --output_dir)."
            ) from err
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(
            f"{folder} has no model_index.json, so it is not a saved pipeline. Pass the trainer's --output_dir "
            "(checkpoints/checkpoint-N folders hold weights only)."
        )
    subfolder = resolve_weights(folder, weights)
    pipe = DiTPipeline.from_pretrained(folder, torch_dtype=dtype)
    if subfolder != DEFAULT_WEIGHTS:
        pipe.transformer = type(pipe.transformer).from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype)
    return pipe, subfolder


def fingerprint(*modules: torch.nn.Module | None) -> str:
    """SHA-256 of the modules' parameters and buffers: tells whether a folder's samples come from the same weights."""
    digest = hashlib.sha256()
    for module in modules:
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def image_size(pipe: DiTPipeline) -> tuple[int, int]:
    """(height, width) of the decoded images: the latent size times the autoencoder's spatial factor."""
    size = pipe.transformer.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    factor = spatial_factor(pipe.vae) if pipe.vae is not None else 1
    return height * factor, width * factor


def check_settings(out_dir: str, settings: dict):
    """Refuse an output folder that holds samples made with other settings (or of unknown origin)."""
    path = os.path.join(out_dir, SETTINGS_FILE)
    if not os.path.exists(path):
        images_dir = os.path.join(out_dir, "images")
        if os.path.isdir(images_dir) and any(n.endswith(".png") for n in os.listdir(images_dir)):
            raise ValueError(
                f"{images_dir} holds PNGs but {out_dir} has no {SETTINGS_FILE}, so their settings are unknown: "
                "choose a new --out, or pass --overwrite to delete them."
            )
        return
    with open(path) as f:
        saved = json.load(f)
    # A JSON round trip turns tuples into lists, as in the saved file.
    current = json.loads(json.dumps(settings))
    differing = [
        f"{key}: {saved.get(key)!r} in the folder, {current.get(key)!r} now"
        for key in sorted(set(saved) | set(current))
        if key not in UNCOMPARED and saved.get(key) != current.get(key)
    ]
    if differing:
        raise ValueError(
            f"{out_dir} holds samples made with other settings ({'; '.join(differing)}): choose a new --out, or "
            "pass --overwrite to delete them."
        )


def prepare_out_dir(out_dir: str, settings: dict, overwrite: bool):
    """Create `out_dir/images` (emptied with `overwrite`), drop temporary files of a killed run, write the settings."""
    images_dir = os.path.join(out_dir, "images")
    if overwrite:
        shutil.rmtree(images_dir, ignore_errors=True)
        for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
            if name.startswith("samples_") and name.endswith(".npz"):
                os.remove(os.path.join(out_dir, name))
    os.makedirs(images_dir, exist_ok=True)
    for name in os.listdir(images_dir):
        if name.endswith(".tmp"):
            os.remove(os.path.join(images_dir, name))
    with open(os.path.join(out_dir, SETTINGS_FILE), "w") as f:
        json.dump(settings, f, indent=2)
        f.write("\n")


def is_valid_png(path: str, size: tuple[int, int]) -> bool:
    """Whether `path` is a complete PNG of (height, width) `size`: verify() checks every chunk's CRC."""
    try:
        with PIL.Image.open(path) as img:
            if img.format != "PNG" or img.size != (size[1], size[0]):
                return False
            img.verify()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def save_png(image: PIL.Image.Image, path: str):
    """Write to a temporary name, then rename: an interrupted run never leaves a truncated PNG under `path`."""
    tmp = f"{path}.{os.getpid()}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_npz(path: str, image_paths: list[str], labels: list[int] | None, size: tuple[int, int]):
    """Write the ADM evaluator's `.npz`: `arr_0` uint8 (N, H, W, 3), `arr_1` int64 labels when given.

    Grayscale images are repeated into 3 channels, since the evaluator feeds RGB to Inception. The array is streamed
    into the (uncompressed, like `np.savez`) zip one image at a time: 50,000 samples at 512x512 would be 39 GB.
    """
    height, width = size
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
    tmp = f"{path}.tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, {**header, "shape": (len(image_paths), height, width, 3)})
            for image_path in image_paths:
                with PIL.Image.open(image_path) as img:
                    array = np.asarray(img.convert("RGB"))
                if array.shape != (height, width, 3):
                    raise ValueError(f"{image_path} is {array.shape}, expected {(height, width, 3)}: use --overwrite.")
                f.write(array.tobytes())
        if labels is not None:
            with archive.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
    os.replace(tmp, path)


def sample_for_eval(
    pipeline: DiTPipeline | str | os.PathLike,
    out_dir: str | os.PathLike,
    num_samples: int,
    *,
    weights: str = DEFAULT_WEIGHTS,
    labels: str | None = None,
    batch_size: int = 32,
    scheduler: str | None = None,
    num_inference_steps: int = 250,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    seed: int = 0,
    precision: str = "fp32",
    device: str | torch.device | None = None,
    overwrite: bool = False,
) -> str:
    r"""
    Sample `num_samples` images into `out_dir` and pack them into the ADM evaluator's `.npz`; returns its path.

    Run it in every process of an `accelerate launch` / `torchrun` job: the samples are split over the processes.
    Rerunning with the same settings keeps the valid PNGs already in `out_dir/images` and makes only the others.

    Args:
        pipeline (`DiTPipeline`, `str` or `os.PathLike`): A pipeline, or the folder / Hub repo id it was saved to. A
            passed pipeline is moved to `device` and cast to `precision` in place.
        out_dir (`str` or `os.PathLike`): Output folder: `images/{i:06d}.png`, `samples_{N}x{H}x{W}x3.npz`,
            `sample_eval.json`.
        num_samples (`int`): Number of images, e.g. 50,000 for FID-50K.
        weights (`str`, defaults to `"transformer"`): Transformer subfolder of a saved pipeline: `"transformer"` (the
            pipeline's own; in a dit-hf trainer export that is the first EMA rate), `"ema"` (the single
            `transformer_ema_<rate>/` folder) or a subfolder name such as `"transformer_ema_0.9999"`.
        labels (`str`, *optional*): `"uniform"` (random classes, as in the DiT and ADM evaluations) or `"balanced"`
            (sample i gets class i % num_classes). `None`: uniform for a class-conditional model, none for an
            unconditional one.
        batch_size (`int`, defaults to 32): Images per forward pass in each process.
        scheduler (`str`, *optional*): `"ddpm"`, `"ddim"` or `"dpm"`, built from the saved scheduler's config.
            `None` keeps the saved scheduler.
        num_inference_steps (`int`, defaults to 250): Denoising steps (DiT reports FID with 250 DDPM steps).
        guidance_scale (`float`, defaults to 1.0): Classifier-free guidance scale; 1.0 samples without guidance.
        guidance_interval (`tuple[float, float]`, *optional*): Guide only at noise levels t / num_train_timesteps in
            `[low, high]`. `None` guides every step.
        seed (`int`, defaults to 0): Seeds the labels and, with the sample index, each image's generator.
        precision (`str`, defaults to `"fp32"`): `"fp32"`, `"bf16"` or `"fp16"` weights and activations.
        device (`str` or `torch.device`, *optional*): Defaults to this process's accelerator device.
        overwrite (`bool`, defaults to `False`): Delete the samples already in `out_dir` instead of resuming.

    Returns:
        `str`: the path of the `.npz`.
    """
    _check_arguments(num_samples, batch_size, num_inference_steps, seed, precision, guidance_scale, guidance_interval)
    if labels is not None and labels not in LABEL_MODES:
        raise ValueError(f"`labels` must be one of {LABEL_MODES} or None, got {labels!r}.")
    state = _launch_state(device)
    pipe, source, weights = _open_pipeline(pipeline, weights, PRECISIONS[precision])
    if scheduler is not None:
        pipe.scheduler = pipe.matching_scheduler(scheduler)
    labels, class_labels = _eval_labels(pipe, labels, num_samples, seed, guidance_scale, guidance_interval)
    height, width = _eval_image_size(pipe)

    settings = {
        **_pipeline_record(pipe, source, weights),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "guidance_interval": list(guidance_interval) if guidance_interval is not None else None,
        "seed": seed,
        "labels": labels,
        "num_samples": num_samples,
        "resolution": [height, width],
        "precision": precision,
    }
    out_dir = str(out_dir)
    images_dir = os.path.join(out_dir, "images")
    npz_path = os.path.join(out_dir, f"samples_{num_samples}x{height}x{width}x3.npz")
    _open_out_dir(state, out_dir, settings, overwrite)

    def png(index: int) -> str:
        return os.path.join(images_dir, f"{index:06d}.png")

    todo = _missing_share(state, num_samples, png, (height, width))
    pipe.to(device or state.device)
    # The settings are the call's own, not the pipeline's saved defaults: None guides every step, as recorded.
    interval = guidance_interval if guidance_interval is not None else (0.0, 1.0)
    call = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, guidance_interval=interval)
    _render(pipe, todo, class_labels, png, batch_size, seed, call, state.is_main_process)
    state.wait_for_everyone()

    if state.is_main_process:
        write_npz(npz_path, [png(i) for i in range(num_samples)], class_labels, (height, width))
    state.wait_for_everyone()
    return npz_path


def _pipeline_record(pipe: DiTPipeline, source: str, weights: str) -> dict:
    """What `sample_eval.json` records of the pipeline: where it came from, its weights' hash and its scheduler."""
    return {
        "pipeline": source,
        "weights": weights,
        "weights_sha256": fingerprint(pipe.transformer, pipe.vae),
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
    }


def _open_out_dir(state: PartialState, out_dir: str, settings: dict, overwrite: bool) -> None:
    """Checks the settings of the samples already in `out_dir` against these (in every process, so all of them stop
    on a mismatch), then the main process writes the record, emptying the folder first with `overwrite`."""
    if not overwrite:
        check_settings(out_dir, settings)
    state.wait_for_everyone()
    if state.is_main_process:
        prepare_out_dir(out_dir, settings, overwrite)
    state.wait_for_everyone()


def _launch_state(device) -> PartialState:
    """This process's accelerate state, checked against the launcher: each process must sample its own share."""
    # Like `Accelerator`, run on CPU processes (gloo) when asked to, e.g. by `accelerate launch --cpu`.
    state = PartialState(cpu=str(device) == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if launched != state.num_processes:
        raise ValueError(
            f"Launched as {launched} processes, but accelerate sees {state.num_processes}, so each would sample "
            "everything: without a GPU, set ACCELERATE_USE_CPU=1 (or pass --device cpu)."
        )
    return state


def _eval_labels(pipe, labels, num_samples, seed, guidance_scale, guidance_interval):
    """(the label mode recorded, the class of each sample or None) for this pipeline; unconditional models refuse
    labels and guidance."""
    if pipe.num_classes > 0:
        labels = labels or "uniform"
        return labels, assign_labels(num_samples, pipe.num_classes, labels, seed)
    if labels is not None:
        raise ValueError(f"--labels {labels}: this model is unconditional and takes no labels; drop --labels.")
    if guidance_scale != 1.0 or guidance_interval is not None:
        raise ValueError("This model is unconditional: guidance needs a class-conditional model; drop the guidance.")
    return None, None


def _eval_image_size(pipe) -> tuple[int, int]:
    """(height, width) of the pipeline's images, which must be grayscale or RGB for the ADM evaluator."""
    channels = image_channels(pipe.vae) if pipe.vae is not None else pipe.transformer.config.in_channels
    if channels not in (1, 3):
        raise ValueError(f"The ADM evaluator takes RGB images, but this pipeline makes {channels}-channel images.")
    return image_size(pipe)


def _missing_share(state: PartialState, num_samples: int, png, size: tuple[int, int]) -> list[int]:
    """The indices without a valid PNG yet that this process makes. Each process checks a share of the existing
    files; all then split the missing ones the same way."""
    checked = shard(list(range(num_samples)), state.num_processes, state.process_index)
    missing = sorted(gather_object([i for i in checked if not is_valid_png(png(i), size)]))
    return shard(missing, state.num_processes, state.process_index)


def _check_arguments(num_samples, batch_size, num_inference_steps, seed, precision, guidance_scale, guidance_interval):
    """[`sample_for_eval`]'s numeric arguments, refused before any work."""
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1, got {num_samples}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    if num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
    if seed < 0:
        raise ValueError(f"`seed` must be >= 0, got {seed}.")
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {sorted(PRECISIONS)}, got {precision!r}.")
    check_guidance_scale(guidance_scale)  # before any image is made
    check_guidance_interval(guidance_interval)


def _open_pipeline(pipeline, weights: str, dtype: torch.dtype) -> tuple[DiTPipeline, str, str]:
    """(pipeline in `dtype`, its source for the settings record, the transformer subfolder used)."""
    if isinstance(pipeline, DiTPipeline):
        if weights != DEFAULT_WEIGHTS:
            raise ValueError("`weights` chooses a subfolder of a saved pipeline: pass its path, not a pipeline.")
        source = f"<in-memory {type(pipeline).__name__}>"
        # A new pipeline object, so swapping the scheduler leaves the caller's pipeline alone.
        pipe = DiTPipeline(
            pipeline.transformer,
            pipeline.scheduler,
            pipeline.vae,
            **{key: pipeline.config[key] for key in PIPELINE_SETTINGS if key in pipeline.config},
        )
        if any(m is not None and m.dtype != dtype for m in (pipe.transformer, pipe.vae)):
            pipe.to(dtype=dtype)
    else:
        source = str(pipeline) if not os.path.isdir(pipeline) else os.path.abspath(pipeline)
        pipe, weights = load_pipeline(pipeline, weights, dtype)
    return pipe, source, weights


def _render(pipe, todo: list[int], class_labels, png, batch_size: int, seed: int, call: dict, show: bool) -> None:
    """Make and save the images `todo` (indices), each from its own seeded generator: the same image whichever
    process or batch makes it."""
    pipe.set_progress_bar_config(disable=True)
    # The main process shows its own share; the others have the same amount of work, give or take one batch.
    progress = tqdm(total=len(todo), unit="img", desc="sample-eval", disable=not show)
    for batch in batches(todo, batch_size):
        images = pipe(
            class_labels=[class_labels[i] for i in batch] if class_labels is not None else None,
            num_images=None if class_labels is not None else len(batch),
            generator=[torch.Generator().manual_seed(image_seed(seed, i)) for i in batch],
            **call,
        ).images
        for index, image in zip(batch, images):
            save_png(image, png(index))
        progress.update(len(batch))
    progress.close()
