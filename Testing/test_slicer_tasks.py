"""The module's background jobs (PSCVSegmentLib.tasks) with real worker processes, a real `pscv serve` and
slicer-core's real scene: the result lands in the scene the job was started for, or nowhere; the GUI
thread never waits (uploads and downloads happen in the task's thread); job folders and work folders are
removed; the worker's output is kept in the task's log for failed and successful jobs.
"""

import json
import os
import stat
import sys
import threading
import time

import numpy as np
import pytest
from conftest import TINY_SETTINGS
from slicer_scene import SlicerScene, slicer  # noqa: F401 (skips without slicer-core)

from pscv.data import geometry
from PSCVSegmentLib import cohort, environment, pointlists, results, tasks

pytest.importorskip("torch")


def scene_with_points():
    app = SlicerScene()
    k, j, i = np.mgrid[0:4, 0:24, 0:24]
    labels = np.zeros(k.shape, np.uint8)
    labels[:, 4:11, 4:11], labels[:, 13:21, 12:21] = 1, 2
    image = (np.random.default_rng(0).normal(0, 5, k.shape) + np.choose(labels, [0, 100, 200])).astype(np.int16)
    ijk_to_ras = np.diag([1.0, 1.0, 3.0, 1.0])
    volume = app.addVolume(image, ijk_to_ras, "tiny", study="Study")
    clicks = {"background": [[s, 1, 1] for s in range(4)], "liver": [[s, 7, 7] for s in range(4)],
              "kidney": [[s, 16, 16] for s in range(4)]}
    nodes = []
    for value, (name, kji) in enumerate(clicks.items()):
        node = pointlists.addClassPointList(app.scene, name, value)
        for position in geometry.kji_to_world(kji, ijk_to_ras):
            node.AddControlPointWorld(*position)
        nodes.append(node)
    return app, volume, nodes


def local_client(tmp_path, python=sys.executable):
    # Not Slicer's Python: the worker gets the "startup environment" (here: this process's, one torch thread).
    startup = {**os.environ, "OMP_NUM_THREADS": "1"}
    return environment.jobClient(environment.Connection(python=python), slicerPython=None,
                                 startupEnvironment=startup, jobsDirectory=tmp_path / "root" / tasks.JOBS_FOLDER)


def segment_task(app, volume, nodes, client, tmp_path, **settings):
    return tasks.createTask(app.scene, "segment", client, tmp_path / "root", volume, nodes,
                            settings={**TINY_SETTINGS, **settings})


def poll_until(task, states, timeout=300):
    deadline = time.monotonic() + timeout
    longest = 0.0
    while task.state not in states:
        started = time.monotonic()
        task.poll()
        longest = max(longest, time.monotonic() - started)
        assert time.monotonic() < deadline, f"still {task.state}: {task.logText()}"
        time.sleep(0.05)
    return longest


def test_a_local_job_runs_imports_and_cleans_up(tmp_path):
    app, volume, nodes = scene_with_points()
    task = segment_task(app, volume, nodes, local_client(tmp_path), tmp_path, train_model=True).start()
    longest_poll = poll_until(task, (tasks.READY, tasks.FAILED))
    assert task.state == tasks.READY, task.logText()
    assert longest_poll < 0.5  # poll never waits for the job
    node = task.finish()
    assert task.state == tasks.FINISHED
    assert results.segmentNames(node) == ["liver", "kidney"]
    assert node.GetName() == "tiny segmentation"
    assert os.listdir(tmp_path / "root" / tasks.JOBS_FOLDER) == []  # the job folder is gone
    assert os.listdir(task.workDirectory) == [tasks.MODEL_FOLDER]  # only the model, until the caller drops it
    assert any(os.scandir(task.modelDirectory))
    log = task.logText()
    assert "Training" in log and "finished" in log
    store = tasks.LogStore(tmp_path / "root" / tasks.LOGS_FOLDER, keep=2)
    for _ in range(3):
        saved = store.save(task)
    assert len(store.files()) == 2 and open(saved).read().startswith(time.strftime("%Y-"))
    task.removeWorkDirectory()
    assert not os.path.exists(task.workDirectory)


def test_closing_the_scene_while_the_job_runs_cancels_it_and_imports_nothing(tmp_path):
    app, volume, nodes = scene_with_points()
    task = segment_task(app, volume, nodes, local_client(tmp_path), tmp_path, iterations=100000, train_model=True)
    task.start()
    deadline = time.monotonic() + 120
    while not any(e.get("stage") == "train" for e in task.events):
        task.poll()
        assert time.monotonic() < deadline and task.running, task.logText()
        time.sleep(0.05)
    app.scene.Clear(0)  # File > Close scene
    poll_until(task, tasks.ENDED, timeout=60)
    assert task.state == tasks.CANCELLED, task.logText()
    assert "scene was closed" in task.logText()
    with pytest.raises(RuntimeError):
        task.finish()
    assert app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert not os.path.exists(task.workDirectory)
    assert os.listdir(tmp_path / "root" / tasks.JOBS_FOLDER) == []


def test_a_result_that_arrives_after_the_scene_was_closed_is_dropped(tmp_path):
    app, volume, nodes = scene_with_points()
    task = segment_task(app, volume, nodes, local_client(tmp_path), tmp_path)
    task.start()
    poll_until(task, (tasks.READY, tasks.FAILED))
    assert task.state == tasks.READY
    app.scene.Clear(0)
    with pytest.raises(tasks.SceneClosedError):
        task.finish()
    assert task.state == tasks.ORPHANED
    assert app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert not os.path.exists(task.workDirectory)


def test_a_failing_worker_keeps_its_output_in_the_log(tmp_path):
    """A "python" that writes to stderr and dies: the job fails, its worker.log ends up in the task's log, and
    the job folder is removed all the same."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'Traceback: something broke in the worker' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    app, volume, nodes = scene_with_points()
    task = segment_task(app, volume, nodes, local_client(tmp_path, python=str(fake)), tmp_path).start()
    poll_until(task, tasks.ENDED, timeout=60)
    assert task.state == tasks.FAILED
    assert "exit status 3" in task.message
    assert "[worker] Traceback: something broke in the worker" in task.logText()
    assert os.listdir(tmp_path / "root" / tasks.JOBS_FOLDER) == []
    assert not os.path.exists(task.workDirectory)


class SlowUploadClient:
    """Wraps a real JobClient; its submit takes ``delay`` seconds first, like an upload over a slow network."""

    remote = True
    server_url = "http://slow-server:8000"

    def __init__(self, client, delay):
        self.client, self.delay = client, delay
        self.submitted = threading.Event()

    def submit(self, kind, **arguments):
        time.sleep(self.delay)
        job = self.client.submit(kind, **arguments)
        self.submitted.set()
        return job


def test_the_upload_happens_off_the_calling_thread_and_cancel_reaches_it(tmp_path):
    app, volume, nodes = scene_with_points()
    client = SlowUploadClient(local_client(tmp_path), delay=1.5)
    task = segment_task(app, volume, nodes, client, tmp_path, iterations=100000, train_model=True)
    started = time.monotonic()
    task.start()
    events = task.poll()
    assert time.monotonic() - started < 0.5 and task.state == tasks.SUBMITTING
    assert events and "Uploading" in events[0]["text"]
    task.cancel()  # while "uploading": the job is cancelled as soon as it exists
    poll_until(task, tasks.ENDED, timeout=60)
    assert client.submitted.is_set() and task.state == tasks.CANCELLED
    assert os.listdir(tmp_path / "root" / tasks.JOBS_FOLDER) == []


def test_a_remote_job_through_pscv_serve(tmp_path):
    pytest.importorskip("uvicorn")
    from test_server import TOKEN, Server

    server = Server(tmp_path / "service").start()
    try:
        app, volume, nodes = scene_with_points()
        client = environment.jobClient(environment.Connection(serverUrl=server.url, token=TOKEN))
        task = segment_task(app, volume, nodes, client, tmp_path).start()
        longest_poll = poll_until(task, (tasks.READY, tasks.FAILED))
        assert task.state == tasks.READY, task.logText()
        assert longest_poll < 0.5
        node = task.finish()
        assert results.segmentNames(node) == ["liver", "kidney"]
        assert client.list_jobs() == []  # the finished job was removed from the service
    finally:
        server.stop()


def test_stale_work_folders_of_earlier_sessions_are_removed(tmp_path):
    root = tmp_path / "root"
    old = tasks.newWorkDirectory(root, "segment")
    (root / tasks.JOBS_FOLDER / "abc").mkdir(parents=True)
    (root / tasks.LOGS_FOLDER).mkdir()
    fresh = tasks.newWorkDirectory(root, "predict")
    long_ago = time.time() - 3 * 24 * 3600
    for path in (old, root / tasks.JOBS_FOLDER / "abc"):
        os.utime(path, (long_ago, long_ago))
    removed = tasks.removeStaleWorkDirectories(root)
    assert sorted(removed) == sorted([old, str(root / tasks.JOBS_FOLDER / "abc")])
    assert os.path.isdir(fresh) and os.path.isdir(root / tasks.LOGS_FOLDER)


def test_predict_finetune_and_train_jobs_are_made_from_the_scene(tmp_path):
    """The other kinds the module starts, through the same path: a model from a segment job is applied
    (predict) and fine-tuned; a dataset folder made with "Add volume to dataset" is trained on, the model
    landing beside it."""
    app, volume, nodes = scene_with_points()
    client = local_client(tmp_path)
    first = segment_task(app, volume, nodes, client, tmp_path, train_model=True).start()
    poll_until(first, (tasks.READY, tasks.FAILED))
    segmentation = first.finish()
    model = first.modelDirectory

    with pytest.raises(results.SegmentsExistError):
        tasks.createTask(app.scene, "finetune", client, tmp_path / "root", volume, nodes, segmentationNode=segmentation,
                         modelDirectory=model)
    for kind in ("predict", "finetune"):
        points = nodes if kind == "finetune" else None
        settings = {"device": "cpu"} if kind == "predict" else {**TINY_SETTINGS}
        task = tasks.createTask(app.scene, kind, client, tmp_path / "root", volume, points,
                                segmentationNode=segmentation, replace=True, modelDirectory=model, settings=settings)
        poll_until(task.start(), (tasks.READY, tasks.FAILED))
        assert task.state == tasks.READY, task.logText()
        assert task.finish() is segmentation
        assert results.segmentNames(segmentation) == ["liver", "kidney"]
        task.removeWorkDirectory()

    dataset = tmp_path / "dataset"
    cohort.addCase(dataset, volume, nodes)
    train = tasks.createTask(app.scene, "train", client, tmp_path / "root", datasetDirectory=dataset,
                             settings={**TINY_SETTINGS, "method": "pce"})
    poll_until(train.start(), (tasks.READY, tasks.FAILED))
    assert train.state == tasks.READY, train.logText()
    assert train.finish() is None and train.state == tasks.FINISHED
    assert os.path.isfile(os.path.join(train.modelDirectory, "model.json"))
    assert os.path.dirname(train.modelDirectory) == str(tmp_path)
    assert not os.path.exists(train.workDirectory)
    with pytest.raises(ValueError, match="model folder"):
        tasks.createTask(app.scene, "predict", client, tmp_path / "root", volume, modelDirectory=tmp_path / "none")


def test_the_interactive_loop_from_the_scene_strokes_suggestions_and_refine(tmp_path):
    """Round 1 keeps a model and suggests places to click; round 2 adds a painted segmentation as strokes and
    refines round 1's model; the suggestions land in a point list of their own."""
    from pscv.data.classes import ClassInfo
    from pscv.data.segmentations import write_segmentation
    from pscv.data.volumes import Volume
    from PSCVSegmentLib import interactive

    app, volume, nodes = scene_with_points()
    client = local_client(tmp_path)
    first = tasks.createTask(app.scene, "segment", client, tmp_path / "root", volume, nodes,
                             settings={**TINY_SETTINGS, "train_model": True}, suggest=2).start()
    poll_until(first, (tasks.READY, tasks.FAILED))
    assert first.state == tasks.READY, first.logText()
    segmentation = first.finish()
    assert first.suggestionsNode.GetName() == interactive.SUGGESTIONS_NAME
    assert first.suggestionsNode.GetNumberOfControlPoints() == 2
    assert os.path.isfile(os.path.join(first.modelDirectory, "model.json"))

    painted = np.zeros((4, 24, 24), np.uint8)
    painted[:, 6:9, 5:10] = 1  # a stroke inside the liver on every slice
    classes = [ClassInfo("background", 0, (0, 0, 0)), ClassInfo("liver", 1, (200, 100, 0)),
               ClassInfo("kidney", 2, (0, 100, 200))]
    path = tmp_path / "painted.seg.nrrd"
    grid = Volume(painted.astype(np.float32), spacing=(1.0, 1.0, 3.0), direction=np.diag([-1.0, -1.0, 1.0]))  # RAS->LPS
    write_segmentation(path, painted, grid, classes[:2])
    strokes = results.importResult(app.scene, str(path), volume)
    second = tasks.createTask(app.scene, "segment", client, tmp_path / "root", volume, nodes,
                              segmentationNode=segmentation, replace=True, settings=TINY_SETTINGS,
                              strokesSegmentation=strokes, refineModel=first.modelDirectory).start()
    poll_until(second, (tasks.READY, tasks.FAILED))
    assert second.state == tasks.READY, second.logText()
    assert second.finish() is segmentation
    assert second.modelDirectory and second.suggestionsNode is None
    refined = json.loads(open(os.path.join(second.modelDirectory, "model.json")).read())
    assert refined["single_case"]["rounds"] == 2
