"""The single-case mode a Slicer user needs: train on one image's own clicks, then segment all of it."""

from __future__ import annotations

import numpy as np

from .classes import ClassInfo
from .clicks import Clicks
from .devices import resolve_device
from .inference import predict_volume
from .models import Model
from .training import TrainingCase, TrainSettings, train
from .volumes import Volume

# The default budget: about a minute of training on 2 CPU cores for a 10-slice 256x216 volume; a GPU
# affords the full-resolution network and many more iterations in less time.
CPU_BUDGET = {"iterations": 300, "image_size": 128, "batch_size": 8}
GPU_BUDGET = {"iterations": 2000, "image_size": 256, "batch_size": 12}


def case_settings(device: str = "auto", **overrides) -> TrainSettings:
    """Training settings for one case: the budget that suits the device, then the caller's overrides."""
    budget = CPU_BUDGET if resolve_device(device).type == "cpu" else GPU_BUDGET
    return TrainSettings.from_dict({**budget, "device": device, **overrides})


def segment_case(volume: Volume, clicks: Clicks, classes: list[ClassInfo], settings: TrainSettings | None = None,
                 progress=None, should_stop=None) -> tuple[np.ndarray, Model]:
    """Train on the clicks of `volume`, then segment every slice: (label map `[k, j, i]`, model)."""
    settings = settings or case_settings()
    model = train([TrainingCase(volume, clicks, name="case")], classes, settings, progress, should_stop)
    labelmap = predict_volume(model, volume, settings.device, progress=progress, should_stop=should_stop)
    return labelmap, model
