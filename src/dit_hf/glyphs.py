# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""A small real-looking development data set that ships offline: characters rendered from the fonts inside
matplotlib's wheel (DejaVu, STIX and Computer Modern: 21 faces), each drawn with its own random affine map (rotation,
shear, scale, translation), stroke width (dilation or erosion), elastic distortion (Simard et al. 2003) and, for the
RGB variant, a random glyph colour on a random two-colour gradient background with a little texture.

It stands in for the small 28-32 px labelled sets users bring (handwriting, icons, characters) without downloading
any: the classes differ by shape, and within a class the faces, strokes and distortions differ as handwriting does.

    dit-hf make-glyphs OUT_DIR --resolution 28 --channels 1      # OUT_DIR/train/<class>/*.png and OUT_DIR/test/...

The train and test splits are drawn from disjoint seeds. `fit_image_classifier` (in `dit_hf.evaluation`) fitted on
the train split is the judge of generated samples.
"""

import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Ten shapes that no face confuses (no l/I/1, O/0, S/5 pairs).
DEFAULT_CLASSES = ("A", "b", "C", "d", "E", "F", "g", "H", "K", "R")
# Text faces in matplotlib's mpl-data/fonts/ttf (symbol, size-variant and the letterless Display faces excluded).
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmti10.ttf",
    "cmtt10.ttf",
)
# Seeds of the two splits: disjoint streams, so no test image is a train image.
SPLIT_SEEDS = {"train": 0, "test": 1}
OVERSAMPLE = 4  # glyphs are drawn at 4x the resolution and box-filtered down (anti-aliased edges)


def font_paths() -> list[str]:
    """The font files used, from the installed matplotlib (an install requirement of dit-hf)."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib is an install requirement
        raise ImportError("The glyphs data set renders matplotlib's fonts: `pip install matplotlib`.") from err
    folder = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    paths = [os.path.join(folder, name) for name in FONT_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"matplotlib's fonts are incomplete (missing {missing[:3]}); reinstall matplotlib.")
    return paths


def _glyph_mask(char: str, font: ImageFont.FreeTypeFont, size: int, rng: np.random.Generator) -> Image.Image:
    """The character, white on black, at `size` px (the oversampled canvas), randomly placed, turned and sheared."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), char, fill=255, font=font)
    # Affine map, inverted for PIL (output -> input): scale, rotation, shear and translation about the centre.
    scale = rng.uniform(0.75, 1.1)
    angle = math.radians(rng.uniform(-15, 15))
    shear = rng.uniform(-0.3, 0.3)
    shift = rng.uniform(-0.08, 0.08, size=2) * size
    forward = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    forward = scale * forward @ np.array([[1.0, shear], [0.0, 1.0]])
    inverse = np.linalg.inv(forward)
    centre = np.array([size / 2, size / 2])
    offset = centre - inverse @ (centre + shift)
    coefficients = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    return canvas.transform((size, size), Image.AFFINE, coefficients, resample=Image.BILINEAR)


def _stroke(mask: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Thicker or thinner strokes: a max (dilate) or min (erode) filter on the oversampled mask, or none."""
    width = int(rng.integers(-1, 4))  # -1: thin, 0: as drawn, 1..3: bolder
    if width > 0:
        return mask.filter(ImageFilter.MaxFilter(2 * width + 1))
    if width < 0:
        return mask.filter(ImageFilter.MinFilter(3))
    return mask


def _elastic(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Simard et al.'s elastic distortion: a smoothed random displacement field, in pixels of the final image."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    res = mask.shape[0]
    sigma = 4.0 * res / 28
    alpha = rng.uniform(8.0, 30.0) * res / 28
    dy = gaussian_filter(rng.uniform(-1, 1, mask.shape), sigma, mode="constant") * alpha
    dx = gaussian_filter(rng.uniform(-1, 1, mask.shape), sigma, mode="constant") * alpha
    rows, cols = np.meshgrid(np.arange(res), np.arange(res), indexing="ij")
    return map_coordinates(mask, [rows + dy, cols + dx], order=1, mode="constant", cval=0.0)


def _background(res: int, rng: np.random.Generator) -> np.ndarray:
    """A two-colour linear gradient in a random direction plus low-frequency texture, (res, res, 3) in [0, 1]."""
    from scipy.ndimage import gaussian_filter

    c0, c1 = rng.uniform(0, 1, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    rows, cols = np.meshgrid(np.linspace(-0.5, 0.5, res), np.linspace(-0.5, 0.5, res), indexing="ij")
    ramp = (np.cos(angle) * cols + np.sin(angle) * rows + 0.5).clip(0, 1)[..., None]
    texture = gaussian_filter(rng.normal(size=(res, res)), 1.5 * res / 32)
    texture = 0.08 * texture / (texture.std() + 1e-8)
    return (c0 * (1 - ramp) + c1 * ramp + texture[..., None]).clip(0, 1)


def _glyph_colour(background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour that stands out from the background's mean brightness (the glyph must stay readable)."""
    mean = background.mean()
    for _ in range(100):
        colour = rng.uniform(0, 1, size=3)
        if abs(colour.mean() - mean) > 0.4:
            return colour
    return np.full(3, 0.0 if mean > 0.5 else 1.0)


def render_glyph(
    char: str, font: ImageFont.FreeTypeFont, resolution: int, channels: int, rng: np.random.Generator
) -> np.ndarray:
    """One distorted character: (res, res) uint8 (white on black) or (res, res, 3) uint8 (colour on a background)."""
    size = resolution * OVERSAMPLE
    mask = _stroke(_glyph_mask(char, font, size, rng), rng)
    mask = mask.resize((resolution, resolution), resample=Image.BOX)
    alpha = _elastic(np.asarray(mask, dtype=np.float64) / 255.0, rng).clip(0, 1)
    if channels == 1:
        return np.round(alpha * 255).astype(np.uint8)
    background = _background(resolution, rng)
    colour = _glyph_colour(background, rng)
    image = background * (1 - alpha[..., None]) + colour * alpha[..., None]
    return np.round(image.clip(0, 1) * 255).astype(np.uint8)


def render_glyphs(
    num_images: int,
    resolution: int = 28,
    channels: int = 1,
    split: str = "train",
    classes: tuple[str, ...] = DEFAULT_CLASSES,
) -> tuple[np.ndarray, np.ndarray]:
    """`num_images` class-balanced images (`(N, res, res)` or `(N, res, res, 3)` uint8) and their labels (N,).

    Deterministic for a given split, resolution and channel count; the splits use disjoint random streams.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}.")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 px, got {resolution}.")
    paths = font_paths()
    fonts = [ImageFont.truetype(p, size=int(resolution * OVERSAMPLE * 0.7)) for p in paths]
    rng = np.random.default_rng([SPLIT_SEEDS[split], resolution, channels])
    labels = np.arange(num_images) % len(classes)
    images = np.stack(
        [render_glyph(classes[c], fonts[rng.integers(len(fonts))], resolution, channels, rng) for c in labels]
    )
    return images, labels


def write_image_folder(images: np.ndarray, labels: np.ndarray, folder: str, classes: tuple[str, ...]) -> None:
    """An imagefolder: `folder/<class name>/<index>.png` (class folder names are safe on case-insensitive disks)."""
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(folder, class_folder_name(c, name)), exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        name = class_folder_name(int(label), classes[int(label)])
        Image.fromarray(image).save(os.path.join(folder, name, f"{i:05d}.png"))


def class_folder_name(index: int, char: str) -> str:
    # "b" and "B" would collide on macOS and Windows disks: prefix the class index.
    return f"{index}_{char}"


def make_glyphs_dataset(
    output_dir: str,
    resolution: int = 28,
    channels: int = 1,
    num_train: int = 4000,
    num_test: int = 1000,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
) -> dict[str, str]:
    """Write `output_dir/train` and `output_dir/test` image folders; returns their paths."""
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(f"{output_dir!r} is not empty: choose a new folder for the glyphs data set.")
    paths = {}
    for split, n in (("train", num_train), ("test", num_test)):
        images, labels = render_glyphs(n, resolution, channels, split, classes)
        paths[split] = os.path.join(output_dir, split)
        write_image_folder(images, labels, paths[split], classes)
    return paths
