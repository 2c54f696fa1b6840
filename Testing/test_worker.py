"""`pscv worker JOB_DIR` as a real subprocess: events on stdout, results, cancel (SIGTERM, cancel file),
bad job folders; and the job kinds and the out-of-memory fallback in this process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SETTINGS, files_under, write_tiny_case, write_tiny_job

from pscv import PSCVError
from pscv.data.segmentations import read_segmentation
from pscv.jobs import folder as job_folder
from pscv.jobs import runner, staging
from pscv.jobs.processes import worker_environment

LONG = {"iterations": 1_000_000, "train_model": True}  # a segment job that trains a network until stopped


# One torch thread per worker: on a busy 2-core machine more threads mostly wait for each other.
WORKER_ENV = worker_environment({**os.environ, "OMP_NUM_THREADS": "1"})


def start_worker(folder) -> subprocess.Popen:
    with open(Path(folder) / "worker.log", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "pscv", "worker", str(folder)], stdout=subprocess.PIPE,
                                stderr=log, env=WORKER_ENV, text=True)


@pytest.fixture
def one_thread():
    """In-process training on one torch thread (fast and steady on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_events(process, until=None, timeout=60.0) -> list:
    """Events from the worker's stdout until one satisfies `until` (or the stream ends)."""
    events, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        events.append(json.loads(line))  # every stdout line is an event
        if until is not None and until(events[-1]):
            break
        assert time.monotonic() < deadline, f"no matching event within {timeout} s: {events[-3:]}"
    return events


def is_training(event) -> bool:
    return event["event"] == "progress" and event["stage"] == "train" and event["step"] >= 1


def results_left(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(("result", ".result")) or ".partial-" in p.name)


def test_worker_runs_a_tiny_job_to_done(tmp_path):
    folder = write_tiny_job(tmp_path / "job", iterations=6, train_model=True, suggest=2)
    process = start_worker(folder)
    events = read_events(process)
    process.wait(timeout=30)
    assert process.returncode == 0, (folder / "worker.log").read_text()
    assert events[0]["event"] == "started" and events[0]["kind"] == "segment"
    assert events[-1]["event"] == "done"
    assert events[-1]["outputs"] == {"segmentation": "result.seg.nrrd", "model": "result-model",
                                     "suggestions": "suggestions.mrk.json"}
    assert all(event["device"] == "cpu" and isinstance(event["time"], float) for event in events)
    steps = [e["step"] for e in events if e["event"] == "progress" and e["stage"] == "train"]
    assert steps and steps == sorted(steps) and steps[-1] == 6
    assert [e["stage"] for e in events if e["event"] == "progress"][0] == "predict"  # the clicks spread first
    assert [e["stage"] for e in events if e["event"] == "progress"][-1] == "write"
    # events.jsonl holds the same events; state.json says done; the results are whole and readable
    logged, _ = job_folder.read_events(folder)
    assert logged == events
    assert job_folder.read_state(folder)["state"] == "done"
    labels = read_segmentation(folder / "result.seg.nrrd", jobs_classes(folder))
    assert labels.shape == (3, 32, 32) and set(np.unique(labels)) <= {0, 1}
    assert sorted(p.name for p in (folder / "result-model").iterdir()) == ["model.json", "model.safetensors",
                                                                          "model_card.json"]
    suggested = json.loads((folder / "suggestions.mrk.json").read_text())["markups"]
    assert len(suggested) == 1 and len(suggested[0]["controlPoints"]) == 2
    assert not list(folder.rglob("*.partial-*"))


def test_a_segment_job_with_strokes_writes_only_the_segmentation_unless_asked(tmp_path):
    """Strokes (a label map of painted class values) supervise as clicks do; no model, no suggestions."""
    import SimpleITK as sitk

    folder = write_tiny_job(tmp_path / "job")
    image = sitk.ReadImage(str(folder / "image.nrrd"))
    painted = np.zeros(sitk.GetArrayFromImage(image).shape, dtype=np.uint8)
    painted[:, 12:16, 14:20] = 1  # a stroke inside the box on every slice
    strokes = sitk.GetImageFromArray(painted)
    strokes.CopyInformation(image)
    sitk.WriteImage(strokes, str(folder / "strokes-1.nrrd"))
    document = json.loads((folder / "job.json").read_text())
    document["inputs"]["strokes"] = ["strokes-1.nrrd"]
    (folder / "job.json").write_text(json.dumps(document))
    process = start_worker(folder)
    events = read_events(process)
    process.wait(timeout=30)
    assert process.returncode == 0, (folder / "worker.log").read_text()
    assert events[-1]["outputs"] == {"segmentation": "result.seg.nrrd"}
    assert not any(e.get("stage") == "train" for e in events)
    labels = read_segmentation(folder / "result.seg.nrrd", jobs_classes(folder))
    assert np.all(labels[painted == 1] == 1)
    assert not (folder / "result-model").exists() and not (folder / "suggestions.mrk.json").exists()


def jobs_classes(folder):
    from pscv.data.classes import read_classes

    return read_classes(folder / "classes.json")


@pytest.mark.parametrize("how", ["SIGTERM", "cancel file"])
def test_a_running_job_stops_within_2_seconds_and_leaves_no_result(tmp_path, how):
    folder = write_tiny_job(tmp_path / "job", **LONG)
    process = start_worker(folder)
    read_events(process, until=is_training)
    asked = time.monotonic()
    if how == "SIGTERM":
        process.send_signal(signal.SIGTERM)
    else:
        (folder / "cancel").touch()
    rest = read_events(process)
    process.wait(timeout=5)
    seconds = time.monotonic() - asked
    assert seconds < 2.0, f"stopped after {seconds:.2f} s"
    assert process.returncode == 3
    assert rest[-1]["event"] == "cancelled" and how in rest[-1]["message"]
    assert job_folder.read_state(folder)["state"] == "cancelled"
    assert results_left(folder) == []


def test_sigterm_while_the_worker_starts_up_also_stops_it(tmp_path):
    folder = write_tiny_job(tmp_path / "job", **LONG)
    process = start_worker(folder)
    while not (folder / "worker.pid").exists():  # its signal handlers are in place; torch is not loaded yet
        time.sleep(0.01)
    asked = time.monotonic()
    process.send_signal(signal.SIGTERM)
    events = read_events(process)
    process.wait(timeout=5)
    assert time.monotonic() - asked < 2.0
    assert events[-1]["event"] == "cancelled" and process.returncode == 3
    assert results_left(folder) == []


def bad_folder(tmp_path, case: str) -> Path:
    folder = write_tiny_job(tmp_path / case)
    document = json.loads((folder / "job.json").read_text())
    if case == "missing job.json":
        (folder / "job.json").unlink()
    elif case == "invalid JSON":
        (folder / "job.json").write_text('{"version": 1, "kind": "segment", ')
    elif case == "unknown kind":
        document["kind"] = "explode"
    elif case == "missing input file":
        (folder / "image.nrrd").unlink()
    elif case == "path leaving the folder":
        document["inputs"]["image"] = "../../etc/passwd"
    elif case == "absolute path":
        document["inputs"]["classes"] = str(folder / "classes.json")
    elif case == "bad setting":
        document["settings"]["learning_rat"] = 0.1
    elif case == "damaged clicks":
        (folder / "points.mrk.json").write_text("{")
    if case in ("unknown kind", "path leaving the folder", "absolute path", "bad setting"):
        (folder / "job.json").write_text(json.dumps(document))
    return folder


BAD_FOLDERS = {"missing job.json": "missing", "invalid JSON": "not valid JSON", "unknown kind": "unknown job kind",
               "missing input file": "is missing", "path leaving the folder": "leaves the job folder",
               "absolute path": "leaves the job folder", "bad setting": "learning_rat",
               "damaged clicks": "not valid JSON"}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_a_bad_job_folder_ends_in_an_error_event_not_a_traceback(tmp_path, case):
    folder = bad_folder(tmp_path, case)
    result = subprocess.run([sys.executable, "-m", "pscv", "worker", str(folder)], capture_output=True, text=True,
                            env=WORKER_ENV, timeout=60)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 1
    assert events[-1]["event"] == "error" and BAD_FOLDERS[case] in events[-1]["message"], events[-1]
    assert "Traceback" not in result.stderr and "Traceback" not in events[-1]["message"]
    assert job_folder.read_state(folder)["state"] == "error"
    assert results_left(folder) == []


def test_a_missing_job_folder_is_an_error_event(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pscv", "worker", str(tmp_path / "nowhere")], capture_output=True,
                            text=True, env=WORKER_ENV, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert json.loads(result.stdout)["event"] == "error"


# In this process: the other job kinds, and the out-of-memory fallback ------------------------------------


def run_in_process(folder) -> tuple:
    events = []
    outputs = runner.run_job(job_folder.read_job(folder), runner.Events(events.append))
    return outputs, events


def write_job(folder, kind, inputs, settings=None):
    job_folder.write_job(folder, kind, inputs, {**TINY_SETTINGS, **(settings or {})})
    return folder


def test_train_predict_and_finetune_jobs(tmp_path, one_thread):
    # train: a dataset folder of one case
    dataset = tmp_path / "train" / "dataset"
    case = write_tiny_case(tmp_path / "case")
    for sub, source in (("images/a.nrrd", case["image"]), ("points/a.mrk.json", case["points"][0]),
                        ("classes.json", case["classes"])):
        (dataset / sub).parent.mkdir(parents=True, exist_ok=True)
        (dataset / sub).write_bytes(source.read_bytes())
    outputs, events = run_in_process(write_job(tmp_path / "train", "train", {"dataset": "dataset"}))
    assert outputs == {"model": "result-model"} and (tmp_path / "train" / "result-model" / "model.json").is_file()
    assert any(e.get("stage") == "train" for e in events)
    # predict with that model
    folder = tmp_path / "predict"
    inputs = staging.stage_inputs(folder, image=case["image"], model=tmp_path / "train" / "result-model")
    job_folder.write_job(folder, "predict", inputs, {"device": "cpu", "batch_size": 2})
    outputs, events = run_in_process(folder)
    assert outputs == {"segmentation": "result.seg.nrrd"} and (folder / "result.seg.nrrd").is_file()
    assert [e["stage"] for e in events][-2:] == ["predict", "write"]
    # finetune: starts from the model's weights (a vanishing learning rate leaves them where they were)
    folder = tmp_path / "finetune"
    inputs = staging.stage_inputs(folder, image=case["image"], points=case["points"],
                               model=tmp_path / "train" / "result-model")
    job_folder.write_job(folder, "finetune", inputs, {"device": "cpu", "iterations": 2, "learning_rate": 1e-12})
    outputs, _ = run_in_process(folder)
    assert outputs == {"segmentation": "result.seg.nrrd", "model": "result-model"}
    from pscv.learn.models import load_model

    before = load_model(tmp_path / "train" / "result-model").network.head.weight
    after = load_model(folder / "result-model").network.head.weight
    assert torch.allclose(before, after, atol=1e-6)


def test_a_predict_job_refuses_training_settings(tmp_path):
    case = write_tiny_case(tmp_path / "case")
    folder = tmp_path / "job"
    (tmp_path / "model").mkdir()  # any folder: the settings are checked first
    inputs = staging.stage_inputs(folder, image=case["image"], model=tmp_path / "model")
    with pytest.raises(PSCVError, match="only the settings device, batch_size"):  # refused as the job is written
        job_folder.write_job(folder, "predict", inputs, {"iterations": 5})


def test_gpu_out_of_memory_retries_with_a_smaller_batch_then_on_the_cpu(monkeypatch):
    monkeypatch.setattr(runner, "device_label", lambda name: "cpu" if name == "cpu" else "cuda")
    tried = []

    class Settings:
        def __init__(self, device, batch_size):
            self.device, self.batch_size = device, batch_size

    def work(settings):
        tried.append((settings.device, settings.batch_size))
        if settings.device != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "trained"

    events = []
    recorder = runner.Events(events.append)
    result = runner.with_memory_fallback(recorder, lambda device, batch: Settings(device, batch or 12), work, "auto")
    assert result == "trained"
    assert tried == [("auto", 12), ("auto", 6), ("auto", 3), ("auto", 2), ("cpu", 12)]
    messages = [e["message"] for e in events]
    assert "batch size 12; trying again with batch size 6" in messages[0]
    assert "continuing on the CPU" in messages[-1]
    assert recorder.device == "cpu" and all(e["device"] == "cuda" for e in events)


def test_an_error_that_is_not_out_of_memory_is_not_retried(monkeypatch):
    monkeypatch.setattr(runner, "device_label", lambda name: "cuda")

    def work(settings):
        raise ValueError("something else")

    with pytest.raises(ValueError):
        runner.with_memory_fallback(runner.Events(lambda e: None),
                                    lambda d, b: type("S", (), {"device": d, "batch_size": 4})(), work, "cuda")


def test_job_paths_stay_inside_the_folder(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    (tmp_path / "outside.nrrd").write_text("x")
    os.symlink(tmp_path / "outside.nrrd", folder / "link.nrrd")
    for value in ("../outside.nrrd", "/etc/passwd", "link.nrrd", "a/../../outside.nrrd", "job.json", ""):
        with pytest.raises(PSCVError):
            job_folder.inside(folder, value, "inputs.image")
    assert job_folder.inside(folder, "sub/image.nrrd", "inputs.image") == folder / "sub" / "image.nrrd"


# A job runs at most once; a finished job is never touched again (issue 13) --------------------------------


def run_worker(folder, timeout=60) -> tuple:
    result = subprocess.run([sys.executable, "-m", "pscv", "worker", str(folder)], capture_output=True, text=True,
                            env=WORKER_ENV, timeout=timeout)
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def test_a_second_worker_leaves_a_finished_job_and_its_results_alone(tmp_path):
    """A second `pscv worker` on a done job, stopped with SIGTERM, deleted result.seg.nrrd and result-model/ and
    marked the job cancelled."""
    folder = write_tiny_job(tmp_path / "job")
    code, events, _ = run_worker(folder)
    assert code == 0 and events[-1]["event"] == "done"
    before = files_under(folder)
    second = subprocess.Popen([sys.executable, "-m", "pscv", "worker", str(folder)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=WORKER_ENV, text=True)
    first_line = second.stdout.readline()  # its first event: it has looked at the folder
    if second.poll() is None:
        second.send_signal(signal.SIGTERM)
    second.communicate(timeout=30)
    assert "has already ended (done)" in json.loads(first_line)["message"], first_line
    assert second.returncode in (1, 143)  # refused, or stopped by the SIGTERM while it exited
    assert files_under(folder) == before  # results, state and events as they were
    assert job_folder.read_state(folder)["state"] == "done"


def test_two_workers_started_on_one_folder_run_the_job_once(tmp_path):
    folder = write_tiny_job(tmp_path / "job", iterations=60)
    workers = [subprocess.Popen([sys.executable, "-m", "pscv", "worker", str(folder)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=WORKER_ENV, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    codes = sorted(worker.returncode for worker in workers)
    assert codes == [0, 1], outputs
    refused = outputs[[worker.returncode for worker in workers].index(1)]
    assert "another worker is running this job" in refused or "has already ended" in refused, refused
    recorded = [json.loads(line)["event"] for line in (folder / "events.jsonl").read_text().splitlines()]
    assert recorded.count("done") == 1 and "error" not in recorded, recorded


def test_a_worker_after_a_killed_one_ends_the_job_as_failed_and_removes_its_leftovers(tmp_path):
    """kill -9 during a model save left `.result-model.partial-PID/`, and later runs did not remove it."""
    folder = write_tiny_job(tmp_path / "job", **LONG)
    worker = start_worker(folder)
    read_events(worker, until=is_training)
    worker.kill()
    worker.wait()
    leftover = folder / f".result-model.partial-{worker.pid}"  # what a kill during the model's save leaves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a model")
    code, events, _ = run_worker(folder)
    assert code == 1 and "its worker is gone" in events[-1]["message"], events
    assert job_folder.read_state(folder)["state"] == "error"
    assert results_left(folder) == []


# Settings and memory errors become the job's error (issue 13) ----------------------------------------------


@pytest.mark.parametrize("settings, message", [
    ({"image_size": "abc"}, "setting image_size: got 'abc'; it takes a multiple of 16"),
    ({"iterations": 2.5}, "setting iterations: got 2.5; it takes an integer"),
    ({"normalization": 5}, "setting normalization: got 5"),
    ({"widths": []}, "setting widths: got []"),
])
def test_bad_settings_are_the_jobs_error_naming_the_key(tmp_path, settings, message):
    folder = write_tiny_job(tmp_path / "job", **settings)
    code, events, stderr = run_worker(folder)
    assert code == 1 and message in events[-1]["message"], events[-1]
    assert "please report" not in events[-1]["message"] and "Traceback" not in stderr
