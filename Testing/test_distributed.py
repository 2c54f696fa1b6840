"""Training in several processes (torchrun + DDP, gloo on the CPU), checkpoints and --resume, model cards.

Real processes: `pscv train --nproc 2` re-launches itself under torchrun. Tolerances, and why:
- Two processes with batch 2 against one with batch 4 (method pscv with cv_gather, so that the contrastive
  term sees the same 4 images): weights within 1e-5 (measured: 7e-7 after 6 steps) and losses within 1e-5
  relative. The data set's slices are all alike, because on the CPU each process normalises with its own
  batch's statistics (PyTorch's SyncBatchNorm needs GPUs): with alike slices those equal the global ones, and
  whichever slices each process draws, the global batch is the same. The batch-norm running variances still
  differ by about 1e-3 (relative): each process applies the unbiased correction n / (n - 1) with its own n.
- A run stopped and resumed against the same run uninterrupted: equal, bit for bit (CPU, same thread count).
"""

import json
import math
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import CLASSES, two_organ_volume

from pscv import PSCVError
from pscv.base.progress import Cancelled
from pscv.data.classes import ClassInfo, write_classes
from pscv.data.clicks import Clicks, simulate_clicks, write_markups
from pscv.data.dataset import Case
from pscv.data.volumes import Volume, write_image
from pscv.learn.checkpoints import CHECKPOINT, read_state
from pscv.learn.distributed import Processes, shard
from pscv.learn.models import load_model
from pscv.learn.training import TrainSettings, train

HERE = Path(__file__).parent
ENV = {"PYTHONPATH": str(HERE.parent / "PSCVSegment"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
TWO_CLASSES = [ClassInfo("background", 0, (0, 0, 0)), ClassInfo("organ", 1, (230, 159, 0))]
TINY = ["--method", "pscv", "--image-size", "32", "--device", "cpu", "--set", "widths=[8,16,32]",
        "--set", "cv_gather=true", "--set", "learning_rate=0.05", "--set", "affinity_weight=0",
        "--set", "pseudo_weight=0", "--set", "outside_weight=0", "--set", "crf_weight=0", "--set", "absent_weight=0",
        "--set", "largest_piece=false", "--set", "precision=float32",
        # SGD: Adam divides by the gradients' running size, so it turns round-off in near-zero gradients (which the
        # two process layouts sum in different orders) into steps of the full learning rate
        "--set", "optimizer=sgd", "--quiet"]  # float32: one and two processes agree
RESUMED = {"method": "pscv", "iterations": 24, "batch_size": 2, "image_size": 32, "device": "cpu",
           "widths": [8, 16, 32], "dropout": [0.2, 0.2, 0.2], "augment": "flip", "cv_gather": True,
           "learning_rate": 0.05}


def pscv(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "pscv.cli", *map(str, args)], capture_output=True, text=True,
                            env=ENV, timeout=300)
    if check and result.returncode:
        raise AssertionError(f"pscv {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


def write_dataset(folder: Path, alike: bool, slices: int = 4, size: int = 32, empty: int = 0) -> Path:
    """A one-case dataset folder (images, points, labels, classes.json) of a bright box on noise, a click on
    the background and one on the box in every slice; `alike`: every slice the same, clicks included; the
    first `empty` slices have no box (and so a background click only)."""
    rng = np.random.default_rng(0)
    labels = np.zeros((slices, size, size), dtype=np.uint8)
    labels[empty:, size // 4:size * 5 // 8, size // 3:size * 3 // 4] = 1
    noise = rng.normal(0, 30, (1 if alike else slices, size, size))
    volume = Volume((labels.astype(np.float32) * 800 + noise).astype(np.float32), spacing=(1.0, 1.0, 3.0))
    if alike:
        kji = np.array([[k, j, i] for k in range(slices) for j, i in ((2, 2), (size // 2, size // 2))])
        clicks = Clicks(kji, np.tile([0, 1], slices))
    else:
        clicks = simulate_clicks(labels, seed=0)
    for sub in ("images", "points", "labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    write_image(volume, folder / "images" / "case.nrrd")
    write_image(volume.with_array(labels), folder / "labels" / "case.nrrd")
    write_markups(clicks, volume, TWO_CLASSES, folder / "points" / "case.mrk.json")
    write_classes(TWO_CLASSES, folder / "classes.json")
    return folder


def settings_arguments(settings: dict) -> list[str]:
    named = {"method", "iterations", "batch_size", "image_size", "device"}
    arguments = [f"--{key.replace('_', '-')}={settings[key]}" for key in sorted(named)]
    return arguments + [f"--set={key}={json.dumps(value)}" for key, value in settings.items() if key not in named]


def weights(folder) -> dict:
    return load_model(folder).network.state_dict()


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory):
    """The same training (global batch 4, 6 steps) in one process and in two, both validated."""
    root = tmp_path_factory.mktemp("ddp")
    dataset = write_dataset(root / "alike", alike=True)
    common = [dataset, *TINY, "--iterations", "6", "--set", "dropout=[0,0,0]", "--set", "augment=none",
              "--val", dataset]
    one = pscv("train", *common, "--out", root / "one", "--batch-size", "4")
    two = pscv("train", *common, "--out", root / "two", "--batch-size", "2", "--nproc", "2")
    return root, one, two


def test_two_processes_match_one_process_with_the_same_global_batch(one_and_two_processes):
    root, _, two = one_and_two_processes
    one_model, two_model = load_model(root / "one"), load_model(root / "two")
    parameters = {name for name, _ in one_model.network.named_parameters()}
    first, second = one_model.network.state_dict(), two_model.network.state_dict()
    moved = max((first[name] - weights_at_start(root)[name]).abs().max().item() for name in parameters)
    assert moved > 1e-2  # the runs trained: a match is no accident of unchanged weights
    assert max((first[name] - second[name]).abs().max().item() for name in parameters) < 1e-5
    for name in set(first) - parameters - {n for n in first if n.endswith("num_batches_tracked")}:
        assert torch.allclose(first[name], second[name], rtol=1e-2, atol=1e-6), name
    for a, b in zip(one_model.metadata["history"], two_model.metadata["history"], strict=True):
        assert a.keys() == b.keys() == {"step", "loss", "pce", "cv"}
        # rel 1e-4: channels-last convolutions on the CPU sum in an order that depends on the batch size
        assert all(b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-8) for key in a)
    # One process spoke for both: one announcement, one progress line per step reported, one result line.
    assert two.stderr.count("training pscv on 1 cases") == 1 and "in 2 processes (global batch 4)" in two.stderr
    assert two.stdout.count("wrote") == 1


def test_two_processes_gather_the_contrastive_maps_beside_the_absent_organ_term(tmp_path):
    dataset = write_dataset(tmp_path / "data", alike=False, empty=2)  # the organ is absent from two clicked slices
    out = tmp_path / "model"
    pscv("train", dataset, "--out", out, *TINY, "--set", "absent_weight=1", "--iterations", "4",
         "--batch-size", "2", "--nproc", "2")
    history = json.loads((out / "model.json").read_text())["history"]
    assert history[0]["absent"] > 0 and all(math.isfinite(h["loss"]) for h in history)


def weights_at_start(root) -> dict:
    """The network both runs started from (seed 0), for the check that they moved."""
    from pscv.learn.models import build_network

    torch.manual_seed(0)
    return build_network(load_model(root / "one").metadata["network"]).state_dict()


def test_model_card_says_what_was_trained_on_what_where_and_how_well(one_and_two_processes):
    root, _, _ = one_and_two_processes
    cards = {name: json.loads((root / name / "model_card.json").read_text()) for name in ("one", "two")}
    card = cards["two"]
    assert card["classes"] == [{"name": "background", "value": 0}, {"name": "organ", "value": 1}]
    assert card["method"] == "pscv" and card["settings"]["cv_gather"] is True and card["settings"]["batch_size"] == 2
    assert card["network"]["widths"] == [8, 16, 32]
    assert card["data"] == {"cases": 1, "slices": 4, "clicks": 8}  # both shards together
    assert card["training"]["processes"] == 2 and card["training"]["global_batch"] == 4
    assert cards["one"]["training"]["processes"] == 1 and cards["one"]["training"]["global_batch"] == 4
    assert card["training"]["device"] == "cpu" and card["training"]["seconds"] > 0
    assert card["engine_version"] and datetime.fromisoformat(card["date"]).year >= 2024
    validation = card["validation"]
    assert validation["cases"] == 1 and set(validation["dice"]) == {"organ"}
    assert 0 < validation["mean_dice"] <= 1 and validation == {**cards["one"]["validation"]}
    assert read_state(root / "two" / CHECKPOINT)["step"] == 6  # the finished run's state stays: --resume extends it


def test_a_stopped_two_process_run_resumes_to_where_the_uninterrupted_run_ends(tmp_path):
    dataset = write_dataset(tmp_path / "data", alike=False)
    pscv("train", dataset, "--out", tmp_path / "whole", "--nproc", "2", *settings_arguments(RESUMED), "--quiet")
    # Stopped at the second loss record (after step 10 of 24): the checkpoint holds 11 steps.
    stopped = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                              HERE / "train_and_stop.py", dataset, tmp_path / "part", json.dumps(RESUMED), "2"],
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert stopped.returncode == 0, stopped.stderr
    state = read_state(tmp_path / "part" / CHECKPOINT)
    assert state["step"] == 11 and state["run"]["processes"] == 2 and state["history"][-1]["step"] == 10
    # Resumed with the settings the checkpoint holds: only the data, the folder and the processes are given.
    pscv("train", dataset, "--out", tmp_path / "part", "--resume", tmp_path / "part" / CHECKPOINT, "--nproc", "2",
         "--device", "cpu", "--quiet")
    whole, resumed = load_model(tmp_path / "whole"), load_model(tmp_path / "part")
    for name, tensor in whole.network.state_dict().items():
        assert torch.equal(tensor, resumed.network.state_dict()[name]), name
    assert resumed.metadata["history"] == whole.metadata["history"]
    assert resumed.metadata["training"]["resumed_from_step"] == 11
    assert read_state(tmp_path / "part" / CHECKPOINT)["step"] == 24


def tiny_case():
    volume, labels = two_organ_volume(slices=4, size=32)
    return [Case(volume, simulate_clicks(labels, seed=0))]


TINY_SETTINGS = {"method": "pscv", "image_size": 32, "batch_size": 3, "device": "cpu", "widths": (8, 16, 32),
                 "dropout": (0.2, 0.2, 0.2), "augment": "flip", "pseudo_weight": 0.5, "pseudo_start": 0.2,
                 "pseudo_threshold": 0.5, "learning_rate": 0.05}


def stop_after(calls: int):
    asked = []
    return lambda: asked.append(1) or len(asked) > calls


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A one-process run of 12 steps stopped after 5 of them (its checkpoint), and the same run whole."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("resume")
    settings = TrainSettings(iterations=12, **TINY_SETTINGS)
    whole = train(tiny_case(), CLASSES, settings)
    with pytest.raises(Cancelled):  # `should_stop` is asked as loading ends, then after every step
        train(tiny_case(), CLASSES, settings, should_stop=stop_after(5), checkpoint_dir=folder, checkpoint_every=4)
    return folder / CHECKPOINT, settings, whole


def test_a_stopped_run_resumes_exactly(stopped_run):
    checkpoint, settings, whole = stopped_run
    assert read_state(checkpoint)["step"] == 5
    resumed = train(tiny_case(), CLASSES, settings, resume=checkpoint)
    for name, tensor in whole.network.state_dict().items():  # dropout, flips, sampling, teacher: all continued
        assert torch.equal(tensor, resumed.network.state_dict()[name]), name
    assert resumed.metadata["history"] == whole.metadata["history"]
    assert {"pce", "cv", "pseudo"} <= set(resumed.metadata["history"][-1])


def test_a_finished_run_extends_to_a_larger_total_with_its_pseudo_labels_and_the_longer_schedule(tmp_path):
    settings = TrainSettings(iterations=12, **TINY_SETTINGS)  # pseudo-labels from step 2 (0.2 x 12)
    finished = train(tiny_case(), CLASSES, settings, checkpoint_dir=tmp_path, final_checkpoint=True)
    assert read_state(tmp_path / CHECKPOINT)["step"] == 12
    longer = TrainSettings(**{**settings.to_dict(), "iterations": 40})  # alone, pseudo-labels would wait for step 8
    events = []
    extended = train(tiny_case(), CLASSES, longer, resume=tmp_path, progress=events.append)
    history = extended.metadata["history"]
    assert history[:len(finished.metadata["history"])] == finished.metadata["history"]
    assert [h["step"] for h in history][-3:] == [20, 30, 39] and "pseudo" in history[-3]
    last_step = [e["step"] for e in events if e["stage"] == "train"][-1]
    assert extended.metadata["training"]["resumed_from_step"] == 12 and last_step == 40
    assert not torch.equal(extended.network.state_dict()["head.weight"], finished.network.state_dict()["head.weight"])
    from pscv.learn.training import poly_learning_rate

    assert poly_learning_rate(longer, 12) == pytest.approx(0.05 * (1 - 12 / 40) ** 0.9)  # where it goes on
    with pytest.raises(PSCVError, match="has done 12 iterations already; to extend the run give a larger total"):
        train(tiny_case(), CLASSES, settings, resume=tmp_path)


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(stopped_run):
    checkpoint, settings, _ = stopped_run
    cases = tiny_case()
    other_classes = [*CLASSES, ClassInfo("spot", 3, (0, 0, 255))]
    with pytest.raises(PSCVError, match=r"cannot resume.*classes \['background=0', 'disk=1', 'box=2'\] in the "
                       r"checkpoint, \['background=0', 'disk=1', 'box=2', 'spot=3'\] here"):
        train(cases, other_classes, settings, resume=checkpoint)
    wider = TrainSettings(**{**settings.to_dict(), "widths": [8, 16, 64]})
    with pytest.raises(PSCVError, match=r"network widths \[8, 16, 32\] in the checkpoint, \[8, 16, 64\] here"):
        train(cases, CLASSES, wider, resume=checkpoint)
    with pytest.raises(PSCVError, match=r"settings learning_rate 0.05 in the checkpoint, 0.1 here"):
        train(cases, CLASSES, TrainSettings(**{**settings.to_dict(), "learning_rate": 0.1}), resume=checkpoint)
    with pytest.raises(PSCVError, match=r"data set of 4 slices and 12 clicks in the checkpoint, 3 slices"):
        volume, labels = two_organ_volume(slices=3, size=32)
        train([Case(volume, simulate_clicks(labels, 0))], CLASSES, settings, resume=checkpoint)
    # The device may change: a CPU checkpoint continues anywhere (not checked here: there is no GPU).
    assert "device" not in read_state(checkpoint)["run"]["settings"]


def test_ctrl_c_writes_a_checkpoint_that_the_command_line_resumes_or_refuses(tmp_path):
    dataset = write_dataset(tmp_path / "data", alike=False)
    out = tmp_path / "model"
    command = [sys.executable, "-m", "pscv.cli", "train", dataset, "--out", out, "--iterations", "100000",
               "--batch-size", "2", *TINY]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=ENV)
    while "training pscv" not in process.stderr.readline():
        pass
    time.sleep(1.5)  # into the training steps
    process.send_signal(2)  # SIGINT, as Ctrl+C
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert f"--resume {out / CHECKPOINT}" in stderr and "Traceback" not in stderr
    assert 0 < read_state(out / CHECKPOINT)["step"] < 100000
    refused = pscv("train", dataset, "--out", out, "--resume", out, "--set", "widths=[8,16,64]", "--device", "cpu",
                   check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "network widths [8, 16, 32] in the checkpoint, [8, 16, 64] here" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_the_command_line_extends_a_finished_run(tmp_path):
    dataset = write_dataset(tmp_path / "data", alike=False)
    out = tmp_path / "model"
    pscv("train", dataset, "--out", out, *settings_arguments({**RESUMED, "iterations": 6}), "--quiet")
    extended = pscv("train", dataset, "--out", out, "--resume", out, "--iterations", "10", "--device", "cpu")
    assert "resumed from" in extended.stderr and "[train] 10/10" in extended.stderr
    card = json.loads((out / "model_card.json").read_text())
    assert card["settings"]["iterations"] == 10 and card["training"]["resumed_from_step"] == 6
    again = pscv("train", dataset, "--out", out, "--resume", out, "--iterations", "10", "--device", "cpu", check=False)
    assert again.returncode == 2 and "has done 10 iterations already" in again.stderr


def test_shards_are_disjoint_and_cover_every_slice():
    parts = [shard(10, Processes(rank, 3)).tolist() for rank in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    with pytest.raises(PSCVError, match="3 processes need at least 3 training slices"):
        shard(2, Processes(0, 3))


def test_nproc_errors_are_one_line_before_any_process_starts(tmp_path):
    dataset = write_dataset(tmp_path / "data", alike=True)
    gpus = torch.cuda.device_count()
    cases = [(["--nproc", "0"], "give at least 1 process")]
    if gpus < 2:
        cases.append((["--nproc", "2", "--device", "cuda"], "no CUDA GPU" if gpus == 0 else "a GPU of its own"))
    for arguments, message in cases:
        result = pscv("train", dataset, "--out", tmp_path / "m", *arguments, check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_rank_and_world_come_from_torchrun_s_environment(monkeypatch):
    from pscv.learn.distributed import from_environment

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert from_environment() == Processes(0, 1, 0) and from_environment().main
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert from_environment() == Processes(3, 4, 1) and not from_environment().main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(PSCVError, match="RANK 4 and WORLD_SIZE 4"):
        from_environment()
