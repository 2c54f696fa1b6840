"""Dice and HD95 per class on the native grid (distances in mm through the voxel spacing).

Conventions for a class: both masks empty -> Dice 1 and HD95 0; one empty -> Dice 0 and HD95 NaN
(undefined; left out of means). HD95 is medpy's: the 95th percentile of the surface distances of both
directions together.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    total = prediction.sum() + truth.sum()
    if total == 0:
        return 1.0
    return float(2 * np.logical_and(prediction, truth).sum() / total)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                          border_value=0)


def hd95(prediction: np.ndarray, truth: np.ndarray, spacing_kji=(1.0, 1.0, 1.0)) -> float:
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    if not prediction.any() and not truth.any():
        return 0.0
    if not prediction.any() or not truth.any():
        return float("nan")
    surface_p, surface_t = _surface(prediction), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~surface_t, sampling=spacing_kji)[surface_p]
    to_prediction = ndimage.distance_transform_edt(~surface_p, sampling=spacing_kji)[surface_t]
    return float(np.percentile(np.concatenate([to_truth, to_prediction]), 95))


def evaluate_case(prediction: np.ndarray, truth: np.ndarray, classes, spacing_kji=(1.0, 1.0, 1.0)) -> dict:
    """{class name: {"dice", "hd95"}} for every class but background, plus "mean"."""
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth {truth.shape}")
    result = {}
    for info in classes:
        if info.value == 0:
            continue
        p, t = prediction == info.value, truth == info.value
        result[info.name] = {"dice": dice(p, t), "hd95": hd95(p, t, spacing_kji)}
    result["mean"] = mean_scores(list(result.values()))
    return result


def mean_scores(scores: list[dict]) -> dict:
    """Mean of each metric over a list of {"dice", "hd95"}, NaNs left out."""
    out = {}
    for key in ("dice", "hd95"):
        values = np.array([s[key] for s in scores], dtype=float)
        out[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return out
