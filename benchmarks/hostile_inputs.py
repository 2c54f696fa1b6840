"""Re-run the hostile cases of issue 13 and count tracebacks, data loss and leftovers.

    python benchmarks/hostile_inputs.py [--keep] [--engine PSCVSEGMENT_DIR] [--skip TEXT]

`--engine` runs the processes on another copy of the engine (e.g. an older commit's `PSCVSegment`, from
`git archive`), to count what it did; `--skip TEXT` leaves out the cases whose name holds TEXT (before the fix,
the 20000x20000x5 header takes 7.9 GB).

Every case runs real `python -m pscv` processes (commands, workers, a `pscv serve` on 127.0.0.1) on real files
in a fresh folder, and is judged by what it leaves:
- traceback: "Traceback" in the process's output, or an HTTP 500 from the service;
- data loss: a file that was there before the case (an input, a finished job's result) changed or went away;
- leftovers: a `.partial-` file or folder, or, after a failed command, any new file or folder.
Each case also says whether it did what it should (exit status, message, reply); a case that needs root (a
tmpfs for full and read-only disks) is skipped without it. Prints one line per case and the totals.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PSCVSegment"))

from pscv.data.classes import ClassInfo, write_classes  # noqa: E402
from pscv.data.clicks import simulate_clicks, write_markups  # noqa: E402
from pscv.data.volumes import Volume, write_image  # noqa: E402

CLASSES = [ClassInfo("background", 0, (0, 0, 0)), ClassInfo("organ", 1, (230, 159, 0))]
TINY = ["--device", "cpu", "--iterations", "2", "--image-size", "32", "--batch-size", "2", "--set", "widths=[4,8]",
        "--set", "dropout=[0,0]", "--quiet"]
TINY_SETTINGS = {"device": "cpu", "iterations": 2, "image_size": 32, "batch_size": 2, "widths": [4, 8],
                 "dropout": [0.0, 0.0]}
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "PSCVSegment"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("PSCV_TOKEN", None)
RESULTS: list[dict] = []
SKIP: list[str] = []


# Files --------------------------------------------------------------------------------------------------------

def tiny_case(folder: Path) -> dict:
    """image.nrrd, points.mrk.json, classes.json of a 3 x 32 x 32 volume with a bright box."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.zeros((3, 32, 32), dtype=np.uint8)
    labels[:, 8:20, 10:24] = 1
    noise = np.random.default_rng(0).normal(0, 30, labels.shape)
    volume = Volume((labels * 800.0 + noise).astype(np.float32), spacing=(1.0, 1.0, 3.0))
    paths = {"image": folder / "image.nrrd", "points": folder / "points.mrk.json", "classes": folder / "classes.json"}
    write_image(volume, paths["image"])
    write_classes(CLASSES, paths["classes"])
    write_markups(simulate_clicks(labels, seed=0, slice_axis=0), volume, CLASSES, paths["points"])
    return paths


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


def judge(name: str, before: dict, after: dict, output: str, ok: bool, failed: bool, allowed=()) -> dict:
    """Record a case: tracebacks in `output`, files of `before` changed or gone, leftovers in `after`."""
    lost = [path for path, data in before.items() if data is not None and after.get(path, b"\0gone") != data]
    new = [path for path in after if path not in before and not any(path.startswith(a) for a in allowed)]
    leftovers = [path for path in after if ".partial-" in path] + (new if failed else [])
    result = {"case": name, "traceback": "Traceback" in output or "HTTP 500" in output, "lost": lost,
              "leftovers": sorted(set(leftovers)), "ok": ok}
    RESULTS.append(result)
    status = "ok " if ok else "BAD"
    extra = "".join(f" {key}={result[key]}" for key in ("lost", "leftovers") if result[key])
    print(f"{status} {name}{' TRACEBACK' if result['traceback'] else ''}{extra}", flush=True)
    return result


def pscv(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pscv", *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=timeout)


def refused(name: str, root: Path, args, message: str = "", code: int = 2) -> None:
    """A command that must be refused: exit `code`, `message` in stderr, nothing changed, nothing left."""
    if any(text in name for text in SKIP):
        print(f"skipped: {name}")
        return
    before = snapshot(root)
    result = pscv(*args)
    output = result.stdout + result.stderr
    judged = judge(name, before, snapshot(root), output, result.returncode == code and message in result.stderr,
                   result.returncode != 0)
    restore(root, before, judged)


def restore(root: Path, before: dict, judged: dict) -> None:
    """Put back what a case changed, so that the next case starts from the same files."""
    for path in judged["lost"]:
        with contextlib.suppress(OSError):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).unlink(missing_ok=True)  # a hard link gets a file of its own
            (root / path).write_bytes(before[path])
    for path in sorted(judged["leftovers"], reverse=True):
        target = root / path
        with contextlib.suppress(OSError):
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()


@contextlib.contextmanager
def tmpfs(path: Path, size="256k", full=False, read_only=False):
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode:
        yield None
        return
    try:
        if full:
            with open(path / ".filler", "wb", buffering=0) as out, contextlib.suppress(OSError):
                while True:
                    out.write(bytes(4096))
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# Command-line cases ------------------------------------------------------------------------------------------

def segment(case: dict, out, *extra) -> list:
    """`pscv segment` on the tiny case; with --save-model, the tiny network's settings."""
    network = TINY if "--save-model" in extra else ["--quiet"]
    return ["segment", case["image"], "--points", case["points"], "--classes", case["classes"], "--out", out,
            *network, *extra]


def markups_case(root: Path, case: dict, name: str, text: str, message: str) -> None:
    path = root / "in" / f"{name}.mrk.json"
    path.write_text(text)
    refused(f"markups: {name}", root, ["segment", case["image"], "--points", path, "--classes", case["classes"],
                                      "--out", root / "out.seg.nrrd", "--quiet"], message)


def command_line_cases(work: Path, model: Path) -> None:
    root = work / "cli"
    case = tiny_case(root / "in")
    link = root / "in" / "link.nrrd"
    os.link(case["image"], link)
    refused("segment --out = a hard link to the image", root, segment(case, link), "which is the input")
    refused("segment --out = the image", root, segment(case, case["image"]), "which is the input")
    refused("predict FOLDER --out FOLDER --format .nrrd", root,
            ["predict", root / "in", "--model", model, "--out", root / "in", "--format", ".nrrd"], "which is the input")
    refused("predict IMAGE --out IMAGE", root, ["predict", case["image"], "--model", model, "--out", case["image"]],
            "which is the input")
    refused("predict FOLDER --out EXISTING_FILE", root, ["predict", root / "in", "--model", model, "--out",
                                                         case["classes"]], "give a folder")
    refused("segment --out x.png", root, segment(case, root / "x.png"), "cannot write this format")
    refused("segment --out EXISTING_FOLDER", root, segment(case, root / "in"), "is a folder")
    refused("segment --out under a file", root, segment(case, case["image"] / "x.seg.nrrd"), "is a file")
    refused("segment --save-model = an input file", root, segment(case, root / "o.seg.nrrd", "--save-model",
                                                                  case["classes"]), "is a file")
    markup = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
              "Schema/markups-schema-v1.0.3.json#", "markups": [{"type": "Fiducial", "name": "organ"}]}
    markups_case(root, case, "controlPoints 5", json.dumps({**markup, "markups": [{**markup["markups"][0],
                                                                                    "controlPoints": 5}]}),
                 "controlPoints")
    markups_case(root, case, "coordinateUnits {}", json.dumps({**markup, "markups": [{
        **markup["markups"][0], "coordinateUnits": {}, "controlPoints": []}]}), "coordinateUnits")
    markups_case(root, case, "nested 100000 deep", "[" * 100_000 + "]" * 100_000, "nested too deeply")
    refused("--points names a folder", root, ["segment", case["image"], "--points", root / "in", "--classes",
                                              case["classes"], "--out", root / "o.seg.nrrd", "--quiet"], "is a folder")
    refused("--classes names a folder", root, ["segment", case["image"], "--points", case["points"], "--classes",
                                               root / "in", "--out", root / "o.seg.nrrd", "--quiet"], "is a folder")
    document = json.loads(case["classes"].read_text())
    document["classes"][1]["terminology"] = "heart"
    (root / "in" / "heart.json").write_text(json.dumps(document))
    refused('classes: "terminology": "heart"', root, ["segment", case["image"], "--points", case["points"],
                                                      "--classes", root / "in" / "heart.json", "--out",
                                                      root / "o.seg.nrrd", "--quiet"], "terminology")
    for setting in ("image_size=abc", "iterations=2.5", "widths=[]", "normalization=5"):
        refused(f"--set {setting}", root, segment(case, root / "o.seg.nrrd", "--set", setting),
                f"setting {setting.split('=')[0]}")
    evaluate = ["evaluate", root / "in" / "label.nrrd", root / "in" / "label.nrrd", "--classes", case["classes"]]
    write_image(Volume(np.zeros((3, 32, 32), np.uint8)), root / "in" / "label.nrrd")
    refused("evaluate --json FOLDER", root, [*evaluate, "--json", root / "in"], "--json")
    refused("evaluate a missing file", root, ["evaluate", root / "nothing.seg.nrrd", root / "in" / "label.nrrd"],
            "no such file")
    refused("pscv without a command", root, [], "usage")
    (root / "in" / "huge.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 20000 20000 5\n"
                                            b"endian: little\nencoding: gzip\n\n")
    started = time.monotonic()
    refused("a 86-byte header claiming 20000x20000x5", root, ["segment", root / "in" / "huge.nrrd", "--points",
                                                              case["points"], "--classes", case["classes"], "--out",
                                                              root / "o.seg.nrrd", "--quiet"], "the header says")
    if RESULTS and RESULTS[-1]["case"].startswith("a 86-byte"):
        RESULTS[-1]["ok"] &= time.monotonic() - started < 20
    (root / "in" / "singular.nrrd").write_bytes(
        b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 2\nspace: left-posterior-superior\n"
        b"space directions: (1,0,0) (1,0,0) (0,0,1)\nendian: little\nencoding: raw\n\n" + bytes(128))
    refused("a singular direction matrix", root, ["segment", root / "in" / "singular.nrrd", "--points",
                                                  case["points"], "--classes", case["classes"], "--out",
                                                  root / "o.seg.nrrd", "--quiet"], "not independent")
    segmentation_cases(root, case)


def segmentation_cases(root: Path, case: dict) -> None:
    from pscv.data.segmentations import write_segmentation
    from pscv.data.volumes import read_image

    volume = read_image(case["image"])
    for field, value in (("LabelValue", "abc"), ("Color", "red green blue")):
        path = root / "in" / f"damaged-{field}.seg.nrrd"
        write_segmentation(path, np.zeros(volume.shape, np.uint8), volume, CLASSES)
        header, _, data = path.read_bytes().partition(b"\n\n")
        lines = [f"Segment0_{field}:={value}".encode() if line.startswith(f"Segment0_{field}:=".encode()) else line
                 for line in header.split(b"\n")]
        path.write_bytes(b"\n".join(lines) + b"\n\n" + data)
        refused(f".seg.nrrd Segment0_{field}:={value}", root, ["export", path, "--out", root / "x.nrrd"],
                f"Segment0_{field}")


def model_cases(work: Path, model: Path) -> None:
    damaged = {
        "missing classes": lambda m: m.pop("classes"),
        "missing network": lambda m: m.pop("network"),
        "missing normalization": lambda m: m.pop("normalization"),
        "negative num_classes": lambda m: m["network"].update(num_classes=-3),
        "image_size 0": lambda m: m["network"].update(image_size=0),
        "widths [16384]*5": lambda m: m["network"].update(widths=[16384] * 5),
        "dropout of another length": lambda m: m["network"].update(dropout=[0.1]),
        "network not an object": lambda m: m.update(network=[1, 2]),
        "unknown method": lambda m: m.update(method="magic"),
    }
    root = work / "models"
    case = tiny_case(root / "in")
    for name, change in damaged.items():
        folder = root / name.replace(" ", "-").replace("*", "x").replace("[", "").replace("]", "")
        shutil.copytree(model, folder)
        metadata = json.loads((folder / "model.json").read_text())
        change(metadata)
        (folder / "model.json").write_text(json.dumps(metadata))
        refused(f"model.json: {name}", root, ["predict", case["image"], "--model", folder, "--out",
                                              root / "out.seg.nrrd", "--quiet"], "model.json")


def disk_cases(work: Path) -> None:
    root = work / "disks"
    case = tiny_case(root / "in")
    with tmpfs(root / "full", full=True) as disk:
        if disk is None:
            print("skipped: full and read-only disks (mounting a tmpfs needs root)")
            return
        for name, args in (("--out on a full disk", segment(case, disk / "result.seg.nrrd")),
                           ("--save-model on a full disk", segment(case, root / "out.seg.nrrd", "--save-model",
                                                                   disk / "model"))):
            before = snapshot(root)
            result = pscv(*args)
            after = snapshot(root)
            judge(name, before, after, result.stdout + result.stderr,
                  result.returncode == 2 and "disk is full" in result.stderr, True, allowed=("out.seg.nrrd",))
    with tmpfs(root / "ro", read_only=True) as disk:
        refused("--out on a read-only disk", root, segment(case, disk / "result.seg.nrrd"), "read-only")
        refused("--json on a read-only disk", root, ["evaluate", case["image"], case["image"], "--classes",
                                                     case["classes"], "--json", disk / "report.json"], "read-only")


def leftover_cases(work: Path) -> None:
    import SimpleITK as sitk

    root = work / "leftovers"
    case = tiny_case(root / "in")
    labels = (np.random.default_rng(0).random((48, 512, 512)) < 0.5).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(root / "in" / "labels.nrrd"), False)
    (root / "out").mkdir()
    before = snapshot(root)
    process = subprocess.Popen([sys.executable, "-m", "pscv", "export", str(root / "in" / "labels.nrrd"), "--classes",
                                str(case["classes"]), "--out", str(root / "out" / "result.nii.gz")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while not list((root / "out").glob(".*partial-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    out, err = ended(process, 60)
    judge("SIGTERM while a file is written", before, snapshot(root), out + err, process.returncode == 143, True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = root / "out" / f".model.partial-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a model (kill -9 during the save)")
    before = {k: v for k, v in snapshot(root).items() if ".partial-" not in k}
    result = pscv(*segment(case, root / "out" / "o.seg.nrrd", "--save-model", root / "out" / "model"))
    judge("a dead process's .model.partial-PID/ on the next save", before, snapshot(root),
          result.stdout + result.stderr, result.returncode == 0, False)


# Workers -----------------------------------------------------------------------------------------------------

def tiny_job(folder: Path, **settings) -> Path:
    tiny_case(folder)
    (folder / "job.json").write_text(json.dumps({
        "version": 1, "kind": "segment", "settings": {**TINY_SETTINGS, "augment": "none", **settings},
        "inputs": {"image": "image.nrrd", "points": ["points.mrk.json"], "classes": "classes.json"}}))
    return folder


def ended(process: subprocess.Popen, timeout: float) -> tuple:
    """(stdout, stderr) of a process, killed if it runs past `timeout` seconds (its returncode is then -9)."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()


def worker(folder: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pscv", "worker", str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def worker_cases(work: Path) -> None:
    folder = tiny_job(work / "workers" / "done")
    first = worker(folder)
    out, err = ended(first, 300)
    before = snapshot(folder)
    second = worker(folder)
    line = second.stdout.readline()
    if second.poll() is None:
        second.send_signal(signal.SIGTERM)
    out2, err2 = ended(second, 60)
    judge("a second worker on a done job, SIGTERM'd", before, snapshot(folder), out + err + line + out2 + err2,
          first.returncode == 0 and "already ended" in line, False)
    folder = tiny_job(work / "workers" / "twice", iterations=60)
    before = snapshot(folder)
    workers = [worker(folder) for _ in range(2)]
    outputs = [ended(w, 300) for w in workers]
    events = [json.loads(line)["event"] for line in (folder / "events.jsonl").read_text().splitlines()]
    judge("two workers started on one folder", before, snapshot(folder), "".join(o + e for o, e in outputs),
          sorted(w.returncode for w in workers) == [0, 1] and events.count("done") == 1, False)
    engine = Path(ENV["PYTHONPATH"]) / "pscv" / "learn" / "single_case.py"
    trains = {"train_model": True} if "train_model" in engine.read_text() else {}  # a segment job that trains
    folder = tiny_job(work / "workers" / "killed", iterations=1_000_000, **trains)
    running = worker(folder)
    for line in running.stdout:
        if '"stage": "train"' in line:
            break
    running.kill()
    running.wait()
    (folder / f".result-model.partial-{running.pid}").mkdir()
    before = {k: v for k, v in snapshot(folder).items() if ".partial-" not in k}
    again = worker(folder)
    out, err = ended(again, 120)
    judge("a worker after a kill -9'd one", before, snapshot(folder), out + err,
          again.returncode == 1 and "worker is gone" in out, False)


# The service -------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zip_bytes(members: dict) -> bytes:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return data.getvalue()


def service_cases(work: Path) -> None:
    import httpx

    root, port = work / "service", free_port()
    case = tiny_case(work / "service-case")
    log = open(work / "service.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "pscv", "serve", "--port", str(port), "--root", str(root),
                               "--max-upload-mb", "1"], stdout=log, stderr=log, env=ENV)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        files = [("image", ("image.nrrd", case["image"].read_bytes())),
                 ("points", ("points.mrk.json", case["points"].read_bytes())),
                 ("classes", ("classes.json", case["classes"].read_bytes()))]

        def post(name, status, headers=None, data=None, upload=files, kind="segment"):
            before = snapshot(root)
            reply = httpx.post(url + "/jobs", headers=headers or {}, files=upload, timeout=60,
                               data={"kind": kind, "settings": json.dumps(TINY_SETTINGS), **(data or {})})
            judge(name, before, snapshot(root), f"HTTP {reply.status_code}" if reply.status_code >= 500 else "",
                  reply.status_code == status and str(root) not in reply.text, True)

        reply = httpx.get(url + "/health", headers={"Host": "attacker.example.com"})
        judge("no token: Host attacker.example.com (DNS rebinding)", {}, {}, "", reply.status_code == 403, False)
        post("no token: a cross-site form post (foreign Origin)", 403, {"Origin": "http://attacker.example.com"})
        post("zip members x and x/y", 400, upload=[("dataset", ("d.zip", zip_bytes({"x": "1", "x/y": "2"})))],
             kind="train")
        post("a 6000-character zip member name", 400, upload=[("dataset", ("d.zip", zip_bytes({"a" * 6000: "1"})))],
             kind="train")
        post("settings nested 100000 deep", 400, data={"settings": "[" * 100_000 + "]" * 100_000})
        post("settings image_size 16384, batch_size 64", 400,
             data={"settings": json.dumps({**TINY_SETTINGS, "image_size": 16384, "batch_size": 64})})
        post("a bad setting (image_size abc)", 400, data={"settings": json.dumps({"image_size": "abc"})})
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the working folder (its path is printed)")
    parser.add_argument("--engine", type=Path, help="the PSCVSegment folder whose pscv the processes run")
    parser.add_argument("--skip", action="append", default=[], metavar="TEXT", help="leave out cases naming TEXT")
    args = parser.parse_args()
    SKIP.extend(args.skip)
    if args.engine:
        ENV["PYTHONPATH"] = str(args.engine.resolve())
    work = Path(tempfile.mkdtemp(prefix="pscv-hostile-"))
    try:
        model = work / "model"
        case = tiny_case(work / "model-case")
        result = pscv(*segment(case, work / "model-case.seg.nrrd", "--save-model", model))
        assert result.returncode == 0, result.stderr
        for cases in (command_line_cases, model_cases):
            cases(work, model)
        for cases in (disk_cases, leftover_cases, worker_cases, service_cases):
            cases(work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    totals = {"cases": len(RESULTS), "not as they should": sum(not r["ok"] for r in RESULTS),
              "tracebacks": sum(r["traceback"] for r in RESULTS), "data loss": sum(bool(r["lost"]) for r in RESULTS),
              "leftovers": sum(bool(r["leftovers"]) for r in RESULTS)}
    print(json.dumps(totals))
    return 0 if not any(list(totals.values())[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())
