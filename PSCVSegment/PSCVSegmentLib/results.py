"""A job's result (a ``.seg.nrrd`` on the input volume's grid) into a segmentation node.

The import never half-happens (issue 11):
1. the file is read into a hidden temporary node; its labelmap layers are copied out and the node removed;
2. each layer is brought into the frame of the target segmentation (its parent transform, which may not be
   the volume's: the target's own segments are never moved);
3. names, replacements and voxel types are checked before the target changes;
4. the new segments are added (shared layers and label values kept); only once all are in are the segments
   they replace removed; if adding fails, the added ones are removed again and the target is as it was.

A new segmentation gets the volume's parent transform and reference geometry and goes into the volume's
subject-hierarchy study (DICOM-SEG export needs it there).
"""

from __future__ import annotations

import os

import slicer
import vtk

from . import engine, terminology

BINARY_LABELMAP = "Binary labelmap"
CLOSED_SURFACE = "Closed surface"


def segmentationEvents():
    """The events a segmentation node invokes when its segments come and go, when surfaces are made or dropped
    (Show 3D) or its display changes: what the module observes so that its export and Show 3D buttons never
    go stale. (Adding a segment does not invoke ModifiedEvent on the node.)"""
    return (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
            slicer.vtkSegmentation.ContainedRepresentationNamesModified,
            slicer.vtkMRMLDisplayableNode.DisplayModifiedEvent, vtk.vtkCommand.ModifiedEvent)


class SegmentsExistError(RuntimeError):
    """The target segmentation already has segments the result would replace; pass replace=True."""

    def __init__(self, segmentationNode, names):
        self.names = list(names)
        super().__init__(f"Segmentation '{segmentationNode.GetName()}' already has segment(s) "
                         f"{', '.join(self.names)}; they would be replaced.")


class ResultImportError(RuntimeError):
    """The result could not be imported; the target segmentation was left unchanged."""


def segmentIds(segmentationNode) -> list:
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetNthSegmentID(index) for index in range(segmentation.GetNumberOfSegments())]


def segmentNames(segmentationNode) -> list:
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetSegment(segmentId).GetName() for segmentId in segmentIds(segmentationNode)]


def segmentsToReplace(segmentationNode, classesOrNames) -> list:
    """Names of the target's segments that the result would replace (same name, case-insensitive)."""
    return engine.segments_to_replace(segmentNames(segmentationNode), classesOrNames)


def _temporaryNode(scene, className, name):
    node = scene.AddNewNodeByClass(className, name)
    node.SetHideFromEditors(True)
    node.SetSaveWithScene(False)
    return node


def _volumeToTargetTransform(volumeNode, targetTransformNode):
    """The transform from the volume's frame to the target's frame, or None when they are the same frame."""
    sourceTransformNode = volumeNode.GetParentTransformNode()
    if sourceTransformNode is targetTransformNode or (
            sourceTransformNode is not None and targetTransformNode is not None
            and sourceTransformNode.GetID() == targetTransformNode.GetID()):
        return None
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(sourceTransformNode, targetTransformNode, transform)
    return transform


def readSegmentationFile(scene, path, name="PSCV result (temporary)"):
    """A hidden segmentation node holding the segments of a .seg.nrrd file (the caller removes it)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ResultImportError(f"The result file {path} does not exist.")
    checkReadable(path)
    node = _temporaryNode(scene, "vtkMRMLSegmentationNode", name)
    storageNode = slicer.vtkMRMLSegmentationStorageNode()
    storageNode.SetFileName(str(path))  # str: MRML setters are not all path-like aware (bug 2)
    if not storageNode.ReadData(node):
        scene.RemoveNode(node)
        raise ResultImportError(f"Could not read the result file {path}.")
    return node


def _resultLayers(resultNode, backgroundNames):
    """[(labelmap, [(labelValue, name, segmentId), ...])] per shared labelmap layer of the result, without
    the background; each labelmap a deep copy in the result's (the volume's) frame."""
    result = resultNode.GetSegmentation()
    layers = []
    for layer in range(result.GetNumberOfLayers(BINARY_LABELMAP)):
        ids = list(result.GetSegmentIDsForLayer(layer, BINARY_LABELMAP))
        wanted = [(result.GetSegment(i).GetLabelValue(), result.GetSegment(i).GetName(), i) for i in ids
                  if result.GetSegment(i).GetName().lower() not in backgroundNames]
        if not wanted:
            continue
        shared = result.GetSegment(ids[0]).GetRepresentation(BINARY_LABELMAP)
        if shared is None:
            raise ResultImportError(f"Segment '{wanted[0][1]}' of the result has no binary labelmap.")
        labelmap = slicer.vtkOrientedImageData()
        labelmap.DeepCopy(shared)
        layers.append((labelmap, wanted))
    return layers


def checkReadable(path) -> None:
    """Decode the whole file with SimpleITK first: Slicer's NRRD reader aborts the process (not an exception)
    on a truncated gzip stream, which would take Slicer down with it."""
    import SimpleITK as sitk

    try:
        sitk.ReadImage(os.fspath(path))
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ResultImportError(f"The result file {path} is damaged or incomplete ({message}).") from None


def importResult(scene, resultPath, volumeNode, segmentationNode=None, classes=None, replace=False,
                 newName=None):
    """Import a result .seg.nrrd into ``segmentationNode`` (a new one if None); returns the segmentation node.

    Segments keep the names and label values in the file (the class with value 0, or without ``classes`` a
    segment named "background", is skipped); colours and terminology come from ``classes`` (matched by
    name) when given, else from the file. An existing segment with a result's name is replaced only with
    ``replace``, else SegmentsExistError; the target's other segments are never touched, nor moved.
    """
    _checkTarget(scene, volumeNode, segmentationNode)
    layers = _readLayers(scene, resultPath, classes)
    names = [segment["name"] for _, segments in layers for segment in segments]
    existing = segmentsToReplace(segmentationNode, names) if segmentationNode is not None else []
    if existing and not replace:
        raise SegmentsExistError(segmentationNode, existing)
    # Into the target's frame: its parent transform, which may not be the volume's (its segments stay put).
    targetTransformNode = (segmentationNode.GetParentTransformNode() if segmentationNode is not None
                           else volumeNode.GetParentTransformNode())
    toTarget = _volumeToTargetTransform(volumeNode, targetTransformNode)
    for labelmap, _ in layers:
        if toTarget is not None:
            slicer.vtkOrientedImageDataResample.TransformOrientedImage(labelmap, toTarget)
        if slicer.vtkOrientedImageDataResample.IsImageScalarTypeValid(labelmap) == \
                slicer.vtkOrientedImageDataResample.TYPE_ERROR:
            raise ResultImportError("The result's labelmap has a voxel type that segments cannot hold.")

    # Everything is ready: only now is the target changed.
    if segmentationNode is None:
        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                   newName or f"{volumeNode.GetName()} segmentation")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        placeInStudy(scene, segmentationNode, volumeNode)
    elif not segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole()):
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    _addLayers(segmentationNode, layers, existing)
    return segmentationNode


def _checkTarget(scene, volumeNode, segmentationNode):
    if volumeNode is None or volumeNode.GetScene() is not scene:
        raise ResultImportError("The input volume is not in this scene any more; the result was not imported.")
    if segmentationNode is None:
        return
    if segmentationNode.GetScene() is not scene:
        raise ResultImportError("The output segmentation is not in this scene any more; the result was not "
                                "imported.")
    source = segmentationNode.GetSegmentation().GetSourceRepresentationName()
    if segmentationNode.GetSegmentation().GetNumberOfSegments() and source != BINARY_LABELMAP:
        raise ResultImportError(
            f"Segmentation '{segmentationNode.GetName()}' is edited as '{source}', not as a binary labelmap; "
            "choose another output segmentation (or none, to create a new one).")


def _readLayers(scene, resultPath, classes):
    """[(labelmap, [{"value", "name", "color", "terminology"}])] of the result file, per shared layer, in the
    volume's frame; names, colours (0..1) and terminology entries as they will be set."""
    byName = {info.name.lower(): info for info in classes or []}
    # The background makes no segment: the class with value 0, or (a file without classes) one named so.
    backgroundNames = {info.name.lower() for info in classes if info.value == 0} if classes else {"background"}
    resultNode = readSegmentationFile(scene, resultPath)
    try:
        result = resultNode.GetSegmentation()
        layers = []
        for labelmap, wanted in _resultLayers(resultNode, backgroundNames):
            segments = []
            for value, name, segmentId in wanted:
                info = byName.get(name.lower())
                entry = terminology.segmentTerminology(result.GetSegment(segmentId))
                if info is not None and info.terminology:
                    entry = terminology.serialize(info.terminology)
                color = [c / 255 for c in info.color] if info is not None else result.GetSegment(segmentId).GetColor()
                segments.append({"value": value, "name": name, "color": tuple(color),
                                 "terminology": entry or terminology.serialize(None)})
            layers.append((labelmap, segments))
    finally:
        scene.RemoveNode(resultNode)
    names = [segment["name"] for _, segments in layers for segment in segments]
    if not names:
        raise ResultImportError(f"The result {os.fspath(resultPath)} holds no segment to import.")
    if len({name.lower() for name in names}) != len(names):
        raise ResultImportError(f"The result has several segments named alike ({', '.join(names)}).")
    if any(segment["value"] < 1 for _, segments in layers for segment in segments):
        raise ResultImportError("The result has a segment without a label value.")
    return layers


def _addLayers(segmentationNode, layers, replacedNames):
    """Add the new segments (layers shared, label values kept), then remove the replaced ones; if adding fails,
    remove what was added, so that the segmentation is as it was."""
    target = segmentationNode.GetSegmentation()
    if not target.GetNumberOfSegments():
        target.SetSourceRepresentationName(BINARY_LABELMAP)
    replacedIds = [target.GetSegmentIdBySegmentName(name) for name in replacedNames]
    added = []
    wasModifying = segmentationNode.StartModify()
    try:
        for labelmap, segments in layers:
            ids = vtk.vtkStringArray()
            ids.SetNumberOfValues(max(segment["value"] for segment in segments))
            for index in range(ids.GetNumberOfValues()):
                ids.SetValue(index, "")  # label values without a wanted segment (background, gaps)
            layerIds = []
            for segment in segments:
                newId = target.GenerateUniqueSegmentID(segment["name"])
                while newId in added or newId in layerIds:
                    newId = target.GenerateUniqueSegmentID(newId + "_")
                ids.SetValue(segment["value"] - 1, newId)
                layerIds.append(newId)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                    labelmap, segmentationNode, ids, None):
                raise ResultImportError(f"The result could not be added to '{segmentationNode.GetName()}'.")
            added.extend(layerIds)
            for segment, newId in zip(segments, layerIds):
                newSegment = target.GetSegment(newId)
                newSegment.SetName(segment["name"])
                newSegment.SetColor(*segment["color"])
                terminology.setSegmentTerminology(newSegment, segment["terminology"])
        for segmentId in replacedIds:
            target.RemoveSegment(segmentId)
    except Exception:
        for segmentId in added:
            if target.GetSegment(segmentId) is not None:
                target.RemoveSegment(segmentId)
        raise
    finally:
        segmentationNode.EndModify(wasModifying)


def placeInStudy(scene, node, volumeNode) -> None:
    """Put ``node`` into the volume's subject-hierarchy study (or folder), beside the volume."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if shNode is None:
        return
    volumeItem = shNode.GetItemByDataNode(volumeNode)
    if not volumeItem:
        return
    parentItem = shNode.GetItemParent(volumeItem)
    item = shNode.GetItemByDataNode(node) or shNode.CreateItem(parentItem, node)
    shNode.SetItemParent(item, parentItem)


def is3DShown(segmentationNode) -> bool:
    if segmentationNode is None:
        return False
    displayNode = segmentationNode.GetDisplayNode()
    return bool(segmentationNode.GetSegmentation().ContainsRepresentation(CLOSED_SURFACE)
                and displayNode is not None and displayNode.GetVisibility3D())


def show3D(segmentationNode, show=True) -> bool:
    """Show the segments as surfaces in the 3D views (or hide them); True on success."""
    displayNode = segmentationNode.GetDisplayNode()
    if displayNode is None:
        segmentationNode.CreateDefaultDisplayNodes()
        displayNode = segmentationNode.GetDisplayNode()
    if show:
        if not segmentationNode.CreateClosedSurfaceRepresentation():
            return False
        if displayNode is not None:
            displayNode.SetVisibility3D(True)
            displayNode.SetPreferredDisplayRepresentationName3D(CLOSED_SURFACE)
        return True
    if displayNode is not None:
        displayNode.SetVisibility3D(False)
    return True
