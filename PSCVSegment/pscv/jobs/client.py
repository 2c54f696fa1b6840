"""The one client for jobs: a worker process on this machine, or a remote `pscv serve`, with the same calls.

docs/ENGINE_API.md (Jobs) describes the calls and the events. A local job's events come from the worker
this client started (`pscv.jobs.processes.WorkerProcess`) or, for a job found again, from its folder
(`EventLog`); a remote job's from the service's event stream.

Imports no torch (3D Slicer's own process can use it); the remote client needs only the standard library.
In 3D Slicer pass `python=shutil.which("PythonSlicer")`: `sys.executable` there is the application.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from .. import PSCVError
from ..base.atomic import atomic_path
from .folder import (
    CANCEL_FILE,
    FINAL_STATES,
    JOB_FILE,
    KINDS,
    RESULTS,
    SAFE_ID,
    inside,
    read_events,
    read_state,
    write_job,
)
from .processes import WorkerProcess
from .staging import extract_zip, stage_inputs, upload_files

STREAM_TIMEOUT = 60.0  # the server sends a keep-alive every few seconds; silence this long means it is gone
RECONNECT_TRIES = 8  # reconnections to a remote service (backing off up to 10 s) before a job is given up


class ServiceUnreachable(PSCVError):
    """The remote service did not answer (network, or not running): worth trying again."""


def default_jobs_dir() -> Path:
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"pscv-jobs-{user}"


class JobClient:
    """Runs jobs in local worker processes (`server_url` None) or on a `pscv serve` service."""

    def __init__(self, server_url: str | None = None, token: str | None = None, python: str | None = None,
                 jobs_dir=None, timeout: float = 60.0, env: dict | None = None, base_env: dict | None = None):
        self.server_url = server_url.rstrip("/") if server_url else None
        self.token = token if token is not None else os.environ.get("PSCV_TOKEN") or None
        self.python = python
        # Local workers start from `base_env` (default: this process's environment) plus the extra variables
        # `env`, e.g. {"CUDA_VISIBLE_DEVICES": "-1"} to keep off the GPU. 3D Slicer passes its startup
        # environment as `base_env` for a Python that is not its own, so that Slicer's PYTHONHOME,
        # PYTHONPATH and library paths do not reach it.
        if env or base_env is not None:
            self.env = {**(os.environ if base_env is None else base_env), **(env or {})}
        else:
            self.env = None
        self.jobs_dir = Path(jobs_dir) if jobs_dir else default_jobs_dir()
        self.timeout = timeout
        self._limit = None

    @property
    def remote(self) -> bool:
        return self.server_url is not None

    # Jobs --------------------------------------------------------------------------------------------
    def submit(self, kind: str, image=None, points=None, classes=None, model=None, dataset=None,
               settings: dict | None = None, strokes=None) -> Job:
        """Start a job (segment, train, predict, finetune) on the given files and settings."""
        if kind not in KINDS:
            raise PSCVError(f"unknown job kind {kind!r}; use one of {', '.join(KINDS)}")
        settings = dict(settings or {})
        if self.remote:
            return self._submit_remote(kind, image, points, classes, model, dataset, settings, strokes)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        folder = self.jobs_dir / uuid.uuid4().hex
        folder.mkdir()
        try:
            inputs = stage_inputs(folder, image, points, classes, model, dataset, strokes)
            write_job(folder, kind, inputs, settings)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return LocalJob(folder, WorkerProcess(folder, self.python, self.env))

    def job(self, job_id: str) -> Job:
        """A job submitted earlier (by this or another client), to follow, cancel or download again."""
        if self.remote:
            info = self._json("GET", f"/jobs/{urllib.parse.quote(job_id, safe='')}")
            return RemoteJob(self, info["id"], info["state"])
        folder = self.jobs_dir / job_id
        if not SAFE_ID.fullmatch(job_id) or not (folder / JOB_FILE).is_file():
            raise PSCVError(f"no job {job_id!r} in {self.jobs_dir}")
        return LocalJob(folder, EventLog(folder))

    def list_jobs(self) -> list[dict]:
        """[{"id", "kind", "state", "message", "created"}], oldest first."""
        if self.remote:
            return self._json("GET", "/jobs")["jobs"]
        found = []
        for folder in sorted(self.jobs_dir.glob("*/" + JOB_FILE), key=lambda p: p.stat().st_mtime):
            state = read_state(folder.parent)
            try:
                kind = json.loads(folder.read_text()).get("kind")
            except (OSError, ValueError):
                kind = None
            found.append({"id": folder.parent.name, "kind": kind, "state": state["state"],
                          "message": state.get("message"), "created": folder.stat().st_mtime})
        return found

    # HTTP --------------------------------------------------------------------------------------------
    def _open(self, method: str, path: str, body=None, headers=None, timeout=None):
        """An HTTP response from the service (the caller closes it); PSCVError for what went wrong."""
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.server_url + path, data=body, headers=headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as error:
            raise PSCVError(self._http_error(error, method, path)) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ServiceUnreachable(f"cannot reach the pscv service at {self.server_url} ({reason}); is "
                                     "`pscv serve` running there, and is the address right?") from None

    def _http_error(self, error, method: str, path: str) -> str:
        try:
            detail = json.loads(error.read() or b"{}").get("detail")
        except (ValueError, AttributeError, OSError):
            detail = None
        where = f"{self.server_url}: {method} {path}"
        if error.code == 401:
            return (f"{where}: the service needs its token ({detail or 'unauthorized'}); pass token=... or set "
                    "PSCV_TOKEN to the token `pscv serve` was started with")
        if error.code == 413:
            return f"{where}: upload too large ({detail or error.reason}); see pscv serve --max-upload-mb"
        return f"{where}: HTTP {error.code}: {detail or error.reason}"

    def _json(self, method: str, path: str, body=None, headers=None):
        with self._open(method, path, body, headers) as response:
            return json.loads(response.read())

    def _upload_limit(self) -> int | None:
        if self._limit is None:
            self._limit = self._json("GET", "/health").get("max_upload_bytes")
        return self._limit

    def _submit_remote(self, kind, image, points, classes, model, dataset, settings, strokes) -> RemoteJob:
        with tempfile.TemporaryDirectory(prefix="pscv-upload-") as staging:
            staging = Path(staging)
            files = upload_files(staging, image, points, classes, model, dataset, strokes)
            body, content_type = _multipart({"kind": kind, "settings": json.dumps(settings)}, files,
                                            staging / "body")
            size = body.stat().st_size
            limit = self._upload_limit()
            if limit and size > limit:
                raise PSCVError(f"the job's files take {size / 2**20:.1f} MB, more than the {limit / 2**20:.0f} MB "
                                f"the service at {self.server_url} accepts (pscv serve --max-upload-mb)")
            with open(body, "rb") as stream:
                info = self._json("POST", "/jobs", stream,
                                  {"Content-Type": content_type, "Content-Length": str(size)})
        return RemoteJob(self, info["id"], info["state"])


def _multipart(fields: dict, files: list, path: Path) -> tuple[Path, str]:
    """Write a multipart/form-data body to `path`: (path, its Content-Type)."""
    boundary = uuid.uuid4().hex
    with open(path, "wb") as body:
        for name, value in fields.items():
            body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
            body.write(str(value).encode() + b"\r\n")
        for name, filename, source in files:
            quoted = urllib.parse.quote(filename)
            body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{quoted}"\r\n'
                       "Content-Type: application/octet-stream\r\n\r\n".encode())
            with open(source, "rb") as stream:
                shutil.copyfileobj(stream, body, 2**20)
            body.write(b"\r\n")
        body.write(f"--{boundary}--\r\n".encode())
    return path, f"multipart/form-data; boundary={boundary}"


# ---------------------------------------------------------------------------------------------------------


class Job:
    """One job: its events as they come, its state, cancel, and its results."""

    def __init__(self, job_id: str, state: str = "running"):
        self.id = job_id
        self.state = state  # queued | running | done | error | cancelled
        self.message, self.outputs, self.device = None, {}, None
        self._queue: queue.Queue = queue.Queue()
        self._ended = False  # its last event has come
        self._finished = threading.Event()  # ... and whoever brings events is done

    def _follow(self, events) -> None:
        """Deliver `events` (an iterator that ends after the job's last event) in a thread of its own."""
        def read():
            for event in events:
                self._deliver(event)
            self._finished.set()

        threading.Thread(target=read, name=f"pscv-job-{self.id[:8]}", daemon=True).start()

    def _deliver(self, event: dict) -> None:
        kind = event.get("event")
        self.device = event.get("device") or self.device
        if kind in FINAL_STATES:
            self.message, self.outputs = event.get("message"), event.get("outputs") or {}
            self.state, self._ended = kind, True
        elif kind in ("started", "progress", "warning") and self.state == "queued":
            self.state = "running"
        self._queue.put(event)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def poll(self) -> list[dict]:
        """The events that came since the last call; never waits."""
        events = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                return events

    def events(self, timeout: float | None = None):
        """Yield events as they come, until the job ends (TimeoutError after `timeout` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                event = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._ended and self._queue.empty():
                    return  # its last event was taken by poll()
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} still {self.state} after {timeout} s") from None
                continue
            yield event
            if event.get("event") in FINAL_STATES:
                return

    def wait(self, timeout: float | None = None) -> str:
        """Wait until the job has ended (or `timeout` seconds); returns its state."""
        self._finished.wait(timeout)
        return self.state

    def cancel(self) -> None:
        raise NotImplementedError

    def download(self, kind: str = "segmentation", destination=None) -> Path:
        raise NotImplementedError

    def _check_result(self, kind: str) -> None:
        if kind not in RESULTS:
            raise PSCVError(f"unknown result {kind!r}; use {' or '.join(RESULTS)}")
        if self.state != "done":
            raise PSCVError(f"job {self.id} is {self.state}" + (f" ({self.message})" if self.message else "")
                            + "; it has no result to download")
        if kind not in self.outputs:
            raise PSCVError(f"job {self.id} wrote no {kind} (it wrote: {', '.join(self.outputs) or 'nothing'})")


class LocalJob(Job):
    """A job in a folder on this machine. Its events come from `source`: the worker this client started
    (`processes.WorkerProcess`), or the folder's events.jsonl for a job found again (`EventLog`)."""

    def __init__(self, folder, source):
        super().__init__(Path(folder).name)
        self.folder = Path(folder)
        self.source = source
        self.process = getattr(source, "process", None)  # the worker's subprocess.Popen, when this client started it
        self._follow(source.events())

    def cancel(self) -> None:
        """Ask the worker to stop; returns at once, the `cancelled` event follows (within about 2 seconds)."""
        if self._finished.is_set() or self.finished:
            return
        self.source.cancel()

    def download(self, kind: str = "segmentation", destination=None) -> Path:
        """Copy a result out of the job folder (no destination: its path in the job folder)."""
        self._check_result(kind)
        source = inside(self.folder, self.outputs[kind], f"outputs.{kind}")
        return source if destination is None else copy_result(source, kind, destination)

    def delete(self) -> None:
        """Remove the job folder of an ended job."""
        if not self.finished:
            raise PSCVError(f"job {self.id} is {self.state}; cancel it before deleting it")
        shutil.rmtree(self.folder, ignore_errors=True)


class EventLog:
    """The events of a job folder whose worker someone else started, read from its events.jsonl; cancelled
    through the cancel file."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def events(self):
        offset, ended, device = 0, False, None
        while True:
            events, offset = read_events(self.folder, offset)
            for event in events:
                device = event.get("device") or device
                ended = ended or event.get("event") in FINAL_STATES
                yield event
            if ended:
                return
            state = read_state(self.folder)
            if state["state"] in FINAL_STATES:  # ended without its event (a killed worker)
                events, offset = read_events(self.folder, offset)
                for event in events:
                    ended = ended or event.get("event") in FINAL_STATES
                    yield event
                if not ended:
                    yield {"event": state["state"], "message": state.get("message"),
                           "outputs": state.get("outputs", {}), "device": device}
                return
            time.sleep(0.2)

    def cancel(self) -> None:
        (self.folder / CANCEL_FILE).touch()


def copy_result(source: Path, kind: str, destination) -> Path:
    """Copy a segmentation file (to a file, or into a folder) or a model folder; every file atomically."""
    destination = Path(destination)
    if kind == "model":
        destination.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                with atomic_path(destination / path.name) as temporary:
                    shutil.copyfile(path, temporary)
        return destination
    if destination.is_dir():
        destination = destination / source.name
    with atomic_path(destination) as temporary:
        shutil.copyfile(source, temporary)
    return destination


class RemoteJob(Job):
    """A job on a `pscv serve` service, followed through its server-sent events."""

    def __init__(self, client: JobClient, job_id: str, state: str = "queued"):
        super().__init__(job_id, state)
        self.client = client
        self._received = 0
        self._path = f"/jobs/{urllib.parse.quote(job_id, safe='')}"
        self._follow(self._stream())

    def _stream(self):
        """The job's events from the service's event stream, reconnecting (backing off) when it drops."""
        failures = 0
        while not self._ended:
            try:
                with self.client._open("GET", f"{self._path}/stream?after={self._received}",
                                       timeout=STREAM_TIMEOUT) as response:
                    failures = 0
                    for event in _server_sent_events(response):
                        self._received += 1
                        yield event
                        if self._ended:
                            break
            except ServiceUnreachable as error:
                failures += 1
                if failures > RECONNECT_TRIES:
                    yield self._lost(str(error))
                    break
                time.sleep(min(0.5 * 2 ** failures, 10.0))
            except PSCVError as error:
                yield self._lost(str(error))
                break
            except OSError as error:  # the connection dropped while reading
                failures += 1
                if failures > RECONNECT_TRIES:
                    yield self._lost(f"lost the connection ({error})")
                    break
                time.sleep(min(0.5 * 2 ** failures, 10.0))

    def _lost(self, reason: str) -> dict:
        return {"event": "error", "device": self.device, "time": round(time.time(), 3),
                "message": f"lost contact with job {self.id} on {self.client.server_url}: {reason}. The job "
                           f"may still run there: JobClient(url).job({self.id!r}) follows it again"}

    def cancel(self) -> None:
        """Ask the service to cancel the job; the `cancelled` event follows."""
        if not self.finished:
            self.client._json("POST", f"{self._path}/cancel")

    def download(self, kind: str = "segmentation", destination=None) -> Path:
        """Download a result: a segmentation file (to a file, or into a folder), or a model folder."""
        if self.state == "done":
            self._finished.wait(STREAM_TIMEOUT)  # a job found again: its outputs come with its events
        self._check_result(kind)
        if destination is None:
            destination = Path(tempfile.mkdtemp(prefix=f"pscv-{self.id[:8]}-"))
        destination = Path(destination)
        with self.client._open("GET", f"{self._path}/result/{kind}", timeout=STREAM_TIMEOUT) as response:
            if kind == "model":
                with tempfile.TemporaryDirectory(prefix="pscv-download-") as staging:
                    archive = Path(staging) / "model.zip"
                    with open(archive, "wb") as out:
                        shutil.copyfileobj(response, out, 2**20)
                    folder = extract_zip(archive, Path(staging) / "model", max_bytes=2**34, what="model.zip")
                    return copy_result(folder, "model", destination)
            if destination.is_dir():
                destination = destination / Path(self.outputs[kind]).name
            with atomic_path(destination) as temporary:
                with open(temporary, "wb") as out:
                    shutil.copyfileobj(response, out, 2**20)
        return destination

    def delete(self) -> None:
        """Remove an ended job and its results from the service."""
        self.client._json("DELETE", self._path)


def _server_sent_events(response):
    """The JSON events of a text/event-stream response ("data:" lines; comments are keep-alives)."""
    data = []
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif not line and data:
            try:
                event = json.loads("\n".join(data))
            except ValueError:
                event = None
            data = []
            if isinstance(event, dict):
                yield event
