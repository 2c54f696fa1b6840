"""`pscv serve`: run jobs for remote clients over HTTP (FastAPI + uvicorn), e.g. on a GPU machine.

The endpoints are listed in docs/ENGINE_API.md (Jobs). Every job is a job folder (pscv.jobs.folder) under
ROOT/jobs/<id>, run by a `pscv worker` process (pscv.jobs.processes); the queue runs one job at a time per
GPU (`--gpus N`: N at once, the n-th runner's worker sees only GPU n). Everything is on disk, so a
restarted service serves the results it had and runs the jobs still queued.

Security: the service listens on 127.0.0.1 unless told otherwise and refuses any other address without a
token; with a token, every request must carry `Authorization: Bearer TOKEN` (else 401, before its body is
read). Request bodies over --max-upload-mb get 413. Job ids are made here (uuid4 hex) and checked on
every request; uploaded files are stored under fixed names, never under the client's.
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
import uuid
from pathlib import Path
from typing import Annotated, Dict, List, Optional

from .. import PSCVError, __version__
from ..base.atomic import atomic_path, write_text_atomic
from .folder import (
    CANCEL_FILE,
    FINAL_STATES,
    JOB_FILE,
    META_FILE,
    PID_FILE,
    RESULTS,
    SAFE_ID,
    append_event,
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
MAX_UNPACKED_FACTOR = 4  # a zip may unpack to this many times the upload limit


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Service:
    """The job queue and its folders under `root`."""

    def __init__(self, root, gpus: int = 1, python: Optional[str] = None, max_upload_bytes: int = 2**30):
        self.root = Path(root).expanduser().resolve()
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.gpus, self.python, self.max_upload_bytes = max(1, int(gpus)), python, int(max_upload_bytes)
        self.lock = threading.Lock()
        self.pending: queue.Queue = queue.Queue()
        self.running: Dict[str, WorkerProcess] = {}
        self.stopping = threading.Event()
        self.threads: List[threading.Thread] = []

    # Life --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        for slot in range(self.gpus):
            thread = threading.Thread(target=self._run_queue, args=(slot,), name=f"pscv-runner-{slot}", daemon=True)
            thread.start()
            self.threads.append(thread)

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
        """After a restart: drop half-received uploads, fail the jobs that were running, queue the rest."""
        for staging in self.jobs_dir.glob(".incoming-*"):
            shutil.rmtree(staging, ignore_errors=True)
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

    def _end_job(self, folder: Path, state: str, message: str) -> None:
        remove_results(folder)
        write_state(folder, state, message)
        append_event(folder, {"event": state, "message": message, "device": None, "time": round(time.time(), 3)})

    def _run_queue(self, slot: int) -> None:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(slot)} if self.gpus > 1 else None
        while not self.stopping.is_set():
            try:
                job_id = self.pending.get(timeout=0.2)
            except queue.Empty:
                continue
            folder = self.jobs_dir / job_id
            with self.lock:
                if not (folder / JOB_FILE).is_file() or read_state(folder)["state"] != "queued":
                    continue  # cancelled or deleted while it waited
                try:
                    worker = WorkerProcess(folder, self.python, env)
                except PSCVError as error:  # the worker could not start: this job fails, the queue goes on
                    self._end_job(folder, "error", str(error))
                    continue
                self.running[job_id] = worker
            worker.run()
            with self.lock:
                self.running.pop(job_id, None)

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

    def info(self, job_id: str) -> dict:
        folder = self.folder(job_id)
        state = read_state(folder)
        with self.lock:
            if state["state"] == "queued" and job_id in self.running:
                state = {**state, "state": "running"}
        meta = self._meta(folder)
        return {"id": job_id, "kind": meta.get("kind"), "state": state["state"], "message": state.get("message"),
                "outputs": sorted(state.get("outputs") or {}), "created": meta.get("created")}

    def list_jobs(self) -> List[dict]:
        ids = [f.name for f in self.jobs_dir.iterdir() if SAFE_ID.fullmatch(f.name)]
        found = []
        for job_id in ids:
            with contextlib.suppress(Exception):  # deleted meanwhile
                found.append(self.info(job_id))
        return sorted(found, key=lambda item: item.get("created") or 0)

    def submit(self, kind: str, settings_text: str, image=None, points=(), classes=None, model=None,
               dataset=None, strokes=()) -> dict:
        """Store the uploads of a new job under fixed names and queue it. PSCVError: a bad request."""
        job_id = uuid.uuid4().hex
        staging = self.jobs_dir / f".incoming-{job_id}"
        staging.mkdir()
        try:
            try:
                settings = json.loads(settings_text or "{}")
            except json.JSONDecodeError as error:
                raise PSCVError(f"settings: not valid JSON ({error.msg})") from None
            if not isinstance(settings, dict):
                raise PSCVError("settings: expected a JSON object, e.g. {\"iterations\": 300}")
            received = {"image": [image], "points": points, "classes": [classes], "model": [model],
                        "dataset": [dataset], "strokes": strokes}
            limit = self.max_upload_bytes * MAX_UNPACKED_FACTOR
            inputs = job_inputs((role, store_upload(staging, role, number, upload.filename or "", upload.file, limit))
                                for role, uploads in received.items()
                                for number, upload in enumerate([u for u in uploads if u is not None], start=1))
            write_job(staging, kind, inputs, settings)
            write_text_atomic(staging / META_FILE,
                              json.dumps({"id": job_id, "kind": kind, "created": time.time()}) + "\n")
            ahead = self.pending.qsize() + len(self.running)
            append_event(staging, {"event": "queued", "message": f"queued; {ahead} job(s) ahead of it",
                                   "position": ahead, "device": None, "time": round(time.time(), 3)})
            os.replace(staging, self.jobs_dir / job_id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.pending.put(job_id)
        return {"id": job_id, "state": "queued"}

    def cancel(self, job_id: str) -> dict:
        folder = self.folder(job_id)
        with self.lock:
            worker = self.running.get(job_id)
            if worker is not None:
                worker.cancel()
                return {"id": job_id, "state": "cancelling"}
            state = read_state(folder)["state"]
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


class Guard:
    """ASGI middleware: the token (401) and the body size limit (413), checked before a body is read."""

    def __init__(self, app, token: Optional[str], max_bytes: int):
        self.app, self.token, self.max_bytes = app, token, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self.token is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return await _send_json(send, 401, "missing or wrong token: send 'Authorization: Bearer TOKEN' "
                                        "with the token pscv serve was started with", {"WWW-Authenticate": "Bearer"})
        too_large = f"request body over the limit of {self.max_bytes / 2**20:g} MB (pscv serve --max-upload-mb)"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _send_json(send, 413, too_large)
        received, state = 0, {"over": False, "started": False}

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    state["over"] = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            if state["over"]:  # the app answered its failed read of the body; answer 413 instead
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await _send_json(send, 413, too_large)
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if not state["started"]:
                state["started"] = True
                await _send_json(send, 413, too_large)


class _TooLarge(Exception):
    pass


async def _send_json(send, status: int, detail: str, headers: Optional[dict] = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def create_app(root, token: Optional[str] = None, max_upload_bytes: int = 2**30, gpus: int = 1,
               python: Optional[str] = None):
    """The FastAPI application of a service keeping its jobs under `root`."""
    from fastapi import FastAPI

    service = Service(root, gpus, python, max_upload_bytes)

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
    return Guard(app, token, max_upload_bytes)


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
        folder = service.folder(job_id)
        events, _ = read_events(folder)
        return {"events": events[after:], "next": max(after, len(events)), "state": service.info(job_id)["state"]}

    @app.get("/jobs/{job_id}/stream")
    async def job_stream(job_id: str, request: Request, after: int = Query(0, ge=0)):
        folder = service.folder(job_id)
        return StreamingResponse(_event_stream(folder, after, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _event_stream(folder: Path, after: int, request):
    """The events of a job folder after the first `after`, as server-sent events, until its last one (or the
    client leaves); a keep-alive comment when there is nothing to send for a while."""
    offset, count, last_sent = 0, 0, time.monotonic()
    while True:
        events, offset = read_events(folder, offset)
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
          max_upload_mb: float = 1024, gpus: int = 1, python: Optional[str] = None) -> None:
    """Run the service until interrupted (Ctrl+C or SIGTERM: running jobs are cancelled)."""
    token = token or os.environ.get("PSCV_TOKEN") or None
    if not is_loopback(host) and not token:
        raise PSCVError(f"refusing to listen on {host} without a token: anyone who reaches this machine could "
                        "run jobs and read results. Give --token (or set PSCV_TOKEN) to a long random secret, "
                        "e.g. `python -c \"import secrets; print(secrets.token_urlsafe(32))\"`, or listen on "
                        "127.0.0.1 and reach it through an SSH tunnel")
    try:
        import uvicorn
    except ImportError:
        raise PSCVError("pscv serve needs fastapi, uvicorn and python-multipart: pip install 'pscv[server]'") from None
    root = Path(root).expanduser() if root else Path.home() / "pscv-service"
    app = create_app(root, token, int(max_upload_mb * 2**20), gpus, python)
    if token and len(token) < 16:
        print("pscv serve: warning: the token is short; use 32 random characters or more", file=sys.stderr)
    print(f"pscv serve: http://{host}:{port} (jobs in {root}; {gpus} at a time; "
          f"{'token required' if token else 'no token: this machine only'})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
