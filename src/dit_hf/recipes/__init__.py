# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Training recipes: the settings a run takes for what the user did not set, picked by data and device.

- `digits`: the embedded default (no data set given): a narrow DiT-S/2 on the 8×8 digits.
- `small`: a data set of small images (64 px or less) in pixel space, as most users first bring (characters,
  icons, handwriting, 28-32 px photos). Chosen by measurement on the offline glyphs data set (bench/NOTES.md,
  "small real data"): flow matching with x_0 prediction and logit-normal noise levels, a narrow DiT sized for a
  CPU with LightningDiT's block, EMA with warm-up, guidance at mid noise levels only, and for labelled data REPA
  towards a small CNN fitted on the training images first.
- `paper`: the DiT paper's ImageNet recipe (DiT-XL/2 on VAE latents at 256 px, lr 1e-4, EMA 0.9999, flips).

`--recipe auto` (the default) picks `digits` without data, `paper` with `--vae`, and `small` for pixel-space data
whose resolution (given, or that of the first image) is at most 64 px. Pixel-space data above 64 px has no recipe: the
trainer stops and names the two ways on (`--vae` or a lower `--resolution`).

Each recipe is a YAML file of this folder, as are the other starting points (`smoke`, `fast-dit`, `lightningdit`,
`repa`, `rae-dit-dh`); see [`dit_hf.config`] for how a file, the recipe beneath it and the command line combine.
"""

import importlib.resources
import math
import os

import yaml

RECIPES = ("auto", "digits", "small", "paper")
SMALL_MAX_RESOLUTION = 64
MIN_TOKENS = 16  # fewer patches than this leave attention almost nothing to relate (8×8 digits / patch 2 = 16)


def recipe_names() -> list[str]:
    """The recipe files that ship with dit_hf (this folder), by name."""
    folder = importlib.resources.files(__name__)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


NAMED_RECIPES = tuple(recipe_names())


def read_recipe_file(name_or_path: str) -> tuple[str, dict]:
    """(where it was found, its settings) for `--config`: a YAML file's path, or the name of a shipped recipe
    (`paper`, `paper.yaml` or `recipes/paper.yaml` alike, so the repository's paths work from any folder)."""
    if os.path.isfile(name_or_path):
        path = name_or_path
        with open(path) as f:
            text = f.read()
    else:
        name = os.path.basename(name_or_path)
        name = name[: -len(".yaml")] if name.endswith(".yaml") else name
        if name not in NAMED_RECIPES:
            raise FileNotFoundError(
                f"--config {name_or_path!r}: no such file, nor a recipe of dit-hf ({', '.join(NAMED_RECIPES)}). "
                "Pass a YAML file's path or one of these names."
            )
        resource = importlib.resources.files(__name__) / f"{name}.yaml"
        path, text = f"recipes/{name}.yaml", resource.read_text()
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file holds `setting: value` lines, got {type(values).__name__}.")
    return path, values


def load_recipe(name: str) -> dict:
    """The settings of a base recipe (digits, small or paper) that `--recipe` (or `auto`) layers beneath the rest."""
    if name not in RECIPES or name == "auto":
        raise ValueError(f"--recipe {name!r} is not one of {list(RECIPES[1:])}.")
    return read_recipe_file(name)[1]


def small_patch_size(resolution: int) -> int:
    """The largest patch that divides `resolution` and leaves at least 7×7 tokens (28 px -> 4, 32 -> 4, 64 -> 8)."""
    best = 1
    for patch in range(1, resolution + 1):
        if resolution % patch == 0 and (resolution // patch) ** 2 >= 49:
            best = patch
    return best


def small_train_steps(channels: int) -> int:
    """The small recipe's length: 4,000 steps for grayscale images, 6,000 for colour ones. Measured on the glyphs
    only: grayscale class accuracy is at 96-99% by step 2,000 in every benchmark since the fourth round, while colour
    still gained 11 points from 2,000 to 4,000 steps in the sixth (71.7% -> 82.7%) and reached 97.0% at 6,000 in the
    seventh, in 26 of its 30 minutes on two CPU cores (bench/NOTES.md)."""
    return 4000 if channels == 1 else 6000


def choose_recipe(requested: str, has_data: bool, has_vae: bool, resolution: int | None, native: int | None) -> str:
    """`--recipe auto` -> a named recipe (see the module docstring); a named recipe is returned as it is."""
    if requested not in RECIPES:
        raise ValueError(f"--recipe {requested!r} is not one of {list(RECIPES)}.")
    if requested != "auto":
        return requested
    if not has_data:
        return "digits"
    if has_vae:
        return "paper"
    size = resolution or native
    if size is None or size <= SMALL_MAX_RESOLUTION:
        return "small"  # no readable image to size: loading the data reports why
    raise ValueError(
        f"No recipe trains {size} px images in pixel space: pass --vae (e.g. stabilityai/sd-vae-ft-ema) for the DiT "
        f"paper's latent recipe, or --resolution {SMALL_MAX_RESOLUTION} or less for the small-data recipe (or "
        "--recipe paper / small to insist)."
    )


def token_warning(sample_size: int, patch_size: int) -> str | None:
    """A warning when the patches leave fewer than `MIN_TOKENS` tokens, naming the patch size that would do."""
    tokens = (sample_size // patch_size) ** 2
    if tokens >= MIN_TOKENS:
        return None
    ok = [p for p in range(1, patch_size) if sample_size % p == 0 and (sample_size // p) ** 2 >= MIN_TOKENS]
    return (
        f"--patch_size {patch_size} cuts {sample_size}×{sample_size} inputs into only {tokens} tokens: too few for "
        f"attention to model the image (at least {MIN_TOKENS}); use --patch_size {ok[-1] if ok else 1}."
    )


def estimate_hours(flops_per_sample: float, samples: int, device_flops: float, utilisation: float = 0.3) -> float:
    """Training time at `utilisation` of the device's measured matmul rate (a CPU reaches about a third)."""
    return flops_per_sample * samples / (device_flops * utilisation) / 3600


def measure_matmul_flops(device, size: int = 512, repeats: int = 5) -> float:
    """FLOP/s of a float32 square matmul on `device`: the yardstick of `estimate_hours` (a fraction of a second)."""
    import time

    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up
    if a.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if a.device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / max(time.perf_counter() - start, 1e-9)


def format_duration(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:.0f} days"
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{math.ceil(hours * 60)} min"
