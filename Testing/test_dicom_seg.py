"""pscv.data.dicom_seg.write_dicom_seg: DICOM-SEG with highdicom, checked with highdicom, pydicom, dciodvfy and dcmqi.

Real files: the dcmqi CT series ct-3slice with dcmqi's own DICOM-SEG of it (liver.dcm, made from
liver_seg.nrrd), the tiny dcmqi series 23x38x3 with its SEG (seg/label.seg) and an enhanced multi-frame CT
(multiframe/mf.dcm); CTChest4.nrrd with 3D Slicer's Segmentation.seg.nrrd. CTChest4 exists only as NRRD,
so its DICOM series is made in the test with pydicom (dicom_series_helper): that test checks our SEG against
our own series, the dcmqi tests against series and SEGs made by other tools.
dciodvfy (Debian's dicom3tools) validates our files when it is installed; only that check is skipped otherwise.
"""

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import slicerio
from dicom_series_helper import write_ct_series

from pscv import PSCVError, __version__
from pscv.data.classes import ClassInfo
from pscv.data.dicom_seg import write_dicom_seg
from pscv.data.segmentations import read_segmentation, write_segmentation
from pscv.data.volumes import read_image

DATA = Path(__file__).parent / "Data" / "formats"
DCMQI = DATA / "dcmqi"
CT_3SLICE, LIVER_SEG, LIVER_DCM = DCMQI / "ct-3slice", DCMQI / "liver_seg.nrrd", DCMQI / "liver.dcm"
TINY = DCMQI / "23x38x3"
LIVER = [ClassInfo("background", 0), ClassInfo("Liver", 1, (221, 130, 101))]


def dciodvfy_errors(path) -> list[str]:
    """dciodvfy's "Error" lines for a file; [] when dciodvfy is not installed (test_dciodvfy_* then skips)."""
    if shutil.which("dciodvfy") is None:
        return []
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def frames_by_segment(seg) -> dict[int, dict[str, np.ndarray]]:
    """{segment number: {source SOPInstanceUID: frame}} read back through highdicom's frame index."""
    frames = {}
    for number in seg.segment_numbers:
        for uid in [ref[2] for ref in seg.get_source_image_uids()]:
            mask = seg.get_pixels_by_source_instance([uid], segment_numbers=[number],
                                                     ignore_spatial_locations=False)[0, :, :, 0]
            frames.setdefault(number, {})[uid] = mask
    return frames


def rgb(description) -> list[int]:
    color = hd.color.CIELabColor.from_dicom_value(description.RecommendedDisplayCIELabValue)
    return [int(round(c)) for c in color.to_rgb()]


@pytest.fixture(scope="module")
def ct_3slice():
    return read_image(CT_3SLICE)


@pytest.fixture(scope="module")
def ours_liver(ct_3slice, tmp_path_factory):
    labelmap = read_segmentation(LIVER_SEG, LIVER, ct_3slice)
    path = tmp_path_factory.mktemp("liver") / "liver-pscv.dcm"
    write_dicom_seg(path, labelmap, ct_3slice, LIVER, CT_3SLICE)
    return path, labelmap


def test_liver_seg_references_the_series_and_every_frame_matches(ct_3slice, ours_liver):
    path, labelmap = ours_liver
    seg = hd.seg.segread(path)
    sources = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: k
               for k, f in enumerate(ct_3slice.dicom_files)}
    series = pydicom.dcmread(ct_3slice.dicom_files[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == series.StudyInstanceUID
    assert seg.FrameOfReferenceUID == series.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        == set(sources)
    assert seg.SegmentationType == "BINARY" and seg.segment_numbers == [1]
    for uid, frame in frames_by_segment(seg)[1].items():  # every frame, matched by its source image
        np.testing.assert_array_equal(frame, labelmap[sources[uid]] == 1)
    description = seg.get_segment_description(1)
    assert description.segment_label == "Liver"
    assert description.algorithm_identification[0].AlgorithmName == "PSCV"
    assert description.algorithm_identification[0].AlgorithmVersion == __version__
    assert rgb(description) == [221, 130, 101]


def test_liver_seg_matches_dcmqis_liver_dcm(ours_liver):
    """Attributes 3D Slicer's DICOM SEG plugin (QuantitativeReporting + dcmqi) uses, compared with dcmqi's."""
    path, _ = ours_liver
    ours, dcmqi = pydicom.dcmread(path), pydicom.dcmread(LIVER_DCM)
    same = ["SOPClassUID", "Modality", "SegmentationType", "StudyInstanceUID", "FrameOfReferenceUID", "PatientID",
            "PatientName", "Rows", "Columns", "NumberOfFrames", "BitsAllocated", "ImageType",
            "PhotometricInterpretation"]
    assert {a: str(ours.get(a)) for a in same} == {a: str(dcmqi.get(a)) for a in same}
    assert ours.ReferencedSeriesSequence[0].SeriesInstanceUID == dcmqi.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in ours.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == \
        {i.ReferencedSOPInstanceUID for i in dcmqi.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    ours_segment, dcmqi_segment = ours.SegmentSequence[0], dcmqi.SegmentSequence[0]
    for attribute in ("SegmentLabel", "RecommendedDisplayCIELabValue", "SegmentedPropertyCategoryCodeSequence",
                      "SegmentedPropertyTypeCodeSequence", "SegmentAlgorithmType"):
        assert attribute in ours_segment and attribute in dcmqi_segment
    assert list(ours_segment.RecommendedDisplayCIELabValue) == list(dcmqi_segment.RecommendedDisplayCIELabValue)
    assert ours.SeriesDescription and ours.ContentLabel == "PSCV"

    def frames(ds):  # per frame: source instance, position, pixels
        pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
        return sorted((f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID,
                       tuple(round(float(v), 3) for v in f.PlanePositionSequence[0].ImagePositionPatient),
                       pixels[n].tobytes()) for n, f in enumerate(ds.PerFrameFunctionalGroupsSequence))

    assert frames(ours) == frames(dcmqi)  # same voxels, same source slices, same positions as dcmqi's SEG
    for ds in (ours, dcmqi):
        shared = ds.SharedFunctionalGroupsSequence[0]
        assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.810547, 0.810547]


def test_dciodvfy_finds_no_errors(ours_liver):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed: DICOM-SEG files are not validated")
    path, _ = ours_liver
    assert dciodvfy_errors(LIVER_DCM) == []  # dcmqi's file, for comparison
    assert dciodvfy_errors(path) == []


def test_tiny_series_matches_dcmqis_seg_and_a_volume_read_from_dicom_needs_no_folder(tmp_path):
    volume = read_image(TINY / "image")
    labelmap = read_segmentation(TINY / "nrrd" / "label.nrrd", LIVER, volume)
    write_dicom_seg(tmp_path / "tiny.dcm", labelmap, volume, LIVER)  # the source files come from the volume
    ours, dcmqi = hd.seg.segread(tmp_path / "tiny.dcm"), hd.seg.segread(TINY / "seg" / "label.seg")
    ours_volume = ours.get_volume(combine_segments=True)
    dcmqi_volume = dcmqi.get_volume(combine_segments=True)
    np.testing.assert_array_equal(ours_volume.array, dcmqi_volume.array)
    np.testing.assert_allclose(ours_volume.affine, dcmqi_volume.affine, atol=1e-4)
    assert dciodvfy_errors(tmp_path / "tiny.dcm") == []


def test_ctchest4_to_seg_nrrd_and_dicom_seg_give_the_same_voxels_names_colors(tmp_path):
    """Slicer's segmentation of CTChest4 written both ways, read back with slicerio and highdicom."""
    ct = read_image(DATA / "slicerio" / "CTChest4.nrrd")
    write_ct_series(ct, tmp_path / "series")  # CTChest4 as a DICOM series (made here: it is NRRD only)
    series = read_image(tmp_path / "series")
    np.testing.assert_allclose(series.origin, ct.origin, atol=1e-6)
    np.testing.assert_allclose(series.direction, ct.direction, atol=1e-9)
    slicer = slicerio.read_segmentation(str(DATA / "slicerio" / "Segmentation.seg.nrrd"))
    classes = [ClassInfo("background", 0)] + [
        ClassInfo(s["name"], s["labelValue"], tuple(int(round(c * 255)) for c in s["color"]))
        for s in slicer["segments"]]
    labelmap = read_segmentation(DATA / "slicerio" / "Segmentation.seg.nrrd", classes, series)
    write_segmentation(tmp_path / "chest.seg.nrrd", labelmap, series, classes)
    write_dicom_seg(tmp_path / "chest.dcm", labelmap, series, classes, tmp_path / "series")

    from_nrrd = slicerio.read_segmentation(str(tmp_path / "chest.seg.nrrd"))
    seg = hd.seg.segread(tmp_path / "chest.dcm")
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in series.dicom_files]
    dicom_frames = frames_by_segment(seg)
    for segment in from_nrrd["segments"]:
        number = [n for n in seg.segment_numbers if seg.get_segment_description(n).segment_label == segment["name"]]
        assert len(number) == 1, segment["name"]
        description = seg.get_segment_description(number[0])
        rgb_nrrd = [round(c * 255) for c in segment["color"]]
        rgb_dicom = rgb(description)
        assert max(abs(a - b) for a, b in zip(rgb_nrrd, rgb_dicom)) <= 1, (segment["name"], rgb_nrrd, rgb_dicom)
        mask_nrrd = np.transpose(slicerio.segment_mask(from_nrrd, segment["id"]), (2, 1, 0))  # -> [k, j, i]
        mask_dicom = np.zeros_like(mask_nrrd)
        for k, uid in enumerate(uids):
            if uid in dicom_frames[number[0]]:
                mask_dicom[k] = dicom_frames[number[0]][uid]
        np.testing.assert_array_equal(mask_dicom, mask_nrrd)
        np.testing.assert_array_equal(mask_nrrd, labelmap == segment["labelValue"])
    assert len(seg.segment_numbers) == len(from_nrrd["segments"]) == 7
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == \
        pydicom.dcmread(series.dicom_files[0], stop_before_pixels=True).SeriesInstanceUID
    assert dciodvfy_errors(tmp_path / "chest.dcm") == []


def test_labelmap_segmentation_type_reads_back(ct_3slice, tmp_path):
    labelmap = read_segmentation(LIVER_SEG, LIVER, ct_3slice)
    write_dicom_seg(tmp_path / "labelmap.dcm", labelmap, ct_3slice, LIVER, CT_3SLICE, segmentation_type="LABELMAP")
    seg = hd.seg.segread(tmp_path / "labelmap.dcm")
    assert seg.SegmentationType == "LABELMAP"
    np.testing.assert_array_equal(seg.get_volume(combine_segments=True).array,
                                  hd.seg.segread(LIVER_DCM).get_volume(combine_segments=True).array)


def test_classes_absent_from_the_label_map_get_no_segment(ct_3slice, tmp_path):
    classes = LIVER + [ClassInfo("spleen", 2, (157, 108, 162))]
    labelmap = read_segmentation(LIVER_SEG, LIVER, ct_3slice)
    write_dicom_seg(tmp_path / "one.dcm", labelmap, ct_3slice, classes, CT_3SLICE)
    seg = hd.seg.segread(tmp_path / "one.dcm")
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == ["Liver"]


# --- errors: nothing is written ---------------------------------------------------------------------------

def test_errors_name_the_problem_and_write_nothing(ct_3slice, tmp_path):
    out = tmp_path / "out" / "seg.dcm"
    labelmap = read_segmentation(LIVER_SEG, LIVER, ct_3slice)
    ct = read_image(DATA / "slicerio" / "CTChest4.nrrd")
    with pytest.raises(PSCVError, match="is not a slice of the segmentation's grid.*128x128x34 voxels"):
        write_dicom_seg(out, np.zeros(ct.shape, np.uint8) + 1, ct, LIVER, CT_3SLICE)
    with pytest.raises(PSCVError, match="DICOM-SEG needs the DICOM series the image came from"):
        write_dicom_seg(out, np.ones(ct.shape, np.uint8), ct, LIVER)
    with pytest.raises(PSCVError, match=r"the segmentation is empty \(background only\)"):
        write_dicom_seg(out, np.zeros_like(labelmap), ct_3slice, LIVER, CT_3SLICE)
    with pytest.raises(PSCVError, match="no DICOM image series found"):
        write_dicom_seg(out, labelmap, ct_3slice, LIVER, tmp_path)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_a_series_anonymised_without_uids_cannot_be_referenced(tmp_path):
    """Like totalseg's example_ct_dicom, whose SOPClassUID, SOPInstanceUID and SeriesInstanceUID are blank."""
    folder = tmp_path / "anonymised"
    shutil.copytree(TINY / "image", folder)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.SOPClassUID, ds.SOPInstanceUID = "", ""
        ds.save_as(path)
    volume = read_image(folder)
    labelmap = read_segmentation(TINY / "nrrd" / "label.nrrd", LIVER, volume)
    with pytest.raises(PSCVError, match="lacks SOPClassUID, SOPInstanceUID, which a DICOM-SEG must reference"):
        write_dicom_seg(tmp_path / "seg.dcm", labelmap, volume, LIVER, folder)
    assert not (tmp_path / "seg.dcm").exists()


def test_a_multiframe_reference_is_refused(tmp_path):
    volume = read_image(TINY / "image")
    labelmap = read_segmentation(TINY / "nrrd" / "label.nrrd", LIVER, volume)
    (tmp_path / "mf").mkdir()
    shutil.copy(TINY / "multiframe" / "mf.dcm", tmp_path / "mf")
    with pytest.raises(PSCVError, match="a multi-frame image; DICOM-SEG export supports series of single-frame"):
        write_dicom_seg(tmp_path / "seg.dcm", labelmap, volume, LIVER, tmp_path / "mf")
