# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Image data for class-conditional DiT training: loading, column and label checks, corrupt-file screening, and the
ADM/DiT preprocessing (center crop, horizontal flip, scale to [-1, 1]).

The trainer calls these in this order, each one mapping onto its command-line options::

    ds = load_image_dataset(args.dataset_name, args.train_data_dir, args.dataset_config_name)
    image_column, label_column = resolve_columns(ds, args.image_column, args.label_column)
    num_classes = args.num_classes if args.num_classes is not None else infer_num_classes(ds, label_column)
    check_labels(ds, label_column, num_classes)
    ds = select_subset(ds, args.max_train_samples, args.seed)
    ds, bad = drop_unreadable_images(ds, image_column, args.max_bad_image_fraction, num_proc=args.num_workers)
    transform = build_transform(args.resolution, args.center_crop, args.random_flip)
    train_dataset = ImageLabelDataset(ds, image_column, label_column, transform)
"""

import io
import itertools
import os

import datasets
import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from .collate import whole_batch_collate
from .training import flip_flags

# Columns tried, in order, when --image_column / --label_column are not given (the names used by Hub image datasets).
DEFAULT_IMAGE_COLUMNS = ("image", "img")
DEFAULT_LABEL_COLUMNS = ("label", "labels", "class", "class_label")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """The ADM / DiT center crop: a square of side `image_size` from the middle of the image.

    Large images are first halved with a BOX filter while the short side is at least `2 * image_size` (cheap
    anti-aliasing for big downscales, as in ADM's `image_datasets.py`), then BICUBIC-resized so the short side equals
    `image_size`; small images are upsampled the same way.
    """
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)
    left = (pil_image.width - image_size) // 2
    top = (pil_image.height - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))


def resize_center_crop(pil_image: Image.Image, image_size: int) -> Image.Image:
    """One BICUBIC resize of the short side to `image_size`, then the middle square (no BOX halving)."""
    scale = image_size / min(pil_image.size)
    size = tuple(max(image_size, round(side * scale)) for side in pil_image.size)
    pil_image = pil_image.resize(size, resample=Image.BICUBIC)
    left = (pil_image.width - image_size) // 2
    top = (pil_image.height - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))


def load_digits_dataset() -> datasets.Dataset:
    """scikit-learn's handwritten digits (1,797 8×8 grayscale images, classes 0-9) as a `datasets.Dataset`.

    It ships inside scikit-learn, so the trainer can run with no download. Pixel values 0..16 are scaled to 0..255
    (`round(v * 255 / 16)`) and stored as "L" images in an "image" column; "label" is a `ClassLabel` of "0".."9".
    """
    from sklearn.datasets import load_digits  # imported here: only this default data set needs scikit-learn

    digits = load_digits()
    pixels = np.round(digits.images * 255 / 16).astype(np.uint8)  # (1797, 8, 8)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": digits.target.tolist()}, features=features
    )


def _contains_image_file(directory: str) -> bool:
    extensions = set(Image.registered_extensions())
    for _, _, files in os.walk(directory):
        if any(os.path.splitext(f)[1].lower() in extensions for f in files):
            return True
    return False


def _folder_labels(relative_paths: list[str], train_data_dir: str) -> list[str] | None:
    """The class folder of each image, or None when the images lie loose in one folder (unconditional).

    The root is the deepest folder holding every image (so a split folder like `train/`, or a single wrapper folder,
    is looked through); each subfolder of the root is a class, with its images found at any depth. Images both loose
    in the root and in subfolders are refused with the paths to fix.
    """
    parts = [path.split("/") for path in relative_paths]
    depth = 0  # leading folders shared by every image
    while all(len(p) > depth + 1 and p[depth] == parts[0][depth] for p in parts):
        depth += 1
    root = os.path.join(train_data_dir, *parts[0][:depth])
    parts = [p[depth:] for p in parts]
    loose = [p for p in parts if len(p) == 1]
    if len(loose) == len(parts):
        return None
    if loose:
        in_folder = next(p for p in parts if len(p) > 1)
        raise ValueError(
            f"--train_data_dir: {root!r} holds images directly (e.g. {loose[0][0]!r}) and class folders (e.g. "
            f"{in_folder[0]!r}/). Move the loose images into a class folder, or put every image directly in one "
            "folder to train unconditionally."
        )
    return [p[0] for p in parts]


def label_by_top_folder(ds: datasets.Dataset, train_data_dir: str, image_column: str = "image") -> datasets.Dataset:
    """Give an imagefolder data set one class per top-level folder of `train_data_dir`, images found at any depth.

    The "imagefolder" builder names each image's class after its parent folder, and drops every label when images
    lie at different depths (`cat/a.png` next to `cat/more/b.png`) or share a parent name (`cat/images/a.png`,
    `dog/images/b.png`): the run would silently train unconditionally. Here the class is the top-level folder,
    whatever lies below it; folders shared by every image (a `train/` split folder, one wrapper folder) are looked
    through. A data set with a metadata file (other columns than image and label) is left as it is.
    """
    if set(ds.column_names) - {image_column, "label"}:
        return ds
    root = os.path.realpath(train_data_dir)
    raw = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    relative = [os.path.relpath(os.path.realpath(v["path"]), root).replace(os.sep, "/") for v in raw[image_column]]
    labels = _folder_labels(relative, train_data_dir)
    if labels is None:
        return ds.remove_columns("label") if "label" in ds.column_names else ds
    names = sorted(set(labels))
    index = {name: i for i, name in enumerate(names)}
    ids = [index[label] for label in labels]
    feature = datasets.ClassLabel(names=names)
    if "label" in ds.column_names and ds.features["label"] == feature and list(ds["label"]) == ids:
        return ds  # the usual flat layout: imagefolder's labels already (keeps the data set's fingerprint)
    if "label" in ds.column_names:
        ds = ds.remove_columns("label")
    return ds.add_column("label", ids, feature=feature)


def is_saved_dataset(path: str) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk` (one split; a saved DatasetDict loads with load_dataset)."""
    return os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))


def load_image_dataset(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load the training images.

    Args:
        dataset_name (`str`, *optional*):
            A Hub dataset id or a local dataset path/script, passed to `datasets.load_dataset`.
        train_data_dir (`str`, *optional*):
            A local folder read with the "imagefolder" builder: `train_data_dir/<class>/.../<image>` gives a
            `ClassLabel` "label" column named after the top-level subfolders, images found at any depth below them
            ([`label_by_top_folder`]). Images directly in the folder, or a single class subfolder, give no label
            column (unconditional training); a mix of both is refused.
        dataset_config_name (`str`, *optional*):
            The configuration of `dataset_name`.
        split (`str`, defaults to `"train"`):
            The split to load.
        cache_dir (`str`, *optional*):
            Where `datasets` caches downloads and Arrow files.

    With neither `dataset_name` nor `train_data_dir`, returns [`load_digits_dataset`].
    """
    if dataset_name is not None and train_data_dir is not None:
        raise ValueError(
            f"Got both --dataset_name {dataset_name!r} and --train_data_dir {train_data_dir!r}; pass only one of them."
        )
    if dataset_config_name is not None and dataset_name is None:
        raise ValueError(
            f"--dataset_config_name {dataset_config_name!r} needs --dataset_name; pass the dataset it configures."
        )
    if dataset_name is not None and is_saved_dataset(dataset_name):
        # `Dataset.save_to_disk` writes a single split that `load_dataset` refuses; it needs `load_from_disk`.
        ds = datasets.load_from_disk(dataset_name)
        where = f"--dataset_name {dataset_name!r} (a saved Dataset)"
    elif dataset_name is not None:
        ds = datasets.load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
        where = f"--dataset_name {dataset_name!r} (config {dataset_config_name!r}, split {split!r})"
    elif train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(
                f"--train_data_dir {train_data_dir!r} is not a directory; pass a folder laid out as "
                "<train_data_dir>/<class name>/<image file>."
            )
        try:
            ds = datasets.load_dataset("imagefolder", data_dir=train_data_dir, split=split, cache_dir=cache_dir)
        except (FileNotFoundError, ValueError) as err:
            # datasets reports an image-less folder as "no data files" or "corresponds to no data"; say it plainly.
            if not _contains_image_file(train_data_dir):
                raise ValueError(
                    f"--train_data_dir {train_data_dir!r} contains no image files; put images in "
                    "<train_data_dir>/<class name>/ subfolders."
                ) from err
            raise
        ds = label_by_top_folder(ds, train_data_dir)
        where = f"--train_data_dir {train_data_dir!r} (split {split!r})"
    else:
        ds = load_digits_dataset()
        where = "the built-in scikit-learn digits"
    if len(ds) == 0:
        raise ValueError(f"The training data from {where} has 0 rows; point it at a non-empty dataset or split.")
    return ds


# PIL modes of one-channel images (the small-data recipe trains these with --image_channels 1).
GRAYSCALE_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def first_image(
    dataset_name: str | None,
    train_data_dir: str | None,
    dataset_config_name: str | None = None,
    image_column: str | None = None,
) -> Image.Image | None:
    """The first image of the training data (sorted file order for a folder), to pick a recipe by; None if unreadable.

    A folder is walked without building the dataset; a `datasets` source is loaded (and cached) as training will.
    """
    if train_data_dir is not None:
        extensions = set(Image.registered_extensions())
        for root, dirs, files in os.walk(train_data_dir):
            dirs.sort()
            for name in sorted(files):
                if os.path.splitext(name)[1].lower() in extensions:
                    try:
                        with Image.open(os.path.join(root, name)) as image:
                            image.load()
                            return image
                    except OSError:
                        continue
        return None
    if dataset_name is None:
        return None
    ds = load_image_dataset(dataset_name, None, dataset_config_name)
    column, _ = resolve_columns(ds, image_column, None)
    image = ds[0][column]
    return image if isinstance(image, Image.Image) else None


def _column_summary(ds: datasets.Dataset) -> str:
    return ", ".join(f"{name!r} ({type(feature).__name__})" for name, feature in ds.features.items())


def resolve_columns(
    ds: datasets.Dataset, image_column: str | None = None, label_column: str | None = None
) -> tuple[str, str | None]:
    """Pick the image and label columns; returns `(image_column, label_column)`.

    Defaults: the image column is "image" or "img" when that is an `Image` feature, else the first `Image` feature;
    the label column is "label", "labels", "class" or "class_label", else the first `ClassLabel` feature, else `None`
    (the data has no labels: train unconditionally). A trainer that wants unconditional training on labelled data
    simply ignores the returned label column.
    """
    features = ds.features
    if image_column is None:
        image_features = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        if not image_features:
            raise ValueError(
                f"Found no image column; the dataset has columns {_column_summary(ds)}. "
                "Pass the column that holds the images as --image_column."
            )
        preferred = [name for name in DEFAULT_IMAGE_COLUMNS if name in image_features]
        image_column = (preferred or image_features)[0]
    elif image_column not in features:
        raise ValueError(
            f"--image_column {image_column!r} is not a column of the dataset; available columns: "
            f"{_column_summary(ds)}. Pass one of them."
        )
    if not isinstance(features[image_column], datasets.Image):
        raise ValueError(
            f"--image_column {image_column!r} holds {features[image_column]}, not images; available columns: "
            f"{_column_summary(ds)}. Pass a column with an Image feature."
        )

    if label_column is None:
        named = [name for name in DEFAULT_LABEL_COLUMNS if name in features]
        class_labels = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
        label_column = (named or class_labels or [None])[0]
    elif label_column not in features:
        raise ValueError(
            f"--label_column {label_column!r} is not a column of the dataset; available columns: "
            f"{_column_summary(ds)}. Pass one of them."
        )
    return image_column, label_column


def _integer_labels(ds: datasets.Dataset, label_column: str) -> list:
    """The distinct values of an integer or `ClassLabel` column; ValueError for any other column type."""
    feature = ds.features[label_column]
    if not isinstance(feature, datasets.ClassLabel) and not (
        isinstance(feature, datasets.Value) and pa.types.is_integer(feature.pa_type)
    ):
        raise ValueError(
            f"--label_column {label_column!r} holds {feature}, but class labels must be integers or a ClassLabel. "
            "Pick an integer/ClassLabel column, or convert this one (e.g. `ds.class_encode_column(...)`)."
        )
    return ds.unique(label_column)


def class_names(ds: datasets.Dataset, label_column: str | None) -> list[str] | None:
    """Names of the classes, indexed by label id; `None` without a label column.

    A `ClassLabel` column gives its names. A plain integer column gives `["0", "1", ..., str(max_label)]`: one entry
    per id up to the largest label, so `names[i]` is the name of label `i` even when some ids never occur.
    """
    if label_column is None:
        return None
    feature = ds.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    largest = max((v for v in _integer_labels(ds, label_column) if v is not None), default=-1)
    if largest < 0:  # e.g. a test split whose labels are all -1: guessing 0 classes would silently drop conditioning
        raise ValueError(
            f"--label_column {label_column!r} has no non-negative labels; train on a labelled split, or leave the "
            "labels out by setting --num_classes 0."
        )
    return [str(i) for i in range(largest + 1)]


def infer_num_classes(ds: datasets.Dataset, label_column: str | None) -> int | None:
    """The number of classes: `ClassLabel.num_classes`, or largest integer label + 1; `None` when unconditional.

    Plain integer labels must form a dense range 0..K-1: a gap (or one stray huge value) would otherwise build a
    model with an embedding row, and a row of sample grids, for every id up to the largest. ValueError with the fix.
    """
    if label_column is not None and not isinstance(ds.features[label_column], datasets.ClassLabel):
        present = {v for v in _integer_labels(ds, label_column) if v is not None and v >= 0}
        largest = max(present, default=-1)
        if len(present) <= largest:  # a gap below the largest id; checked before any per-id list is built
            missing = list(itertools.islice((i for i in range(largest) if i not in present), 11))
            raise ValueError(
                f"--label_column {label_column!r} has {len(present)} distinct labels, but its largest is {largest}: "
                f"ids {missing[:10]}{' ...' if len(missing) > 10 else ''} never occur, and the model would get "
                f"{largest + 1} classes. Remap the labels to 0..{len(present) - 1} (e.g. "
                f"`ds.class_encode_column({label_column!r})`, which also keeps their names), or pass "
                f"--num_classes {largest + 1} if the missing ids are real classes absent from this data."
            )
    names = class_names(ds, label_column)
    return None if names is None else len(names)


def check_labels(ds: datasets.Dataset, label_column: str | None, num_classes: int | None) -> None:
    """Raise ValueError unless every label is an integer in `[0, num_classes)`.

    Nothing to check without a label column or with `num_classes == 0` (unconditional training ignores the labels).
    """
    if label_column is None or num_classes == 0:
        return
    if num_classes is None or num_classes < 0:
        raise ValueError(
            f"--label_column {label_column!r} is set but num_classes is {num_classes}; set --num_classes to the "
            "number of classes (0 trains unconditionally)."
        )
    values = _integer_labels(ds, label_column)
    if None in values:
        raise ValueError(
            f"--label_column {label_column!r} has missing (null) labels; fill them in or train on a labelled split."
        )
    bad = sorted(v for v in values if not 0 <= v < num_classes)
    if bad:
        if bad[-1] >= num_classes:
            fix = f"Set --num_classes to at least {bad[-1] + 1} if these are real classes, or fix the labels."
        else:  # -1 is how ClassLabel marks a missing label, e.g. in a test split
            fix = "Labels must be non-negative: fix them, or train on a labelled split (-1 often means unlabelled)."
        raise ValueError(
            f"--label_column {label_column!r} has labels {bad[:10]}{' ...' if len(bad) > 10 else ''} outside "
            f"[0, {num_classes}). {fix}"
        )


def _unreadable_in_batch(batch: dict, indices: list[int], column: str) -> dict:
    found = []
    for index, value in zip(indices, batch[column]):
        if value is None or (value["bytes"] is None and value["path"] is None):
            found.append(f"row {index} (no image)")
            continue
        where = value["path"] if value["bytes"] is None else f"row {index} ({value['path'] or 'embedded bytes'})"
        try:
            with Image.open(value["path"] if value["bytes"] is None else io.BytesIO(value["bytes"])) as image:
                image.load()  # decodes the pixels: catches truncated files that `Image.open` alone accepts
        except Exception:  # whatever PIL raises (OSError, SyntaxError, DecompressionBombError...), it is unusable
            found.append(where)
        else:
            found.append(None)
    return {"unreadable": found}


def find_unreadable_images(
    ds: datasets.Dataset, image_column: str, num_proc: int | None = None
) -> list[tuple[int, str]]:
    """`(row index, path or description)` of every image PIL cannot decode; `num_proc` processes share the work.

    Every image is fully decoded once, so on a large dataset this costs about one epoch of image decoding.
    """
    raw = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    # keep_in_memory / no cache: the result is one short column, and a cached answer would go stale once the user
    # repairs a file (imagefolder fingerprints the paths, not the file contents).
    flags = raw.map(
        _unreadable_in_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"column": image_column},
        remove_columns=[image_column],
        num_proc=num_proc,
        keep_in_memory=True,
        load_from_cache_file=False,
        desc="Checking images",
    )
    return [(index, where) for index, where in enumerate(flags["unreadable"]) if where is not None]


def drop_unreadable_images(
    ds: datasets.Dataset,
    image_column: str,
    max_bad_fraction: float = 0.01,
    num_proc: int | None = None,
    unreadable: list[tuple[int, str]] | None = None,
) -> tuple[datasets.Dataset, list[tuple[int, str]]]:
    """Remove the rows whose image PIL cannot decode; returns `(clean dataset, [(row index, path), ...])`.

    Raises ValueError when more than `max_bad_fraction` of the rows are unreadable: that many broken files usually
    means a wrong path or format rather than a few bad downloads. `unreadable`, a result of `find_unreadable_images`
    from an earlier scan of the same rows, skips the scan (see `dit_hf.image_checks`).
    """
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"--max_bad_image_fraction must lie in [0, 1], got {max_bad_fraction}.")
    bad = unreadable if unreadable is not None else find_unreadable_images(ds, image_column, num_proc=num_proc)
    if not bad:
        return ds, bad
    fraction = len(bad) / len(ds)
    if fraction > max_bad_fraction:
        listing = "\n  ".join(where for _, where in bad[:10])
        raise ValueError(
            f"{len(bad)} of {len(ds)} images ({fraction:.2%}) cannot be decoded, more than --max_bad_image_fraction "
            f"{max_bad_fraction} allows. The first {min(len(bad), 10)}:\n  {listing}\n"
            "Repair or delete these files, or raise --max_bad_image_fraction to skip them."
        )
    keep = np.ones(len(ds), dtype=bool)
    keep[[index for index, _ in bad]] = False
    return ds.select(np.flatnonzero(keep)), bad


def integer_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit ("I;16*") or 32-bit ("I") integer image as 8-bit "L", scaled rather than clipped at 255 as PIL does.

    16-bit modes scale 0..65535 to 0..255. A 32-bit "I" image carries no bit depth: PIL opens 16-bit PNG and TIFF
    files as "I" in many versions, so values up to 65535 are read as 16-bit, up to 255 as 8-bit, and larger ones as
    the full unsigned 32-bit range; negative values become 0.
    """
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        top = 65535
    else:
        peak = values.max(initial=0)
        top = 255 if peak <= 255 else 65535 if peak <= 65535 else 2**32 - 1
    return Image.fromarray((values.clip(0, top) * (255 / top)).round().astype(np.uint8), mode="L")


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert to "RGB" or "L"; transparent pixels are composited on white (the usual background of icons/renders)."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = integer_to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == mode else image.convert(mode)


class ImageTransform:
    """PIL image -> float tensor `(channels, resolution, resolution)` in [-1, 1]. Build it with [`build_transform`].

    A class rather than a closure so DataLoader workers started with "spawn" can pickle it.
    """

    def __init__(
        self, resolution: int, center_crop: bool = True, random_flip: bool = True, channels: int = 3, seed: int = 0
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
        if resolution < 1:
            raise ValueError(f"--resolution must be a positive number of pixels, got {resolution}.")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.channels = channels
        self.seed = seed

    def crop(self, image: Image.Image) -> np.ndarray:
        """The deterministic part: converted, resized and cropped uint8 pixels `(resolution, resolution, channels)`."""
        image = to_mode(image, "RGB" if self.channels == 3 else "L")
        crop = center_crop_arr if self.center_crop else resize_center_crop
        return np.array(crop(image, self.resolution), dtype=np.uint8).reshape(  # a writable copy, for torch
            self.resolution, self.resolution, self.channels
        )

    @staticmethod
    def normalize(pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (any layout) -> float32 in [-1, 1]."""
        return pixels.float() / 127.5 - 1.0

    def flips(self, indices) -> torch.Tensor:
        """Bool `(len(indices),)`: which of these samples to flip, a function of (seed, epoch, index) alone."""
        if not self.random_flip:
            return torch.zeros(len(indices), dtype=torch.bool)
        return flip_flags(self.seed, indices)

    def __call__(self, image: Image.Image, flip: bool = False) -> torch.Tensor:
        """The image as `(C, R, R)` floats, mirrored left-right if `flip` (see [`flips`] for the random choice)."""
        pixels = self.normalize(torch.from_numpy(self.crop(image)).permute(2, 0, 1).contiguous())  # (C, R, R)
        return pixels.flip(-1) if flip else pixels

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(resolution={self.resolution}, center_crop={self.center_crop}, "
            f"random_flip={self.random_flip}, channels={self.channels}, seed={self.seed})"
        )


def build_transform(
    resolution: int, center_crop: bool, random_flip: bool, channels: int = 3, seed: int = 0
) -> ImageTransform:
    """The training preprocessing: PIL image -> float tensor `(channels, resolution, resolution)` in [-1, 1].

    Args:
        resolution (`int`): side of the square output.
        center_crop (`bool`):
            `True`: ADM/DiT's [`center_crop_arr`] (BOX halving, then BICUBIC). `False`: a single BICUBIC resize of the
            short side, then the same center square. Both crop the center: DiT trains on center crops, and a random
            crop would move objects relative to the class they are conditioned on.
        random_flip (`bool`): flip left-right with probability 0.5, decided per (seed, epoch, sample index) by
            [`~dit_hf.training.flip_flags`]; the data sets below read the epoch from the sampler's indices.
        channels (`int`, defaults to 3): 3 converts to RGB, 1 to grayscale ("L"); transparency goes on white.
        seed (`int`, defaults to 0): the run's seed, which fixes the flips.
    """
    return ImageTransform(resolution, center_crop=center_crop, random_flip=random_flip, channels=channels, seed=seed)


class ImageLabelDataset(torch.utils.data.Dataset):
    """A torch view of a `datasets.Dataset`: item `i` is `{"pixel_values": (C, R, R) float, "class_labels": long}`.

    "class_labels" is absent when `label_column` is `None` (unconditional). Only the two columns are kept, so other
    image columns are never decoded; the underlying Arrow table pickles cheaply into DataLoader workers.
    """

    def __init__(
        self,
        ds: datasets.Dataset,
        image_column: str,
        label_column: str | None,
        transform: ImageTransform,
    ):
        columns = [image_column] if label_column is None else [image_column, label_column]
        self.ds = ds.select_columns(columns).with_format(None)
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.ds[int(index)]
        flip = bool(self.transform.flips([index])[0])
        item = {"pixel_values": self.transform(row[self.image_column], flip=flip)}
        if self.label_column is not None:
            item["class_labels"] = torch.tensor(row[self.label_column], dtype=torch.long)
        return item


def physical_memory_bytes() -> int | None:
    """Installed RAM, where the platform reports it (Linux and macOS); None elsewhere."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


class CachedImages(torch.utils.data.Dataset):
    """`--cache_images`: every image of an [`ImageLabelDataset`] decoded, converted and cropped once, kept in RAM as
    uint8 `(N, C, R, R)`; the random flip is still chosen per item and epoch.

    Items are exactly those of the wrapped dataset (same float values, same flips).
    DataLoader calls `__getitems__` with a batch's indices and gets the whole batch from one gather; build it with
    `collate_fn=CachedImages.collate`. Refused, with the size, when the pixels would take over half of the RAM.
    """

    def __init__(self, dataset: ImageLabelDataset, chunk_size: int = 512, max_fraction_of_ram: float = 0.5):
        transform = dataset.transform
        n, c, r = len(dataset), transform.channels, transform.resolution
        needed, ram = n * c * r * r, physical_memory_bytes()
        if ram is not None and needed > max_fraction_of_ram * ram:
            raise MemoryError(
                f"--cache_images needs {needed / 2**30:.1f} GiB for {n} images at {c}×{r}×{r}, more than half of this "
                f"machine's {ram / 2**30:.1f} GiB: drop --cache_images, or lower --resolution or --max_train_samples."
            )
        self.transform = transform
        self.pixels = torch.empty((n, c, r, r), dtype=torch.uint8)
        for start in range(0, n, chunk_size):
            images = dataset.ds[start : start + chunk_size][dataset.image_column]
            for offset, image in enumerate(images):
                self.pixels[start + offset] = torch.from_numpy(transform.crop(image)).permute(2, 0, 1)
        self.labels = None
        if dataset.label_column is not None:
            self.labels = torch.tensor(dataset.ds[dataset.label_column], dtype=torch.long)
        self.features = None

    def attach_features(self, features: torch.Tensor) -> None:
        """Per-image encoder features `(N, D, h, w)` (REPA targets), returned as `repa_features` with each item.

        Only for runs without random flips: a flipped image's features are not the flipped features."""
        if self.transform.random_flip:
            raise ValueError("Cached encoder features need a run without random flips (--no-random_flip).")
        if len(features) != len(self.pixels):
            raise ValueError(f"Got features for {len(features)} images, but {len(self.pixels)} are cached.")
        self.features = features

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels = self.transform.normalize(self.pixels[int(index)])
        item = {"pixel_values": pixels.flip(-1) if self.transform.flips([index])[0] else pixels}
        if self.labels is not None:
            item["class_labels"] = self.labels[index]
        if self.features is not None:
            item["repa_features"] = self.features[index]
        return item

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        pixels = self.transform.normalize(self.pixels[index])
        flips = self.transform.flips(indices)
        pixels[flips] = pixels[flips].flip(-1)
        batch = {"pixel_values": pixels}
        if self.labels is not None:
            batch["class_labels"] = self.labels[index]
        if self.features is not None:
            batch["repa_features"] = self.features[index]
        return batch

    collate = staticmethod(whole_batch_collate)


def select_subset(ds: datasets.Dataset, max_train_samples: int | None, seed: int | None = None) -> datasets.Dataset:
    """`--max_train_samples`: a seeded random subset of that many rows (the whole dataset when `None` or larger).

    Shuffle-then-select, as in the diffusers example trainers, so the same seed picks the same rows there.
    """
    if max_train_samples is None or max_train_samples >= len(ds):
        return ds
    if max_train_samples < 1:
        raise ValueError(f"--max_train_samples must be a positive number of rows, got {max_train_samples}.")
    return ds.shuffle(seed=seed).select(range(max_train_samples))


def check_resolution(resolution: int, patch_size: int, vae_scale_factor: int = 1) -> int:
    """Check that `resolution` splits into whole latent pixels and patches; returns the latent side length.

    The image goes through the VAE (downsampling by `vae_scale_factor`, 1 in pixel space) and is cut into
    `patch_size`² patches, so the side must be a multiple of `vae_scale_factor * patch_size`.
    """
    step = vae_scale_factor * patch_size
    if resolution < 1 or resolution % step != 0:
        below, above = resolution // step * step, (resolution // step + 1) * step
        nearest = f"{below} or {above}" if below > 0 else f"{above}"
        raise ValueError(
            f"--resolution {resolution} must be a positive multiple of {step} (VAE downsampling {vae_scale_factor} "
            f"× patch size {patch_size}); use {nearest}."
        )
    return resolution // vae_scale_factor
