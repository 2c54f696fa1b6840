"""A job in the background, followed from the GUI thread without ever blocking it.

A ``Task`` submits its job (a local upload is a copy, a remote one an HTTP upload), waits for it, downloads
its results and removes the job's folder, all in a thread of its own; the GUI thread only calls ``poll()``
(new events, never waits) and, when ``state`` is READY, ``finish()``, which imports the result into the
scene (MRML is touched only there, on the calling thread).

What it guarantees (issue 11):
- the result is imported into the scene the job was started in, or not at all: closing the scene while the
  job runs cancels it and the result is dropped (state ORPHANED);
- nothing is left behind: the job folder (local or on the server) and the task's work folder are removed
  when the task ends, whatever the outcome; a model the user may still save is kept until the caller
  releases it (``removeWorkDirectory``);
- the worker's own output (its events and, for a local worker, its stderr ``worker.log``) is kept in the
  task's log, for failed and successful jobs alike, and saved by ``LogStore``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path

from . import engine

SUBMITTING, RUNNING, READY, FINISHED, FAILED, CANCELLED, ORPHANED = (
    "submitting", "running", "ready", "finished", "failed", "cancelled", "orphaned")
ENDED = (FINISHED, FAILED, CANCELLED, ORPHANED)
RESULT_FILE = "result.seg.nrrd"
MODEL_FOLDER = "model"
SUGGESTIONS_FILE = "suggestions.mrk.json"


class SceneClosedError(RuntimeError):
    """The scene the job was started for was closed; its result was not imported."""


class Task:
    """One job: ``kind`` is segment, predict, finetune or train; ``submit`` the keyword arguments of
    ``JobClient.submit`` (files written into ``workDirectory/inputs``)."""

    def __init__(self, kind, client, submit, workDirectory, scene=None, volumeNode=None, classes=None,
                 segmentationNode=None, replace=False, modelDestination=None, description=""):
        if kind not in engine.KINDS:
            raise ValueError(f"Unknown job kind '{kind}'.")
        self.kind = kind
        self.client = client
        self.submitArguments = dict(submit)
        self.workDirectory = str(workDirectory)
        self.scene = scene
        self.volumeNode = volumeNode
        self.classes = classes
        self.segmentationNode = segmentationNode
        self.replace = replace
        self.modelDestination = str(modelDestination) if modelDestination else None
        self.description = description or kind
        self.job = None
        self.state = SUBMITTING
        self.message = ""
        self.resultPath = None
        self.suggestionsPath = None
        self.suggestionsNode = None
        self.modelDirectory = None
        self.startTime = time.time()
        self.endTime = None
        self.events = []
        self._log = [f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.description}",
                     f"settings: {json.dumps(self.submitArguments.get('settings', {}))}",
                     f"runs on: {client.server_url if client.remote else (client.python or 'this Python')}"]
        self._lock = threading.Lock()
        self._taskEvents = queue.Queue()
        self._cancelRequested = threading.Event()
        self._threadDone = threading.Event()
        self._outcome = None  # (state, message) set by the thread
        self._workerLogOffset = 0
        self._sceneObserver = None
        self._sceneClosed = False
        self._thread = None

    # Life cycle -----------------------------------------------------------------------------------------

    def start(self):
        if self.scene is not None:
            import slicer

            self._sceneObserver = self.scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, self._onSceneClose)
        self._thread = threading.Thread(target=self._run, name=f"PSCVSegment-{self.kind}", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """Not yet ended, nor waiting to be imported."""
        return self.state in (SUBMITTING, RUNNING)

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def orphaned(self) -> bool:
        return self.state == ORPHANED or self._sceneClosed

    def cancel(self):
        """Ask the job to stop; returns at once (a remote cancel is an HTTP call, made in a thread)."""
        self._cancelRequested.set()
        job = self.job
        if job is not None and not job.finished:
            threading.Thread(target=self._cancelJob, args=(job,), daemon=True).start()

    @staticmethod
    def _cancelJob(job):
        try:
            job.cancel()
        except Exception:  # the job ends anyway (or the server is gone: its follower gives up)
            pass

    def _onSceneClose(self, caller=None, event=None):
        self._sceneClosed = True
        self._addLog("The scene was closed: the job is cancelled and its result will not be imported.")
        self.cancel()

    def wait(self, timeout=None) -> bool:
        """Block until the background part is over (for scripts and tests; the GUI polls instead)."""
        return self._threadDone.wait(timeout)

    # The background thread ------------------------------------------------------------------------------

    def _phase(self, stage, text):
        self._taskEvents.put({"event": "progress", "stage": stage, "step": None, "total": None, "text": text,
                              "time": round(time.time(), 3)})

    def _run(self):
        job = None
        try:
            self._phase("submit", "Uploading the job to the server..." if self.client.remote else "Starting...")
            job = self.client.submit(self.kind, **self.submitArguments)
            self.job = job
            if self._cancelRequested.is_set():
                self._cancelJob(job)
            shutil.rmtree(os.path.join(self.workDirectory, "inputs"), ignore_errors=True)  # the job has copies
            job.wait()
            self._captureWorkerLog(job)
            if job.state == "done" and not self.orphaned:
                self._download(job)
                outcome = (READY, "")
            elif job.state == "cancelled" or self._cancelRequested.is_set() and job.state != "done":
                outcome = (CANCELLED, job.message or "cancelled")
            elif job.state == "done":
                outcome = (ORPHANED, "the scene was closed while the job ran; its result was not imported")
            else:
                outcome = (FAILED, self._errorMessage(job))
        except Exception as error:  # upload refused, server unreachable, download failed, ...
            outcome = (FAILED, str(error) or type(error).__name__)
            self._addLog(traceback.format_exc().rstrip())
            if job is not None and not job.finished:
                self._cancelJob(job)
        finally:
            self._removeJob(job)
            self._outcome = outcome if "outcome" in locals() else (FAILED, "the job's thread stopped")
            self._threadDone.set()

    @staticmethod
    def _errorMessage(job):
        return job.message or f"the job ended with state '{job.state}'"

    def _download(self, job):
        outputs = getattr(job, "outputs", {}) or {}
        if "segmentation" in outputs:
            self._phase("download", "Downloading the result..." if self.client.remote else "Copying the result...")
            self.resultPath = str(job.download("segmentation", os.path.join(self.workDirectory, RESULT_FILE)))
        if "model" in outputs:
            destination = self.modelDestination or os.path.join(self.workDirectory, MODEL_FOLDER)
            self.modelDirectory = str(job.download("model", destination))
        if "suggestions" in outputs:
            self.suggestionsPath = str(job.download("suggestions", os.path.join(self.workDirectory,
                                                                                SUGGESTIONS_FILE)))

    def _captureWorkerLog(self, job):
        folder = getattr(job, "folder", None)
        if folder is None:
            return
        self._tailWorkerLog(folder)

    def _tailWorkerLog(self, folder):
        path = Path(folder) / engine.LOG_FILE
        with self._lock:
            try:
                with open(path, "rb") as stream:
                    stream.seek(self._workerLogOffset)
                    data = stream.read()
            except OSError:
                return
            self._workerLogOffset += len(data)
        text = data.decode("utf-8", "replace").rstrip()
        if text:
            self._addLog("\n".join(f"[worker] {line}" for line in text.splitlines()))

    def _removeJob(self, job):
        if job is None:
            return
        try:
            if job.finished:
                job.delete()
        except Exception as error:
            self._addLog(f"Could not remove the finished job: {error}")

    # The GUI thread -------------------------------------------------------------------------------------

    def poll(self) -> list:
        """The events since the last call (the job's, and the task's own upload/download stages); never blocks.
        When the background part is over, the state moves on (READY, FAILED, CANCELLED, ORPHANED)."""
        events = []
        while True:
            try:
                events.append(self._taskEvents.get_nowait())
            except queue.Empty:
                break
        job = self.job
        if job is not None:
            events.extend(job.poll())
            if self.state == SUBMITTING:
                self.state = RUNNING
            folder = getattr(job, "folder", None)
            if folder is not None and not self._threadDone.is_set() and os.path.isdir(folder):
                self._tailWorkerLog(folder)
        for event in events:
            self.events.append(event)
            self._addLog(_eventLine(event))
        if self._threadDone.is_set() and self.state in (SUBMITTING, RUNNING):
            state, message = self._outcome
            if state == READY and self.orphaned:
                state, message = ORPHANED, "the scene was closed while the job ran; its result was not imported"
            self._settle(state, message)
        return events

    def _settle(self, state, message=""):
        self.state = state
        self.message = message
        if state in ENDED:
            self.endTime = time.time()
            self._addLog(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {state}" + (f": {message}" if message else ""))
            self._stopWatchingScene()
            if state != FINISHED:
                self.removeWorkDirectory()

    def finish(self, replace=None):
        """Import the downloaded result (state READY) into the scene; returns the segmentation node, or None for a
        job without a segmentation (train). SegmentsExistError leaves the task READY (ask, then call again
        with replace=True); any other failure ends it FAILED."""
        from . import results

        if self.state != READY:
            raise RuntimeError(f"The {self.kind} job is {self.state}; there is no result to import.")
        if self.orphaned or self.volumeNode is not None and self.volumeNode.GetScene() is not self.scene:
            self._settle(ORPHANED, "the scene was closed while the job ran; its result was not imported")
            raise SceneClosedError(self.message)
        node = None
        if self.resultPath is not None:
            try:
                node = results.importResult(self.scene, self.resultPath, self.volumeNode, self.segmentationNode,
                                            self.classes, self.replace if replace is None else replace)
            except results.SegmentsExistError:
                raise
            except Exception as error:
                self._settle(FAILED, f"the result could not be imported: {error}")
                raise
        self.segmentationNode = node or self.segmentationNode
        if self.suggestionsPath is not None:
            from . import interactive

            self.suggestionsNode = interactive.loadSuggestions(self.scene, self.suggestionsPath)
        self._settle(FINISHED)
        self.removeWorkDirectory(keepModel=True)
        return node

    def discard(self, message="the result was not imported"):
        """Drop a downloaded result (state READY) without importing it, e.g. when the user declines to replace."""
        if self.state == READY:
            self._settle(CANCELLED, message)

    def removeWorkDirectory(self, keepModel=False):
        """Remove the task's work folder; with ``keepModel`` its model folder stays (the caller removes it later)."""
        if not os.path.isdir(self.workDirectory):
            return
        if keepModel and self.modelDirectory and Path(self.workDirectory) in Path(self.modelDirectory).parents:
            for entry in os.listdir(self.workDirectory):
                if entry != MODEL_FOLDER:
                    path = os.path.join(self.workDirectory, entry)
                    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _unlink(path)
        else:
            shutil.rmtree(self.workDirectory, ignore_errors=True)
            if self.modelDirectory and not os.path.isdir(self.modelDirectory):
                self.modelDirectory = None

    def _stopWatchingScene(self):
        if self._sceneObserver is not None and self.scene is not None:
            self.scene.RemoveObserver(self._sceneObserver)
            self._sceneObserver = None

    # The log ----------------------------------------------------------------------------------------------

    def _addLog(self, text):
        with self._lock:
            self._log.append(text)

    def logText(self) -> str:
        with self._lock:
            return "\n".join(self._log)

    def errorMessage(self) -> str:
        return self.message


def createTask(scene, kind, client, root, volumeNode=None, pointListNodes=None, classes=None, segmentationNode=None,
               settings=None, modelDirectory=None, replace=False, datasetDirectory=None, strokesSegmentation=None,
               suggest=0, refineModel=None) -> Task:
    """A Task (not started) with its inputs written into a new work folder under ``root``.

    kind "segment" (train on the points, segment the volume), "predict" (apply ``modelDirectory``),
    "finetune" (train ``modelDirectory`` further on the points) or "train" (one model on ``datasetDirectory``,
    saved beside it). A segment job may also take painted ``strokesSegmentation``, ask for ``suggest`` places to
    click next, and refine ``refineModel`` (the model a segment job kept from this volume); NotImplementedError
    where the engine lacks them (``interactive.engineFeatures``).
    """
    from . import cohort, interactive, pointlists, results, volumes

    if kind not in ("segment", "predict", "finetune", "train"):
        raise ValueError(f"Unknown job kind '{kind}'.")
    if kind in ("predict", "finetune") and not (modelDirectory and os.path.isdir(modelDirectory)):
        raise ValueError("Choose a model folder first (Model section).")
    if kind in ("segment", "finetune") and not pointListNodes:
        raise ValueError("Add classes and place points first.")
    if kind == "train" and not (datasetDirectory and os.path.isdir(datasetDirectory)):
        raise ValueError("Choose a dataset folder first (Cohort section).")
    if kind != "train" and volumeNode is None:
        raise ValueError("Select an input volume.")
    if pointListNodes is not None and classes is None:
        classes = pointlists.classesFromPointLists(pointListNodes)
    if segmentationNode is not None and classes is not None and not replace:
        existing = results.segmentsToReplace(segmentationNode, classes)
        if existing:
            raise results.SegmentsExistError(segmentationNode, existing)
    workDirectory = newWorkDirectory(root, kind)
    try:
        submit = {"settings": dict(settings or engine.job_settings())}
        if kind == "train":
            submit["dataset"] = str(datasetDirectory)
            description = f"train a model on {datasetDirectory}"
        else:
            submit.update(volumes.writeJobInputs(os.path.join(workDirectory, "inputs"), volumeNode,
                                                 pointListNodes if kind != "predict" else None, classes))
            description = f"{kind} '{volumeNode.GetName()}'"
        if kind in ("predict", "finetune"):
            submit["model"] = str(modelDirectory)
        if strokesSegmentation is not None or suggest or refineModel:
            strokesFile = None
            if strokesSegmentation is not None:
                strokesFile = interactive.writeStrokes(strokesSegmentation, classes,
                                                       os.path.join(workDirectory, "inputs", "strokes.seg.nrrd"))
            extras, extraSettings = interactive.submitExtras(interactive.engineFeatures(), refineModel, strokesFile,
                                                             suggest)
            submit.update(extras)
            submit["settings"].update(extraSettings)
    except Exception:
        shutil.rmtree(workDirectory, ignore_errors=True)
        raise
    modelDestination = cohort.trainedModelDirectory(datasetDirectory) if kind == "train" else None
    return Task(kind, client, submit, workDirectory, scene=scene, volumeNode=volumeNode, classes=classes,
                segmentationNode=segmentationNode, replace=replace, modelDestination=modelDestination,
                description=description)


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _eventLine(event) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time") or time.time()))
    if event.get("text"):
        return f"{stamp} {event['text']}"
    _, text = engine.describe_event(event)
    return f"{stamp} {text}"


def describe(event):
    """(fraction 0..1 or None, text) of an event, the task's own stages included."""
    if event.get("text"):
        return None, event["text"]
    return engine.describe_event(event)


class LogStore:
    """Keeps the logs of the last ``keep`` jobs as files in ``directory`` (newest last)."""

    def __init__(self, directory, keep=20):
        self.directory = Path(directory)
        self.keep = keep

    def save(self, task) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(task.startTime))
        path = self.directory / f"{stamp}-{task.kind}-{task.state}.log"
        number = 1
        while path.exists():
            number += 1
            path = self.directory / f"{stamp}-{task.kind}-{task.state}-{number}.log"
        path.write_text(task.logText() + "\n", encoding="utf-8")
        self.prune()
        return str(path)

    def files(self) -> list:
        if not self.directory.is_dir():
            return []
        files = [path for path in self.directory.glob("*.log") if path.is_file()]
        return sorted(files, key=lambda path: (path.stat().st_mtime, path.name))

    def prune(self):
        files = self.files()
        for path in files[:max(0, len(files) - self.keep)]:
            _unlink(path)


def newWorkDirectory(root, kind) -> str:
    os.makedirs(root, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{kind}-", dir=str(root))


LOGS_FOLDER, JOBS_FOLDER = "logs", "jobs"


def removeStaleWorkDirectories(root, maxAgeSeconds=24 * 3600, now=None) -> list:
    """Remove work folders and local job folders under ``root`` left by earlier sessions (a crash, a killed
    Slicer), older than ``maxAgeSeconds``; the logs are kept. Returns what was removed."""
    removed = []
    now = time.time() if now is None else now
    if not os.path.isdir(root):
        return removed
    candidates = [os.path.join(root, entry) for entry in os.listdir(root) if entry not in (LOGS_FOLDER, JOBS_FOLDER)]
    jobs = os.path.join(root, JOBS_FOLDER)
    if os.path.isdir(jobs):
        candidates += [os.path.join(jobs, entry) for entry in os.listdir(jobs)]
    for path in candidates:
        if not os.path.isdir(path):
            continue
        try:
            age = now - os.path.getmtime(path)
        except OSError:
            continue
        if age > maxAgeSeconds:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
