"""Segmentation files: 3D Slicer `.seg.nrrd` and plain label maps (NRRD, NIfTI, MHA), read, written, exported.

In memory a segmentation is a label map: a numpy array `[k, j, i]` of class label values (background 0)
on the grid of a `Volume`. On disk:
- `.seg.nrrd`: written as 3D Slicer writes it (vtkMRMLSegmentationStorageNode): one layer, one segment per
  non-background class (`Segment{N}_ID/Name/Color/LabelValue/Layer/Extent/Tags...`), the image's
  geometry in LPS, and the image as the segmentation's reference geometry. Read back with overlapping
  layers (4-D) too, segments matched to classes by name (case-insensitive).
- `.nrrd` / `.nii` / `.nii.gz` / `.mha`: the label map itself on the image's grid.
- DICOM-SEG: written by `pscv.data.dicom_seg` (`export_segmentation` converts to it too).

Class terminology (`ClassInfo.terminology`, optional) uses the dict form of slicerio:
`{"category": [scheme, code, meaning], "type": [...], "typeModifier"?, "anatomicRegion"?,
"anatomicRegionModifier"?, "contextName"?, "anatomicContextName"?}`; without it a class is coded as
SCT 85756007 "Tissue" (3D Slicer's default for a new segment).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .. import PSCVError
from ..base.atomic import atomic_path
from .classes import ClassInfo, check_terminology
from .formats import (
    DICOM_SEG_SUFFIX,
    EXPORT_FORMATS,
    IMAGE_FORMATS,
    ONE_FILE_SUFFIXES,
    READABLE_SEGMENTATION_SUFFIXES,
    SEG_NRRD,
    SEGMENTATION_SUFFIXES,
    listing,
)
from .geometry import ijk_to_ras_matrix
from .volumes import Volume, write_image

DEFAULT_TERMINOLOGY = {
    "contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
    "category": ["SCT", "85756007", "Tissue"],
    "type": ["SCT", "85756007", "Tissue"],
    "anatomicContextName": "Anatomic codes - DICOM master list",
}
_REFERENCE_GEOMETRY_DESCRIPTION = (
    "Image geometry description string determining the geometry of the labelmap that is created in course "
    "of conversion. Can be copied from a volume, using the button."
)


# ---------------------------------------------------------------------------------------------------------
# Checks shared by the writers


def _labelmap_dtype(classes: list[ClassInfo]):
    return np.uint8 if max(c.value for c in classes) <= 255 else np.uint16


PRESENT_CHUNK = 2**16  # voxels counted at a time: the integer copy bincount makes stays at 512 KiB


def present_values(labelmap: np.ndarray) -> list:
    """The distinct values of a label map (a bincount for small non-negative integers: much faster, counted a
    chunk at a time so that the integer copy bincount makes is never the size of the whole map)."""
    if labelmap.dtype.kind in "bu" or (labelmap.dtype.kind == "i" and labelmap.size and labelmap.min() >= 0):
        if labelmap.size and int(labelmap.max()) < 65536:
            flat = labelmap.reshape(-1)
            counts = np.zeros(int(labelmap.max()) + 1, dtype=np.int64)
            for start in range(0, flat.size, PRESENT_CHUNK):
                counts += np.bincount(flat[start:start + PRESENT_CHUNK], minlength=len(counts))
            return np.flatnonzero(counts).tolist()
    return np.unique(labelmap).tolist()


def _unknown_values_error(path, unknown: list, classes: list[ClassInfo]) -> PSCVError:
    shown = ", ".join(f"{v:g}" for v in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
    known = ", ".join(f"{c.value} {c.name}" for c in classes)
    return PSCVError(f"{path}: the label map holds value(s) {shown} that are no class of classes.json ({known}); "
                     "pass the classes.json that goes with this label map")


def checked_labelmap(labelmap: np.ndarray, volume: Volume, classes: list[ClassInfo], path) -> np.ndarray:
    """The label map as uint8/uint16 after checking its shape and that it holds only class values."""
    labelmap = np.asarray(labelmap)
    if labelmap.shape != volume.shape:
        raise PSCVError(f"{path}: the label map has shape [k, j, i] = {list(labelmap.shape)} but the image has "
                        f"{list(volume.shape)}; a label map must be on the image's grid")
    if labelmap.dtype.kind not in "biu":
        if labelmap.dtype.kind != "f" or not np.all(np.isfinite(labelmap)) or np.any(labelmap != np.round(labelmap)):
            raise PSCVError(f"{path}: the label map must hold integer class values, got {labelmap.dtype}")
    unknown = sorted(set(present_values(labelmap)) - {c.value for c in classes})
    if unknown:
        raise _unknown_values_error(path, unknown, classes)
    return labelmap.astype(_labelmap_dtype(classes), copy=False)


def class_terminology(info: ClassInfo) -> dict:
    """The class's terminology as a slicerio-style dict, checked; the default "Tissue" when it has none."""
    if info.terminology is None:
        return DEFAULT_TERMINOLOGY
    return check_terminology(info.terminology, f"class {info.name!r}")


# ---------------------------------------------------------------------------------------------------------
# Writing .seg.nrrd and label maps


def write_segmentation(path: str | Path, labelmap: np.ndarray, volume: Volume, classes: list[ClassInfo]) -> None:
    """Write a label map `[k, j, i]` on `volume`'s grid; the format follows the extension.

    `.seg.nrrd`: a 3D Slicer segmentation (one segment per non-background class, named and coloured as in
    classes.json, even if empty); a label map suffix (`formats.ONE_FILE_SUFFIXES`): the plain label map. Atomic.
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith(SEGMENTATION_SUFFIXES):
        raise PSCVError(f"{path}: unknown segmentation format; use {SEG_NRRD} (3D Slicer), "
                        f"{listing(ONE_FILE_SUFFIXES)} (label map), or write_dicom_seg for DICOM-SEG")
    labelmap = checked_labelmap(labelmap, volume, classes, path)
    if name.endswith(SEG_NRRD):
        _write_seg_nrrd(path, labelmap, volume, classes)
    else:
        write_image(volume.with_array(labelmap), path)


def _number(value: float) -> str:
    return f"{float(value) + 0.0:.17g}"  # + 0.0 turns -0.0 into 0.0


def _reference_geometry(volume: Volume) -> str:
    """Slicer's serialized image geometry: the IJK-to-RAS matrix (row by row) then the extent, ';'-ended."""
    ijk_to_ras = ijk_to_ras_matrix(volume.spacing, volume.origin, volume.direction)
    size = volume.shape[::-1]
    extent = [v for n in size for v in (0, n - 1)]
    return "".join(f"{_number(v)};" for v in ijk_to_ras.ravel()) + "".join(f"{v};" for v in extent)


def _terminology_string(terminology: dict) -> str:
    """Slicer's TerminologyEntry tag: context~category~type~typeModifier~anatomicContext~region~regionModifier."""
    def code(key):
        return "^".join(terminology.get(key) or ["", "", ""])

    return "~".join([
        terminology.get("contextName", DEFAULT_TERMINOLOGY["contextName"]), code("category"), code("type"),
        code("typeModifier"), terminology.get("anatomicContextName", DEFAULT_TERMINOLOGY["anatomicContextName"]),
        code("anatomicRegion"), code("anatomicRegionModifier"),
    ])


def seg_nrrd_fields(volume: Volume, classes: list[ClassInfo]) -> dict[str, str]:
    """The key:=value fields 3D Slicer writes for a one-layer segmentation of `volume` with these classes."""
    extent = " ".join(f"0 {n - 1}" for n in volume.shape[::-1])
    fields = {}
    for number, info in enumerate(c for c in classes if c.value != 0):
        if any(ord(ch) < 32 for ch in info.name):  # parse_classes refuses these; a ClassInfo made in code may not
            raise PSCVError(f"class {info.name!r}: a segment name cannot hold line breaks or control characters")
        segment = {
            "Color": " ".join(f"{c / 255:.6g}" for c in info.color),
            "ColorAutoGenerated": "0",
            "Extent": extent,  # every segment shares the one full-size layer, as Slicer writes a shared layer
            "ID": f"Segment_{info.value}",
            "LabelValue": str(info.value),
            "Layer": "0",
            "Name": info.name,
            "NameAutoGenerated": "0",
            "Tags": f"TerminologyEntry:{_terminology_string(class_terminology(info))}|",
        }
        fields.update({f"Segment{number}_{key}": value for key, value in segment.items()})
    fields["Segmentation_ContainedRepresentationNames"] = "Binary labelmap|"
    fields["Segmentation_ConversionParameters"] = (
        f"Reference image geometry|{_reference_geometry(volume)}|{_REFERENCE_GEOMETRY_DESCRIPTION}&"
    )
    fields["Segmentation_MasterRepresentation"] = "Binary labelmap"
    fields["Segmentation_ReferenceImageExtentOffset"] = "0 0 0"
    return fields


def _vector(values) -> str:
    return "(" + ",".join(_number(v) for v in values) + ")"


def seg_nrrd_header(volume: Volume, classes: list[ClassInfo], dtype=np.uint8) -> str:
    """The NRRD header (text, ending in the blank line) of a `.seg.nrrd`, laid out as 3D Slicer writes it."""
    axes = volume.direction * volume.spacing  # columns: the i, j, k steps in LPS
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {'unsigned char' if np.dtype(dtype) == np.uint8 else 'unsigned short'}",
        "dimension: 3",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(n) for n in volume.shape[::-1]),
        "space directions: " + " ".join(_vector(axes[:, a]) for a in range(3)),
        "kinds: domain domain domain",
    ]
    if np.dtype(dtype).itemsize > 1:
        lines.append("endian: little")
    lines += ["encoding: gzip", f"space origin: {_vector(volume.origin)}"]
    lines += [f"{key}:={value}" for key, value in seg_nrrd_fields(volume, classes).items()]
    return "\n".join(lines) + "\n\n"


def _write_seg_nrrd(path: Path, labelmap: np.ndarray, volume: Volume, classes: list[ClassInfo]) -> None:
    import gzip

    header = seg_nrrd_header(volume, classes, labelmap.dtype).encode("utf-8")
    # [k, j, i] in C order puts i fastest, which is NRRD's first axis.
    data = gzip.compress(np.ascontiguousarray(labelmap, dtype=labelmap.dtype.newbyteorder("<")).tobytes(), 6)
    with atomic_path(path) as temporary:
        Path(temporary).write_bytes(header + data)


# ---------------------------------------------------------------------------------------------------------
# Reading .seg.nrrd and label maps


def _read_sitk(path: Path):
    import SimpleITK as sitk

    if not path.exists():
        raise PSCVError(f"{path}: no such segmentation file")
    if path.is_dir():
        raise PSCVError(f"{path}: is a folder; expected a .seg.nrrd or label map file (DICOM-SEG is not read)")
    if path.stat().st_size == 0:
        raise PSCVError(f"{path}: the file is empty")
    if not path.name.lower().endswith(READABLE_SEGMENTATION_SUFFIXES):
        raise PSCVError(f"{path}: unknown segmentation format; expected {SEG_NRRD} or a label map "
                        f"({', '.join(READABLE_SEGMENTATION_SUFFIXES[1:])})")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise PSCVError(f"{path}: could not read the segmentation ({str(error).strip().splitlines()[-1]}); "
                        "the file may be truncated or not a NRRD/NIfTI/MHA file") from None


def _numbers(text: str, kind, count: int, name: str, path) -> list:
    """The `count` numbers of the field `name` (e.g. "0.5 0.5 0.5"), or a PSCVError naming the field."""
    try:
        values = [kind(v) for v in text.split()]
    except ValueError:
        values = []
    if len(values) != count or not all(np.isfinite(values)):
        wanted = f"{count} numbers" if count > 1 else ("an integer" if kind is int else "a number")
        raise PSCVError(f"{path}: field {name}:={text[:40]!r} must hold {wanted}; the file is damaged (save the "
                        "segmentation again from 3D Slicer)")
    return values


def _segments(image, path="segmentation") -> list[dict]:
    """Segment metadata of a Slicer segmentation image (empty for a plain label map), in file order.

    As in Slicer's reader: a segment without a Layer field is in its own layer, without a LabelValue it is 1.
    """
    segments = []
    number = 0
    while image.HasMetaDataKey(f"Segment{number}_ID"):
        def field(key, default=None, kind=None, count=1, number=number):
            name = f"Segment{number}_{key}"
            text = image.GetMetaData(name) if image.HasMetaDataKey(name) else default
            return text if kind is None else _numbers(text, kind, count, name, path)

        segments.append({
            "id": field("ID"),
            "name": field("Name", field("ID")),
            "color": field("Color", "0.5 0.5 0.5", float, 3),
            "labelValue": field("LabelValue", "1", int)[0],
            "layer": field("Layer", str(number), int)[0],
        })
        number += 1
    return segments


def _geometry(image, array: np.ndarray) -> Volume:
    return Volume(array, image.GetSpacing(), image.GetOrigin(), np.reshape(image.GetDirection(), (3, 3)))


def _layers(image, path: Path) -> np.ndarray:
    """Voxels as `[layer, k, j, i]` (a plain 3-D image is one layer)."""
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise PSCVError(f"{path}: expected a 3-D segmentation, got a {image.GetDimension()}-D image of size "
                        f"{list(image.GetSize())}")
    array = sitk.GetArrayFromImage(image)
    if array.ndim == 4:  # several layers: ITK gives [k, j, i, layer]
        return np.moveaxis(array, -1, 0)
    return array[np.newaxis]


def read_segmentation_volume(path: str | Path, classes: list[ClassInfo]) -> Volume:
    """A `.seg.nrrd` or label map as a label map of class values on the file's own grid.

    `.seg.nrrd` segments are mapped to classes by name (case-insensitive); a segment that names no class
    is ignored with a `UserWarning`, and where segments overlap the later one (file order) wins, with a
    warning. A plain label map's values are class values; any other value is an error.
    """
    path = Path(path)
    image = _read_sitk(path)
    layers = _layers(image, path)
    segments = _segments(image, path)
    if segments:
        labelmap = _collapse_segments(layers, segments, classes, path)
    elif len(layers) > 1:
        raise PSCVError(f"{path}: a {len(layers)}-component image without 3D Slicer segment fields; expected one "
                        "label map or a .seg.nrrd")
    else:
        labelmap = _plain_labelmap(layers[0], classes, path)
    return _geometry(image, labelmap)


def _collapse_segments(layers: np.ndarray, segments: list[dict], classes: list[ClassInfo], path: Path):
    by_name = {c.name.lower(): c for c in classes}
    labelmap = np.zeros(layers.shape[1:], dtype=_labelmap_dtype(classes))
    unknown, overlap = [], 0
    for segment in segments:
        info = by_name.get(segment["name"].strip().lower())
        if info is None:
            unknown.append(segment["name"])
            continue
        if not 0 <= segment["layer"] < len(layers):
            raise PSCVError(f"{path}: segment {segment['name']!r} is in layer {segment['layer']} but the file has "
                            f"{len(layers)} layer(s); the file is damaged")
        mask = layers[segment["layer"]] == segment["labelValue"]
        overlap += int(np.count_nonzero(mask & (labelmap != 0) & (labelmap != info.value)))
        labelmap[mask] = info.value
    if len(unknown) == len(segments):
        raise PSCVError(f"{path}: no segment names a class of classes.json (segments: "
                        f"{', '.join(repr(n) for n in unknown)}; classes: {', '.join(c.name for c in classes)}); "
                        "rename the segments or the classes so that they match")
    if unknown:
        warnings.warn(f"{path}: segment(s) {', '.join(repr(n) for n in unknown)} name no class of classes.json "
                      f"({', '.join(c.name for c in classes)}) and are ignored", UserWarning, stacklevel=3)
    if overlap:
        warnings.warn(f"{path}: {overlap} voxels belong to segments of two classes; the later segment in the "
                      "file wins", UserWarning, stacklevel=3)
    return labelmap


def _plain_labelmap(array: np.ndarray, classes: list[ClassInfo], path: Path) -> np.ndarray:
    if array.dtype.kind == "f" and (not np.all(np.isfinite(array)) or np.any(array != np.round(array))):
        raise PSCVError(f"{path}: a label map must hold integer class values, but this one holds fractions or "
                        "NaN (is it an image rather than a label map?)")
    unknown = sorted(set(present_values(array)) - {c.value for c in classes})
    if unknown:
        raise _unknown_values_error(path, unknown, classes)
    return array.astype(_labelmap_dtype(classes))


def read_segmentation(path: str | Path, classes: list[ClassInfo], reference: Volume | None = None) -> np.ndarray:
    """A `.seg.nrrd` or label map as a label map `[k, j, i]` of class values (see read_segmentation_volume).

    With `reference`, the result is on the reference's grid: a file on the same grid, or on a sub/super-grid
    of it (same spacing and directions, whole-voxel offset, as Slicer writes cropped segmentations), is
    placed on it; any other geometry is an error naming both.
    """
    segmentation = read_segmentation_volume(path, classes)
    if reference is None:
        return segmentation.array
    return _on_reference_grid(segmentation, reference, Path(path))


def _on_reference_grid(segmentation: Volume, reference: Volume, path: Path) -> np.ndarray:
    same_axes = (np.allclose(segmentation.spacing, reference.spacing, rtol=1e-4, atol=1e-6)
                 and np.allclose(segmentation.direction, reference.direction, atol=1e-4))
    offset = reference.lps_to_index(segmentation.origin)  # (i, j, k) of the file's first voxel
    whole = np.round(offset)
    if not same_axes or np.any(np.abs(offset - whole) > 1e-2):
        raise PSCVError(
            f"{path}: the segmentation's geometry ({segmentation.describe_geometry()}) does not match the image "
            f"({reference.describe_geometry()}); resample the segmentation onto the image (e.g. in 3D Slicer: "
            "Segmentations > Export to files with the image as reference)"
        )
    start = whole.astype(int)[::-1]  # [k, j, i]
    if np.all(start == 0) and segmentation.shape == reference.shape:
        return segmentation.array
    placed = np.zeros(reference.shape, dtype=segmentation.array.dtype)
    source = tuple(slice(max(0, -s), min(n, r - s)) for s, n, r in zip(start, segmentation.shape, reference.shape))
    target = tuple(slice(max(0, s), min(r, s + n)) for s, n, r in zip(start, segmentation.shape, reference.shape))
    if all(t.start < t.stop for t in target):
        placed[target] = segmentation.array[source]
    lost = int(np.count_nonzero(segmentation.array)) - int(np.count_nonzero(placed))
    if lost:
        warnings.warn(f"{path}: {lost} segmented voxels lie outside the image and are dropped", UserWarning,
                      stacklevel=3)
    return placed


def read_strokes(path: str | Path, classes: list[ClassInfo], reference: Volume):
    """Painted labels (Paint or Draw in 3D Slicer's Segment Editor) as clicks on `reference`'s grid, one per
    painted voxel: a `.seg.nrrd` whose segments are named after the classes (a "background" segment paints
    background), or a label map of class values where 0 is unpainted (so background cannot be painted there).
    """
    from .clicks import Clicks

    path = Path(path)
    if path.name.lower().endswith(SEG_NRRD):  # paint codes 1..K stand for the classes, 0 for unpainted
        codes = [ClassInfo(c.name, n + 1, c.color, c.terminology) for n, c in enumerate(classes)]
        painted = _on_reference_grid(read_segmentation_volume(path, codes), reference, path)
        kji = np.argwhere(painted > 0)
        values = np.array([c.value for c in classes], dtype=np.int64)[painted[tuple(kji.T)].astype(np.int64) - 1]
    else:
        painted = read_segmentation(path, classes, reference)
        kji = np.argwhere(painted > 0)
        values = painted[tuple(kji.T)].astype(np.int64)
    if not len(kji):
        raise PSCVError(f"{path}: no painted voxel; paint strokes in segments named after the classes")
    return Clicks(kji.astype(np.int64), values)


def segmentation_classes(path: str | Path) -> list[ClassInfo]:
    """The classes a `.seg.nrrd` describes: background plus one class per segment (name, color).

    Label values are the segments' own when they are unique, else 1..N in file order (overlapping layers).
    """
    path = Path(path)
    image = _read_sitk(path)
    segments = _segments(image, path)
    if not segments:
        raise PSCVError(f"{path}: a plain label map names no classes; pass --classes classes.json")
    values = [s["labelValue"] for s in segments]
    if len(set(values)) != len(values) or 0 in values:
        values = list(range(1, len(segments) + 1))
    classes = [ClassInfo("background", 0, (0, 0, 0))]
    names = {"background"}
    for segment, value in zip(segments, values):
        name = segment["name"].strip()
        if name.lower() in names:
            raise PSCVError(f"{path}: two segments are named {name!r}; rename one, or pass --classes")
        names.add(name.lower())
        color = tuple(int(round(min(max(c, 0.0), 1.0) * 255)) for c in segment["color"])
        classes.append(ClassInfo(name, value, color))
    return classes


# ---------------------------------------------------------------------------------------------------------
# Export (the `pscv export` command)

def export_format(out: str | Path, to: str | None) -> str:
    """The output format: `to`, checked against the output's extension, or guessed from it."""
    name = Path(out).name.lower()
    if to is None:
        if name.endswith(SEG_NRRD):
            return "seg.nrrd"
        for fmt in (f.export for f in IMAGE_FORMATS if f.export):
            if name.endswith(EXPORT_FORMATS[fmt]):
                return fmt
        if name.endswith(DICOM_SEG_SUFFIX):
            return "dicom-seg"
        raise PSCVError(f"{out}: cannot tell the format from the name; give --to {'|'.join(EXPORT_FORMATS)} or end "
                        f"the name in {listing([*SEGMENTATION_SUFFIXES, DICOM_SEG_SUFFIX])}")
    if to not in EXPORT_FORMATS:
        raise PSCVError(f"--to {to}: unknown format; choose one of {', '.join(EXPORT_FORMATS)}")
    suffixes = EXPORT_FORMATS[to]
    wrong = (suffixes and not name.endswith(suffixes)) or (to != "seg.nrrd" and name.endswith(SEG_NRRD))
    if wrong:
        raise PSCVError(f"{out}: a {to} file must end in {' or '.join(suffixes) or 'another extension'}")
    return to


def export_segmentation(source: str | Path, out: str | Path, to: str | None = None, reference=None,
                        series_uid: str | None = None, classes: list[ClassInfo] | None = None) -> str:
    """Convert a `.seg.nrrd` or label map to `to` (a format of `formats.EXPORT_FORMATS`); returns the format.

    `classes` default to the segments of a `.seg.nrrd`. `reference` is the image the segmentation belongs
    to: required for DICOM-SEG (the DICOM series folder, `series_uid` picking one series); for the other
    formats, optional, it puts the segmentation on that image's grid.
    """
    from .dicom_seg import write_dicom_seg
    from .volumes import read_image

    fmt = export_format(out, to)
    if classes is None:
        classes = segmentation_classes(source)
    if fmt == "dicom-seg" and (reference is None or not Path(reference).is_dir()):
        raise PSCVError(f"{out}: DICOM-SEG export needs --reference DICOM_DIR, the folder of the DICOM series the "
                        f"segmentation was made on (got {reference or 'none'})")
    if reference is not None:
        volume = read_image(reference, series_uid)
        labelmap = read_segmentation(source, classes, volume)
    else:
        volume = read_segmentation_volume(source, classes)
        labelmap = volume.array
    if fmt == "dicom-seg":
        write_dicom_seg(out, labelmap, volume, classes, reference, series_uid=series_uid)
    else:
        write_segmentation(out, labelmap, volume, classes)
    return fmt
