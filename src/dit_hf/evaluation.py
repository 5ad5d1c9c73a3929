"""Sample quality measures that run offline."""

import numpy as np
import PIL.Image


def fit_digits_classifier():
    """An RBF support-vector classifier fitted on all of scikit-learn's digits (8×8, values 0..16).

    It scores about 99% on held-out real digits, so it serves as a judge of class-conditional samples.
    """
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(gamma=0.001, C=10.0).fit(digits.data, digits.target)


def images_to_digit_features(images) -> np.ndarray:
    """PIL images or NHWC/NHW arrays in [0, 1] -> (N, 64) features on the digits' 0..16 scale."""
    features = []
    for image in images:
        if not isinstance(image, PIL.Image.Image):
            array = np.asarray(image, dtype=np.float32)
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
