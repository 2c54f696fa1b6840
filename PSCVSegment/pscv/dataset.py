"""A dataset folder for cohort training and evaluation:

```
DATASET/classes.json
DATASET/images/<case>.nrrd | .nii.gz | .nii | .mha     the images
DATASET/points/<case>.mrk.json                         the clicks (cases without are skipped for training)
DATASET/labels/<case>.nrrd | ...                       optional dense truth: evaluation and `full` only
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import PSCVError
from .classes import ClassInfo, read_classes

IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii.gz", ".nii", ".mha", ".mhd")


@dataclass
class DatasetCase:
    name: str
    image: Path
    points: Path | None
    labels: Path | None


def case_name(path: Path) -> str | None:
    """`patient001_frame01.nii.gz` -> `patient001_frame01`; None for files that are no image."""
    for suffix in IMAGE_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def find_images(folder: Path) -> dict[str, Path]:
    images = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        name = case_name(path)
        if name is not None and not path.name.startswith("."):
            images[name] = path
    return images


def read_dataset(folder: str | Path) -> tuple[list[ClassInfo], list[DatasetCase]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise PSCVError(f"{folder}: no such dataset folder (expected classes.json, images/, points/)")
    classes = read_classes(folder / "classes.json")
    images = find_images(folder / "images")
    if not images:
        raise PSCVError(f"{folder / 'images'}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    labels = find_images(folder / "labels")
    cases = []
    for name, image in images.items():
        points = folder / "points" / f"{name}.mrk.json"
        cases.append(DatasetCase(name, image, points if points.is_file() else None, labels.get(name)))
    return classes, cases


def load_training_cases(dataset_folder, method: str):
    """(classes, [TrainingCase]) of a dataset folder: cases with points, or with labels for `full`."""
    from .clicks import read_clicks
    from .segfiles import read_segmentation
    from .training import TrainingCase
    from .volumes import read_image

    classes, entries = read_dataset(dataset_folder)
    cases = []
    for entry in entries:
        if method == "full" and entry.labels is None or method != "full" and entry.points is None:
            continue
        volume = read_image(entry.image)
        if method == "full":
            labels = read_segmentation(entry.labels, classes, volume)
            cases.append(TrainingCase(volume, labels=labels, name=entry.name))
        else:
            cases.append(TrainingCase(volume, read_clicks([entry.points], volume, classes), name=entry.name))
    if not cases:
        need = "labels/<case> files" if method == "full" else "points/<case>.mrk.json files"
        raise PSCVError(f"{dataset_folder}: no case to train on (method {method} needs {need})")
    return classes, cases


def evaluate_model(model, dataset_folder, device="auto", progress=None) -> dict:
    """The Dice of `model` on the labelled cases of a dataset folder (images/ + labels/; points unused): per
    class (mean over cases) and their mean. The folder's classes must be the model's."""
    from .inference import evaluate_cases
    from .segfiles import read_segmentation
    from .training import TrainingCase
    from .volumes import read_image

    classes, entries = read_dataset(dataset_folder)
    expected = [(c.name.lower(), c.value) for c in model.classes]
    if [(c.name.lower(), c.value) for c in classes] != expected:
        raise PSCVError(f"{Path(dataset_folder) / 'classes.json'}: the classes differ from the model's "
                        f"{[f'{n}={v}' for n, v in expected]}; validate on a data set of the same classes")
    labelled = [entry for entry in entries if entry.labels is not None]
    if not labelled:
        raise PSCVError(f"{dataset_folder}: no labels/<case> files to validate on")
    cases = []
    for entry in labelled:
        volume = read_image(entry.image)
        cases.append(TrainingCase(volume, labels=read_segmentation(entry.labels, classes, volume), name=entry.name))
    scores = evaluate_cases(model, cases, device, progress)["scores"]
    return {"dataset": str(dataset_folder), "cases": len(labelled),
            "dice": {name: round(s["dice"], 4) for name, s in scores.items() if name != "mean"},
            "mean_dice": round(scores["mean"]["dice"], 4)}
