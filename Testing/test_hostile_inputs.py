"""Careless and hostile inputs on the command line (issue 13): each case ends in one clear line and exit status
2, before any training, with no traceback, no input replaced and nothing left behind; data loss first.

The commands run in this process (`pscv.cli.main`, as `python -m pscv` runs it) on a tiny case; signals run
a real `pscv` process. Full and read-only disks are small tmpfs mounts (conftest.small_disk; root only).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import dead_pid, files_under, small_disk, write_tiny_case

from pscv import cli
from pscv.data.classes import read_classes
from pscv.data.clicks import read_clicks
from pscv.data.volumes import read_image
from pscv.jobs.processes import worker_environment

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
    """`pscv segment` on the tiny case, with some arguments replaced (with --save-model, the tiny network's
    settings: they apply only to a network to keep)."""
    arguments = {"image": case["image"], "--points": case["points"], "--classes": case["classes"],
                 "--out": case["root"] / "out" / "result.seg.nrrd", **replace}
    image = arguments.pop("image")
    network = TINY if arguments.get("--save-model") else ["--quiet"]
    return ["segment", image, *[item for pair in arguments.items() for item in pair if item is not None], *network]


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
    refused(capsys, case["root"], *segment(case), "--set", "dropout=[0,0]", "--set", setting, message=message)


def test_a_bad_normalization_is_named_without_a_network_too(capsys, case, no_training):
    """The single-case mode normalises the image with it even when no network is trained."""
    refused(capsys, case["root"], *segment(case), "--set", "normalization=5", message="setting normalization: got 5")


# Resources --------------------------------------------------------------------------------------------------


def test_a_byte_order_mark_is_accepted_in_json_files(case):
    for path in (case["points"], case["classes"]):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    classes = read_classes(case["classes"])
    assert len(read_clicks([case["points"]], read_image(case["image"]), classes)) == 6


def test_a_damaged_image_header_is_refused_at_once_naming_what_is_wrong(capsys, case, no_training):
    """A 86-byte NRRD header claiming 20000 x 20000 x 5 voxels took 7.9 GB and 20 s before it was refused; a
    singular direction matrix said `could not read the image (0 0 1)`."""
    huge = case["root"] / "in" / "huge.nrrd"
    huge.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 20000 20000 5\nendian: little\nencoding: gzip\n\n")
    started = time.monotonic()
    refused(capsys, case["root"], *segment(case, image=huge), message="the header says 20000 x 20000 x 5 voxels")
    assert time.monotonic() - started < 5
    singular = case["root"] / "in" / "singular.nrrd"
    singular.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 2\nspace: left-posterior-superior\n"
                         b"space directions: (1,0,0) (1,0,0) (0,0,1)\nendian: little\nencoding: raw\n\n" + bytes(128))
    refused(capsys, case["root"], *segment(case, image=singular), message="axis directions are not independent")


@pytest.mark.parametrize("field, value, message", [
    ("LabelValue", "abc", "field Segment0_LabelValue:='abc' must hold an integer"),
    ("Color", "red green blue", "field Segment0_Color:='red green blue' must hold 3 numbers"),
])
def test_a_damaged_segmentation_field_is_one_clear_line(capsys, case, field, value, message):
    from pscv.data.segmentations import write_segmentation

    path = case["root"] / "in" / "damaged.seg.nrrd"
    volume = read_image(case["image"])
    write_segmentation(path, np.zeros(volume.shape, np.uint8), volume, read_classes(case["classes"]))
    header, _, data = path.read_bytes().partition(b"\n\n")
    header = re.sub(rf"Segment0_{field}:=[^\n]*".encode(), f"Segment0_{field}:={value}".encode(), header)
    path.write_bytes(header + b"\n\n" + data)
    refused(capsys, case["root"], "export", path, "--out", case["root"] / "out" / "x.nrrd", message=message)


# Data loss: an output that is an input ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A model folder of the tiny case's classes (two iterations of a two-level network)."""
    from conftest import TINY_SETTINGS

    from pscv.data.dataset import Case
    from pscv.learn.models import save_model
    from pscv.learn.training import TrainSettings, train

    paths = write_tiny_case(tmp_path_factory.mktemp("model-case"))
    classes = read_classes(paths["classes"])
    volume = read_image(paths["image"])
    model = train([Case(volume, read_clicks(paths["points"], volume, classes))], classes,
                  TrainSettings(**TINY_SETTINGS))
    return save_model(model, tmp_path_factory.mktemp("model") / "model")


def test_an_output_that_is_an_input_is_refused_before_training(capsys, case, no_training):
    """`segment x.nrrd --out x.nrrd` replaced the image with a label map and exited 0."""
    refused(capsys, case["root"], *segment(case, **{"--out": case["image"]}), message="which is the input")
    hard_link = case["root"] / "in" / "same.nrrd"
    os.link(case["image"], hard_link)
    refused(capsys, case["root"], *segment(case, **{"--out": hard_link}), message="which is the input")
    refused(capsys, case["root"], *segment(case, **{"--out": case["root"] / "in" / ".." / "in" / "image.nrrd"}),
            message="which is the input")
    refused(capsys, case["root"], *segment(case, **{"--save-model": case["classes"]}), message="is a file")


def test_predict_never_writes_over_its_images(capsys, case, tiny_model):
    """`predict d --model m --out d --format .nrrd` overwrote every image of d."""
    folder = case["root"] / "in"
    refused(capsys, case["root"], "predict", folder, "--model", tiny_model, "--out", folder, "--format", ".nrrd",
            "--quiet", message="which is the input")
    refused(capsys, case["root"], "predict", case["image"], "--model", tiny_model, "--out", case["image"], "--quiet",
            message="which is the input")
    refused(capsys, case["root"], "predict", folder, "--model", tiny_model, "--out", case["classes"], "--quiet",
            message="is a file; give a folder")
    code, err = pscv(capsys, "predict", folder, "--model", tiny_model, "--out", case["root"] / "pred", "--quiet")
    assert code == 0 and (case["root"] / "pred" / "image.seg.nrrd").is_file(), err


# Checks that came too late: the outputs, before any training ------------------------------------------------


def test_outputs_are_checked_before_training(capsys, case, no_training):
    """`--out x.png` wasted the whole training before it was refused."""
    refused(capsys, case["root"], *segment(case, **{"--out": case["root"] / "x.png"}),
            message="cannot write this format; use a name ending in .seg.nrrd")
    refused(capsys, case["root"], *segment(case, **{"--out": case["root"] / "in"}), message="is a folder")
    refused(capsys, case["root"], *segment(case, **{"--out": case["image"] / "x.seg.nrrd"}),
            message="is a file, not a folder")
    refused(capsys, case["root"], "train", case["root"] / "in", "--out", case["classes"], *TINY, message="is a file")


def test_evaluate_checks_its_json_output_first(capsys, case):
    labels = case["root"] / "in" / "labels.nrrd"
    volume = read_image(case["image"])
    from pscv.data.segmentations import write_segmentation

    write_segmentation(labels, (volume.array > 400).astype(np.uint8), volume, read_classes(case["classes"]))
    common = ["evaluate", labels, labels, "--classes", case["classes"]]
    refused(capsys, case["root"], *common, "--json", case["root"] / "in", message="--json")
    refused(capsys, case["root"], *common, "--json", labels, message="which is the input")


# Full and read-only disks (tmpfs, root only) ----------------------------------------------------------------


def test_a_read_only_disk_is_refused_before_training(capsys, case, no_training, tmp_path):
    with small_disk(tmp_path / "ro", read_only=True) as disk:
        refused(capsys, case["root"], *segment(case, **{"--out": disk / "result.seg.nrrd"}), message="read-only")
        refused(capsys, case["root"], *segment(case, **{"--save-model": disk / "model"}), message="read-only")


def test_a_full_disk_is_one_line_and_leaves_no_file_and_no_empty_folder(capsys, case, tmp_path):
    with small_disk(tmp_path / "full", full=True) as disk:
        code, err = pscv(capsys, *segment(case, **{"--out": disk / "result.seg.nrrd"}))
        assert code == 2 and "the disk is full" in err and "Traceback" not in err, err
        assert sorted(p.name for p in disk.iterdir()) == [".filler"]
        code, err = pscv(capsys, *segment(case, **{"--save-model": disk / "model"}))
        assert code == 2 and "the disk is full" in err and "Traceback" not in err, err
        assert sorted(p.name for p in disk.iterdir()) == [".filler"]  # no empty model folder


# Leftovers --------------------------------------------------------------------------------------------------


def test_what_a_killed_process_left_is_removed_by_the_next_save(capsys, case):
    """kill -9 during a model save left `.model.partial-PID/` for ever; one of a running process stays."""
    model = case["root"] / "out" / "model"
    stale, live = model.with_name(f".model.partial-{dead_pid()}"), model.with_name(f".model.partial-{os.getppid()}")
    for folder in (stale, live):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"half a model")
    code, err = pscv(capsys, *segment(case, **{"--save-model": model}))
    assert code == 0, err
    assert not stale.exists() and live.is_dir() and (model / "model.json").is_file()


def test_sigterm_while_writing_leaves_no_partial_file(tmp_path):
    """SIGTERM during a write left `.NAME.partial-PID.*` (only SIGINT cleaned up). A 12 MB label map takes
    about a second to compress into a .nii.gz: the signal comes while its partial file is there."""
    import SimpleITK as sitk

    paths = write_tiny_case(tmp_path / "in")
    labels = (np.random.default_rng(0).random((48, 512, 512)) < 0.5).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "in" / "labels.nrrd"), False)
    out = tmp_path / "out"
    out.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "pscv", "export", str(tmp_path / "in" / "labels.nrrd"),
                                "--classes", str(paths["classes"]), "--out", str(out / "result.nii.gz")],
                               stderr=subprocess.PIPE, text=True, env=worker_environment())
    deadline = time.monotonic() + 60
    while not list(out.glob(".result.nii.gz.partial-*")):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 143 and "stopped (SIGTERM)" in err and "Traceback" not in err, err
    assert list(out.iterdir()) == []


def test_the_schema_covers_every_setting_and_refuses_no_valid_one():
    """Every field of TrainSettings and CaseSettings has its entry in the one schema, the defaults pass it, and
    the values the cohort recipes and the single-case mode use are taken."""
    from dataclasses import fields

    from pscv.learn.settings import CASE_SCHEMA, SCHEMA, TrainSettings, check_case_settings, check_settings
    from pscv.learn.single_case import CaseSettings

    assert {f.name for f in fields(TrainSettings)} == set(SCHEMA)
    assert {f.name for f in fields(CaseSettings)} == set(CASE_SCHEMA)
    assert check_settings(TrainSettings().to_dict()) and check_case_settings(CaseSettings().to_dict())
    valid = {"optimizer": "adam", "precision": "bfloat16", "augment": "affine", "augment_rotation": 15.0,
             "augment_scale": 0.2, "augment_intensity": 0.2, "crf_weight": 1e-3, "crf_radius": 5, "crf_sigma_xy": 6,
             "crf_sigma_intensity": 0.1, "dmpls_weight": 0.5, "dmpls_dropout": 0.5, "method": "full",
             "region_margin": 0.3, "walker_beta": 130.0, "walker_tolerance": 1e-4, "suggest": 5, "train_model": True}
    assert check_case_settings(valid) == valid
    assert TrainSettings.from_dict({k: v for k, v in valid.items() if k in SCHEMA}).optimizer == "adam"
