"""Jobs: a folder that says what to do, the events of the worker that does it, and its results.

```
job.json      {"version": 1, "kind": "segment"|"train"|"predict"|"finetune", "inputs": {...},
               "settings": {...}, "outputs": {...}}       what to do (paths relative to the folder)
worker.pid    the worker's process id, written when it starts
events.jsonl  every event the worker printed, one JSON object per line
state.json    written atomically when the job ends: {"state": "done"|"error"|"cancelled", "message", "outputs"}
cancel        created by a client to ask the worker to stop
worker.log    the worker's stderr (tracebacks of unexpected errors), written by the client that started it
```

This module reads and checks job folders and runs a job (`run_job`); `pscv.worker` wraps it in a process
that prints the events, `pscv.client` starts such processes, `pscv.server` queues them. Reading a folder
needs no torch: only `run_job` imports it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .. import PSCVError
from ..base.atomic import write_text_atomic

VERSION = 1
JOB_FILE, EVENTS_FILE, STATE_FILE, CANCEL_FILE = "job.json", "events.jsonl", "state.json", "cancel"
PID_FILE, LOG_FILE, META_FILE = "worker.pid", "worker.log", "meta.json"  # meta.json: the service's record
RESERVED = {JOB_FILE, EVENTS_FILE, STATE_FILE, CANCEL_FILE, PID_FILE, LOG_FILE, META_FILE}
SAFE_ID = re.compile(r"[0-9a-f]{32}")  # job ids are uuid4 hex, made by whoever creates the folder
KINDS = ("segment", "train", "predict", "finetune")
FINAL_STATES = ("done", "error", "cancelled")  # also the names of the events that end a job

# Inputs each kind needs, and may have.
REQUIRED_INPUTS = {
    "segment": ("image", "points", "classes"),
    "train": ("dataset",),
    "predict": ("image", "model"),
    "finetune": ("image", "points", "model"),
}
OPTIONAL_INPUTS = {"segment": (), "train": ("classes",), "predict": ("classes",), "finetune": ("classes",)}
# Outputs each kind writes unless job.json names its own (a subset of these).
DEFAULT_OUTPUTS = {
    "segment": {"segmentation": "result.seg.nrrd", "model": "result-model"},
    "train": {"model": "result-model"},
    "predict": {"segmentation": "result.seg.nrrd"},
    "finetune": {"segmentation": "result.seg.nrrd", "model": "result-model"},
}
SEGMENTATION_SUFFIXES = (".seg.nrrd", ".nrrd", ".nii.gz", ".nii", ".mha")
PREDICT_SETTINGS = ("device", "batch_size")
FINETUNE_ITERATIONS = 200  # default fine-tuning length when the job does not say
MODEL_SHAPE_SETTINGS = ("image_size", "widths", "dropout", "normalization")  # fixed by the model being fine-tuned


@dataclass
class Job:
    folder: Path
    kind: str
    inputs: dict  # name -> absolute Path inside the folder ("points": list of Paths)
    settings: dict
    outputs: dict  # name -> absolute Path inside the folder


# ---------------------------------------------------------------------------------------------------------
# Writing and reading job folders (no torch)


def write_job(folder, kind: str, inputs: dict, settings: dict | None = None, outputs: dict | None = None) -> Path:
    """Write `folder/job.json` (atomically) and check it as a worker would; returns its path."""
    folder = Path(folder)
    document = {"version": VERSION, "kind": kind, "inputs": inputs, "settings": settings or {},
                "outputs": outputs or DEFAULT_OUTPUTS.get(kind, {})}
    path = folder / JOB_FILE
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")
    read_job(folder)
    return path


def inside(folder: Path, value, where: str) -> Path:
    """`folder / value` for a relative path that stays inside `folder` (symbolic links resolved)."""
    source = folder / JOB_FILE
    if not isinstance(value, str) or not value.strip():
        raise PSCVError(f"{source}: {where} must be a path relative to the job folder, got {value!r}")
    relative = Path(value)
    if relative.is_absolute() or ".." in relative.parts or relative.drive:
        raise PSCVError(f"{source}: {where} {value!r} leaves the job folder; give a path inside it, "
                        "e.g. \"image.nrrd\"")
    path = folder / relative
    root = folder.resolve()
    if path.resolve() != root and root not in path.resolve().parents:
        raise PSCVError(f"{source}: {where} {value!r} points outside the job folder (through a link); "
                        "copy the file into the job folder")
    if relative.parts[0] in RESERVED:
        raise PSCVError(f"{source}: {where} {value!r} is one of the job folder's own files "
                        f"({', '.join(sorted(RESERVED))}); use another name")
    return path


def read_job(folder) -> Job:
    """Read and check `folder/job.json`: PSCVError naming the file, the item and the fix."""
    folder = Path(folder)
    source = folder / JOB_FILE
    if not folder.is_dir():
        raise PSCVError(f"{folder}: no such job folder")
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PSCVError(f"{source}: missing; a job folder needs job.json saying what to do "
                        "(see docs/ENGINE_API.md, Jobs)") from None
    except (UnicodeDecodeError, OSError) as error:
        raise PSCVError(f"{source}: cannot be read ({error})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise PSCVError(f"{source}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                        "write the job again") from None
    if not isinstance(document, dict):
        raise PSCVError(f"{source}: expected a JSON object with \"kind\", \"inputs\", \"settings\", \"outputs\"")
    if document.get("version", VERSION) != VERSION:
        raise PSCVError(f"{source}: job format version {document.get('version')!r}; this pscv reads version "
                        f"{VERSION}: update pscv on this machine")
    kind = document.get("kind")
    if kind not in KINDS:
        raise PSCVError(f"{source}: unknown job kind {kind!r}; use one of {', '.join(KINDS)}")
    inputs_doc, settings, outputs_doc = (document.get(key, {}) for key in ("inputs", "settings", "outputs"))
    for key, value in (("inputs", inputs_doc), ("settings", settings), ("outputs", outputs_doc)):
        if not isinstance(value, dict):
            raise PSCVError(f"{source}: \"{key}\" must be a JSON object, got {type(value).__name__}")
    return Job(folder, kind, _read_inputs(folder, kind, inputs_doc), dict(settings),
               _read_outputs(folder, kind, outputs_doc))


def _read_inputs(folder: Path, kind: str, document: dict) -> dict:
    source = folder / JOB_FILE
    allowed = REQUIRED_INPUTS[kind] + OPTIONAL_INPUTS[kind]
    unknown = sorted(set(document) - set(allowed))
    if unknown:
        raise PSCVError(f"{source}: a {kind} job takes no input(s) {', '.join(unknown)} "
                        f"(it takes {', '.join(allowed)})")
    missing = [name for name in REQUIRED_INPUTS[kind] if not document.get(name)]
    if missing:
        raise PSCVError(f"{source}: a {kind} job needs the input(s) {', '.join(missing)}")
    inputs = {}
    for name, value in document.items():
        if name == "points":
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not values:
                raise PSCVError(f"{source}: inputs.points must be a list of clicks files")
            inputs[name] = [inside(folder, v, f"inputs.points[{n}]") for n, v in enumerate(values)]
        else:
            inputs[name] = inside(folder, value, f"inputs.{name}")
    for name, value in inputs.items():
        for path in value if isinstance(value, list) else [value]:
            if not path.exists():
                raise PSCVError(f"{source}: input {name} {path.relative_to(folder).as_posix()!r} is missing "
                                "from the job folder; copy it there or fix job.json")
    return inputs


def _read_outputs(folder: Path, kind: str, document: dict) -> dict:
    source = folder / JOB_FILE
    document = document or DEFAULT_OUTPUTS[kind]
    unknown = sorted(set(document) - set(DEFAULT_OUTPUTS[kind]))
    if unknown:
        raise PSCVError(f"{source}: a {kind} job writes no output(s) {', '.join(unknown)} "
                        f"(it writes {', '.join(DEFAULT_OUTPUTS[kind])})")
    outputs = {name: inside(folder, value, f"outputs.{name}") for name, value in document.items()}
    segmentation = outputs.get("segmentation")
    if segmentation is not None and not segmentation.name.lower().endswith(SEGMENTATION_SUFFIXES):
        raise PSCVError(f"{source}: outputs.segmentation {segmentation.name!r}: use a name ending in "
                        f"{', '.join(SEGMENTATION_SUFFIXES)}")
    return outputs


def read_events(folder, offset: int = 0) -> tuple[list[dict], int]:
    """The events in `events.jsonl` from byte `offset` on, and the offset after the last whole line."""
    path = Path(folder) / EVENTS_FILE
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            data = stream.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a line still being written is left for the next call
    events = []
    for line in data[:end].splitlines():
        try:
            event = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(event, dict):
            events.append(event)
    return events, offset + end


def append_event(folder, event: dict) -> None:
    """Append one event to `events.jsonl` (used by whoever ends a job its worker could not end)."""
    with open(Path(folder) / EVENTS_FILE, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(event) + "\n")


def write_state(folder, state: str, message: str | None = None, outputs: dict | None = None) -> None:
    document = {"state": state, "message": message, "outputs": outputs or {}, "time": round(time.time(), 3)}
    write_text_atomic(Path(folder) / STATE_FILE, json.dumps(document) + "\n")


def worker_alive(folder) -> bool:
    """Whether the worker named in `worker.pid` still runs (a zombie, or another program, does not count)."""
    try:
        pid = int((Path(folder) / PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return False
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError, OSError):
            return False
        return True
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        command = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "worker" in command and Path(folder).name in command


def read_state_file(folder) -> dict | None:
    """state.json of an ended job, or None when there is none (yet)."""
    try:
        state = json.loads((Path(folder) / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return state if isinstance(state, dict) and state.get("state") in FINAL_STATES else None


def read_state(folder) -> dict:
    """{"state", "message", "outputs"} of a job folder, whoever wrote it and whether or not it ended well.

    `queued`: no worker ever started; `running`: its worker lives; a folder without state.json whose
    worker is gone is a failed job (`error`), unless its events already say how it ended.
    """
    folder = Path(folder)
    state = read_state_file(folder)
    if state is not None:
        return state
    if not (folder / PID_FILE).exists():
        return {"state": "queued", "message": None, "outputs": {}}
    if worker_alive(folder):
        return {"state": "running", "message": None, "outputs": {}}
    events, _ = read_events(folder)
    for event in reversed(events):
        if event.get("event") in FINAL_STATES:
            return {"state": event["event"], "message": event.get("message"), "outputs": event.get("outputs", {})}
    return {"state": "error", "outputs": {},
            "message": "the worker stopped without finishing (killed, crashed, or the machine restarted); "
                       "run the job again"}


def remove_results(folder, pid: int | None = None) -> None:
    """Remove a job's results and the temporary files a worker (`pid`, or any) left while writing them."""
    folder = Path(folder)
    pattern = f".*.partial-{pid}*" if pid else ".*.partial-*"
    for path in folder.rglob(pattern):
        _remove(path)
    try:
        job = read_job(folder)
    except PSCVError:
        return
    for path in job.outputs.values():
        _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def link_or_copy(source: Path, destination: Path) -> None:
    """Put `source` (a file or folder) at `destination`: hard links where possible (no copy of a big
    image; safe because pscv replaces files by renaming, never rewrites them), else a copy."""
    source, destination = Path(source), Path(destination)
    if source.is_dir():
        shutil.copytree(source, destination, copy_function=_link_or_copy_file)
    else:
        destination.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy_file(source, destination)


def _link_or_copy_file(source, destination) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


# ---------------------------------------------------------------------------------------------------------
# Putting inputs into a job folder under fixed names (a client's file name never becomes a path, except the
# checked stem of a .fcsv file, which names its point list and so its class)

SINGLE_FILE_IMAGES = (".nrrd", ".nii.gz", ".nii", ".mha")
SAFE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _-]{0,63}")


def image_name(filename: str) -> str | None:
    """`image.<suffix>` for a one-file image format (by the name's ending), else None."""
    lower = str(filename).lower()
    for suffix in SINGLE_FILE_IMAGES:
        if lower.endswith(suffix):
            return "image" + suffix
    return None


def points_name(filename: str, number: int) -> str:
    """Where the `number`-th clicks file goes in a job folder."""
    name = PurePosixPath(str(filename).replace("\\", "/")).name
    if name.lower().endswith(".fcsv"):
        stem = name[: -len(".fcsv")]
        return f"points-{number}/{stem if SAFE_STEM.fullmatch(stem) else f'points-{number}'}.fcsv"
    if name.lower().endswith(".json"):
        return f"points-{number}.mrk.json"
    raise PSCVError(f"{filename}: clicks must be a 3D Slicer point list (.mrk.json) or a .fcsv file")


def stage_inputs(folder, image=None, points=None, classes=None, model=None, dataset=None) -> dict:
    """Put the given files and folders into the job folder; returns job.json's "inputs"."""
    folder = Path(folder)
    inputs = {}
    if image is not None:
        image = Path(image)
        if image.is_dir():  # a DICOM series folder
            inputs["image"] = "image"
            link_or_copy(image, folder / "image")
        elif image_name(image.name):
            inputs["image"] = image_name(image.name)
            link_or_copy(image, folder / inputs["image"])
        else:  # a two-file format (.nhdr + data, .mhd + .raw): one .nrrd file instead
            from ..data.volumes import read_image, write_image

            inputs["image"] = "image.nrrd"
            write_image(read_image(image), folder / inputs["image"])
    if points is not None:
        points = [points] if isinstance(points, (str, Path)) else list(points)
        inputs["points"] = [points_name(Path(p).name, n) for n, p in enumerate(points, start=1)]
        for path, name in zip(points, inputs["points"]):
            link_or_copy(Path(path), folder / name)
    for role, source in (("classes", classes), ("model", model), ("dataset", dataset)):
        if source is not None:
            source = Path(source)
            if role == "model" and source.is_file():  # model.json or model.safetensors: its folder
                source = source.parent
            inputs[role] = "classes.json" if role == "classes" else role
            link_or_copy(source, folder / inputs[role])
    return inputs


def zip_folder(folder, destination) -> Path:
    """Write the files under `folder` (names relative to it) into the zip file `destination`."""
    folder, destination = Path(folder), Path(destination)
    with zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                archive.write(path, path.relative_to(folder).as_posix())
    return destination


def extract_zip(source, destination, max_bytes: int, what: str = "zip file") -> Path:
    """Unpack a zip file into the new folder `destination`, refusing names that leave it, links, and more
    than `max_bytes` unpacked. Returns the folder, or its only subfolder when it holds nothing else."""
    destination = Path(destination)
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as error:
        raise PSCVError(f"{what}: not a zip file ({error})") from None
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        if sum(info.file_size for info in members) > max_bytes:
            raise PSCVError(f"{what}: more than {max_bytes // 2**20} MB once unpacked")
        destination.mkdir(parents=True)
        for info in members:
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if not parts or info.filename.startswith(("/", "\\")) or ".." in parts or ":" in info.filename or is_link:
                raise PSCVError(f"{what}: refusing the member {info.filename!r} (absolute, '..', drive or link)")
            target = destination.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as stream, open(target, "wb") as out:
                    shutil.copyfileobj(stream, out, 2**20)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
                raise PSCVError(f"{what}: damaged or unsupported member {info.filename!r} ({error})") from None
    entries = list(destination.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else destination


# ---------------------------------------------------------------------------------------------------------
# Running a job (torch)


class Events:
    """Sends events to `sink`, each stamped with the device in use (None until known) and the time."""

    def __init__(self, sink):
        self.sink = sink
        self.device = None

    def __call__(self, event: dict) -> None:
        event = dict(event)
        event.setdefault("device", self.device)
        event["time"] = round(time.time(), 3)
        self.sink(event)

    def warning(self, message: str) -> None:
        self({"event": "warning", "message": message})


def run_job(job: Job, events: Events, should_stop=None) -> dict:
    """Run `job`, reporting through `events`; write its results atomically; return them relative to the
    job folder ({"segmentation": "result.seg.nrrd", ...}). Raises PSCVError, or Cancelled when stopped."""
    runners = {"segment": _run_segment, "train": _run_train, "predict": _run_predict, "finetune": _run_finetune}
    runners[job.kind](job, events, should_stop)
    return {name: path.relative_to(job.folder).as_posix() for name, path in job.outputs.items()}


def device_label(name: str) -> str:
    """The device torch will use for `name` ("auto" resolved), e.g. "cuda", "cpu"."""
    from ..learn.devices import resolve_device

    return str(resolve_device(name))


def device_details(label: str) -> dict:
    """What the `started` event says about the device: its name, and the torch build."""
    import torch

    details = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if label.startswith("cuda"):
        details["device_name"] = torch.cuda.get_device_name(torch.device(label))
    return details


def device_warnings(requested: str, label: str) -> list[str]:
    """A GPU that is there but unused is worth a warning: an NVIDIA driver with a torch built without CUDA."""
    import torch

    if (requested or "auto") == "auto" and label == "cpu" and shutil.which("nvidia-smi") and not torch.version.cuda:
        return [f"this machine has an NVIDIA GPU (nvidia-smi is installed) but torch {torch.__version__} was built "
                "without CUDA, so the job runs on the CPU; install a CUDA build of torch to use the GPU"]
    return []


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or isinstance(error, RuntimeError) and (
        "out of memory" in text or "ALLOC_FAILED" in text)


def with_memory_fallback(events: Events, make_settings, work, device: str):
    """`work(make_settings(device, batch_size))`; on GPU out-of-memory, again with half the batch (down to 2),
    then on the CPU, each time saying so in a warning event. `batch_size` None means the default."""
    batch_size = None
    while True:
        settings = make_settings(device, batch_size)
        events.device = device_label(settings.device)
        try:
            return work(settings)
        except Exception as error:
            if events.device == "cpu" or not is_out_of_memory(error):
                raise
            _free_gpu_memory()
            if settings.batch_size > 2:
                batch_size = max(2, settings.batch_size // 2)
                events.warning(f"{events.device} ran out of memory with batch size {settings.batch_size}; "
                               f"trying again with batch size {batch_size}")
            else:
                device, batch_size = "cpu", None
                events.warning(f"{events.device} ran out of memory even with batch size {settings.batch_size}; "
                               "continuing on the CPU (much slower). Lower image_size, or free the GPU")


def _free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class PredictSettings:
    device: str = "auto"
    batch_size: int = 16


def _check_stop(should_stop) -> None:
    from ..base.progress import Cancelled

    if should_stop is not None and should_stop():
        raise Cancelled("stopped before writing the results")


def _read_case(job: Job, classes, with_points: bool):
    from ..data.clicks import read_clicks
    from ..data.volumes import read_image

    volume = read_image(job.inputs["image"])
    clicks = read_clicks(job.inputs["points"], volume, classes) if with_points else None
    return volume, clicks


def _predict(job, events, should_stop, model, volume) -> None:
    """Segment `volume` with `model` and write outputs.segmentation, falling back on out-of-memory."""
    from ..learn.inference import predict_volume

    # A predict job's batch_size is the inference batch; a segment job's is the training batch.
    allowed = PREDICT_SETTINGS if job.kind == "predict" else ("device",)
    options = {k: v for k, v in job.settings.items() if k in allowed}

    def make_settings(device, batch_size):
        return PredictSettings(device, batch_size or options.get("batch_size", PredictSettings.batch_size))

    def work(settings):
        return predict_volume(model, volume, settings.device, batch_size=settings.batch_size, progress=events,
                              should_stop=should_stop)

    labelmap = with_memory_fallback(events, make_settings, work, options.get("device", "auto"))
    _write_segmentation(job, events, should_stop, labelmap, volume, model.classes)


def _write_segmentation(job, events, should_stop, labelmap, volume, classes) -> None:
    from ..data.segmentations import write_segmentation

    _check_stop(should_stop)
    events({"event": "progress", "stage": "write", "step": 0, "total": 1, "loss": None, "seconds_left": None})
    write_segmentation(job.outputs["segmentation"], labelmap, volume, classes)


def _train(job, events, should_stop, cases, classes, make_settings, initial=None):
    from ..learn.training import train

    def work(settings):
        return train(cases, classes, settings, events, should_stop, initial=initial)

    return with_memory_fallback(events, make_settings, work, job.settings.get("device", "auto"))


def _save_model(job: Job, model) -> None:
    """Write outputs.model as a whole: into a temporary folder, then renamed."""
    from ..learn.models import save_model

    destination = job.outputs.get("model")
    if destination is None:
        return
    temporary = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    save_model(model, temporary)
    if destination.exists():
        _remove(destination)
    os.replace(temporary, destination)


def _run_segment(job: Job, events: Events, should_stop) -> None:
    """The single-case mode (`pscv.segment.segment_case`): train on the case's clicks, then segment it."""
    from ..data.classes import read_classes
    from ..learn.single_case import case_settings, segment_case

    classes = read_classes(job.inputs["classes"])
    volume, clicks = _read_case(job, classes, with_points=True)
    overrides = {k: v for k, v in job.settings.items() if k != "device"}

    def make_settings(device, batch_size):
        return case_settings(device, **{**overrides, **({"batch_size": batch_size} if batch_size else {})})

    def work(settings):
        return segment_case(volume, clicks, classes, settings, events, should_stop)

    labelmap, model = with_memory_fallback(events, make_settings, work, job.settings.get("device", "auto"))
    _check_stop(should_stop)
    _save_model(job, model)
    if "segmentation" in job.outputs:
        _write_segmentation(job, events, should_stop, labelmap, volume, classes)


def _run_train(job: Job, events: Events, should_stop) -> None:
    from ..data.classes import read_classes
    from ..data.dataset import load_training_cases
    from ..learn.training import TrainSettings

    method = job.settings.get("method", TrainSettings.method)
    classes, cases = load_training_cases(job.inputs["dataset"], method)
    if "classes" in job.inputs:
        classes = read_classes(job.inputs["classes"])

    def make_settings(device, batch_size):
        return TrainSettings.from_dict({**job.settings, "device": device,
                                        **({"batch_size": batch_size} if batch_size else {})})

    model = _train(job, events, should_stop, cases, classes, make_settings)
    _check_stop(should_stop)
    _save_model(job, model)


def _load_job_model(job: Job):
    from ..data.classes import read_classes
    from ..learn.models import load_model

    classes = read_classes(job.inputs["classes"]) if "classes" in job.inputs else None
    return load_model(job.inputs["model"], classes)


def _run_predict(job: Job, events: Events, should_stop) -> None:
    unknown = sorted(set(job.settings) - set(PREDICT_SETTINGS))
    if unknown:
        raise PSCVError(f"{job.folder / JOB_FILE}: a predict job takes only the settings "
                        f"{', '.join(PREDICT_SETTINGS)}, not {', '.join(unknown)}")
    model = _load_job_model(job)
    volume, _ = _read_case(job, model.classes, with_points=False)
    _predict(job, events, should_stop, model, volume)


def _run_finetune(job: Job, events: Events, should_stop) -> None:
    """Train further, from the model's weights, on this case's clicks; then segment the case."""
    from dataclasses import fields

    from ..data.dataset import Case
    from ..learn.training import TrainSettings

    model = _load_job_model(job)
    known = {f.name for f in fields(TrainSettings)}
    base = {k: v for k, v in (model.metadata.get("settings") or {}).items() if k in known}
    for key in MODEL_SHAPE_SETTINGS:
        if key in job.settings and job.settings[key] != base.get(key):
            raise PSCVError(f"{job.folder / JOB_FILE}: setting {key} cannot change when fine-tuning (the model "
                            f"has {key} = {base.get(key)!r}); leave it out")
    volume, clicks = _read_case(job, model.classes, with_points=True)

    def make_settings(device, batch_size):
        settings = {**base, "iterations": FINETUNE_ITERATIONS, **job.settings, "device": device}
        if batch_size:
            settings["batch_size"] = batch_size
        return TrainSettings.from_dict(settings)

    tuned = _train(job, events, should_stop, [Case(volume, clicks, name="case")], model.classes,
                   make_settings, initial=model)
    _check_stop(should_stop)
    _save_model(job, tuned)
    if "segmentation" in job.outputs:
        _predict(job, events, should_stop, tuned, volume)
