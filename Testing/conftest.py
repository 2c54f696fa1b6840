"""Shared test helpers: tiny job inputs (a small two-class volume, its clicks and classes) and settings
that train in a fraction of a second, so tests that start real worker processes stay fast; small full or
read-only disks (tmpfs, root only) and other helpers of the hostile-input tests."""

import contextlib
import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pscv.data.classes import ClassInfo, write_classes
from pscv.data.clicks import simulate_clicks, write_markups
from pscv.data.volumes import Volume, write_image

TINY_CLASSES = [ClassInfo("background", 0, (0, 0, 0)), ClassInfo("organ", 1, (230, 159, 0))]
# A two-level U-Net of 4 and 8 channels on 32x32 slices: each iteration takes milliseconds on a CPU.
TINY_SETTINGS = {"device": "cpu", "iterations": 2, "image_size": 32, "batch_size": 2, "widths": [4, 8],
                 "dropout": [0.0, 0.0], "augment": "none"}
# A segment job that trains a network (after segmenting) until it is stopped.
UNTIL_STOPPED = {**TINY_SETTINGS, "train_model": True, "iterations": 1_000_000}


def write_tiny_case(folder, slices: int = 3, size: int = 32) -> dict:
    """Write image.nrrd, points.mrk.json and classes.json of a tiny volume (a bright box on a dark background,
    one click per class per slice) into `folder`; returns {"image", "points", "classes"} paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.zeros((slices, size, size), dtype=np.uint8)
    labels[:, size // 4:size * 5 // 8, size // 3:size * 3 // 4] = 1
    noise = np.random.default_rng(0).normal(0, 30, labels.shape)
    volume = Volume((labels.astype(np.float32) * 800 + noise).astype(np.float32), spacing=(1.0, 1.0, 3.0))
    paths = {"image": folder / "image.nrrd", "points": [folder / "points.mrk.json"], "classes": folder / "classes.json"}
    write_image(volume, paths["image"])
    write_classes(TINY_CLASSES, paths["classes"])
    write_markups(simulate_clicks(labels, seed=0, slice_axis=0), volume, TINY_CLASSES, paths["points"][0])
    return paths


def write_tiny_job(folder, kind: str = "segment", **settings) -> Path:
    """A job folder running `kind` on the tiny case with TINY_SETTINGS (updated by `settings`)."""
    folder = Path(folder)
    write_tiny_case(folder)
    document = {"version": 1, "kind": kind,
                "inputs": {"image": "image.nrrd", "points": ["points.mrk.json"], "classes": "classes.json"},
                "settings": {**TINY_SETTINGS, **settings}}
    (folder / "job.json").write_text(json.dumps(document))
    return folder


@pytest.fixture
def tiny_case(tmp_path) -> dict:
    return write_tiny_case(tmp_path / "case")


@contextlib.contextmanager
def small_disk(path, size: str = "256k", full: bool = False, read_only: bool = False):
    """A tmpfs of `size` mounted at `path` (needs root; the test is skipped without the permission), filled up
    when `full`, remounted read-only when `read_only` (what is written into it before stays readable)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"a full or read-only disk needs permission to mount a tmpfs ({mounted.stderr.decode().strip()})")
    try:
        if full:
            fill(path / ".filler")
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path) -> None:
    """Write `path` until its disk is full."""
    with open(path, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error


def dead_pid() -> int:
    """The id of a process that has ended (and, for a while, belongs to no other)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def files_under(folder) -> dict:
    """Every file under `folder` (hidden ones included) with its bytes: to compare before and after."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
