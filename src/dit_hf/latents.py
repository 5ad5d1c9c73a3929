# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""A cache of encoded latents, so that latent-space training runs the frozen autoencoder once, not every step.

As in fast-DiT, the training set is encoded once, for each image and its horizontal flip (so random flipping survives
caching). Unlike fast-DiT, which stores one fixed sample `z ~ q(z | x)`, the cache stores the posterior moments
(`mean`, `logvar` of `vae.encode(x).latent_dist`) and the training step draws a fresh `z` every epoch with
`sample_latents`, exactly as encoding on the fly would. For a deterministic encoder (`AutoencoderDC`,
`AutoencoderRAE`) it stores the latents themselves; `dit_hf.autoencoders` says which (`encode_moments`).

The trainer uses it like this (every process runs every line; `encode_to_cache` splits the work itself)::

    fingerprint = cache_fingerprint(args.vae, vae.config, ds._fingerprint, args.resolution, args.center_crop, len(ds))
    if not check_cache(args.cache_latents, fingerprint):  # a complete, matching cache is reused as it is
        encode_to_cache(accelerator, vae, unflipped_dataset, args.cache_latents, fingerprint=fingerprint)
    train_dataset = CachedLatentDataset(args.cache_latents, random_flip=args.random_flip)
    ...
    latents = sample_latents(batch["moments"], train_dataset.scaling_factor, train_dataset.shift_factor)

`ds` is the data set as loaded, before unreadable images are dropped, so that a complete cache is recognised
without decoding any image (`cache_covers_dataset`). The dataset given to `encode_to_cache` must be built without
random flipping: the flip is cached alongside.

Layout of a cache directory:

- `shard-{k:06d}.safetensors`: data set items `k * samples_per_shard` up to the next shard's first, with tensors
  `index` (long, the dataset indices), `mean`, `logvar`, `flip_mean`, `flip_logvar` (each `(n, C, h, w)`; `latents`
  and `flip_latents` instead for a deterministic encoder, as `cache_info.json` lists under "latent_tensors") and
  `labels` (long, -1 when the data set is unconditional), and the metadata `has_labels`, `latent_tensors` and `build`
  (the fingerprint and storage settings it was written with). Which items a shard holds does not depend on the number
  of processes.
- `cache_info.json`: written last, by the main process, once every shard is on disk and checked. Its presence marks
  the cache complete. A directory without it is the remains of an interrupted run: `check_cache` answers False and
  `encode_to_cache` keeps the finished shards written with the same `build` (a shard is renamed into place only once
  fully written), deletes everything else, and encodes only the missing shards, with any number of processes.

Reading: `CachedLatentDataset` maps the shard files (`dit_hf.shards.ShardedRows`) and copies out only the rows of each
batch, so a process's private memory does not grow with the data set, and the processes of a machine share one copy
of the cache in the page cache.

Precision: moments are stored in float32 by default, so that sampling from the cache is identical to sampling from
`vae.encode(x).latent_dist`. `storage_dtype=torch.float16` halves the size (at 256 px with the SD VAE, 64 KiB per
image in float32, about 84 GB for ImageNet-1k's 1.28M images, read through the page cache) at
the cost of rounding each moment to a relative 2**-11 ≈ 4.9e-4; for a narrow posterior that error in `mean` can be
a sizeable fraction of the standard deviation it is sampled with, so use float16 only when float32 does not fit.
bfloat16 (a relative 2**-8) is refused.
"""

import json
import os
import re

import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .autoencoders import GAUSSIAN_MOMENTS, LOGVAR_RANGE, encode_moments, moment_names, vae_latent_scale
from .collate import whole_batch_collate
from .shards import ShardedRows, ShardError, shard_metadata
from .training import flip_flags

CACHE_FORMAT_VERSION = 1
CACHE_INFO_NAME = "cache_info.json"
SHARD_TENSORS = ("index", "mean", "logvar", "flip_mean", "flip_logvar", "labels")  # of a Gaussian posterior's cache
# Optional: encoder features of each image and of its flip (REPA targets), when the cache was built with them.
FEATURE_TENSORS = ("features", "flip_features")
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Finished shards and the temporary files of interrupted writes (`<shard>.tmp`): a rebuild removes both.
_SHARD_PATTERN = re.compile(r"^shard-(\d{5}-\d{5}|\d{6})\.safetensors(\.tmp)?$")
# Shards named by their position in the data set (`shard_name`); the older per-process names are only ever deleted.
_NEW_SHARD_PATTERN = re.compile(r"^shard-\d{6}\.safetensors$")


def _json_safe(value):
    """`value` as it reads back from JSON (tuples become lists, dict keys strings), so fingerprints compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def cache_fingerprint(
    vae_name_or_path: str,
    vae_config: dict,
    dataset_fingerprint: str,
    resolution: int,
    center_crop: bool,
    num_samples: int,
    features: str | None = None,
) -> dict:
    """Everything that decides the cached latents, as a JSON-safe dict: a cache is reused only if this matches.

    Args:
        vae_name_or_path (`str`): The Hub id or folder the VAE was loaded from.
        vae_config (`dict`): `vae.config`. Keys starting with "_" (`_name_or_path`, `_diffusers_version`,
            `_use_default_values`) are left out: they record where and how the config was read, not what it encodes.
        dataset_fingerprint (`str`): Identifies the images and their order, e.g. `datasets.Dataset._fingerprint`, of
            the data set before unreadable images are dropped (so that a complete cache is found without a scan).
        resolution (`int`): The side of the square images fed to the VAE.
        center_crop (`bool`): Whether the images were center-cropped (else randomly cropped) to `resolution`.
        num_samples (`int`): The number of images in the data set, before unreadable ones are dropped (the cache may
            hold fewer).
        features (`str`, *optional*): Identifies the encoder whose features are cached too (e.g. the REPA encoder's
            id and input size); `None` for a cache of latents alone.
    """
    config = {key: value for key, value in dict(vae_config).items() if not key.startswith("_")}
    return _json_safe(
        {
            "cache_format": CACHE_FORMAT_VERSION,
            "vae": str(vae_name_or_path),
            "vae_config": config,
            "dataset": str(dataset_fingerprint),
            "resolution": int(resolution),
            "center_crop": bool(center_crop),
            "num_samples": int(num_samples),
            **({"features": str(features)} if features is not None else {}),
        }
    )


def _fingerprint_differences(stored: dict, wanted: dict) -> list[str]:
    """The keys whose values differ; `vae_config` is compared key by key so the message names the setting."""
    differences = []
    for key in sorted(set(stored) | set(wanted)):
        old, new = stored.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += [f"{key}.{sub}" for sub in _fingerprint_differences(old, new)]
        elif old != new:
            differences.append(key)
    return differences


def _read_cache_info(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, CACHE_INFO_NAME)
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"The latent cache {cache_dir!r} has an unreadable {CACHE_INFO_NAME} ({err}). Delete the directory and "
            "rerun to rebuild the cache."
        ) from err


def check_cache(cache_dir: str, fingerprint: dict) -> bool:
    """Whether `cache_dir` holds a complete latent cache made with `fingerprint`.

    Returns:
        `True` for a complete cache (its `cache_info.json` exists) with an equal fingerprint: use it as it is.
        `False` if the directory is absent, empty, or has no `cache_info.json` (an interrupted run): build the cache
        with `encode_to_cache`, which first deletes any shards left over.

    Raises:
        `ValueError`: If the directory holds a complete cache made with a different fingerprint (another VAE, data
            set, resolution or crop), naming the keys that differ. Rebuilding silently would throw away a cache the
            user may still want, so the choice is left to them.
    """
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise ValueError(f"--cache_latents {cache_dir!r} is a file; pass a directory.")
    if not os.path.isfile(os.path.join(cache_dir, CACHE_INFO_NAME)):
        return False
    stored = _read_cache_info(cache_dir).get("fingerprint", {})
    differences = _fingerprint_differences(stored, _json_safe(fingerprint))
    if differences:
        raise ValueError(
            f"The latent cache in {cache_dir!r} was made with different settings ({', '.join(differences)} differ). "
            "Pass another --cache_latents directory, or delete this one to rebuild it."
        )
    return True


def cache_covers_dataset(cache_dir: str | None, dataset_fingerprint: str, num_samples: int) -> bool:
    """Whether `cache_dir` holds a complete cache made from this data set (`cache_fingerprint`'s `dataset` and
    `num_samples`), whatever its other settings: training will then read latents only, and the images need no check.

    A cache whose other settings differ is still refused later, by `check_cache`.
    """
    if not cache_dir or not os.path.isfile(os.path.join(cache_dir, CACHE_INFO_NAME)):
        return False
    stored = _read_cache_info(cache_dir).get("fingerprint", {})
    return stored.get("dataset") == str(dataset_fingerprint) and stored.get("num_samples") == int(num_samples)


def process_indices(num_samples: int, process_index: int, num_processes: int) -> range:
    """The contiguous share of `range(num_samples)` that process `process_index` of `num_processes` encodes.

    Shares differ in size by at most one (the first `num_samples % num_processes` processes take one more), and
    together they cover every index exactly once.
    """
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index={process_index} must lie in [0, num_processes={num_processes}).")
    if num_samples < 0:
        raise ValueError(f"num_samples={num_samples} must be >= 0.")
    base, extra = divmod(num_samples, num_processes)
    start = process_index * base + min(process_index, extra)
    return range(start, start + base + (process_index < extra))


def shard_name(k: int) -> str:
    """The file of the k-th shard: items `k * samples_per_shard` up to the next shard's first."""
    return f"shard-{k:06d}.safetensors"


def _build_settings(fingerprint: dict, num_samples: int, samples_per_shard: int, storage_name: str, features: bool):
    """What decides a shard's bytes besides its items; a finished shard is kept on relaunch only if this matches."""
    return json.dumps(
        {
            "fingerprint": _json_safe(fingerprint),
            "num_samples": num_samples,
            "samples_per_shard": samples_per_shard,
            "dtype": storage_name,
            "features": features,
        },
        sort_keys=True,
    )


def _keep_finished_shards(cache_dir: str, build: str) -> None:
    """Deletes everything of an earlier run except the finished shards written with `build`.

    The completion marker goes first, so that a half-rebuilt cache is never taken for a complete one. Temporary files
    (`<shard>.tmp`, an interrupted write), shards of other settings or another layout, and unreadable shards go too.
    """
    for name in [CACHE_INFO_NAME, CACHE_INFO_NAME + ".tmp"] + sorted(os.listdir(cache_dir)):
        path = os.path.join(cache_dir, name)
        if not os.path.isfile(path) or not (name.startswith(CACHE_INFO_NAME) or _SHARD_PATTERN.match(name)):
            continue
        if _NEW_SHARD_PATTERN.match(name):
            try:
                if shard_metadata(path).get("build") == build:
                    continue
            except ShardError:
                pass  # e.g. a file cut short by a full disk: encoded again
        os.remove(path)


def _atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    # A crash mid-write leaves only `<path>.tmp`, which no reader looks at and the next run removes.
    save_file(tensors, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)


def _shard_names(cache_dir: str) -> list[str]:
    return sorted(name for name in os.listdir(cache_dir) if _SHARD_PATTERN.match(name) and not name.endswith(".tmp"))


def _summarize_shards(cache_dir: str, num_samples: int) -> dict:
    """Checks that the shards on disk cover every index once and agree on shape and labels; returns what they hold."""
    shards = _shard_names(cache_dir)
    seen = torch.zeros(num_samples, dtype=torch.long)
    shapes, has_labels, feature_shapes = set(), set(), set()
    for name in shards:
        with safe_open(os.path.join(cache_dir, name), framework="pt") as f:
            index = f.get_tensor("index")
            first = next(key for key in f.keys() if key not in ("index", "labels", *FEATURE_TENSORS))
            shapes.add(tuple(f.get_slice(first).get_shape()[1:]))
            has_features = "features" in f.keys()
            feature_shapes.add(tuple(f.get_slice("features").get_shape()[1:]) if has_features else None)
            has_labels.add(f.metadata()["has_labels"] == "true")
        seen.index_add_(0, index, torch.ones_like(index))
    if not shards or not bool((seen == 1).all()):
        raise ValueError(
            f"The shards in {cache_dir!r} do not hold each of the {num_samples} samples exactly once. All processes "
            "must write to the same directory (a shared file system when training on several machines)."
        )
    if len(shapes) != 1 or len(has_labels) != 1 or len(feature_shapes) != 1:
        raise ValueError(
            f"The shards in {cache_dir!r} disagree on latent shape {sorted(shapes)} or on having labels: every item "
            "of the data set must have the same image size, and either all items or none have 'class_labels'."
        )
    feature_shape = feature_shapes.pop()
    return {
        "shards": shards,
        "latent_shape": list(shapes.pop()),
        "has_labels": has_labels.pop(),
        "feature_shape": list(feature_shape) if feature_shape is not None else None,
    }


def _check_encode_arguments(dataset, cache_dir, batch_size, fingerprint, samples_per_shard, storage_dtype) -> str:
    """Raises ValueError for unusable arguments; returns the storage dtype's name."""
    storage_name = str(storage_dtype).removeprefix("torch.")
    if storage_name not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype={storage_dtype} is not supported; use torch.float32 or torch.float16.")
    if batch_size < 1 or samples_per_shard < 1:
        raise ValueError(f"batch_size={batch_size} and samples_per_shard={samples_per_shard} must be >= 1.")
    num_samples = len(dataset)
    if num_samples == 0:
        raise ValueError("The data set to cache is empty; check --train_data_dir / --dataset_name.")
    if num_samples > fingerprint.get("num_samples", num_samples):
        raise ValueError(
            f"The fingerprint is for {fingerprint['num_samples']} samples but the data set has {num_samples}; build "
            "the fingerprint with cache_fingerprint(..., num_samples=len(dataset))."
        )
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise ValueError(f"--cache_latents {cache_dir!r} is a file; pass a directory.")
    return storage_name


def _shards_to_encode(accelerator, cache_dir: str, num_samples: int, samples_per_shard: int) -> list[int]:
    """This process's share of the shards not yet on disk (after the main process removed the unusable ones)."""
    finished = set(os.listdir(cache_dir))
    num_shards = -(-num_samples // samples_per_shard)
    missing = [k for k in range(num_shards) if shard_name(k) not in finished]
    # Everyone has listed the directory before anyone adds to it, so all processes agree on `missing`.
    accelerator.wait_for_everyone()
    return [missing[i] for i in process_indices(len(missing), accelerator.process_index, accelerator.num_processes)]


def _encode_batch(vae, batch: dict, start: int, storage_dtype: torch.dtype, features_fn) -> dict:
    """One batch of images and their flips -> the tensors of its shard rows."""
    pixel_values = batch["pixel_values"].to(vae.device, dtype=vae.dtype)
    n = pixel_values.shape[0]
    # One VAE call for the images and their flips: GroupNorm is per sample, so batching them changes nothing.
    both = torch.cat([pixel_values, torch.flip(pixel_values, dims=[-1])])
    moments = encode_moments(vae, both).to("cpu", storage_dtype)  # (2n, K, C, h, w)
    has_labels = "class_labels" in batch
    labels = torch.as_tensor(batch["class_labels"]).long().reshape(n) if has_labels else torch.full((n,), -1)
    part = {"index": torch.arange(start, start + n), "labels": labels.cpu()}
    for k, name in enumerate(moment_names(moments.shape[1])):
        part[name], part["flip_" + name] = moments[:n, k].contiguous(), moments[n:, k].contiguous()
    if features_fn is not None:
        features = features_fn(both).to("cpu").contiguous()
        part["features"], part["flip_features"] = features[:n], features[n:]
    return part


@torch.no_grad()
def encode_to_cache(
    accelerator,
    vae,
    dataset: Dataset,
    cache_dir: str,
    batch_size: int = 64,
    *,
    fingerprint: dict,
    num_workers: int = 0,
    samples_per_shard: int = 4096,
    storage_dtype: torch.dtype = torch.float32,
    features_fn=None,
) -> str:
    """Encodes `dataset` and its horizontal flip with the frozen `vae` into a latent cache in `cache_dir`.

    Every process of `accelerator` must call this: the shards still missing are split between the processes
    (`process_indices`), each encodes its shards on its device, then the main process checks the shards and writes
    `cache_info.json`, which marks the cache complete. An interrupted run resumes: the finished shards of a run with
    the same fingerprint and storage settings are kept, whatever number of processes wrote them; anything else left
    in `cache_dir` by an earlier run is deleted first.

    Args:
        accelerator (`accelerate.Accelerator`): Gives the process index, the number of processes and the barrier.
        vae (`AutoencoderKL`, `AutoencoderDC`, `AutoencoderRAE`, ...): The frozen autoencoder, already on
            `accelerator.device`. Images are encoded in its dtype; keep it in float32 when its config has
            `force_upcast=True` (as the SD VAEs do), else fp16 may overflow.
        dataset (`torch.utils.data.Dataset`): Items are dicts with "pixel_values" (a float tensor `(3, R, R)` in
            [-1, 1]) and, for labelled data, "class_labels" (a long scalar). Build it without random flipping.
        cache_dir (`str`): The directory to write to; created if absent. All processes must see the same directory.
        batch_size (`int`, defaults to 64): Images per VAE call on each process. Each call also encodes their flips,
            so the VAE sees `2 * batch_size` images at a time. Batches never straddle two shards.
        fingerprint (`dict`): From `cache_fingerprint`; stored so `check_cache` can tell whether the cache matches.
            Its `num_samples` may exceed `len(dataset)` by the rows dropped as unreadable.
        num_workers (`int`, defaults to 0): DataLoader worker processes for reading the images.
        samples_per_shard (`int`, defaults to 4096): Items per shard (the last one holds the rest): the unit of work
            that a relaunch does not repeat, and a bound on the memory held before a write.
        storage_dtype (`torch.dtype`, defaults to `torch.float32`): `torch.float32`, or `torch.float16` to halve the
            size of the cache (see the module docstring).
        features_fn (`Callable`, *optional*): images `(B, 3, R, R)` in [-1, 1] on the VAE's device -> a CPU tensor
            `(B, ...)` of features to cache with each image and its flip, e.g. REPA targets
            (`functools.partial(dit_hf.repa.cache_encoder_features, encoder)`). Stored as `features`/`flip_features`
            and returned by the datasets as "repa_features", flipped together with the latents.

    Returns:
        `cache_dir`.
    """
    storage_name = _check_encode_arguments(
        dataset, cache_dir, batch_size, fingerprint, samples_per_shard, storage_dtype
    )
    num_samples = len(dataset)
    build = _build_settings(fingerprint, num_samples, samples_per_shard, storage_name, features_fn is not None)
    if accelerator.is_main_process:
        os.makedirs(cache_dir, exist_ok=True)
        _keep_finished_shards(cache_dir, build)
    # No process may list or write shards before the main process has finished deleting the unusable ones.
    accelerator.wait_for_everyone()

    mine = _shards_to_encode(accelerator, cache_dir, num_samples, samples_per_shard)
    spans = [range(k * samples_per_shard, min(num_samples, (k + 1) * samples_per_shard)) for k in mine]
    batches = [list(span[i : i + batch_size]) for span in spans for i in range(0, len(span), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    parts, shards = [], iter(zip(mine, spans))
    shard, span = next(shards, (None, None))
    progress = tqdm(loader, desc="Caching latents", disable=not accelerator.is_local_main_process)
    for batch, indices in zip(progress, batches):
        parts.append(_encode_batch(vae, batch, indices[0], storage_dtype, features_fn))
        if indices[-1] == span[-1]:  # the shard's last batch
            tensors = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
            metadata = {"has_labels": str("class_labels" in batch).lower(), "build": build,
                        "latent_tensors": ",".join(_latent_names(tensors))}  # fmt: skip
            _atomic_save(tensors, os.path.join(cache_dir, shard_name(shard)), metadata)
            parts = []
            shard, span = next(shards, (None, None))

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_cache_info(cache_dir, fingerprint, num_samples, storage_name, vae)
    # Nobody reads the cache before it is marked complete.
    accelerator.wait_for_everyone()
    return cache_dir


def _latent_names(tensors: dict) -> tuple[str, ...]:
    """The moments' tensor names of a shard's `tensors`, in the order they stack (`mean`, `logvar` or `latents`)."""
    return tuple(k for k in tensors if k not in ("index", "labels", *FEATURE_TENSORS) and not k.startswith("flip_"))


def _write_cache_info(cache_dir: str, fingerprint: dict, num_samples: int, storage_name: str, vae) -> None:
    summary = _summarize_shards(cache_dir, num_samples)
    # Every shard of one build holds the same tensors (the build fixes the autoencoder).
    names = shard_metadata(os.path.join(cache_dir, summary["shards"][0])).get("latent_tensors")
    info = {
        "format_version": CACHE_FORMAT_VERSION,
        "fingerprint": _json_safe(fingerprint),
        "num_samples": num_samples,
        **summary,
        "dtype": storage_name,
        "vae_dtype": str(vae.dtype).removeprefix("torch."),
        "latent_tensors": names.split(",") if names else list(GAUSSIAN_MOMENTS),
        **dict(zip(("shift_factor", "scaling_factor"), vae_latent_scale(vae))),
    }
    path = os.path.join(cache_dir, CACHE_INFO_NAME)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=2)
    os.replace(path + ".tmp", path)


class CachedLatentDataset(Dataset):
    """The moments of a complete latent cache, read from memory-mapped shards, in the data set's order.

    Item `i` is `{"moments": (K, C, h, w), "class_labels": long scalar}` for data set item `i`: the stacked `mean`
    and `logvar` of its posterior (K = 2; the latents of a deterministic encoder, K = 1) or, with `random_flip`, of
    its horizontal flip's with probability 0.5 (a function of (seed, epoch, index): [`~dit_hf.training.flip_flags`]).
    "class_labels" is left out for unconditional data.
    Opening a cache reads the shards' headers and `index` tensors only; each item is copied out of the mapped files
    when asked for, so private memory stays flat however large the cache, and the processes of one machine share the
    file pages. Sample the latents on the device with `sample_latents` (`autoencoders.latents_from_moments` for
    either kind).

    Args:
        cache_dir (`str`): A directory written by `encode_to_cache`.
        random_flip (`bool`, defaults to `False`): Whether to return the flipped image's moments half of the time.
        seed (`int`, defaults to 0): The run's seed, which fixes the flips (with the epoch each index carries).

    Raises:
        `ValueError`: If the cache is incomplete or corrupt (no `cache_info.json`, a missing or unreadable shard, a
            missing or repeated index, wrong shapes); the message says to delete it and rerun.
    """

    def __init__(self, cache_dir: str, random_flip: bool = False, seed: int = 0):
        self.cache_dir = cache_dir
        self.random_flip = random_flip
        self.seed = seed
        rebuild = f"Delete {cache_dir!r} and rerun to rebuild the cache."
        if not os.path.isfile(os.path.join(cache_dir, CACHE_INFO_NAME)):
            raise ValueError(f"{cache_dir!r} holds no complete latent cache (no {CACHE_INFO_NAME}). {rebuild}")
        self.info = _read_cache_info(cache_dir)
        for name in self.info["shards"]:
            if not os.path.isfile(os.path.join(cache_dir, name)):
                raise ValueError(f"The latent cache is incomplete: shard {name} is missing. {rebuild}")
        try:
            self.rows = ShardedRows(
                [os.path.join(cache_dir, n) for n in self.info["shards"]], self.info["num_samples"]
            )
        except ShardError as err:
            name = os.path.basename(err.path)
            raise ValueError(f"The latent cache is corrupt: shard {name} is unreadable ({err}). {rebuild}") from err
        except ValueError as err:
            raise ValueError(f"The latent cache is incomplete or corrupt: {err}. {rebuild}") from err
        # The tensors stacked into "moments", in order (caches list them in their info; older ones hold a posterior).
        self.latent_tensors = tuple(self.info.get("latent_tensors", GAUSSIAN_MOMENTS))
        self._check_shapes(rebuild)

    def _check_shapes(self, rebuild: str) -> None:
        latent_shape, feature_shape = self.info["latent_shape"], self.info.get("feature_shape")
        stacked = [prefix + name for prefix in ("", "flip_") for name in self.latent_tensors]
        expected = {key: latent_shape for key in stacked} | {"labels": []}
        if feature_shape is not None:
            expected |= {key: feature_shape for key in FEATURE_TENSORS}
        dtype = STORAGE_DTYPES[self.info["dtype"]]
        for shard, count in zip(self.rows.shards, self.rows.counts):
            name = os.path.basename(shard.path)
            for key, shape in expected.items():
                if key not in shard.header or list(shard.shape(key)) != [int(count), *shape]:
                    raise ValueError(f"The latent cache is corrupt: shard {name} has the wrong shape. {rebuild}")
            if any(shard.dtype(key) != dtype for key in stacked):
                raise ValueError(f"The latent cache is corrupt: shard {name} has the wrong dtype. {rebuild}")

    @property
    def scaling_factor(self) -> float:
        """The VAE's `scaling_factor`, which brings latents to about unit variance."""
        return self.info["scaling_factor"]

    @property
    def shift_factor(self) -> float:
        """The VAE's `shift_factor` (0.0 for VAEs without one), subtracted before scaling."""
        return self.info["shift_factor"]

    @property
    def has_labels(self) -> bool:
        return self.info["has_labels"]

    @property
    def has_features(self) -> bool:
        return self.info.get("feature_shape") is not None

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, indices: list[int], flip: torch.Tensor) -> dict[str, torch.Tensor]:
        """The items `indices` as one batch, each from its flip when `flip` (a 0/1 tensor, one per index) says so."""
        flip = flip.numpy()
        stacked = [self.rows.gather([name, "flip_" + name], indices, flip) for name in self.latent_tensors]
        batch = {"moments": torch.stack(stacked, dim=1)}  # (B, K, C, h, w), e.g. [mean, logvar]
        if self.has_labels:
            batch["class_labels"] = self.rows.gather(["labels"], indices)
        if self.has_features:
            batch["repa_features"] = self.rows.gather(list(FEATURE_TENSORS), indices, flip)
        return batch

    @property
    def moments(self) -> "CachedMoments":
        """Every item's moments and its flip's as a read-only `(N, 2, K, C, h, w)` view, read through the maps
        a slice at a time (e.g. for statistics over the whole cache in bounded memory)."""
        return CachedMoments(self)

    def flips(self, indices) -> torch.Tensor:
        """Long `(len(indices),)`: 1 where the flipped image's moments are used, a function of (seed, epoch, index)."""
        if not self.random_flip:
            return torch.zeros(len(indices), dtype=torch.long)
        return flip_flags(self.seed, indices).long()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.gather([int(i)], self.flips([i])).items()}


class CachedMoments:
    """`CachedLatentDataset.moments`: indexing the first dimension (an int or a slice) reads those items, each with
    its flip, as a new tensor `(n, 2, K, C, h, w)` (`(2, K, C, h, w)` for an int)."""

    def __init__(self, dataset: CachedLatentDataset):
        self.dataset = dataset
        k = len(dataset.latent_tensors)
        self.shape = torch.Size([len(dataset), 2, k, *dataset.info["latent_shape"]])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice) -> torch.Tensor:
        if not isinstance(key, (int, slice)):
            raise TypeError(f"CachedMoments is indexed by an int or a slice of items, got {type(key).__name__}.")
        indices = range(len(self))[key]
        single = isinstance(key, int)
        indices = [indices] if single else list(indices)
        both = [self.dataset.gather(indices, torch.full((len(indices),), flip))["moments"] for flip in (0, 1)]
        out = torch.stack(both, dim=1)
        return out[0] if single else out


class BatchedCachedLatents(CachedLatentDataset):
    """[`CachedLatentDataset`] that hands the DataLoader whole batches, made with one gather per shard instead of one
    read per item and a stack (about 15× faster on CPU at 32×32×4 latents; see bench/bench_loader.py).

    DataLoader calls `__getitems__` with a batch's indices; build it with `collate_fn=BatchedCachedLatents.collate`,
    which passes the ready batch through. Flips are chosen per item, as by the parent.
    """

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.gather([int(i) for i in indices], self.flips(indices))

    collate = staticmethod(whole_batch_collate)


def sample_latents(
    moments: torch.Tensor,
    scaling_factor: float,
    shift_factor: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draws `z ~ N(mean, exp(logvar))` from cached moments and scales it for the DiT: `(z - shift) * scaling`.

    Matches diffusers' `DiagonalGaussianDistribution.sample` (logvar clamped to [-30, 20], noise from `randn_tensor`
    in the moments' dtype), so with the same generator it gives the same `z` as `vae.encode(x).latent_dist.sample`.

    Args:
        moments (`torch.Tensor`): `(N, 2, C, h, w)` or `(2, C, h, w)`, stacked `[mean, logvar]`. float16 moments
            are upcast to float32 first.
        scaling_factor (`float`): `vae.config.scaling_factor` (`CachedLatentDataset.scaling_factor`).
        shift_factor (`float`, defaults to 0.0): `vae.config.shift_factor`, for VAEs that have one.
        generator (`torch.Generator` or `list[torch.Generator]`, *optional*): For reproducible noise; one per sample
            when a list.
        noise (`torch.Tensor` shaped like the mean, *optional*): Standard normal noise to use instead of drawing it
            (the trainer draws it per global batch so that results do not depend on the process count).
    """
    if moments.dim() < 4 or moments.shape[-4] != 2:
        raise ValueError(f"moments must have shape (N, 2, C, h, w) or (2, C, h, w), got {tuple(moments.shape)}.")
    if moments.dtype in (torch.float16, torch.bfloat16):
        moments = moments.float()
    mean, logvar = moments.unbind(dim=-4)
    std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
    if noise is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    elif noise.shape != mean.shape:
        raise ValueError(f"`noise` has shape {tuple(noise.shape)}, the latents {tuple(mean.shape)}.")
    return (mean + std * noise.to(mean.dtype) - shift_factor) * scaling_factor
