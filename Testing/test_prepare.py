"""`pscv prepare`: a folder of labelled cases -> a dataset folder with simulated clicks, on small real files
(two cropped MS-CMRSeg cases stored as float label maps 0/200/500/600, one ACDC volume)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pscv import PSCVError
from pscv.data.classes import read_classes
from pscv.data.clicks import case_seed, read_clicks, simulate_clicks
from pscv.data.dataset import load_case, read_dataset
from pscv.data.prepare import find_labelled_cases, prepare_dataset
from pscv.data.segmentations import read_segmentation
from pscv.data.volumes import read_image

DATA = Path(__file__).parent / "Data"
CMR = DATA / "cmr"
ACDC = DATA / "acdc"


def present_per_slice(labels: np.ndarray, axis: int, every: int = 1) -> int:
    return sum(len(np.unique(np.take(labels, s, axis=axis))) for s in range(0, labels.shape[axis], every))


def test_pairs_of_float_label_maps_become_a_dataset_with_one_click_per_class_per_slice(tmp_path):
    names = prepare_dataset(CMR, tmp_path / "dataset", seed=0)
    assert names == ["1", "26"]
    classes, entries = read_dataset(tmp_path / "dataset")
    assert [(c.name, c.value) for c in classes] == [("background", 0), ("Myo", 200), ("LV", 500), ("RV", 600)]
    for entry in entries:
        case = load_case(entry, classes, points=True, labels=True)
        source = sitk.ReadImage(str(CMR / f"image_{entry.name}.nii.gz"))
        assert np.allclose(case.image.origin, source.GetOrigin())
        assert np.allclose(case.image.spacing, source.GetSpacing())
        assert np.allclose(case.image.direction.ravel(), source.GetDirection())
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(CMR / f"label_{entry.name}.nii.gz")))
        assert np.array_equal(case.labels, truth)  # same values, now integers
        axis = case.image.slice_axis()
        assert len(case.clicks) == present_per_slice(truth, axis)
        assert np.array_equal(truth[tuple(case.clicks.kji.T)], case.clicks.values)  # every click inside its class


def test_clicks_per_class_every_nth_slice_and_seeds(tmp_path):
    labels = read_segmentation(CMR / "label_26.nii.gz", read_classes(CMR / "classes.json"),
                               read_image(CMR / "image_26.nii.gz"))
    three = simulate_clicks(labels, seed=5, clicks_per_class=3, every_nth_slice=2)
    assert set(three.kji[:, 0]) == {0, 2}
    assert len(three) == 3 * present_per_slice(labels, 0, every=2)
    assert len({tuple(p) for p in three.kji}) == len(three)  # no pixel twice
    assert np.array_equal(labels[tuple(three.kji.T)], three.values)
    again = simulate_clicks(labels, seed=5, clicks_per_class=3, every_nth_slice=2)
    assert np.array_equal(again.kji, three.kji)
    assert not np.array_equal(simulate_clicks(labels, seed=6, clicks_per_class=3, every_nth_slice=2).kji, three.kji)
    with pytest.raises(PSCVError, match="every_nth_slice 0"):
        simulate_clicks(labels, seed=5, every_nth_slice=0)


def test_the_default_clicks_are_those_prepare_acdc_always_drew():
    classes = read_classes(ACDC / "classes.json")
    volume = read_image(ACDC / "patient002_frame01.nrrd")
    labels = read_segmentation(ACDC / "patient002_frame01_label.nrrd", classes, volume)
    shipped = read_clicks([ACDC / "patient002_frame01.mrk.json"], volume, classes)
    drawn = simulate_clicks(labels, case_seed(0, "patient002_frame01"), slice_axis=volume.slice_axis())
    order = np.lexsort(drawn.kji.T), np.lexsort(shipped.kji.T)
    assert np.array_equal(drawn.kji[order[0]], shipped.kji[order[1]])


def test_images_and_labels_folders_and_a_case_list(tmp_path):
    labelled = tmp_path / "labelled"
    for sub in ("images", "labels"):
        (labelled / sub).mkdir(parents=True)
    for name in ("a", "b"):
        shutil.copy(ACDC / "patient002_frame01.nrrd", labelled / "images" / f"{name}.nrrd")
        shutil.copy(ACDC / "patient002_frame01_label.nrrd", labelled / "labels" / f"{name}.nrrd")
    shutil.copy(ACDC / "patient002_frame01.nrrd", labelled / "images" / "unlabelled.nrrd")
    assert [c.name for c in find_labelled_cases(labelled)] == ["a", "b"]
    names = prepare_dataset(labelled, tmp_path / "out", read_classes(ACDC / "classes.json"), cases=["b"], seed=1)
    assert names == ["b"] and sorted(p.name for p in (tmp_path / "out" / "points").iterdir()) == ["b.mrk.json"]
    with pytest.raises(PSCVError, match="case.s. c not found"):
        prepare_dataset(labelled, tmp_path / "other", read_classes(ACDC / "classes.json"), cases=["c"])


def test_label_values_that_are_no_class_and_folders_without_pairs(tmp_path):
    with pytest.raises(PSCVError, match=r"label_1.nii.gz: the label map holds value\(s\) 200, 500, 600 that are no"):
        prepare_dataset(CMR, tmp_path / "out", read_classes(ACDC / "classes.json"))
    (tmp_path / "empty").mkdir()
    shutil.copy(ACDC / "classes.json", tmp_path / "empty")
    with pytest.raises(PSCVError, match="no labelled cases found"):
        prepare_dataset(tmp_path / "empty", tmp_path / "out2")
    with pytest.raises(PSCVError, match="no classes.json there"):
        prepare_dataset(CMR.parent / "formats", tmp_path / "out3")


def test_a_case_beside_its_label_map():
    assert [(c.name, c.labels.name) for c in find_labelled_cases(ACDC)] == [
        ("patient002_frame01", "patient002_frame01_label.nrrd")]
