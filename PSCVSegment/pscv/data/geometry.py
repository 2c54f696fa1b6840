"""Coordinates between 3D Slicer's RAS world and image voxels: pure numpy matrix arithmetic.

Slicer describes a volume by its IJK-to-RAS 4x4 matrix (`vtkMRMLVolumeNode.GetIJKToRASMatrix`) and, when
the volume sits under a transform, by the parent transform's world-to-local 4x4 matrix
(`vtkMRMLTransformNode.GetMatrixTransformFromWorld`). The engine describes images the ITK way, in LPS
(`pscv.data.volumes.Volume`: spacing, origin, direction). This module converts between the two and maps
control points (world RAS) to voxel indices. Nothing here imports slicer, vtk or torch.

Axis orders: `ijk` arrays are (i, j, k) = (column, row, slice); voxel indices returned for numpy are
`[k, j, i]`, the order of the image array.
"""

from __future__ import annotations

import numpy as np

from .. import PSCVError
from .volumes import Volume

# LPS <-> RAS flips the first two axes; the matrix is its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
RAS_TO_LPS = LPS_TO_RAS


def _matrix4(matrix, what: str) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (4, 4):
        raise PSCVError(f"{what}: expected a 4x4 matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise PSCVError(f"{what}: the matrix has non-finite values")
    if not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise PSCVError(f"{what}: not an affine matrix (last row {matrix[3].tolist()}, expected [0, 0, 0, 1])")
    return matrix


def _points3(points, what: str) -> np.ndarray:
    points = np.asarray(points, dtype=float)
    if points.size == 0:
        return np.zeros((0, 3))
    if points.shape == (3,):
        points = points.reshape(1, 3)
    if points.ndim != 2 or points.shape[1] != 3:
        raise PSCVError(f"{what}: expected points of shape (N, 3), got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise PSCVError(f"{what}: some positions are not finite numbers")
    return points


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def ijk_to_ras_matrix(spacing, origin, direction) -> np.ndarray:
    """IJK-to-RAS 4x4 matrix (Slicer's) from ITK geometry in LPS (spacing (i, j, k), origin, direction columns)."""
    spacing = np.asarray(spacing, dtype=float).reshape(3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.asarray(direction, dtype=float).reshape(3, 3) * spacing
    ijk_to_lps[:3, 3] = np.asarray(origin, dtype=float).reshape(3)
    return LPS_TO_RAS @ ijk_to_lps


def geometry_from_ijk_to_ras(ijk_to_ras) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spacing, origin, direction) in ITK's LPS convention from Slicer's IJK-to-RAS 4x4 matrix.

    The columns of the 3x3 part are the i, j, k steps in RAS: their lengths are the spacing, their
    directions (flipped to LPS) the direction matrix.
    """
    ijk_to_lps = RAS_TO_LPS @ _matrix4(ijk_to_ras, "IJK-to-RAS")
    steps = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(steps, axis=0)
    if np.any(spacing <= 0):
        raise PSCVError(f"IJK-to-RAS matrix has a zero-length axis (spacing {spacing.tolist()})")
    direction = steps / spacing
    if abs(np.linalg.det(direction)) < 1e-6:
        raise PSCVError("IJK-to-RAS matrix is singular: the image axes are not independent")
    return spacing, ijk_to_lps[:3, 3].copy(), direction


def ras_to_lps(points) -> np.ndarray:
    """Flip RAS points (N, 3) to LPS (and back: the flip is its own inverse)."""
    points = np.array(points, dtype=float, copy=True)
    points[..., :2] *= -1
    return points


def volume_from_ijk_to_ras(array_kji: np.ndarray, ijk_to_ras) -> Volume:
    """An engine `Volume` for an array `[k, j, i]` (e.g. `slicer.util.arrayFromVolume`) and its IJK-to-RAS matrix."""
    array_kji = np.asarray(array_kji)
    if array_kji.ndim != 3:
        raise PSCVError(f"expected a 3-D scalar image array [k, j, i], got shape {array_kji.shape}")
    spacing, origin, direction = geometry_from_ijk_to_ras(ijk_to_ras)
    return Volume(array_kji, spacing, origin, direction)


def world_to_ijk(points_world_ras, ras_to_ijk, world_to_local=None) -> np.ndarray:
    """Continuous (i, j, k) indices (N, 3) of world RAS points.

    `world_to_local` is the inverse of the volume's parent transform (world RAS -> the volume's own RAS),
    a 4x4 matrix, or None when the volume is not transformed. `ras_to_ijk` is the volume's RAS-to-IJK.
    """
    points = _points3(points_world_ras, "control points")
    matrix = _matrix4(ras_to_ijk, "RAS-to-IJK")
    if world_to_local is not None:
        matrix = matrix @ _matrix4(world_to_local, "world-to-local transform")
    return _apply(matrix, points)


def round_index(ijk: np.ndarray) -> np.ndarray:
    """Nearest voxel, halves rounded up (as ITK's TransformPhysicalPointToIndex does)."""
    return np.floor(np.asarray(ijk, dtype=float) + 0.5).astype(np.int64)


def world_to_kji(points_world_ras, ras_to_ijk, world_to_local=None, shape_kji=None, names=None) -> np.ndarray:
    """Voxel indices `[k, j, i]` (N, 3) of world RAS points (nearest voxel).

    With `shape_kji` (the image array's shape) a point outside the image raises `PSCVError` naming it
    (`names[n]` when given, else its number) so the user can move or delete it.
    """
    ijk = round_index(world_to_ijk(points_world_ras, ras_to_ijk, world_to_local))
    kji = ijk[:, ::-1].copy()
    if shape_kji is not None:
        shape = np.asarray(shape_kji, dtype=np.int64).reshape(3)
        outside = np.flatnonzero(np.any((kji < 0) | (kji >= shape), axis=1))
        if len(outside):
            labels = [names[n] if names is not None else f"#{n + 1}" for n in outside]
            raise PSCVError(
                f"{len(outside)} point(s) lie outside the image ({', '.join(map(str, labels[:5]))}"
                f"{', ...' if len(labels) > 5 else ''}; image size i, j, k = {shape[::-1].tolist()}): "
                "move them onto the image or delete them"
            )
    return kji


def kji_to_world(kji, ijk_to_ras, local_to_world=None) -> np.ndarray:
    """World RAS positions (N, 3) of voxel indices `[k, j, i]` (the inverse of `world_to_kji` at voxel centres)."""
    kji = np.asarray(kji, dtype=float).reshape(-1, 3)
    matrix = _matrix4(ijk_to_ras, "IJK-to-RAS")
    if local_to_world is not None:
        matrix = _matrix4(local_to_world, "local-to-world transform") @ matrix
    return _apply(matrix, kji[:, ::-1])
