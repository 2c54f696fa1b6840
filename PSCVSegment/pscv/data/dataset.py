"""Dataset folders for cohort training and evaluation: find their cases, read them as plain data (`Case`).

```
DATASET/classes.json
DATASET/images/<case>.nrrd | .nii.gz | ...             the images (formats.IMAGE_SUFFIXES)
DATASET/points/<case>.mrk.json                         the clicks (cases without are skipped for training)
DATASET/labels/<case>.nrrd | ...                       optional dense truth: evaluation and `full` only
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import PSCVError
from .classes import ClassInfo, read_classes
from .clicks import Clicks, read_clicks
from .formats import IMAGE_SUFFIXES, READABLE_SEGMENTATION_SUFFIXES, SEG_NRRD
from .segmentations import read_segmentation
from .volumes import Volume, read_image


@dataclass
class DatasetCase:
    """Where one case of a dataset folder lies on disk."""

    name: str
    image: Path
    points: Path | None
    labels: Path | None


@dataclass
class Case:
    """One case in memory, for training or evaluation: its image, clicks and/or dense labels, and name."""

    image: Volume
    clicks: Clicks | None = None
    labels: np.ndarray | None = None  # dense class values [k, j, i]; for `full` and evaluation
    name: str = ""


def case_name(path: Path, suffixes=READABLE_SEGMENTATION_SUFFIXES) -> str | None:
    """`patient001_frame01.nii.gz` -> `patient001_frame01`, `case.seg.nrrd` -> `case`; None for a file whose name
    ends in none of `suffixes` (the longest that fits is taken off)."""
    for suffix in sorted(suffixes, key=len, reverse=True):
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _find(folder: Path, suffixes, skip=()) -> dict[str, Path]:
    found = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        name = case_name(path, suffixes)
        if name is None or path.name.startswith(".") or path.name.lower().endswith(tuple(skip)):
            continue
        if name in found:
            raise PSCVError(f"{folder}: two files for case {name!r}: {found[name].name} and {path.name}; keep one")
        found[name] = path
    return found


def find_images(folder: Path) -> dict[str, Path]:
    """The images of a folder by case name (`formats.IMAGE_SUFFIXES`; a `.seg.nrrd` is a segmentation, no image)."""
    return _find(Path(folder), IMAGE_SUFFIXES, skip=(SEG_NRRD,))


def find_segmentations(folder: Path) -> dict[str, Path]:
    """The segmentations of a folder by case name: `<case>.seg.nrrd` or a label map `<case>.nrrd|.nii.gz|...`."""
    return _find(Path(folder), READABLE_SEGMENTATION_SUFFIXES)


def read_dataset(folder: str | Path) -> tuple[list[ClassInfo], list[DatasetCase]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise PSCVError(f"{folder}: no such dataset folder (expected classes.json, images/, points/)")
    classes = read_classes(folder / "classes.json")
    images = find_images(folder / "images")
    if not images:
        raise PSCVError(f"{folder / 'images'}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    labels = find_segmentations(folder / "labels")
    cases = []
    for name, image in images.items():
        points = folder / "points" / f"{name}.mrk.json"
        cases.append(DatasetCase(name, image, points if points.is_file() else None, labels.get(name)))
    return classes, cases


def load_case(entry: DatasetCase, classes: list[ClassInfo], points: bool = True, labels: bool = False) -> Case:
    """Read one case of a dataset folder: its image, and its clicks and/or dense labels."""
    volume = read_image(entry.image)
    return Case(volume, read_clicks([entry.points], volume, classes) if points else None,
                read_segmentation(entry.labels, classes, volume) if labels else None, entry.name)


def load_training_cases(dataset_folder, method: str) -> tuple[list[ClassInfo], list[Case]]:
    """(classes, [Case]) of a dataset folder: cases with points, or with labels for `full`."""
    classes, entries = read_dataset(dataset_folder)
    full = method == "full"
    cases = [load_case(entry, classes, points=not full, labels=full) for entry in entries
             if (entry.labels if full else entry.points) is not None]
    if not cases:
        need = "labels/<case> files" if full else "points/<case>.mrk.json files"
        raise PSCVError(f"{dataset_folder}: no case to train on (method {method} needs {need})")
    return classes, cases
