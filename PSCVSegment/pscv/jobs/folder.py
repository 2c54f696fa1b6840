"""The job-folder format: job.json (what to do), the worker's events and state, its results; no torch.

docs/ENGINE_API.md (Jobs) describes the folder and its files; the names are the constants below. This
module writes, reads and checks job folders and tells a job's state; `pscv.jobs.runner` runs one,
`pscv.jobs.worker` wraps that in a process, `pscv.jobs.staging` puts the inputs in.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .. import PSCVError
from ..base.atomic import remove_quietly, write_text_atomic
from ..base.jsonfile import read_json
from ..data.formats import SEGMENTATION_SUFFIXES

VERSION = 1
JOB_FILE, EVENTS_FILE, STATE_FILE, CANCEL_FILE = "job.json", "events.jsonl", "state.json", "cancel"
PID_FILE, LOG_FILE, META_FILE = "worker.pid", "worker.log", "meta.json"  # meta.json: the service's record
LOCK_FILE = "worker.lock"  # locked by the worker running the job, for as long as it runs
RESERVED = {JOB_FILE, EVENTS_FILE, STATE_FILE, CANCEL_FILE, PID_FILE, LOG_FILE, META_FILE, LOCK_FILE}
SAFE_ID = re.compile(r"[0-9a-f]{32}")  # job ids are uuid4 hex, made by whoever creates the folder
KINDS = ("segment", "train", "predict", "finetune")
FINAL_STATES = ("done", "error", "cancelled")  # also the names of the events that end a job
RESULTS = ("segmentation", "model", "suggestions")  # the outputs a client can download

# Inputs each kind needs, and may have.
REQUIRED_INPUTS = {
    "segment": ("image", "points", "classes"),
    "train": ("dataset",),
    "predict": ("image", "model"),
    "finetune": ("image", "points", "model"),
}
OPTIONAL_INPUTS = {"segment": ("strokes", "model"), "train": ("classes",), "predict": ("classes",),
                   "finetune": ("classes",)}
# Outputs each kind writes unless job.json names its own (a subset of these).
DEFAULT_OUTPUTS = {
    "segment": {"segmentation": "result.seg.nrrd", "model": "result-model", "suggestions": "suggestions.mrk.json"},
    "train": {"model": "result-model"},
    "predict": {"segmentation": "result.seg.nrrd"},
    "finetune": {"segmentation": "result.seg.nrrd", "model": "result-model"},
}


PREDICT_SETTINGS = ("device", "batch_size")  # what a predict job takes; the other kinds take TrainSettings


def check_job_settings(kind: str, settings, where: str) -> dict:
    """A job's settings checked against the schemas of pscv.learn.settings (a segment job also takes the
    single-case mode's, a predict job only device and batch_size); PSCVError naming the setting, what it got
    and what it takes."""
    from ..learn.settings import check_case_settings, check_setting, check_settings

    if kind == "segment":  # the random walker's settings, and the network's
        return check_case_settings(settings, where)
    if kind != "predict":
        return check_settings(settings, where)
    if not isinstance(settings, dict):
        return check_settings(settings, where)  # the same message for what is not an object
    unknown = sorted(set(settings) - set(PREDICT_SETTINGS))
    if unknown:
        raise PSCVError(f"{where}: a predict job takes only the settings {', '.join(PREDICT_SETTINGS)}, not "
                        f"{', '.join(map(str, unknown))}")
    return {key: check_setting(key, value, where) for key, value in settings.items()}


@dataclass
class Job:
    folder: Path
    kind: str
    inputs: dict  # name -> absolute Path inside the folder ("points": list of Paths)
    settings: dict
    outputs: dict  # name -> absolute Path inside the folder


def write_job(folder, kind: str, inputs: dict, settings: dict | None = None, outputs: dict | None = None) -> Path:
    """Write `folder/job.json` (atomically) and check it as a worker would; returns its path."""
    folder = Path(folder)
    document = {"version": VERSION, "kind": kind, "inputs": inputs, "settings": settings or {},
                "outputs": outputs or DEFAULT_OUTPUTS.get(kind, {})}
    path = folder / JOB_FILE
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")
    read_job(folder)
    return path


def inside(folder: Path, value, where: str) -> Path:
    """`folder / value` for a relative path that stays inside `folder` (symbolic links resolved)."""
    source = folder / JOB_FILE
    if not isinstance(value, str) or not value.strip():
        raise PSCVError(f"{source}: {where} must be a path relative to the job folder, got {value!r}")
    relative = Path(value)
    if relative.is_absolute() or ".." in relative.parts or relative.drive:
        raise PSCVError(f"{source}: {where} {value!r} leaves the job folder; give a path inside it, "
                        "e.g. \"image.nrrd\"")
    path = folder / relative
    root = folder.resolve()
    if path.resolve() != root and root not in path.resolve().parents:
        raise PSCVError(f"{source}: {where} {value!r} points outside the job folder (through a link); "
                        "copy the file into the job folder")
    if relative.parts[0] in RESERVED:
        raise PSCVError(f"{source}: {where} {value!r} is one of the job folder's own files "
                        f"({', '.join(sorted(RESERVED))}); use another name")
    return path


def read_job(folder) -> Job:
    """Read and check `folder/job.json`: PSCVError naming the file, the item and the fix."""
    folder = Path(folder)
    source = folder / JOB_FILE
    if not folder.is_dir():
        raise PSCVError(f"{folder}: no such job folder")
    if not source.exists():
        raise PSCVError(f"{source}: missing; a job folder needs job.json saying what to do "
                        "(see docs/ENGINE_API.md, Jobs)")
    document = read_json(source, "job file", fix="; write the job again")
    if not isinstance(document, dict):
        raise PSCVError(f"{source}: expected a JSON object with \"kind\", \"inputs\", \"settings\", \"outputs\"")
    if document.get("version", VERSION) != VERSION:
        raise PSCVError(f"{source}: job format version {document.get('version')!r}; this pscv reads version "
                        f"{VERSION}: update pscv on this machine")
    kind = document.get("kind")
    if kind not in KINDS:
        raise PSCVError(f"{source}: unknown job kind {kind!r}; use one of {', '.join(KINDS)}")
    inputs_doc, settings, outputs_doc = (document.get(key, {}) for key in ("inputs", "settings", "outputs"))
    for key, value in (("inputs", inputs_doc), ("settings", settings), ("outputs", outputs_doc)):
        if not isinstance(value, dict):
            raise PSCVError(f"{source}: \"{key}\" must be a JSON object, got {type(value).__name__}")
    check_job_settings(kind, settings, f"{source}: settings")
    return Job(folder, kind, _read_inputs(folder, kind, inputs_doc), dict(settings),
               _read_outputs(folder, kind, outputs_doc))


def _read_inputs(folder: Path, kind: str, document: dict) -> dict:
    source = folder / JOB_FILE
    allowed = REQUIRED_INPUTS[kind] + OPTIONAL_INPUTS[kind]
    unknown = sorted(set(document) - set(allowed))
    if unknown:
        raise PSCVError(f"{source}: a {kind} job takes no input(s) {', '.join(unknown)} "
                        f"(it takes {', '.join(allowed)})")
    missing = [name for name in REQUIRED_INPUTS[kind] if not document.get(name)]
    if missing:
        raise PSCVError(f"{source}: a {kind} job needs the input(s) {', '.join(missing)}")
    inputs = {}
    for name, value in document.items():
        if name in ("points", "strokes"):
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not values:
                raise PSCVError(f"{source}: inputs.{name} must be a list of files")
            inputs[name] = [inside(folder, v, f"inputs.{name}[{n}]") for n, v in enumerate(values)]
        else:
            inputs[name] = inside(folder, value, f"inputs.{name}")
    for name, value in inputs.items():
        for path in value if isinstance(value, list) else [value]:
            if not path.exists():
                raise PSCVError(f"{source}: input {name} {path.relative_to(folder).as_posix()!r} is missing "
                                "from the job folder; copy it there or fix job.json")
    return inputs


def _read_outputs(folder: Path, kind: str, document: dict) -> dict:
    source = folder / JOB_FILE
    document = document or DEFAULT_OUTPUTS[kind]
    unknown = sorted(set(document) - set(DEFAULT_OUTPUTS[kind]))
    if unknown:
        raise PSCVError(f"{source}: a {kind} job writes no output(s) {', '.join(unknown)} "
                        f"(it writes {', '.join(DEFAULT_OUTPUTS[kind])})")
    outputs = {name: inside(folder, value, f"outputs.{name}") for name, value in document.items()}
    segmentation = outputs.get("segmentation")
    if segmentation is not None and not segmentation.name.lower().endswith(SEGMENTATION_SUFFIXES):
        raise PSCVError(f"{source}: outputs.segmentation {segmentation.name!r}: use a name ending in "
                        f"{', '.join(SEGMENTATION_SUFFIXES)}")
    return outputs


def read_events(folder, offset: int = 0) -> tuple[list[dict], int]:
    """The events in `events.jsonl` from byte `offset` on, and the offset after the last whole line."""
    path = Path(folder) / EVENTS_FILE
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            data = stream.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a line still being written is left for the next call
    events = []
    for line in data[:end].splitlines():
        try:
            event = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(event, dict):
            events.append(event)
    return events, offset + end


def append_event(folder, event: dict) -> None:
    """Append one event to `events.jsonl` (used by whoever ends a job its worker could not end)."""
    with open(Path(folder) / EVENTS_FILE, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(event) + "\n")


def write_state(folder, state: str, message: str | None = None, outputs: dict | None = None) -> None:
    document = {"state": state, "message": message, "outputs": outputs or {}, "time": round(time.time(), 3)}
    write_text_atomic(Path(folder) / STATE_FILE, json.dumps(document) + "\n")


def worker_alive(folder) -> bool:
    """Whether the worker named in `worker.pid` still runs (a zombie, or another program, does not count)."""
    try:
        pid = int((Path(folder) / PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return False
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError, OSError):
            return False
        return True
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        command = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "worker" in command and Path(folder).name in command


def lock_job(folder):
    """Lock the job folder for this process (a lock the system drops when the process ends, however it ends);
    returns the open lock file to keep, or None when another process holds the lock. OSError: the folder
    cannot be written."""
    handle = open(Path(folder) / LOCK_FILE, "a+b")
    try:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        handle.close()
        return None
    return handle


def read_state_file(folder) -> dict | None:
    """state.json of an ended job, or None when there is none (yet)."""
    try:
        state = json.loads((Path(folder) / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return state if isinstance(state, dict) and state.get("state") in FINAL_STATES else None


def read_state(folder) -> dict:
    """{"state", "message", "outputs"} of a job folder, whoever wrote it and whether or not it ended well.

    `queued`: no worker ever started; `running`: its worker lives; a folder without state.json whose
    worker is gone is a failed job (`error`), unless its events already say how it ended.
    """
    folder = Path(folder)
    state = read_state_file(folder)
    if state is not None:
        return state
    if not (folder / PID_FILE).exists():
        return {"state": "queued", "message": None, "outputs": {}}
    if worker_alive(folder):
        return {"state": "running", "message": None, "outputs": {}}
    events, _ = read_events(folder)
    for event in reversed(events):
        if event.get("event") in FINAL_STATES:
            return {"state": event["event"], "message": event.get("message"), "outputs": event.get("outputs", {})}
    return {"state": "error", "outputs": {},
            "message": "the worker stopped without finishing (killed, crashed, or the machine restarted); "
                       "run the job again"}


def remove_results(folder, pid: int | None = None) -> None:
    """Remove a job's results and the temporary files a worker (`pid`, or any) left while writing them."""
    folder = Path(folder)
    pattern = f".*.partial-{pid}*" if pid else ".*.partial-*"
    for path in folder.rglob(pattern):
        remove_path(path)
    try:
        job = read_job(folder)
    except PSCVError:
        return
    for path in job.outputs.values():
        remove_path(path)


def remove_path(path: Path) -> None:
    """Remove a result (file or folder) if it is there; a disk that refuses (read-only) raises nothing."""
    remove_quietly(path)
