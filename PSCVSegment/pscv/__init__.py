"""PSCV engine: train a 2D U-Net from point clicks and segment whole volumes.

Plain Python: never imports slicer, qt, ctk or vtk. Its layers are its subpackages, lowest first; a module
imports only from its own layer and those below (Testing/test_layers.py checks it):

| layer                       | job                                                                  | torch |
|-----------------------------|----------------------------------------------------------------------|-------|
| `pscv` (this file), `base`  | PSCVError, the version; atomic writes, progress events and cancel    | no    |
| `data`                      | files and plain data: images, DICOM, geometry, classes, clicks,      | no    |
|                             | segmentation files, DICOM-SEG, file formats, intensities, metrics,   |       |
|                             | dataset folders                                                      |       |
| `learn`                     | network, losses, the one training loop, inference, models,           | yes   |
|                             | checkpoints, several processes, the single-case mode                 |       |
| `jobs`                      | the job-folder format, input staging, running a job, the worker,     | only  |
|                             | worker processes, the client, the HTTP service                       | runner|
| `cli`, `slicer_inputs`      | the command line; the 3D Slicer module's inputs                      | no*   |
| `research`                  | the ACDC benchmark and data preparation (not shipped in the Slicer   | yes   |
|                             | extension; only `cli` imports it)                                    |       |

(*) `cli` imports the layers below inside its commands, so `pscv --help` stays instant. 3D Slicer's own
process uses `data`, `jobs.client` and `slicer_inputs`, which import no torch. docs/ENGINE_API.md is the
contract between the parts.
"""

__version__ = "0.1.0"


class PSCVError(Exception):
    """An error a person can act on: the message says what was wrong, where, and how to fix it."""
