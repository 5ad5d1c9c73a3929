# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Class consistency of class-conditional samples, for any labelled data set: a linear probe on FID features.

A multinomial logistic regression fitted on the standardised Inception pool features (the FID network of
[`dit_hf.metrics`], so nothing more to download) of the user's real labelled images. A generated sample counts as
consistent when the probe assigns it the class it was sampled for; `class_accuracy` is the fraction that do.

The probe is fitted on a stratified part of the real images and scored on the rest: `held_out_accuracy` is the
ceiling to read `class_accuracy` against (real images score about that; chance is about 1 / classes). A probe is only
as good as the features separate the classes: on tiny or low-contrast images, check that number first.

Typical use, with the extractor of FID::

    extractor = InceptionExtractor()
    reference = reference_stats("/data/train", extractor, resolution=32)  # FID features, cached
    probe = fit_class_probe("/data/train", extractor, resolution=32, features=reference)  # no second pass
    metrics = evaluate_samples(images, reference, extractor, labels=labels, class_probe=probe)
    metrics["class_accuracy"], probe.held_out_accuracy
"""

import hashlib
import json
import os
import warnings
from dataclasses import dataclass

import numpy as np

from .metrics import (
    FeatureStats,
    ImageSource,
    InceptionExtractor,
    LabelledImages,
    default_cache_dir,
    open_labelled_source,
    reference_stats,
    stats_fingerprint,
)

# Bump when the fit changes (split, solver, standardisation): cached probes then stop matching.
PROBE_VERSION = 1


@dataclass
class ClassProbe:
    """A fitted probe: logits = ((features - mean) / scale) @ weight.T + bias, class = classes[argmax].

    Saved and loaded as `.npz` (plain arrays: no pickled estimator).
    """

    mean: np.ndarray  # (D,) of the fitted features
    scale: np.ndarray  # (D,) their standard deviation, 1 where constant
    weight: np.ndarray  # (K, D)
    bias: np.ndarray  # (K,)
    classes: np.ndarray  # (K,) int64 class ids, the row order of `weight`
    held_out_accuracy: float  # on the real images the probe was not fitted on
    num_fit: int
    num_held_out: int
    class_names: list[str] | None = None  # indexed by class id
    feature_id: str = ""
    fingerprint: str = ""  # the cache key: features, labels and fit settings

    def logits(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != len(self.mean):
            raise ValueError(
                f"The probe takes (N, {len(self.mean)}) features, got shape {features.shape}: use the feature network "
                "it was fitted with."
            )
        return ((features - self.mean) / self.scale) @ self.weight.T + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N,) class ids."""
        return self.classes[self.logits(features).argmax(axis=1)]

    def accuracy(self, samples, labels, extractor: InceptionExtractor | None = None) -> float:
        """Fraction of `samples` the probe assigns to their `labels` (the classes they were generated for).

        `samples` are (N, D) features, [`FeatureStats`] with features, or images (uint8, see
        [`dit_hf.metrics.as_uint8_nhwc`], or an [`ImageSource`]) with the `extractor` the probe was fitted with.
        """
        if isinstance(samples, FeatureStats):
            if samples.features is None:
                raise ValueError("The sample statistics hold no features; compute them with keep_features=True.")
            self._check_features(samples.feature_id)
            features = samples.features
        elif isinstance(samples, np.ndarray) and samples.ndim == 2 and np.issubdtype(samples.dtype, np.floating):
            features = samples
        else:
            if extractor is None:
                raise ValueError("Scoring images needs the `extractor` the probe was fitted with; pass it.")
            self._check_features(extractor.feature_id)
            features = extractor(samples)
        labels = np.asarray(labels)
        if labels.shape != (len(features),):
            raise ValueError(f"Got {len(features)} samples but labels of shape {labels.shape}; pass one label each.")
        unknown = np.setdiff1d(labels, self.classes)
        if len(unknown):
            raise ValueError(
                f"Labels {unknown[:10].tolist()} are not classes of the real images the probe was fitted on "
                f"({self.classes.tolist()}); the samples' labels must use the reference's class ids."
            )
        return float(np.mean(self.predict(features) == labels))

    def _check_features(self, feature_id: str) -> None:
        if self.feature_id and feature_id and feature_id != self.feature_id:
            raise ValueError(
                f"The probe was fitted on features {self.feature_id}, not {feature_id}; fit it with the same network."
            )

    def save(self, path: str) -> None:
        """Write `.npz` atomically (a temporary file, then a rename)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        arrays = dict(mean=self.mean, scale=self.scale, weight=self.weight, bias=self.bias, classes=self.classes)
        arrays.update(
            held_out_accuracy=np.float64(self.held_out_accuracy),
            num_fit=np.int64(self.num_fit),
            num_held_out=np.int64(self.num_held_out),
            feature_id=np.str_(self.feature_id),
            fingerprint=np.str_(self.fingerprint),
        )
        if self.class_names is not None:
            arrays["class_names"] = np.array(self.class_names, dtype=np.str_)
        temporary = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(temporary, **arrays)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str) -> "ClassProbe":
        with np.load(path) as data:
            return cls(
                data["mean"],
                data["scale"],
                data["weight"],
                data["bias"],
                data["classes"],
                float(data["held_out_accuracy"]),
                int(data["num_fit"]),
                int(data["num_held_out"]),
                data["class_names"].tolist() if "class_names" in data.files else None,
                str(data["feature_id"]),
                str(data["fingerprint"]),
            )


def stratified_split(labels: np.ndarray, held_out_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted `(fit, held_out)` indices: about `held_out_fraction` of each class held out, at least one image each."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must lie strictly between 0 and 1, got {held_out_fraction}.")
    rng = np.random.default_rng(seed)
    held_out = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            raise ValueError(
                f"Class {label} has {len(members)} real image; the probe needs at least 2 per class (one to fit, one "
                "to check). Use more reference images (a larger --max_images) or drop the class."
            )
        count = min(len(members) - 1, max(1, round(held_out_fraction * len(members))))
        held_out.append(rng.choice(members, count, replace=False))
    held_out = np.sort(np.concatenate(held_out))
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


def fit_probe_on_features(
    features: np.ndarray,
    labels,
    held_out_fraction: float = 0.2,
    seed: int = 0,
    regularization: float = 1.0,
    max_iter: int = 2000,
) -> ClassProbe:
    """Fit the probe on a stratified `1 - held_out_fraction` of `features` (N, D) and score it on the rest.

    The features are standardised with the fitted part's mean and standard deviation, then scikit-learn's
    `LogisticRegression` (lbfgs, multinomial, inverse L2 strength `regularization`) is fitted.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.shape != (len(features),):
        raise ValueError(f"Need (N, D) features and N labels, got shapes {features.shape} and {labels.shape}.")
    if len(np.unique(labels)) < 2:
        raise ValueError(f"The real images hold {len(np.unique(labels))} class; a class probe needs at least 2.")
    fit, held_out = stratified_split(labels, held_out_fraction, seed)
    mean = features[fit].mean(axis=0, dtype=np.float64)
    scale = features[fit].std(axis=0, dtype=np.float64)
    scale[scale == 0] = 1.0  # constant features (e.g. dead ReLU units) carry no signal: leave them at 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = LogisticRegression(C=regularization, max_iter=max_iter)
        model.fit((features[fit] - mean) / scale, labels[fit])
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        warnings.warn(
            f"The class probe did not converge in {max_iter} iterations; its accuracies are still usable but may "
            "shift slightly with a larger max_iter.",
            stacklevel=2,
        )
    weight, bias = model.coef_, model.intercept_
    if len(model.classes_) == 2:  # scikit-learn keeps one row for two classes: logit of class 1 against class 0
        weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
    classes = model.classes_.astype(np.int64)
    probe = ClassProbe(mean, scale, weight, bias, classes, float("nan"), num_fit=len(fit), num_held_out=len(held_out))
    # Scored through the exported parameters: the ones every later call (and the cache) uses.
    probe.held_out_accuracy = float(np.mean(probe.predict(features[held_out]) == labels[held_out]))
    return probe


def _probe_key(features_fingerprint: str, labels: np.ndarray, **settings) -> str:
    key = {
        "features": features_fingerprint,
        "labels": hashlib.sha256(np.ascontiguousarray(labels, np.int64).data).hexdigest(),
        "version": PROBE_VERSION,
        **settings,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def fit_class_probe(
    source,
    extractor: InceptionExtractor,
    resolution: int | None = None,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    max_images: int | None = None,
    seed: int = 0,
    held_out_fraction: float = 0.2,
    regularization: float = 1.0,
    features: FeatureStats | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
) -> ClassProbe:
    """The class probe of real labelled images, fitted once per data set and cached on disk.

    Args:
        source: a [`LabelledImages`], `(images, labels)` in memory, or any `spec` of
            [`dit_hf.metrics.open_labelled_source`] (which documents `resolution`, `split`, `image_column` and
            `label_column`): "digits", an image folder with class subfolders, a `datasets` id or `save_to_disk`
            folder with a label column, or an `.npz` with `arr_1`.
        extractor ([`InceptionExtractor`]): the FID feature network.
        max_images (`int`, *optional*), seed (`int`, defaults to 0): a seeded random subset, the one
            [`dit_hf.metrics.reference_stats`] draws with the same values; `seed` also draws the held-out split.
        held_out_fraction (`float`, defaults to 0.2): per class, the part of the images the probe is scored on.
        regularization (`float`, defaults to 1.0): scikit-learn's `C`, the inverse L2 strength.
        features ([`FeatureStats`], *optional*): statistics with features of exactly these images, e.g. the FID
            reference already computed; otherwise computed by `reference_stats`, whose cache they share.
        cache_dir (`str`, *optional*), use_cache (`bool`, defaults to `True`): the probe is cached as
            `<cache_dir>/probe-<key>.npz`, keyed by the features' fingerprint, the labels and the fit settings.

    Raises [`dit_hf.metrics.NoLabelsError`] when the images carry no class labels.
    """
    if isinstance(source, str):
        source = open_labelled_source(source, resolution, split, image_column, label_column)
    elif isinstance(source, tuple):
        source = LabelledImages.from_images(*source)
    elif not isinstance(source, LabelledImages):
        raise ValueError(f"Expected labelled images (a spec, (images, labels) or LabelledImages), got {type(source)}.")
    source = source.subset(max_images, seed)
    features = _labelled_features(source.source, extractor, features, cache_dir, use_cache)
    settings = dict(held_out_fraction=held_out_fraction, seed=seed, regularization=regularization)
    key = _probe_key(features.fingerprint, source.labels, **settings)
    path = os.path.join(cache_dir or default_cache_dir(), f"probe-{key}.npz")
    if use_cache and os.path.isfile(path):
        probe = ClassProbe.load(path)
        if probe.fingerprint == key:
            return probe
    probe = fit_probe_on_features(features.features, source.labels, **settings)
    probe.class_names, probe.feature_id, probe.fingerprint = source.class_names, extractor.feature_id, key
    if use_cache:
        probe.save(path)
    return probe


def _labelled_features(
    source: ImageSource,
    extractor: InceptionExtractor,
    features: FeatureStats | None,
    cache_dir: str | None,
    use_cache: bool,
) -> FeatureStats:
    if features is None:
        return reference_stats(source, extractor, cache_dir=cache_dir, use_cache=use_cache)
    expected = stats_fingerprint(source, extractor.feature_id)
    if features.features is None or features.fingerprint != expected:
        raise ValueError(
            f"`features` are not the features of {source.description} ({source.num_images} images) with this "
            "network: pass the statistics `reference_stats` returned for the same images, resolution and "
            "max_images, or leave `features` out."
        )
    return features
