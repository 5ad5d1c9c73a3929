"""Sample quality measures that run offline, and sampling many images in bounded batches."""

import numpy as np
import PIL.Image
import torch

from .metrics import inception_score


def fit_digits_classifier():
    """An RBF support-vector classifier fitted on all of scikit-learn's digits (8×8, values 0..16).

    It scores about 99% on held-out real digits, so it serves as a judge of class-conditional samples.
    """
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(gamma=0.001, C=10.0).fit(digits.data, digits.target)


def fit_digits_probability_classifier():
    """The same SVM with class probabilities: Platt-scaled decision values, calibrated by 5-fold cross-validation.

    Its argmax scores about 99% on held-out real digits. Deterministic (unshuffled stratified folds).
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    calibrated = CalibratedClassifierCV(SVC(gamma=0.001, C=10.0), method="sigmoid", cv=5, ensemble=False)
    return calibrated.fit(digits.data, digits.target)


def images_to_digit_features(images) -> np.ndarray:
    """PIL images, or NHWC/NHW arrays (floats in [0, 1] or uint8) -> (N, 64) features on the digits' 0..16 scale."""
    features = []
    for image in images:
        if not isinstance(image, PIL.Image.Image):
            array = np.asarray(image)
            array = array / np.float32(255) if array.dtype == np.uint8 else array.astype(np.float32)
            if array.ndim == 3:
                array = array.mean(axis=-1)
            image = PIL.Image.fromarray((array.clip(0, 1) * 255).round().astype(np.uint8), mode="L")
        image = image.convert("L")
        if image.size != (8, 8):
            image = image.resize((8, 8), resample=PIL.Image.BOX)
        features.append(np.asarray(image, dtype=np.float32).reshape(-1) * 16.0 / 255.0)
    return np.stack(features)


def digits_accuracy(images, labels, classifier=None) -> float:
    """Fraction of generated digit images that the classifier assigns to the class they were sampled for."""
    if len(images) != len(labels):
        raise ValueError(f"Got {len(images)} images but {len(labels)} labels.")
    if len(images) == 0:
        raise ValueError("No images to classify.")
    classifier = classifier or fit_digits_classifier()
    predicted = classifier.predict(images_to_digit_features(images))
    return float(np.mean(predicted == np.asarray(labels)))


def digits_probabilities(images, classifier=None) -> np.ndarray:
    """(N, 10) class probabilities of digit images from [`fit_digits_probability_classifier`] (or `classifier`)."""
    if len(images) == 0:
        raise ValueError("No images to classify.")
    classifier = classifier or fit_digits_probability_classifier()
    return classifier.predict_proba(images_to_digit_features(images))


def digits_classifier_score(images, classifier=None, splits: int = 10, seed: int | None = 0) -> tuple[float, float]:
    """The Inception Score formula with the digits classifier in place of Inception: `(mean, std)` over splits.

    At most 10 (confident predictions spread evenly over the 10 digits). The calibrated classifier is not fully
    confident even on real digits, so compare with the score of real digits rather than with 10. With few images
    (e.g. 80), use `splits=1`: the score of a split cannot exceed its number of images.
    """
    return inception_score(probs=digits_probabilities(images, classifier), splits=splits, seed=seed)


def sample_in_batches(
    pipe, class_labels: list | None = None, num_images: int | None = None, batch_size: int = 64, **call_kwargs
) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
    """Run `pipe` on at most `batch_size` images per call: `class_labels` (one image each), or `num_images` from
    an unconditional model. `call_kwargs` (generator, guidance, steps, output_type...) go to every call; one
    generator is carried through them, so the result is fixed by its seed and `batch_size`.

    Memory stays bounded by `batch_size` whatever the number of images: a grid of every ImageNet class × 8 samples
    would otherwise push 16,000 images (8,000 with their unconditional copies) through one forward.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
    total = len(class_labels) if class_labels is not None else num_images
    if total is None:
        raise ValueError("Pass `class_labels` for a class-conditional model or `num_images` for an unconditional one.")
    chunks = []
    for start in range(0, total, batch_size):
        n = min(batch_size, total - start)
        if class_labels is not None:
            out = pipe(class_labels=list(class_labels[start : start + n]), **call_kwargs)
        else:
            out = pipe(num_images=n, **call_kwargs)
        chunks.append(out.images)
    if isinstance(chunks[0], list):
        return [image for chunk in chunks for image in chunk]
    if isinstance(chunks[0], np.ndarray):
        return np.concatenate(chunks)
    return torch.cat(chunks)
