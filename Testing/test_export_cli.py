"""`pscv export SEG --to dicom-seg|nifti|nrrd|seg.nrrd --reference DIR --classes classes.json --out PATH`.

Real files: 3D Slicer's Segmentation.seg.nrrd on CTChest4.nrrd; dcmqi's liver_seg.nrrd on its CT series
ct-3slice, with dcmqi's DICOM-SEG liver.dcm of it. Errors must exit 2 with one line, no traceback, no file.
"""

from pathlib import Path

import highdicom as hd
import numpy as np
import slicerio

from pscv import cli
from pscv.data.classes import ClassInfo, write_classes
from pscv.data.segmentations import read_segmentation, segmentation_classes
from pscv.data.volumes import read_image

DATA = Path(__file__).parent / "Data" / "formats"
CT = DATA / "slicerio" / "CTChest4.nrrd"
SLICER_SEG = DATA / "slicerio" / "Segmentation.seg.nrrd"
DCMQI = DATA / "dcmqi"


def run_cli(*args) -> int:
    return cli.main(["export", *map(str, args)])


def test_seg_nrrd_to_nifti_and_nrrd_and_back_without_a_classes_file(tmp_path, capsys):
    ct, classes = read_image(CT), segmentation_classes(SLICER_SEG)
    assert run_cli(SLICER_SEG, "--out", tmp_path / "labels.nii.gz") == 0
    assert f"wrote nifti {tmp_path / 'labels.nii.gz'}" in capsys.readouterr().out
    assert run_cli(SLICER_SEG, "--to", "nrrd", "--reference", CT, "--out", tmp_path / "labels.nrrd") == 0
    truth = read_segmentation(SLICER_SEG, classes, ct)
    for name in ("labels.nii.gz", "labels.nrrd"):
        np.testing.assert_array_equal(read_segmentation(tmp_path / name, classes, ct), truth)
    write_classes(classes, tmp_path / "classes.json")
    assert run_cli(tmp_path / "labels.nii.gz", "--classes", tmp_path / "classes.json",
                   "--to", "seg.nrrd", "--out", tmp_path / "back.seg.nrrd") == 0
    back = slicerio.read_segmentation(str(tmp_path / "back.seg.nrrd"))
    assert [s["name"] for s in back["segments"]] == [c.name for c in classes[1:]]
    np.testing.assert_array_equal(np.transpose(back["voxels"], (2, 1, 0)), truth)


def test_label_map_to_dicom_seg_with_its_dicom_series(tmp_path, capsys):
    write_classes([ClassInfo("background", 0), ClassInfo("Liver", 1, (221, 130, 101))], tmp_path / "classes.json")
    assert run_cli(DCMQI / "liver_seg.nrrd", "--to", "dicom-seg", "--reference", DCMQI / "ct-3slice",
                   "--classes", tmp_path / "classes.json", "--out", tmp_path / "liver.dcm") == 0
    assert "wrote dicom-seg" in capsys.readouterr().out
    ours, dcmqi = hd.seg.segread(tmp_path / "liver.dcm"), hd.seg.segread(DCMQI / "liver.dcm")
    np.testing.assert_array_equal(ours.get_volume(combine_segments=True).array,
                                  dcmqi.get_volume(combine_segments=True).array)
    assert ours.get_segment_description(1).segment_label == "Liver"


def test_errors_exit_2_without_traceback_or_file(tmp_path, capsys):
    cases = [
        ([SLICER_SEG, "--to", "nifti", "--out", tmp_path / "x.nrrd"], "a nifti file must end in .nii or .nii.gz"),
        ([SLICER_SEG, "--out", tmp_path / "x.png"], "cannot tell the format from the name"),
        ([SLICER_SEG, "--out", tmp_path / "x.dcm"], "DICOM-SEG export needs --reference DICOM_DIR"),
        ([DCMQI / "liver_seg.nrrd", "--out", tmp_path / "x.nrrd"], "pass --classes classes.json"),
        ([SLICER_SEG, "--reference", DCMQI / "ct-3slice", "--out", tmp_path / "x.nrrd"], "does not match the image"),
        ([SLICER_SEG, "--to", "dicom-seg", "--reference", tmp_path, "--out", tmp_path / "x.dcm"],
         "no DICOM image series found"),
        ([tmp_path / "missing.seg.nrrd", "--out", tmp_path / "x.nrrd"], "no such segmentation file"),
    ]
    for args, message in cases:
        assert run_cli(*args) == 2
        err = capsys.readouterr().err
        assert err.startswith("pscv export: error: ") and message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
