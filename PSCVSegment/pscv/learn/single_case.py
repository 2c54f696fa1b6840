"""The single-case mode: segment one image from its own clicks and strokes, and suggest where to click next.

A network is trained on the result only when the user wants a model to keep or refine.

The segmentation spreads the clicks with a random walker (`random_walker`) inside the region around the organ
clicks, whose border is taken as background; everything outside it is background. This measured well above
both Grow from seeds and a network trained on the clicks alone, at every round of a simulated session
(BENCHMARKS.md, `pscv bench interactive`). The network (`train_case_model`) learns the random walker's label
map of the whole image, so it can segment other images like it; `--refine` continues it from an earlier run.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from .. import PSCVError
from ..base.progress import Reporter
from ..data.classes import ClassInfo
from ..data.clicks import Clicks, click_region
from ..data.dataset import Case
from ..data.intensity import DEFAULT_NORMALIZATION, normalize
from ..data.volumes import Volume
from .budgets import CASE_CPU_BUDGET, CASE_GPU_BUDGET
from .random_walker import UNLABELLED, random_walker

if TYPE_CHECKING:  # torch is imported only to train a network, so that `pscv --help` stays instant
    from .models import Model
    from .training import TrainSettings

# A network for the single case learns the random walker's label map: dense labels (`full`), with the device's
# budget (pscv.learn.budgets). A refined model (`--refine`) continues for a short schedule.
CPU_BUDGET, GPU_BUDGET = CASE_CPU_BUDGET, CASE_GPU_BUDGET
REFINE_FRACTION = 0.2  # a refined model trains this fraction of the budget's iterations
MODEL_DEFAULTS = {"method": "full"}


@dataclass
class CaseSettings:
    """How the single-case mode segments (`pscv segment --set KEY=VALUE`). Chosen on ACDC train volumes with
    `pscv bench interactive --split train`, checked on the ACDC and CMR val volumes (BENCHMARKS.md)."""

    region_margin: float = 0.1  # the region: the organ clicks' in-plane box grown by this fraction (>= 8 voxels)
    walker_beta: float = 3000.0  # how strongly an intensity step (image scaled to [0, 1]) stops the random walk
    walker_tolerance: float = 1e-3  # relative residual at which the random walker's solver stops
    suggest: int = 0  # how many places to suggest for the next clicks (`suggest_points`), at most one per slice
    train_model: bool = False  # also train a network on the result (`train_case_model`); a refine job always does

    def __post_init__(self):
        from .settings import CASE_SCHEMA, check_settings  # the one schema (a bad value names the setting)

        for key, value in check_settings(asdict(self), "", CASE_SCHEMA).items():
            setattr(self, key, value)

    def to_dict(self) -> dict:
        return asdict(self)


CASE_KEYS = tuple(f.name for f in fields(CaseSettings))


def split_settings(settings: dict) -> tuple[CaseSettings, dict]:
    """Job or command-line settings -> (the segmentation's CaseSettings, the rest: the network's settings), each
    checked against its schema (`learn.settings`: the normalisation is used even without a network)."""
    from .settings import check_case_settings

    case = {k: v for k, v in settings.items() if k in CASE_KEYS}
    return CaseSettings(**case), check_case_settings({k: v for k, v in settings.items() if k not in CASE_KEYS})


def model_settings(device: str = "auto", refine: bool = False, **overrides) -> TrainSettings:
    """The network's settings for one case: the device's budget (shorter to refine), then the overrides."""
    from .devices import resolve_device
    from .settings import check_case_settings
    from .training import TrainSettings

    check_case_settings(overrides)  # unknown names (the nearest of both schemas) and bad values, named
    budget = dict(CPU_BUDGET if resolve_device(device).type == "cpu" else GPU_BUDGET)
    if refine:
        budget["iterations"] = max(1, round(budget["iterations"] * REFINE_FRACTION))
    return TrainSettings.from_dict({**MODEL_DEFAULTS, **budget, "device": device, **overrides})


@dataclass
class CaseResult:
    labelmap: np.ndarray  # [k, j, i] class values, the whole image
    probabilities: np.ndarray  # (classes, *region shape) float32: each class's probability inside the region
    region: tuple  # the region (slices of [k, j, i]) the probabilities cover


def region_seeds(clicks: Clicks, classes: list[ClassInfo], region, shape, slice_axis: int) -> np.ndarray:
    """Class indices to start the random walk from, on the region's grid: the region's in-plane border is
    background (where it lies inside the image), then the clicks inside the region."""
    index_of = {c.value: n for n, c in enumerate(classes)}
    size = tuple(r.stop - r.start for r in region)
    seeds = np.full(size, UNLABELLED, dtype=np.int16)
    for axis in range(3):
        if axis == slice_axis:
            continue
        for side, at_image_edge in ((0, region[axis].start == 0), (-1, region[axis].stop == shape[axis])):
            if not at_image_edge:
                border = [slice(None)] * 3
                border[axis] = side
                seeds[tuple(border)] = index_of[0] if 0 in index_of else 0
    start = np.array([r.start for r in region])
    kji = clicks.kji - start
    inside = np.all((kji >= 0) & (kji < size), axis=1)
    seeds[tuple(kji[inside].T)] = [index_of[int(v)] for v in clicks.values[inside]]
    return seeds


def segment_case(volume: Volume, clicks: Clicks, classes: list[ClassInfo], settings: CaseSettings | None = None,
                 normalization: dict | None = None, progress=None, should_stop=None) -> CaseResult:
    """Segment `volume` from its clicks (strokes are clicks too: one per painted voxel)."""
    settings = settings or CaseSettings()
    reporter = Reporter("predict", 1, progress, should_stop)
    reporter.step(0, force=True)
    region = click_region(clicks, volume, settings.region_margin)
    seeds = region_seeds(clicks, classes, region, volume.shape, volume.slice_axis())
    image = normalize(volume.array, normalization or DEFAULT_NORMALIZATION)[region]
    probabilities = random_walker(image, seeds, len(classes), volume.spacing[::-1], settings.walker_beta,
                                  settings.walker_tolerance, should_stop=should_stop)
    values = np.array([c.value for c in classes])
    values = values.astype(np.uint8 if values.max() <= 255 else np.uint16)
    labelmap = np.zeros(volume.shape, dtype=values.dtype)
    labelmap[region] = values[probabilities.argmax(axis=0)]
    reporter.step(1, force=True)
    return CaseResult(labelmap, probabilities, region)


def suggest_points(result: CaseResult, classes: list[ClassInfo], slice_axis: int, count: int) -> Clicks:
    """Up to `count` places (at most one per slice) where the segmentation is least sure, each with the class it
    guesses there: the most interior voxel of the slice's largest region where the two likeliest classes are
    within 0.5 of each other (or the least sure voxel, where no such region exists); slices with the largest
    unsure regions first."""
    ordered = np.sort(result.probabilities, axis=0)
    unsure = 1.0 - (ordered[-1] - ordered[-2])
    guesses = result.probabilities.argmax(axis=0)
    candidates = []
    for index in range(unsure.shape[slice_axis]):
        plane = np.take(unsure, index, axis=slice_axis)
        components, found = ndimage.label(plane > 0.5)
        if found:
            sizes = np.bincount(components.ravel())[1:]
            largest = components == 1 + sizes.argmax()
            depth = ndimage.distance_transform_edt(np.pad(largest, 1))[1:-1, 1:-1]
            where, score = np.unravel_index(depth.argmax(), plane.shape), float(sizes.max())
        else:
            where = np.unravel_index(plane.argmax(), plane.shape)
            score = float(plane.max()) - 1.0  # below every slice that has an unsure region
        point = list(where)
        point.insert(slice_axis, index)
        candidates.append((score, point))
    candidates.sort(key=lambda item: -item[0])
    chosen = [point for _, point in candidates[:count]]
    start = np.array([r.start for r in result.region])
    kji = np.array(chosen, dtype=np.int64).reshape(-1, 3)
    values = np.array([classes[guesses[tuple(p)]].value for p in kji], dtype=np.int64)
    return Clicks(kji + start, values)


def image_fingerprint(volume: Volume) -> dict:
    """What identifies an image for `--refine`: its grid and a hash of its voxels."""
    digest = hashlib.sha1(np.ascontiguousarray(volume.array, dtype=np.float32).tobytes()).hexdigest()
    return {"shape": list(volume.shape), "spacing": [round(float(s), 6) for s in volume.spacing],
            "origin": [round(float(o), 4) for o in volume.origin], "sha1": digest}


def check_refinable(model: Model, volume: Volume, model_dir) -> None:
    """A model to refine must come from `pscv segment --save-model` on this very image."""
    trained_on = model.metadata.get("single_case", {}).get("image")
    if trained_on is None:
        raise PSCVError(f"{model_dir}: not a model saved by `pscv segment --save-model`; to adapt a cohort model "
                        "to this image use a finetune job (or `pscv train` with this case)")
    if trained_on != image_fingerprint(volume):
        raise PSCVError(f"{model_dir}: the model was trained on another image ({trained_on['shape']}); --refine "
                        "continues the model of an earlier run on the same image")


def train_case_model(volume: Volume, result: CaseResult, classes: list[ClassInfo], settings: TrainSettings,
                     clicks: int, initial: Model | None = None, progress=None, should_stop=None) -> Model:
    """A network that learns this image's segmentation (dense labels), from `initial`'s weights when refining."""
    from .training import train

    model = train([Case(volume, labels=result.labelmap, name="case")], classes, settings, progress, should_stop,
                  initial=initial)
    model.metadata["training"]["clicks"] = int(clicks)  # the user's, not the label map's voxels
    previous = (initial.metadata.get("single_case", {}).get("rounds", 0) if initial is not None else 0)
    model.metadata["single_case"] = {"image": image_fingerprint(volume), "clicks": int(clicks),
                                     "labels": "random walker on the clicks (pscv.learn.single_case)",
                                     "rounds": previous + 1}
    return model
