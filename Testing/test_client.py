"""pscv.jobs.client.JobClient with local worker processes: events, poll without blocking, cancel, a killed
worker, results, finding a job again."""

import os
import signal
import time

import pytest
from conftest import TINY_SETTINGS, UNTIL_STOPPED

from pscv import PSCVError
from pscv.data.segmentations import read_segmentation
from pscv.jobs.client import JobClient
from pscv.jobs.folder import PID_FILE, read_events, read_state
from pscv.learn.models import load_model

# One torch thread per worker: on a busy 2-core machine more threads mostly wait for each other.
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture
def client(tmp_path):
    return JobClient(jobs_dir=tmp_path / "jobs", env=ENV)


def wait_for(job, predicate, timeout=60.0) -> list:
    """Poll (as a GUI timer would) until an event satisfies `predicate`; the events seen."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += job.poll()
        if any(predicate(e) for e in seen):
            return seen
        time.sleep(0.02)
    raise AssertionError(f"no such event within {timeout} s; last: {seen[-3:]}")


def visible_results(folder) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("result") or ".partial-" in p.name)


def test_a_local_job_runs_to_done_and_its_results_download(client, tiny_case, tmp_path):
    job = client.submit("segment", **tiny_case, settings={**TINY_SETTINGS, "iterations": 4, "train_model": True})
    assert job.state == "running" and len(job.id) == 32
    slowest_poll = 0.0
    events = []
    while not job.finished:
        started = time.monotonic()
        events += job.poll()
        slowest_poll = max(slowest_poll, time.monotonic() - started)
        time.sleep(0.01)
    events += job.poll()
    assert slowest_poll < 0.05  # poll never waits for the worker
    assert job.wait(10) == "done" and job.message == "segment finished"
    assert events[0]["event"] == "started" and events[-1]["event"] == "done"
    assert job.poll() == [] and list(job.events()) == []  # nothing twice
    (tmp_path / "out").mkdir()
    segmentation = job.download("segmentation", tmp_path / "out")
    assert segmentation == tmp_path / "out" / "result.seg.nrrd"
    assert job.download("segmentation", tmp_path / "named.seg.nrrd") == tmp_path / "named.seg.nrrd"
    assert read_segmentation(segmentation, load_model(job.download("model")).classes).shape == (3, 32, 32)
    model = job.download("model", tmp_path / "my-model")
    assert load_model(model).metadata["training"]["device"] == "cpu"
    # found again by its id: the same events, the same state
    again = client.job(job.id)
    assert again.wait(10) == "done"
    assert [e["event"] for e in again.events()] == [e["event"] for e in events]
    assert [item["state"] for item in client.list_jobs()] == ["done"]
    job.delete()
    assert not job.folder.exists()


def test_events_iterates_until_the_job_ends(client, tiny_case):
    job = client.submit("segment", **tiny_case, settings=TINY_SETTINGS)
    events = list(job.events(timeout=60))
    assert events[-1]["event"] == "done" and job.state == "done"
    steps = [e["step"] for e in events if e.get("stage") == "train"]
    assert steps == sorted(steps)


def test_cancel_stops_a_local_job_within_2_seconds(client, tiny_case):
    job = client.submit("segment", **tiny_case, settings=UNTIL_STOPPED)
    wait_for(job, lambda e: e.get("stage") == "train")
    asked = time.monotonic()
    job.cancel()
    assert job.wait(5) == "cancelled"
    assert job.process.poll() is not None
    assert time.monotonic() - asked < 2.0
    assert visible_results(job.folder) == []
    assert read_state(job.folder)["state"] == "cancelled"
    with pytest.raises(PSCVError, match="is cancelled"):
        job.download("segmentation", "anywhere.seg.nrrd")


def test_a_worker_killed_mid_job_is_a_failed_job_with_no_partial_result(client, tiny_case):
    job = client.submit("segment", **tiny_case, settings=UNTIL_STOPPED)
    wait_for(job, lambda e: e.get("stage") == "train")
    # what a half-written result looks like (the atomic writer's temporary name)
    (job.folder / f".result.seg.nrrd.partial-{job.process.pid}.seg.nrrd").write_bytes(b"NRRD0004\nhalf")
    os.kill(job.process.pid, signal.SIGKILL)
    assert job.wait(10) == "error"
    assert "killed by signal 9" in job.message
    events = job.poll()
    assert events[-1]["event"] == "error"
    assert visible_results(job.folder) == []
    # the next reader of the folder sees a failed job too
    assert read_state(job.folder)["state"] == "error"
    assert read_events(job.folder)[0][-1]["event"] == "error"


def test_a_folder_whose_worker_died_without_a_word_reads_as_failed(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "job.json").write_text("{}")
    assert read_state(folder)["state"] == "queued"  # no worker ever started
    (folder / PID_FILE).write_text("999999999\n")  # no such process
    state = read_state(folder)
    assert state["state"] == "error" and "stopped without finishing" in state["message"]


def test_submit_refuses_bad_requests_before_starting_anything(client, tiny_case, tmp_path):
    with pytest.raises(PSCVError, match="unknown job kind"):
        client.submit("explode", **tiny_case)
    with pytest.raises(PSCVError, match="needs the input"):
        client.submit("segment", image=tiny_case["image"], classes=tiny_case["classes"])
    with pytest.raises(PSCVError, match="no job"):
        client.job("../../etc")
    assert list((tmp_path / "jobs").iterdir()) == []
