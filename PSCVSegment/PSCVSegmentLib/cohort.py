"""The cohort workflow's dataset folder (the engine's layout, ``pscv.data.dataset``):

```
DATASET/classes.json
DATASET/images/<case>.nrrd          the volume's voxels and own geometry
DATASET/points/<case>.mrk.json      its class points (LPS, in that geometry)
```

"Add to dataset" writes the current volume and its class point lists there; a ``train`` job trains one model
on every case with points; the model lands beside the dataset (``<dataset>-model-<date>``), never inside it,
so that the next training run does not copy old models into its job.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from . import engine, pointlists, volumes

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def caseName(text) -> str:
    """A file-name-safe case name from a volume name: "CT chest (1)" -> "CT_chest_1"."""
    name = _UNSAFE.sub("_", str(text)).strip("._-")
    return name[:100] or "case"


def sameClasses(first, second) -> bool:
    return [(c.name.lower(), c.value) for c in first] == [(c.name.lower(), c.value) for c in second]


def datasetClasses(datasetDirectory):
    path = Path(datasetDirectory) / "classes.json"
    return engine.read_classes(path) if path.is_file() else None


def addCase(datasetDirectory, volumeNode, pointListNodes, name=None, overwrite=False) -> dict:
    """Write the volume and its class points into the dataset folder (created if needed); returns
    {"case", "image", "points"}. The table's classes must be the dataset's (same names and order)."""
    datasetDirectory = Path(datasetDirectory)
    classes = pointlists.classesFromPointLists(pointListNodes)
    existing = datasetClasses(datasetDirectory)
    if existing is not None and not sameClasses(existing, classes):
        raise engine.PSCVError(
            f"{datasetDirectory / 'classes.json'}: the dataset's classes are "
            f"{', '.join(c.name for c in existing)}, the table's {', '.join(c.name for c in classes)}; a dataset "
            "needs the same classes in the same order in every case (rename or reorder the classes, or choose "
            "another dataset folder)")
    counts = {node.GetName(): pointlists.definedPointCount(node) for node in pointListNodes}
    if not counts.get(pointListNodes[0].GetName()) or not any(list(counts.values())[1:]):
        raise engine.PSCVError("place points on the background and on at least one organ before adding the case")
    case = caseName(name or volumeNode.GetName())
    image = datasetDirectory / "images" / f"{case}.nrrd"
    points = datasetDirectory / "points" / f"{case}.mrk.json"
    if not overwrite and (image.exists() or points.exists()):
        raise FileExistsError(f"The dataset already has a case '{case}'.")
    datasetDirectory.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".adding-", dir=str(datasetDirectory))
    try:
        written = volumes.writeJobInputs(staging, volumeNode, pointListNodes, classes, requireAll=False)
        image.parent.mkdir(exist_ok=True)
        points.parent.mkdir(exist_ok=True)
        os.replace(written["image"], image)
        os.replace(written["points"][0], points)
        if existing is None:
            os.replace(written["classes"], datasetDirectory / "classes.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"case": case, "image": str(image), "points": str(points)}


def summary(datasetDirectory):
    """{"classes": [names], "cases": N, "withPoints": M}, or None when the folder is not a dataset yet."""
    datasetDirectory = Path(datasetDirectory)
    if not (datasetDirectory / "classes.json").is_file():
        return None
    try:
        classes, cases = engine.read_dataset(datasetDirectory)
    except engine.PSCVError:
        return {"classes": [c.name for c in datasetClasses(datasetDirectory)], "cases": 0, "withPoints": 0}
    return {"classes": [c.name for c in classes], "cases": len(cases),
            "withPoints": sum(case.points is not None for case in cases)}


def trainedModelDirectory(datasetDirectory, now=None) -> str:
    """Where a model trained on the dataset goes: ``<dataset>-model-<YYYYmmdd-HHMMSS>`` beside it."""
    datasetDirectory = Path(datasetDirectory).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    path = datasetDirectory.parent / f"{datasetDirectory.name}-model-{stamp}"
    number = 1
    while path.exists():
        number += 1
        path = datasetDirectory.parent / f"{datasetDirectory.name}-model-{stamp}-{number}"
    return str(path)
