"""PSCV engine: train a 2D U-Net from point clicks and segment whole volumes.

Plain Python: never imports slicer, qt, ctk or vtk, and imports torch only in the modules that train or
infer, so the file layer can be used inside 3D Slicer's own process.
"""

__version__ = "0.1.0"


class PSCVError(Exception):
    """An error a person can act on: the message says what was wrong, where, and how to fix it."""
