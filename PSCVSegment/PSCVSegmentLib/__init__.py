"""The Qt-free layer of the PSCV Segment module: what the module does to MRML nodes and to its jobs.

Everything here may import numpy, vtk and Slicer's MRML and logic classes (through the ``slicer`` namespace,
which both 3D Slicer and the ``slicer-core`` wheel provide), but never qt, ctk or ``slicer.app``; the scene
is always an argument. So it runs inside Slicer and in pytest with slicer-core's real classes
(Testing/test_slicer_mrml.py). The engine (``pscv``) is used only through ``PSCVSegmentLib.engine``.

Modules:
    engine       the engine's public names, imported in one place, and the check that ``pscv`` is ours
    environment  which Python runs the worker, with which environment; torch and package checks
    volumes      voxels and matrices of a volume node; the job's input files
    pointlists   one markups point list per class: creation, colours, counts, placing, loading
    terminology  standard terminology entries between Slicer's serialized form and the engine's
    results      a result .seg.nrrd into a segmentation node (staged, then swapped in), study, 3D
    export       .seg.nrrd and DICOM-SEG export of a segmentation node
    tasks        a job in the background: submit, follow, download, log, clean up, scene guard
    cohort       the dataset folder of the cohort workflow
    sampledata   the shipped ACDC sample for the SampleData module
    interactive  extension points for refine, strokes and suggested points (issue 9)
"""
