"""PSCV engine: train a 2D U-Net from point clicks and segment whole volumes.

Plain Python that never imports slicer, qt, ctk or vtk. Its layers are its subpackages, lowest first; a
module imports only from its own layer and those below (Testing/test_layers.py checks every import):

    pscv, pscv.base   PSCVError, __version__; atomic writes, JSON inputs, output paths,      no torch
                      memory bounds, progress events and cancel
    pscv.data         files and plain data: formats, images, DICOM, geometry, classes,      no torch
                      clicks, segmentation files, DICOM-SEG, intensities, metrics, datasets
    pscv.learn        the settings and their schema (no torch), network, losses, the one   torch
                      training loop, inference, models, checkpoints, several processes,
                      the single-case mode
    pscv.jobs         the job-folder format, input staging, running a job, the worker,      torch only in
                      worker processes, the client, the HTTP service                         runner/worker
    pscv.cli          the `pscv` command line (imports the layers below inside its commands)
    pscv.slicer_inputs  the 3D Slicer module's inputs, prepared without Slicer               no torch
    pscv.research     the ACDC benchmark and data preparation: only `pscv.cli` imports it, and the Slicer
                      extension does not ship it

3D Slicer's own process uses pscv.data, pscv.jobs.client (with pscv.learn.settings) and pscv.slicer_inputs.
docs/ENGINE_API.md is the contract between the parts.
"""

__version__ = "0.1.0"


class PSCVError(Exception):
    """An error a person can act on: the message says what was wrong, where, and how to fix it."""
