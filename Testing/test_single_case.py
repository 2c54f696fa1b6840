"""The single-case mode: the random walker, the click region, segmenting, suggestions, a model to keep and refine."""

import numpy as np
import pytest
from synthetic import CLASSES, two_organ_volume

from pscv import PSCVError
from pscv.base.progress import Cancelled
from pscv.data.clicks import Clicks, simulate_clicks
from pscv.data.metrics import dice
from pscv.learn.random_walker import UNLABELLED, random_walker
from pscv.learn.single_case import (
    CaseSettings,
    check_refinable,
    click_region,
    model_settings,
    region_seeds,
    segment_case,
    split_settings,
    suggest_points,
    train_case_model,
)

TINY_NETWORK = {"device": "cpu", "iterations": 6, "image_size": 32, "batch_size": 2, "widths": (4, 8),
                "dropout": (0.0, 0.0)}


def two_halves(size=12):
    """An image dark on the left, bright on the right (with noise), and one seed in each half."""
    image = np.zeros((2, size, size))
    image[:, :, size // 2:] = 1.0
    image += np.random.default_rng(0).normal(0, 0.02, image.shape)
    seeds = np.full(image.shape, UNLABELLED, dtype=np.int16)
    seeds[0, 2, 1], seeds[1, size - 3, size - 2] = 0, 1
    return image, seeds


def test_random_walker_stops_at_intensity_edges_and_gives_probabilities():
    image, seeds = two_halves()
    probabilities = random_walker(image, seeds, classes=3)
    assert probabilities.shape == (3, *image.shape)
    assert np.allclose(probabilities[:2].sum(axis=0), 1.0, atol=1e-3)
    assert not probabilities[2].any()  # a class without seeds
    halves = probabilities.argmax(axis=0)
    assert np.all(halves[:, :, :6] == 0) and np.all(halves[:, :, 6:] == 1)
    assert probabilities[1, 0, 2, 1] == 0.0 and probabilities[1, 1, -3, -2] == 1.0  # seeds keep their class
    flat = random_walker(np.zeros_like(image), seeds, classes=2)  # without edges, distance decides
    assert 0.2 < flat[0, 0, 6, 6] < 0.8


def test_random_walker_stops_when_asked():
    image, seeds = two_halves(size=40)
    with pytest.raises(Cancelled):
        random_walker(image, seeds, classes=2, tolerance=1e-12, should_stop=lambda: True)


def test_click_region_grows_the_organ_clicks_box_in_plane_only():
    volume, _ = two_organ_volume(slices=4, size=48)
    clicks = Clicks([[0, 10, 12], [3, 20, 30], [1, 2, 2]], [1, 2, 0])  # the background click does not count
    region = click_region(clicks, volume, margin=0.5)
    assert region[0] == slice(0, 4)  # every slice
    # rows 10..20 grown by 8 (the minimum), columns 12..30 by 10 (half of 19, rounded up)
    assert region[1] == slice(2, 29) and region[2] == slice(2, 41)
    assert click_region(Clicks([[0, 5, 5]], [0]), volume, 0.5) == tuple(slice(0, n) for n in volume.shape)


def test_region_seeds_ring_the_region_with_background_except_at_the_image_edge():
    clicks = Clicks([[0, 3, 3], [1, 4, 5]], [1, 2])
    region = (slice(0, 2), slice(0, 8), slice(2, 10))  # touches the image's top edge (rows) only
    seeds = region_seeds(clicks, CLASSES, region, shape=(2, 20, 20), slice_axis=0)
    assert seeds.shape == (2, 8, 8)
    assert np.all(seeds[:, -1, :] == 0) and np.all(seeds[:, :, 0] == 0) and np.all(seeds[:, :, -1] == 0)
    assert np.all(seeds[:, 0, 1:-1] == UNLABELLED)  # the image's edge: the organ may go on there
    assert seeds[0, 3, 1] == 1 and seeds[1, 4, 3] == 2  # the clicks, moved onto the region's grid


def test_segment_case_from_clicks_on_two_slices_segments_every_slice_and_nothing_outside():
    volume, labels = two_organ_volume(slices=6, size=64)
    clicks = simulate_clicks(labels, seed=0)
    clicks = Clicks(clicks.kji[np.isin(clicks.kji[:, 0], [1, 4])], clicks.values[np.isin(clicks.kji[:, 0], [1, 4])])
    events = []
    result = segment_case(volume, clicks, CLASSES, progress=events.append)
    assert result.labelmap.shape == labels.shape
    assert [e["step"] for e in events] == [0, 1]
    for value in (1, 2):
        assert dice(result.labelmap == value, labels == value) > 0.9
    outside = np.ones(labels.shape, dtype=bool)
    outside[result.region] = False
    assert outside.any() and not result.labelmap[outside].any()
    assert np.allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-3)


def test_the_region_border_does_not_turn_the_box_into_organ():
    """The region's ring is background: a click inside an organ does not flood the whole region."""
    volume, labels = two_organ_volume(slices=3, size=64)
    clicks = simulate_clicks(labels, seed=1)
    result = segment_case(volume, clicks, CLASSES, CaseSettings(region_margin=1.0))
    inside = result.labelmap[result.region]
    assert (inside == 0).mean() > 0.3
    assert dice(result.labelmap > 0, labels > 0) > 0.9


def test_suggestions_are_one_per_slice_where_the_result_is_least_sure():
    volume, labels = two_organ_volume(slices=6, size=64)
    clicks = simulate_clicks(labels, seed=0)
    keep = clicks.kji[:, 0] == 2  # clicks on one slice only: the others are less sure
    result = segment_case(volume, Clicks(clicks.kji[keep], clicks.values[keep]), CLASSES)
    suggestions = suggest_points(result, CLASSES, slice_axis=0, count=4)
    assert len(suggestions) == 4 and len(set(suggestions.kji[:, 0])) == 4
    start = np.array([r.start for r in result.region])
    ordered = np.sort(result.probabilities, axis=0)
    for point, value in zip(suggestions.kji - start, suggestions.values):
        assert np.all(point >= 0) and np.all(point < result.probabilities.shape[1:])  # inside the region
        assert ordered[-1][tuple(point)] - ordered[-2][tuple(point)] < 0.5  # where two classes are close
        assert CLASSES[result.probabilities[(slice(None), *point)].argmax()].value == value  # the guess
    assert len(suggest_points(result, CLASSES, 0, count=100)) == 6  # at most one per slice


def test_settings_split_between_the_segmentation_and_the_network_and_are_checked():
    case, network = split_settings({"region_margin": 0.2, "suggest": 3, "iterations": 5, "device": "cpu"})
    assert case.region_margin == 0.2 and case.suggest == 3 and network == {"iterations": 5, "device": "cpu"}
    for bad in ({"walker_beta": 0}, {"region_margin": -1}, {"suggest": -2}, {"train_model": "yes"}):
        with pytest.raises(PSCVError, match=next(iter(bad))):
            split_settings(bad)
    assert model_settings("cpu").method == "full"
    assert model_settings("cpu", refine=True).iterations < model_settings("cpu").iterations


def test_a_kept_model_learns_the_result_and_refines_only_on_its_own_image():
    volume, labels = two_organ_volume(slices=4, size=48)
    clicks = simulate_clicks(labels, seed=0)
    result = segment_case(volume, clicks, CLASSES)
    model = train_case_model(volume, result, CLASSES, model_settings(**TINY_NETWORK), len(clicks))
    assert model.metadata["training"]["clicks"] == len(clicks) == 12
    assert model.metadata["single_case"]["rounds"] == 1
    check_refinable(model, volume, "model")
    refined = train_case_model(volume, result, CLASSES, model_settings(refine=True, **TINY_NETWORK), len(clicks) + 4,
                               initial=model)
    assert refined.metadata["single_case"]["rounds"] == 2 and refined.metadata["training"]["clicks"] == 16
    other, _ = two_organ_volume(slices=4, size=48, seed=1)
    with pytest.raises(PSCVError, match="another image"):
        check_refinable(model, other, "model")
    model.metadata.pop("single_case")
    with pytest.raises(PSCVError, match="not a model saved by"):
        check_refinable(model, volume, "model")
