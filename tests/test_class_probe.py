"""The class-consistency probe: labelled image sources, the fit and its held-out accuracy, the cache, and the CLI.

A tiny parameter-free network stands in for Inception (as in test_metrics.py): the probe only needs features.
"""

import json
import os

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from test_metrics import PoolFeatures, write_pngs

from dit_hf import class_probe, metrics
from dit_hf.class_probe import ClassProbe, fit_class_probe, fit_probe_on_features, stratified_split
from dit_hf.cli import main
from dit_hf.data import load_image_dataset
from dit_hf.metrics import (
    InceptionExtractor,
    LabelledImages,
    NoLabelsError,
    evaluate_samples,
    open_image_source,
    open_labelled_source,
    reference_stats,
)

pytestmark = pytest.mark.filterwarnings("ignore:Statistics of")

CLASSES = np.array([2, 5, 7, 9])  # not 0..K-1: the probe must map its rows back to the real class ids


def gaussian_features(labels: np.ndarray, seed: int, dim: int = 128) -> np.ndarray:
    """Five classes with fixed random means 0.25 apart per dimension, unit noise: a probe reaches about 80-85%."""
    means = np.random.default_rng(0).normal(0, 0.25, (5, dim))
    return (means[labels] + np.random.default_rng(seed).normal(0, 1, (len(labels), dim))).astype(np.float32)


def class_images(labels: np.ndarray, seed: int, size: int = 16) -> np.ndarray:
    """Grayscale images whose class brightens one quadrant, under random per-quadrant brightness and pixel noise."""
    rng = np.random.default_rng(seed)
    quadrants = rng.normal(0, 30, (len(labels), 2, 2))
    row, column = np.divmod(np.searchsorted(CLASSES, labels), 2)
    quadrants[np.arange(len(labels)), row, column] += 60
    images = 100 + np.kron(quadrants, np.ones((size // 2, size // 2))) + rng.normal(0, 20, (len(labels), size, size))
    return images.clip(0, 255).astype(np.uint8)[..., None]


@pytest.fixture(scope="module")
def extractor() -> InceptionExtractor:
    return InceptionExtractor(network=PoolFeatures(), device="cpu", batch_size=100)


# ----------------------------------------------------------------------------------------------------------------
# The fit


def test_held_out_accuracy_predicts_fresh_real_data_and_shuffled_labels_score_chance():
    labels = np.repeat(np.arange(5), 200)
    probe = fit_probe_on_features(gaussian_features(labels, seed=1), labels)
    assert (probe.num_fit, probe.num_held_out) == (800, 200)
    # 128 dimensions for 800 images: the probe fits its own images perfectly, so a held-out accuracy measured on
    # them (1.0) would be far from what fresh real images score.
    assert 0.7 < probe.held_out_accuracy < 0.95
    fresh_labels = np.tile(np.arange(5), 400)
    fresh = gaussian_features(fresh_labels, seed=2)
    assert probe.accuracy(fresh, fresh_labels) == pytest.approx(probe.held_out_accuracy, abs=0.06)
    shuffled = np.random.default_rng(3).permutation(fresh_labels)
    assert probe.accuracy(fresh, shuffled) == pytest.approx(0.2, abs=0.03)


def test_probe_on_images_with_class_ids_that_are_not_0_to_k(extractor, tmp_path):
    labels = np.repeat(CLASSES, 100)
    probe = fit_class_probe((class_images(labels, seed=0), labels), extractor, cache_dir=str(tmp_path))
    assert probe.classes.tolist() == CLASSES.tolist() and probe.feature_id == extractor.feature_id
    assert 0.75 < probe.held_out_accuracy < 0.98
    fresh_labels = np.tile(CLASSES, 100)
    fresh = class_images(fresh_labels, seed=1)
    accuracy = probe.accuracy(fresh, fresh_labels, extractor)
    assert accuracy == pytest.approx(probe.held_out_accuracy, abs=0.08)
    assert probe.accuracy(extractor(fresh), fresh_labels) == accuracy
    assert probe.accuracy(fresh, np.random.default_rng(0).permutation(fresh_labels), extractor) == pytest.approx(
        0.25, abs=0.06
    )
    # Images of class 5 drawn as class 7 are judged wrong.
    assert probe.accuracy(fresh[fresh_labels == 5], np.full(100, 7), extractor) < 0.2


@pytest.mark.parametrize("num_classes", [2, 4])
def test_exported_parameters_predict_what_scikit_learn_predicts(num_classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.repeat(np.arange(num_classes) * 3, 100)  # ids 0, 3, ...
    features = gaussian_features(labels // 3, seed=4, dim=16)
    features[:, 5] = 1.5  # a constant feature: scale 1, not a division by zero
    probe = fit_probe_on_features(features, labels, held_out_fraction=0.25, seed=7, regularization=0.5)
    fit, held_out = stratified_split(labels, 0.25, seed=7)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000))
    reference.fit(features[fit], labels[fit])
    fresh = gaussian_features(np.tile(np.arange(num_classes), 50), seed=5, dim=16)
    np.testing.assert_array_equal(probe.predict(fresh), reference.predict(fresh))
    assert probe.held_out_accuracy == pytest.approx(reference.score(features[held_out], labels[held_out]))


def test_stratified_split():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 2)
    fit, held_out = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[held_out]).tolist() == [2, 1, 1]
    assert sorted(np.concatenate([fit, held_out]).tolist()) == list(range(17))
    assert (np.diff(held_out) > 0).all() and np.array_equal(stratified_split(labels, 0.2, seed=0)[1], held_out)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=1)[1], held_out)
    with pytest.raises(ValueError, match="Class 3 has 1 real image; the probe needs at least 2 per class"):
        stratified_split(np.array([0, 0, 3]), 0.2)
    with pytest.raises(ValueError, match="strictly between 0 and 1, got 1.0"):
        stratified_split(labels, 1.0)
    with pytest.raises(ValueError, match="hold 1 class; a class probe needs at least 2"):
        fit_probe_on_features(np.zeros((4, 3)), np.zeros(4, int))


def test_accuracy_refuses_mismatched_input(extractor):
    labels = np.repeat(CLASSES, 5)
    probe = fit_probe_on_features(gaussian_features(np.searchsorted(CLASSES, labels), 0, dim=48), labels)
    features = gaussian_features(np.zeros(3, int), 1, dim=48)
    with pytest.raises(ValueError, match=r"Labels \[3\] are not classes of the real images"):
        probe.accuracy(features, [2, 3, 5])
    with pytest.raises(ValueError, match="Got 3 samples but labels of shape"):
        probe.accuracy(features, [2, 5])
    with pytest.raises(ValueError, match=r"takes \(N, 48\) features, got shape \(3, 8\)"):
        probe.accuracy(features[:, :8], [2, 2, 2])
    with pytest.raises(ValueError, match="needs the `extractor`"):
        probe.accuracy(class_images(np.full(3, 2), 0), [2, 2, 2])
    probe.feature_id = "sha256:other"
    with pytest.raises(ValueError, match="fitted on features sha256:other"):
        probe.accuracy(class_images(np.full(3, 2), 0), [2, 2, 2], extractor)


# ----------------------------------------------------------------------------------------------------------------
# Fitted once per data set


def test_probe_shares_the_fid_features_and_is_cached(extractor, tmp_path, monkeypatch):
    folder, cache = tmp_path / "real", str(tmp_path / "cache")
    labels = np.repeat(np.arange(3), 8)
    for label in range(3):
        write_pngs(folder / f"class{label}", class_images(np.full(8, CLASSES[label]), seed=label))
    passes, fits = [], []
    network = extractor.network
    monkeypatch.setattr(extractor, "network", lambda x: passes.append(len(x)) or network(x))
    fit = class_probe.fit_probe_on_features
    monkeypatch.setattr(class_probe, "fit_probe_on_features", lambda *a, **kw: fits.append(1) or fit(*a, **kw))

    reference = reference_stats(str(folder), extractor, cache_dir=cache)
    probe = fit_class_probe(str(folder), extractor, features=reference, cache_dir=cache)
    assert sum(passes) == 24 and len(fits) == 1  # one Inception pass for FID and the probe together
    assert probe.class_names == ["class0", "class1", "class2"] and probe.num_fit + probe.num_held_out == 24
    again = fit_class_probe(str(folder), extractor, cache_dir=cache)
    assert sum(passes) == 24 and len(fits) == 1  # features from the FID cache, the probe from its own
    for name in ("mean", "scale", "weight", "bias", "classes"):
        np.testing.assert_array_equal(getattr(again, name), getattr(probe, name))
    assert (again.held_out_accuracy, again.class_names, again.fingerprint) == (
        probe.held_out_accuracy,
        probe.class_names,
        probe.fingerprint,
    )
    fit_class_probe(str(folder), extractor, cache_dir=cache, held_out_fraction=0.25)  # other settings: refit
    fit_class_probe(str(folder), extractor, cache_dir=cache, use_cache=False)
    assert len(fits) == 3 and sum(passes) == 48
    assert sorted(name.startswith("probe-") for name in os.listdir(cache)) == [False, True, True]

    subset = reference_stats(str(folder), extractor, cache_dir=cache, max_images=20)
    with pytest.raises(ValueError, match="`features` are not the features of folder"):
        fit_class_probe(str(folder), extractor, features=subset, cache_dir=cache)
    probe = fit_class_probe(str(folder), extractor, features=subset, max_images=20, cache_dir=cache)
    assert probe.num_fit + probe.num_held_out == 20 and np.bincount(labels).sum() == 24


def test_save_and_load_round_trip(tmp_path):
    labels = np.repeat([1, 4], 10)
    probe = fit_probe_on_features(gaussian_features(labels // 4, 0, dim=8), labels)
    probe.class_names, probe.feature_id = ["a", "b", "c", "d", "e"], "sha256:x"
    probe.save(str(tmp_path / "p.npz"))
    loaded = ClassProbe.load(str(tmp_path / "p.npz"))
    features = gaussian_features(np.arange(5) % 2, 1, dim=8)
    np.testing.assert_array_equal(loaded.logits(features), probe.logits(features))
    assert (loaded.class_names, loaded.feature_id, loaded.held_out_accuracy) == (
        probe.class_names,
        "sha256:x",
        probe.held_out_accuracy,
    )
    assert os.listdir(tmp_path) == ["p.npz"]


# ----------------------------------------------------------------------------------------------------------------
# Labelled image sources


def test_folder_labels_match_the_trainers_imagefolder_labels(tmp_path):
    folder = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name in ("zebra", "ant", "Moth"):  # created out of order; ids follow the sorted names
        write_pngs(folder / name, rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), prefix=name)
    labelled = open_labelled_source(str(folder))
    assert labelled.class_names == ["Moth", "ant", "zebra"]
    images = np.concatenate(list(labelled.source.batches(100)))
    ours = {image.tobytes(): labelled.class_names[label] for image, label in zip(images, labelled.labels)}

    ds = load_image_dataset(train_data_dir=str(folder))
    names = ds.features["label"].names
    assert names == labelled.class_names
    theirs = {np.asarray(row["image"].convert("RGB")).tobytes(): names[row["label"]] for row in ds}
    assert len(ours) == 9 and ours == theirs


def test_folders_without_class_subfolders_have_no_labels(tmp_path):
    write_pngs(tmp_path / "flat", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(NoLabelsError, match="has no class subfolders"):
        open_labelled_source(str(tmp_path / "flat"))
    write_pngs(tmp_path / "one" / "cats", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(NoLabelsError, match=r"found \['cats'\]"):
        open_labelled_source(str(tmp_path / "one"))
    write_pngs(tmp_path / "mixed" / "a", np.zeros((2, 8, 8, 3), np.uint8))
    write_pngs(tmp_path / "mixed" / "b" / "deeper", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(NoLabelsError, match="lay the images out as <folder>/<class name>/<image>"):
        open_labelled_source(str(tmp_path / "mixed"))


def test_digits_labels_and_subsets_stay_aligned():
    from sklearn.datasets import load_digits

    target = load_digits().target
    labelled = open_labelled_source("digits")
    assert labelled.labels.tolist() == target.tolist() and labelled.class_names[3] == "3"
    subset = labelled.subset(50, seed=4)
    chosen = metrics.subset_indices(len(target), 50, seed=4)
    all_images = np.concatenate(list(labelled.source.batches(2000)))
    np.testing.assert_array_equal(np.concatenate(list(subset.source.batches(7))), all_images[chosen])
    assert subset.labels.tolist() == target[chosen].tolist() and subset.source.num_images == 50
    assert labelled.subset(None) is labelled


def test_dataset_and_npz_labels(tmp_path):
    images = [PIL.Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(6)]
    features = datasets.Features(
        {"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["x", "y", "z"]), "n": datasets.Value("int32")}
    )
    data = {"picture": images, "kind": [2, 0, 1, 2, 0, 1], "n": [5, 1, 1, 0, 0, 5]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "saved"))
    labelled = open_labelled_source(str(tmp_path / "saved"))
    assert labelled.labels.tolist() == [2, 0, 1, 2, 0, 1] and labelled.class_names == ["x", "y", "z"]
    assert labelled.source.identity == open_image_source(str(tmp_path / "saved")).identity
    by_int = open_labelled_source(str(tmp_path / "saved"), label_column="n")
    assert by_int.labels.tolist() == [5, 1, 1, 0, 0, 5] and by_int.class_names == [str(i) for i in range(6)]
    plain = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    plain.save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(NoLabelsError, match="has no label column"):
        open_labelled_source(str(tmp_path / "plain"))

    pixels = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "labelled.npz", pixels, np.array([3, 1, 3, 0]))
    np.savez(tmp_path / "plain.npz", pixels)
    np.savez(tmp_path / "short.npz", pixels, np.array([3, 1]))
    assert open_labelled_source(str(tmp_path / "labelled.npz")).labels.tolist() == [3, 1, 3, 0]
    with pytest.raises(NoLabelsError, match=r"has no class labels \(arr_1\)"):
        open_labelled_source(str(tmp_path / "plain.npz"))
    with pytest.raises(ValueError, match=r"arr_1 of .* must be one integer class id per image \(4\)"):
        open_labelled_source(str(tmp_path / "short.npz"))
    with pytest.raises(ValueError, match="holds negative class ids"):
        LabelledImages.from_images(pixels, [0, -1, 0, 0])


# ----------------------------------------------------------------------------------------------------------------
# evaluate_samples and `dit-hf evaluate`


def test_evaluate_samples_reports_class_accuracy(extractor, tmp_path):
    labels = np.repeat(CLASSES, 30)
    real = class_images(labels, seed=0)
    probe = fit_class_probe((real, labels), extractor, cache_dir=str(tmp_path))
    samples, sample_labels = class_images(np.tile(CLASSES, 10), seed=1), np.tile(CLASSES, 10)
    result = evaluate_samples(samples, real, extractor, splits=1, labels=sample_labels, class_probe=probe)
    assert result["class_accuracy"] == probe.accuracy(samples, sample_labels, extractor) > 0.5
    assert result["probe_held_out_accuracy"] == probe.held_out_accuracy and result["unavailable"] == {
        "inception_score": metrics.NO_HEAD_REASON
    }
    result = evaluate_samples(samples, real, extractor, splits=1, class_probe=probe)
    assert result["class_accuracy"] is None and result["unavailable"]["class_accuracy"] == (
        "the samples carry no class labels"
    )
    assert "class_accuracy" not in evaluate_samples(samples, real, extractor, splits=1)


@pytest.fixture(scope="module")
def scripted_network(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("network") / "pool.pt"
    torch.jit.script(PoolFeatures()).save(str(path))
    return str(path)


def test_cli_evaluate_reports_class_accuracy(tmp_path, scripted_network, capsys, extractor):
    real_labels = np.repeat(np.arange(4), 25)
    real = class_images(CLASSES[real_labels], seed=0)
    for label in range(4):
        write_pngs(tmp_path / "real" / f"c{label}", real[real_labels == label], prefix=f"c{label}_")
    sample_labels = np.tile(np.arange(4), 10)
    samples = class_images(CLASSES[sample_labels], seed=1, size=16)
    np.savez(tmp_path / "samples.npz", samples, sample_labels)
    np.savez(tmp_path / "unlabelled.npz", samples)
    common = [
        "--inception",
        scripted_network,
        "--device",
        "cpu",
        "--cache_dir",
        str(tmp_path / "cache"),
        "--splits",
        "1",
    ]

    result = main(
        [
            "evaluate",
            str(tmp_path / "samples.npz"),
            str(tmp_path / "real"),
            "--json",
            str(tmp_path / "r.json"),
            *common,
        ]
    )
    table = capsys.readouterr().out
    probe = fit_class_probe(str(tmp_path / "real"), extractor, use_cache=False)
    assert result["probe_held_out_accuracy"] == probe.held_out_accuracy
    assert result["class_accuracy"] == probe.accuracy(samples, sample_labels, extractor) > 0.5
    assert f"class accuracy           {result['class_accuracy']:.4f}" in table
    assert f"probe held-out accuracy  {probe.held_out_accuracy:.4f}" in table
    assert json.loads((tmp_path / "r.json").read_text())["class_accuracy"] == result["class_accuracy"]

    shuffled = np.random.default_rng(0).permutation(sample_labels)
    np.savez(tmp_path / "shuffled.npz", samples, shuffled)
    assert main(["evaluate", str(tmp_path / "shuffled.npz"), str(tmp_path / "real"), *common])["class_accuracy"] < 0.45
    capsys.readouterr()

    result = main(["evaluate", str(tmp_path / "unlabelled.npz"), str(tmp_path / "real"), *common])
    assert "class_accuracy" not in result and "class accuracy" not in capsys.readouterr().out
    write_pngs(tmp_path / "flat", real)
    result = main(["evaluate", str(tmp_path / "samples.npz"), str(tmp_path / "flat"), *common])
    assert result["class_accuracy"] is None
    assert "class_accuracy           unavailable: " in capsys.readouterr().out
    assert "has no class subfolders" in result["unavailable"]["class_accuracy"]
    main(["fid-stats", str(tmp_path / "real"), "--out", str(tmp_path / "stats.npz"), *common[:-2]])
    result = main(["evaluate", str(tmp_path / "samples.npz"), str(tmp_path / "stats.npz"), *common])
    assert result["class_accuracy"] is None and result["fid"] > 0
    assert "holds statistics, not labelled images" in result["unavailable"]["class_accuracy"]
