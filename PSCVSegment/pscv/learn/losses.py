"""Losses: small pure functions of tensors.

Shapes: `logits` (B, K, H, W); `image` (B, 1, H, W) normalised intensities; `sparse_target` (B, H, W)
class indices with `IGNORE` where no click; `dense_target` (B, H, W) class indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = 255
EPS = 1e-6


def partial_cross_entropy(logits: torch.Tensor, sparse_target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the clicked pixels only, each clicked class weighing the same (the mean over classes
    of the mean over that class's clicks), so that many clicks of one class do not drown the others.
    0 when the batch holds no click."""
    target = sparse_target.long()
    clicked = target != IGNORE
    if not clicked.any():
        return logits.sum() * 0.0
    per_click = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")[clicked]
    labels = target[clicked]
    counts = torch.bincount(labels, minlength=logits.shape[1])
    sums = torch.zeros(logits.shape[1], device=logits.device).index_add_(0, labels, per_click)
    present = counts > 0
    return (sums[present] / counts[present]).mean()


def background_cross_entropy(logits: torch.Tensor, where: torch.Tensor, background: int = 0) -> torch.Tensor:
    """Cross-entropy to the background class (index `background`) over the pixels `where` (B, H, W) bool holds,
    their mean; 0 when it holds none."""
    if not where.any():
        return logits.sum() * 0.0
    target = torch.where(where, background, IGNORE).long()
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE)


def absent_class_penalty(probabilities: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Clicks come one per class present in a clicked slice, so an organ class without a click there is absent
    from it: the mean over such (slice, class) pairs of the mean over the slice's pixels of -log(1 - p).
    `present` (B, K) bool, class 0 the background. Only a slice with a background click counts as fully clicked
    (a lone correction click on an organ says nothing of the others); the background is never absent. 0 when
    no class is absent."""
    present = present.bool()
    absent = ~present & present[:, :1]
    if not absent.any():
        return probabilities.sum() * 0.0
    penalty = -torch.log1p(-probabilities.float().clamp(max=1 - EPS)).mean(dim=(2, 3))
    return penalty[absent].mean()


def dense_cross_entropy(logits: torch.Tensor, dense_target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice on every pixel: the fully supervised upper bound (the WSL4MIS recipe)."""
    probabilities = logits.float().softmax(dim=1)
    one_hot = F.one_hot(dense_target.long(), logits.shape[1]).permute(0, 3, 1, 2).float()
    intersection = (probabilities * one_hot).sum(dim=(0, 2, 3))
    dice = (2 * intersection + EPS) / (probabilities.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3)) + EPS)
    return 0.5 * F.cross_entropy(logits.float(), dense_target.long()) + 0.5 * (1 - dice.mean())


def class_means(probabilities: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """c_bk = sum_j p_bk(j) x_b(j) / sum_j p_bk(j): the mean intensity of each class, (B, K, 1, 1)."""
    mass = probabilities.sum(dim=(2, 3), keepdim=True)
    return (probabilities * image).sum(dim=(2, 3), keepdim=True) / (mass + EPS)


def variance_maps(probabilities: torch.Tensor, image: torch.Tensor, detach_means: bool = False) -> torch.Tensor:
    """z_bk(j) = p_bk(j) (x_b(j) - c_bk)^2, (B, K, H, W)."""
    means = class_means(probabilities, image)
    return probabilities * (image - (means.detach() if detach_means else means)) ** 2


def mumford_shah(probabilities: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The piecewise-constant Mumford-Shah energy sum_k p_k (x - c_k)^2, averaged over pixels and images."""
    return variance_maps(probabilities, image).sum(dim=1).mean()


def contrastive_variance(maps: torch.Tensor, present: torch.Tensor | None = None, temperature: float = 0.1,
                         pairing: str = "infonce") -> torch.Tensor:
    """Contrast the flattened per-class maps of different images of a batch.

    `maps` (B, K, ...); `present` optional bool (B, K): which classes each image holds (anchors and
    positives are then restricted to classes present in both images; absent maps are never used).
    For an anchor (b, k) the positives are (b', k) and the negatives (b', k'), k' != k, over b' != b.
    `pairing`: "infonce" scores each positive against the anchor's negatives; "supcon" scores each
    positive against all of the anchor's candidates (positives and negatives), as SupCon does.
    """
    batch, classes = maps.shape[:2]
    if batch < 2:
        return maps.sum() * 0.0
    features = F.normalize(maps.float().reshape(batch * classes, -1), dim=1, eps=EPS)
    similarity = features @ features.T / temperature  # (BK, BK)
    image_of = torch.arange(batch, device=maps.device).repeat_interleave(classes)
    class_of = torch.arange(classes, device=maps.device).repeat(batch)
    usable = (torch.ones(batch, classes, dtype=torch.bool, device=maps.device) if present is None
              else present.bool()).reshape(-1)
    other_image = image_of[:, None] != image_of[None, :]
    candidates = other_image & usable[:, None] & usable[None, :]
    positive = candidates & (class_of[:, None] == class_of[None, :])
    negative = candidates & ~positive
    if not positive.any():
        return maps.sum() * 0.0
    exp_similarity = torch.exp(similarity - similarity.max().detach())
    log_exp = similarity - similarity.max().detach()
    negative_sum = (exp_similarity * negative).sum(dim=1, keepdim=True)
    if pairing == "infonce":
        denominator = exp_similarity + negative_sum
    elif pairing == "supcon":
        denominator = (exp_similarity * candidates).sum(dim=1, keepdim=True).expand_as(similarity)
    else:
        raise ValueError(f"unknown pairing {pairing!r}: use infonce or supcon")
    log_probability = log_exp - torch.log(denominator + EPS)
    return -(log_probability * positive).sum() / positive.sum()


def pair_messages(image: torch.Tensor, tensors: list, radius: int, sigma_distance: float, sigma_intensity: float):
    """Sums over each pixel's neighbours n within `radius` (n != i, inside the image) with the Gaussian weight
    k(i, n) = exp(-|i - n|^2 / 2 sigma_distance^2 - (x_i - x_n)^2 / 2 sigma_intensity^2) of `image` (B, 1, H, W):
    returns (sum_n k(i, n) as (B, 1, H, W), [sum_n k(i, n) t_n for each tensor t (B, C, H, W)]).

    Offset by offset over shifted views (each pair once, added both ways: k is symmetric), without
    gradient: memory stays that of the inputs, where unfolding would copy them (2 radius + 1)^2 times."""
    batch, _, height, width = image.shape
    weights = torch.zeros_like(image)
    messages = [torch.zeros_like(t) for t in tensors]
    with torch.no_grad():
        for dy in range(0, min(radius, height - 1) + 1):
            for dx in range(-min(radius, width - 1), min(radius, width - 1) + 1):
                if dy == 0 and dx <= 0:
                    continue  # offsets of one half-plane: each pair once
                a = (slice(None), slice(None), slice(0, height - dy), slice(max(0, -dx), width - max(0, dx)))
                b = (slice(None), slice(None), slice(dy, height), slice(max(0, dx), width - max(0, -dx)))
                kernel = torch.exp(-(dy * dy + dx * dx) / (2 * sigma_distance**2)
                                   - (image[a] - image[b]) ** 2 / (2 * sigma_intensity**2))
                weights[a] += kernel
                weights[b] += kernel
                for tensor, message in zip(tensors, messages):
                    message[a] += kernel * tensor[b]
                    message[b] += kernel * tensor[a]
    return weights, messages


def with_gradient(value: torch.Tensor, probabilities: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """A scalar equal to `value` whose gradient with respect to `probabilities` is `gradient` (both computed
    without autograd by the caller): value + sum p g - sum p g, the last term held constant."""
    return value + (probabilities * gradient).sum() - (probabilities.detach() * gradient).sum()


def local_affinity(probabilities: torch.Tensor, image: torch.Tensor, radius: int = 2, sigma_intensity: float = 0.1,
                   sigma_distance: float = 2.0) -> torch.Tensor:
    """A CRF-like pairwise term: neighbours (within `radius`) of similar intensity should agree.

    Mean over pixels of sum_n w(i, n) (1 - p_i . p_n) / sum_n w(i, n), with
    w = exp(-(x_i - x_n)^2 / 2 sigma_intensity^2 - |i - n|^2 / 2 sigma_distance^2) (`pair_messages`), n != i inside
    the image; no gradient through the image. With W_i = sum_n w(i, n) and q_i = sum_n w(i, n) p_n the value is
    mean (W_i - p_i . q_i) / W_i and its gradient -(q / W + sum_i w(i, .) p_i / W_i) / pixels, both computed
    directly.
    """
    image = image.detach().to(probabilities.dtype)
    constant = probabilities.detach()
    weights, (message,) = pair_messages(image, [constant], radius, sigma_distance, sigma_intensity)
    with torch.no_grad():
        normaliser = weights + EPS
        value = ((weights - (constant * message).sum(dim=1, keepdim=True)) / normaliser).mean()
        _, (back,) = pair_messages(image, [constant / normaliser], radius, sigma_distance, sigma_intensity)
        gradient = -(message / normaliser + back) / (weights.numel())
    return with_gradient(value, probabilities, gradient)


def pseudo_label_cross_entropy(logits: torch.Tensor, teacher_probabilities: torch.Tensor,
                               sparse_target: torch.Tensor, threshold: float) -> torch.Tensor:
    """Cross-entropy on the teacher's confident pixels (max probability >= threshold); clicks overrule."""
    confidence, pseudo = teacher_probabilities.max(dim=1)
    target = torch.where(confidence >= threshold, pseudo, torch.full_like(pseudo, IGNORE))
    clicked = sparse_target.long() != IGNORE
    target = torch.where(clicked, sparse_target.long(), target)
    if not (target != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE)


def gated_crf(probabilities: torch.Tensor, image: torch.Tensor, radius: int = 5, sigma_xy: float = 6.0,
              sigma_intensity: float = 0.1) -> torch.Tensor:
    """The gated CRF loss (Obukhov et al. 2019) with the Potts model, as WSL4MIS trains ACDC with it:
    sum over pixel pairs (i, n) within `radius` (n != i) of k(i, n) (1 - p_i . p_n), divided by the number of
    pixels, with k = exp(-|i - n|^2 / 2 sigma_xy^2 - (x_i - x_n)^2 / 2 sigma_intensity^2) (distances in pixels
    of the network's input, intensities normalised; no gradient through the image).

    With q_i = sum_n k(i, n) p_n (`pair_messages`, no unfolding) the value is (sum k - sum p . q) / pixels and
    its gradient -2 q / pixels (k is symmetric). Pairs that would leave the image are not counted (WSL4MIS's
    zero padding counts a few of them).
    """
    batch, _, height, width = probabilities.shape
    image = image.detach().to(probabilities.dtype)
    constant = probabilities.detach()
    weights, (message,) = pair_messages(image, [constant], radius, sigma_xy, sigma_intensity)
    pixels = batch * height * width
    value = (weights.sum() - (constant * message).sum()) / pixels
    return with_gradient(value, probabilities, -2 * message / pixels)


def dice_to_labels(probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice between the probabilities and hard labels (B, H, W), per class over the whole batch
    (squared terms in the denominator, as DMPLS's pDLoss), averaged over the classes."""
    classes = probabilities.shape[1]
    one_hot = F.one_hot(target.long(), classes).permute(0, 3, 1, 2).to(probabilities.dtype)
    intersection = (probabilities * one_hot).sum(dim=(0, 2, 3))
    denominator = (probabilities**2).sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    return (1 - (2 * intersection + 1e-5) / (denominator + 1e-5)).mean()


def mixed_pseudo_labels(probabilities: torch.Tensor, auxiliary: torch.Tensor, mix: float) -> torch.Tensor:
    """DMPLS's pseudo-labels: argmax of mix p_main + (1 - mix) p_auxiliary (no gradient)."""
    return (mix * probabilities.detach() + (1 - mix) * auxiliary.detach()).argmax(dim=1)
