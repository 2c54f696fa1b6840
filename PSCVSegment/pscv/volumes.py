"""Images with their geometry.

Arrays are numpy `[k, j, i]` (slice, row, column), the order SimpleITK's GetArrayFromImage gives.
Geometry follows ITK/DICOM in LPS: `physical = origin + direction @ (spacing * [i, j, k])`, where
`spacing` and `origin` are in `(i, j, k)` / `(x, y, z)` order and the columns of `direction` are the
directions of the i, j and k axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import PSCVError


@dataclass
class Volume:
    array: np.ndarray  # [k, j, i]
    spacing: np.ndarray = field(default_factory=lambda: np.ones(3))  # (i, j, k), mm
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))  # LPS, mm
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))  # columns = i, j, k axes in LPS

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
        return Volume(array, self.spacing.copy(), self.origin.copy(), self.direction.copy())

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous `(i, j, k)` indices, shape (..., 3) -> LPS points (..., 3)."""
        ijk = np.asarray(ijk, dtype=float)
        return self.origin + (ijk * self.spacing) @ self.direction.T

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """LPS points (..., 3) -> continuous `(i, j, k)` indices (..., 3); round to get the voxel."""
        lps = np.asarray(lps, dtype=float)
        return np.linalg.solve(self.direction, (lps - self.origin).T).T / self.spacing

    def slice_axis(self) -> int:
        """The array axis (0 = k, 1 = j, 2 = i) to slice along: the one with the largest spacing.

        Ties go to k, the usual acquisition axis, so an isotropic volume is sliced along k.
        """
        spacing_kji = self.spacing[::-1]
        return int(np.flatnonzero(spacing_kji >= spacing_kji.max() - 1e-6)[0])


def read_image(path: str | Path) -> Volume:
    """Read a scalar 3-D image (NRRD, NIfTI, MHA, ...) with its geometry, as float32."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise PSCVError(f"{path}: no such image file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise PSCVError(f"{path}: could not read the image ({str(error).strip().splitlines()[-1]})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise PSCVError(
            f"{path}: expected a scalar 3-D image, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    return Volume(array, image.GetSpacing(), image.GetOrigin(), np.reshape(image.GetDirection(), (3, 3)))


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

    from .atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as temporary:
        sitk.WriteImage(to_sitk(volume), str(temporary), useCompression=True)
