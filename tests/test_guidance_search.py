"""Choosing the saved pipeline's guidance scale with the run's own classifier (dit_hf.guidance_search)."""

import numpy as np
import pytest
import torch

from dit_hf.evaluation import ImageClassifier
from dit_hf.glyphs import render_glyphs
from dit_hf.guidance_search import GuidanceSearch, GuidanceTrial, choose_guidance


def test_choose_guidance_takes_the_most_accurate_scale_whose_features_stay_close():
    trials = [
        GuidanceTrial(4.0, 0.60, 10.0),
        GuidanceTrial(8.0, 0.80, 10.5),
        GuidanceTrial(12.0, 0.805, 10.9),  # within the accuracy margin of 8: the smaller scale wins
        GuidanceTrial(16.0, 0.95, 13.0),  # more accurate, but its features drifted 30% from the data
    ]
    assert choose_guidance(trials, distance_tolerance=0.25).scale == 8.0
    assert choose_guidance(trials, distance_tolerance=0.0).scale == 4.0
    assert choose_guidance(trials, distance_tolerance=0.35).scale == 16.0
    assert choose_guidance(trials, distance_tolerance=0.25, accuracy_margin=0.0).scale == 12.0
    far = [GuidanceTrial(4.0, 0.60, 10.0), GuidanceTrial(16.0, 0.95, 20.5)]  # more than twice as far: out by default
    assert choose_guidance(far).scale == 4.0 and choose_guidance(far, distance_tolerance=1.1).scale == 16.0
    # White-on-black data: more guidance, slightly more accuracy, much further from the data.
    assert choose_guidance([GuidanceTrial(4.0, 0.99, 5.0), GuidanceTrial(8.0, 1.0, 7.0)]).scale == 4.0
    # The benchmarks' final models of the seventh round (bench/NOTES.md): colour takes 6 (73% further than 4, 5.5
    # points more accurate; 8 is 2.8 times as far), grayscale keeps 4 (within a point of the best).
    colour = [(4.0, 0.92, 4.03), (6.0, 0.975, 6.97), (8.0, 0.98, 11.43), (12.0, 0.96, 22.76)]
    assert choose_guidance([GuidanceTrial(*t) for t in colour]).scale == 6.0
    gray = [(4.0, 0.995, 4.31), (6.0, 1.0, 6.89), (8.0, 1.0, 7.84), (12.0, 0.99, 9.83)]
    assert choose_guidance([GuidanceTrial(*t) for t in gray]).scale == 4.0
    with pytest.raises(ValueError, match="at least one scale"):
        choose_guidance([])


@pytest.fixture(scope="module")
def glyphs():
    train, train_labels = render_glyphs(400, resolution=16)
    test, test_labels = render_glyphs(100, resolution=16, split="test")
    classifier = ImageClassifier.fit(train, train_labels, epochs=8, seed=0)
    pixels = torch.from_numpy(train)[:, None].contiguous()  # (N, 1, H, W) as the trainer caches them
    return classifier, pixels, (test[..., None], test_labels)


def test_guidance_search_scores_real_images_close_and_noise_far(glyphs):
    classifier, pixels, (test, labels) = glyphs
    search = GuidanceSearch.from_images(classifier, pixels)
    real = search.score(test, labels.tolist(), 1.0)
    shuffled = search.score(test, np.random.default_rng(0).permutation(labels).tolist(), 1.0)
    noise = np.random.default_rng(0).integers(0, 256, test.shape, dtype=np.uint8)
    far = search.score(noise, labels.tolist(), 1.0)
    assert real.accuracy > 0.4 and shuffled.accuracy < real.accuracy - 0.2  # a small, quick classifier: 50%
    assert real.feature_distance < 0.2 * far.feature_distance


def test_guidance_search_reference_is_a_seeded_subset_of_large_training_sets(glyphs, monkeypatch):
    import dit_hf.guidance_search as module

    classifier, pixels, _ = glyphs
    whole = GuidanceSearch.from_images(classifier, pixels)
    monkeypatch.setattr(module, "REFERENCE_IMAGES", 100)
    first, again = GuidanceSearch.from_images(classifier, pixels), GuidanceSearch.from_images(classifier, pixels)
    other = GuidanceSearch.from_images(classifier, pixels, seed=1)
    np.testing.assert_array_equal(first.reference.sigma, again.reference.sigma)
    assert not np.allclose(first.reference.mu, whole.reference.mu)
    assert not np.allclose(first.reference.mu, other.reference.mu)
    subset = pixels[torch.randperm(400, generator=torch.Generator().manual_seed(0))[:100].sort().values]
    expected = classifier.features(subset.permute(0, 2, 3, 1).numpy()).mean(axis=0)
    np.testing.assert_allclose(first.reference.mu, expected, rtol=1e-5, atol=1e-6)
