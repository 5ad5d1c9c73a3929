# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Any diffusers autoencoder as the latent space of a DiT: what differs between families, in one place.

The trainer, the latent cache, the pipeline and sample-eval all go through this module:

- `AutoencoderKL` (SD, SDXL, FLUX VAEs): `encode` gives `latent_dist`, a Gaussian sampled afresh each step; pixels
  in [-1, 1]; the caller applies `scaling_factor` and `shift_factor`.
- `AutoencoderDC` (DC-AE): deterministic `latent`; pixels in [-1, 1]; the caller applies `scaling_factor`.
- `AutoencoderRAE` (RAE with a DINOv2, SigLIP2 or MAE encoder): deterministic `latent`; pixels in [0, 1]; it applies
  its own `latents_mean` / `latents_std` and `scaling_factor` inside `encode` / `decode`.

Other autoencoders with the same contract (`encode(x)` returning `latent_dist` or `latent`, `decode(z).sample`) work
as the family they resemble. Encoded latents are carried as "moments" `(B, K, C, h, w)`: `K = 2` stacked
`[mean, logvar]` of a Gaussian posterior, `K = 1` the latents of a deterministic encoder; `latents_from_moments`
turns either into `z`, and a `LatentNorm` brings `z` to the DiT's scale (`--latent_norm`):

- `scale` (default): the autoencoder's own `(z - shift_factor) * scaling_factor`; nothing for an RAE, which
  normalises inside `encode`.
- `channel`: `(z - mean_c) / std_c` with per-channel statistics of the cached training latents (LightningDiT / RAE
  style), saved in the pipeline as `latents_mean` / `latents_std`. Refused for an RAE that already has its own.
- `none`: the latents as the autoencoder gives them.

The decoding side (`vae_latent_scale`, `decoded_to_unit_range`) lives in `pipeline_dit.py`, which has to run alone
inside a saved folder; this module imports it from there rather than keeping a second copy.
"""

import json
import os
from dataclasses import dataclass

import diffusers
import torch

from .pipeline_dit import SELF_NORMALISING_AUTOENCODERS, self_normalising, vae_latent_scale

LATENT_NORMS = ("none", "scale", "channel")
# The name of the tensors a cache stores per image for each kind of encoder (see `latents.encode_to_cache`).
GAUSSIAN_MOMENTS = ("mean", "logvar")
DETERMINISTIC_MOMENTS = ("latents",)
STATS_FILE = "latent_stats.json"
# DiagonalGaussianDistribution clamps logvar to this range before computing the standard deviation.
LOGVAR_RANGE = (-30.0, 20.0)


def load_autoencoder(
    name_or_path: str, subfolder: str | None = None, cache_dir: str | None = None, dtype=torch.float32
) -> torch.nn.Module:
    """The frozen autoencoder in `name_or_path`, of the diffusers class its config names (`_class_name`)."""
    try:
        config = diffusers.AutoencoderKL.load_config(name_or_path, subfolder=subfolder, cache_dir=cache_dir)
    except OSError as err:
        raise FileNotFoundError(
            f"--vae {name_or_path!r}: no autoencoder config found ({err}). Pass a diffusers autoencoder folder or Hub "
            "id, and --vae_subfolder vae for a full pipeline repo."
        ) from err
    class_name = config.get("_class_name", "AutoencoderKL")
    cls = getattr(diffusers, class_name, None)
    if cls is None or not (hasattr(cls, "encode") and hasattr(cls, "decode")):
        raise ValueError(
            f"--vae {name_or_path!r} is a {class_name}, not a diffusers autoencoder with encode/decode; pass an "
            "AutoencoderKL, AutoencoderDC, AutoencoderRAE or another diffusers autoencoder."
        )
    vae = cls.from_pretrained(name_or_path, subfolder=subfolder, cache_dir=cache_dir)
    vae.requires_grad_(False)
    return vae.eval().to(dtype=dtype)


def to_vae_input(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """Training images in [-1, 1] as `vae.encode` takes them: [0, 1] for an RAE (it applies its own mean/std)."""
    pixel_values = pixel_values.to(device=vae.device, dtype=vae.dtype)
    return (pixel_values + 1) / 2 if self_normalising(vae) else pixel_values


def encode_moments(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """Images `(B, 3, R, R)` in [-1, 1] -> moments `(B, K, C, h, w)`: `[mean, logvar]` of a Gaussian posterior
    (K = 2) or the latents of a deterministic encoder (K = 1)."""
    encoded = vae.encode(to_vae_input(vae, pixel_values))
    if getattr(encoded, "latent_dist", None) is not None:
        return torch.stack([encoded.latent_dist.mean, encoded.latent_dist.logvar], dim=1)
    latents = getattr(encoded, "latent", None)
    if latents is None:
        latents = getattr(encoded, "latents", None)  # AutoencoderTiny
    if latents is None:
        raise ValueError(
            f"{type(vae).__name__}.encode returned neither `latent_dist` nor `latent`: it is not an autoencoder "
            "dit-hf can train on."
        )
    return latents.unsqueeze(1)


def moment_names(num_moments: int) -> tuple[str, ...]:
    """The tensor names a cache stores for moments with `num_moments` entries (2: Gaussian, 1: deterministic)."""
    return {2: GAUSSIAN_MOMENTS, 1: DETERMINISTIC_MOMENTS}[num_moments]


def latents_from_moments(moments: torch.Tensor, noise: torch.Tensor | None = None, generator=None) -> torch.Tensor:
    """`z` from moments `(N, K, C, h, w)`: a draw `mean + exp(logvar / 2) * noise` (K = 2, like diffusers'
    `DiagonalGaussianDistribution.sample`; see `latents.sample_latents`) or the latents themselves (K = 1)."""
    from .latents import sample_latents

    if moments.dim() != 5 or moments.shape[1] not in (1, 2):
        raise ValueError(f"moments must have shape (N, K, C, h, w) with K = 1 or 2, got {tuple(moments.shape)}.")
    if moments.shape[1] == 1:
        return moments[:, 0].float()
    return sample_latents(moments, 1.0, 0.0, generator=generator, noise=noise)


@torch.no_grad()
def latent_shape(vae, resolution: int, image_channels: int) -> tuple[int, int, int]:
    """`(C, h, w)` of the latents of `resolution`² images, checked by decoding them back to that size."""
    device = vae.device
    images = torch.zeros(1, image_channels, resolution, resolution, device=device)
    try:
        moments = encode_moments(vae, images)
    except RuntimeError as err:
        raise ValueError(
            f"The {type(vae).__name__} cannot encode {image_channels}-channel {resolution}x{resolution} images "
            f"({err}); check --resolution and --image_channels."
        ) from err
    decoded = vae.decode(moments[:, 0].to(vae.dtype)).sample
    if tuple(decoded.shape[-2:]) != (resolution, resolution):
        raise ValueError(
            f"The {type(vae).__name__} decodes {resolution}x{resolution} images back to "
            f"{decoded.shape[-2]}x{decoded.shape[-1]}: pass --resolution {decoded.shape[-1]}, the size it makes."
        )
    return tuple(moments.shape[2:])


def image_channels(vae) -> int:
    """Channels of the images `vae` decodes to."""
    config = vae.config
    for key in ("out_channels", "num_channels", "in_channels"):
        if config.get(key) is not None:
            return int(config[key])
    return 3


def spatial_factor(vae) -> int:
    """How many pixels one latent covers along each side."""
    name, config = type(vae).__name__, vae.config
    if name == "AutoencoderRAE":
        return int(config.patch_size)
    if name == "AutoencoderDC":
        return 2 ** (len(config.encoder_block_out_channels) - 1)
    return 2 ** (len(config.block_out_channels) - 1)


@dataclass
class LatentNorm:
    """`(z - shift) * scaling` per channel: the autoencoder's latents `z` at the DiT's scale.

    `pipeline_config` gives the `DiTPipeline` arguments that undo it before decoding (none for `scale`, whose
    values the pipeline reads from the autoencoder's config itself).
    """

    mode: str
    shift: torch.Tensor  # (C,)
    scaling: torch.Tensor  # (C,)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        shift = self.shift.to(z.device, z.dtype).reshape(1, -1, 1, 1)
        scaling = self.scaling.to(z.device, z.dtype).reshape(1, -1, 1, 1)
        return (z - shift) * scaling

    def pipeline_config(self) -> dict:
        if self.mode == "scale":
            return {}
        return {"latents_mean": self.shift.tolist(), "latents_std": (1 / self.scaling).tolist()}


def make_latent_norm(mode: str, vae, channels: int, stats: dict | None = None) -> LatentNorm:
    """The `LatentNorm` of `--latent_norm mode` for `vae`'s `channels`-channel latents; `channel` takes the
    `stats` of `channel_statistics`."""
    if mode not in LATENT_NORMS:
        raise ValueError(f"--latent_norm {mode!r} is unknown; choose one of {list(LATENT_NORMS)}.")
    if mode == "scale":
        shift, scaling = vae_latent_scale(vae)
        return LatentNorm(mode, torch.full((channels,), shift), torch.full((channels,), scaling))
    if mode == "none":
        return LatentNorm(mode, torch.zeros(channels), torch.ones(channels))
    if self_normalising(vae) and vae.config.get("latents_mean") is not None:
        raise ValueError(
            f"This {type(vae).__name__} normalises its latents itself (`latents_mean` / `latents_std` in its config), "
            "so --latent_norm channel would normalise them twice: use --latent_norm scale."
        )
    if stats is None:
        raise ValueError("--latent_norm channel needs statistics of the cached latents: also pass --cache_latents.")
    mean, std = torch.tensor(stats["mean"]), torch.tensor(stats["std"])
    if mean.shape != (channels,) or std.shape != (channels,):
        raise ValueError(
            f"The latent statistics are for {mean.numel()} channels but the latents have {channels}; delete "
            f"{STATS_FILE} from the --cache_latents directory to compute them again."
        )
    return LatentNorm(mode, mean, 1 / std)


@torch.no_grad()
def channel_statistics(moments: torch.Tensor, chunk: int = 1024) -> dict:
    """Per-channel mean and standard deviation of the latents `z` over a cache's moments `(N, F, K, C, h, w)` (F: an
    image and its flip). For a Gaussian posterior they are those of a draw of `z`, without drawing: its mean is that
    of the posterior means, its variance that of the means plus the mean posterior variance."""
    channels = moments.shape[3]
    total, square, variance, count = (torch.zeros(channels, dtype=torch.float64) for _ in range(4))
    for start in range(0, moments.shape[0], chunk):
        part = moments[start : start + chunk].double()
        mean = part[:, :, 0].transpose(0, 2).reshape(channels, -1)  # (C, n * F * h * w)
        total += mean.sum(1)
        square += mean.square().sum(1)
        count += mean.shape[1]
        if part.shape[2] == 2:
            logvar = part[:, :, 1].clamp(*LOGVAR_RANGE).transpose(0, 2).reshape(channels, -1)
            variance += logvar.exp().sum(1)
    mean = total / count
    var = (square / count - mean.square()).clamp_min(0) + variance / count
    return {"mean": mean.tolist(), "std": var.sqrt().clamp_min(1e-6).tolist()}


def cached_channel_statistics(cache_dir: str, dataset, is_main_process: bool) -> dict:
    """`channel_statistics` of a complete latent cache, computed once and kept in `cache_dir/latent_stats.json`
    (tied to the cache's fingerprint, so a rebuilt cache gets new ones)."""
    from .latents import CACHE_INFO_NAME

    with open(os.path.join(cache_dir, CACHE_INFO_NAME)) as f:
        fingerprint = json.load(f)["fingerprint"]
    path = os.path.join(cache_dir, STATS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("fingerprint") == fingerprint:
            return stored["stats"]
    stats = channel_statistics(dataset.moments)
    if is_main_process:
        with open(path + ".tmp", "w") as f:
            json.dump({"fingerprint": fingerprint, "stats": stats}, f, indent=2)
        os.replace(path + ".tmp", path)
    return stats


__all__ = [
    "LATENT_NORMS",
    "SELF_NORMALISING_AUTOENCODERS",
    "LatentNorm",
    "cached_channel_statistics",
    "channel_statistics",
    "encode_moments",
    "image_channels",
    "latent_shape",
    "latents_from_moments",
    "load_autoencoder",
    "make_latent_norm",
    "moment_names",
    "spatial_factor",
    "to_vae_input",
]
