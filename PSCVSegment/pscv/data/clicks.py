"""Clicks: point annotations, one class per point, as voxel indices of an image.

In memory a set of clicks is `Clicks(kji, values)`: `kji` int array (N, 3) in array order `[k, j, i]`,
`values` the class label values (N,). On disk they are 3D Slicer markups (`.mrk.json`, schema v1.0.x, LPS
or RAS) or legacy `.fcsv`; `write_markups` writes one point list per class named after the class, in LPS.

A point's class is its point list's name when that names a class (case-insensitive), else its label
("LV", or Slicer's automatic "LV-3"); a `.fcsv` file's point list is named after the file. A point becomes
the voxel whose centre is nearest (continuous index rounded, halves up as in ITK). Points whose
`positionStatus` is not "defined" are skipped.
"""

from __future__ import annotations

import json
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import PSCVError
from ..base.jsonfile import read_json
from .classes import ClassInfo
from .geometry import ras_to_lps, round_index
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

    def extended(self, other: Clicks) -> Clicks:
        """These clicks, then `other`'s."""
        return Clicks(np.concatenate([self.kji, other.kji]), np.concatenate([self.values, other.values]))


def simulate_clicks(labels: np.ndarray, seed: int, slice_axis: int = 0, ignore: tuple = (), clicks_per_class: int = 1,
                    every_nth_slice: int = 1) -> Clicks:
    """Simulated clicks: in each clicked slice, `clicks_per_class` pixels drawn at random (without repeats)
    inside each class present, background included (fewer where a class has fewer pixels).

    `labels` is a dense label map `[k, j, i]`; slices run along `slice_axis`; slices 0, n, 2n, ... are clicked
    for `every_nth_slice` n. Deterministic for a seed; the defaults draw what they always drew (one pixel
    per class present in every slice).
    """
    if clicks_per_class < 1 or every_nth_slice < 1:
        raise PSCVError(f"clicks_per_class {clicks_per_class} and every_nth_slice {every_nth_slice}: give 1 or more")
    rng = np.random.default_rng(seed)
    kji, values = [], []
    for s in range(0, labels.shape[slice_axis], every_nth_slice):
        plane = np.take(labels, s, axis=slice_axis)
        for value in np.unique(plane):
            if value in ignore:
                continue
            rows, cols = np.nonzero(plane == value)
            picks = ([rng.integers(len(rows))] if clicks_per_class == 1
                     else rng.choice(len(rows), size=min(clicks_per_class, len(rows)), replace=False))
            for pick in picks:
                point = [rows[pick], cols[pick]]
                point.insert(slice_axis, s)
                kji.append(point)
                values.append(int(value))
    return Clicks(np.array(kji, dtype=np.int64).reshape(-1, 3), np.array(values, dtype=np.int64))


def grown_box(low, high, shape, slice_axis: int, margin: float) -> tuple[slice, slice, slice]:
    """Every slice along `slice_axis`; in plane, the box [low, high) (per axis of `shape`, array order) grown by
    `margin` times its size on each side (at least 8 voxels) and clipped to the image."""
    region = [slice(0, n) for n in shape]
    for axis in range(3):
        if axis != slice_axis:
            grow = max(8, int(np.ceil(margin * (high[axis] - low[axis]))))
            region[axis] = slice(max(0, int(low[axis]) - grow), min(shape[axis], int(high[axis]) + grow))
    return tuple(region)


def click_region(clicks: Clicks, volume: Volume, margin: float) -> tuple[slice, slice, slice]:
    """The region of the volume around the organ clicks: their in-plane bounding box grown by `margin` times
    its size on each side (at least 8 voxels), all slices; the whole volume when no organ is clicked."""
    organ = clicks.kji[clicks.values != 0]
    if not len(organ):
        return tuple(slice(0, n) for n in volume.shape)
    return grown_box(organ.min(axis=0), organ.max(axis=0) + 1, volume.shape, volume.slice_axis(), margin)


def case_seed(seed: int, case: str) -> int:
    """A per-case seed for simulated clicks that does not depend on which other cases are converted."""
    return seed * 1_000_003 + zlib.crc32(case.encode())


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
    from ..base.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(markups_document(clicks, volume, classes), indent=2) + "\n")


SUGGESTIONS_LIST = "suggested points"


def write_suggestions(suggestions: Clicks, volume: Volume, classes: list[ClassInfo], path: str | Path) -> None:
    """Suggested places to click as one point list of their own (`SUGGESTIONS_LIST`), each point labelled with
    the class guessed there and a question mark ("LV?"): not clicks until the user moves a point into a class
    (read as clicks, such a file is refused: its list and labels name no class)."""
    from ..base.atomic import write_text_atomic

    by_value = {c.value: c for c in classes}
    document = markups_document(Clicks(suggestions.kji, np.zeros(len(suggestions), dtype=np.int64)), volume,
                                [ClassInfo(SUGGESTIONS_LIST, 0, (255, 255, 0))])
    for markup in document["markups"]:
        markup["name"] = SUGGESTIONS_LIST
        for point, value in zip(markup["controlPoints"], suggestions.values.tolist()):
            point["label"] = f"{by_value[value].name}?"
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Reading clicks: Slicer markups (.mrk.json, schema v1.0.x) and legacy fiducial CSV (.fcsv).


@dataclass
class _Point:
    """One control point as the file holds it, before it is given a class and a voxel."""

    source: Path
    list_name: str
    label: str
    written: tuple[float, float, float]  # position as written, in the file's coordinate system and units
    system: str  # "LPS" or "RAS"
    lps: np.ndarray  # mm

    def describe(self) -> str:
        where = f"point {self.label!r}" if self.label else "an unlabelled point"
        in_list = f" of point list {self.list_name!r}" if self.list_name else ""
        position = ", ".join(f"{v:.2f}" for v in self.written)
        return f"{where}{in_list} at {self.system} ({position})"


def _load_json(path: Path):
    return read_json(path, "markups file", fix="; save the point list again from 3D Slicer")


def _units_scale(path: Path, where: str, units) -> float:
    if isinstance(units, list) and units:
        units = units[0]
    scale = {None: 1.0, "mm": 1.0, "um": 0.001}.get(units) if units is None or isinstance(units, str) else None
    if scale is None:
        raise PSCVError(f"{path}: {where} has coordinateUnits {units!r}; expected \"mm\" or \"um\"")
    return scale


def _markups_points(path: Path) -> list[_Point]:
    """The defined control points of every point list in a `.mrk.json` file (any schema v1.0.x)."""
    document = _load_json(path)
    schema = document.get("@schema", "") if isinstance(document, dict) else ""
    if not isinstance(document, dict) or not isinstance(document.get("markups"), list) or (
        schema and "markups-schema-v1." not in str(schema)
    ):
        raise PSCVError(f"{path}: not a 3D Slicer markups file (expected a JSON object with \"markups\" and the "
                        f"markups-schema-v1.0.x \"@schema\"; found schema {schema or 'none'!r})")
    points = []
    for number, markup in enumerate(document["markups"], start=1):
        if not isinstance(markup, dict):
            raise PSCVError(f"{path}: markup #{number} is not a JSON object")
        name = str(markup.get("name", "")).strip()
        where = f"markup #{number}" + (f" ({name!r})" if name else "")
        kind = markup.get("type")
        if kind != "Fiducial":
            raise PSCVError(f"{path}: {where} is a {kind or 'markup without a type'}, not a point list; PSCV reads "
                            "point lists (Slicer markups of type Fiducial). Place the clicks with the point list "
                            "tool and save that list")
        system = markup.get("coordinateSystem", "LPS")
        if system not in ("LPS", "RAS"):
            raise PSCVError(f"{path}: {where} has coordinateSystem {system!r}; expected \"LPS\" or \"RAS\"")
        scale = _units_scale(path, where, markup.get("coordinateUnits"))
        control_points = markup.get("controlPoints") or []
        if not isinstance(control_points, list):
            raise PSCVError(f"{path}: {where}: \"controlPoints\" must be a list of points, got "
                            f"{type(control_points).__name__} {str(control_points)[:40]}")
        for index, point in enumerate(control_points, start=1):
            if not isinstance(point, dict):
                raise PSCVError(f"{path}: {where}, control point #{index} is not a JSON object")
            if point.get("positionStatus", "defined") != "defined":
                continue  # "undefined" or "preview": a point the user has not placed (yet)
            position = point.get("position")
            label = str(point.get("label", "")).strip() or f"#{index}"
            if (not isinstance(position, list) or len(position) != 3
                    or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in position)):
                raise PSCVError(f"{path}: {where}, point {label!r}: \"position\" must be three finite numbers, "
                                f"got {position!r}")
            points.append(_make_point(path, name, label, position, system, scale))
    return points


def _make_point(path: Path, list_name: str, label: str, position, system: str, scale: float = 1.0) -> _Point:
    written = tuple(float(v) for v in position)
    lps = np.array(written) * scale
    if system == "RAS":
        lps = ras_to_lps(lps)
    return _Point(path, list_name, label, written, system, lps)


# Legacy .fcsv: fixed columns id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID (Slicer reads them
# by position, whatever the "# columns" line says; later columns are ignored, as Slicer does).
_FCSV_LABEL = 11
_FCSV_SYSTEMS = {"LPS": "LPS", "1": "LPS", "RAS": "RAS", "0": "RAS"}


def _fcsv_points(path: Path) -> list[_Point]:
    """The points of a legacy Slicer fiducial CSV file; the point list is named after the file."""
    import csv

    if not path.exists():
        raise PSCVError(f"{path}: no such fiducial file")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of the text
    except UnicodeDecodeError:
        raise PSCVError(f"{path}: not a text file; expected a Slicer fiducial CSV (.fcsv)") from None
    except OSError as error:
        raise PSCVError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not any(line.strip() for line in lines):
        raise PSCVError(f"{path}: the file is empty; save the point list again from 3D Slicer")
    list_name = path.name[: -len(".fcsv")] if path.name.lower().endswith(".fcsv") else path.stem
    system = "RAS"  # files older than Slicer 4.11 say nothing and are RAS
    points = []
    for number, line in enumerate(lines, start=1):
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip().lower() == "coordinatesystem":
                system = _FCSV_SYSTEMS.get(value.strip().upper())
                if system is None:
                    raise PSCVError(f"{path}: line {number}: unknown coordinate system {value.strip()!r}; "
                                    "expected LPS, RAS, 0 (RAS) or 1 (LPS)")
            continue
        if not line.strip():
            continue
        fields = next(csv.reader([line]))
        try:
            position = [float(v) for v in fields[1:4]]
        except ValueError:
            position = []
        if len(position) != 3 or not np.all(np.isfinite(position)):
            raise PSCVError(f"{path}: line {number} is not a point (expected id,x,y,z,...: {line[:80]!r}); the "
                            "file may be truncated: save the point list again from 3D Slicer")
        label = fields[_FCSV_LABEL].strip() if len(fields) > _FCSV_LABEL else ""
        points.append(_make_point(path, list_name, label or f"line {number}", position, system))
    return points


def _read_points(path: str | Path) -> list[_Point]:
    path = Path(path)
    if path.is_dir():
        raise PSCVError(f"{path}: is a folder; give the clicks files in it (.mrk.json or .fcsv), e.g. "
                        f"{path}/*.mrk.json")
    if path.name.lower().endswith(".fcsv"):
        return _fcsv_points(path)
    if path.name.lower().endswith(".json"):
        return _markups_points(path)
    raise PSCVError(f"{path}: unknown clicks file type; expected a Slicer point list (.mrk.json) or .fcsv")


def _class_of(point: _Point, by_name: dict[str, ClassInfo]) -> ClassInfo:
    """The point list's name if it names a class, else the point's label ("LV" or Slicer's "LV-3")."""
    for candidate in (point.list_name, point.label, re.sub(r"-\d+$", "", point.label)):
        info = by_name.get(candidate.strip().lower())
        if info is not None:
            return info
    names = ", ".join(c.name for c in by_name.values())
    raise PSCVError(
        f"{point.source}: {point.describe()} names no class of classes.json ({names}). Name the point list "
        "after a class, or label each point with its class name (\"LV\" or \"LV-3\"), or add the class to "
        "classes.json"
    )


def _voxel_of(point: _Point, volume: Volume) -> np.ndarray:
    """Nearest voxel `[k, j, i]` of a point (rounding halves up, as ITK does); PSCVError if outside."""
    continuous = volume.lps_to_index(point.lps)
    ijk = round_index(continuous)
    size = np.array(volume.shape[::-1])
    if np.any(ijk < 0) or np.any(ijk >= size):
        low, high = volume.lps_bounds()
        bounds = ", ".join(f"{axis} {lo:.1f}..{hi:.1f}" for axis, lo, hi in zip("LPS", low, high))
        lps = "" if point.system == "LPS" else "LPS (" + ", ".join(f"{v:.2f}" for v in point.lps) + ") "
        index = ", ".join(f"{v:.1f}" for v in continuous)
        raise PSCVError(
            f"{point.source}: {point.describe()} lies outside the image ({lps}at voxel (i, j, k) = "
            f"({index}); the image covers LPS {bounds} mm, voxels 0..{size[0] - 1}, 0..{size[1] - 1}, "
            f"0..{size[2] - 1}). Move or delete the point, or check that the clicks were placed on this image"
        )
    return ijk[::-1]


def read_markups(path: str | Path, volume: Volume, classes: list[ClassInfo]) -> Clicks:
    """The clicks of one `.mrk.json` or `.fcsv` file as voxel indices `[k, j, i]` of `volume`.

    Each point's class is the name of its point list if that names a class (case-insensitive), else its
    label ("LV" or Slicer's automatic "LV-3"). No check of how many classes have points: see `read_clicks`.
    """
    by_name = {c.name.lower(): c for c in classes}
    points = _read_points(path)
    kji = [_voxel_of(p, volume) for p in points]
    values = [_class_of(p, by_name).value for p in points]
    return Clicks(np.array(kji, dtype=np.int64).reshape(-1, 3), np.array(values, dtype=np.int64))


def read_clicks(paths, volume: Volume, classes: list[ClassInfo]) -> Clicks:
    """The clicks of several `.mrk.json` / `.fcsv` files together, checked for training.

    Errors (PSCVError): any point outside the image, naming no class, two classes in one voxel, or fewer
    than two classes with points (background and at least one organ). A class without points is a
    `UserWarning` (`warnings.warn`), not an error.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise PSCVError("no clicks files given; pass one or more .mrk.json / .fcsv point lists")
    parts = [read_markups(path, volume, classes) for path in paths]
    clicks = Clicks(np.concatenate([c.kji for c in parts]), np.concatenate([c.values for c in parts]))
    files = ", ".join(str(p) for p in paths)
    _check_conflicts(clicks, classes, files)
    _check_classes(clicks, classes, files)
    return clicks


def _check_conflicts(clicks: Clicks, classes: list[ClassInfo], files: str) -> None:
    names = {c.value: c.name for c in classes}
    first_class: dict[tuple, int] = {}
    for voxel, value in zip(map(tuple, clicks.kji.tolist()), clicks.values.tolist()):
        other = first_class.setdefault(voxel, value)
        if other != value:
            raise PSCVError(f"{files}: voxel [k, j, i] = {list(voxel)} has points of two classes, "
                            f"{names[other]!r} and {names[value]!r}; move or delete one of them")


def _check_classes(clicks: Clicks, classes: list[ClassInfo], files: str) -> None:
    counts = {c.name: int(np.sum(clicks.values == c.value)) for c in classes}
    clicked = [name for name, n in counts.items() if n]
    if len(clicked) < 2:
        raise PSCVError(
            f"{files}: points for {len(clicked)} class(es) ({', '.join(clicked) or 'none'}); training needs points "
            f"on the background and on at least one organ (classes: {', '.join(counts)})"
        )
    for name, n in counts.items():
        if not n:
            warnings.warn(f"{files}: class {name!r} has no points; it will not be learned (add a few points "
                          "on it, or remove it from classes.json)", UserWarning, stacklevel=3)
