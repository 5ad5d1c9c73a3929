# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Training recipes: the settings a run takes for what the user did not set, picked by data and device.

- `digits`: the embedded default (no data set given): a narrow DiT-S/2 on the 8×8 digits.
- `small`: a data set of small images (64 px or less) in pixel space, as most users first bring (characters,
  icons, handwriting, 28-32 px photos). Chosen by measurement on the offline glyphs data set (bench/NOTES.md,
  "small real data"): rectified flow with logit-normal noise levels, a narrow DiT sized for a CPU, EMA with warm-up.
- `paper`: the DiT paper's ImageNet recipe (DiT-XL/2 on VAE latents at 256 px, lr 1e-4, EMA 0.9999, flips).

`--recipe auto` (the default) picks `digits` without data, `paper` with `--vae`, and `small` for pixel-space data
whose resolution (given, or that of the first image) is at most 64 px. Pixel-space data above 64 px has no recipe: the
trainer stops and names the two ways on (`--vae` or a lower `--resolution`).
"""

import math

RECIPES = ("auto", "digits", "small", "paper")
SMALL_MAX_RESOLUTION = 64
MIN_TOKENS = 16  # fewer patches than this leave attention almost nothing to relate (8×8 digits / patch 2 = 16)

DIGITS = dict(
    resolution=8,
    image_channels=1,
    random_flip=False,
    cache_images=True,
    model="DiT-S/2",
    hidden_size=128,
    depth=4,
    num_heads=4,
    train_batch_size=64,
    learning_rate=1e-3,
    lr_scheduler="constant",
    lr_warmup_steps=100,
    max_train_steps=3000,
    ema_decay="0.999",
    ema_warmup=False,
    checkpointing_steps=1000,
    validation_steps=1000,
    output_dir="outputs/dit-digits",
    objective="ddpm_eps",
    timestep_sampling="uniform",
    sample_scheduler="ddpm",
    guidance_scale=2.0,
    num_inference_steps=100,
)

SMALL = dict(
    image_channels=None,  # from the data: 1 for grayscale images, else 3
    random_flip=False,  # a mirrored character or digit is another class, or none
    cache_images=True,
    model="DiT-S/4",
    hidden_size=128,
    depth=4,
    num_heads=4,
    train_batch_size=64,
    learning_rate=2e-3,
    lr_scheduler="cosine",
    lr_warmup_steps=200,
    max_train_steps=4000,
    ema_decay="0.999",
    ema_warmup=True,
    checkpointing_steps=1000,
    validation_steps=1000,
    output_dir="outputs/dit-small",
    objective="flow",
    timestep_sampling="logit_normal",
    sample_scheduler="euler",
    guidance_scale=4.0,
    num_inference_steps=50,
)

PAPER = dict(
    resolution=256,
    image_channels=3,
    random_flip=True,
    cache_images=False,
    model="DiT-XL/2",
    train_batch_size=32,
    learning_rate=1e-4,
    lr_scheduler="constant",
    lr_warmup_steps=0,
    ema_decay="0.9999",
    ema_warmup=False,
    checkpointing_steps=5000,
    validation_steps=5000,
    output_dir="outputs/dit",
    objective="ddpm_eps",
    timestep_sampling="uniform",
    sample_scheduler="ddpm",
    guidance_scale=4.0,
    num_inference_steps=250,
)

RECIPE_DEFAULTS = {"digits": DIGITS, "small": SMALL, "paper": PAPER}


def small_patch_size(resolution: int) -> int:
    """The largest patch that divides `resolution` and leaves at least 7×7 tokens (28 px -> 4, 32 -> 4, 64 -> 8)."""
    best = 1
    for patch in range(1, resolution + 1):
        if resolution % patch == 0 and (resolution // patch) ** 2 >= 49:
            best = patch
    return best


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
