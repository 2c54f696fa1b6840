"""`pscv serve` as a real uvicorn process on 127.0.0.1: the token, the upload limit, crafted names and ids,
20 jobs at once through the queue, cancel, and a restart that keeps the finished results."""

import errno
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import types
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import TINY_SETTINGS, UNTIL_STOPPED, fill, small_disk

from pscv import PSCVError
from pscv.data.classes import read_classes
from pscv.data.segmentations import read_segmentation
from pscv.jobs.client import JobClient
from pscv.jobs.processes import worker_environment
from pscv.learn.models import load_model

TOKEN = "a-test-token-of-enough-length-1234"
LONG_JOBS = ("--limit", "iterations=1000000")  # jobs of a million iterations (UNTIL_STOPPED) are let in
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A `python -m pscv serve` process (its token in PSCV_TOKEN, or none); workers get one torch thread each
    (2 shared cores)."""

    def __init__(self, root: Path, *options, token: str | None = TOKEN):
        self.root, self.options, self.process, self.token = Path(root), options, None, token
        self.log = self.root.parent / f"{self.root.name}-server.log"

    def start(self) -> "Server":
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {key: value for key, value in os.environ.items() if key != "PSCV_TOKEN"}
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pscv", "serve", "--port", str(self.port), "--root", str(self.root),
                 *self.options], stdout=log, stderr=log,
                env=worker_environment({**environment, "OMP_NUM_THREADS": "1",
                                        **({"PSCV_TOKEN": self.token} if self.token else {})}))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "/health", headers=AUTH if self.token else {}, timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"pscv serve did not start: {self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("service") / "root", "--max-upload-mb", "1", "--gpus", "2",
                    *LONG_JOBS).start()
    yield server
    server.stop()


@pytest.fixture
def client(service):
    return JobClient(service.url, token=TOKEN)


def case_files(case: dict) -> list:
    return [("image", ("image.nrrd", case["image"].read_bytes())),
            ("points", ("points.mrk.json", case["points"][0].read_bytes())),
            ("classes", ("classes.json", case["classes"].read_bytes()))]


def post_job(service, files, kind="segment", settings=None):
    return httpx.post(service.url + "/jobs", headers=AUTH, data={"kind": kind, "settings": json.dumps(
        settings if settings is not None else TINY_SETTINGS)}, files=files, timeout=30)


def all_files(folder: Path) -> set:
    return {p.name for p in folder.rglob("*")}


def test_requests_without_the_token_get_401(service):
    job_id = "0" * 32
    for method, path in (("GET", "/health"), ("GET", "/jobs"), ("POST", "/jobs"), ("GET", f"/jobs/{job_id}"),
                         ("GET", f"/jobs/{job_id}/stream"), ("POST", f"/jobs/{job_id}/cancel"),
                         ("GET", f"/jobs/{job_id}/result/segmentation"), ("DELETE", f"/jobs/{job_id}")):
        response = httpx.request(method, service.url + path)
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(service.url + "/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(service.url + "/health", headers={"Authorization": TOKEN}).status_code == 401  # no "Bearer"
    with pytest.raises(PSCVError, match="needs its token"):
        JobClient(service.url, token="wrong").list_jobs()


def test_an_oversized_upload_gets_413_and_leaves_nothing(service, tiny_case):
    big = [("image", ("image.nrrd", os.urandom(2 * 2**20)))] + case_files(tiny_case)[1:]
    assert post_job(service, big).status_code == 413  # Content-Length over the limit

    def chunks():  # no Content-Length: counted as it comes
        yield b"--x\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.nrrd\"\r\n\r\n"
        for _ in range(40):
            yield os.urandom(64 * 1024)

    response = httpx.post(service.url + "/jobs", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=x"},
                          content=chunks(), timeout=30)
    assert response.status_code == 413 and "limit of 1 MB" in response.json()["detail"]
    with pytest.raises(PSCVError, match="more than the 1 MB"):  # the client says so before uploading
        JobClient(service.url, token=TOKEN).submit("segment", image=_big_file(tiny_case), points=tiny_case["points"],
                                                   classes=tiny_case["classes"])
    assert not [p for p in (service.root / "jobs").iterdir() if p.name.startswith(".incoming")]


def _big_file(case) -> Path:
    path = case["image"].parent / "big.nrrd"
    path.write_bytes(os.urandom(2 * 2**20))
    return path


def test_crafted_file_names_and_ids_stay_inside_the_service_folder(service, tiny_case, tmp_path):
    outside = service.root.parent
    before = all_files(outside)
    files = [("image", ("../../../escape-image.nrrd", tiny_case["image"].read_bytes())),
             ("points", ("../../escape-points.mrk.json", tiny_case["points"][0].read_bytes())),
             ("points", ("..\\..\\organ.fcsv", b"# Markups fiducial file version = 4.11\n")),
             ("points", ("$(rm -rf ~);.fcsv", b"# Markups fiducial file version = 4.11\n")),
             ("classes", ("/etc/passwd", tiny_case["classes"].read_bytes()))]
    response = post_job(service, files, settings={**TINY_SETTINGS, "iterations": 1})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    folder = service.root / "jobs" / job_id
    stored = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    # fixed names; a .fcsv keeps its name (it names the point list) only when it is plain letters and digits
    assert {"image.nrrd", "points-1.mrk.json", "points-2/organ.fcsv", "points-3/points-3.fcsv",
            "classes.json"} <= set(stored)
    assert not [name for name in all_files(outside) - before if "escape" in name or name == "passwd"]
    # a crafted zip (zip slip, links) is refused and nothing is unpacked outside
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("model.json", "{}")
        out.writestr("../../escape-zip.txt", "gotcha")
    response = post_job(service, case_files(tiny_case) + [("model", ("model.zip", archive.getvalue()))], "finetune")
    assert response.status_code == 400 and "refusing the member" in response.json()["detail"]
    assert not list(outside.rglob("escape-zip.txt"))
    # ids: only the service's own, and results only by name
    for path in (f"/jobs/{'../' * 3}etc/passwd", "/jobs/..%2F..%2Fjob.json", f"/jobs/{job_id.upper()}",
                 f"/jobs/{job_id}%2F..%2F{job_id}", f"/jobs/{job_id}/result/..%2Fjob.json",
                 f"/jobs/{job_id}/result/job.json", "/jobs/%2e%2e/result/segmentation"):
        response = httpx.get(service.url + path, headers=AUTH)
        assert response.status_code == 404, (path, response.status_code, response.text)
    with pytest.raises(PSCVError, match="404"):
        JobClient(service.url, token=TOKEN).job("../../etc")


def test_bad_requests_get_400_with_the_reason(service, tiny_case):
    response = post_job(service, case_files(tiny_case), kind="explode")
    assert response.status_code == 400 and "unknown job kind 'explode'" in response.json()["detail"]
    response = post_job(service, case_files(tiny_case)[:1], kind="segment")
    assert response.status_code == 400 and "needs the input(s) points, classes" in response.json()["detail"]
    response = httpx.post(service.url + "/jobs", headers=AUTH, data={"kind": "segment", "settings": "{oops"},
                          files=case_files(tiny_case))
    assert response.status_code == 400 and "settings: not valid JSON" in response.json()["detail"]
    files = [("image", ("image.exe", b"MZ"))] + case_files(tiny_case)[1:]
    assert "send .nrrd" in post_job(service, files).json()["detail"]


def test_twenty_jobs_submitted_at_once_all_finish_and_download_intact(service, client, tiny_case, tmp_path):
    def run(number):
        job = client.submit("segment", **tiny_case, settings={**TINY_SETTINGS, "seed": number})
        state = job.wait(180)
        return job, state, job.download("segmentation", tmp_path / f"{number}.seg.nrrd")

    started = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(run, range(20)))
    seconds = time.monotonic() - started
    assert [state for _, state, _ in results] == ["done"] * 20, [job.message for job, _, _ in results]
    assert len({job.id for job, _, _ in results}) == 20
    classes = read_classes(tiny_case["classes"])
    spans = []
    for job, _, path in results:
        folder = service.root / "jobs" / job.id
        assert path.read_bytes() == (folder / "result.seg.nrrd").read_bytes()
        assert read_segmentation(path, classes).shape == (3, 32, 32)
        events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
        kinds = [e["event"] for e in events]
        assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "done"
        spans.append((events[1]["time"], events[-1]["time"]))
    # the queue ran at most --gpus 2 jobs at a time
    most = max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)
    assert most <= 2
    # polling gives the same events as the stream did
    job = results[0][0]
    polled = httpx.get(f"{service.url}/jobs/{job.id}/events", headers=AUTH).json()
    assert polled["state"] == "done" and polled["events"][-1]["event"] == "done"
    later = httpx.get(f"{service.url}/jobs/{job.id}/events?after=2", headers=AUTH).json()
    assert later["events"] == polled["events"][2:]
    listed = {item["id"]: item["state"] for item in client.list_jobs()}
    assert all(listed[job.id] == "done" for job, _, _ in results)
    print(f"20 jobs in {seconds:.1f} s")


def test_pscv_segment_with_server_runs_there_and_writes_here(service, tiny_case, tmp_path):
    out = tmp_path / "out.nii.gz"  # the service writes .seg.nrrd: converted on this side
    command = [sys.executable, "-m", "pscv", "segment", str(tiny_case["image"]), "--points",
               str(tiny_case["points"][0]), "--classes", str(tiny_case["classes"]), "--out", str(out),
               "--save-model", str(tmp_path / "model"), "--server", service.url, "--device", "cpu",
               "--iterations", "2", "--image-size", "32", "--batch-size", "2", "--set", "widths=[4,8]",
               "--set", "dropout=[0,0]", "--suggest", "2", "--suggest-out", str(tmp_path / "next.mrk.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PSCV_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert f"on {service.url}, cpu" in result.stdout
    assert re.search(r"pscv segment: queued \(\d+ jobs? ahead\)", result.stderr), result.stderr
    assert read_segmentation(out, load_model(tmp_path / "model").classes).shape == (3, 32, 32)
    suggested = json.loads((tmp_path / "next.mrk.json").read_text())["markups"][0]["controlPoints"]
    assert len(suggested) == 2
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PSCV_TOKEN": "wrong"})
    assert result.returncode == 2 and "needs its token" in result.stderr and "Traceback" not in result.stderr


def test_a_remote_job_is_cancelled_within_2_seconds(service, client, tiny_case):
    job = client.submit("segment", **tiny_case, settings=UNTIL_STOPPED)
    for event in job.events(timeout=60):
        if event.get("stage") == "train":
            break
    asked = time.monotonic()
    job.cancel()
    assert job.wait(5) == "cancelled"
    assert time.monotonic() - asked < 2.0
    assert not (service.root / "jobs" / job.id / "result.seg.nrrd").exists()
    with pytest.raises(PSCVError, match="409"):
        client._json("GET", f"/jobs/{job.id}/result/segmentation")
    job.delete()
    assert not (service.root / "jobs" / job.id).exists()


def test_a_restarted_service_keeps_serving_finished_results(tmp_path, tiny_case):
    server = Server(tmp_path / "root", *LONG_JOBS).start()
    try:
        client = JobClient(server.url, token=TOKEN)
        finished = client.submit("segment", **tiny_case, settings=TINY_SETTINGS)
        assert finished.wait(60) == "done"
        first = finished.download("segmentation", tmp_path / "first.seg.nrrd").read_bytes()
        # one job running and one queued behind it when the service stops
        running = post_job(server, case_files(tiny_case), settings=UNTIL_STOPPED)
        queued = post_job(server, case_files(tiny_case))
        running_id, queued_id = running.json()["id"], queued.json()["id"]
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/jobs/{running_id}", headers=AUTH).json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        server.stop()
    server.start()
    try:
        client = JobClient(server.url, token=TOKEN)
        again = client.job(finished.id)
        assert again.wait(10) == "done"
        assert again.download("segmentation", tmp_path / "again.seg.nrrd").read_bytes() == first
        assert client.job(running_id).wait(10) == "cancelled"  # stopped with the service
        assert client.job(queued_id).wait(60) == "done"  # still queued: run after the restart
        assert {item["id"] for item in client.list_jobs()} == {finished.id, running_id, queued_id}
    finally:
        server.stop()


def test_it_refuses_to_listen_beyond_this_machine_without_a_token(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k != "PSCV_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "pscv", "serve", "--host", "0.0.0.0", "--port", str(free_port()),
                             "--root", str(tmp_path)], capture_output=True, text=True, timeout=30, env=environment)
    assert result.returncode == 2 and "refusing to listen on 0.0.0.0 without a token" in result.stderr


# Without a token; limits; full disks; paths in replies (issue 13) -------------------------------------------


@pytest.fixture(scope="module")
def open_service(tmp_path_factory):
    """A service without a token (this machine only), that cuts off clients stalled for 1 s."""
    server = Server(tmp_path_factory.mktemp("open") / "root", "--stall-timeout", "1", token=None).start()
    yield server
    server.stop()


def jobs_of(server) -> set:
    return {p.name for p in (server.root / "jobs").iterdir()}


def test_without_a_token_foreign_hosts_and_origins_are_refused(open_service):
    url, port = open_service.url, open_service.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]"):
        assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200, host
    rebound = httpx.get(url + "/health", headers={"Host": "attacker.example.com"})  # DNS rebinding
    assert rebound.status_code == 403 and "not this service's name" in rebound.json()["detail"]
    before = jobs_of(open_service)
    form = {"kind": "segment", "settings": json.dumps(TINY_SETTINGS)}
    foreign = httpx.post(url + "/jobs", data=form, headers={"Origin": "http://attacker.example.com"},
                         files=[("image", ("image.nrrd", b"x"))])
    assert foreign.status_code == 403 and "cross-origin" in foreign.json()["detail"]
    assert httpx.post(url + "/jobs", data=form, headers={"Origin": "null"}).status_code == 403
    assert jobs_of(open_service) == before
    same = httpx.post(url + "/jobs", data={**form, "kind": "explode"}, headers={"Origin": url})
    assert same.status_code == 400  # this machine's own page: heard (and refused for its content)


def test_stalled_requests_are_cut_off(open_service):
    with socket.create_connection(("127.0.0.1", open_service.port), timeout=20) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers that never end
        assert connection.recv(1024) == b""  # closed by the service, not by our 20 s timeout
    with socket.create_connection(("127.0.0.1", open_service.port), timeout=20) as connection:
        connection.sendall(b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                           b"boundary=x\r\nContent-Length: 1000\r\n\r\n--x\r\n")  # a body that stops
        reply = b""
        while chunk := connection.recv(4096):  # until the service closes the connection
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"stopped coming" in reply, reply


def test_error_replies_name_no_path_of_the_service(service, tiny_case):
    response = post_job(service, case_files(tiny_case)[:1])
    assert response.status_code == 400 and "job.json" in response.json()["detail"]
    files = [("image", ("image.nrrd", b"NRRD0004\nnot an image\n"))] + case_files(tiny_case)[1:]
    job_id = post_job(service, files).json()["id"]
    assert JobClient(service.url, token=TOKEN).job(job_id).wait(60) == "error"
    replies = [post_job(service, case_files(tiny_case)[:1]).text, httpx.get(f"{service.url}/jobs/{job_id}",
               headers=AUTH).text, httpx.get(f"{service.url}/jobs/{job_id}/events", headers=AUTH).text,
               httpx.get(f"{service.url}/jobs/{job_id}/stream", headers=AUTH).text]
    assert "image.nrrd: could not read the image" in replies[1]
    for reply in replies:
        assert str(service.root) not in reply and ".incoming" not in reply, reply


def zip_of(members: dict) -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for name, data in members.items():
            out.writestr(name, data)
    return archive.getvalue()


@pytest.mark.parametrize("members, message", [
    ({"x": "a file", "x/y": "and a file in a folder of the same name"}, "clashes with another"),
    ({"a" * 6000: "a name of 6000 characters"}, "refusing the member"),
    ({"zeros.raw": bytes(3 * 2**20)}, "more than 2 MB once unpacked"),  # the quota: twice --max-upload-mb 1
])
def test_hostile_zips_get_400_and_leave_nothing(service, members, message):
    before = jobs_of(service)
    response = post_job(service, [("dataset", ("dataset.zip", zip_of(members)))], kind="train")
    assert response.status_code == 400 and message in response.json()["detail"], response.text
    assert jobs_of(service) == before


def test_settings_nested_deeply_or_beyond_the_services_limits_get_400(service, tiny_case):
    response = httpx.post(service.url + "/jobs", headers=AUTH, files=case_files(tiny_case),
                          data={"kind": "segment", "settings": "[" * 100_000 + "]" * 100_000})
    assert response.status_code == 400 and "nested too deeply" in response.json()["detail"]
    response = post_job(service, case_files(tiny_case), settings={"image_size": 16384, "batch_size": 64})
    assert response.status_code == 400 and "setting image_size: got 16384" in response.json()["detail"]
    response = post_job(service, case_files(tiny_case), settings={"image_size": 2048})
    assert response.status_code == 400
    assert "setting image_size: got 2048; this service takes at most 1024" in response.json()["detail"]
    response = post_job(service, case_files(tiny_case), settings={"image_size": "abc"})
    assert response.status_code == 400 and "setting image_size: got 'abc'" in response.json()["detail"]


def test_an_upload_on_a_full_disk_gets_507(tmp_path, tiny_case):
    with small_disk(tmp_path / "disk", size="2m") as disk:
        server = Server(disk / "root").start()
        try:
            fill(disk / ".filler")
            response = post_job(server, case_files(tiny_case))
            assert response.status_code == 507 and "disk is full" in response.json()["detail"], response.text
            assert str(disk) not in response.text
        finally:
            server.stop()


def test_the_token_comes_from_a_file_or_the_environment_and_on_the_command_line_is_warned_about(tmp_path, capsys):
    from pscv import cli

    parser = cli.build_parser()
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert cli._token(parser.parse_args(["serve", "--token-file", str(tmp_path / "token")])) == TOKEN
    assert cli._token(parser.parse_args(["serve", "--token", "on-the-command-line"])) == "on-the-command-line"
    assert "--token shows in the process list (ps)" in capsys.readouterr().err


def test_a_worker_that_cannot_write_leaves_no_job_looking_queued(tmp_path, tiny_case, monkeypatch):
    """The worker's files are limited to 0 bytes (a full disk for it), and the service's own writes fail too:
    the job still ends, as an error, in what the service says."""
    from pscv.jobs import server

    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nulimit -f 0\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    service = server.Service(tmp_path / "root", python=str(python))
    uploads = [types.SimpleNamespace(filename=path.name, file=open(path, "rb"))
               for path in (tiny_case["image"], tiny_case["points"][0], tiny_case["classes"])]
    job_id = service.submit("segment", json.dumps(TINY_SETTINGS), uploads[0], [uploads[1]], uploads[2])["id"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(server, "write_state", full)
    service.start()
    try:
        deadline = time.monotonic() + 60
        while service.info(job_id)["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, "the job still looks queued"
            time.sleep(0.1)
        info = service.info(job_id)
        assert info["state"] == "error" and "cannot write to the job folder" in info["message"]
        events, _ = service.events(job_id, service.folder(job_id))
        assert events[-1]["event"] == "error"
    finally:
        service.stop()
        for upload in uploads:
            upload.file.close()


def test_ended_jobs_older_than_keep_days_are_removed(tmp_path):
    from pscv.jobs import folder as job_folder
    from pscv.jobs.server import Limits, Service

    jobs = tmp_path / "root" / "jobs"
    ids = {"old": "a" * 32, "recent": "b" * 32, "queued": "c" * 32}
    for job_id in ids.values():
        (jobs / job_id).mkdir(parents=True)
        (jobs / job_id / "job.json").write_text("{}")
    job_folder.write_state(jobs / ids["old"], "done")
    job_folder.write_state(jobs / ids["recent"], "done")
    state = json.loads((jobs / ids["old"] / "state.json").read_text())
    (jobs / ids["old"] / "state.json").write_text(json.dumps({**state, "time": time.time() - 8 * 86400}))
    service = Service(tmp_path / "root", limits=Limits(keep_days=7))
    service.recover()
    assert {p.name for p in jobs.iterdir()} == {ids["recent"], ids["queued"]}
