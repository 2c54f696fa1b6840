"""pscv.data.segmentations: .seg.nrrd as 3D Slicer writes it, plain label maps, reading segmentations back, export.

Real files: Segmentation.seg.nrrd and SegmentationOverlapping.seg.nrrd (written by 3D Slicer, from
slicerio's test data) on CTChest4.nrrd; dcmqi's liver_seg.nrrd. Our files are read back with slicerio (the
reader other tools use), pynrrd and SimpleITK, and compared with what they read from Slicer's own file.
"""

from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from scipy.spatial.transform import Rotation

from pscv import PSCVError
from pscv.data.classes import ClassInfo
from pscv.data.segmentations import (
    export_segmentation,
    read_segmentation,
    read_segmentation_volume,
    segmentation_classes,
    write_segmentation,
)
from pscv.data.volumes import Volume, read_image, write_image

DATA = Path(__file__).parent / "Data" / "formats"
CT = DATA / "slicerio" / "CTChest4.nrrd"
SLICER_SEG = DATA / "slicerio" / "Segmentation.seg.nrrd"
OVERLAPPING = DATA / "slicerio" / "SegmentationOverlapping.seg.nrrd"


@pytest.fixture(scope="module")
def ct():
    return read_image(CT)


@pytest.fixture(scope="module")
def slicer():
    return slicerio.read_segmentation(str(SLICER_SEG))


@pytest.fixture(scope="module")
def chest_classes(slicer):
    """The classes of Slicer's segmentation, as a classes.json would hold them (colours 0..255)."""
    return [ClassInfo("background", 0, (0, 0, 0))] + [
        ClassInfo(s["name"], s["labelValue"], tuple(int(round(c * 255)) for c in s["color"]))
        for s in slicer["segments"]
    ]


def kji(slicerio_voxels):
    """slicerio reads voxels in (i, j, k) order; pscv's arrays are [k, j, i]."""
    return np.transpose(slicerio_voxels, (2, 1, 0)) if slicerio_voxels.ndim == 3 else \
        np.transpose(slicerio_voxels, (0, 3, 2, 1))


def test_reading_slicers_segmentation_gives_slicerios_voxels(ct, slicer, chest_classes):
    labelmap = read_segmentation(SLICER_SEG, chest_classes, ct)
    assert labelmap.dtype == np.uint8 and labelmap.shape == ct.shape
    np.testing.assert_array_equal(labelmap, kji(slicer["voxels"]))
    for segment in slicer["segments"]:
        mask = kji(slicerio.segment_mask(slicer, segment["name"]))
        assert np.count_nonzero(mask) > 0
        assert np.all(labelmap[mask] == segment["labelValue"])


def test_our_seg_nrrd_reads_in_slicerio_exactly_like_slicers(ct, slicer, chest_classes, tmp_path):
    labelmap = read_segmentation(SLICER_SEG, chest_classes, ct)
    write_segmentation(tmp_path / "ours.seg.nrrd", labelmap, ct, chest_classes)
    ours = slicerio.read_segmentation(str(tmp_path / "ours.seg.nrrd"))
    np.testing.assert_allclose(ours["ijkToLPS"], slicer["ijkToLPS"], atol=1e-9)
    np.testing.assert_array_equal(ours["voxels"], slicer["voxels"])
    assert ours["voxels"].dtype == slicer["voxels"].dtype == np.uint8
    for mine, theirs in zip(ours["segments"], slicer["segments"], strict=True):
        assert (mine["name"], mine["labelValue"], mine["layer"]) == (theirs["name"], theirs["labelValue"], 0)
        np.testing.assert_allclose(mine["color"], theirs["color"], atol=0.5 / 255)
        np.testing.assert_array_equal(slicerio.segment_mask(ours, mine["name"]),
                                      slicerio.segment_mask(slicer, theirs["name"]))
        assert mine["terminology"]["type"] == ["SCT", "85756007", "Tissue"]  # Slicer's default for a segment
    assert ours["masterRepresentation"] == slicer["masterRepresentation"] == "Binary labelmap"
    assert ours["referenceImageExtentOffset"] == slicer["referenceImageExtentOffset"] == [0, 0, 0]
    assert "Binary labelmap" in ours["containedRepresentationNames"]
    reference = {p["name"]: p["value"] for p in ours["conversionParameters"]}["Reference image geometry"]
    slicer_reference = {p["name"]: p["value"] for p in slicer["conversionParameters"]}["Reference image geometry"]
    np.testing.assert_allclose([float(v) for v in reference.split(";")[:-1]],
                               [float(v) for v in slicer_reference.split(";")[:-1]], atol=1e-9)


def test_our_header_has_every_field_slicer_writes(ct, chest_classes, tmp_path):
    labelmap = read_segmentation(SLICER_SEG, chest_classes, ct)
    write_segmentation(tmp_path / "ours.seg.nrrd", labelmap, ct, chest_classes)
    _, ours = nrrd.read(str(tmp_path / "ours.seg.nrrd"))
    _, theirs = nrrd.read(str(SLICER_SEG))
    assert tmp_path.joinpath("ours.seg.nrrd").read_bytes().startswith(b"NRRD0004\n")
    assert set(theirs) <= set(ours), set(theirs) - set(ours)  # Segment{N}_*, Segmentation_*, geometry
    for key in ("type", "dimension", "space", "kinds", "encoding"):
        assert ours[key] == theirs[key]
    np.testing.assert_allclose(ours["space directions"], theirs["space directions"], atol=1e-9)
    np.testing.assert_allclose(ours["space origin"], theirs["space origin"], atol=1e-9)
    assert ours["Segment0_Extent"] == "0 127 0 127 0 33"  # every segment covers the one shared layer
    image = sitk.ReadImage(str(tmp_path / "ours.seg.nrrd"))  # ITK, as Slicer's reader
    assert image.GetMetaData("Segment6_Name") == "tissue" and image.GetMetaData("Segment6_LabelValue") == "7"


def test_oblique_geometry_and_uint16_values_round_trip(tmp_path):
    direction = Rotation.from_euler("zyx", [30, 15, -60], degrees=True).as_matrix() @ np.diag([1, 1, -1])
    volume = Volume(np.zeros((6, 7, 8), np.float32), [0.5, 0.75, 3.0], [-10.0, 22.5, 300.0], direction)
    classes = [ClassInfo("background", 0), ClassInfo("liver", 1, (200, 100, 50)), ClassInfo("tumour", 300)]
    labelmap = np.zeros(volume.shape, np.uint16)
    labelmap[1:3, 2:5, 3:7], labelmap[4, 0, 0] = 1, 300
    write_segmentation(tmp_path / "o.seg.nrrd", labelmap, volume, classes)
    back = read_segmentation_volume(tmp_path / "o.seg.nrrd", classes)
    np.testing.assert_array_equal(back.array, labelmap)
    assert back.array.dtype == np.uint16
    np.testing.assert_allclose(back.direction, direction, atol=1e-12)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-12)
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-12)
    theirs = slicerio.read_segmentation(str(tmp_path / "o.seg.nrrd"))
    np.testing.assert_allclose(theirs["ijkToLPS"][:3, :3], direction * volume.spacing, atol=1e-12)
    assert [s["name"] for s in theirs["segments"]] == ["liver", "tumour"]
    assert np.count_nonzero(slicerio.segment_mask(theirs, "tumour")) == 1


def test_class_terminology_goes_to_the_segment_tags(ct, tmp_path):
    heart = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "80891009", "Heart"],
             "anatomicRegion": ["SCT", "51185008", "Thorax"]}
    classes = [ClassInfo("background", 0), ClassInfo("heart", 1, (206, 110, 84), heart)]
    write_segmentation(tmp_path / "t.seg.nrrd", np.zeros(ct.shape, np.uint8), ct, classes)
    segment = slicerio.read_segmentation(str(tmp_path / "t.seg.nrrd"), skip_voxels=True)["segments"][0]
    assert segment["terminology"]["type"] == ["SCT", "80891009", "Heart"]
    assert segment["terminology"]["anatomicRegion"] == ["SCT", "51185008", "Thorax"]
    bad = [ClassInfo("background", 0), ClassInfo("heart", 1, terminology={"type": "Heart"})]
    with pytest.raises(PSCVError, match="class 'heart': terminology \"category\" must be"):
        write_segmentation(tmp_path / "bad.seg.nrrd", np.zeros(ct.shape, np.uint8), ct, bad)
    assert not (tmp_path / "bad.seg.nrrd").exists()


def test_overlapping_layers_map_by_name_later_segment_wins(ct, slicer, chest_classes):
    overlapping = slicerio.read_segmentation(str(OVERLAPPING))
    sphere = kji(slicerio.segment_mask(overlapping, "overlapping sphere"))
    assert overlapping["voxels"].ndim == 4 and np.count_nonzero(sphere)
    classes = chest_classes + [ClassInfo("Overlapping Sphere", 9)]  # names match case-insensitively
    with pytest.warns(UserWarning, match=r"\d+ voxels belong to segments of two classes"):
        labelmap = read_segmentation(OVERLAPPING, classes, ct)
    assert np.all(labelmap[sphere] == 9)
    np.testing.assert_array_equal(labelmap[~sphere], kji(overlapping["voxels"][0])[~sphere])
    with pytest.warns(UserWarning, match="'overlapping sphere' name no class of classes.json"):
        without = read_segmentation(OVERLAPPING, chest_classes, ct)
    np.testing.assert_array_equal(without, kji(overlapping["voxels"][0]))


def test_segments_that_name_no_class(ct):
    with pytest.raises(PSCVError, match="no segment names a class of classes.json.*'ribs'.*classes: background, LV"):
        read_segmentation(SLICER_SEG, [ClassInfo("background", 0), ClassInfo("LV", 1)], ct)


def test_segmentation_classes_come_from_the_segments():
    classes = segmentation_classes(SLICER_SEG)
    assert [(c.name, c.value) for c in classes][:3] == [("background", 0), ("ribs", 1),
                                                         ("cervical vertebral column", 2)]
    assert classes[-1].color == (128, 174, 128)  # 0.501961 0.682353 0.501961
    layered = segmentation_classes(OVERLAPPING)  # label 1 twice (two layers): renumbered in file order
    assert [c.value for c in layered] == list(range(9)) and layered[-1].name == "overlapping sphere"
    with pytest.raises(PSCVError, match="plain label map names no classes"):
        segmentation_classes(DATA / "dcmqi" / "liver_seg.nrrd")


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii", ".mha"])
def test_plain_label_maps_round_trip_on_the_source_grid(ct, chest_classes, tmp_path, suffix):
    labelmap = read_segmentation(SLICER_SEG, chest_classes, ct)
    write_segmentation(tmp_path / f"labels{suffix}", labelmap, ct, chest_classes)
    image = sitk.ReadImage(str(tmp_path / f"labels{suffix}"))
    assert image.GetPixelID() == sitk.sitkUInt8 and not image.HasMetaDataKey("Segment0_ID")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labelmap)
    np.testing.assert_allclose(image.GetOrigin(), ct.origin, atol=1e-4)
    np.testing.assert_array_equal(read_segmentation(tmp_path / f"labels{suffix}", chest_classes, ct), labelmap)


def test_dcmqi_label_map_reads_as_class_values():
    classes = [ClassInfo("background", 0), ClassInfo("liver", 1)]
    liver = read_segmentation_volume(DATA / "dcmqi" / "liver_seg.nrrd", classes)
    assert liver.shape == (3, 512, 512) and set(np.unique(liver.array)) == {0, 1}
    with pytest.raises(PSCVError, match=r"holds value\(s\) 1 that are no class of classes.json \(0 background, 2 x"):
        read_segmentation(DATA / "dcmqi" / "liver_seg.nrrd", [ClassInfo("background", 0), ClassInfo("x", 2)])


def test_geometry_mismatch_names_both_geometries(ct, chest_classes, tmp_path):
    labelmap = read_segmentation(SLICER_SEG, chest_classes, ct)
    shifted = Volume(ct.array, ct.spacing, ct.origin + [1.0, 0, 0], ct.direction)  # a third of a voxel
    write_segmentation(tmp_path / "shifted.nii.gz", labelmap, shifted, chest_classes)
    with pytest.raises(PSCVError) as error:
        read_segmentation(tmp_path / "shifted.nii.gz", chest_classes, ct)
    message = str(error.value)
    assert "shifted.nii.gz: the segmentation's geometry" in message and "does not match the image" in message
    assert "origin (194.096, 216.396, -340.25)" in message and "origin (193.096, 216.396, -340.25)" in message
    assert "axes i (-1, 0, 0) j (0, -1, 0) k (0, 0, 1)" in message
    ct_3slice = read_image(DATA / "dcmqi" / "ct-3slice")
    with pytest.raises(PSCVError, match="128x128x34 voxels.*does not match the image \\(512x512x3 voxels"):
        read_segmentation(SLICER_SEG, chest_classes, ct_3slice)


def test_a_cropped_segmentation_is_placed_on_the_reference_grid(ct, chest_classes, tmp_path):
    labelmap = read_segmentation(SLICER_SEG, chest_classes, ct)
    crop = labelmap[5:20, 30:100, 40:128]  # starts at k=5, j=30, i=40
    cropped = Volume(crop, ct.spacing, ct.index_to_lps([40, 30, 5]), ct.direction)
    write_segmentation(tmp_path / "crop.seg.nrrd", crop, cropped, chest_classes)
    placed = read_segmentation(tmp_path / "crop.seg.nrrd", chest_classes, ct)
    expected = np.zeros_like(labelmap)
    expected[5:20, 30:100, 40:128] = crop
    np.testing.assert_array_equal(placed, expected)
    beyond = Volume(labelmap, ct.spacing, ct.index_to_lps([0, 0, 30]), ct.direction)  # 26 slices stick out
    write_segmentation(tmp_path / "beyond.nrrd", labelmap, beyond, chest_classes)
    with pytest.warns(UserWarning, match=r"\d+ segmented voxels lie outside the image and are dropped"):
        placed = read_segmentation(tmp_path / "beyond.nrrd", chest_classes, ct)
    np.testing.assert_array_equal(placed[30:], labelmap[:4])


def test_bad_label_maps_are_refused_and_leave_no_file(ct, chest_classes, tmp_path):
    good = tmp_path / "keep.seg.nrrd"
    write_segmentation(good, np.zeros(ct.shape, np.uint8), ct, chest_classes)
    before = good.read_bytes()
    with pytest.raises(PSCVError, match=r"shape \[k, j, i\] = \[34, 128, 127\] but the image has \[34, 128, 128\]"):
        write_segmentation(good, np.zeros((34, 128, 127), np.uint8), ct, chest_classes)
    wrong = np.zeros(ct.shape, np.uint8)
    wrong[0, 0, 0] = 42
    with pytest.raises(PSCVError, match=r"holds value\(s\) 42 that are no class"):
        write_segmentation(good, wrong, ct, chest_classes)
    with pytest.raises(PSCVError, match="integer class values"):
        write_segmentation(good, np.full(ct.shape, 0.5), ct, chest_classes)
    with pytest.raises(PSCVError, match="unknown segmentation format"):
        write_segmentation(tmp_path / "labels.png", np.zeros(ct.shape, np.uint8), ct, chest_classes)
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.seg.nrrd"]


def test_empty_truncated_and_wrong_files_are_clear_errors(chest_classes, tmp_path):
    (tmp_path / "empty.seg.nrrd").write_bytes(b"")
    with pytest.raises(PSCVError, match="empty.seg.nrrd: the file is empty"):
        read_segmentation(tmp_path / "empty.seg.nrrd", chest_classes)
    data = SLICER_SEG.read_bytes()
    (tmp_path / "cut.seg.nrrd").write_bytes(data[: len(data) // 3])
    with pytest.raises(PSCVError, match="cut.seg.nrrd: could not read the segmentation"):
        read_segmentation(tmp_path / "cut.seg.nrrd", chest_classes)
    with pytest.raises(PSCVError, match=r"CTChest4.nrrd: the label map holds value\(s\) -3024, .* \.\.\. that are no"):
        read_segmentation(CT, chest_classes)  # an image (CT values) is not a label map of these classes
    fractions = Volume(np.full((2, 2, 2), 0.5, np.float32))
    write_image(fractions, tmp_path / "fractions.nrrd")
    with pytest.raises(PSCVError, match="a label map must hold integer class values"):
        read_segmentation(tmp_path / "fractions.nrrd", chest_classes)
    with pytest.raises(PSCVError, match="no such segmentation file"):
        read_segmentation(tmp_path / "missing.seg.nrrd", chest_classes)


def test_segment_names_with_line_breaks_are_refused(ct, tmp_path):
    classes = [ClassInfo("background", 0), ClassInfo("left\nlung", 1)]
    with pytest.raises(PSCVError, match="cannot hold line breaks"):
        write_segmentation(tmp_path / "x.seg.nrrd", np.zeros(ct.shape, np.uint8), ct, classes)
    assert not (tmp_path / "x.seg.nrrd").exists()


def test_export_converts_between_formats(ct, chest_classes, tmp_path):
    assert export_segmentation(SLICER_SEG, tmp_path / "labels.nii.gz") == "nifti"  # classes from the segments
    assert export_segmentation(SLICER_SEG, tmp_path / "labels.nrrd", "nrrd", reference=CT) == "nrrd"
    truth = read_segmentation(SLICER_SEG, chest_classes, ct)
    for name in ("labels.nii.gz", "labels.nrrd"):
        np.testing.assert_array_equal(read_segmentation(tmp_path / name, chest_classes, ct), truth)
    assert export_segmentation(tmp_path / "labels.nii.gz", tmp_path / "back.seg.nrrd", classes=chest_classes) \
        == "seg.nrrd"
    back = slicerio.read_segmentation(str(tmp_path / "back.seg.nrrd"))
    assert [s["name"] for s in back["segments"]] == [c.name for c in chest_classes[1:]]
    np.testing.assert_array_equal(kji(back["voxels"]), truth)
    with pytest.raises(PSCVError, match="a nifti file must end in .nii or .nii.gz"):
        export_segmentation(SLICER_SEG, tmp_path / "x.nrrd", "nifti")
    with pytest.raises(PSCVError, match="a nrrd file must end in .nrrd"):
        export_segmentation(SLICER_SEG, tmp_path / "x.seg.nrrd", "nrrd")
