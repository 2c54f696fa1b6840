"""Worker processes: start `python -m pscv worker JOB_DIR` in a session of its own, follow it, stop its tree.

Used by the client (a local job) and the service (its queue). Imports no torch; psutil when installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import PSCVError
from .folder import CANCEL_FILE, FINAL_STATES, LOG_FILE, append_event, read_state_file, remove_results, write_state

KILL_AFTER_SECONDS = 5.0  # a cancelled worker still running after this is killed (SIGKILL)


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
        # Windows without psutil: TerminateProcess (os.kill) would stop only this process; when it is a
        # launcher (3D Slicer's PythonSlicer.exe starts python-real.exe), the child holding the GPU would
        # live on. taskkill /T ends the whole tree.
        try:
            subprocess.run(["taskkill", "/PID", str(pid), "/T", "/F"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
                           creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        except (OSError, subprocess.SubprocessError):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass


class WorkerProcess:
    """A worker of its own for one job folder, in its own session (so that cancel reaches its whole tree).

    `events()` yields the events it prints; a worker that dies without a last event (killed, crashed) gets
    one written for it, to the folder too, and its partial results removed. `done` is set once its events
    have all been taken and the process has ended.
    """

    def __init__(self, folder, python: str | None = None, env: dict | None = None):
        self.folder = Path(folder)
        self.process = start_worker(self.folder, python, env)
        self.done = threading.Event()
        self.ended = False  # its last event has come
        self.last_event = None  # the last event it printed (or the one written for it)
        self._cancelled = False

    def events(self):
        """The worker's events as it prints them, until its last one."""
        device = None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not an event
            if isinstance(event, dict) and "event" in event:
                device = event.get("device") or device
                self.ended = self.ended or event["event"] in FINAL_STATES
                self.last_event = event
                yield event
        code = self.process.wait()
        self.process.stdout.close()
        if not self.ended:
            self.last_event = self._vanished(code, device)
            yield self.last_event
        self.done.set()

    def _vanished(self, code: int, device) -> dict:
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
            with contextlib.suppress(OSError):  # a full disk: the event below still says how the job ended
                write_state(self.folder, state["state"], state["message"])
        event = {"event": state["state"], "message": state.get("message"), "device": device,
                 "time": round(time.time(), 3)}
        if state["state"] == "done":
            event["outputs"] = state.get("outputs", {})
        with contextlib.suppress(OSError):
            append_event(self.folder, event)
        self.ended = True
        return event

    def _results_present(self, state: dict) -> bool:
        return all((self.folder / name).exists() for name in state.get("outputs", {}).values())

    def run(self) -> None:
        """Follow the worker until it has ended (its events are in the job folder)."""
        for _ in self.events():
            pass

    def cancel(self) -> None:
        """Ask the worker to stop (cancel file + SIGTERM to its tree); kill the tree if it lingers. Returns at
        once; the `cancelled` event follows (within about 2 seconds)."""
        if self.done.is_set() or self.ended:
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
        if not self.done.wait(KILL_AFTER_SECONDS):
            signal_tree(self.process.pid, getattr(signal, "SIGKILL", None))
