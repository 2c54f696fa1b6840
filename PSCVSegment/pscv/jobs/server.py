"""`pscv serve`: run jobs for remote clients over HTTP (FastAPI + uvicorn), e.g. on a GPU machine.

The endpoints are listed in docs/ENGINE_API.md (Jobs). Every job is a job folder (pscv.jobs.folder) under
ROOT/jobs/<id>, run by a `pscv worker` process (pscv.jobs.processes); the queue runs one job at a time per
GPU (`--gpus N`: N at once, the n-th runner's worker sees only GPU n). Everything is on disk, so a
restarted service serves the results it had and runs the jobs still queued.

Security: the service listens on 127.0.0.1 unless told otherwise and refuses any other address without a
token; with a token, every request must carry `Authorization: Bearer TOKEN` (else 401, before its body is
read). Without a token (this machine only), a request must name this machine in its Host header (a
loopback address or localhost, the --host address, or an --allow-host name: no DNS rebinding) and may not
come from a web page of another origin (a foreign Origin header gets 403). Request bodies over
--max-upload-mb get 413; a client that stalls while sending its request is cut off (408). Job ids are made
here (uuid4 hex) and checked on every request; uploaded files are stored under fixed names, never under the
client's, and error replies name files relative to the job folder, never the service's own paths.

Resources: settings above the service's limits (`Limits.settings`: image_size, batch_size, widths,
iterations) are refused at submission (400), a job's inputs may take at most --job-quota-mb on disk once
unpacked, an upload that meets a full disk gets 507, and ended jobs are removed after --keep-days.
"""

import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import queue
import shutil
import signal
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Dict, List, Optional

from .. import PSCVError, __version__
from ..base.atomic import atomic_path, write_text_atomic
from ..base.jsonfile import parse_json
from ..base.paths import describe_os_error, is_disk_full
from .folder import (
    CANCEL_FILE,
    FINAL_STATES,
    JOB_FILE,
    META_FILE,
    PID_FILE,
    RESULTS,
    SAFE_ID,
    append_event,
    check_job_settings,
    inside,
    read_events,
    read_state,
    read_state_file,
    remove_results,
    worker_alive,
    write_job,
    write_state,
)
from .processes import WorkerProcess, signal_tree
from .staging import job_inputs, store_upload, zip_folder

KEEPALIVE_SECONDS = 10.0  # a comment line on idle event streams, so clients and proxies know it lives
STREAM_POLL_SECONDS = 0.1  # how often an event stream looks for new events
CLEANUP_SECONDS = 3600.0  # how often ended jobs older than --keep-days are looked for
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
# The largest settings a job may ask for (pscv serve --limit KEY=N changes them); the project's networks use
# image_size 128-256, batch_size 8-12, widths up to 256. The schema's own bounds (pscv.learn.settings) are wider.
SETTING_LIMITS = {"image_size": 1024, "batch_size": 64, "widths": 1024, "iterations": 200_000}


@dataclass
class Limits:
    """What one request and one job may take: the service's defences against a careless or hostile client."""

    max_upload_bytes: int = 2**30  # a request's body
    job_quota_bytes: Optional[int] = None  # a job's inputs on disk once unpacked (None: twice max_upload_bytes)
    keep_days: float = 7.0  # ended jobs are removed this long after they ended (0: kept for ever)
    stall_seconds: float = 30.0  # a request whose headers or body stop coming for this long is cut off
    settings: Dict[str, int] = field(default_factory=lambda: dict(SETTING_LIMITS))

    @property
    def quota(self) -> int:
        return self.job_quota_bytes if self.job_quota_bytes is not None else 2 * self.max_upload_bytes


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Service:
    """The job queue and its folders under `root`."""

    def __init__(self, root, gpus: int = 1, python: Optional[str] = None, limits: Optional[Limits] = None):
        self.root = Path(root).expanduser().resolve()
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.gpus, self.python, self.limits = max(1, int(gpus)), python, limits or Limits()
        self.lock = threading.Lock()
        self.pending: queue.Queue = queue.Queue()
        self.running: Dict[str, WorkerProcess] = {}
        # The last event of jobs whose folder could not record it (a full disk): their state, kept here.
        self.outcomes: Dict[str, dict] = {}
        self.stopping = threading.Event()
        self.threads: List[threading.Thread] = []

    @property
    def max_upload_bytes(self) -> int:
        return self.limits.max_upload_bytes

    # Life --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        for slot in range(self.gpus):
            thread = threading.Thread(target=self._run_queue, args=(slot,), name=f"pscv-runner-{slot}", daemon=True)
            thread.start()
            self.threads.append(thread)
        if self.limits.keep_days:
            threading.Thread(target=self._clean_up_regularly, name="pscv-cleanup", daemon=True).start()

    def stop(self, wait: float = 5.0) -> None:
        """Stop taking jobs and cancel the running ones (queued ones stay queued for the next start)."""
        self.stopping.set()
        with self.lock:
            running = list(self.running.values())
        for worker in running:
            worker.cancel()
        for worker in running:
            worker.done.wait(wait)

    def recover(self) -> None:
        """After a restart: drop half-received uploads and old ended jobs, fail the jobs that were running,
        queue the rest."""
        for staging in self.jobs_dir.glob(".incoming-*"):
            shutil.rmtree(staging, ignore_errors=True)
        self.remove_old_jobs()
        queued = []
        for folder in self.jobs_dir.iterdir():
            if not (SAFE_ID.fullmatch(folder.name) and folder.is_dir()) or read_state_file(folder):
                continue
            if (folder / PID_FILE).exists():  # its worker belonged to the service's previous run
                if worker_alive(folder):
                    signal_tree(int((folder / PID_FILE).read_text()), getattr(signal, "SIGKILL", None))
                self._end_job(folder, "error", "the service stopped while this job ran; submit it again")
            else:
                queued.append((self._meta(folder).get("created", 0), folder.name))
        for _, job_id in sorted(queued):
            self.pending.put(job_id)

    def remove_old_jobs(self, now: Optional[float] = None) -> List[str]:
        """Remove the jobs that ended more than --keep-days ago (state.json's time); returns their ids."""
        if not self.limits.keep_days:
            return []
        deadline = (now or time.time()) - self.limits.keep_days * 86400
        removed = []
        for folder in self.jobs_dir.iterdir():
            state = read_state_file(folder) if SAFE_ID.fullmatch(folder.name) else None
            if state is not None and float(state.get("time") or 0) < deadline:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    def _clean_up_regularly(self) -> None:
        while not self.stopping.wait(CLEANUP_SECONDS):
            with contextlib.suppress(OSError):
                self.remove_old_jobs()

    def _end_job(self, folder: Path, state: str, message: str) -> None:
        """Write a job's end (state.json and its last event); on a disk that refuses it, keep it in memory."""
        event = {"event": state, "message": message, "device": None, "time": round(time.time(), 3)}
        try:
            remove_results(folder)
            write_state(folder, state, message)
            append_event(folder, event)
        except OSError:
            self.outcomes[folder.name] = event

    def _run_queue(self, slot: int) -> None:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(slot)} if self.gpus > 1 else None
        while not self.stopping.is_set():
            try:
                job_id = self.pending.get(timeout=0.2)
            except queue.Empty:
                continue
            folder = self.jobs_dir / job_id
            with self.lock:
                if not (folder / JOB_FILE).is_file() or self.state(job_id, folder)["state"] != "queued":
                    continue  # cancelled or deleted while it waited
                try:
                    worker = WorkerProcess(folder, self.python, env)
                except (PSCVError, OSError) as error:  # the worker could not start: this job fails, the queue goes on
                    self._end_job(folder, "error", str(error) if isinstance(error, PSCVError) else
                                  f"the worker could not start: {describe_os_error(error)}")
                    continue
                self.running[job_id] = worker
            worker.run()
            with self.lock:
                self.running.pop(job_id, None)
                if read_state(folder)["state"] not in FINAL_STATES:  # the worker could not write its end
                    last = worker.last_event or {}
                    self._end_job(folder, last.get("event", "error") if last.get("event") in FINAL_STATES
                                  else "error", last.get("message") or "the worker ended without a result")

    # Jobs --------------------------------------------------------------------------------------------
    def folder(self, job_id: str) -> Path:
        """The folder of an existing job; 404 for anything that is not one of this service's job ids."""
        from fastapi import HTTPException

        folder = self.jobs_dir / job_id
        if not SAFE_ID.fullmatch(job_id) or not (folder / JOB_FILE).is_file():
            raise HTTPException(404, f"no job {job_id[:40]!r} on this service")
        return folder

    def _meta(self, folder: Path) -> dict:
        try:
            return json.loads((folder / META_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def state(self, job_id: str, folder: Path) -> dict:
        """read_state of the folder, and what only the service knows: running, or an end the disk refused."""
        state = read_state(folder)
        if state["state"] not in FINAL_STATES and job_id in self.outcomes:
            outcome = self.outcomes[job_id]
            return {"state": outcome["event"], "message": outcome.get("message"), "outputs": {}}
        if state["state"] == "queued" and job_id in self.running:
            return {**state, "state": "running"}
        return state

    def public(self, text: Optional[str], folder: Optional[Path] = None) -> Optional[str]:
        """A message for a client: paths inside a job folder relative to it, the service's own paths hidden."""
        if not text:
            return text
        for place in [p for p in (folder,) if p is not None] + sorted(self.jobs_dir.glob(".incoming-*")):
            text = text.replace(f"{place}{os.sep}", "").replace(str(place), ".")
        return text.replace(str(self.root), "<service root>")

    def info(self, job_id: str) -> dict:
        folder = self.folder(job_id)
        with self.lock:
            state = self.state(job_id, folder)
        meta = self._meta(folder)
        return {"id": job_id, "kind": meta.get("kind"), "state": state["state"],
                "message": self.public(state.get("message"), folder), "outputs": sorted(state.get("outputs") or {}),
                "created": meta.get("created")}

    def list_jobs(self) -> List[dict]:
        ids = [f.name for f in self.jobs_dir.iterdir() if SAFE_ID.fullmatch(f.name)]
        found = []
        for job_id in ids:
            with contextlib.suppress(Exception):  # deleted meanwhile
                found.append(self.info(job_id))
        return sorted(found, key=lambda item: item.get("created") or 0)

    def events(self, job_id: str, folder: Path, offset: int = 0):
        """(events from byte `offset` on, with public messages; the next offset); the end the service kept
        for a job whose folder could not record it comes last."""
        events, offset = read_events(folder, offset)
        for event in events:
            if "message" in event:
                event["message"] = self.public(event["message"], folder)
        outcome = self.outcomes.get(job_id)
        if outcome is not None and not any(e.get("event") in FINAL_STATES for e in events):
            events.append({**outcome, "message": self.public(outcome.get("message"), folder)})
        return events, offset

    def submit(self, kind: str, settings_text: str, image=None, points=(), classes=None, model=None,
               dataset=None, strokes=()) -> dict:
        """Store the uploads of a new job under fixed names and queue it. PSCVError: a bad request (its message
        names no server path); OSError: the disk (HTTP 507 when it is full)."""
        job_id = uuid.uuid4().hex
        staging = self.jobs_dir / f".incoming-{job_id}"
        staging.mkdir()
        try:
            settings = self._checked_settings(kind, settings_text)
            received = {"image": [image], "points": points, "classes": [classes], "model": [model],
                        "dataset": [dataset], "strokes": strokes}
            quota = Quota(self.limits.quota, staging)
            inputs = job_inputs((role, store_upload(staging, role, number, upload.filename or "", upload.file,
                                                    quota.left()))
                                for role, uploads in received.items()
                                for number, upload in enumerate([u for u in uploads if u is not None], start=1))
            quota.left()
            write_job(staging, kind, inputs, settings)
            write_text_atomic(staging / META_FILE,
                              json.dumps({"id": job_id, "kind": kind, "created": time.time()}) + "\n")
            ahead = self.pending.qsize() + len(self.running)
            append_event(staging, {"event": "queued", "message": f"queued ({ahead} job{'' if ahead == 1 else 's'} "
                                   "ahead)", "position": ahead, "device": None, "time": round(time.time(), 3)})
            os.replace(staging, self.jobs_dir / job_id)
        except PSCVError as error:
            message = self.public(str(error), staging)
            shutil.rmtree(staging, ignore_errors=True)
            raise PSCVError(message) from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.pending.put(job_id)
        return {"id": job_id, "state": "queued"}

    def _checked_settings(self, kind: str, settings_text: str) -> dict:
        """The job's settings: JSON, the schema (pscv.jobs.folder.check_job_settings) and this service's limits."""
        settings = parse_json(settings_text or "{}", "settings")
        if not isinstance(settings, dict):
            raise PSCVError("settings: expected a JSON object, e.g. {\"iterations\": 300}")
        check_job_settings(kind, settings, "settings")
        for key, limit in self.limits.settings.items():
            value = settings.get(key)
            largest = max(value) if key == "widths" and value else value
            if largest is not None and largest > limit:
                raise PSCVError(f"settings: setting {key}: got {value}; this service takes at most {limit}"
                                + (" per level" if key == "widths" else "") + f" (pscv serve --limit {key}=N)")
        return settings

    def cancel(self, job_id: str) -> dict:
        folder = self.folder(job_id)
        with self.lock:
            worker = self.running.get(job_id)
            if worker is not None:
                worker.cancel()
                return {"id": job_id, "state": "cancelling"}
            state = self.state(job_id, folder)["state"]
            if state == "queued":
                (folder / CANCEL_FILE).touch()
                self._end_job(folder, "cancelled", "cancelled before it started")
                return {"id": job_id, "state": "cancelled"}
        return {"id": job_id, "state": state}

    def delete(self, job_id: str) -> dict:
        from fastapi import HTTPException

        folder = self.folder(job_id)
        state = self.info(job_id)["state"]
        if state not in FINAL_STATES:
            raise HTTPException(409, f"job {job_id} is {state}; cancel it first")
        shutil.rmtree(folder, ignore_errors=True)
        self.outcomes.pop(job_id, None)
        return {"id": job_id, "deleted": True}

    def result(self, job_id: str, kind: str) -> Path:
        """The file to send for a result: the segmentation, or a zip of the model folder (made once)."""
        from fastapi import HTTPException

        folder = self.folder(job_id)
        state = read_state(folder)
        if state["state"] != "done":
            raise HTTPException(409, f"job {job_id} is {state['state']}; results come when it is done")
        outputs = state.get("outputs") or {}
        if kind not in outputs:
            raise HTTPException(404, f"job {job_id} wrote no {kind} (it wrote {', '.join(outputs) or 'nothing'})")
        path = inside(folder, outputs[kind], f"outputs.{kind}")
        if kind != "model":
            return path
        archive = folder / f".download-{path.name}.zip"
        if not archive.exists():
            with atomic_path(archive) as temporary:
                zip_folder(path, temporary)
        return archive


class Quota:
    """The bytes a job's inputs may still take on disk (what its staging folder holds counts)."""

    def __init__(self, total: int, folder: Path):
        self.total, self.folder = total, folder

    def left(self) -> int:
        used = sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())
        if used >= self.total:
            raise PSCVError(f"the job's files take more than this service's quota of {self.total / 2**20:.0f} MB "
                            "a job (pscv serve --job-quota-mb)")
        return self.total - used


class Guard:
    """ASGI middleware, before a body is read: the token (401) or, without one, the Host and Origin headers
    (403); the body size limit (413); and a client that stops sending its body (408)."""

    def __init__(self, app, token: Optional[str], max_bytes: int, allowed_hosts=LOCAL_HOSTS,
                 stall_seconds: float = 30.0):
        self.app, self.token, self.max_bytes, self.stall_seconds = app, token, max_bytes, stall_seconds
        self.allowed_hosts = {h.strip("[]").lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        refusal = self._refusal(headers)
        if refusal is not None:
            return await _send_json(send, *refusal)
        too_large = f"request body over the limit of {self.max_bytes / 2**20:g} MB (pscv serve --max-upload-mb)"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _send_json(send, 413, too_large, {"Connection": "close"})
        received, state = 0, {"failed": None, "started": False, "body_done": False}

        async def guarded_receive():
            nonlocal received
            if state["body_done"]:  # e.g. a stream waiting for the client to leave: no time limit
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.stall_seconds)
            except asyncio.TimeoutError:
                state["failed"] = (408, f"the request body stopped coming for {self.stall_seconds:g} s")
                raise _Refused() from None
            state["body_done"] = message["type"] != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                state["failed"] = (413, too_large)
                raise _Refused()
            return message

        async def guarded_send(message):
            if state["failed"]:  # the app answered its failed read of the body; answer with the reason instead
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await _send_json(send, *state["failed"], {"Connection": "close"})
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except _Refused:
            if not state["started"]:
                state["started"] = True
                await _send_json(send, *state["failed"], {"Connection": "close"})

    def _refusal(self, headers: dict) -> Optional[tuple]:
        """(status, reason) of a request refused before it is read, or None."""
        if self.token is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return (401, "missing or wrong token: send 'Authorization: Bearer TOKEN' with the token pscv serve "
                        "was started with", {"WWW-Authenticate": "Bearer"})
            return None
        # No token: this machine only. A web page must not reach it, neither through a name that points here (DNS
        # rebinding: a foreign Host) nor by sending a request from its own origin (a foreign Origin).
        host = _host_name(headers.get("host", ""))
        if not self._local(host):
            return (403, f"Host {host[:80]!r} is not this service's name; without a token it answers only to "
                    "localhost and loopback addresses (pscv serve --allow-host NAME adds a name)")
        origin = headers.get("origin")
        if origin is not None and not self._local(urllib.parse.urlsplit(origin).hostname or ""):
            return (403, f"cross-origin request from {origin[:80]!r} refused: without a token this service answers "
                    "only to programs on this machine, not to web pages")
        return None

    def _local(self, host: str) -> bool:
        host = host.strip("[]").lower()
        return host in self.allowed_hosts or is_loopback(host) if host else False


def _host_name(value: str) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class _Refused(Exception):
    pass


async def _send_json(send, status: int, detail: str, headers: Optional[dict] = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def stall_guarded_protocol(seconds: float):
    """uvicorn's HTTP protocol, closing a connection whose request headers stop coming for `seconds` (uvicorn
    itself times out only idle keep-alive connections; Guard times out a stalled body)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class StallGuardedProtocol(AutoHTTPProtocol):
        _timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data):
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers are in
                self._disarm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            self._disarm()
            self._timer = self.loop.call_later(seconds, self.transport.close)

        def _disarm(self):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    return StallGuardedProtocol


def create_app(root, token: Optional[str] = None, limits: Optional[Limits] = None, gpus: int = 1,
               python: Optional[str] = None, allowed_hosts=LOCAL_HOSTS):
    """The FastAPI application of a service keeping its jobs under `root`, behind its Guard."""
    from fastapi import FastAPI

    limits = limits or Limits()
    service = Service(root, gpus, python, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        await asyncio.to_thread(service.stop)

    app = FastAPI(title="pscv", version=__version__, lifespan=lifespan,
                  description="Segment organs from clicks: PSCV training and inference jobs")
    app.state.service = service
    _add_job_routes(app, service)
    _add_event_routes(app, service)
    _add_result_routes(app, service)
    return Guard(app, token, limits.max_upload_bytes, allowed_hosts, limits.stall_seconds)


def _add_job_routes(app, service: Service) -> None:
    """GET /health, POST /jobs, GET /jobs, GET /jobs/{id}."""
    from fastapi import File, Form, HTTPException, UploadFile

    @app.get("/health")
    def health():
        with service.lock:
            running = len(service.running)
        return {"status": "ok", "version": __version__, "max_upload_bytes": service.max_upload_bytes,
                "queued": service.pending.qsize(), "running": running, "gpus": service.gpus}

    @app.post("/jobs", status_code=201)
    def submit(kind: Annotated[str, Form()], settings: Annotated[str, Form()] = "{}",
               image: Annotated[Optional[UploadFile], File()] = None,
               points: Annotated[Optional[List[UploadFile]], File()] = None,
               classes: Annotated[Optional[UploadFile], File()] = None,
               model: Annotated[Optional[UploadFile], File()] = None,
               dataset: Annotated[Optional[UploadFile], File()] = None,
               strokes: Annotated[Optional[List[UploadFile]], File()] = None):
        try:
            return service.submit(kind, settings, image, points or [], classes, model, dataset, strokes or [])
        except PSCVError as error:
            raise HTTPException(400, str(error)) from None
        except OSError as error:
            if is_disk_full(error):
                raise HTTPException(507, "the service's disk is full; try again later, or ask its administrator "
                                    "to free space") from None
            raise HTTPException(500, f"the service could not store the job: {error.strerror or 'disk error'}") \
                from None

    @app.get("/jobs")
    def list_jobs():
        return {"jobs": service.list_jobs()}

    @app.get("/jobs/{job_id}")
    def job_info(job_id: str):
        return service.info(job_id)


def _add_event_routes(app, service: Service) -> None:
    """GET /jobs/{id}/events (polling) and GET /jobs/{id}/stream (server-sent events)."""
    from fastapi import Query, Request
    from fastapi.responses import StreamingResponse

    @app.get("/jobs/{job_id}/events")
    def job_events(job_id: str, after: int = Query(0, ge=0)):
        events, _ = service.events(job_id, service.folder(job_id))
        return {"events": events[after:], "next": max(after, len(events)), "state": service.info(job_id)["state"]}

    @app.get("/jobs/{job_id}/stream")
    async def job_stream(job_id: str, request: Request, after: int = Query(0, ge=0)):
        folder = service.folder(job_id)
        return StreamingResponse(_event_stream(service, job_id, folder, after, request),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _event_stream(service: Service, job_id: str, folder: Path, after: int, request):
    """The events of a job after the first `after`, as server-sent events, until its last one (or the client
    leaves); a keep-alive comment when there is nothing to send for a while."""
    offset, count, last_sent = 0, 0, time.monotonic()
    while True:
        events, offset = service.events(job_id, folder, offset)
        for event in events:
            count += 1
            if count > after:
                yield f"id: {count}\ndata: {json.dumps(event)}\n\n"
                last_sent = time.monotonic()
            if event.get("event") in FINAL_STATES:
                return
        if not events:
            if not folder.is_dir() or await request.is_disconnected():
                return
            if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            await asyncio.sleep(STREAM_POLL_SECONDS)


def _add_result_routes(app, service: Service) -> None:
    """POST /jobs/{id}/cancel, GET /jobs/{id}/result/{kind}, DELETE /jobs/{id}."""
    from fastapi import HTTPException
    from fastapi.responses import FileResponse

    @app.post("/jobs/{job_id}/cancel", status_code=202)
    def cancel(job_id: str):
        return service.cancel(job_id)

    @app.get("/jobs/{job_id}/result/{kind}")
    def result(job_id: str, kind: str):
        if kind not in RESULTS:
            raise HTTPException(404, f"results are {', '.join(repr(r) for r in RESULTS)}")
        path = service.result(job_id, kind)
        name = f"{job_id}-model.zip" if kind == "model" else path.name
        return FileResponse(path, filename=name, media_type="application/octet-stream")

    @app.delete("/jobs/{job_id}")
    def delete(job_id: str):
        return service.delete(job_id)


def serve(host: str = "127.0.0.1", port: int = 8000, token: Optional[str] = None, root=None,
          limits: Optional[Limits] = None, gpus: int = 1, python: Optional[str] = None, allow_hosts=()) -> None:
    """Run the service until interrupted (Ctrl+C or SIGTERM: running jobs are cancelled)."""
    token = token or os.environ.get("PSCV_TOKEN") or None
    if not is_loopback(host) and not token:
        raise PSCVError(f"refusing to listen on {host} without a token: anyone who reaches this machine could "
                        "run jobs and read results. Set PSCV_TOKEN (or --token-file) to a long random secret, "
                        "e.g. `python -c \"import secrets; print(secrets.token_urlsafe(32))\"`, or listen on "
                        "127.0.0.1 and reach it through an SSH tunnel")
    try:
        import uvicorn
    except ImportError:
        raise PSCVError("pscv serve needs fastapi, uvicorn and python-multipart: pip install 'pscv[server]'") from None
    root = Path(root).expanduser() if root else Path.home() / "pscv-service"
    limits = limits or Limits()
    hosts = (*LOCAL_HOSTS, *([host] if host not in ("0.0.0.0", "::", "") else []), *allow_hosts)
    app = create_app(root, token, limits, gpus, python, hosts)
    if token and len(token) < 16:
        print("pscv serve: warning: the token is short; use 32 random characters or more", file=sys.stderr)
    print(f"pscv serve: http://{host}:{port} (jobs in {root}; {gpus} at a time; "
          f"{'token required' if token else 'no token: this machine only, Host and Origin checked'})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                http=stall_guarded_protocol(limits.stall_seconds))
