"""Measure the job machinery: worker start-up, event latency, cancel time, and how many jobs at once the
service holds with none lost.

    python benchmarks/jobs_bench.py [--repeat 5] [--jobs 50] [--gpus 1] [--json results.json]

- start-up: from starting `python -m pscv worker` to its first event (`started`, printed once torch is
  imported and the device chosen), and to its first training step;
- event latency: from the moment the worker stamps an event (its "time", just before printing it) to the
  moment a JobClient consumer sees it: local (stdout pipe + reader thread) and remote (stdout -> events.jsonl
  -> the service -> server-sent events);
- cancel: from SIGTERM / the cancel file / JobClient.cancel() to the worker process gone (or the
  `cancelled` state seen by the client);
- concurrency: N jobs submitted at once from N threads to a real `pscv serve` on 127.0.0.1; all must end
  `done` and download byte-identical to the service's file.

Jobs are tiny (a 3x32x32 volume, a 4-8 channel U-Net, 32x32 slices), so the figures are the machinery's,
not training's. Workers run with OMP_NUM_THREADS=1 (on a small shared CPU, more torch threads mostly wait).
"""

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "PSCVSegment"), str(HERE.parent / "Testing")]

from conftest import TINY_SETTINGS, write_tiny_case, write_tiny_job  # noqa: E402

from pscv.jobs.client import JobClient  # noqa: E402
from pscv.jobs.folder import CANCEL_FILE, PID_FILE, read_state  # noqa: E402
from pscv.jobs.processes import worker_environment  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1"}
TOKEN = "benchmark-token-0123456789abcdef"


def summary(values) -> dict:
    values = sorted(values)
    return {"n": len(values), "median": statistics.median(values), "min": values[0], "max": values[-1],
            "p95": values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]}


def start_worker(folder: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pscv", "worker", str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=worker_environment({**os.environ, **ENV}), text=True)


def startup(work: Path, repeat: int) -> dict:
    first_event, first_step, whole = [], [], []
    for n in range(repeat):
        folder = write_tiny_job(work / f"startup-{n}")
        started = time.monotonic()
        process = start_worker(folder)
        for line in process.stdout:
            event = json.loads(line)
            now = time.monotonic() - started
            if event["event"] == "started":
                first_event.append(now)
            if event.get("stage") == "train" and event.get("step", 0) >= 1 and len(first_step) <= n:
                first_step.append(now)
        process.wait()
        whole.append(time.monotonic() - started)
    return {"first_event_s": summary(first_event), "first_training_step_s": summary(first_step),
            "tiny_job_s": summary(whole)}


def latencies(job, seconds: float) -> list:
    """Seconds between each event's stamp and the consumer seeing it, for `seconds` of a running job."""
    found, deadline, cancelled = [], time.monotonic() + seconds, False
    for event in job.events():
        seen = time.time()
        if event["event"] == "progress":
            found.append(seen - event["time"])
        if time.monotonic() > deadline and not cancelled:
            job.cancel()
            cancelled = True
    return found


def cancel_times(work: Path, repeat: int) -> dict:
    results = {}
    for how in ("SIGTERM", "cancel file", "SIGTERM during start-up"):
        times = []
        for n in range(repeat):
            folder = write_tiny_job(work / f"cancel-{how[:6]}-{n}", iterations=1_000_000)
            process = start_worker(folder)
            if how.startswith("during"):
                while not (folder / PID_FILE).exists():  # signal handlers in place, torch not loaded yet
                    time.sleep(0.01)
            else:
                for line in process.stdout:
                    if json.loads(line).get("stage") == "train":
                        break
            asked = time.monotonic()
            if how == "cancel file":
                (folder / CANCEL_FILE).touch()
            else:
                process.send_signal(signal.SIGTERM)
            process.stdout.read()
            process.wait()
            times.append(time.monotonic() - asked)
            assert read_state(folder)["state"] == "cancelled"
            assert not (folder / "result.seg.nrrd").exists() and not (folder / "result-model").exists()
        results[how] = summary(times)
    client = JobClient(jobs_dir=work / "client-jobs", env=ENV)
    times = []
    for _ in range(repeat):
        case = write_tiny_case(work / "case")
        job = client.submit("segment", **case, settings={**TINY_SETTINGS, "iterations": 1_000_000})
        for event in job.events():
            if event.get("stage") == "train":
                break
        asked = time.monotonic()
        job.cancel()
        assert job.wait(10) == "cancelled"
        job.process.wait()
        times.append(time.monotonic() - asked)
    results["JobClient.cancel() (local)"] = summary(times)
    return results


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(root: Path, gpus: int) -> tuple:
    port = free_port()
    log = open(root.parent / "service.log", "a")
    process = subprocess.Popen([sys.executable, "-m", "pscv", "serve", "--port", str(port), "--root", str(root),
                                "--token", TOKEN, "--gpus", str(gpus)], stdout=log, stderr=log,
                               env=worker_environment({**os.environ, **ENV}))
    client = JobClient(f"http://127.0.0.1:{port}", token=TOKEN)
    for _ in range(300):
        try:
            client._json("GET", "/health")
            return process, client
        except Exception:
            time.sleep(0.1)
    raise SystemExit("pscv serve did not start; see " + str(root.parent / "service.log"))


def concurrency(work: Path, count: int, gpus: int) -> dict:
    root = work / "service"
    process, client = start_service(root, gpus)
    case = write_tiny_case(work / "case")
    most_queued = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            most_queued[0] = max(most_queued[0], client._json("GET", "/health")["queued"])
            time.sleep(0.2)

    def run(number):
        submitted = time.monotonic()
        job = client.submit("segment", **case, settings={**TINY_SETTINGS, "seed": number})
        upload = time.monotonic() - submitted
        state = job.wait(1800)
        path = job.download("segmentation", work / f"result-{number}.seg.nrrd") if state == "done" else None
        intact = path is not None and path.read_bytes() == (root / "jobs" / job.id / "result.seg.nrrd").read_bytes()
        return state, intact, upload

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(count) as pool:
            results = list(pool.map(run, range(count)))
        seconds = time.monotonic() - started
        # remote event latency, on a job that runs alone for a few seconds
        job = client.submit("segment", **case, settings={**TINY_SETTINGS, "iterations": 1_000_000})
        remote = latencies(job, 6.0)
    finally:
        stop.set()
        process.terminate()
        process.wait(30)
    done = sum(state == "done" and intact for state, intact, _ in results)
    return {"submitted": count, "done_and_intact": done, "lost": count - done, "most_queued_at_once": most_queued[0],
            "gpus": gpus, "seconds": seconds, "jobs_per_minute": 60 * count / seconds,
            "upload_s": summary([u for _, _, u in results]), "remote_event_latency_s": summary(remote)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each start-up and cancel measurement")
    parser.add_argument("--jobs", type=int, default=50, help="jobs submitted at once to the service")
    parser.add_argument("--gpus", type=int, default=1, help="pscv serve --gpus (jobs run at once)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    import torch

    machine = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": os.cpu_count(),
               "python": platform.python_version(), "torch": torch.__version__,
               "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    with tempfile.TemporaryDirectory(prefix="pscv-jobs-bench-") as work:
        work = Path(work)
        figures = {"machine": machine, "startup": startup(work, args.repeat)}
        client = JobClient(jobs_dir=work / "latency-jobs", env=ENV)
        case = write_tiny_case(work / "latency-case")
        figures["local_event_latency_s"] = summary(latencies(client.submit(
            "segment", **case, settings={**TINY_SETTINGS, "iterations": 1_000_000}), 6.0))
        figures["cancel_s"] = cancel_times(work, args.repeat)
        figures["service"] = concurrency(work, args.jobs, args.gpus)
    figures["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(json.dumps(figures, indent=2))
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


def report(f: dict) -> None:
    def ms(s):
        return f"median {s['median'] * 1000:.0f} ms (min {s['min'] * 1000:.0f}, max {s['max'] * 1000:.0f}, n={s['n']})"

    m, service = f["machine"], f["service"]
    print(f"\n# pscv jobs benchmark, {m['date']}, {m['cpus']} CPUs, Python {m['python']}, torch {m['torch']}")
    print(f"worker start-up to first event:   {ms(f['startup']['first_event_s'])}")
    print(f"worker start-up to first step:    {ms(f['startup']['first_training_step_s'])}")
    print(f"tiny segment job, whole:          {ms(f['startup']['tiny_job_s'])}")
    print(f"event latency, local:             {ms(f['local_event_latency_s'])}, p95 "
          f"{f['local_event_latency_s']['p95'] * 1000:.0f} ms")
    print(f"event latency, remote (SSE):      {ms(service['remote_event_latency_s'])}, p95 "
          f"{service['remote_event_latency_s']['p95'] * 1000:.0f} ms")
    for how, s in f["cancel_s"].items():
        print(f"cancel, {how + ':':<28} {ms(s)}")
    print(f"service: {service['submitted']} jobs submitted at once, {service['done_and_intact']} done and "
          f"downloaded intact, {service['lost']} lost; up to {service['most_queued_at_once']} queued at once; "
          f"{service['seconds']:.0f} s ({service['jobs_per_minute']:.0f} jobs/min, --gpus {service['gpus']}); "
          f"upload {ms(service['upload_s'])}")


if __name__ == "__main__":
    main()
