"""Memory bounded before the work starts (issue 13): training and inference refuse what cannot fit, with advice,
before allocating; an out-of-memory error is recognised; label maps and normalised images cost little more than
their own size. The machine's memory is made small here by replacing `available_memory`."""

import tracemalloc

import numpy as np
import pytest
import torch
from synthetic import CLASSES, two_organ_volume

from pscv import PSCVError
from pscv.data.clicks import simulate_clicks
from pscv.data.dataset import Case
from pscv.data.intensity import normalize
from pscv.data.segmentations import present_values
from pscv.learn.inference import predict_volume
from pscv.learn.training import TrainSettings, train

torch.set_num_threads(1)
SMALL = {"iterations": 2, "image_size": 32, "batch_size": 2, "device": "cpu", "widths": (4, 8), "dropout": (0, 0)}


@pytest.fixture
def case():
    volume, labels = two_organ_volume(slices=3, size=32)
    return Case(volume, simulate_clicks(labels, 0))


@pytest.fixture
def little_memory(monkeypatch):
    monkeypatch.setattr("pscv.base.resources.available_memory", lambda: 64 * 2**20)


def test_training_settings_too_large_for_the_memory_are_refused_before_allocating(case, little_memory):
    from pscv.learn.training import training_bytes

    settings = TrainSettings(**{**SMALL, "image_size": 512, "batch_size": 8})
    assert training_bytes([case], CLASSES, settings) > 64 * 2**20
    with pytest.raises(PSCVError, match=r"training on 3 slices of 512 x 512 pixels, batch size 8 needs about .* "
                                        r"more than the 64\.0 MiB this machine has free; lower image_size or "
                                        r"batch_size"):
        train([case], CLASSES, settings)
    assert train([case], CLASSES, TrainSettings(**SMALL)).image_size == 32  # what fits still trains


def test_the_estimate_bounds_a_real_run_from_above_within_a_few_times():
    """Estimated against the calibration of learn.training.training_bytes (CPU, image_size 128-256)."""
    from pscv.learn.training import training_bytes

    volume, labels = two_organ_volume(slices=10, size=64)
    settings = TrainSettings(iterations=1, image_size=256, batch_size=12, device="cpu")
    estimate = training_bytes([Case(volume, simulate_clicks(labels, 0))], CLASSES, settings)
    assert 1.5 * 2**30 < estimate < 8 * 2**30  # measured on the ACDC case: 2.9 GiB extra, estimated 4.4 GiB


def test_inference_too_large_for_the_memory_is_refused(case, monkeypatch):
    model = train([case], CLASSES, TrainSettings(**SMALL))
    monkeypatch.setattr("pscv.base.resources.available_memory", lambda: 1000)
    with pytest.raises(PSCVError, match="segmenting a 3x32x32 volume .* lower the batch size"):
        predict_volume(model, case.image, "cpu")


@pytest.mark.parametrize("message", [
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "10737418240 bytes. Error code 12 (Cannot allocate memory)",
    "DefaultCPUAllocator: not enough memory: you tried to allocate 10737418240 bytes.",
    "CUDA out of memory. Tried to allocate 2.00 GiB",
])
def test_out_of_memory_is_recognised_on_the_cpu_too(message):
    from pscv.learn.devices import is_out_of_memory

    assert is_out_of_memory(RuntimeError(message)) and is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def peak_bytes(function, *args):
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_present_values_makes_no_int64_copy_of_a_label_map():
    labelmap = np.zeros((40, 256, 256), dtype=np.uint8)  # 2.5 MiB; an int64 copy would be 20 MiB
    labelmap[5, 10:20, 10:20], labelmap[7, :3, :3] = 3, 200
    assert present_values(labelmap) == [0, 3, 200]
    assert peak_bytes(present_values, labelmap) < labelmap.nbytes


def test_normalize_keeps_float32_and_about_the_image_size():
    image = np.random.default_rng(0).normal(100, 50, (20, 128, 128)).astype(np.float32)  # 1.25 MiB
    for settings in ({"mode": "percentile", "low": 0.5, "high": 99.5}, {"mode": "window", "low": 0, "high": 200}):
        normalised = normalize(image, settings)
        assert normalised.dtype == np.float32 and 0 <= normalised.min() and normalised.max() <= 1
        low, high = (np.percentile(image, [0.5, 99.5]) if settings["mode"] == "percentile" else (0, 200))
        assert np.allclose(normalised, (np.clip(image, low, high) - low) / (high - low), atol=1e-6)
        # the result and the percentile's working copy; float64 steps would take four times the image or more
        assert peak_bytes(normalize, image, settings) < 2.5 * image.nbytes
