"""DICOM series on disk: find the series in a folder, pick one, read it as a 3-D image.

Only SimpleITK (GDCM) is needed here, so reading a DICOM image works without pydicom; writing DICOM-SEG
(`pscv.data.dicom_seg.write_dicom_seg`) needs the optional `pydicom` and `highdicom` packages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import PSCVError

# Series of these modalities hold no image to segment (a folder often holds them beside the CT/MR series).
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG", "DOC"}


@dataclass
class Series:
    uid: str
    files: list[str]  # sorted by GDCM along the slice normal
    modality: str
    description: str

    def summary(self) -> str:
        uid = self.uid or "(empty SeriesInstanceUID)"
        return f"{uid} ({self.modality or '?'} {self.description!r}, {len(self.files)} file(s))"


def _header_value(reader, tag: str) -> str:
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def _describe(uid: str, files: list[str]) -> Series:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return Series(uid, files, "", "")
    return Series(uid, files, _header_value(reader, "0008|0060"), _header_value(reader, "0008|103e"))


def find_series(folder: str | Path) -> list[Series]:
    """Every DICOM image series in `folder` and its subfolders (GDCM's grouping by SeriesInstanceUID)."""
    import SimpleITK as sitk

    by_uid: dict[str, list[str]] = {}
    for directory, _, names in sorted(os.walk(folder)):
        if not names:
            continue
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory):
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, uid)
            by_uid.setdefault(uid, []).extend(files)
    return [_describe(uid, files) for uid, files in by_uid.items()]


def select_series(folder: str | Path, series_uid: str | None = None) -> Series:
    """The one image series of `folder`, or the one named by `series_uid`; PSCVError otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PSCVError(f"{folder}: no such DICOM folder")
    found = find_series(folder)
    images = [s for s in found if s.modality.upper() not in NON_IMAGE_MODALITIES]
    if series_uid is not None:
        chosen = [s for s in found if s.uid == series_uid]
        if not chosen:
            listing = "\n  ".join(s.summary() for s in found) or "(none)"
            raise PSCVError(f"{folder}: no DICOM series with SeriesInstanceUID {series_uid}; the folder holds:\n"
                            f"  {listing}")
        return chosen[0]
    if not images:
        files = sum(1 for p in folder.rglob("*") if p.is_file())
        others = "; ".join(s.summary() for s in found)
        raise PSCVError(
            f"{folder}: no DICOM image series found ({files} file(s) looked at"
            + (f"; only non-image series: {others}" if others else "")
            + "). Point to the folder that holds the CT/MR slice files."
        )
    if len(images) > 1:
        listing = "\n  ".join(s.summary() for s in images)
        raise PSCVError(f"{folder}: holds {len(images)} DICOM image series; choose one with --series UID "
                        f"(series_uid=...):\n  {listing}")
    return images[0]


def read_series(series: Series):
    """Read a series with SimpleITK and check that its slices lie on one regular grid."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series.files)
    try:
        # One file is an enhanced multi-frame image (or a single slice): read it as a file, frames and all.
        image = sitk.ReadImage(series.files[0]) if len(series.files) == 1 else reader.Execute()
    except RuntimeError as error:
        raise PSCVError(f"DICOM series {series.summary()}: could not be read "
                        f"({str(error).strip().splitlines()[-1]})") from None
    if image.GetDimension() == 3 and len(series.files) > 1:
        _check_slice_positions(series, image)
    return image


def _check_slice_positions(series: Series, image) -> None:
    """Every file's ImagePositionPatient must be where the regular grid puts its slice.

    Missing slices, uneven spacing or a gantry tilt would otherwise give a silently wrong geometry.
    """
    import SimpleITK as sitk

    origin = np.array(image.GetOrigin())
    direction = np.reshape(image.GetDirection(), (3, 3))
    spacing = np.array(image.GetSpacing())
    tolerance = 0.1 * spacing[2] + 1e-3
    reader = sitk.ImageFileReader()
    for k, name in enumerate(series.files):
        reader.SetFileName(name)
        reader.ReadImageInformation()
        position = np.array(reader.GetOrigin())
        expected = origin + direction[:, 2] * spacing[2] * k
        if np.linalg.norm(position - expected) > tolerance:
            raise PSCVError(
                f"DICOM series {series.summary()}: slice {k} ({name}) is at LPS {np.round(position, 3).tolist()} "
                f"but a regular grid puts it at {np.round(expected, 3).tolist()} (slice spacing {spacing[2]:.4g} "
                "mm): the series has missing slices, uneven spacing or a gantry tilt. Resample it to a regular "
                "grid first (e.g. load it in 3D Slicer and save the volume as NRRD)."
            )
