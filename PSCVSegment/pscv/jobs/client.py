"""The one client for jobs: a worker process on this machine, or a remote `pscv serve`, with the same calls.

```python
client = JobClient()                                        # local: `python -m pscv worker JOB_DIR`
client = JobClient("http://gpu-box:8000", token="...")       # remote (token also from PSCV_TOKEN)
job = client.submit("segment", image="ct.nrrd", points=["clicks.mrk.json"], classes="classes.json",
                    settings={"iterations": 300})
for event in job.poll(): ...        # new events, never blocks (for a Qt timer); or: for event in job.events()
job.cancel()                        # local: SIGTERM to the worker's process tree, SIGKILL if it lingers
job.wait()                          # -> "done" | "error" | "cancelled"
job.download("segmentation", "out.seg.nrrd")
```

Events are the worker's (docs/ENGINE_API.md): `queued` (remote), `started`, `progress`, `warning`, then
`done`, `error` or `cancelled`. A worker that dies without saying how it ended (killed, crashed) ends its
job with an `error` event written by the client, and its partial results are removed.

Imports no torch (3D Slicer's own process can use it); the remote client needs only the standard library.
In 3D Slicer pass `python=shutil.which("PythonSlicer")`: `sys.executable` there is the application.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
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
    LOG_FILE,
    SAFE_ID,
    append_event,
    inside,
    read_events,
    read_state,
    read_state_file,
    remove_results,
    write_job,
    write_state,
)
from .staging import extract_zip, stage_inputs, upload_files

KILL_AFTER_SECONDS = 5.0  # a cancelled local worker still running after this is killed (SIGKILL)
STREAM_TIMEOUT = 60.0  # the server sends a keep-alive every few seconds; silence this long means it is gone
RECONNECT_TRIES = 8  # reconnections to a remote service (backing off up to 10 s) before a job is given up
RESULTS = ("segmentation", "model")


class ServiceUnreachable(PSCVError):
    """The remote service did not answer (network, or not running): worth trying again."""


def default_jobs_dir() -> Path:
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"pscv-jobs-{user}"


class JobClient:
    """Runs jobs in local worker processes (`server_url` None) or on a `pscv serve` service."""

    def __init__(self, server_url: str | None = None, token: str | None = None, python: str | None = None,
                 jobs_dir=None, timeout: float = 60.0, env: dict | None = None):
        self.server_url = server_url.rstrip("/") if server_url else None
        self.token = token if token is not None else os.environ.get("PSCV_TOKEN") or None
        self.python = python
        # Extra environment variables of local workers, e.g. {"CUDA_VISIBLE_DEVICES": "-1"} to keep off the GPU.
        self.env = {**os.environ, **env} if env else None
        self.jobs_dir = Path(jobs_dir) if jobs_dir else default_jobs_dir()
        self.timeout = timeout
        self._limit = None

    @property
    def remote(self) -> bool:
        return self.server_url is not None

    # Jobs --------------------------------------------------------------------------------------------
    def submit(self, kind: str, image=None, points=None, classes=None, model=None, dataset=None,
               settings: dict | None = None) -> Job:
        """Start a job (segment, train, predict, finetune) on the given files and settings."""
        if kind not in KINDS:
            raise PSCVError(f"unknown job kind {kind!r}; use one of {', '.join(KINDS)}")
        settings = dict(settings or {})
        if self.remote:
            return self._submit_remote(kind, image, points, classes, model, dataset, settings)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        folder = self.jobs_dir / uuid.uuid4().hex
        folder.mkdir()
        try:
            inputs = stage_inputs(folder, image, points, classes, model, dataset)
            write_job(folder, kind, inputs, settings)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return LocalJob(folder, self.python, self.env)

    def job(self, job_id: str) -> Job:
        """A job submitted earlier (by this or another client), to follow, cancel or download again."""
        if self.remote:
            info = self._json("GET", f"/jobs/{urllib.parse.quote(job_id, safe='')}")
            return RemoteJob(self, info["id"], info["state"])
        folder = self.jobs_dir / job_id
        if not SAFE_ID.fullmatch(job_id) or not (folder / JOB_FILE).is_file():
            raise PSCVError(f"no job {job_id!r} in {self.jobs_dir}")
        return FolderJob(folder)

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

    def _submit_remote(self, kind, image, points, classes, model, dataset, settings) -> RemoteJob:
        with tempfile.TemporaryDirectory(prefix="pscv-upload-") as staging:
            staging = Path(staging)
            files = upload_files(staging, image, points, classes, model, dataset)
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
    """A job run by a `pscv worker` process of its own, in its own session (so cancel reaches its tree)."""

    def __init__(self, folder, python: str | None = None, env: dict | None = None):
        super().__init__(Path(folder).name)
        self.folder = Path(folder)
        self._cancelled = False
        self.process = start_worker(self.folder, python, env)
        self._reader = threading.Thread(target=self._read, name=f"pscv-job-{self.id[:8]}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not an event
            if isinstance(event, dict) and "event" in event:
                self._deliver(event)
        code = self.process.wait()
        self.process.stdout.close()
        if not self._ended:
            self._worker_vanished(code)
        self._finished.set()

    def _worker_vanished(self, code: int) -> None:
        """The worker ended without a last event: say how, so the folder reads as failed (or cancelled)."""
        state = read_state_file(self.folder)  # the worker may have ended the job but died before saying so
        if state is None or state["state"] == "done" and not self._results_present(state):
            remove_results(self.folder)
            if self._cancelled:
                state = {"state": "cancelled", "message": "cancelled (the worker was stopped)"}
            else:
                how = f"was killed by signal {-code}" if code < 0 else f"ended with exit status {code}"
                state = {"state": "error", "message": f"the worker process {how} before the job finished; "
                         f"see {self.folder / LOG_FILE}"}
            write_state(self.folder, state["state"], state["message"])
        event = {"event": state["state"], "message": state.get("message"), "device": self.device,
                 "time": round(time.time(), 3)}
        if state["state"] == "done":
            event["outputs"] = state.get("outputs", {})
        append_event(self.folder, event)
        self._deliver(event)

    def _results_present(self, state: dict) -> bool:
        return all((self.folder / name).exists() for name in state.get("outputs", {}).values())

    def cancel(self) -> None:
        """Ask the worker to stop (cancel file + SIGTERM to its tree); kill the tree if it lingers. Returns at
        once; the `cancelled` event follows (within about 2 seconds)."""
        if self._finished.is_set() or self.finished:
            return
        self._cancelled = True
        try:
            (self.folder / CANCEL_FILE).touch()
        except OSError:
            pass
        if os.name == "posix":
            signal_tree(self.process.pid, signal.SIGTERM)
        threading.Thread(target=self._kill_if_lingering, daemon=True).start()

    def _kill_if_lingering(self) -> None:
        if not self._finished.wait(KILL_AFTER_SECONDS):
            signal_tree(self.process.pid, getattr(signal, "SIGKILL", None))

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


class FolderJob(LocalJob):
    """A local job found again by its folder (its worker started by someone else): followed through
    events.jsonl, cancelled through the cancel file."""

    def __init__(self, folder):
        Job.__init__(self, Path(folder).name)
        self.folder = Path(folder)
        self._cancelled = False
        self.process = None
        self._reader = threading.Thread(target=self._tail, name=f"pscv-job-{self.id[:8]}", daemon=True)
        self._reader.start()

    def _tail(self) -> None:
        offset = 0
        while True:
            events, offset = read_events(self.folder, offset)
            for event in events:
                self._deliver(event)
            if self._ended:
                break
            state = read_state(self.folder)
            if state["state"] in FINAL_STATES:  # ended without its event (a killed worker)
                events, offset = read_events(self.folder, offset)
                for event in events:
                    self._deliver(event)
                if not self._ended:
                    self._deliver({"event": state["state"], "message": state.get("message"),
                                   "outputs": state.get("outputs", {}), "device": self.device})
                break
            time.sleep(0.2)
        self._finished.set()

    def cancel(self) -> None:
        if not self.finished:
            (self.folder / CANCEL_FILE).touch()


def worker_environment(env: dict | None = None) -> dict:
    """The environment of a worker: this pscv first on PYTHONPATH, unbuffered output."""
    environment = dict(os.environ if env is None else env)
    package_parent = str(Path(__file__).resolve().parents[2])  # the folder holding this pscv
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, environment.get("PYTHONPATH")) if p)
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def start_worker(folder: Path, python: str | None = None, env: dict | None = None) -> subprocess.Popen:
    """`python -m pscv worker FOLDER` in a session of its own, stdout piped, stderr to FOLDER/worker.log."""
    command = [python or sys.executable, "-m", "pscv", "worker", str(folder)]
    if os.name == "posix":
        platform = {"start_new_session": True}
    else:
        platform = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    with open(folder / LOG_FILE, "ab") as log:
        try:
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                    cwd=str(folder), env=worker_environment(env), **platform)
        except OSError as error:
            raise PSCVError(f"cannot start the worker ({' '.join(command[:2])}): {error}; check the python "
                            "given to JobClient(python=...)") from None


def signal_tree(pid: int, sig) -> None:
    """Send `sig` to a process and all its descendants (SIGKILL, or None on Windows: kill them)."""
    targets = []
    try:
        import psutil

        try:
            parent = psutil.Process(pid)
            targets = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            targets = []
        for process in targets:
            try:
                process.kill() if sig is None else process.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
    except ImportError:
        pass
    if os.name == "posix" and sig is not None:
        try:
            os.killpg(pid, sig)  # its session: the worker and whatever it started
        except (ProcessLookupError, PermissionError):
            pass
    elif not targets:
        try:
            os.kill(pid, signal.SIGTERM)  # Windows without psutil: TerminateProcess
        except OSError:
            pass


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
        self._reader = threading.Thread(target=self._follow, name=f"pscv-job-{job_id[:8]}", daemon=True)
        self._reader.start()

    def _follow(self) -> None:
        failures = 0
        while not self._ended:
            try:
                with self.client._open("GET", f"{self._path}/stream?after={self._received}",
                                       timeout=STREAM_TIMEOUT) as response:
                    failures = 0
                    for event in _server_sent_events(response):
                        self._received += 1
                        self._deliver(event)
                        if self._ended:
                            break
            except ServiceUnreachable as error:
                failures += 1
                if failures > RECONNECT_TRIES:
                    self._give_up(str(error))
                    break
                time.sleep(min(0.5 * 2 ** failures, 10.0))
            except PSCVError as error:
                self._give_up(str(error))
                break
            except OSError as error:  # the connection dropped while reading
                failures += 1
                if failures > RECONNECT_TRIES:
                    self._give_up(f"lost the connection ({error})")
                    break
                time.sleep(min(0.5 * 2 ** failures, 10.0))
        self._finished.set()

    def _give_up(self, reason: str) -> None:
        self._deliver({"event": "error", "device": self.device, "time": round(time.time(), 3),
                       "message": f"lost contact with job {self.id} on {self.client.server_url}: {reason}. The job "
                                  f"may still run there: JobClient(url).job({self.id!r}) follows it again"})

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
