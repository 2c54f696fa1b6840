"""The one training loop (`train`), its settings, its training slices and its loss terms.

Methods differ only in the loss terms they switch on:

- `pce`:  partial cross-entropy on the clicked pixels;
- `pscv`: pCE + cv_weight * contrastive variance loss (losses.contrastive_variance on the variance maps);
- `ms`:   pCE + ms_weight * Mumford-Shah;
- `full`: dense labels (cross-entropy + Dice), the upper bound; needs `labels` on every case.

Any point-supervised method can add two more terms: a CRF-like affinity (neighbours of similar intensity
agree) and cross-entropy on an EMA teacher's confident pixels. The defaults (pce + both) are the best
configuration measured on the ACDC val patients (BENCHMARKS.md); the contrastive variance term as
reconstructed here lowered Dice there, so it is a choice, not the default.

The data set lives on the training device as tensors: every training slice resized once to
`image_size` x `image_size`; batches are drawn, augmented (one transform for the whole batch, so that
organs stay aligned across the images of a batch) and fed without per-sample Python work.
"""

from __future__ import annotations

import copy
import math
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import PSCVError
from ..base.progress import Cancelled, Reporter
from ..base.resources import check_memory
from ..data.classes import ClassInfo
from ..data.clicks import click_region
from ..data.dataset import Case
from ..data.intensity import normalize
from . import checkpoints, distributed
from .augmentation import affine_batch, flip_batch
from .budgets import COHORT_CPU_BUDGET, COHORT_GPU_BUDGET
from .devices import resolve_device, uses_bfloat16
from .distributed import gather_batch
from .losses import (
    IGNORE,
    absent_class_penalty,
    background_cross_entropy,
    contrastive_variance,
    dense_cross_entropy,
    dice_to_labels,
    gated_crf,
    local_affinity,
    mixed_pseudo_labels,
    mumford_shah,
    partial_cross_entropy,
    pseudo_label_cross_entropy,
    variance_maps,
)
from .models import Model, build_metadata, build_network, network_bytes
from .pieces import one_piece_classes
from .settings import METHODS, TrainSettings  # noqa: F401 (the settings are part of what training offers)


def cohort_budget(device: str = "auto") -> dict:
    """The iterations, image size and batch size of a cohort run on this device when the user gives none
    (`pscv train`, train jobs): `budgets.COHORT_CPU_BUDGET` on a CPU, `COHORT_GPU_BUDGET` on GPUs and Apple MPS."""
    return dict(COHORT_CPU_BUDGET if resolve_device(device).type == "cpu" else COHORT_GPU_BUDGET)


def cohort_settings(device: str = "auto", **overrides) -> TrainSettings:
    """Training settings for a cohort: the device's budget (`cohort_budget`), then the caller's overrides."""
    return TrainSettings.from_dict({**cohort_budget(device), "device": device, **overrides})


@dataclass
class TrainingTensors:
    images: torch.Tensor  # (N, 1, S, S) normalised
    sparse: torch.Tensor  # (N, S, S) uint8 class indices, IGNORE where unclicked
    dense: torch.Tensor | None  # (N, S, S) uint8 class indices
    present: torch.Tensor  # (N, K) bool: classes clicked (or labelled) in each slice
    outside: torch.Tensor | None = None  # (N, S, S) bool: outside the case's click region (background)


def resize_slices(slices: np.ndarray, size: int) -> torch.Tensor:
    """(n, H, W) float -> (n, 1, size, size) bilinear."""
    tensor = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None]
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)


def scale_coordinates(coordinates: np.ndarray, extent: int, size: int) -> np.ndarray:
    """Pixel indices on a grid of `extent` -> the pixel of a `size` grid whose area holds the centre."""
    return np.clip(np.floor((coordinates + 0.5) * size / extent), 0, size - 1).astype(np.int64)


def case_tensors(case: Case, classes: list[ClassInfo], settings: TrainSettings) -> TrainingTensors:
    """The training slices of one case: slices with clicks (or every slice with labels for `full`)."""
    index_of = {c.value: n for n, c in enumerate(classes)}
    axis = case.image.slice_axis()
    labels = case.labels if settings.method == "full" else None
    if settings.method == "full" and labels is None:
        raise PSCVError(f"{case.name or 'case'}: method 'full' needs dense labels for every case")

    def slices(array):  # slice axis first
        return np.moveaxis(array, axis, 0)

    image = slices(normalize(case.image.array, settings.normalization))
    count, height, width = image.shape
    size = settings.image_size
    sparse = np.full((count, size, size), IGNORE, dtype=np.uint8)
    present = np.zeros((count, len(classes)), dtype=bool)
    if case.clicks is not None and len(case.clicks):
        unknown = sorted(set(case.clicks.values.tolist()) - set(index_of))
        if unknown:
            raise PSCVError(f"{case.name or 'case'}: clicks with label values {unknown} that no class has")
        kji, values = case.clicks.kji, case.clicks.values
        slice_index = kji[:, axis]
        rows, cols = (kji[:, a] for a in range(3) if a != axis)
        class_index = np.array([index_of[v] for v in values.tolist()], dtype=np.uint8)
        sparse[slice_index, scale_coordinates(rows, height, size), scale_coordinates(cols, width, size)] = class_index
        present[slice_index, class_index] = True
    dense = None
    if labels is not None:
        lookup = np.zeros(int(labels.max()) + 1, dtype=np.uint8)
        for value, n in index_of.items():
            if value < len(lookup):
                lookup[value] = n
        dense = F.interpolate(torch.from_numpy(slices(lookup[labels])[:, None].astype(np.float32)),
                              size=(size, size), mode="nearest-exact")[:, 0].to(torch.uint8)
        keep = np.ones(count, dtype=bool)
        present = F.one_hot(dense.long().flatten(1), len(classes)).amax(dim=1).bool().numpy()
    else:
        keep = present.any(axis=1)
    outside = None
    if settings.outside_weight and labels is None and case.clicks is not None and keep.any():
        inside = np.zeros(case.image.shape, dtype=np.float32)
        inside[click_region(case.clicks, case.image, settings.outside_margin)] = 1
        outside = resize_slices(slices(inside)[keep], size)[:, 0] < 0.5
    kept = torch.from_numpy(keep)
    return TrainingTensors(
        images=resize_slices(image[keep], size),
        sparse=torch.from_numpy(sparse[keep]),
        dense=None if dense is None else dense[kept],
        present=torch.from_numpy(present[keep]),
        outside=outside,
    )


def slices_on_device(data: TrainingTensors, index: torch.Tensor | None, device) -> TrainingTensors:
    """The slices `index` of `data` (all of them when None) on `device`."""
    def take(tensor):
        return None if tensor is None else (tensor if index is None else tensor[index]).to(device)

    return TrainingTensors(take(data.images), take(data.sparse), take(data.dense), take(data.present),
                           take(data.outside))


def joined(parts: list[TrainingTensors], device=None) -> TrainingTensors:
    """The slices of every part, one after the other (on `device`, if given)."""
    def cat(name):
        tensors = [getattr(p, name) for p in parts]
        if tensors[0] is None:
            return None
        return torch.cat(tensors) if device is None else torch.cat(tensors).to(device)

    return TrainingTensors(cat("images"), cat("sparse"), cat("dense"), cat("present"), cat("outside"))


def build_training_tensors(cases, classes, settings, device) -> TrainingTensors:
    """Every case's training slices (`case_tensors`), on `device`."""
    parts = [case_tensors(case, classes, settings) for case in cases]
    parts = [p for p in parts if len(p.images)]
    if not parts:
        raise PSCVError("no training slice: no case has clicks" if settings.method != "full"
                        else "no training slice: the cases are empty")
    clicked = torch.cat([p.present for p in parts]).any(dim=0)
    if settings.method != "full" and clicked.sum() < 2:
        names = [c.name for c, seen in zip(classes, clicked.tolist()) if seen]
        raise PSCVError(f"clicks found for {names or 'no class'} only: place points on the background and "
                        "on at least one organ")
    return joined(parts, device)


def loss_terms(logits, images, sparse, dense, present, settings: TrainSettings, step: int,
               teacher_probabilities=None, auxiliary_logits=None, mix: float = 0.5, outside=None) -> dict:
    """The loss terms of the chosen method, each a scalar tensor already weighted; the total is their sum.
    `auxiliary_logits` (DMPLS): the auxiliary decoder's output, `mix` the weight of the main decoder's
    probabilities in the pseudo-labels."""
    if settings.method == "full":
        return {"dense": dense_cross_entropy(logits, dense)}
    terms = {"pce": partial_cross_entropy(logits, sparse)}
    if auxiliary_logits is not None:
        terms["pce"] = 0.5 * (terms["pce"] + partial_cross_entropy(auxiliary_logits, sparse))
    probabilities = logits.float().softmax(dim=1)
    images = images.float()
    if settings.method == "pscv":
        maps = (variance_maps(probabilities, images, settings.cv_detach_means) if settings.cv_map == "variance"
                else probabilities)
        if settings.cv_pool > 1:
            maps = F.avg_pool2d(maps, settings.cv_pool)
        maps_present = present
        if settings.cv_gather:  # all processes' maps; the gradient reaches each process's own
            maps, maps_present = gather_batch(maps), gather_batch(present)
        ramp = min(1.0, (step + 1) / settings.cv_warmup) if settings.cv_warmup else 1.0
        terms["cv"] = ramp * settings.cv_weight * contrastive_variance(
            maps, maps_present if settings.cv_present_only else None, settings.cv_temperature, settings.cv_pairing)
    elif settings.method == "ms":
        terms["ms"] = settings.ms_weight * mumford_shah(probabilities, images)
    if settings.affinity_weight:
        terms["affinity"] = settings.affinity_weight * local_affinity(
            probabilities, images, sigma_intensity=settings.affinity_sigma)
    if outside is not None:
        terms["outside"] = settings.outside_weight * background_cross_entropy(logits, outside)
    if settings.absent_weight:
        terms["absent"] = settings.absent_weight * absent_class_penalty(probabilities, present)
    if settings.crf_weight:
        terms["crf"] = settings.crf_weight * gated_crf(probabilities, images, settings.crf_radius,
                                                       settings.crf_sigma_xy, settings.crf_sigma_intensity)
    if teacher_probabilities is not None:
        terms["pseudo"] = settings.pseudo_weight * pseudo_label_cross_entropy(
            logits, teacher_probabilities, sparse, settings.pseudo_threshold)
    if auxiliary_logits is not None:
        auxiliary = auxiliary_logits.float().softmax(dim=1)
        labels = mixed_pseudo_labels(probabilities, auxiliary, mix)
        terms["dmpls"] = settings.dmpls_weight * 0.5 * (dice_to_labels(probabilities, labels)
                                                        + dice_to_labels(auxiliary, labels))
    return terms


@torch.no_grad()
def update_teacher(teacher, student, decay: float) -> None:
    """Exponential moving average of the student's weights (and a copy of its batch-norm statistics)."""
    for teacher_parameter, parameter in zip(teacher.parameters(), student.parameters()):
        teacher_parameter.lerp_(parameter, 1 - decay)
    for teacher_buffer, buffer in zip(teacher.buffers(), student.buffers()):
        teacher_buffer.copy_(buffer)


def uses_auxiliary_decoder(settings: TrainSettings) -> bool:
    return bool(settings.dmpls_weight) and settings.method != "full"


def shape_of_network(classes: list[ClassInfo], settings: TrainSettings, training: bool = False) -> dict:
    """The network these classes and settings make (`models.build_network` builds it); with `training`, the
    one trained, with DMPLS's auxiliary decoder where the settings use it (a saved model leaves it out)."""
    shape = {"num_classes": len(classes), "in_channels": 1, "widths": list(settings.widths),
             "dropout": list(settings.dropout), "image_size": settings.image_size, "architecture": "unet2d"}
    if training and uses_auxiliary_decoder(settings):
        shape["auxiliary_decoder"] = True
    return shape


def build_optimizer(network: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adam":
        return torch.optim.Adam(network.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.SGD(network.parameters(), lr=settings.learning_rate, momentum=settings.momentum,
                           weight_decay=settings.weight_decay)


def training_slices(cases, settings: TrainSettings) -> int:
    """How many slices training will hold: those with clicks (every slice for `full`)."""
    count = 0
    for case in cases:
        axis = case.image.slice_axis()
        if settings.method == "full":
            count += case.image.shape[axis]
        elif case.clicks is not None and len(case.clicks):
            count += len(np.unique(case.clicks.kji[:, axis]))
    return count


def training_bytes(cases, classes, settings: TrainSettings, device_type: str = "cpu") -> float:
    """A rough upper bound of the host memory training takes beyond the images already read: the slices resized
    to image_size (plus one volume's working copies); on the CPU also the weights (with their gradients,
    momentum and EMA teacher) and a batch's activations: about 20 maps per U-Net level and the affinity term's
    25 neighbours of each probability map, and a quarter more for the backward pass (measured on the CPU: within
    1.5 times of the peak for image_size 128-256 and batch_size 8-32)."""
    size, batch = settings.image_size, settings.batch_size
    largest = max((case.image.array.size for case in cases), default=0)
    needed = training_slices(cases, settings) * size * size * 6 + largest * 8
    if device_type == "cpu":
        network = shape_of_network(classes, settings)
        levels = sum(20 * width * (size // 2**level) ** 2 for level, width in enumerate(settings.widths))
        affinity = 25 * 3 * (len(classes) + 2) * size * size if settings.affinity_weight else 0
        needed += 4 * network_bytes(network) + 1.25 * 4 * batch * (levels + affinity)
    return float(needed)


def poly_learning_rate(settings: TrainSettings, step: int) -> float:
    return settings.learning_rate * (1 - step / settings.iterations) ** 0.9


@dataclass
class TrainingRun:
    """What one training run carries from step to step (`setup_run` makes it, `train_step` advances it)."""

    settings: TrainSettings
    processes: distributed.Processes
    device: torch.device
    generator: torch.Generator  # which slices each step draws (seed + rank)
    augmenter: torch.Generator  # the batch-wide flip/turn (the generator itself with one process)
    data: TrainingTensors  # this process's slices, on its device
    totals: dict  # the whole data set: {"slices", "clicks"}
    network_shape: dict
    network: torch.nn.Module  # the network being trained (SyncBatchNorm-converted where synchronised)
    forward: torch.nn.Module  # what the batches go through: the network, or DistributedDataParallel around it
    optimizer: torch.optim.Optimizer
    teacher: torch.nn.Module | None  # the EMA teacher of the pseudo-labels
    batch_size: int
    description: dict  # checkpoints.run_description: what a checkpoint must match to be resumed
    synchronised: bool  # SyncBatchNorm across the processes
    history: list = field(default_factory=list)
    first_step: int = 0
    pseudo_from: int = 0  # the step from which the EMA teacher's pseudo-labels join the loss
    seconds_before: float = 0.0  # spent by the runs this one resumes
    started: float = 0.0

    @property
    def use_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def bfloat16(self) -> bool:
        return uses_bfloat16(self.device, self.settings.precision)

    @property
    def channels_last(self) -> bool:  # faster convolutions on GPUs and CPUs (not known for MPS)
        return self.device.type in ("cuda", "cpu")


def train(cases: list[Case], classes: list[ClassInfo], settings: TrainSettings | None = None,
          progress=None, should_stop=None, initial: Model | None = None, checkpoint_dir=None,
          checkpoint_every: int = 0, resume=None, final_checkpoint: bool = False) -> Model:
    """Train a U-Net on the cases' clicks (or labels for `full`); returns the model with its metadata.

    `initial`: start from this model's weights (fine-tuning); its network shape must match the settings.

    `checkpoint_dir`: write `checkpoint.safetensors` there every `checkpoint_every` steps (0: never), when
    `should_stop` stops the run, and, with `final_checkpoint`, at its end (what extending the run needs).
    `resume`: such a checkpoint (or its folder), written for the same data, classes and settings (the device
    may differ): training goes on from its step with its weights, optimiser and random states, and ends where
    the uninterrupted run would. `settings.iterations` may differ from the checkpoint's if it lies beyond the
    checkpoint's step: a finished (or cut) run is then extended to that total; the learning rate goes on as
    the poly schedule of that total does from that step (so it rises again after the end of a shorter
    schedule and decays to 0 at the new end), and pseudo-labels that had started go on.

    Started by torchrun (`pscv.learn.distributed`), every process calls this with the same arguments: each draws
    `batch_size` slices a step from its own shard (global batch: batch_size x processes), gradients are
    averaged (DistributedDataParallel), the loss history is the mean over the processes, progress and
    checkpoints come from rank 0, `should_stop` is honoured at the steps that record the loss (every 10th),
    and every process returns the same model.

    The loss history is in `model.metadata["history"]` (step, loss terms) for curves.
    """
    settings = settings or TrainSettings()
    run = setup_run(cases, classes, settings, progress, should_stop, initial)
    if resume is not None:
        restore_run(run, resume)
    run.started = time.monotonic()
    if run.processes.size > 1:
        device_ids = [run.device] if run.use_cuda else None
        run.forward = torch.nn.parallel.DistributedDataParallel(run.network, device_ids=device_ids)
    progress = progress if run.processes.main else None
    local_stop = None if run.processes.size > 1 else should_stop
    reporter = Reporter("train", settings.iterations, progress, local_stop, device=str(run.device),
                        first_step=run.first_step)
    run.forward.train()
    for step in range(run.first_step, settings.iterations):
        loss, terms = train_step(run, step)
        if step % 10 == 0 or step == settings.iterations - 1:  # reading the loss waits for the device
            if record_step(run, step, loss, terms, should_stop):  # asked on any process: all stop here
                save_checkpoint(run, checkpoint_dir, step + 1)
                raise Cancelled(f"train cancelled at step {step + 1} of {settings.iterations}")
        try:
            reporter.step(step + 1, lambda loss=loss: loss.detach().item())  # this step's loss, read when reported
        except Cancelled:
            save_checkpoint(run, checkpoint_dir, step + 1)
            raise
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < settings.iterations:
            save_checkpoint(run, checkpoint_dir, step + 1)
    if final_checkpoint:
        save_checkpoint(run, checkpoint_dir, settings.iterations)
    model = finish_model(run, classes, len(cases), resumed=resume is not None)
    if settings.largest_piece:
        model.metadata["one_piece_classes"] = check_pieces(model, cases, classes, run.device, progress)
    return model


def setup_run(cases, classes, settings: TrainSettings, progress=None, should_stop=None,
              initial: Model | None = None) -> TrainingRun:
    """Join the other processes (if any), seed, load the training slices onto the device and build the
    network (from `initial`'s weights when fine-tuning), its optimiser and its EMA teacher."""
    processes = distributed.from_environment()
    several = processes.size > 1
    device = distributed.join(processes, settings.device)
    torch.manual_seed(settings.seed)
    # Slices are drawn with seed + rank; the batch-wide flip/turn is one for all processes (with one process
    # both come from one generator, as they always did).
    generator = torch.Generator().manual_seed(settings.seed + processes.rank)
    augmenter = torch.Generator().manual_seed(settings.seed + processes.size) if several else generator
    reporter = Reporter("load", 1, progress if processes.main else None, None if several else should_stop,
                        device=str(device))
    reporter.step(0, force=True, ask=False)  # `should_stop` is asked once loading has ended
    check_memory(training_bytes(cases, classes, settings, device.type),
                 f"training on {training_slices(cases, settings)} slices of {settings.image_size} x "
                 f"{settings.image_size} pixels, batch size {settings.batch_size}",
                 "lower image_size or batch_size (--image-size, --batch-size), or the network's widths")
    data = build_training_tensors(cases, classes, settings, torch.device("cpu"))
    totals = {"slices": len(data.images), "clicks": int((data.sparse != IGNORE).sum().item())}
    data = slices_on_device(data, distributed.shard(totals["slices"], processes) if several else None, device)
    reporter.step(1, force=True)
    network_shape = shape_of_network(classes, settings, training=True)
    network = build_network(network_shape)
    if initial is not None:
        if initial.metadata["network"] != shape_of_network(classes, settings):
            raise PSCVError(f"cannot fine-tune: the model's network {initial.metadata['network']} differs from "
                            f"the one these settings make {shape_of_network(classes, settings)}")
        network.load_state_dict(initial.network.state_dict(), strict=not uses_auxiliary_decoder(settings))
    if several:
        torch.manual_seed(settings.seed + processes.rank)  # same initial weights, dropout of its own
    network = network.to(device)
    if device.type in ("cuda", "cpu"):  # TrainingRun.channels_last
        network = network.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    synchronised = several and device.type == "cuda" and settings.sync_batchnorm  # SyncBatchNorm needs GPUs
    if synchronised:
        network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
    optimizer = build_optimizer(network, settings)
    teacher = None
    if settings.pseudo_weight and settings.method != "full":
        teacher = copy.deepcopy(network).eval().requires_grad_(False)
    batch_size = min(settings.batch_size, len(data.images)) if settings.method == "full" else settings.batch_size
    description = checkpoints.run_description(classes, network_shape, settings.to_dict(), processes.size, totals)
    return TrainingRun(settings, processes, device, generator, augmenter, data, totals, network_shape, network,
                       network, optimizer, teacher, batch_size, description, synchronised,
                       pseudo_from=int(settings.pseudo_start * settings.iterations))


def restore_run(run: TrainingRun, resume) -> None:
    """Go on from a checkpoint (or its folder) of the same run: its weights, optimiser, random states, step,
    loss history and time spent."""
    resume = checkpoints.checkpoint_file(resume)
    tensors, state = checkpoints.load_checkpoint(resume)
    checkpoints.check_compatible(resume, state["run"], run.description)
    randoms = checkpoints.restore(resume, tensors, state, run.network, run.optimizer, run.teacher, run.processes.rank)
    checkpoints.set_random_states(randoms, run.generator, run.augmenter, run.device)
    run.history, run.first_step, run.seconds_before = state["history"], state["step"], state["seconds"]
    checkpoints.check_extension(resume, run.first_step, run.settings.iterations)
    # Extended (or shortened): pseudo-labels that had started in the resumed run go on.
    earlier = int(run.settings.pseudo_start * state["run"]["settings"].get("iterations", run.settings.iterations))
    run.pseudo_from = min(run.pseudo_from, max(earlier, 0))


def draw_batch(run: TrainingRun):
    """This step's slices, augmented: (images, clicks, dense labels or None, classes present, outside or None)."""
    settings = run.settings
    index = torch.randint(0, len(run.data.images), (run.batch_size,), generator=run.generator).to(run.device)
    batch = slices_on_device(run.data, index, run.device)
    images, sparse, dense, outside = batch.images, batch.sparse, batch.dense, batch.outside
    if settings.augment == "flip":
        images, sparse, dense, outside = flip_batch([images, sparse, dense, outside], run.augmenter)
    elif settings.augment == "affine":
        images, sparse, (dense, outside) = affine_batch(
            images, sparse, [dense, outside], run.augmenter, settings.augment_rotation, settings.augment_scale,
            settings.augment_intensity, aligned=settings.method == "pscv")
    return images, sparse, dense, batch.present, outside


def train_step(run: TrainingRun, step: int):
    """One step: draw a batch, augment it, forward, the loss terms, backward, update (and the teacher).
    Returns the loss and its terms (tensors on the device: reading them waits for it)."""
    settings = run.settings
    images, sparse, dense, present, outside = draw_batch(run)
    for group in run.optimizer.param_groups:
        group["lr"] = poly_learning_rate(settings, step)
    if run.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    auxiliary = uses_auxiliary_decoder(settings)
    mix = torch.rand((), generator=run.augmenter).item() if auxiliary else 0.5
    with torch.autocast(device_type=run.device.type, dtype=torch.bfloat16, enabled=run.bfloat16):
        logits, auxiliary_logits = run.forward(images, auxiliary=True) if auxiliary else (run.forward(images), None)
        teacher_probabilities = None
        if run.teacher is not None and step >= run.pseudo_from:
            with torch.no_grad():
                teacher_probabilities = run.teacher(images).float().softmax(dim=1)
    terms = loss_terms(logits, images, sparse, dense, present, settings, step, teacher_probabilities,
                       auxiliary_logits, mix, outside)
    loss = sum(terms.values())
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    if run.teacher is not None:
        update_teacher(run.teacher, run.network, settings.ema_decay)
    return loss, terms


def record_step(run: TrainingRun, step: int, loss, terms: dict, should_stop) -> bool:
    """Add the step's loss (mean over the processes) to the history; whether any process was asked to stop
    (with several processes `should_stop` is asked here, so that all stop after the same step)."""
    stop = run.processes.size > 1 and should_stop is not None and should_stop()
    values, stop = distributed.mean_and_any({"loss": loss, **terms}, stop)
    run.history.append({"step": step, **values})
    if not math.isfinite(run.history[-1]["loss"]):
        raise PSCVError(f"training diverged at step {step} (loss {run.history[-1]['loss']}); lower the "
                        "learning rate or the loss weights")
    return stop


def save_checkpoint(run: TrainingRun, checkpoint_dir, steps_done: int) -> None:
    """Write `checkpoint_dir/checkpoint.safetensors` (none without a folder): every process gives its random
    states, rank 0 writes."""
    if checkpoint_dir is None:
        return
    randoms = distributed.gather_objects(checkpoints.random_states(run.generator, run.augmenter, run.device))
    if run.processes.main:
        state = {"step": steps_done, "run": run.description,
                 "optimizer": checkpoints.optimizer_description(run.optimizer), "history": run.history,
                 "seconds": run.seconds_before + time.monotonic() - run.started}
        checkpoints.save_checkpoint(Path(checkpoint_dir) / checkpoints.CHECKPOINT,
                                    checkpoints.training_tensors(run.network, run.optimizer, run.teacher, randoms),
                                    state)


PIECE_CHECK_CASES = 20  # enough to see a class of several pieces, a few seconds of inference


def check_pieces(model: Model, cases, classes, device, progress=None) -> list:
    """The classes whose largest piece a prediction keeps (`pieces.one_piece_classes`), from the model's own
    prediction of the first training cases: their clicks (or, for `full`, their labels) must lie in one piece.
    Not cancellable: it runs after the last step, and a cancel must not lose the trained network."""
    from .inference import predict_volume

    full = model.metadata["method"] == "full"
    checked = [case for case in cases if (case.labels if full else case.clicks) is not None][:PIECE_CHECK_CASES]
    reporter = Reporter("check pieces", len(checked), progress, device=str(device))

    def predictions():
        for done, case in enumerate(checked):
            yield case.labels if full else predict_volume(model, case.image, device)
            reporter.step(done + 1, ask=False)

    clicks = [None if full else case.clicks for case in checked]
    return one_piece_classes(predictions(), clicks, [c.value for c in classes if c.value != 0])


def finish_model(run: TrainingRun, classes, cases: int, resumed: bool) -> Model:
    """The trained network (plain batch norm again where it was synchronised) with its metadata."""
    settings, processes = run.settings, run.processes
    seconds = run.seconds_before + time.monotonic() - run.started
    network = run.network
    network.eval()
    shape = shape_of_network(classes, settings)  # the saved model: without DMPLS's auxiliary decoder
    if run.synchronised or shape != run.network_shape:  # plain batch norm (same weights), main decoder only
        trained = (run.forward.module if run.synchronised else run.network).state_dict()
        network = build_network(shape).to(run.device).eval()
        network.load_state_dict({k: v for k, v in trained.items() if not k.startswith("aux_")})
    images = (settings.iterations - run.first_step) * run.batch_size * processes.size
    images_per_second = images / max(seconds - run.seconds_before, 1e-9)
    metadata = build_metadata(
        classes, settings.normalization, shape, settings.method, settings.to_dict(),
        training={**run.totals, "cases": cases, "seconds": round(seconds, 2), "device": str(run.device),
                  "images_per_second": round(images_per_second, 1), "processes": processes.size,
                  "global_batch": run.batch_size * processes.size,
                  "resumed_from_step": run.first_step if resumed else None,
                  "device_name": torch.cuda.get_device_name(run.device) if run.use_cuda
                  else platform.processor() or None,
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        history=run.history,
    )
    return Model(network.to(memory_format=torch.contiguous_format), metadata)
