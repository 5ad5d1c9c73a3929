"""Sample quality measures that run offline, and sampling many images in bounded batches."""

import math
import os

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


class SmallConvNet(torch.nn.Module):
    """Three 3×3 conv blocks and a linear head, for 8-64 px images: the judge of a small labelled data set."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        layers, c_in = [], channels
        for c_out in (width, 2 * width, 4 * width):
            layers += [
                torch.nn.Conv2d(c_in, c_out, 3, padding=1),
                torch.nn.BatchNorm2d(c_out),
                torch.nn.ReLU(),
                torch.nn.Conv2d(c_out, c_out, 3, padding=1),
                torch.nn.BatchNorm2d(c_out),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def images_to_tensor(images) -> torch.Tensor:
    """PIL images or NHW / NHWC arrays (uint8, or floats in [0, 1]) -> (N, C, H, W) float32 in [-1, 1]."""
    if len(images) and isinstance(images[0], PIL.Image.Image):
        images = np.stack([np.asarray(image) for image in images])
    array = np.asarray(images)
    array = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    if array.ndim == 3:
        array = array[..., None]
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous() * 2 - 1


class ImageClassifier:
    """A [`SmallConvNet`] fitted on real labelled images; `accuracy(images, labels)` scores generated samples.

    Trained with light augmentation (random shifts of up to 2 px) so that it judges shape, not exact placement.
    Deterministic for a given seed on the CPU.
    """

    def __init__(self, net: SmallConvNet, channels: int, resolution: int):
        self.net, self.channels, self.resolution = net.eval(), channels, resolution

    @classmethod
    def fit(cls, images, labels, epochs: int = 8, batch_size: int = 64, lr: float = 2e-3, seed: int = 0):
        x, y = images_to_tensor(images), torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if len(x) != len(y):
            raise ValueError(f"Got {len(x)} images but {len(y)} labels.")
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = SmallConvNet(x.shape[1], int(y.max()) + 1)
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * math.ceil(len(x) / batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                idx = order[start : start + batch_size]
                shifts = torch.randint(-2, 3, (2,), generator=generator).tolist()
                batch = torch.roll(x[idx], shifts=shifts, dims=(2, 3))
                loss = torch.nn.functional.cross_entropy(net(batch), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        return cls(net, x.shape[1], x.shape[-1])

    def save(self, path: str) -> None:
        """Weights and shape as one safetensors file (no pickle)."""
        from safetensors.torch import save_file

        meta = {"channels": str(self.channels), "resolution": str(self.resolution)}
        meta["num_classes"] = str(self.net.head.out_features)
        # Written aside and renamed: a crash mid-write never leaves a truncated file under `path`.
        temporary = f"{path}.{os.getpid()}.tmp"
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, temporary, metadata=meta)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str) -> "ImageClassifier":
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata()
            state = {k: f.get_tensor(k) for k in f.keys()}
        net = SmallConvNet(int(meta["channels"]), int(meta["num_classes"]))
        net.load_state_dict(state)
        return cls(net, int(meta["channels"]), int(meta["resolution"]))

    def _checked_tensor(self, images) -> torch.Tensor:
        x = images_to_tensor(images)
        if x.shape[1] != self.channels or x.shape[-1] != self.resolution:
            raise ValueError(
                f"The classifier was fitted on {self.channels}-channel {self.resolution} px images, got "
                f"{x.shape[1]}-channel {x.shape[-1]} px: resize or convert the samples."
            )
        return x

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> np.ndarray:
        x = self._checked_tensor(images)
        return torch.cat([self.net(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).numpy()

    @torch.no_grad()
    def features(self, images, batch_size: int = 256) -> np.ndarray:
        """The pooled features before the linear head, (N, 4 × width) float32: what a Fréchet distance compares."""
        x = self._checked_tensor(images)
        return torch.cat([self.net.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()

    def accuracy(self, images, labels) -> float:
        if len(images) != len(labels):
            raise ValueError(f"Got {len(images)} images but {len(labels)} labels.")
        if len(images) == 0:
            raise ValueError("No images to classify.")
        return float(np.mean(self.predict(images) == np.asarray(labels)))


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
