"""How much training a run gets when the user does not say: iterations, image size and batch size per device.

Plain data (no torch), so that the command line's help can state them. A CPU gets a run that ends in
minutes (single case) or tens of minutes (cohort) on 2 cores; a GPU affords the full-resolution network and
many more iterations (the cohort's: the paper profile). BENCHMARKS.md has the measured times.
"""

from __future__ import annotations

# `pscv train` and train jobs (`training.cohort_settings`).
COHORT_CPU_BUDGET = {"iterations": 1500, "image_size": 128, "batch_size": 8}
COHORT_GPU_BUDGET = {"iterations": 30000, "image_size": 256, "batch_size": 12}
# The network `pscv segment --save-model` trains (`single_case.model_settings`): about a minute on 2 CPU cores for
# a 10-slice 256x216 volume.
CASE_CPU_BUDGET = {"iterations": 300, "image_size": 128, "batch_size": 8}
CASE_GPU_BUDGET = {"iterations": 2000, "image_size": 256, "batch_size": 12}


def describe(budget: dict) -> str:
    """`1000 iterations at 128 px, batch 12`."""
    return f"{budget['iterations']} iterations at {budget['image_size']} px, batch {budget['batch_size']}"
