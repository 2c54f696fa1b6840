"""pscv.data.clicks: Slicer point lists (.mrk.json, .fcsv) -> voxel indices [k, j, i], and every way they go wrong.

Real files: CTChest4.nrrd with F_1.fcsv (both from slicerio's test data, written by 3D Slicer) and
F.mrk.json (a Slicer point list, schema v1.0.3, placed on another image: it lies outside CTChest4).
Expected voxels are computed by hand from the NRRD header with pynrrd, not with pscv.
"""

import copy
import json
import warnings
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation
from slicerio.markups import fcsv_to_markups_json

from pscv import PSCVError
from pscv.data.classes import ClassInfo
from pscv.data.clicks import Clicks, markups_document, read_clicks, read_markups, write_markups
from pscv.data.volumes import Volume, read_image

DATA = Path(__file__).parent / "Data" / "formats"
CT = DATA / "slicerio" / "CTChest4.nrrd"
FCSV = DATA / "slicerio" / "F_1.fcsv"
MRK = DATA / "slicer_markups" / "F.mrk.json"

CLASSES = [ClassInfo("background", 0), ClassInfo("LV", 1), ClassInfo("RV", 2), ClassInfo("Myo", 3)]
F_CLASSES = [ClassInfo("background", 0), ClassInfo("F_1", 1), ClassInfo("F_5", 2)]


@pytest.fixture(scope="module")
def ct():
    return read_image(CT)


def fcsv_rows():
    rows = [line.split(",") for line in FCSV.read_text().splitlines() if not line.startswith("#")]
    return [(row[11], np.array([float(v) for v in row[1:4]])) for row in rows]


def hand_voxel(lps):
    """[k, j, i] of an LPS point from CTChest4's NRRD header alone (pynrrd), rounded to the nearest centre."""
    header = nrrd.read_header(str(CT))
    axes = np.asarray(header["space directions"], dtype=float).T  # columns: i, j, k steps
    ijk = np.linalg.solve(axes, np.asarray(lps) - header["space origin"])
    return np.floor(ijk + 0.5).astype(int)[::-1]


def markup(name, points, system="LPS", kind="Fiducial", **extra):
    control_points = []
    for label, position, *more in points:  # more: an optional dict of other point fields
        point = {"label": label, "position": [float(v) for v in position], "positionStatus": "defined"}
        point.update(*more)
        control_points.append(point)
    return dict({"type": kind, "name": name, "coordinateSystem": system, "controlPoints": control_points}, **extra)


def write_json(path, *markups, schema="markups-schema-v1.0.3.json#"):
    path.write_text(json.dumps({"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/"
                                f"Loadable/Markups/Resources/Schema/{schema}", "markups": list(markups)}))
    return path


# --- the Slicer files ------------------------------------------------------------------------------------

def test_fcsv_points_land_on_the_voxels_computed_from_the_nrrd_header(ct):
    clicks = read_markups(FCSV, ct, F_CLASSES)  # the list is named after the file: F_1
    expected = [hand_voxel(lps) for _, lps in fcsv_rows()]  # the file says CoordinateSystem = LPS
    assert len(clicks) == 12
    np.testing.assert_array_equal(clicks.kji, expected)
    assert np.all(clicks.values == 1)
    assert np.all(clicks.kji[:, 0] == 33)  # z = -10.2143 is the last slice, -340.25 + 33 * 10
    image = sitk.ReadImage(str(CT))
    for (_, lps), kji in zip(fcsv_rows(), clicks.kji):
        assert tuple(kji[::-1]) == image.TransformPhysicalPointToIndex(lps.tolist())


def test_the_same_points_as_mrk_json_land_in_the_same_voxels(ct, tmp_path):
    """slicerio converts F_1.fcsv to .mrk.json; both files give the same voxels, also when written in RAS."""
    converted = Path(fcsv_to_markups_json(str(FCSV), str(tmp_path / "F_1.mrk.json")))
    document = json.loads(converted.read_text())
    document["markups"][0]["name"] = "F_1"
    converted.write_text(json.dumps(document))
    from_fcsv = read_markups(FCSV, ct, F_CLASSES)
    from_json = read_markups(converted, ct, F_CLASSES)
    np.testing.assert_array_equal(from_json.kji, from_fcsv.kji)
    np.testing.assert_array_equal(from_json.values, from_fcsv.values)
    ras = copy.deepcopy(document)
    ras["markups"][0]["coordinateSystem"] = "RAS"
    for point in ras["markups"][0]["controlPoints"]:
        point["position"] = [-point["position"][0], -point["position"][1], point["position"][2]]
    (tmp_path / "ras.mrk.json").write_text(json.dumps(ras))
    np.testing.assert_array_equal(read_markups(tmp_path / "ras.mrk.json", ct, F_CLASSES).kji, from_fcsv.kji)


def test_fcsv_in_ras_and_legacy_numeric_coordinate_systems(ct, tmp_path):
    text = FCSV.read_text()
    lps_voxels = read_markups(FCSV, ct, F_CLASSES).kji
    rows = [line.split(",") for line in text.splitlines() if not line.startswith("#")]
    ras_rows = [",".join([r[0], str(-float(r[1])), str(-float(r[2]))] + r[3:]) for r in rows]
    for header in ("# CoordinateSystem = RAS", "# CoordinateSystem = 0", ""):  # no header: RAS (Slicer < 4.11)
        path = tmp_path / "F_1.fcsv"
        path.write_text("\n".join(([header] if header else []) + ras_rows) + "\n")
        np.testing.assert_array_equal(read_markups(path, ct, F_CLASSES).kji, lps_voxels)
    path.write_text(text.replace("CoordinateSystem = LPS", "CoordinateSystem = 1"))
    np.testing.assert_array_equal(read_markups(path, ct, F_CLASSES).kji, lps_voxels)


def test_slicer_mrk_json_outside_the_image_names_the_point_and_the_bounds(ct):
    """F.mrk.json was placed on another image (z = 0.7 mm); CTChest4 covers z -345.25..-5.25."""
    with pytest.raises(PSCVError) as error:
        read_markups(MRK, ct, F_CLASSES)
    message = str(error.value)
    assert str(MRK) in message and "'F_5-1'" in message and "(-120.00, -69.80, 0.70)" in message
    assert "lies outside the image" in message and "S -345.2..-5." in message and "0..33" in message


def test_slicer_mrk_json_on_an_image_that_holds_it(tmp_path):
    """F.mrk.json's labels ("F_5-1") name class F_5; voxels agree with SimpleITK's point-to-index."""
    image = sitk.Image(256, 256, 5, sitk.sitkInt16)
    image.SetSpacing((1.0, 0.8, 2.5))
    image.SetOrigin((-150.0, -120.0, -4.0))
    volume = Volume(np.zeros((5, 256, 256), np.float32), image.GetSpacing(), image.GetOrigin())
    clicks = read_markups(MRK, volume, F_CLASSES)
    positions = [p["position"] for p in json.loads(MRK.read_text())["markups"][0]["controlPoints"]]
    np.testing.assert_array_equal(clicks.kji, [image.TransformPhysicalPointToIndex(p)[::-1] for p in positions])
    assert clicks.values.tolist() == [2, 2, 2]


# --- naming classes ---------------------------------------------------------------------------------------

SMALL = Volume(np.zeros((4, 5, 6), np.float32), [1.0, 1.0, 2.0], [0.0, 0.0, 0.0])


def test_one_list_per_class_and_one_list_with_labels_give_the_same_clicks(tmp_path):
    per_class = write_json(tmp_path / "a.mrk.json",
                           markup("background", [("background-1", (0, 0, 0))]),
                           markup("LV", [("LV-1", (1, 1, 2)), ("LV-2", (2, 1, 2))]),
                           markup("rv", [("whatever", (5, 4, 6))]))  # list names match case-insensitively
    labelled = write_json(tmp_path / "b.mrk.json",
                          markup("F", [("Background", (0, 0, 0)), ("LV-1", (1, 1, 2)), ("lv", (2, 1, 2)),
                                       ("RV-12", (5, 4, 6))]))
    with pytest.warns(UserWarning, match="class 'Myo' has no points"):
        a = read_clicks([per_class], SMALL, CLASSES)
    with pytest.warns(UserWarning, match="class 'Myo' has no points"):
        b = read_clicks([labelled], SMALL, CLASSES)
    np.testing.assert_array_equal(a.kji, [[0, 0, 0], [1, 1, 1], [1, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(a.values, [0, 1, 1, 2])
    np.testing.assert_array_equal(b.kji, a.kji)
    np.testing.assert_array_equal(b.values, a.values)


def test_several_files_are_read_together(tmp_path):
    first = write_json(tmp_path / "bg.mrk.json", markup("background", [("b", (0, 0, 0))]))
    second = write_json(tmp_path / "lv.mrk.json", markup("LV", [("l", (3, 3, 4))]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clicks = read_clicks([first, second], SMALL, CLASSES)
    assert sorted(str(w.message).split("class ")[1][:5] for w in caught) == ["'Myo'", "'RV' "]
    assert all(str(first) in str(w.message) and str(second) in str(w.message) for w in caught)
    np.testing.assert_array_equal(clicks.kji, [[0, 0, 0], [2, 3, 3]])
    np.testing.assert_array_equal(clicks.values, [0, 1])


def test_points_not_defined_are_ignored(tmp_path):
    path = write_json(tmp_path / "p.mrk.json", markup("LV", [
        ("a", (1, 1, 0)), ("b", (2, 2, 0), {"positionStatus": "undefined"}),
        ("c", (3, 3, 0), {"positionStatus": "preview"}), ("d", (4, 4, 0), {"positionStatus": None}),
    ]), markup("background", [("e", (0, 0, 0))]))
    document = json.loads(path.read_text())
    del document["markups"][0]["controlPoints"][0]["positionStatus"]  # missing means "defined" (schema default)
    path.write_text(json.dumps(document))
    clicks = read_clicks(path, SMALL, CLASSES[:2])
    np.testing.assert_array_equal(clicks.kji, [[0, 1, 1], [0, 0, 0]])


def test_micrometre_units_and_unnamed_legacy_schema(tmp_path):
    path = write_json(tmp_path / "um.mrk.json",
                      markup("LV", [("a", (3000, 2000, 4000))], coordinateUnits="um"),
                      markup("background", [("b", (0, 0, 0))], coordinateUnits=["mm", "UCUM", "millimeter"]),
                      schema="markups-schema-v1.0.0.json#")
    assert read_clicks(path, SMALL, CLASSES[:2]).kji.tolist() == [[2, 2, 3], [0, 0, 0]]


# --- errors -----------------------------------------------------------------------------------------------

def test_a_class_name_not_in_classes_json(tmp_path):
    path = write_json(tmp_path / "x.mrk.json", markup("F", [("Liver-2", (1.5, 2, 3))]))
    with pytest.raises(PSCVError) as error:
        read_clicks(path, SMALL, CLASSES)
    message = str(error.value)
    assert str(path) in message and "'Liver-2'" in message and "point list 'F'" in message
    assert "LPS (1.50, 2.00, 3.00)" in message and "background, LV, RV, Myo" in message


def test_points_outside_name_file_label_coordinates_and_bounds(tmp_path):
    path = write_json(tmp_path / "out.mrk.json", markup("LV", [("LV-1", (-1, -1, 1)), ("LV-2", (-12, 40, 2))],
                                                         system="RAS"))
    with pytest.raises(PSCVError) as error:
        read_clicks(path, SMALL, CLASSES)
    message = str(error.value)
    assert str(path) in message and "'LV-2'" in message and "RAS (-12.00, 40.00, 2.00)" in message
    assert "LPS (12.00, -40.00, 2.00)" in message and "L -0.5..5.5, P -0.5..4.5, S -1.0..7.0" in message


def test_a_voxel_just_inside_the_edge_is_kept_and_one_beyond_is_refused(tmp_path):
    inside = write_json(tmp_path / "in.mrk.json", markup("LV", [("a", (5.49, -0.49, 6.99))]))
    assert read_markups(inside, SMALL, CLASSES).kji.tolist() == [[3, 0, 5]]
    beyond = write_json(tmp_path / "beyond.mrk.json", markup("LV", [("a", (5.51, 0, 0))]))
    with pytest.raises(PSCVError, match="lies outside the image"):
        read_markups(beyond, SMALL, CLASSES)


def test_a_class_without_points_is_a_warning_and_one_class_is_an_error(tmp_path):
    two = write_json(tmp_path / "two.mrk.json", markup("background", [("a", (0, 0, 0))]),
                     markup("LV", [("b", (1, 1, 0))]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_clicks(two, SMALL, CLASSES)
    messages = [str(w.message) for w in caught]
    assert any("class 'RV' has no points" in m for m in messages)
    assert any("class 'Myo' has no points" in m for m in messages)
    one = write_json(tmp_path / "one.mrk.json", markup("LV", [("b", (1, 1, 0)), ("c", (2, 1, 0))]))
    with pytest.raises(PSCVError, match=r"points for 1 class\(es\) \(LV\); training needs points on the "
                                        "background and on at least one organ"):
        read_clicks(one, SMALL, CLASSES)
    with pytest.raises(PSCVError, match=r"points for 0 class\(es\) \(none\)"):
        read_clicks(write_json(tmp_path / "none.mrk.json", markup("LV", [])), SMALL, CLASSES)


def test_empty_and_truncated_files(tmp_path):
    (tmp_path / "empty.mrk.json").write_text("")
    with pytest.raises(PSCVError, match="empty.mrk.json: the file is empty"):
        read_clicks(tmp_path / "empty.mrk.json", SMALL, CLASSES)
    text = MRK.read_text()
    (tmp_path / "cut.mrk.json").write_text(text[: len(text) // 2])
    with pytest.raises(PSCVError, match=r"cut.mrk.json: not valid JSON .* line \d+.*may be truncated"):
        read_clicks(tmp_path / "cut.mrk.json", SMALL, CLASSES)
    (tmp_path / "empty.fcsv").write_text("\n")
    with pytest.raises(PSCVError, match="empty.fcsv: the file is empty"):
        read_clicks(tmp_path / "empty.fcsv", SMALL, CLASSES)
    text = FCSV.read_text()
    cut = text[: text.index("7,40.31") + 5]  # the last row ends inside its x value: no y, z
    (tmp_path / "cut.fcsv").write_text(cut)
    with pytest.raises(PSCVError, match=r"cut.fcsv: line 6 is not a point.*may be truncated"):
        read_clicks(tmp_path / "cut.fcsv", read_image(CT), F_CLASSES)
    with pytest.raises(PSCVError, match="no such markups file"):
        read_clicks(tmp_path / "missing.mrk.json", SMALL, CLASSES)


@pytest.mark.parametrize("kind", ["Curve", "ClosedCurve", "Plane", "Line", "Angle", "ROI"])
def test_markups_of_another_type_are_refused(tmp_path, kind):
    path = write_json(tmp_path / "curve.mrk.json", markup("LV", [("a", (0, 0, 0)), ("b", (1, 1, 1))], kind=kind))
    with pytest.raises(PSCVError, match=f"markup #1 \\('LV'\\) is a {kind}, not a point list"):
        read_clicks(path, SMALL, CLASSES)


def test_other_json_and_other_file_types_are_refused(tmp_path):
    (tmp_path / "classes.json").write_text(json.dumps({"classes": [{"name": "background", "value": 0}]}))
    with pytest.raises(PSCVError, match="not a 3D Slicer markups file"):
        read_clicks(tmp_path / "classes.json", SMALL, CLASSES)
    (tmp_path / "seg.json").write_text(json.dumps({"@schema": "https://example.org/seg-schema.json#",
                                                   "markups": []}))
    with pytest.raises(PSCVError, match="found schema 'https://example.org/seg-schema.json#'"):
        read_clicks(tmp_path / "seg.json", SMALL, CLASSES)
    with pytest.raises(PSCVError, match="unknown clicks file type"):
        read_clicks(CT, SMALL, CLASSES)
    bad = write_json(tmp_path / "bad.mrk.json", markup("LV", [("a", (0, 0, 0))], system="IJK"))
    with pytest.raises(PSCVError, match="coordinateSystem 'IJK'"):
        read_clicks(bad, SMALL, CLASSES)


def test_two_classes_in_one_voxel_is_an_error(tmp_path):
    path = write_json(tmp_path / "c.mrk.json", markup("background", [("a", (1.2, 1, 0))]),
                      markup("LV", [("b", (0.9, 1.1, 0.2))]))
    with pytest.raises(PSCVError, match=r"voxel \[k, j, i\] = \[0, 1, 1\] has points of two classes, "
                                        "'background' and 'LV'"):
        read_clicks(path, SMALL, CLASSES)


# --- random geometries ------------------------------------------------------------------------------------

@st.composite
def volumes_and_clicks(draw):
    rotation = draw(st.lists(st.floats(-np.pi, np.pi), min_size=3, max_size=3))
    flips = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    spacing = draw(st.lists(st.floats(0.1, 12.0), min_size=3, max_size=3))
    origin = draw(st.lists(st.floats(-300, 300), min_size=3, max_size=3))
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=3, max_size=3)))
    direction = Rotation.from_rotvec(rotation).as_matrix() @ np.diag(flips)
    volume = Volume(np.zeros(shape, np.float32), spacing, origin, direction)
    n = draw(st.integers(2, 12))
    kji = np.array([[draw(st.integers(0, s - 1)) for s in shape] for _ in range(n)])
    kji = np.unique(kji, axis=0)
    values = np.arange(len(kji)) % 4
    jitter = np.array(draw(st.lists(st.floats(-0.45, 0.45), min_size=3, max_size=3)))
    return volume, Clicks(kji, values), jitter


@settings(max_examples=60, deadline=None)
@given(case=volumes_and_clicks(), system=st.sampled_from(["LPS", "RAS"]))
def test_clicks_round_trip_through_markups_for_random_geometries(tmp_path_factory, case, system):
    """Voxel -> LPS (moved anywhere inside its voxel) -> .mrk.json (LPS or RAS) -> the same voxel."""
    volume, clicks, jitter = case
    document = markups_document(clicks, volume, CLASSES)
    for item in document["markups"]:
        item["coordinateSystem"] = system
        for point in item["controlPoints"]:
            index = volume.lps_to_index(point["position"]) + jitter  # still inside the same voxel
            lps = volume.index_to_lps(index)
            point["position"] = [float(-lps[0]), float(-lps[1]), float(lps[2])] if system == "RAS" else lps.tolist()
    path = tmp_path_factory.mktemp("clicks") / "clicks.mrk.json"
    path.write_text(json.dumps(document))
    back = read_markups(path, volume, CLASSES)
    order = np.lexsort(np.c_[clicks.kji, clicks.values].T)
    back_order = np.lexsort(np.c_[back.kji, back.values].T)
    np.testing.assert_array_equal(back.kji[back_order], clicks.kji[order])
    np.testing.assert_array_equal(back.values[back_order], clicks.values[order])


def test_write_markups_then_read_clicks_on_the_slicer_geometry(ct, tmp_path):
    clicks = Clicks([[0, 0, 0], [33, 127, 127], [10, 64, 3], [20, 5, 100]], [0, 1, 2, 1])
    write_markups(clicks, ct, CLASSES, tmp_path / "out.mrk.json")
    with pytest.warns(UserWarning, match="'Myo' has no points"):
        back = read_clicks([tmp_path / "out.mrk.json"], ct, CLASSES)
    assert sorted(map(tuple, back.kji.tolist())) == sorted(map(tuple, clicks.kji.tolist()))
