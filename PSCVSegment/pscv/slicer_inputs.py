"""The 3D Slicer module's inputs, prepared without Slicer: every decision the module makes that needs no Slicer.

The module collects what Slicer holds (the volume's voxel array `[k, j, i]`, its IJK-to-RAS matrix, the
inverse of its parent transform, and per class the world RAS positions of the defined control points)
and hands it here as numpy arrays and lists. This module validates it, converts points to voxels
(`pscv.data.geometry`) and writes the files a worker reads: `image.nrrd`, `points.mrk.json` (in the image's
LPS) and `classes.json`; they are then submitted with `pscv.jobs.client.JobClient.submit`. It also turns
worker events into progress-bar text and says which existing segments a result would replace.
Nothing here imports slicer, qt, vtk or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import PSCVError
from .data.classes import ClassInfo, parse_classes, write_classes
from .data.clicks import Clicks, write_markups
from .data.geometry import volume_from_ijk_to_ras, world_to_kji
from .data.volumes import Volume, write_image

IMAGE_FILE = "image.nrrd"
POINTS_FILE = "points.mrk.json"
CLASSES_FILE = "classes.json"
DEVICES = ("auto", "cuda", "cpu")
STAGE_NAMES = {"load": "Loading", "train": "Training", "predict": "Segmenting", "write": "Writing results"}


@dataclass
class PointList:
    """The defined control points of one class: `world_ras` (N, 3) in world RAS; labels name them in messages."""

    name: str
    world_ras: np.ndarray
    labels: list = field(default_factory=list)

    def __post_init__(self):
        self.world_ras = np.asarray(self.world_ras, dtype=float).reshape(-1, 3)


def classes_from_names(names, colors=None) -> list[ClassInfo]:
    """Classes in table order: the first row is the background (value 0), the others get 1, 2, ...

    `colors` are (r, g, b) in 0..1, as Slicer display nodes give them, or None for the default colours.
    Names must be unique (case-insensitive) and non-empty.
    """
    items = []
    for value, name in enumerate(names):
        item = {"name": str(name).strip(), "value": value}
        if colors is not None and colors[value] is not None:
            item["color"] = [min(255, max(0, round(float(c) * 255))) for c in colors[value]]
        items.append(item)
    return parse_classes({"classes": items}, "classes table")


def clicks_from_point_lists(point_lists: list[PointList], classes: list[ClassInfo], ras_to_ijk,
                            world_to_local=None, shape_kji=None, require_all=True) -> Clicks:
    """Voxel clicks `[k, j, i]` with class values, from point lists named after the classes.

    With `require_all` every class needs at least one point (training learns only from clicked classes,
    background included). A point outside the image, a list naming no class, or two lists for one class
    raise `PSCVError` naming the class and the point.
    """
    by_name = {c.name.lower(): c for c in classes}
    seen = set()
    kji, values = [], []
    first_at: dict[tuple, tuple[str, str]] = {}  # voxel -> (class, point label) of the first point there
    for point_list in point_lists:
        info = by_name.get(point_list.name.strip().lower())
        if info is None:
            raise PSCVError(f"point list {point_list.name!r} names no class; the classes are "
                            f"{', '.join(c.name for c in classes)}")
        if info.name in seen:
            raise PSCVError(f"class {info.name!r} has two point lists; use one list per class")
        seen.add(info.name)
        if not len(point_list.world_ras):
            continue
        labels = point_list.labels or [f"{info.name} point {n + 1}" for n in range(len(point_list.world_ras))]
        try:
            voxels = world_to_kji(point_list.world_ras, ras_to_ijk, world_to_local, shape_kji, labels)
        except PSCVError as error:
            raise PSCVError(f"class {info.name!r}: {error}") from None
        for voxel, label in zip(map(tuple, voxels.tolist()), labels):
            other_class, other_label = first_at.setdefault(voxel, (info.name, label))
            if other_class != info.name:
                raise PSCVError(f"{label!r} ({info.name}) and {other_label!r} ({other_class}) fall in the same "
                                f"voxel [k, j, i] = {list(voxel)}; move or delete one of them")
        kji.append(voxels)
        values.extend([info.value] * len(voxels))
    if require_all:
        missing = [c.name for c in classes if c.value not in set(values)]
        if missing:
            raise PSCVError(f"no points on class(es) {', '.join(missing)}: place at least one point on each "
                            "class, background included (a few slices, one point per class on each)")
    kji = np.concatenate(kji) if kji else np.zeros((0, 3), dtype=np.int64)
    return Clicks(kji, np.array(values, dtype=np.int64))


def write_job_inputs(directory, image_kji: np.ndarray, ijk_to_ras, classes: list[ClassInfo] | None,
                     point_lists: list[PointList] | None = None, world_to_local=None,
                     require_all=True) -> dict:
    """Write `image.nrrd`, `classes.json` (when classes are given) and `points.mrk.json` (when point lists
    are given) into `directory`.

    Returns the file keyword arguments for `JobClient.submit`: `image`, and `classes` and `points` when
    written. The image keeps the volume's own (untransformed) geometry; points go from world RAS through
    `world_to_local` into that geometry, so image and clicks agree even when the volume is transformed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    volume: Volume = volume_from_ijk_to_ras(image_kji, ijk_to_ras)
    if point_lists is not None and classes is None:
        raise PSCVError("point lists need their classes")
    inputs = {"image": str(directory / IMAGE_FILE)}
    if classes is not None:
        inputs["classes"] = str(directory / CLASSES_FILE)
    if point_lists is not None:
        ras_to_ijk = np.linalg.inv(np.asarray(ijk_to_ras, dtype=float))
        clicks = clicks_from_point_lists(point_lists, classes, ras_to_ijk, world_to_local, volume.shape,
                                         require_all)
        write_markups(clicks, volume, classes, directory / POINTS_FILE)
        inputs["points"] = [str(directory / POINTS_FILE)]
    write_image(volume, inputs["image"])
    if classes is not None:
        write_classes(classes, inputs["classes"])
    return inputs


def job_settings(device="auto", iterations=None, **extra) -> dict:
    """The `settings` of a job from the module's Advanced section (device, iterations, other engine settings).
    Iterations None or 0 leave the number to the engine (`pscv.learn.single_case.model_settings`: the device's
    budget)."""
    device = str(device or "auto").lower()
    if device not in DEVICES and not device.startswith("cuda:"):
        raise PSCVError(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    settings = {"device": device}
    if iterations:
        if int(iterations) < 1:
            raise PSCVError(f"iterations must be at least 1 (or 0 for the engine's default), got {iterations}")
        settings["iterations"] = int(iterations)
    settings.update(extra)
    return settings


def describe_event(event: dict) -> tuple[float | None, str]:
    """(fraction done 0..1 or None, one line of text) for a progress bar, from one worker event."""
    kind = event.get("event")
    if kind == "progress":
        stage = STAGE_NAMES.get(event.get("stage"), str(event.get("stage", "")).capitalize() or "Working")
        step, total = event.get("step"), event.get("total")
        fraction = min(1.0, max(0.0, step / total)) if step is not None and total else None
        text = f"{stage} {step}/{total}" if fraction is not None else stage
        if event.get("loss") is not None:
            text += f", loss {event['loss']:.3f}"
        if event.get("seconds_left") is not None:
            text += f", {format_duration(event['seconds_left'])} left"
        if event.get("device"):
            text += f" ({event['device']})"
        return fraction, text
    if kind == "queued":
        return 0.0, "Queued on the server"
    if kind == "started":
        return 0.0, "Started"
    if kind == "done":
        return 1.0, "Done"
    if kind == "cancelled":
        return None, "Cancelled"
    if kind == "error":
        return None, f"Failed: {event.get('message', 'unknown error')}"
    if kind == "warning":
        return None, f"Warning: {event.get('message', '')}"
    return None, str(kind or "")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(float(seconds))))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def segments_to_replace(existing_names, new_segments) -> list[str]:
    """Names of existing segments that new segments would replace (same name, case-insensitive).

    `new_segments` are segment names or `ClassInfo`s; the background class (value 0) makes no segment.
    """
    wanted = {s.name.lower() if isinstance(s, ClassInfo) else str(s).lower()
              for s in new_segments if not (isinstance(s, ClassInfo) and s.value == 0)}
    return [name for name in existing_names if str(name).lower() in wanted]


def new_class_names(existing_names) -> list[str]:
    """Names for the "Add class" button: background and a first organ on an empty table, else the next organ."""
    taken = {str(name).strip().lower() for name in existing_names}
    if not taken:
        return ["background", "organ 1"]
    number = len(taken)
    while f"organ {number}" in taken:
        number += 1
    return [f"organ {number}"]


def highdicom_requirement(pydicom_version: str | None) -> str:
    """The highdicom to pip-install next to an existing pydicom without upgrading it.

    highdicom 0.23 and later need pydicom 3; 0.22 works with pydicom 2.3 and newer 2.x (not 2.4.0).
    """
    if pydicom_version is None:
        return "highdicom"
    try:
        major = int(str(pydicom_version).split(".")[0])
    except ValueError:
        return "highdicom"
    return "highdicom" if major >= 3 else "highdicom<0.23"
