"""DICOM-SEG: write a label map as a DICOM Segmentation that references its source DICOM series (highdicom).

Needs the optional pydicom and highdicom packages (`pip install 'pscv[dicom]'`). One segment per class
present in the label map, its terminology as in `.seg.nrrd` (`segmentations.class_terminology`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .. import PSCVError, __version__
from ..base.atomic import atomic_path
from .classes import ClassInfo
from .segmentations import checked_labelmap, class_terminology, present_values
from .volumes import Volume


def _dicom_modules():
    try:
        import highdicom
        import pydicom
    except ImportError:
        raise PSCVError("writing DICOM-SEG needs the pydicom and highdicom packages: "
                        "pip install 'pscv[dicom]' (or pip install highdicom)") from None
    return highdicom, pydicom


_REQUIRED_SOURCE_ATTRIBUTES = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
)


def reference_datasets(volume: Volume, reference_dicom_dir=None, series_uid: str | None = None) -> list:
    """The source DICOM slices of `volume`, one per slice k, in k order (pydicom datasets, no pixel data).

    From `reference_dicom_dir` (its one image series, or `series_uid`), else from `volume.dicom_files`.
    PSCVError when the series lacks the UIDs a DICOM-SEG must reference, or its grid is not the volume's.
    """
    from .dicom import select_series

    _, pydicom = _dicom_modules()
    if reference_dicom_dir is not None:
        files = select_series(reference_dicom_dir, series_uid).files
        source = str(reference_dicom_dir)
    elif volume.dicom_files:
        files, source = list(volume.dicom_files), "the image's DICOM series"
    else:
        raise PSCVError("DICOM-SEG needs the DICOM series the image came from: pass --reference DICOM_DIR "
                        "(reference_dicom_dir=...)")
    datasets = []
    for name in files:
        dataset = pydicom.dcmread(name, stop_before_pixels=True)
        if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
            raise PSCVError(f"{name}: a multi-frame image; DICOM-SEG export supports series of single-frame "
                            "slices only")
        missing = [a for a in _REQUIRED_SOURCE_ATTRIBUTES if not str(dataset.get(a, "")).strip()]
        if missing:
            raise PSCVError(f"{name}: lacks {', '.join(missing)}, which a DICOM-SEG must reference (the series "
                            "may have been anonymised too hard); export the original series from the PACS, or "
                            "export the segmentation as .seg.nrrd / NIfTI instead")
        if "SpecificCharacterSet" in dataset and not str(dataset.SpecificCharacterSet).strip():
            del dataset.SpecificCharacterSet  # empty means the default repertoire; highdicom rejects ''
        datasets.append(dataset)
    return _sorted_on_grid(datasets, volume, source)


def _sorted_on_grid(datasets: list, volume: Volume, source: str) -> list:
    """Order the slices by k, checking that each lies exactly on a slice of `volume`'s grid."""
    by_k = {}
    size_i, size_j = volume.shape[2], volume.shape[1]
    for dataset in datasets:
        orientation = np.array(dataset.ImageOrientationPatient, dtype=float)
        row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
        index = volume.lps_to_index(np.array(dataset.ImagePositionPatient, dtype=float))
        k = int(np.round(index[2]))
        fits = (
            np.allclose(orientation, np.concatenate([volume.direction[:, 0], volume.direction[:, 1]]), atol=1e-4)
            and (int(dataset.Rows), int(dataset.Columns)) == (size_j, size_i)
            and np.allclose([column_spacing, row_spacing], volume.spacing[:2], rtol=1e-4)
            and np.allclose(index, [0, 0, k], atol=1e-2) and 0 <= k < volume.shape[0]
        )
        if not fits or k in by_k:
            raise PSCVError(
                f"{source}: slice {dataset.SOPInstanceUID} (position {list(map(float, dataset.ImagePositionPatient))},"
                f" orientation {list(map(float, dataset.ImageOrientationPatient))}, {dataset.Rows}x{dataset.Columns}"
                f" pixels of {list(map(float, dataset.PixelSpacing))} mm) is not a slice of the segmentation's grid "
                f"({volume.describe_geometry()}); DICOM-SEG needs the segmentation on the grid of the DICOM series "
                "it was made from"
            )
        by_k[k] = dataset
    if len(by_k) != volume.shape[0]:
        missing = sorted(set(range(volume.shape[0])) - set(by_k))
        raise PSCVError(f"{source}: the series has {len(by_k)} slices but the segmentation {volume.shape[0]}; "
                        f"no DICOM slice for k = {missing[:10]}")
    return [by_k[k] for k in range(volume.shape[0])]


def _coded_concept(hd, code):
    scheme, value, meaning = code
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def segment_description(number: int, info: ClassInfo):
    """highdicom SegmentDescription of one class: label, terminology codes, CIELab colour, algorithm PSCV."""
    hd, _ = _dicom_modules()
    from pydicom.sr.codedict import codes

    terminology = class_terminology(info)
    segment_type = _coded_concept(hd, terminology["type"])
    if terminology.get("typeModifier"):
        segment_type.SegmentedPropertyTypeModifierCodeSequence = [_coded_concept(hd, terminology["typeModifier"])]
    region = terminology.get("anatomicRegion")
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=info.name[:64],
        segmented_property_category=_coded_concept(hd, terminology["category"]),
        segmented_property_type=segment_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="PSCV", family=codes.cid7162.ArtificialIntelligence, version=__version__,
        ),
        tracking_uid=hd.UID(),
        tracking_id=info.name[:64],
        anatomic_regions=[_coded_concept(hd, region)] if region else None,
        display_color=hd.color.CIELabColor.from_rgb(*info.color),
    )


def write_dicom_seg(path: str | Path, labelmap: np.ndarray, volume: Volume, classes: list[ClassInfo],
                    reference_dicom_dir: str | Path | None = None, *, series_uid: str | None = None,
                    series_description: str = "PSCV segmentation", segmentation_type: str = "BINARY") -> None:
    """Write a label map `[k, j, i]` as a DICOM Segmentation that references the source series.

    The source series is `reference_dicom_dir` (or `volume.dicom_files` for an image read from DICOM); the
    label map must be on its grid. One segment per non-background class present in the label map (label =
    class name, colour, terminology); BINARY by default, as 3D Slicer (QuantitativeReporting/dcmqi) reads
    it; "LABELMAP" writes the newer Label Map Segmentation SOP class. Atomic.
    """
    hd, _ = _dicom_modules()
    path = Path(path)
    labelmap = checked_labelmap(labelmap, volume, classes, path)
    sources = reference_datasets(volume, reference_dicom_dir, series_uid)
    present = set(present_values(labelmap))
    segments = [c for c in classes if c.value != 0 and c.value in present]
    if not segments:
        raise PSCVError(f"{path}: the segmentation is empty (background only); a DICOM-SEG needs a segment")
    numbers = np.zeros(max(c.value for c in classes) + 1, dtype=np.uint16)
    for number, info in enumerate(segments, start=1):
        numbers[info.value] = number
    pixels = numbers[labelmap].astype(np.uint8 if len(segments) < 256 else np.uint16)
    descriptions = [segment_description(n, c) for n, c in enumerate(segments, start=1)]
    with warnings.catch_warnings():
        # highdicom warns about the source's single-component patient names (e.g. "JANCT000"): not ours to fix.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        try:
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=pixels,
                segmentation_type=segmentation_type,
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=100,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="PSCVSegment",
                manufacturer_model_name="pscv",
                software_versions=__version__,
                device_serial_number="0",
                content_label="PSCV",
                content_description="Segmentation trained from point clicks (PSCV)",
                series_description=series_description,
            )
        except (ValueError, TypeError, AttributeError) as error:
            raise PSCVError(f"{path}: highdicom could not build the DICOM-SEG ({error})") from None
    with atomic_path(path) as temporary:
        seg.save_as(temporary)
