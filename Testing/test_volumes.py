"""pscv.data.volumes and pscv.data.dicom: reading images with their exact geometry, and refusing what is not one image.

Real files: CTChest4.nrrd (written by 3D Slicer), the dcmqi CT series ct-3slice (3 slices) and 23x38x3
(a tiny CT). Oblique DICOM series are made here with pydicom (dicom_series_helper), as no real oblique
series is small enough to keep in the repository.
"""

import shutil
from pathlib import Path

import nrrd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_series_helper import write_ct_series
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from pscv import PSCVError
from pscv.data.volumes import Volume, read_image, write_image

DATA = Path(__file__).parent / "Data" / "formats"
CT = DATA / "slicerio" / "CTChest4.nrrd"
CT_3SLICE = DATA / "dcmqi" / "ct-3slice"
TINY_CT = DATA / "dcmqi" / "23x38x3" / "image"


def test_nrrd_geometry_is_the_header_geometry():
    volume = read_image(CT)
    data, header = nrrd.read(str(CT), index_order="C")  # independent reader: [k, j, i]
    axes = np.asarray(header["space directions"], dtype=float)  # rows: the i, j, k steps in LPS
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(volume.spacing, np.linalg.norm(axes, axis=1), rtol=1e-12)
    np.testing.assert_allclose(volume.origin, header["space origin"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(volume.direction * volume.spacing, axes.T, atol=1e-9)
    assert volume.shape == data.shape == (34, 128, 128)
    np.testing.assert_array_equal(volume.array, data.astype(np.float32))
    assert volume.array.dtype == np.float32


def test_index_and_lps_agree_with_simpleitk_on_the_slicer_file():
    volume, image = read_image(CT), sitk.ReadImage(str(CT))
    rng = np.random.default_rng(0)
    for ijk in rng.uniform(-1, 130, size=(20, 3)):
        lps = volume.index_to_lps(ijk)
        np.testing.assert_allclose(lps, image.TransformContinuousIndexToPhysicalPoint(ijk.tolist()), atol=1e-9)
        np.testing.assert_allclose(volume.lps_to_index(lps), ijk, atol=1e-9)


def random_geometry(rotation, spacing, flips, origin):
    direction = Rotation.from_rotvec(rotation).as_matrix() @ np.diag(flips)
    return Volume(np.zeros((3, 4, 5), np.float32), spacing, origin, direction)


geometries = st.builds(
    random_geometry,
    rotation=st.lists(st.floats(-np.pi, np.pi), min_size=3, max_size=3),
    spacing=st.lists(st.floats(0.05, 20.0), min_size=3, max_size=3),
    flips=st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3),
    origin=st.lists(st.floats(-500, 500), min_size=3, max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(volume=geometries, ijk=st.lists(st.integers(-50, 600), min_size=3, max_size=3))
def test_voxel_centre_round_trips_through_lps(volume, ijk):
    """index -> LPS -> index is the identity for any rotation, anisotropic spacing and axis flips."""
    lps = volume.index_to_lps(np.array(ijk, dtype=float))
    np.testing.assert_allclose(volume.lps_to_index(lps), ijk, atol=1e-6)
    image = sitk.Image(5, 4, 3, sitk.sitkUInt8)
    image.SetSpacing(volume.spacing.tolist())
    image.SetOrigin(volume.origin.tolist())
    image.SetDirection(volume.direction.ravel().tolist())
    np.testing.assert_allclose(lps, image.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk]),
                               atol=1e-6)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_oblique_image_round_trips_through_files(tmp_path, suffix):
    direction = Rotation.from_euler("xyz", [25, -40, 70], degrees=True).as_matrix() @ np.diag([1, -1, 1])
    array = np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32)
    volume = Volume(array, [0.7, 1.3, 4.5], [12.5, -40.25, 7.0], direction)
    write_image(volume, tmp_path / f"image{suffix}")
    back = read_image(tmp_path / f"image{suffix}")
    tolerance = 1e-5 if suffix == ".nii.gz" else 1e-9  # NIfTI stores the geometry as float32
    np.testing.assert_allclose(back.spacing, volume.spacing, rtol=tolerance)
    np.testing.assert_allclose(back.origin, volume.origin, atol=tolerance * 100)
    np.testing.assert_allclose(back.direction, volume.direction, atol=tolerance)
    np.testing.assert_array_equal(back.array, array)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"image{suffix}"]  # no temporary left behind


def test_detached_header_formats_are_refused_for_writing(tmp_path):
    with pytest.raises(PSCVError, match=r"\.mhd.*cannot write this image format"):
        write_image(Volume(np.zeros((2, 2, 2), np.float32)), tmp_path / "image.mhd")


def test_dicom_series_geometry_matches_the_files():
    volume = read_image(CT_3SLICE)
    assert volume.shape == (3, 512, 512)
    files = [pydicom.dcmread(f, stop_before_pixels=True) for f in volume.dicom_files]
    assert len(files) == 3
    for k, ds in enumerate(files):  # dicom_files are in k order, each at its slice's position
        np.testing.assert_allclose(volume.index_to_lps([0, 0, k]), [float(v) for v in ds.ImagePositionPatient],
                                   atol=1e-4)
    np.testing.assert_allclose(volume.spacing[:2], [float(v) for v in files[0].PixelSpacing[::-1]])
    np.testing.assert_allclose(volume.direction[:, :2].T.ravel(), [float(v) for v in files[0].ImageOrientationPatient],
                               atol=1e-6)
    first = pydicom.dcmread(volume.dicom_files[0])
    hu = first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_array_equal(volume.array[0], hu.astype(np.float32))


def same_voxels_in_space(a: Volume, b: Volume) -> bool:
    """Every voxel of `b` sits on a voxel centre of `a` holding the same value."""
    ijk = np.indices(b.shape[::-1]).reshape(3, -1).T
    in_a = a.lps_to_index(b.index_to_lps(ijk))
    if not np.allclose(in_a, np.round(in_a), atol=1e-4):
        return False
    i, j, k = np.round(in_a).astype(int).T
    return np.array_equal(a.array[k, j, i], b.array[ijk[:, 2], ijk[:, 1], ijk[:, 0]])


@pytest.mark.parametrize("angles", [(0, 0, 0), (10, -25, 40), (90, 0, 180)])
@pytest.mark.parametrize("flips", [(-1, -1, 1), (1, -1, 1)])
def test_oblique_and_flipped_dicom_series_keep_their_geometry(tmp_path, angles, flips):
    direction = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(flips)
    array = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7) - 100
    volume = Volume(array, [0.8, 1.1, 3.0], [-20.0, 35.5, 101.0], direction)
    write_ct_series(volume, tmp_path / "series")
    back = read_image(tmp_path / "series")
    assert same_voxels_in_space(volume, back)
    if np.linalg.det(direction) > 0:  # right-handed: DICOM's slice order is k's, the grid is the same
        np.testing.assert_allclose(back.origin, volume.origin, atol=1e-6)
        np.testing.assert_allclose(back.spacing, volume.spacing, rtol=1e-6)
        np.testing.assert_allclose(back.direction, volume.direction, atol=1e-6)
        np.testing.assert_array_equal(back.array, array)
    else:  # left-handed: DICOM sorts slices along row x column, so k comes back reversed
        np.testing.assert_allclose(back.direction[:, 2], -volume.direction[:, 2], atol=1e-6)
        np.testing.assert_array_equal(back.array, array[::-1])


def two_series_folder(tmp_path) -> Path:
    folder = tmp_path / "dicom"
    shutil.copytree(CT_3SLICE, folder / "a")
    shutil.copytree(TINY_CT, folder / "b")
    return folder


def test_folder_with_two_series_lists_them_and_series_uid_picks_one(tmp_path):
    folder = two_series_folder(tmp_path)
    uid_a = pydicom.dcmread(next((folder / "a").iterdir()), stop_before_pixels=True).SeriesInstanceUID
    uid_b = pydicom.dcmread(next((folder / "b").iterdir()), stop_before_pixels=True).SeriesInstanceUID
    with pytest.raises(PSCVError) as error:
        read_image(folder)
    message = str(error.value)
    assert "2 DICOM image series" in message and uid_a in message and uid_b in message and "--series" in message
    assert read_image(folder, series_uid=uid_b).shape == (3, 38, 23)
    assert read_image(folder, series_uid=uid_a).shape == (3, 512, 512)
    with pytest.raises(PSCVError, match="no DICOM series with SeriesInstanceUID 1.2.3"):
        read_image(folder, series_uid="1.2.3")


def test_a_seg_object_beside_the_series_is_not_an_image_series(tmp_path):
    folder = tmp_path / "dicom"
    shutil.copytree(CT_3SLICE, folder)
    shutil.copy(DATA / "dcmqi" / "liver.dcm", folder)  # dcmqi's DICOM-SEG of this very series
    assert read_image(folder).shape == (3, 512, 512)


def test_folder_without_dicom_images_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(PSCVError, match=r"no DICOM image series found \(1 file\(s\) looked at"):
        read_image(tmp_path)
    seg_only = tmp_path / "seg"
    seg_only.mkdir()
    shutil.copy(DATA / "dcmqi" / "liver.dcm", seg_only)
    with pytest.raises(PSCVError, match="only non-image series.*SEG"):
        read_image(seg_only)


def test_enhanced_multiframe_ct_reads_like_its_single_frame_series(tmp_path):
    """dcmqi's 23x38x3 case holds the same CT as three slices and as one enhanced multi-frame file."""
    slices, multiframe = read_image(TINY_CT), read_image(TINY_CT.parent / "multiframe")
    assert multiframe.shape == slices.shape == (3, 38, 23)
    np.testing.assert_allclose(multiframe.origin, slices.origin, atol=1e-4)
    np.testing.assert_allclose(multiframe.spacing, slices.spacing, atol=1e-6)
    np.testing.assert_allclose(multiframe.direction, slices.direction, atol=1e-6)
    np.testing.assert_array_equal(multiframe.array, slices.array)


def test_one_dicom_slice_or_a_seg_file_is_not_an_image():
    with pytest.raises(PSCVError, match="01.dcm: one DICOM slice; give the folder that holds the whole series"):
        read_image(CT_3SLICE / "01.dcm")
    with pytest.raises(PSCVError, match="liver.dcm: a DICOM SEG object, not an image"):
        read_image(DATA / "dcmqi" / "liver.dcm")


def test_uneven_slice_spacing_is_refused(tmp_path):
    folder = tmp_path / "series"
    shutil.copytree(TINY_CT, folder)
    last = sorted(folder.iterdir())[-1]
    ds = pydicom.dcmread(last)
    position = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [position[0], position[1], position[2] + 4.0]  # a gap, as after a missing slice
    ds.save_as(last)
    with pytest.raises(PSCVError, match="missing slices, uneven spacing or a gantry tilt"):
        read_image(folder)


def test_four_d_and_vector_images_are_refused(tmp_path):
    nrrd.write(str(tmp_path / "four.nrrd"), np.zeros((2, 3, 4, 5), np.int16),
               {"kinds": ["domain"] * 4, "space dimension": 4})
    with pytest.raises(PSCVError, match="expected a scalar 3-D image, got a 4-D image"):
        read_image(tmp_path / "four.nrrd")
    with pytest.raises(PSCVError, match="2 value\\(s\\) per voxel"):
        read_image(DATA / "slicerio" / "SegmentationOverlapping.seg.nrrd")  # Slicer's 4-D layered file


def test_nan_and_inf_are_replaced_with_a_warning(tmp_path):
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    array[0, 0, 0], array[1, 2, 3], array[1, 0, 0] = np.nan, np.inf, -np.inf
    write_image(Volume(array), tmp_path / "nan.nrrd")
    with pytest.warns(UserWarning, match="3 of 24 voxels are NaN or infinite"):
        volume = read_image(tmp_path / "nan.nrrd")
    assert volume.array[0, 0, 0] == 1 and volume.array[1, 0, 0] == 1 and volume.array[1, 2, 3] == 22
    write_image(Volume(np.full((2, 2, 2), np.nan, np.float32)), tmp_path / "allnan.nrrd")
    with pytest.raises(PSCVError, match="every voxel is NaN"):
        read_image(tmp_path / "allnan.nrrd")


def test_empty_truncated_and_missing_files_are_clear_errors(tmp_path):
    (tmp_path / "empty.nrrd").write_bytes(b"")
    with pytest.raises(PSCVError, match="empty.nrrd: the file is empty"):
        read_image(tmp_path / "empty.nrrd")
    data = CT.read_bytes()
    (tmp_path / "truncated.nrrd").write_bytes(data[: len(data) // 2])
    with pytest.raises(PSCVError, match="truncated.nrrd: could not read the image"):
        read_image(tmp_path / "truncated.nrrd")
    with pytest.raises(PSCVError, match="no such image file or DICOM folder"):
        read_image(tmp_path / "missing.nii.gz")


def test_bounds_cover_the_voxel_edges():
    volume = read_image(CT)
    low, high = volume.lps_bounds()
    # i runs towards -L from 193.096: the edge half a voxel beyond the first and last centres.
    np.testing.assert_allclose(low[0], 193.09599304199222 - 127.5 * 3.04687595367432, atol=1e-6)
    np.testing.assert_allclose(high[0], 193.09599304199222 + 0.5 * 3.04687595367432, atol=1e-6)
    np.testing.assert_allclose([low[2], high[2]], [-340.25 - 5, -340.25 + 33.5 * 10], atol=1e-6)
