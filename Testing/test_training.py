"""Click simulation, a tiny end-to-end train/predict, reproducibility and the single-case mode."""

import numpy as np
import pytest
import torch
from synthetic import CLASSES, two_organ_volume

from pscv import PSCVError
from pscv.data.clicks import Clicks, simulate_clicks
from pscv.data.dataset import Case
from pscv.data.metrics import dice
from pscv.learn.inference import predict_volume, slice_probabilities
from pscv.learn.pieces import keep_largest_pieces
from pscv.learn.training import TrainSettings, case_tensors, scale_coordinates, train

torch.set_num_threads(2)
# The loss mechanics alone, with SGD and the flips they always had (without them ms reaches Dice 0.52 in 60 steps): the
# default recipe's extra terms (affinity, pseudo-labels, outside, absent classes, gated CRF) and its largest-piece
# step are tested on their own below.
TINY = {"image_size": 32, "batch_size": 4, "device": "cpu", "widths": (8, 16, 32, 64, 128), "affinity_weight": 0.0,
        "pseudo_weight": 0.0, "outside_weight": 0.0, "crf_weight": 0.0, "absent_weight": 0.0, "largest_piece": False,
        "optimizer": "sgd", "augment": "flip"}


def test_simulated_clicks_one_per_present_class_per_slice_inside_it():
    _, labels = two_organ_volume()
    labels[2, labels[2] == 2] = 0  # the box is absent from slice 2
    clicks = simulate_clicks(labels, seed=3)
    for k in range(labels.shape[0]):
        in_slice = clicks.kji[:, 0] == k
        assert sorted(clicks.values[in_slice]) == sorted(np.unique(labels[k]))
    assert np.all(labels[tuple(clicks.kji.T)] == clicks.values)
    again, other = simulate_clicks(labels, seed=3), simulate_clicks(labels, seed=4)
    assert np.array_equal(again.kji, clicks.kji)
    assert not np.array_equal(other.kji, clicks.kji)


def test_simulated_clicks_along_another_slice_axis():
    _, labels = two_organ_volume(slices=5)
    clicks = simulate_clicks(labels, seed=0, slice_axis=2)
    assert set(clicks.kji[:, 2]) == set(range(labels.shape[2]))
    assert np.all(labels[tuple(clicks.kji.T)] == clicks.values)


def test_click_coordinates_scale_to_the_pixel_holding_their_centre():
    assert scale_coordinates(np.array([0, 1, 2, 3]), 4, 2).tolist() == [0, 0, 1, 1]
    assert scale_coordinates(np.array([0, 1]), 2, 4).tolist() == [1, 3]
    assert scale_coordinates(np.array([215]), 216, 256).tolist() == [255]


def test_training_tensors_keep_every_click_and_only_clicked_slices():
    volume, labels = two_organ_volume(slices=5, size=40)
    clicks = simulate_clicks(labels, seed=0)
    keep = clicks.kji[:, 0] != 1  # slice 1 unclicked
    clicks = Clicks(clicks.kji[keep], clicks.values[keep])
    tensors = case_tensors(Case(volume, clicks), CLASSES, TrainSettings(method="pce", **TINY))
    assert tensors.images.shape == (4, 1, 32, 32)
    assert int((tensors.sparse != 255).sum()) == len(clicks)
    assert tensors.present.all()


def test_outside_the_click_region_is_background_to_learn():
    volume, labels = two_organ_volume(slices=4, size=64)
    organs = np.array([[0, 10, 12], [3, 20, 30]])  # the organ clicks' box: rows 10-20, columns 12-30
    clicks = Clicks(np.vstack([organs, [[1, 60, 60]]]), np.array([1, 2, 0]))
    settings = TrainSettings(**{**TINY, "image_size": 64, "outside_weight": 1.0, "outside_margin": 0.5})
    outside = case_tensors(Case(volume, clicks), CLASSES, settings).outside
    assert outside.shape == (3, 64, 64)  # the clicked slices, 0, 1 and 3
    # grown by max(8, half the box) on each side: rows 2-28, columns 2-40 are the region, on every slice
    assert not outside[:, 2:29, 2:41].any() and outside[:, 29:, :].all() and outside[:, :, 41:].all()
    assert outside[:, :2].all() and outside[:, :, :2].all()
    assert case_tensors(Case(volume, clicks), CLASSES, TrainSettings(**TINY)).outside is None  # off by default
    history = train([Case(volume, clicks)], CLASSES, TrainSettings(**{**settings.to_dict(), "iterations": 3}))
    assert history.metadata["history"][0]["outside"] > 0


@pytest.mark.parametrize("method", ["pce", "pscv", "ms", "full"])
def test_tiny_end_to_end_train_and_predict(method):
    volume, labels = two_organ_volume()
    case = Case(volume, simulate_clicks(labels, seed=0), labels, "synthetic")
    model = train([case], CLASSES, TrainSettings(method=method, iterations=60, learning_rate=0.05, **TINY))
    history = model.metadata["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    prediction = predict_volume(model, volume, "cpu")
    assert prediction.shape == labels.shape and set(np.unique(prediction)) <= {0, 1, 2}
    assert dice(prediction == 1, labels == 1) > 0.6  # the bright disk is easy even from points
    # what predict_volume takes the argmax of: class probabilities on the native grid, slice by slice
    probabilities = torch.cat([p for _, p in slice_probabilities(model, volume, "cpu")], dim=1)
    assert probabilities.shape == (3, *np.moveaxis(labels, volume.slice_axis(), 0).shape)
    assert torch.allclose(probabilities.sum(dim=0), torch.ones(()), atol=1e-4)


def test_default_recipe_trains_and_keeps_each_organs_largest_piece():
    volume, labels = two_organ_volume()
    case = Case(volume, simulate_clicks(labels, seed=0), labels, "synthetic")
    tiny = {k: v for k, v in TINY.items() if k in ("image_size", "batch_size", "device", "widths")}
    model = train([case], CLASSES, TrainSettings(iterations=60, learning_rate=0.003, **tiny))
    history = model.metadata["history"]
    assert {"pce", "outside", "crf", "affinity"} <= set(history[0]) and "pseudo" in history[-1]
    assert model.metadata["one_piece_classes"] == [1, 2]  # each organ's clicks lie in one piece of its prediction
    prediction = predict_volume(model, volume, "cpu")
    probabilities = torch.cat([p for _, p in slice_probabilities(model, volume, "cpu")], dim=1)
    argmax = np.moveaxis(np.array([0, 1, 2])[probabilities.argmax(dim=0).numpy()], 0, volume.slice_axis())
    assert np.array_equal(prediction, keep_largest_pieces(argmax, [1, 2]))


def test_affinity_and_pseudo_label_terms_train_and_report():
    volume, labels = two_organ_volume()
    case = Case(volume, simulate_clicks(labels, seed=0))
    settings = TrainSettings(**{**TINY, "method": "pscv", "iterations": 40, "learning_rate": 0.05,
                                "affinity_weight": 1.0, "pseudo_weight": 1.0, "pseudo_start": 0.5,
                                "pseudo_threshold": 0.5, "cv_map": "probability", "cv_pool": 4})
    history = train([case], CLASSES, settings).metadata["history"]
    assert {"pce", "cv", "affinity"} <= set(history[0]) and "pseudo" not in history[0]
    assert "pseudo" in history[-1] and history[-1]["pseudo"] > 0


def test_affine_augmentation_moves_clicks_with_the_image_and_keeps_orientation():
    from pscv.learn.augmentation import affine_batch

    generator = torch.Generator().manual_seed(0)
    dense = torch.zeros(6, 48, 48, dtype=torch.uint8)
    dense[:, 8:24, 6:20], dense[:, 28:44, 26:42] = 1, 2  # organ 1 up left, organ 2 down right
    sparse = torch.full_like(dense, 255)
    rows, cols = torch.randint(12, 36, (2, 6, 30), generator=generator)
    for b in range(6):
        sparse[b, rows[b], cols[b]] = dense[b, rows[b], cols[b]]
    images, moved, (warped,) = affine_batch(dense[:, None].float(), sparse, [dense], generator, intensity=0.0)
    clicked = moved != 255
    assert clicked.sum() == (sparse != 255).sum()  # clicks away from the border all stay
    # each click still lies in its class (up to a pixel of rounding at the edges), the image moved alike
    assert (moved[clicked] == warped[clicked]).float().mean() > 0.97
    assert (images[:, 0].round() == warped).float().mean() > 0.97
    for b in range(6):  # a rotation of at most 20 degrees: organ 1 stays left of and above organ 2
        first, second = torch.nonzero(warped[b] == 1).float().mean(0), torch.nonzero(warped[b] == 2).float().mean(0)
        assert first[0] < second[0] and first[1] < second[1]
    _, _, (same,) = affine_batch(dense[:, None].float(), sparse, [dense], generator, aligned=True)
    assert all(torch.equal(same[0], same[b]) for b in range(6))  # one transform for the whole batch


@pytest.mark.parametrize("extra", [{"optimizer": "adam", "learning_rate": 0.003}, {"augment": "affine"},
                                   {"crf_weight": 0.1}, {"absent_weight": 1.0},
                                   {"dmpls_weight": 0.5}])
def test_recipe_ingredients_train_and_save_a_plain_model(extra, tmp_path):
    from pscv.learn.models import load_model, save_model

    volume, labels = two_organ_volume()
    case = Case(volume, simulate_clicks(labels, seed=0))
    model = train([case], CLASSES, TrainSettings(**{**TINY, "method": "pce", "iterations": 40, "learning_rate": 0.05,
                                                    **extra}))
    history = model.metadata["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert all((term in history[0]) == (f"{term}_weight" in extra) for term in ("crf", "absent", "dmpls"))
    assert "auxiliary_decoder" not in model.metadata["network"]  # DMPLS's second decoder is for training only
    assert not any(name.startswith("aux_") for name in model.network.state_dict())
    save_model(model, tmp_path / "model")
    assert torch.equal(load_model(tmp_path / "model").network(torch.zeros(1, 1, 32, 32)),
                       model.network(torch.zeros(1, 1, 32, 32)))


def test_same_seed_same_model():
    volume, labels = two_organ_volume(slices=4, size=32)
    case = Case(volume, simulate_clicks(labels, seed=0))
    settings = TrainSettings(method="pscv", iterations=5, **TINY)
    first, second = train([case], CLASSES, settings), train([case], CLASSES, settings)
    for a, b in zip(first.network.state_dict().values(), second.network.state_dict().values()):
        assert torch.equal(a, b)
    third = train([case], CLASSES, TrainSettings(method="pscv", iterations=5, seed=1, **TINY))
    assert not torch.equal(next(iter(third.network.parameters())), next(iter(first.network.parameters())))


def test_prediction_follows_the_slice_axis_of_the_largest_spacing():
    volume, labels = two_organ_volume(slices=6, size=32)
    # The same volume transposed so that slices run along i: spacing (4, 1, 1) in (i, j, k) order.
    moved = volume.with_array(volume.array)
    moved.array = np.ascontiguousarray(np.moveaxis(volume.array, 0, 2))
    moved.spacing = np.array([4.0, 1.0, 1.0])
    moved_labels = np.moveaxis(labels, 0, 2)
    assert moved.slice_axis() == 2
    clicks = simulate_clicks(moved_labels, seed=0, slice_axis=2)
    model = train([Case(moved, clicks)], CLASSES,
                  TrainSettings(method="pce", iterations=60, learning_rate=0.05, **TINY))
    prediction = predict_volume(model, moved, "cpu")
    assert prediction.shape == moved_labels.shape
    assert dice(prediction == 1, moved_labels == 1) > 0.6


def test_training_refuses_clicks_of_one_class_only():
    volume, labels = two_organ_volume(slices=3, size=32)
    clicks = simulate_clicks(labels, seed=0)
    only_background = Clicks(clicks.kji[clicks.values == 0], clicks.values[clicks.values == 0])
    with pytest.raises(PSCVError, match="background and on at least one organ"):
        train([Case(volume, only_background)], CLASSES, TrainSettings(iterations=1, **TINY))


def test_full_needs_labels():
    volume, labels = two_organ_volume(slices=3, size=32)
    with pytest.raises(PSCVError, match="dense labels"):
        train([Case(volume, simulate_clicks(labels, 0))], CLASSES,
              TrainSettings(method="full", iterations=1, **TINY))


def test_unknown_setting_is_named():
    with pytest.raises(PSCVError, match="cv_wieght"):
        TrainSettings.from_dict({"cv_wieght": 0.1})


def test_cancel_stops_training_at_the_next_step():
    volume, labels = two_organ_volume(slices=3, size=32)
    from pscv.base.progress import Cancelled

    steps = []
    with pytest.raises(Cancelled):
        train([Case(volume, simulate_clicks(labels, 0))], CLASSES, TrainSettings(iterations=1000, **TINY),
              progress=lambda event: steps.append(event.get("step")), should_stop=lambda: len(steps) > 3)
    assert len(steps) <= 5


def test_progress_reaches_the_end_of_loading_and_shows_each_steps_own_loss(monkeypatch):
    """Every step reported (the clock runs a second per call): the loss shown is that step's, not one ten steps
    old, and the load stage ends at 1/1 (issue 13)."""
    import functools
    import itertools

    from pscv.base import progress as progress_module
    from pscv.learn import training as training_module

    clock = itertools.count()
    monkeypatch.setattr(training_module, "Reporter",
                        functools.partial(progress_module.Reporter, clock=lambda: float(next(clock))))
    volume, labels = two_organ_volume(slices=3, size=32)
    events = []
    train([Case(volume, simulate_clicks(labels, 0))], CLASSES, TrainSettings(method="pce", iterations=10, **TINY),
          progress=events.append)
    assert [(e["step"], e["total"]) for e in events if e["stage"] == "load"] == [(0, 1), (1, 1)]
    losses = [e["loss"] for e in events if e["stage"] == "train"]
    assert len(losses) == 10 and len(set(losses[:9])) == 9  # not the first step's loss shown nine times
