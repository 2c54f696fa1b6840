"""Inference: segment a whole volume with a trained model, and score a model on labelled cases.

Slice-wise along the through-plane axis (the one with the largest spacing), each slice resized to the
network's size, probabilities resized back to the native grid, all slices of a volume in batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import PSCVError
from ..base.progress import Reporter
from ..base.resources import check_memory
from ..data.dataset import load_case, read_dataset
from ..data.intensity import normalize
from ..data.volumes import Volume
from .devices import resolve_device
from .models import Model
from .pieces import keep_largest_pieces


@torch.no_grad()
def slice_probabilities(model: Model, volume: Volume, device="auto", batch_size: int = 16, progress=None,
                        should_stop=None):
    """Yield (first slice, class probabilities (K, n, H, W) on the native grid, a tensor on the device) batch
    by batch along the slice axis (`volume.slice_axis()`)."""
    device = resolve_device(device) if isinstance(device, str) else device
    if device.type == "cpu":
        check_memory(inference_bytes(model, volume, batch_size), f"segmenting a {'x'.join(map(str, volume.shape))} "
                     f"volume with a network of {model.image_size} x {model.image_size} pixels",
                     "lower the batch size (a predict job's batch_size), or use a machine with more memory")
    network = model.network.to(device).eval()
    slices = np.moveaxis(normalize(volume.array, model.metadata["normalization"]), volume.slice_axis(), 0)
    count, height, width = slices.shape
    size = model.image_size
    reporter = Reporter("predict", count, progress, should_stop, device=str(device))
    for start in range(0, count, batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(slices[start:start + batch_size]))[:, None].to(device)
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = network(batch)
        logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
        yield start, logits.softmax(dim=1).permute(1, 0, 2, 3)
        reporter.step(min(start + batch_size, count))


def inference_bytes(model: Model, volume: Volume, batch_size: int) -> float:
    """A rough upper bound of the memory segmenting `volume` takes besides the model and the image: its
    normalised copy, the label map, and per batch of slices the network's largest maps (no gradients) and the
    class probabilities on the native grid."""
    network = model.metadata["network"]
    size, plane = model.image_size, volume.array.size / max(volume.shape[volume.slice_axis()], 1)
    largest_map = size * size * max(width / 4**level for level, width in enumerate(network["widths"]))
    per_slice = 3 * largest_map + 3 * network["num_classes"] * plane
    return 4.0 * (2 * volume.array.size + batch_size * per_slice)


def predict_volume(model: Model, volume: Volume, device="auto", batch_size: int = 16, progress=None,
                   should_stop=None) -> np.ndarray:
    """Label map `[k, j, i]` of class label values (uint8, or uint16 for values above 255); the classes the model
    found to be one piece keep their largest piece (`learn.pieces`)."""
    values = np.array([c.value for c in model.classes])
    values = values.astype(np.uint8 if values.max() <= 255 else np.uint16)
    axis = volume.slice_axis()
    output = np.moveaxis(np.empty(volume.shape, dtype=values.dtype), axis, 0)  # a view: writes land in order
    for start, probabilities in slice_probabilities(model, volume, device, batch_size, progress, should_stop):
        output[start:start + probabilities.shape[1]] = values[probabilities.argmax(dim=0).cpu().numpy()]
    return keep_largest_pieces(np.moveaxis(output, 0, axis), model.metadata.get("one_piece_classes", []))


def evaluate_cases(model: Model, cases, device="auto", progress=None) -> dict:
    """Segment each case (`.image`, `.labels`, `.name`: a `dataset.Case`) and score it against its
    labels: per-class mean Dice and HD95 (`scores`, with their `mean`), `per_case`, and inference seconds per
    volume."""
    import time

    from ..data.metrics import evaluate_case, mean_scores

    classes = model.classes
    per_case, seconds = {}, []
    for case in cases:
        started = time.monotonic()
        prediction = predict_volume(model, case.image, device, progress=progress)
        seconds.append(time.monotonic() - started)
        per_case[case.name] = evaluate_case(prediction, case.labels, classes, case.image.spacing[::-1])
    names = [c.name for c in classes if c.value != 0] + ["mean"]
    return {"scores": {n: mean_scores([s[n] for s in per_case.values()]) for n in names}, "per_case": per_case,
            "inference_seconds_per_volume": float(np.mean(seconds))}


def evaluate_model(model: Model, dataset_folder, device="auto", progress=None) -> dict:
    """The Dice of `model` on the labelled cases of a dataset folder (images/ + labels/; points unused): per
    class (mean over cases) and their mean. The folder's classes must be the model's."""
    classes, entries = read_dataset(dataset_folder)
    expected = [(c.name.lower(), c.value) for c in model.classes]
    if [(c.name.lower(), c.value) for c in classes] != expected:
        raise PSCVError(f"{Path(dataset_folder) / 'classes.json'}: the classes differ from the model's "
                        f"{[f'{n}={v}' for n, v in expected]}; validate on a data set of the same classes")
    labelled = [entry for entry in entries if entry.labels is not None]
    if not labelled:
        raise PSCVError(f"{dataset_folder}: no labels/<case> files to validate on")
    cases = [load_case(entry, classes, points=False, labels=True) for entry in labelled]
    scores = evaluate_cases(model, cases, device, progress)["scores"]
    return {"dataset": str(dataset_folder), "cases": len(labelled),
            "dice": {name: round(s["dice"], 4) for name, s in scores.items() if name != "mean"},
            "mean_dice": round(scores["mean"]["dice"], 4)}
