"""Images with their geometry: `Volume`, read from image files and DICOM series, written to image files.

Arrays are numpy `[k, j, i]` (slice, row, column), the order SimpleITK's GetArrayFromImage gives.
Geometry follows ITK/DICOM in LPS: `physical = origin + direction @ (spacing * [i, j, k])`, where
`spacing` and `origin` are in `(i, j, k)` / `(x, y, z)` order and the columns of `direction` are the
directions of the i, j and k axes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import PSCVError
from ..base.resources import check_memory, describe_bytes
from .formats import ONE_FILE_SUFFIXES

MAX_COMPRESSION = 1032  # deflate (gzip, zlib: what NRRD, NIfTI and MetaImage files use) packs no better


@dataclass
class Volume:
    array: np.ndarray  # [k, j, i]
    spacing: np.ndarray = field(default_factory=lambda: np.ones(3))  # (i, j, k), mm
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))  # LPS, mm
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))  # columns = i, j, k axes in LPS
    # For an image read from a DICOM series: its files, in slice (k) order; DICOM-SEG export references them.
    dicom_files: tuple[str, ...] = ()

    def __post_init__(self):
        self.spacing = np.asarray(self.spacing, dtype=float).reshape(3)
        self.origin = np.asarray(self.origin, dtype=float).reshape(3)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape in array order `[k, j, i]`."""
        return tuple(self.array.shape)

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry holding another array (e.g. a label map)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        return Volume(array, self.spacing.copy(), self.origin.copy(), self.direction.copy(), self.dicom_files)

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous `(i, j, k)` indices, shape (..., 3) -> LPS points (..., 3)."""
        ijk = np.asarray(ijk, dtype=float)
        return self.origin + (ijk * self.spacing) @ self.direction.T

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """LPS points (..., 3) -> continuous `(i, j, k)` indices (..., 3); round to get the voxel."""
        lps = np.asarray(lps, dtype=float)
        return np.linalg.solve(self.direction, (lps - self.origin).T).T / self.spacing

    def lps_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Smallest and largest LPS coordinates covered by the image (voxel edges, not centres)."""
        size = np.array(self.array.shape[::-1], dtype=float)
        corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=float)
        lps = self.index_to_lps(corners * size - 0.5)
        return lps.min(axis=0), lps.max(axis=0)

    def describe_geometry(self) -> str:
        """One line naming size (i, j, k), spacing, origin and direction, for error messages."""
        def fmt(values):
            return "(" + ", ".join(f"{v:.6g}" for v in np.ravel(values)) + ")"

        size = "x".join(str(n) for n in self.array.shape[::-1])
        axes = " ".join(f"{axis} {fmt(self.direction[:, n])}" for n, axis in enumerate("ijk"))
        return f"{size} voxels, spacing {fmt(self.spacing)} mm, origin {fmt(self.origin)}, axes {axes}"

    def slice_axis(self) -> int:
        """The array axis (0 = k, 1 = j, 2 = i) to slice along: the one with the largest spacing.

        Ties go to k, the usual acquisition axis, so an isotropic volume is sliced along k.
        """
        spacing_kji = self.spacing[::-1]
        return int(np.flatnonzero(spacing_kji >= spacing_kji.max() - 1e-6)[0])


def read_image(path: str | Path, series_uid: str | None = None) -> Volume:
    """Read a scalar 3-D image with its geometry, as float32.

    `path` is an image file (NRRD/NHDR, NIfTI, MHA/MHD, anything SimpleITK reads) or a folder holding a
    DICOM series (searched with its subfolders; `series_uid` picks one series when there are several).
    Non-finite voxels (NaN, +-inf) are replaced by the smallest / largest finite value, with a warning.
    """
    path = Path(path)
    if path.is_dir():
        return _read_dicom_folder(path, series_uid)
    if not path.exists():
        raise PSCVError(f"{path}: no such image file or DICOM folder")
    image = _read_file(path)
    _check_dicom_file(image, path)
    return _volume_from_sitk(image, str(path))


def _check_dicom_file(image, path: Path) -> None:
    """A DICOM file given alone must be a whole image, not a segmentation or one slice of a series."""
    from .dicom import NON_IMAGE_MODALITIES

    if not image.HasMetaDataKey("0008|0060"):
        return  # not DICOM
    modality = image.GetMetaData("0008|0060").strip()
    if modality.upper() in NON_IMAGE_MODALITIES:
        raise PSCVError(f"{path}: a DICOM {modality} object, not an image; give the image it belongs to")
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        raise PSCVError(f"{path}: one DICOM slice; give the folder that holds the whole series")


def _read_file(path: Path):
    """The image of a file, after checking what its header says (before a voxel is read)."""
    import SimpleITK as sitk

    if path.stat().st_size == 0:
        raise PSCVError(f"{path}: the file is empty")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        _check_header(reader, path)
        return reader.Execute()
    except RuntimeError as error:
        raise PSCVError(
            f"{path}: could not read the image ({str(error).strip().splitlines()[-1]}); expected NRRD, NIfTI, "
            "MHA/MHD, or a folder holding a DICOM series"
        ) from None


def _check_header(reader, path: Path) -> None:
    """Refuse, from the header alone, an image whose axes are not independent or that cannot fit in memory."""
    import SimpleITK as sitk

    dimension = reader.GetDimension()
    direction = np.reshape(reader.GetDirection(), (dimension, dimension))
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        rows = "; ".join(" ".join(f"{v:g}" for v in row) for row in direction)
        raise PSCVError(f"{path}: the image's axis directions are not independent (direction matrix {rows}: "
                        "not invertible); the header is damaged: fix its space directions (NRRD) or "
                        "orientation (NIfTI) and read it again")
    if not all(s > 0 and np.isfinite(s) for s in reader.GetSpacing()):
        raise PSCVError(f"{path}: the header gives a voxel spacing of {list(reader.GetSpacing())}; spacings must be "
                        "positive: the header is damaged")
    voxels = float(np.prod([float(n) for n in reader.GetSize()])) * reader.GetNumberOfComponents()
    component = sitk.Image([1] * dimension, reader.GetPixelID()).GetSizeOfPixelComponent()
    size = " x ".join(str(n) for n in reader.GetSize())
    data = voxels * component
    if path.name.lower().endswith(ONE_FILE_SUFFIXES) and data > MAX_COMPRESSION * path.stat().st_size + 2**20:
        raise PSCVError(f"{path}: the header says {size} voxels ({describe_bytes(data)}), but the file holds only "
                        f"{describe_bytes(path.stat().st_size)}, less than any compression could pack them into: "
                        "the file is truncated or its header is damaged")
    # The file's voxels, their numpy copy and the float32 image made of it.
    float32 = reader.GetPixelID() == sitk.sitkFloat32
    check_memory(voxels * (2 * component + (0 if float32 else 4)), f"{path}: reading this {size} image",
                 "crop or downsample it (e.g. in 3D Slicer: Crop Volume), or use a machine with more memory")


def _read_dicom_folder(folder: Path, series_uid: str | None) -> Volume:
    from .dicom import read_series, select_series

    series = select_series(folder, series_uid)
    volume = _volume_from_sitk(read_series(series), f"{folder} (DICOM series {series.uid or '(no UID)'})")
    volume.dicom_files = tuple(series.files)
    return volume


def _volume_from_sitk(image, source: str) -> Volume:
    import SimpleITK as sitk

    dimension, components = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
    if dimension != 3 or components != 1:
        raise PSCVError(
            f"{source}: expected a scalar 3-D image, got a {dimension}-D image with {components} value(s) per "
            f"voxel (size {list(image.GetSize())}); extract one 3-D scalar volume first (one time point / "
            "channel), or for DICOM pass the folder of the series rather than one file"
        )
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    array = _replace_non_finite(array, source)
    return Volume(array, image.GetSpacing(), image.GetOrigin(), np.reshape(image.GetDirection(), (3, 3)))


def _replace_non_finite(array: np.ndarray, source: str) -> np.ndarray:
    finite = np.isfinite(array)
    if finite.all():
        return array
    if not finite.any():
        raise PSCVError(f"{source}: every voxel is NaN or infinite; there is no image to segment")
    bad = int(array.size - finite.sum())
    low, high = float(array[finite].min()), float(array[finite].max())
    warnings.warn(
        f"{source}: {bad} of {array.size} voxels are NaN or infinite; NaN and -inf were set to the smallest "
        f"finite value ({low:g}), +inf to the largest ({high:g})",
        stacklevel=3,
    )
    return np.nan_to_num(array, nan=low, neginf=low, posinf=high)


def to_sitk(volume: Volume):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(tuple(float(s) for s in volume.spacing))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    image.SetDirection(tuple(float(d) for d in volume.direction.ravel()))
    return image


def write_image(volume: Volume, path: str | Path) -> None:
    """Write an image or label map (type kept) with its geometry; the file appears atomically."""
    import SimpleITK as sitk

    from ..base.atomic import atomic_path

    path = Path(path)
    if not path.name.lower().endswith(ONE_FILE_SUFFIXES):  # a detached header cannot be renamed atomically
        raise PSCVError(f"{path}: cannot write this image format; use one of {', '.join(ONE_FILE_SUFFIXES)}")
    with atomic_path(path) as temporary:
        sitk.WriteImage(to_sitk(volume), str(temporary), useCompression=True)
