"""Careless and hostile inputs on the command line (issue 13): each case ends in one clear line and exit status
2, before any training, with no traceback, no input replaced and nothing left behind; data loss first.

The commands run in this process (`pscv.cli.main`, as `python -m pscv` runs it) on a tiny case; signals run
a real `pscv` process. Full and read-only disks are small tmpfs mounts (conftest.small_disk; root only).
"""

import json
from pathlib import Path

import pytest
from conftest import files_under, write_tiny_case

from pscv import cli
from pscv.data.classes import read_classes
from pscv.data.clicks import read_clicks
from pscv.data.volumes import read_image

TINY = ["--device", "cpu", "--iterations", "2", "--image-size", "32", "--batch-size", "2", "--set", "widths=[4,8]",
        "--set", "dropout=[0,0]", "--set", "augment=\"none\"", "--quiet"]
MARKUPS = "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/" \
          "markups-schema-v1.0.3.json#"


@pytest.fixture
def case(tmp_path) -> dict:
    paths = write_tiny_case(tmp_path / "in")
    return {"image": paths["image"], "points": paths["points"][0], "classes": paths["classes"], "root": tmp_path}


@pytest.fixture
def no_training(monkeypatch):
    """Any training is a failure: what these tests refuse must be refused before it."""
    from pscv.learn import single_case, training

    def trained(*args, **kwargs):
        raise AssertionError("the command started training before refusing")

    monkeypatch.setattr(single_case, "segment_case", trained)
    monkeypatch.setattr(training, "train", trained)


def pscv(capsys, *args) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def refused(capsys, root, *args, message: str) -> str:
    """Run `pscv ARGS`: exit 2, `message` in its one line on stderr, and every file under `root` as it was."""
    before = files_under(root)
    code, err = pscv(capsys, *args)
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    after = files_under(root)
    assert after.keys() == before.keys(), f"left behind: {sorted(set(after) - set(before))}"
    assert all(after[name] == before[name] for name in before), "an input changed"
    return err


def segment(case, **replace) -> list:
    """`pscv segment` on the tiny case, with some arguments replaced."""
    arguments = {"image": case["image"], "--points": case["points"], "--classes": case["classes"],
                 "--out": case["root"] / "out" / "result.seg.nrrd", **replace}
    image = arguments.pop("image")
    return ["segment", image, *[item for pair in arguments.items() for item in pair if item is not None], *TINY]


# Tracebacks: markups, classes, settings, segmentations, outputs ---------------------------------------------


def markups(path: Path, markup: dict) -> Path:
    path.write_text(json.dumps({"@schema": MARKUPS, "markups": [{"type": "Fiducial", "name": "organ", **markup}]}))
    return path


@pytest.mark.parametrize("markup, message", [
    ({"controlPoints": 5}, "\"controlPoints\" must be a list"),
    ({"coordinateUnits": {}, "controlPoints": []}, "coordinateUnits {}"),
])
def test_malformed_markups_are_one_clear_line(capsys, case, no_training, markup, message):
    points = markups(case["root"] / "in" / "bad.mrk.json", markup)
    refused(capsys, case["root"], *segment(case, **{"--points": points}), message=message)


def test_deeply_nested_json_and_a_folder_as_clicks_are_one_clear_line(capsys, case, no_training):
    deep = case["root"] / "in" / "deep.mrk.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    refused(capsys, case["root"], *segment(case, **{"--points": deep}), message="nested too deeply")
    refused(capsys, case["root"], *segment(case, **{"--points": case["root"] / "in"}), message="is a folder")
    (case["root"] / "in" / "list.fcsv").mkdir()
    refused(capsys, case["root"], *segment(case, **{"--points": case["root"] / "in" / "list.fcsv"}),
            message="is a folder")


@pytest.mark.parametrize("change, message", [
    ({"terminology": "heart"}, "\"terminology\" must be an object"),
    ({"terminology": {"category": ["SCT", "1", "A~B"], "type": ["SCT", "2", "C"]}}, "without the characters ~^|"),
    ({"name": "organ\nTags:=x"}, "cannot hold line breaks"),
])
def test_classes_are_checked_before_training(capsys, case, no_training, change, message):
    document = json.loads(case["classes"].read_text())
    document["classes"][1].update(change)
    classes = case["root"] / "in" / "other-classes.json"
    classes.write_text(json.dumps(document))
    refused(capsys, case["root"], *segment(case, **{"--classes": classes}), message=message)
    refused(capsys, case["root"], *segment(case, **{"--classes": case["root"] / "in"}), message="is a folder")


@pytest.mark.parametrize("setting, message", [
    ("image_size=abc", "setting image_size: got 'abc'; it takes a multiple of 16 from 32 to 4096"),
    ("iterations=2.5", "setting iterations: got 2.5; it takes an integer from 1 to 10000000"),
    ("widths=[]", "setting widths: got []; it takes a list of 1 to 8 channel counts"),
    ("normalization=5", "setting normalization: got 5; it takes {\"mode\": \"percentile\""),
    ("cv_wieght=1", "'cv_wieght' (did you mean cv_weight?)"),
    ("widths=[4,8,16]", "setting dropout: got [0.0, 0.0]; it takes a rate per width: 3 of them"),
])
def test_bad_settings_name_the_key_what_it_got_and_what_it_takes(capsys, case, no_training, setting, message):
    refused(capsys, case["root"], *segment(case), "--set", setting, message=message)


# Resources --------------------------------------------------------------------------------------------------


def test_a_byte_order_mark_is_accepted_in_json_files(case):
    for path in (case["points"], case["classes"]):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    classes = read_classes(case["classes"])
    assert len(read_clicks([case["points"]], read_image(case["image"]), classes)) == 6
