"""pscv.data.geometry: Slicer world RAS -> parent transform inverse -> RAS-to-IJK -> voxel [k, j, i].

Checked against a real Slicer-written NRRD header and Slicer-written markups (read independently with
pynrrd and json), against SimpleITK's own physical-point-to-index, and on oblique, flipped and
transformed geometries small enough to check by hand.
"""

import json
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from pscv import PSCVError
from pscv.data import geometry

DATA = Path(__file__).parent / "Data" / "formats"
CT = DATA / "slicerio" / "CTChest4.nrrd"  # written by 3D Slicer (slicerio test data)
MARKUPS = DATA / "slicer_markups" / "F.mrk.json"  # written by 3D Slicer (markups schema v1.0.3, LPS)


def ijk_to_ras_from_nrrd_header(header) -> np.ndarray:
    """Slicer's IJK-to-RAS matrix built directly from the NRRD fields (no pscv code involved)."""
    assert header["space"] == "left-posterior-superior"
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.asarray(header["space directions"], dtype=float).T  # rows are the axis vectors
    ijk_to_lps[:3, 3] = header["space origin"]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps


def sitk_index(image, lps):
    return np.array(image.TransformPhysicalPointToIndex(tuple(float(x) for x in lps)))


def sitk_continuous_index(image, lps):
    return np.array(image.TransformPhysicalPointToContinuousIndex(tuple(float(x) for x in lps)))


def rotation_z(degrees):
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


def translation_rotation(rotation, translation):
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = translation
    return matrix


# --- the real Slicer files -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ct():
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(CT))
    reader.ReadImageInformation()
    image = sitk.Image([int(s) for s in reader.GetSize()], sitk.sitkUInt8)
    image.SetSpacing(reader.GetSpacing())
    image.SetOrigin(reader.GetOrigin())
    image.SetDirection(reader.GetDirection())
    return image, ijk_to_ras_from_nrrd_header(nrrd.read_header(str(CT)))


@pytest.fixture(scope="module")
def markups_lps():
    document = json.loads(MARKUPS.read_text())
    (markup,) = document["markups"]
    assert markup["coordinateSystem"] == "LPS"
    labels = [p["label"] for p in markup["controlPoints"]]
    return np.array([p["position"] for p in markup["controlPoints"]], dtype=float), labels


def test_ijk_to_ras_matrix_matches_the_nrrd_header(ct):
    image, ijk_to_ras = ct
    ours = geometry.ijk_to_ras_matrix(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    np.testing.assert_allclose(ours, ijk_to_ras, atol=1e-9)
    spacing, origin, direction = geometry.geometry_from_ijk_to_ras(ijk_to_ras)
    np.testing.assert_allclose(spacing, image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(origin, image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(direction.ravel(), image.GetDirection(), atol=1e-9)


def test_slicer_markups_map_to_the_same_voxels_as_simpleitk(ct, markups_lps):
    image, ijk_to_ras = ct
    lps, _ = markups_lps
    world_ras = geometry.ras_to_lps(lps)  # Slicer's world is RAS; the file stores LPS
    ijk = geometry.world_to_ijk(world_ras, np.linalg.inv(ijk_to_ras))
    for point, continuous in zip(lps, ijk):
        np.testing.assert_allclose(continuous, sitk_continuous_index(image, point), atol=1e-6)
    kji = geometry.world_to_kji(world_ras, np.linalg.inv(ijk_to_ras))
    for point, index in zip(lps, kji):
        np.testing.assert_array_equal(index[::-1], sitk_index(image, point))


def test_points_inside_the_real_volume_agree_with_simpleitk(ct):
    image, ijk_to_ras = ct
    rng = np.random.default_rng(0)
    size = np.array(image.GetSize())
    ijk = rng.uniform(-0.49, size - 0.51, size=(200, 3))
    lps = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in ijk])
    kji = geometry.world_to_kji(geometry.ras_to_lps(lps), np.linalg.inv(ijk_to_ras), shape_kji=size[::-1])
    expected = np.array([sitk_index(image, p) for p in lps])
    np.testing.assert_array_equal(kji[:, ::-1], expected)


def test_markups_outside_the_volume_are_named(ct, markups_lps):
    # F.mrk.json lies at S = 0.7 mm, above the top slice of CTChest4 (S from -340.25 to -10.25 mm).
    image, ijk_to_ras = ct
    lps, labels = markups_lps
    with pytest.raises(PSCVError, match=r"3 point\(s\) lie outside the image \(F_5-1, F_5-2, F_5-3"):
        geometry.world_to_kji(geometry.ras_to_lps(lps), np.linalg.inv(ijk_to_ras),
                              shape_kji=image.GetSize()[::-1], names=labels)


# --- hand-checkable matrices ------------------------------------------------------------------------------

def test_flipped_axes_by_hand():
    # LPS origin (10, 20, 30), spacing (2, 3, 4), i runs towards -L, j towards +P, k towards -S.
    ijk_to_ras = geometry.ijk_to_ras_matrix((2, 3, 4), (10, 20, 30), np.diag([-1.0, 1.0, -1.0]))
    # voxel i=1, j=2, k=3: LPS (10 - 2, 20 + 6, 30 - 12) = (8, 26, 18) -> RAS (-8, -26, 18)
    np.testing.assert_allclose(geometry.kji_to_world([[3, 2, 1]], ijk_to_ras), [[-8, -26, 18]])
    kji = geometry.world_to_kji([[-8, -26, 18]], np.linalg.inv(ijk_to_ras), shape_kji=(4, 3, 2))
    np.testing.assert_array_equal(kji, [[3, 2, 1]])
    # i grows towards R (RAS x = -LPS x) by 2 mm a voxel: up to 1 mm either way stays in voxel i = 1
    ras_to_ijk = np.linalg.inv(ijk_to_ras)
    for r, i in ((-9.1, 0), (-8.9, 1), (-7.1, 1), (-6.9, 2)):
        np.testing.assert_array_equal(geometry.world_to_kji([[r, -26, 18]], ras_to_ijk), [[3, 2, i]])


def test_oblique_axes_by_hand_and_against_simpleitk():
    # i axis rotated 30 degrees in the axial plane; 1 mm isotropic; LPS origin 0.
    direction = rotation_z(30)
    ijk_to_ras = geometry.ijk_to_ras_matrix((1, 1, 1), (0, 0, 0), direction)
    # voxel i=2 sits 2 mm along (cos30, sin30, 0) in LPS = (1.732, 1.0, 0) -> RAS (-1.732, -1.0, 0)
    world = [[-2 * np.cos(np.radians(30)), -1.0, 0.0]]
    np.testing.assert_array_equal(geometry.world_to_kji(world, np.linalg.inv(ijk_to_ras)), [[0, 0, 2]])
    image = sitk.Image(8, 8, 8, sitk.sitkUInt8)
    image.SetDirection(direction.ravel().tolist())
    image.SetSpacing((0.7, 1.3, 2.1))
    image.SetOrigin((-3.0, 4.0, 5.5))
    ijk_to_ras = geometry.ijk_to_ras_matrix(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    rng = np.random.default_rng(1)
    lps = rng.uniform(-10, 10, size=(100, 3))
    kji = geometry.world_to_kji(geometry.ras_to_lps(lps), np.linalg.inv(ijk_to_ras))
    np.testing.assert_array_equal(kji[:, ::-1], [sitk_index(image, p) for p in lps])


def test_parent_transform_by_hand():
    # Same flipped volume as above, under a parent transform: rotate 90 degrees about S, then move 5 mm to R.
    ijk_to_ras = geometry.ijk_to_ras_matrix((2, 3, 4), (10, 20, 30), np.diag([-1.0, 1.0, -1.0]))
    local_to_world = translation_rotation(rotation_z(90), (5, 0, 0))
    world_to_local = np.linalg.inv(local_to_world)
    # voxel (k, j, i) = (3, 2, 1) is at local RAS (-8, -26, 18); rotated: (26, -8, 18); moved: (31, -8, 18)
    np.testing.assert_allclose(geometry.kji_to_world([[3, 2, 1]], ijk_to_ras, local_to_world), [[31, -8, 18]],
                               atol=1e-9)
    kji = geometry.world_to_kji([[31, -8, 18]], np.linalg.inv(ijk_to_ras), world_to_local, shape_kji=(4, 3, 2))
    np.testing.assert_array_equal(kji, [[3, 2, 1]])
    # without the inverse transform the same world point is elsewhere (outside this small image)
    with pytest.raises(PSCVError, match="outside the image"):
        geometry.world_to_kji([[31, -8, 18]], np.linalg.inv(ijk_to_ras), None, shape_kji=(4, 3, 2))


def test_round_trip_under_oblique_geometry_and_transform():
    rng = np.random.default_rng(2)
    direction = rotation_z(17) @ np.diag([1.0, -1.0, 1.0])
    ijk_to_ras = geometry.ijk_to_ras_matrix((0.8, 0.8, 2.5), (12.0, -40.0, 7.0), direction)
    local_to_world = translation_rotation(rotation_z(-33), (1.5, -2.0, 30.0))
    kji = np.stack([rng.integers(0, n, 50) for n in (20, 30, 40)], axis=1)
    world = geometry.kji_to_world(kji, ijk_to_ras, local_to_world)
    back = geometry.world_to_kji(world, np.linalg.inv(ijk_to_ras), np.linalg.inv(local_to_world), (20, 30, 40))
    np.testing.assert_array_equal(back, kji)


def test_halves_round_up_like_itk():
    image = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    ijk_to_ras = geometry.ijk_to_ras_matrix(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    lps = np.array([[0.5, 1.5, 2.5], [-0.5, 0.5, 1.5]])
    kji = geometry.world_to_kji(geometry.ras_to_lps(lps), np.linalg.inv(ijk_to_ras))
    np.testing.assert_array_equal(kji[:, ::-1], [sitk_index(image, p) for p in lps])


def test_volume_from_ijk_to_ras_keeps_lps_geometry():
    direction = rotation_z(10)
    ijk_to_ras = geometry.ijk_to_ras_matrix((1, 2, 3), (4, 5, 6), direction)
    volume = geometry.volume_from_ijk_to_ras(np.zeros((3, 4, 5), np.int16), ijk_to_ras)
    np.testing.assert_allclose(volume.spacing, (1, 2, 3))
    np.testing.assert_allclose(volume.origin, (4, 5, 6))
    np.testing.assert_allclose(volume.direction, direction, atol=1e-12)
    # Volume.index_to_lps and geometry agree on where a voxel is
    lps = volume.index_to_lps([2, 1, 0])
    np.testing.assert_allclose(geometry.ras_to_lps(geometry.kji_to_world([[0, 1, 2]], ijk_to_ras))[0], lps)


@pytest.mark.parametrize("matrix, message", [
    (np.zeros((3, 3)), "expected a 4x4 matrix"),
    (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1.0]]), "not an affine matrix"),
    (np.full((4, 4), np.nan), "non-finite"),
])
def test_bad_matrices_are_refused(matrix, message):
    with pytest.raises(PSCVError, match=message):
        geometry.world_to_ijk([[0, 0, 0]], matrix)


def test_bad_points_are_refused():
    with pytest.raises(PSCVError, match="not finite"):
        geometry.world_to_ijk([[0, np.nan, 0]], np.eye(4))
    with pytest.raises(PSCVError, match=r"shape \(N, 3\)"):
        geometry.world_to_ijk([[0, 0]], np.eye(4))
    assert geometry.world_to_kji(np.zeros((0, 3)), np.eye(4)).shape == (0, 3)


def test_singular_geometry_is_refused():
    matrix = np.eye(4)
    matrix[:3, 2] = matrix[:3, 0]  # k axis equal to the i axis
    with pytest.raises(PSCVError, match="singular"):
        geometry.geometry_from_ijk_to_ras(matrix)
