import pickle

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from dit_hf.data import (
    CachedImages,
    ImageLabelDataset,
    build_transform,
    center_crop_arr,
    check_labels,
    check_resolution,
    class_names,
    drop_unreadable_images,
    find_unreadable_images,
    infer_num_classes,
    label_by_top_folder,
    load_digits_dataset,
    load_image_dataset,
    resize_center_crop,
    resolve_columns,
    select_subset,
)
from dit_hf.training import EpochSampler, SampleIndex


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


@pytest.fixture
def image_folder(tmp_path):
    """Two classes, six small PNGs: RGB, grayscale, palette, and an RGBA one with a transparent left half."""
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.new("RGB", (20, 12), (255, 0, 0)).save(root / "cat" / "red.png")
    Image.new("L", (12, 12), 100).save(root / "cat" / "gray.png")
    Image.new("RGB", (9, 9), (0, 0, 255)).convert("P").save(root / "cat" / "palette.png")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, 8:, 3] = 255  # left half fully transparent (black underneath), right half opaque black
    Image.fromarray(rgba, mode="RGBA").save(root / "dog" / "half_transparent.png")
    Image.new("RGB", (10, 14), (0, 255, 0)).save(root / "dog" / "green.png")
    Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "dog" / "dark.png")
    return root


def load_folder(root, tmp_path):
    return load_image_dataset(train_data_dir=str(root), cache_dir=str(tmp_path / "hf_cache"))


def row_of(ds, filename):
    paths = [value["path"] for value in ds.cast_column("image", datasets.Image(decode=False))["image"]]
    return next(i for i, path in enumerate(paths) if path.endswith(filename))


def test_center_crop_arr_keeps_the_middle_of_a_wide_image():
    # 300 x 200 (W x H): red | green | blue vertical stripes, 100 px each.
    pixels = np.zeros((200, 300, 3), dtype=np.uint8)
    pixels[:, :100, 0] = pixels[:, 100:200, 1] = pixels[:, 200:, 2] = 255
    out = np.asarray(center_crop_arr(Image.fromarray(pixels), 64))
    # Halved once (150 x 100), resized to 96 x 64, then columns 16..79 kept: the middle 200 x 200 square of the
    # original, i.e. red x in [50, 100), green [100, 200), blue [200, 250).
    assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(out[32, 32], [0, 255, 0])
    np.testing.assert_array_equal(out[32, 4], [255, 0, 0])
    np.testing.assert_array_equal(out[32, 60], [0, 0, 255])
    assert (out[:, 20:44, 1] == 255).all()


def test_center_crop_arr_box_halving_equals_block_means():
    # 256 -> 64 is two BOX halvings and no resize: each output pixel is the mean of a 4 x 4 block.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(256, 256), dtype=np.uint8)
    out = np.asarray(center_crop_arr(Image.fromarray(pixels, mode="L"), 64)).astype(np.float64)
    block_means = pixels.reshape(64, 4, 64, 4).mean(axis=(1, 3))
    # PIL's fixed-point BOX filter rounds to uint8 after each halving: at most ~1 level off per halving.
    assert np.abs(out - block_means).max() <= 2.0 and np.abs(out - block_means).mean() < 1.0


def test_center_crop_arr_upsamples_tiny_images():
    pixels = np.full((3, 5), 40, dtype=np.uint8)
    pixels[1, 2] = 200  # the centre pixel
    out = np.asarray(center_crop_arr(Image.fromarray(pixels, mode="L"), 16))
    assert out.shape == (16, 16)
    assert out[8, 8] > 150 and abs(int(out[0, 0]) - 40) <= 2  # bicubic may ring slightly
    assert np.asarray(resize_center_crop(Image.fromarray(pixels, mode="L"), 16)).shape == (16, 16)


def test_digits_match_sklearn(digits):
    reference = load_digits()
    assert len(digits) == 1797
    assert digits.features["label"] == datasets.ClassLabel(names=[str(i) for i in range(10)])
    assert digits["label"] == reference.target.tolist()
    for i in (0, 17, 1796):
        image = digits[i]["image"]
        assert image.mode == "L" and image.size == (8, 8)
        np.testing.assert_array_equal(np.asarray(image), np.round(reference.images[i] * 255 / 16).astype(np.uint8))
    assert load_image_dataset()["label"][:5] == [0, 1, 2, 3, 4]
    assert class_names(digits, "label") == [str(i) for i in range(10)]
    assert infer_num_classes(digits, "label") == 10


def test_digits_grayscale_transform_is_exact(digits):
    # 8 -> 8: no resampling, so the tensor is exactly pixel / 127.5 - 1.
    transform = build_transform(8, center_crop=True, random_flip=False, channels=1)
    pixels = transform(digits[5]["image"])
    expected = torch.from_numpy(np.asarray(digits[5]["image"], dtype=np.float32)) / 127.5 - 1
    assert pixels.shape == (1, 8, 8)
    torch.testing.assert_close(pixels[0], expected, rtol=0, atol=0)


def test_image_folder_classes_and_transform(image_folder, tmp_path):
    ds = load_folder(image_folder, tmp_path)
    assert len(ds) == 6
    assert resolve_columns(ds, None, None) == ("image", "label")
    assert class_names(ds, "label") == ["cat", "dog"]
    assert infer_num_classes(ds, "label") == 2
    check_labels(ds, "label", 2)

    transform = build_transform(8, center_crop=True, random_flip=False)
    for i in range(len(ds)):
        pixels = transform(ds[i]["image"])
        assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
        assert pixels.min() >= -1 and pixels.max() <= 1

    gray = transform(ds[row_of(ds, "gray.png")]["image"])
    torch.testing.assert_close(gray, torch.full((3, 8, 8), 100 / 127.5 - 1))
    # 16 -> 8 is one exact BOX halving: transparent columns 0-3 become white (1.0), opaque black ones -1.0.
    rgba = transform(ds[row_of(ds, "half_transparent.png")]["image"])
    assert torch.equal(rgba[:, :, :4], torch.ones(3, 8, 4))
    assert torch.equal(rgba[:, :, 4:], -torch.ones(3, 8, 4))
    palette = transform(ds[row_of(ds, "palette.png")]["image"])
    torch.testing.assert_close(palette[:, 4, 4], torch.tensor([-1.0, -1.0, 1.0]))


def test_image_label_dataset_items_and_pickling(image_folder, tmp_path):
    ds = load_folder(image_folder, tmp_path)
    train = ImageLabelDataset(ds, "image", "label", build_transform(8, center_crop=False, random_flip=False))
    assert len(train) == 6
    item = train[row_of(ds, "green.png")]
    assert item["class_labels"].dtype == torch.long and item["class_labels"].item() == 1
    torch.testing.assert_close(item["pixel_values"][:, 4, 4], torch.tensor([-1.0, 1.0, -1.0]))
    clone = pickle.loads(pickle.dumps(train))
    assert torch.equal(clone[2]["pixel_values"], train[2]["pixel_values"])
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=6)))
    assert batch["pixel_values"].shape == (6, 3, 8, 8)
    assert sorted(batch["class_labels"].tolist()) == [0, 0, 0, 1, 1, 1]

    unconditional = ImageLabelDataset(ds, "image", None, build_transform(8, True, False))
    assert set(unconditional[0]) == {"pixel_values"}


def test_sixteen_bit_images_are_rescaled_not_clipped():
    pixels = np.zeros((4, 4), dtype=np.uint16)
    pixels[:, 2:] = 65535
    image = Image.fromarray(pixels)
    assert image.mode.startswith("I;16")
    out = build_transform(4, center_crop=True, random_flip=False)(image)
    assert torch.equal(out[:, :, :2], -torch.ones(3, 4, 2)) and torch.equal(out[:, :, 2:], torch.ones(3, 4, 2))


def test_resolve_columns_defaults_and_unknown_names():
    features = datasets.Features(
        {"caption": datasets.Value("string"), "img": datasets.Image(), "fine": datasets.ClassLabel(names=["a", "b"])}
    )
    ds = datasets.Dataset.from_dict(
        {"caption": ["x"], "img": [Image.new("RGB", (2, 2))], "fine": [1]}, features=features
    )
    assert resolve_columns(ds, None, None) == ("img", "fine")
    assert resolve_columns(ds.remove_columns("fine"), None, None) == ("img", None)
    with pytest.raises(ValueError, match=r"--image_column 'photo' is not a column.*'caption'.*'img'.*'fine'"):
        resolve_columns(ds, "photo", None)
    with pytest.raises(ValueError, match=r"--label_column 'target' is not a column.*'img'"):
        resolve_columns(ds, None, "target")
    with pytest.raises(ValueError, match=r"--image_column 'caption' holds .*string.*not images"):
        resolve_columns(ds, "caption", None)
    with pytest.raises(ValueError, match="Found no image column"):
        resolve_columns(ds.remove_columns("img"), None, None)


def test_label_checks(digits):
    with pytest.raises(ValueError, match=r"labels \[5, 6, 7, 8, 9\] outside \[0, 5\).*--num_classes to at least 10"):
        check_labels(digits, "label", 5)
    check_labels(digits, "label", 12)  # unused extra classes are fine

    ints = datasets.Dataset.from_dict({"y": [0, 3, 3, -1]})
    assert class_names(ints.select([0, 1]), "y") == ["0", "1", "2", "3"]  # indexed by id, gaps included
    with pytest.raises(ValueError, match=r"labels \[-1\] outside \[0, 4\).*non-negative"):
        check_labels(ints, "y", 4)
    strings = datasets.Dataset.from_dict({"y": ["cat", "dog"]})
    with pytest.raises(ValueError, match="must be integers or a ClassLabel"):
        check_labels(strings, "y", 2)
    with pytest.raises(ValueError, match="set --num_classes"):
        check_labels(digits, "label", None)
    check_labels(digits, "label", 0)  # 0 classes: unconditional, the labels are ignored
    with pytest.raises(ValueError, match="no non-negative labels.*--num_classes 0"):
        infer_num_classes(datasets.Dataset.from_dict({"y": [-1, -1]}), "y")
    check_labels(strings, None, None)  # unconditional: nothing to check


def test_integer_labels_must_be_a_dense_range():
    assert infer_num_classes(datasets.Dataset.from_dict({"y": [2, 0, 1, 1]}), "y") == 3
    sparse = datasets.Dataset.from_dict({"y": [0, 1, 5, 1]})
    with pytest.raises(ValueError, match=r"3 distinct labels, but its largest is 5: ids \[2, 3, 4\] never occur.*"
                       r"Remap the labels to 0\.\.2.*or pass --num_classes 6"):  # fmt: skip
        infer_num_classes(sparse, "y")
    stray = datasets.Dataset.from_dict({"y": [0, 1, 2**62]})  # one stray value: refused without counting to it
    with pytest.raises(ValueError, match=r"ids \[2, 3, 4, 5, 6, 7, 8, 9, 10, 11\] \.\.\. never occur"):
        infer_num_classes(stray, "y")
    # A ClassLabel defines its classes by name: ids absent from a subset are fine.
    assert infer_num_classes(load_digits_dataset().select(range(3)), "label") == 10


def test_load_image_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--train_data_dir .*missing.* is not a directory"):
        load_image_dataset(train_data_dir=str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="--train_data_dir .*empty.* contains no image files"):
        load_image_dataset(train_data_dir=str(empty), cache_dir=str(tmp_path / "hf_cache"))
    with pytest.raises(ValueError, match="pass only one"):
        load_image_dataset(dataset_name="x", train_data_dir=str(empty))
    with pytest.raises(ValueError, match="--dataset_config_name 'c' needs --dataset_name"):
        load_image_dataset(dataset_config_name="c")


def test_corrupt_images_found_dropped_or_refused(image_folder, tmp_path):
    garbage = image_folder / "cat" / "garbage.png"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    truncated = image_folder / "dog" / "truncated.png"
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:1500])  # a valid header, so only decoding fails
    ds = load_folder(image_folder, tmp_path)
    assert len(ds) == 8

    bad = find_unreadable_images(ds, "image")
    assert sorted(path for _, path in bad) == sorted([str(garbage), str(truncated)])
    assert all(ds.cast_column("image", datasets.Image(decode=False))[i]["image"]["path"] == p for i, p in bad)

    clean, dropped = drop_unreadable_images(ds, "image", max_bad_fraction=0.25)
    assert dropped == bad and len(clean) == 6
    assert find_unreadable_images(clean, "image", num_proc=2) == []
    with pytest.raises(ValueError, match=r"(?s)2 of 8 images \(25.00%\).*garbage\.png.*--max_bad_image_fraction"):
        drop_unreadable_images(ds, "image", max_bad_fraction=0.2)
    with pytest.raises(ValueError, match=r"--max_bad_image_fraction must lie in \[0, 1\]"):
        drop_unreadable_images(ds, "image", max_bad_fraction=1.5)
    assert drop_unreadable_images(clean, "image", max_bad_fraction=0.0) == (clean, [])


def test_embedded_bytes_reported_by_row():
    good = Image.new("RGB", (4, 4))
    ds = datasets.Dataset.from_dict(
        {"image": [good, {"bytes": b"not a png", "path": "broken.png"}]},
        features=datasets.Features(image=datasets.Image()),
    )
    assert find_unreadable_images(ds, "image") == [(1, "row 1 (broken.png)")]


def test_random_flip_is_a_function_of_seed_epoch_and_index():
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:, :2] = 255  # white on the left only
    image = Image.fromarray(pixels)
    transform = build_transform(8, center_crop=True, random_flip=True, seed=3)
    plain = build_transform(8, center_crop=True, random_flip=False)(image)
    assert torch.equal(transform(image, flip=True), plain.flip(-1)) and torch.equal(transform(image), plain)

    sampler = EpochSampler(64, seed=0)
    epochs = []
    for epoch in (0, 1):
        sampler.set_position(epoch)
        indices = list(sampler)
        assert all(i.epoch == epoch for i in indices) and sorted(indices) == list(range(64))
        flips = transform.flips(indices)
        torch.manual_seed(epoch)  # no RNG is drawn from: its state changes nothing
        assert torch.equal(flips, transform.flips(indices))
        # By index: a sample's flip does not depend on where the permutation puts it.
        epochs.append(flips[torch.argsort(torch.tensor([int(i) for i in indices]))])
    assert 16 < int(epochs[0].sum()) < 48 and 16 < int(epochs[1].sum()) < 48  # fair coins
    assert not torch.equal(epochs[0], epochs[1])  # a new coin per epoch...
    other_seed = build_transform(8, center_crop=True, random_flip=True, seed=4)
    assert not torch.equal(other_seed.flips([SampleIndex(i, 0) for i in range(64)]), epochs[0])  # ...and seed
    # The epoch travels with the index into DataLoader workers (pickled) and through the data set.
    moved = pickle.loads(pickle.dumps(SampleIndex(5, 1)))
    assert (int(moved), moved.epoch) == (5, 1) and transform.flips([moved]) == epochs[1][5]
    assert not build_transform(8, True, False).flips(list(range(64))).any()


def test_select_subset(digits):
    subset = select_subset(digits, 100, seed=0)
    assert len(subset) == 100
    assert subset["label"] == select_subset(digits, 100, seed=0)["label"]
    assert subset["label"] != select_subset(digits, 100, seed=1)["label"]
    assert select_subset(digits, None, seed=0) is digits and select_subset(digits, 5000, seed=0) is digits
    with pytest.raises(ValueError, match="--max_train_samples must be a positive"):
        select_subset(digits, 0, seed=0)


def test_check_resolution():
    assert check_resolution(256, patch_size=2, vae_scale_factor=8) == 32
    assert check_resolution(32, patch_size=4) == 32
    with pytest.raises(ValueError, match=r"--resolution 100 must be a positive multiple of 16 .*use 96 or 112"):
        check_resolution(100, patch_size=2, vae_scale_factor=8)
    with pytest.raises(ValueError, match=r"multiple of 8 .*use 8\."):
        check_resolution(6, patch_size=8)


@pytest.mark.parametrize("random_flip", [False, True])
def test_cached_images_give_the_same_batches_as_decoding(image_folder, tmp_path, random_flip):
    ds = load_folder(image_folder, tmp_path)
    transform = build_transform(8, center_crop=True, random_flip=random_flip)
    decoded = ImageLabelDataset(ds, "image", "label", transform)
    cached = CachedImages(decoded, chunk_size=4)  # chunks that do not divide the 6 rows
    assert cached.pixels.dtype == torch.uint8 and cached.pixels.shape == (6, 3, 8, 8)

    def batches(dataset, collate):
        sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(1))
        loader = torch.utils.data.DataLoader(dataset, batch_size=3, sampler=sampler, collate_fn=collate)
        return [batch for _ in range(3) for batch in loader]

    expected, got = batches(decoded, None), batches(cached, CachedImages.collate)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])  # bit-identical floats and flips
        assert torch.equal(a["class_labels"], b["class_labels"])
    if random_flip:
        flipped = [not torch.equal(b["pixel_values"][k], cached[0]["pixel_values"]) for b in got for k in range(3)]
        assert any(flipped)
    # Item access agrees too, and an unconditional data set has no labels.
    assert torch.equal(cached[SampleIndex(4, 1)]["pixel_values"], decoded[SampleIndex(4, 1)]["pixel_values"])
    assert set(CachedImages(ImageLabelDataset(ds, "image", None, transform))[0]) == {"pixel_values"}
    with pytest.raises(TypeError, match="dict made by the data set's __getitems__"):
        CachedImages.collate([cached[0]])


def test_cached_images_refuse_what_does_not_fit(image_folder, tmp_path):
    ds = load_folder(image_folder, tmp_path)
    decoded = ImageLabelDataset(ds, "image", "label", build_transform(8, True, False))
    with pytest.raises(MemoryError, match=r"--cache_images needs .* for 6 images at 3×8×8.*drop --cache_images"):
        CachedImages(decoded, max_fraction_of_ram=1e-12)


def write_images(root, relative_paths):
    for i, relative in enumerate(relative_paths):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(path)


def labels_by_file(ds) -> dict[str, str]:
    if "label" not in ds.column_names:
        return {}
    names = ds.features["label"].names
    paths = [v["path"] for v in ds.cast_column("image", datasets.Image(decode=False))["image"]]
    return {path.split("/data/", 1)[1]: names[label] for path, label in zip(paths, ds["label"])}


@pytest.mark.parametrize(
    "layout, expected",
    [
        # Nested folders at different depths inside a class folder (imagefolder dropped every label).
        (["cat/a.png", "cat/more/b.png", "dog/c.png"], {"cat": 2, "dog": 1}),
        # Every class folder holds one subfolder of the same name (Tiny ImageNet's `<class>/images/`).
        (["n01/images/a.png", "n01/images/b.png", "n02/images/c.png"], {"n01": 2, "n02": 1}),
        # A split folder (or any folder shared by every image) is looked through.
        (["train/cat/x/a.png", "train/dog/b.png", "train/dog/y/z/c.png"], {"cat": 1, "dog": 2}),
    ],
)
def test_nested_folders_are_labelled_by_their_top_level_folder(tmp_path, layout, expected):
    write_images(tmp_path / "data", layout)
    ds = load_image_dataset(train_data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "hf_cache"))
    assert resolve_columns(ds, None, None) == ("image", "label")
    found = labels_by_file(ds)
    assert sorted(found) == sorted(layout)
    assert all(found[path] == path.removeprefix("train/").split("/")[0] for path in found)
    assert {name: list(found.values()).count(name) for name in expected} == expected


def test_loose_images_beside_class_folders_are_refused(tmp_path):
    write_images(tmp_path / "data", ["loose.png", "cat/a.png", "dog/more/b.png"])
    with pytest.raises(ValueError, match=r"data' holds images directly \(e.g. 'loose.png'\) and class folders"):
        load_image_dataset(train_data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "hf_cache"))
    # One class folder with images both loose and nested: the same refusal, naming that folder.
    write_images(tmp_path / "one", ["cat/a.png", "cat/more/b.png"])
    with pytest.raises(ValueError, match=r"one/cat' holds images directly \(e.g. 'a.png'\)"):
        load_image_dataset(train_data_dir=str(tmp_path / "one"), cache_dir=str(tmp_path / "hf_cache"))


def test_flat_layouts_keep_imagefolder_labels_and_fingerprint(image_folder, tmp_path):
    import datasets as hf_datasets

    raw = hf_datasets.load_dataset("imagefolder", data_dir=str(image_folder), split="train")
    assert label_by_top_folder(raw, str(image_folder)) is raw  # nothing to change in a flat <class>/<image> layout
    write_images(tmp_path / "flat", ["a.png", "b.png"])
    assert "label" not in load_folder(tmp_path / "flat", tmp_path).column_names  # unconditional, as documented
    write_images(tmp_path / "single", ["only/a.png", "only/b.png"])
    assert "label" not in load_folder(tmp_path / "single", tmp_path).column_names
