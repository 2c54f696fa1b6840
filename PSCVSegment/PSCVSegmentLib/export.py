"""Export a segmentation node: ``.seg.nrrd`` with Slicer's own writer, DICOM-SEG with the engine's.

DICOM-SEG export gathers the segments as one label map on the input volume's grid (Slicer's
``ExportSegmentsToLabelmapNode``, which resamples through any transforms) and hands it to the engine's
writer (highdicom) with one class per segment. Segment names are the DICOM segment labels: two segments
with the same name are refused before anything is written (rename one), while a segment named
"background" is exported like any other (the engine's background class gets a name no segment has).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import slicer
import vtk

from . import engine, results, terminology, volumes


class ExportError(RuntimeError):
    """The segmentation cannot be exported as asked; nothing was written."""


def exportSegNrrd(segmentationNode, path) -> str:
    """Write the segmentation as a .seg.nrrd (names, colours, terminology, label values and geometry as Slicer
    writes them, in the segmentation's own frame); the node keeps its own storage node. Returns the path."""
    path = os.fspath(path)
    if not path.lower().endswith(".seg.nrrd"):
        raise ExportError(f"{path}: a Slicer segmentation file ends with .seg.nrrd")
    storageNode = slicer.vtkMRMLSegmentationStorageNode()
    storageNode.SetFileName(str(path))
    storageNode.SetUseCompression(1)
    if not storageNode.WriteData(segmentationNode):
        raise ExportError(f"Could not write {path}.")
    return path


def backgroundName(segmentNames) -> str:
    """A name for the engine's background class that no segment has."""
    taken = {str(name).strip().lower() for name in segmentNames}
    name, number = "background", 1
    while name in taken:
        number += 1
        name = f"background ({number})"
    return name


def duplicateNames(segmentNames) -> list:
    lowered = [str(name).strip().lower() for name in segmentNames]
    return sorted({name for name, low in zip(segmentNames, lowered) if lowered.count(low) > 1})


def dicomSegLabelmap(scene, segmentationNode, volumeNode):
    """(label map ``[k, j, i]`` on the volume's grid, engine classes, warnings) for DICOM-SEG export: segment n
    (in segmentation order) has label n; where segments overlap, the later one wins (said in ``warnings``)."""
    segmentIds = results.segmentIds(segmentationNode)
    if not segmentIds:
        raise ExportError(f"Segmentation '{segmentationNode.GetName()}' has no segments to export.")
    segmentation = segmentationNode.GetSegmentation()
    names = [segmentation.GetSegment(i).GetName() for i in segmentIds]
    duplicates = duplicateNames(names)
    if duplicates:
        raise ExportError(f"Several segments are named {', '.join(repr(n) for n in duplicates)}; DICOM-SEG labels "
                          "each segment by its name: rename them (Segment Editor, double-click the name) and export "
                          "again.")
    shape = volumes.arrayFromVolume(volumeNode).shape
    labelmap = np.zeros(shape, dtype=np.uint16)
    covered = np.zeros(shape, dtype=np.uint16)
    for value, segmentId in enumerate(segmentIds, start=1):
        mask = segmentMask(scene, segmentationNode, segmentId, volumeNode)
        labelmap[mask] = value
        covered += mask
    warnings = []
    overlap = int(np.count_nonzero(covered > 1))
    if overlap:
        warnings.append(f"{overlap} voxels belong to more than one segment; the DICOM-SEG gives each to the last "
                        "of them in the segment list.")
    colors = [None] + [segmentation.GetSegment(i).GetColor() for i in segmentIds]
    classes = engine.classes_from_names([backgroundName(names)] + names, colors)
    for info, segmentId in zip(classes[1:], segmentIds):
        info.terminology = terminology.deserialize(terminology.segmentTerminology(segmentation.GetSegment(segmentId)))
    return labelmap, classes, warnings


def segmentMask(scene, segmentationNode, segmentId, volumeNode) -> np.ndarray:
    """A boolean array ``[k, j, i]`` of one segment on the volume's grid (through any transforms)."""
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "PSCV export (temporary)")
    labelmapNode.SetHideFromEditors(True)
    labelmapNode.SetSaveWithScene(False)
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, ids, labelmapNode, volumeNode):
            raise ExportError(f"Segment '{segmentId}' could not be resampled onto the volume's grid.")
        return volumes.arrayFromVolume(labelmapNode) > 0
    finally:
        displayNode = labelmapNode.GetDisplayNode()
        colorNode = displayNode.GetColorNode() if displayNode is not None else None
        scene.RemoveNode(labelmapNode)
        if colorNode is not None and colorNode.GetScene() is not None and not colorNode.GetSingletonTag():
            scene.RemoveNode(colorNode)


def exportDicomSeg(scene, segmentationNode, volumeNode, path, referenceFiles) -> list:
    """Write a DICOM-SEG referencing the volume's source series (``referenceFiles``: its DICOM files, one per
    slice). Returns warnings (sentences). The reference files are copied into a temporary folder that is
    removed afterwards."""
    referenceFiles = [os.fspath(f) for f in referenceFiles or []]
    if not referenceFiles:
        raise ExportError(f"Volume '{volumeNode.GetName()}' was not loaded from DICOM: DICOM-SEG needs the series "
                          "it came from.")
    missing = [f for f in referenceFiles if not os.path.isfile(f)]
    if missing:
        raise ExportError(f"{len(missing)} DICOM file(s) of the input series are not there any more (first: "
                          f"{missing[0]}); load the series again from the DICOM database.")
    labelmap, classes, warnings = dicomSegLabelmap(scene, segmentationNode, volumeNode)
    volume = engine.volume_from_ijk_to_ras(volumes.arrayFromVolume(volumeNode), volumes.ijkToRasMatrix(volumeNode))
    referenceDirectory = tempfile.mkdtemp(prefix="PSCVSegment-dicom-")
    try:
        for number, source in enumerate(referenceFiles):
            shutil.copy(source, os.path.join(referenceDirectory, f"{number:05d}.dcm"))
        engine.write_dicom_seg(os.fspath(path), labelmap, volume, classes, referenceDirectory)
    finally:
        shutil.rmtree(referenceDirectory, ignore_errors=True)
    return warnings
