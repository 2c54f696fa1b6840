"""Clicks: point annotations, one class per point, as voxel indices of an image.

In memory a set of clicks is `Clicks(kji, values)`: `kji` int array (N, 3) in array order `[k, j, i]`,
`values` the class label values (N,). On disk they are 3D Slicer markups (`.mrk.json`), one point list
per class named after the class, positions in LPS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import PSCVError
from .classes import ClassInfo
from .volumes import Volume

MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)


@dataclass
class Clicks:
    kji: np.ndarray  # (N, 3) int, array order [k, j, i]
    values: np.ndarray  # (N,) class label values

    def __post_init__(self):
        self.kji = np.asarray(self.kji, dtype=np.int64).reshape(-1, 3)
        self.values = np.asarray(self.values, dtype=np.int64).reshape(-1)
        if len(self.kji) != len(self.values):
            raise ValueError("kji and values differ in length")

    def __len__(self) -> int:
        return len(self.values)


def simulate_clicks(labels: np.ndarray, seed: int, slice_axis: int = 0, ignore: tuple = ()) -> Clicks:
    """One pixel drawn at random inside each class present in each slice, background included.

    `labels` is a dense label map `[k, j, i]`; slices run along `slice_axis`. Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    kji, values = [], []
    for s in range(labels.shape[slice_axis]):
        plane = np.take(labels, s, axis=slice_axis)
        for value in np.unique(plane):
            if value in ignore:
                continue
            rows, cols = np.nonzero(plane == value)
            pick = rng.integers(len(rows))
            point = [rows[pick], cols[pick]]
            point.insert(slice_axis, s)
            kji.append(point)
            values.append(int(value))
    return Clicks(np.array(kji, dtype=np.int64).reshape(-1, 3), np.array(values, dtype=np.int64))


def markups_document(clicks: Clicks, volume: Volume, classes: list[ClassInfo]) -> dict:
    """Slicer markups JSON (schema v1.0.3, LPS): one point list per class that has clicks."""
    markups = []
    lps = volume.index_to_lps(clicks.kji[:, ::-1].astype(float)) if len(clicks) else np.zeros((0, 3))
    for info in classes:
        rows = np.flatnonzero(clicks.values == info.value)
        if not len(rows):
            continue
        points = [
            {
                "id": str(n + 1),
                "label": f"{info.name}-{n + 1}",
                "position": [float(x) for x in lps[row]],
                "positionStatus": "defined",
            }
            for n, row in enumerate(rows)
        ]
        markups.append({
            "type": "Fiducial",
            "name": info.name,
            "coordinateSystem": "LPS",
            "coordinateUnits": "mm",
            "controlPoints": points,
            "display": {"color": [c / 255 for c in info.color], "selectedColor": [c / 255 for c in info.color]},
        })
    return {"@schema": MARKUPS_SCHEMA, "markups": markups}


def write_markups(clicks: Clicks, volume: Volume, classes: list[ClassInfo], path: str | Path) -> None:
    from .atomic import write_text_atomic

    write_text_atomic(path, json.dumps(markups_document(clicks, volume, classes), indent=2) + "\n")


def read_markups(path: str | Path, volume: Volume, classes: list[ClassInfo]) -> Clicks:
    """Read a `.mrk.json` whose point lists are named after classes; positions -> nearest voxel."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise PSCVError(f"{path}: no such markups file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PSCVError(f"{path}: not valid JSON ({error})") from None
    by_name = {c.name.lower(): c for c in classes}
    kji, values = [], []
    for markup in document.get("markups", []):
        info = by_name.get(str(markup.get("name", "")).lower())
        if info is None:
            raise PSCVError(f"{path}: point list {markup.get('name')!r} names no class of {list(by_name)}")
        ras = markup.get("coordinateSystem", "LPS") == "RAS"
        for point in markup.get("controlPoints", []):
            if point.get("positionStatus", "defined") != "defined":
                continue
            position = np.array(point["position"], dtype=float)
            if ras:
                position[:2] *= -1
            ijk = np.rint(volume.lps_to_index(position)).astype(int)
            kji.append(ijk[::-1])
            values.append(info.value)
    return Clicks(np.array(kji, dtype=np.int64).reshape(-1, 3), np.array(values, dtype=np.int64))
