"""Running one job: its kind's runner, the out-of-memory fallback, and what the events say about the device.

`pscv.jobs.worker` runs `run_job` in a process of its own and prints its events. This module imports
pscv.learn (and so torch) only inside its functions: importing it is cheap.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

from .. import PSCVError
from .folder import JOB_FILE, PREDICT_SETTINGS, Job, remove_path

FINETUNE_ITERATIONS = 200  # default fine-tuning length when the job does not say
MODEL_SHAPE_SETTINGS = ("image_size", "widths", "dropout", "normalization")  # fixed by the model being fine-tuned


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
    # A segment job writes its model and suggestions only when its settings ask for them.
    return {name: path.relative_to(job.folder).as_posix() for name, path in job.outputs.items() if path.exists()}


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
    from ..learn.devices import is_out_of_memory

    return is_out_of_memory(error)


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
    """Write outputs.model as a whole (`learn.models.save_model`: a temporary folder, then renamed)."""
    from ..learn.models import save_model

    destination = job.outputs.get("model")
    if destination is None:
        return
    if destination.exists():
        remove_path(destination)
    save_model(model, destination)


def _run_segment(job: Job, events: Events, should_stop) -> None:
    """The single-case mode (`pscv.learn.single_case`): segment the case from its clicks and strokes; then, as
    the settings ask, suggest where to click next and train (or refine, given a model input) a network."""
    from ..data.classes import read_classes
    from ..data.clicks import write_suggestions
    from ..data.segmentations import read_strokes
    from ..learn.single_case import (
        check_refinable,
        model_settings,
        segment_case,
        split_settings,
        suggest_points,
        train_case_model,
    )

    classes = read_classes(job.inputs["classes"])
    volume, clicks = _read_case(job, classes, with_points=True)
    for path in job.inputs.get("strokes", []):
        clicks = read_strokes(path, classes, volume).extended(clicks)
    case, network = split_settings({k: v for k, v in job.settings.items() if k != "device"})
    initial = _load_job_model(job) if "model" in job.inputs else None
    if initial is not None:
        check_refinable(initial, volume, "inputs.model")
    if case.suggest and "suggestions" not in job.outputs:
        raise PSCVError(f"{job.folder / JOB_FILE}: setting suggest needs a suggestions output")
    device = job.settings.get("device", "auto")
    model_settings(device, initial is not None, **network)  # the network's settings are checked before any work
    result = segment_case(volume, clicks, classes, case, network.get("normalization"), events, should_stop)
    _check_stop(should_stop)
    if case.train_model or initial is not None:
        def make_settings(device, batch_size):
            return model_settings(device, initial is not None,
                                  **{**network, **({"batch_size": batch_size} if batch_size else {})})

        def work(settings):
            return train_case_model(volume, result, classes, settings, len(clicks), initial, events, should_stop)

        _save_model(job, with_memory_fallback(events, make_settings, work, device))
    if case.suggest:
        write_suggestions(suggest_points(result, classes, volume.slice_axis(), case.suggest), volume, classes,
                          job.outputs["suggestions"])
    if "segmentation" in job.outputs:
        _write_segmentation(job, events, should_stop, result.labelmap, volume, classes)


def _run_train(job: Job, events: Events, should_stop) -> None:
    from ..data.classes import read_classes
    from ..data.dataset import load_training_cases
    from ..learn.training import TrainSettings, cohort_settings

    method = job.settings.get("method", TrainSettings.method)
    classes, cases = load_training_cases(job.inputs["dataset"], method)
    if "classes" in job.inputs:
        classes = read_classes(job.inputs["classes"])
    overrides = {k: v for k, v in job.settings.items() if k != "device"}

    def make_settings(device, batch_size):  # iterations, image and batch size left out: the device's budget
        return cohort_settings(device, **{**overrides, **({"batch_size": batch_size} if batch_size else {})})

    model = _train(job, events, should_stop, cases, classes, make_settings)
    _check_stop(should_stop)
    _save_model(job, model)


def _load_job_model(job: Job):
    from ..data.classes import read_classes
    from ..learn.models import load_model

    classes = read_classes(job.inputs["classes"]) if "classes" in job.inputs else None
    return load_model(job.inputs["model"], classes)


def _run_predict(job: Job, events: Events, should_stop) -> None:
    model = _load_job_model(job)  # its settings were checked with the job (folder.check_job_settings)
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
    if base.get("method") == "full":  # e.g. a model `pscv segment` kept: the new case has clicks, not dense labels
        base["method"] = "pce"
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
