"""The single-case mode a Slicer user needs: train on one image's own clicks, then segment all of it."""

from __future__ import annotations

import numpy as np

from ..data.classes import ClassInfo
from ..data.clicks import Clicks
from ..data.dataset import Case
from ..data.volumes import Volume
from .budgets import CASE_CPU_BUDGET, CASE_GPU_BUDGET
from .devices import resolve_device
from .inference import predict_volume
from .models import Model
from .training import TrainSettings, train

# What worked best for one case on the ACDC val volumes (BENCHMARKS.md): train only around the organ clicks,
# a strong affinity term, pseudo-labels, a higher learning rate for the short schedule.
CASE_DEFAULTS = {"method": "pce", "roi_margin": 0.5, "affinity_weight": 3.0, "pseudo_weight": 1.0,
                 "learning_rate": 0.03}
# The default budget (pscv.learn.budgets): about a minute of training on 2 CPU cores for a 10-slice 256x216
# volume; a GPU affords the full-resolution network and many more iterations in less time.
CPU_BUDGET, GPU_BUDGET = CASE_CPU_BUDGET, CASE_GPU_BUDGET


def case_settings(device: str = "auto", **overrides) -> TrainSettings:
    """Training settings for one case: the budget that suits the device, then the caller's overrides."""
    budget = CPU_BUDGET if resolve_device(device).type == "cpu" else GPU_BUDGET
    return TrainSettings.from_dict({**CASE_DEFAULTS, **budget, "device": device, **overrides})


def click_region(clicks: Clicks, volume: Volume, margin: float) -> tuple[slice, slice, slice]:
    """The region of the volume around the organ clicks: their in-plane bounding box grown by `margin` times
    its size on each side (at least 8 voxels), all slices; the whole volume when no organ is clicked."""
    region = [slice(0, n) for n in volume.shape]
    organ = clicks.kji[clicks.values != 0]
    if not len(organ):
        return tuple(region)
    for axis in range(3):
        if axis == volume.slice_axis():
            continue
        low, high = organ[:, axis].min(), organ[:, axis].max() + 1
        grow = max(8, int(np.ceil(margin * (high - low))))
        region[axis] = slice(max(0, low - grow), min(volume.shape[axis], high + grow))
    return tuple(region)


def border_background_clicks(region: tuple[slice, slice, slice], slice_indices, slice_axis: int, step: int = 4):
    """Background clicks every `step` voxels along the border of the region (region coordinates) in the given
    slices: outside the margin around the organ clicks is taken to be background."""
    extent = [r.stop - r.start for r in region]
    plane_axes = [a for a in range(3) if a != slice_axis]
    rows, cols = extent[plane_axes[0]], extent[plane_axes[1]]
    ring = [(r, 0) for r in range(0, rows, step)] + [(r, cols - 1) for r in range(0, rows, step)]
    ring += [(0, c) for c in range(0, cols, step)] + [(rows - 1, c) for c in range(0, cols, step)]
    points = []
    for index in slice_indices:
        for r, c in ring:
            point = [0, 0, 0]
            point[slice_axis], point[plane_axes[0]], point[plane_axes[1]] = index, r, c
            points.append(point)
    return np.array(points, dtype=np.int64).reshape(-1, 3)


def segment_case(volume: Volume, clicks: Clicks, classes: list[ClassInfo], settings: TrainSettings | None = None,
                 progress=None, should_stop=None) -> tuple[np.ndarray, Model]:
    """Train on the clicks of `volume`, then segment every slice: (label map `[k, j, i]`, model).

    With `settings.roi_margin` set, only the region around the organ clicks is trained on and segmented
    (`click_region`); outside it, everything is background.
    """
    settings = settings or case_settings()
    if settings.roi_margin is None:
        model = train([Case(volume, clicks, name="case")], classes, settings, progress, should_stop)
        return predict_volume(model, volume, settings.device, progress=progress, should_stop=should_stop), model
    region = click_region(clicks, volume, settings.roi_margin)
    start = np.array([r.start for r in region])
    stop = np.array([r.stop for r in region])
    inside = np.all((clicks.kji >= start) & (clicks.kji < stop), axis=1)
    axis = volume.slice_axis()
    ring = border_background_clicks(region, np.unique(clicks.kji[:, axis]) - start[axis], axis)
    cropped_clicks = Clicks(np.concatenate([clicks.kji[inside] - start, ring]),
                            np.concatenate([clicks.values[inside], np.zeros(len(ring), dtype=np.int64)]))
    cropped = Volume(np.ascontiguousarray(volume.array[region]), volume.spacing, volume.index_to_lps(start[::-1]),
                     volume.direction)
    model = train([Case(cropped, cropped_clicks, name="case")], classes, settings, progress, should_stop)
    inside_labels = predict_volume(model, cropped, settings.device, progress=progress, should_stop=should_stop)
    labelmap = np.zeros(volume.shape, dtype=inside_labels.dtype)
    labelmap[region] = inside_labels
    return labelmap, model
