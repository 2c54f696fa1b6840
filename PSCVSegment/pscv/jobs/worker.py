"""`pscv worker JOB_DIR`: run one job folder in this process and print its events, one JSON object a line.

Events (see docs/ENGINE_API.md): `started`, `progress`, `warning`, then one of `done`, `error`, `cancelled`;
each carries the device in use and the time. They also go to JOB_DIR/events.jsonl; state.json is written
when the job ends. Anything else that would print on stdout (a library's chatter) goes to stderr, so
stdout holds only events.

Stopping: SIGTERM, SIGINT or a `cancel` file in the job folder. The job stops at its next step (one
training iteration, one inference batch); if it has not within GRACE_SECONDS (a long step, an import, a
file being written), a watchdog thread removes the results and ends the process itself. Either way no
result file is left and the last event is `cancelled`.

Exit status: 0 done, 1 error, 3 cancelled.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

from .. import PSCVError
from ..base.atomic import write_text_atomic
from ..base.paths import describe_os_error
from .folder import (
    CANCEL_FILE,
    EVENTS_FILE,
    LOG_FILE,
    PID_FILE,
    lock_job,
    read_job,
    read_state_file,
    remove_results,
    write_state,
)
from .runner import Events, device_details, device_label, device_warnings, is_out_of_memory, run_job

EXIT_DONE, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 3
EXIT_CODES = {"done": EXIT_DONE, "error": EXIT_ERROR, "cancelled": EXIT_CANCELLED}
GRACE_SECONDS = 0.5  # a stop request waits this long for the job to stop by itself
WATCH_SECONDS = 0.05  # how often the watchdog looks for the cancel file


class Worker:
    def __init__(self, folder, stdout=None):
        self.folder = Path(folder)
        self.stdout = stdout or sys.stdout
        self.lock = threading.RLock()  # one event written at a time; the job ends once
        self.ended = False
        self.stop_reason, self.stop_requested_at = None, None
        self.events = Events(self._write)
        self.event_log = None
        self.wakeup = None  # read end of the pipe the C signal handler writes to (POSIX)
        self.job_lock = None  # the job folder's lock file, held while this worker runs the job

    # Events ------------------------------------------------------------------------------------------
    def _write(self, event: dict) -> None:
        line = json.dumps(event) + "\n"
        with self.lock:
            for stream in (self.event_log, self.stdout):
                if stream is None:
                    continue
                try:
                    stream.write(line)
                    stream.flush()
                except (OSError, ValueError):  # a reader that went away must not stop the job
                    pass

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.events.warning(str(message))

    # Stopping ----------------------------------------------------------------------------------------
    def should_stop(self) -> bool:
        return self.stop_requested_at is not None

    def request_stop(self, reason: str) -> None:
        if self.stop_requested_at is None:
            self.stop_reason, self.stop_requested_at = reason, time.monotonic()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        names = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
        for number, name in names.items():
            signal.signal(number, lambda *_, name=name: self.request_stop(name))
        if os.name == "posix":
            # The Python handler above runs only between bytecodes of the main thread, which may be inside
            # a long torch call; the wakeup pipe tells the watchdog at once.
            read_end, write_end = os.pipe()
            os.set_blocking(write_end, False)
            signal.set_wakeup_fd(write_end)
            self.wakeup = read_end

    def _watch(self) -> None:
        """The watchdog: notices signals and the cancel file, and ends a job that does not stop in time."""
        cancel_file = self.folder / CANCEL_FILE
        while not self.ended:
            if self.wakeup is not None:
                ready, _, _ = select.select([self.wakeup], [], [], WATCH_SECONDS)
                if ready:
                    numbers = os.read(self.wakeup, 64)
                    if signal.SIGTERM in numbers or signal.SIGINT in numbers:
                        self.request_stop("SIGTERM" if signal.SIGTERM in numbers else "SIGINT")
            else:
                time.sleep(WATCH_SECONDS)
            if self.stop_requested_at is None and cancel_file.exists():
                self.request_stop("cancel file")
            if self.stop_requested_at is not None and time.monotonic() - self.stop_requested_at > GRACE_SECONDS:
                self._stop_now()

    def _stop_now(self) -> None:
        with self.lock:
            if self.ended:
                return
            message = f"cancelled ({self.stop_reason}); the worker ended the job at once"
            self._finish("cancelled", message, {})
            remove_results(self.folder, os.getpid())  # again: a rename may have landed meanwhile
            os._exit(EXIT_CANCELLED)

    # Running -----------------------------------------------------------------------------------------
    def run(self) -> int:
        if not self.folder.is_dir():
            self.events({"event": "error", "message": f"{self.folder}: no such job folder"})
            return EXIT_ERROR
        refusal = self._take_job()
        if refusal is not None:  # another worker's job, or one that ran: say so and leave the folder as it is
            self.events({"event": "error", "message": refusal})
            return EXIT_ERROR
        self._install_signal_handlers()  # before worker.pid: a client that sees the pid may signal at once
        try:
            self.event_log = open(self.folder / EVENTS_FILE, "a", encoding="utf-8")
            write_text_atomic(self.folder / PID_FILE, f"{os.getpid()}\n")
        except OSError as error:
            self.events({"event": "error", "message": f"{self.folder}: cannot write to the job folder ({error}); "
                                                      "check its permissions and free disk space"})
            return EXIT_ERROR
        threading.Thread(target=self._watch, name="pscv-worker-watchdog", daemon=True).start()
        show_warning, warnings.showwarning = warnings.showwarning, self._show_warning
        try:
            return self._run_job()
        finally:
            warnings.showwarning = show_warning
            with self.lock:
                self.event_log.close()
                self.event_log = None

    def _take_job(self) -> str | None:
        """Lock the job folder (held until this process ends); why this worker may not run the job, or None.

        A job runs at most once: a folder locked by another worker, or whose job has ended (state.json), is
        left untouched. A job whose worker started and died without ending it (kill -9) is ended here as
        failed, and what its worker was writing is removed."""
        try:
            self.job_lock = lock_job(self.folder)
        except OSError as error:
            return f"{self.folder}: cannot write to the job folder ({error.strerror}); check its permissions and space"
        if self.job_lock is None:
            return f"{self.folder}: another worker is running this job; this one leaves it alone"
        state = read_state_file(self.folder)
        if state is not None:
            return (f"{self.folder}: this job has already ended ({state['state']}); a job runs once, and its results "
                    "stay as they are: submit a new job to run it again")
        if (self.folder / PID_FILE).exists():
            message = ("the worker stopped without finishing (killed, crashed, or the machine restarted); run the "
                       "job again")
            with contextlib.suppress(OSError):
                remove_results(self.folder)
                write_state(self.folder, "error", message)
            return f"{self.folder}: this job was started before and its worker is gone: {message}"
        return None

    def _run_job(self) -> int:
        from ..base.progress import Cancelled

        try:
            job = read_job(self.folder)
            self.events.device = device_label(job.settings.get("device", "auto"))  # imports torch
            self.events({"event": "started", "kind": job.kind, "job": self.folder.name, "pid": os.getpid(),
                         **device_details(self.events.device)})
            for message in device_warnings(job.settings.get("device", "auto"), self.events.device):
                self.events.warning(message)
            if self.should_stop():
                raise Cancelled("stopped before it began")
            outputs = run_job(job, self.events, self.should_stop)
            return self._end("done", f"{job.kind} finished", outputs)
        except Cancelled:
            return self._end("cancelled", f"cancelled ({self.stop_reason or 'asked to stop'})")
        except PSCVError as error:
            return self._end("error", str(error))
        except OSError as error:  # the disk: full, read-only, a file that went away
            return self._end("error", describe_os_error(error))
        except Exception as error:  # a bug, or the machine: say what, keep the details in the log
            traceback.print_exc()
            if is_out_of_memory(error):
                message = (f"out of memory on {self.events.device or 'this machine'}: lower image_size or "
                           "batch_size, or run the job on a machine with more memory")
            else:
                message = (f"unexpected error: {type(error).__name__}: {error}. The details are in the worker's "
                           f"stderr ({LOG_FILE} in the job folder); please report them")
            return self._end("error", message)

    def _end(self, state: str, message: str, outputs: dict | None = None) -> int:
        with self.lock:
            if self.ended:
                return EXIT_CODES[state]
            if state == "done" and self.should_stop():  # a stop that came while the results were written
                state, message, outputs = "cancelled", f"cancelled ({self.stop_reason})", None
            self._finish(state, message, outputs)
            return EXIT_CODES[state]

    def _finish(self, state: str, message: str, outputs: dict | None) -> None:
        """Under the lock: remove results unless done, write state.json, print the last event."""
        self.ended = True
        if state != "done":
            remove_results(self.folder, os.getpid())
        try:
            write_state(self.folder, state, message, outputs)
        except OSError as error:
            message = f"{message} (and state.json could not be written: {error})"
        event = {"event": state, "message": message}
        if state == "done":
            event["outputs"] = outputs
        self.events(event)


def main(folder) -> int:
    """Run the job in `folder`, then end the process with its exit status (0 done, 1 error, 3 cancelled).

    stdout carries only events (anything else printed goes to stderr). The process ends with os._exit once
    everything is written: a Python that has loaded torch otherwise takes a second or more to tear down,
    and a cancelled worker must be gone within 2 seconds.
    """
    events_out = None
    try:
        events_out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no real stdout (an embedding host): print as usual
        events_out = None
    code = Worker(folder, events_out).run()
    for stream in (events_out, sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
