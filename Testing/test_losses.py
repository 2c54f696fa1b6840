"""The losses on hand-made tensors: values checked by hand, finite gradients, absent classes."""

import math

import pytest
import torch
import torch.nn.functional as F

from pscv.learn.losses import (
    IGNORE,
    absent_class_penalty,
    background_cross_entropy,
    class_means,
    contrastive_variance,
    dense_cross_entropy,
    dice_to_labels,
    gated_crf,
    local_affinity,
    mixed_pseudo_labels,
    mumford_shah,
    partial_cross_entropy,
    pseudo_label_cross_entropy,
    variance_maps,
)


def test_partial_cross_entropy_uses_only_clicked_pixels():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, 0] = 10.0  # a confident wrong answer at an unclicked pixel must not count
    target = torch.full((1, 2, 2), IGNORE)
    target[0, 1, 1] = 0
    assert partial_cross_entropy(logits, target).item() == pytest.approx(math.log(2))


def test_partial_cross_entropy_weighs_every_clicked_class_the_same():
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1] = 2.0  # class 1 favoured everywhere
    target = torch.zeros(1, 4, 4, dtype=torch.long)  # 15 background clicks...
    target[0, 3, 3] = 1  # ...and one click of class 1
    background, organ = (-torch.log_softmax(torch.tensor([0.0, 2.0]), 0)).tolist()
    assert partial_cross_entropy(logits, target).item() == pytest.approx((background + organ) / 2, rel=1e-5)


def test_partial_cross_entropy_without_clicks_is_zero_with_a_gradient():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = partial_cross_entropy(logits, torch.full((2, 4, 4), IGNORE))
    loss.backward()
    assert loss.item() == 0 and torch.all(logits.grad == 0)


def test_class_means_and_variance_maps_by_hand():
    image = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # (1, 1, 2, 2)
    p1 = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    probabilities = torch.stack([p1, 1 - p1])[None]  # class 0 on the top row
    means = class_means(probabilities, image)
    assert means.flatten().tolist() == pytest.approx([0.5, 2.5], abs=1e-5)
    maps = variance_maps(probabilities, image)
    assert maps[0, 0].flatten().tolist() == pytest.approx([0.25, 0.25, 0, 0], abs=1e-5)
    assert maps[0, 1].flatten().tolist() == pytest.approx([0, 0, 0.25, 0.25], abs=1e-5)


def test_mumford_shah_zero_for_a_perfect_piecewise_constant_split():
    image = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]])
    top = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert mumford_shah(torch.stack([top, 1 - top])[None], image).item() == pytest.approx(0, abs=1e-6)
    uniform = torch.full((1, 2, 2, 2), 0.5)  # both classes everywhere: mean 0.5, squared error 0.25
    assert mumford_shah(uniform, image).item() == pytest.approx(0.25, abs=1e-5)


def test_contrastive_variance_infonce_value_for_orthogonal_classes():
    # Two images, two classes; class maps identical across images and orthogonal between classes:
    # every positive has similarity 1/tau and its single negative 0.
    maps = torch.zeros(2, 2, 1, 2)
    maps[:, 0, 0, 0] = 1.0
    maps[:, 1, 0, 1] = 1.0
    tau = 0.5
    expected = math.log(1 + math.exp(-1 / tau))
    assert contrastive_variance(maps, temperature=tau).item() == pytest.approx(expected, rel=1e-5)
    # SupCon pairing: the denominator holds the positive and the negative too: the same value here.
    assert contrastive_variance(maps, temperature=tau, pairing="supcon").item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_variance_is_larger_when_classes_are_confused():
    aligned = torch.zeros(2, 2, 1, 2)
    aligned[:, 0, 0, 0] = 1.0
    aligned[:, 1, 0, 1] = 1.0
    swapped = aligned.clone()
    swapped[1] = aligned[1].flip(0)  # image 1's classes swapped: positives are now orthogonal
    assert contrastive_variance(swapped, temperature=0.5) > contrastive_variance(aligned, temperature=0.5) + 0.5


def test_contrastive_variance_absent_classes_and_zero_maps_stay_finite():
    maps = torch.zeros(3, 4, 8, 8, requires_grad=True)  # every class absent: all maps zero
    present = torch.zeros(3, 4, dtype=torch.bool)
    present[:, :2] = True
    loss = contrastive_variance(maps, present)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(maps.grad).all()
    none_shared = torch.tensor([[True, False], [False, True]])  # no class present in two images
    assert contrastive_variance(torch.rand(2, 2, 4, 4), none_shared).item() == 0
    assert contrastive_variance(torch.rand(1, 3, 4, 4)).item() == 0  # one image: nothing to contrast


def test_contrastive_variance_gradient_through_variance_maps_is_finite():
    logits = torch.randn(4, 3, 16, 16, requires_grad=True)
    image = torch.rand(4, 1, 16, 16)
    present = torch.tensor([[True, True, False]] * 4)
    loss = contrastive_variance(variance_maps(logits.softmax(1), image), present)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_dense_cross_entropy_small_for_the_right_answer():
    target = torch.tensor([[[0, 1], [1, 0]]])
    right = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 20
    assert dense_cross_entropy(right, target).item() < 0.01
    assert dense_cross_entropy(-right, target).item() > 1


def test_local_affinity_rewards_agreement_on_uniform_regions():
    image = torch.zeros(1, 1, 8, 8)
    smooth = torch.zeros(1, 2, 8, 8)
    smooth[:, 0] = 1
    checker = torch.zeros(1, 2, 8, 8)
    checker[:, 0] = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2
    checker[:, 1] = 1 - checker[:, 0]
    assert local_affinity(smooth, image).item() == pytest.approx(0, abs=1e-6)
    assert local_affinity(checker, image).item() > 0.3
    edge = torch.zeros(1, 1, 8, 8)
    edge[..., 4:] = 1  # a strong edge between two halves: disagreeing across it costs (almost) nothing
    halves = torch.zeros(1, 2, 8, 8)
    halves[:, 0, :, :4] = 1
    halves[:, 1, :, 4:] = 1
    assert local_affinity(halves, edge).item() < 1e-3


def test_pseudo_labels_only_from_confident_pixels_and_clicks_overrule():
    teacher = torch.tensor([[0.95, 0.05], [0.6, 0.4]]).T.reshape(1, 2, 1, 2)  # pixel 0 sure of 0, pixel 1 unsure
    logits = torch.zeros(1, 2, 1, 2)
    no_clicks = torch.full((1, 1, 2), IGNORE)
    assert pseudo_label_cross_entropy(logits, teacher, no_clicks, 0.9).item() == pytest.approx(math.log(2))
    clicks = no_clicks.clone()
    clicks[0, 0, 0] = 1  # a click disagreeing with the teacher wins
    logits[0, 1, 0, 0] = 5.0
    value = pseudo_label_cross_entropy(logits, teacher, clicks, 0.9).item()
    assert value == pytest.approx(-torch.log_softmax(torch.tensor([0.0, 5.0]), 0)[1].item(), rel=1e-5)


def gated_crf_by_unfolding(probabilities, image, radius=5, sigma_xy=6.0, sigma_intensity=0.1):
    """The gated CRF loss written out as the Gated CRF paper's formula over unfolded neighbourhoods (pairs
    leaving the image not counted): what `gated_crf` computes without unfolding."""
    batch, classes, height, width = probabilities.shape
    size = 2 * radius + 1
    rows, cols = torch.meshgrid(torch.arange(height, dtype=image.dtype), torch.arange(width, dtype=image.dtype),
                                indexing="ij")
    features = torch.cat([cols.expand(batch, 1, height, width) / sigma_xy,
                          rows.expand(batch, 1, height, width) / sigma_xy, image / sigma_intensity], dim=1)
    neighbours = F.unfold(features, size, padding=radius).view(batch, 3, size * size, height * width)
    centre = features.view(batch, 3, 1, height * width)
    kernel = torch.exp(-0.5 * ((neighbours - centre) ** 2).sum(dim=1))
    kernel = kernel * F.unfold(torch.ones_like(image), size, padding=radius).view(batch, size * size, -1)
    kernel[:, size * size // 2] = 0
    p_neighbours = F.unfold(probabilities, size, padding=radius).view(batch, classes, size * size, -1)
    agreement = (p_neighbours * probabilities.view(batch, classes, 1, -1)).sum(dim=1)
    return (kernel * (1 - agreement)).sum() / (batch * height * width)


def test_gated_crf_equals_the_unfolded_formula_in_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 13, 11, dtype=torch.float64, requires_grad=True)
    image = torch.rand(2, 1, 13, 11, dtype=torch.float64)
    ours = gated_crf(logits.softmax(dim=1), image, radius=3, sigma_xy=2.0, sigma_intensity=0.3)
    (gradient,) = torch.autograd.grad(ours, logits)
    reference = gated_crf_by_unfolding(logits.softmax(dim=1), image, radius=3, sigma_xy=2.0, sigma_intensity=0.3)
    (expected,) = torch.autograd.grad(reference, logits)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-9)
    assert torch.allclose(gradient, expected, atol=1e-12)


def test_gated_crf_is_zero_for_agreeing_certain_pixels_and_ignores_edges_across_intensity_jumps():
    image = torch.zeros(1, 1, 8, 8)
    image[..., 4:] = 1.0  # a sharp edge between columns 3 and 4
    split = torch.zeros(1, 2, 8, 8)
    split[:, 0, :, :4], split[:, 1, :, 4:] = 1.0, 1.0  # the labels change exactly at the edge
    assert gated_crf(split, image).item() == pytest.approx(0, abs=1e-6)
    shifted = torch.zeros(1, 2, 8, 8)
    shifted[:, 0, :, :2], shifted[:, 1, :, 2:] = 1.0, 1.0  # a label change inside a flat region costs
    assert gated_crf(shifted, image).item() > 0.5


def test_dice_to_labels_and_mixed_pseudo_labels():
    target = torch.tensor([[[0, 1], [1, 1]]])
    perfect = F.one_hot(target, 2).permute(0, 3, 1, 2).float()
    assert dice_to_labels(perfect, target).item() == pytest.approx(0, abs=1e-5)
    assert dice_to_labels(1 - perfect, target).item() == pytest.approx(1, abs=1e-5)
    main = torch.tensor([[[[0.9]], [[0.1]]]])
    auxiliary = torch.tensor([[[[0.2]], [[0.8]]]])
    assert mixed_pseudo_labels(main, auxiliary, 0.9).item() == 0 and mixed_pseudo_labels(main, auxiliary, 0.1) == 1


def test_background_cross_entropy_counts_only_the_pixels_given():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1, 0, 0] = 10.0  # sure of class 1 where the mask says nothing: must not count
    where = torch.zeros(1, 2, 2, dtype=torch.bool)
    where[0, 1, :] = True
    assert background_cross_entropy(logits, where).item() == pytest.approx(math.log(3))
    logits[0, 0, 1, :] = 10.0  # sure of background where the mask holds: almost no loss
    assert background_cross_entropy(logits, where).item() < 1e-3
    empty = background_cross_entropy(logits.requires_grad_(), torch.zeros_like(where))
    assert empty.item() == 0.0 and empty.requires_grad


def test_absent_class_penalty_only_for_organ_classes_without_clicks():
    probabilities = torch.full((2, 3, 2, 2), 1 / 3)
    probabilities[1, :, 0, 0] = torch.tensor([0.0, 0.1, 0.9])  # class 2 likely at one pixel of slice 1
    present = torch.tensor([[True, True, True], [True, True, False]])  # background never absent
    expected = -math.log(1 - 1 / 3) * 3 / 4 - math.log(0.1) / 4  # slice 1, class 2: the mean over its pixels
    assert absent_class_penalty(probabilities, present).item() == pytest.approx(expected, rel=1e-4)
    probabilities[1, 2, 0, 0] = 1.0  # certain: large, yet finite
    assert math.isfinite(absent_class_penalty(probabilities, present).item())
    assert absent_class_penalty(probabilities, torch.ones(2, 3, dtype=torch.bool)).item() == 0.0
    correction_only = torch.tensor([[True, True, True], [False, True, False]])  # slice 1: no background click
    assert absent_class_penalty(probabilities, correction_only).item() == 0.0
    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)
    absent_class_penalty(logits.softmax(dim=1), torch.tensor([[True, False]])).backward()
    assert logits.grad[0, 1].gt(0).all()  # descent lowers the absent class everywhere
