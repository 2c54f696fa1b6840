"""The `pscv` command line as a user runs it: real subprocesses, real files, slicerio reading our output."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

DATA = Path(__file__).parent / "Data" / "acdc"
CASE = "patient002_frame01"
TINY = ["--iterations", "4", "--image-size", "32", "--batch-size", "2", "--device", "cpu",
        "--set", "widths=[8,16,32,64,128]"]


def pscv(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "pscv.cli", *map(str, args)], capture_output=True, text=True,
                            env={"PYTHONPATH": str(Path(__file__).parents[1] / "PSCVSegment"), "OMP_NUM_THREADS": "2",
                                 "PATH": "/usr/bin:/bin"})
    if check and result.returncode:
        raise AssertionError(f"pscv {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


def test_help_for_every_command():
    listing = pscv("--help").stdout
    for command in ("segment", "train", "predict", "evaluate", "prepare", "prepare-acdc", "bench"):
        assert command in listing
        assert "usage: pscv " + command in pscv(command, "--help").stdout


def test_train_defaults_follow_the_device_and_the_help_says_both():
    from pscv import cli
    from pscv.learn.budgets import COHORT_CPU_BUDGET, COHORT_GPU_BUDGET, describe
    from pscv.learn.training import cohort_budget, cohort_settings

    def settings(*arguments):
        return cli._train_settings(cli.build_parser().parse_args(["train", "data", "--out", "m", *arguments]))

    on_cpu = settings("--device", "cpu")
    assert {k: on_cpu.to_dict()[k] for k in COHORT_CPU_BUDGET} == COHORT_CPU_BUDGET == cohort_budget("cpu")
    assert COHORT_GPU_BUDGET == {"iterations": 30000, "image_size": 256, "batch_size": 12}  # the paper profile
    chosen = settings("--device", "cpu", "--iterations", "50", "--batch-size", "4")
    assert (chosen.iterations, chosen.batch_size, chosen.image_size) == (50, 4, COHORT_CPU_BUDGET["image_size"])
    assert cohort_settings("cpu", method="full").method == "full"
    text = " ".join(pscv("train", "--help").stdout.split())
    assert f"on a CPU {describe(COHORT_CPU_BUDGET)}" in text and describe(COHORT_GPU_BUDGET) in text


def test_segment_writes_a_seg_nrrd_that_slicerio_reads_with_names_colors_and_geometry(tmp_path):
    out = tmp_path / "result.seg.nrrd"
    result = pscv("segment", DATA / f"{CASE}.nrrd", "--points", DATA / f"{CASE}.mrk.json",
                  "--classes", DATA / "classes.json", "--out", out, "--save-model", tmp_path / "model", *TINY)
    assert "wrote" in result.stdout and "[train] 4/4" in result.stderr
    segmentation = slicerio.read_segmentation(str(out))
    classes = json.loads((DATA / "classes.json").read_text())["classes"]
    segments = {s["name"]: s for s in segmentation["segments"]}
    assert sorted(segments) == ["LV", "Myo", "RV"]
    for info in classes[1:]:
        assert segments[info["name"]]["labelValue"] == info["value"]
        assert np.allclose(segments[info["name"]]["color"], np.array(info["color"]) / 255, atol=1e-3)
    source = sitk.ReadImage(str(DATA / f"{CASE}.nrrd"))
    assert np.allclose(segmentation["ijkToLPS"][:3, 3], source.GetOrigin())
    assert np.allclose(np.linalg.norm(segmentation["ijkToLPS"][:3, :3], axis=0), source.GetSpacing())
    voxels = segmentation["voxels"]
    assert voxels.shape[::-1] == sitk.GetArrayFromImage(source).shape or voxels.shape == source.GetSize()
    assert (tmp_path / "model" / "model.json").is_file()


def test_train_predict_evaluate_on_a_dataset_folder(tmp_path):
    dataset = tmp_path / "dataset"
    for sub, name in (("images", f"{CASE}.nrrd"), ("points", f"{CASE}.mrk.json"), ("labels", f"{CASE}.nrrd")):
        (dataset / sub).mkdir(parents=True)
        shutil.copy(DATA / (f"{CASE}_label.nrrd" if sub == "labels" else name), dataset / sub / name)
    shutil.copy(DATA / "classes.json", dataset / "classes.json")
    for method in ("pscv", "full"):
        pscv("train", dataset, "--out", tmp_path / f"model-{method}", "--method", method, *TINY)
        meta = json.loads((tmp_path / f"model-{method}" / "model.json").read_text())
        assert meta["method"] == method and meta["training"]["cases"] == 1
    pscv("predict", dataset / "images", "--model", tmp_path / "model-pscv", "--out", tmp_path / "predictions",
         "--format", ".nrrd", "--device", "cpu")
    prediction = tmp_path / "predictions" / f"{CASE}.nrrd"
    assert sitk.ReadImage(str(prediction)).GetSize() == sitk.ReadImage(str(DATA / f"{CASE}.nrrd")).GetSize()
    report = tmp_path / "scores.json"
    perfect = pscv("evaluate", dataset / "labels", dataset / "labels", "--json", report).stdout
    assert "mean" in perfect and json.loads(report.read_text())["summary"]["mean"]["dice"] == 1.0
    scores = pscv("evaluate", tmp_path / "predictions", dataset / "labels").stdout
    mean_dice = float(next(line.split()[1] for line in scores.splitlines() if line.startswith("mean")))
    assert 0 <= mean_dice < 1


def test_prepare_a_labelled_folder_then_train_and_validate_on_it(tmp_path):
    cmr = Path(__file__).parent / "Data" / "cmr"
    for split in ("train", "val"):
        result = pscv("prepare", cmr, "--out", tmp_path / split, "--cases", cmr / f"{split}_cases.txt", "--seed", "3")
        assert "wrote 1 cases" in result.stdout
    assert sorted(p.name for p in (tmp_path / "train" / "points").iterdir()) == ["1.mrk.json"]
    pscv("train", tmp_path / "train", "--out", tmp_path / "model", "--val", tmp_path / "val", *TINY)
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["validation"]["cases"] == 1 and set(card["validation"]["dice"]) == {"Myo", "LV", "RV"}
    wrong = pscv("prepare", cmr, "--classes", DATA / "classes.json", "--out", tmp_path / "x", check=False)
    assert wrong.returncode == 2 and "holds value(s) 200, 500, 600 that are no class" in wrong.stderr


def test_bench_cohort_trains_the_recipes_on_one_dataset_and_scores_them_on_another(tmp_path):
    cmr = Path(__file__).parent / "Data" / "cmr"
    for split in ("train", "val"):
        pscv("prepare", cmr, "--out", tmp_path / split, "--cases", cmr / f"{split}_cases.txt")
    pscv("bench", "cohort", "--train", tmp_path / "train", "--val", tmp_path / "val", "--out", tmp_path / "bench",
         "--methods", "pce,full", "--iterations", "2", "--device", "cpu", "--set", "image_size=32",
         "--set", "batch_size=2", "--set", "widths=[4,8]", "--set", "dropout=[0,0]")
    report = (tmp_path / "bench" / "results.md").read_text()
    assert "HD95 in mm" in report and "| Dice Myo | Dice LV | Dice RV | mean Dice | HD95 Myo |" in report
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert list(results["methods"]) == ["pce", "full"] and results["header"]["val_cases"] == 1
    assert set(results["methods"]["pce"]["scores"]) == {"Myo", "LV", "RV", "mean"}
    refused = pscv("bench", "cohort", "--train", tmp_path / "train", check=False)
    assert refused.returncode == 2 and "needs --train DATASET and --val DATASET" in refused.stderr


@pytest.mark.parametrize("arguments, message", [
    (["segment", "missing.nrrd", "--points", "p.mrk.json", "--classes", "c.json", "--out", "o.seg.nrrd"],
     "no such"),
    (["train", "no-such-folder", "--out", "m"], "no such dataset folder"),
    (["predict", str(DATA / f"{CASE}.nrrd"), "--model", "no-model", "--out", "o.nrrd"], "not a pscv model folder"),
    (["segment", str(DATA / f"{CASE}.nrrd"), "--points", str(DATA / f"{CASE}.mrk.json"), "--classes",
      str(DATA / "classes.json"), "--out", "o.seg.nrrd", "--set", "region_margn=1"],
     "the segmentation's: region_margin"),
    (["segment", str(DATA / f"{CASE}.nrrd"), "--points", str(DATA / f"{CASE}.mrk.json"), "--classes",
      str(DATA / "classes.json"), "--out", "o.seg.nrrd", "--iterations", "5"], "apply with --save-model"),
])
def test_errors_are_one_clear_line_and_exit_2(tmp_path, arguments, message):
    result = pscv(*arguments, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_help_texts_and_the_readme_name_the_formats_of_the_one_table():
    """File suffixes live in pscv.data.formats only; the command line and the README's format table agree."""
    from pscv import cli
    from pscv.data import formats

    subparsers = next(a for a in cli.build_parser()._actions if a.dest == "command")

    def argument(command, name):
        return next(a for a in subparsers.choices[command]._actions if a.dest == name)

    assert list(argument("predict", "format").choices) == list(formats.SEGMENTATION_SUFFIXES)
    assert list(argument("export", "to").choices) == list(formats.EXPORT_FORMATS)
    for command, name, suffixes in [("segment", "out", formats.SEGMENTATION_SUFFIXES),
                                    ("predict", "out", formats.SEGMENTATION_SUFFIXES),
                                    ("segment", "image", formats.IMAGE_SUFFIXES),
                                    ("export", "segmentation", formats.READABLE_SEGMENTATION_SUFFIXES)]:
        named = re.findall(r"\.[a-z][a-z.]*[a-z]", argument(command, name).help)
        assert sorted(set(named)) == sorted(set(suffixes)), (command, name, named)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip().strip("|").split("|")]
                                          for line in readme.splitlines() if line.startswith("| "))}
    for table_format in (*formats.IMAGE_FORMATS, formats.SLICER_SEGMENTATION):
        _, extensions, read, written = rows[table_format.name]
        assert re.findall(r"`(\.[^`]+)`", re.sub(r"\(.*?\)", "", extensions)) == list(table_format.suffixes)
        assert re.findall(r"`(\.[^`]+)`", written) == list(table_format.written), table_format.name
        assert table_format not in formats.IMAGE_FORMATS or read == "images; label maps", table_format.name
    assert f"--to {'|'.join(formats.EXPORT_FORMATS)}]" in readme


def test_the_interactive_loop_suggestions_strokes_and_refine(tmp_path):
    """Round 1 with suggestions and a kept model; round 2 adds painted strokes and refines that model."""
    from pscv.data.classes import read_classes
    from pscv.data.metrics import dice
    from pscv.data.segmentations import read_segmentation, write_segmentation
    from pscv.data.volumes import read_image

    image, classes_file = DATA / f"{CASE}.nrrd", DATA / "classes.json"
    base = ["segment", image, "--points", DATA / f"{CASE}.mrk.json", "--classes", classes_file]
    first, suggestions, model = tmp_path / "r1.seg.nrrd", tmp_path / "next.mrk.json", tmp_path / "model"
    result = pscv(*base, "--out", first, "--suggest", "3", "--suggest-out", suggestions, "--save-model", model, *TINY)
    assert "3 suggestions" in result.stdout
    lists = json.loads(suggestions.read_text())["markups"]
    assert [m["name"] for m in lists] == ["suggested points"] and len(lists[0]["controlPoints"]) == 3
    assert all(p["label"].rstrip("?") in ("background", "RV", "Myo", "LV") for p in lists[0]["controlPoints"])
    refused = pscv("segment", image, "--points", suggestions, "--classes", classes_file, "--out",
                   tmp_path / "x.seg.nrrd", check=False)
    assert refused.returncode == 2 and "suggested points" in refused.stderr  # not clicks until moved into a class
    assert json.loads((model / "model.json").read_text())["training"]["clicks"] == 38  # the user's, not a region's

    classes, volume = read_classes(classes_file), read_image(image)
    truth = read_segmentation(DATA / f"{CASE}_label.nrrd", classes, volume)
    painted = np.zeros_like(truth)
    for k in range(truth.shape[0]):  # a thin stroke along the middle row of each class in every slice
        for info in classes[1:]:
            rows, columns = np.nonzero(truth[k] == info.value)
            if len(rows):
                middle = rows == int(np.median(rows))
                painted[k, rows[middle], columns[middle]] = info.value
    strokes = tmp_path / "strokes.seg.nrrd"
    write_segmentation(strokes, painted, volume, classes)
    second = tmp_path / "r2.seg.nrrd"
    pscv(*base, "--strokes", strokes, "--out", second, "--refine", model, *TINY)
    rounds = [read_segmentation(path, classes, volume) for path in (first, second)]
    assert np.all(rounds[1][painted > 0] == painted[painted > 0])  # the strokes hold
    scores = [np.mean([dice(labels == c.value, truth == c.value) for c in classes[1:]]) for labels in rounds]
    assert scores[1] > scores[0] + 0.05, scores
    refined = json.loads((model / "model.json").read_text())
    assert refined["single_case"]["rounds"] == 2 and refined["training"]["clicks"] > 38

    other = tmp_path / "other.nrrd"
    sitk.WriteImage(sitk.Flip(sitk.ReadImage(str(image)), [True, False, False]), str(other))
    wrong = pscv("segment", other, "--points", DATA / f"{CASE}.mrk.json", "--classes", classes_file, "--out",
                 tmp_path / "y.seg.nrrd", "--refine", model, check=False)
    assert wrong.returncode == 2 and "another image" in wrong.stderr
    lonely = pscv(*base, "--out", tmp_path / "z.seg.nrrd", "--suggest", "2", check=False)
    assert lonely.returncode == 2 and "go together" in lonely.stderr


def test_bench_interactive_runs_a_session_per_method_and_reports_it(tmp_path):
    """A round of corrections on a prepared cohort (an MS-CMRSeg test case): every method's clicks grow, Grow
    from seeds runs on exactly the clicks the single-case mode gets in round 0."""
    cmr = Path(__file__).parent / "Data" / "cmr"
    pscv("prepare", cmr, "--out", tmp_path / "val", "--cases", cmr / "val_cases.txt")
    result = pscv("bench", "interactive", "--data", tmp_path / "val", "--rounds", "1", "--out", tmp_path / "bench",
                  "--set", "region_margin=0.2")
    assert "| pscv segment (random walker) | 1 |" in result.stdout
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert results["header"]["settings"]["region_margin"] == 0.2
    methods = results["methods"]
    assert list(methods) == ["pscv", "grow_from_seeds", "pscv_strokes", "pscv_suggested"]
    clicks = {name: [row["clicks"] for row in method["summary"]] for name, method in methods.items()}
    assert clicks["pscv"][0] == clicks["grow_from_seeds"][0] == clicks["pscv_strokes"][0]
    for counts in clicks.values():
        assert counts[0] < counts[1]
    for method in methods.values():
        scores = method["summary"][-1]["scores"]
        assert set(scores) == {"Myo", "LV", "RV", "mean"} and 0 < scores["mean"]["dice"] <= 1
    assert (tmp_path / "bench" / "figure.png").stat().st_size > 10_000
    wrong = pscv("bench", "interactive", "--data", tmp_path, check=False)
    assert wrong.returncode == 2 and "neither the ACDC folder" in wrong.stderr


# What a new user meets in the first hour (issue 13) ---------------------------------------------------------


def run(capsys, *args) -> tuple:
    from pscv import cli

    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit:  # --help
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_pscv_without_a_command_exits_2_as_the_readme_says(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "usage: pscv" in err
    assert "exit with status 2" in README


README = (Path(__file__).parents[1] / "README.md").read_text()


def test_help_says_what_runs_by_default_budgets_defaults_and_what_predict_does(capsys):
    from pscv.learn.single_case import CPU_BUDGET, GPU_BUDGET

    _, top, _ = run(capsys, "--help")
    assert "affinity" in top and "pseudo-labels" in top and "with the PSCV method" not in top
    _, text, _ = run(capsys, "segment", "--help")
    text = " ".join(text.split())
    assert f"{CPU_BUDGET['iterations']} iterations at {CPU_BUDGET['image_size']} px on a CPU" in text
    assert f"{GPU_BUDGET['iterations']} at {GPU_BUDGET['image_size']} px on a GPU" in text
    assert "region around the organ clicks" in text
    _, text, _ = run(capsys, "predict", "--help")
    assert "Segment an image, or every image of a folder" in " ".join(text.split())
    for command in ("prepare-acdc", "bench"):
        _, text, _ = run(capsys, command, "--help")
        assert "default: ../shared/data/acdc" in " ".join(text.split()), command


def test_the_readme_says_what_runs_what_segment_saves_and_what_the_skipped_test_needs():
    intro = README.split("## Quick start")[0]
    assert "pseudo-labels" in intro and "with the PSCV method" not in intro
    assert "dciodvfy" in README and "dicom3tools" in README
    assert "about 1.5 minutes" not in README


def test_missing_acdc_data_names_the_folder_and_how_to_get_it(capsys, tmp_path):
    for command in (["prepare-acdc", "--split", "train", "--out", tmp_path / "out"], ["bench", "acdc", "--out",
                                                                                      tmp_path / "bench"]):
        code, _, err = run(capsys, *command, "--data", tmp_path / "nowhere")
        assert code == 2 and str(tmp_path / "nowhere") in err and "HiLab-git/WSL4MIS" in err, err


def test_evaluate_names_a_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "evaluate", tmp_path / "pred.seg.nrrd", DATA / f"{CASE}_label.nrrd")
    assert code == 2 and f"{tmp_path / 'pred.seg.nrrd'}: no such file or folder" in err, err


def test_evaluate_finds_the_cases_predict_wrote_into_a_folder(capsys, tmp_path):
    """predict FOLDER writes <case>.seg.nrrd; evaluate pairs it with labels/<case>.nrrd."""
    from pscv.data.classes import read_classes
    from pscv.data.segmentations import read_segmentation, write_segmentation
    from pscv.data.volumes import read_image

    classes = read_classes(DATA / "classes.json")
    volume = read_image(DATA / f"{CASE}.nrrd")
    predictions, labels = tmp_path / "predictions", tmp_path / "labels"
    labels.mkdir()
    shutil.copy(DATA / f"{CASE}_label.nrrd", labels / f"{CASE}.nrrd")
    write_segmentation(predictions / f"{CASE}.seg.nrrd", read_segmentation(labels / f"{CASE}.nrrd", classes),
                       volume, classes)
    code, out, err = run(capsys, "evaluate", predictions, labels, "--classes", DATA / "classes.json")
    assert code == 0, err
    assert "(1 case(s))" in out and float(next(line.split()[1] for line in out.splitlines()
                                               if line.startswith("mean"))) == 1.0
