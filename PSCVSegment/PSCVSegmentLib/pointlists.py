"""One markups point list (``vtkMRMLMarkupsFiducialNode``) per class, in table order (the first is the background):
the class's name is the list's name, its colour the list's colour, its terminology an attribute of the list.

Points are taken in world RAS (``GetNthControlPointPositionWorld``), which includes the list's own parent
transform; the volume's parent transform is undone in ``volumes.worldToVolumeMatrix``.
"""

from __future__ import annotations

import os

import numpy as np
import slicer

from . import engine, terminology

BACKGROUND_COLOR = (0.6, 0.6, 0.6)
TERMINOLOGY_ATTRIBUTE = "PSCVSegment.Terminology"  # Slicer's serialized terminology entry of the class


def pointListEvents():
    """The events a class point list invokes when a point is placed or removed, when it is renamed, and when
    its colour changes elsewhere (Markups module: only DisplayModifiedEvent): what the class table observes."""
    import vtk

    node = slicer.vtkMRMLMarkupsFiducialNode
    return (node.PointPositionDefinedEvent, node.PointRemovedEvent, node.DisplayModifiedEvent,
            vtk.vtkCommand.ModifiedEvent)


def classColor(value):
    """The default colour (r, g, b in 0..1) of class ``value``: grey for the background, else the engine's."""
    if value == 0:
        return BACKGROUND_COLOR
    return tuple(c / 255 for c in engine.DEFAULT_COLORS[(value - 1) % len(engine.DEFAULT_COLORS)])


def addClassPointList(scene, name, value, color=None, terminologyEntry=None):
    """A new point list for the class with label ``value`` (0: background)."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", str(name))
    node.SetName(str(name))  # AddNewNodeByClass may make the name unique; a class is its name
    node.CreateDefaultDisplayNodes()
    setPointListColor(node, color if color is not None else classColor(value))
    if terminologyEntry:
        setClassTerminology(node, terminologyEntry)
    return node


def pointListColor(node):
    displayNode = node.GetDisplayNode()
    return tuple(displayNode.GetSelectedColor()) if displayNode else BACKGROUND_COLOR


def setPointListColor(node, color) -> None:
    displayNode = node.GetDisplayNode()
    if displayNode:
        displayNode.SetSelectedColor(*color)
        displayNode.SetColor(*color)


def classTerminology(node) -> str:
    return node.GetAttribute(TERMINOLOGY_ATTRIBUTE) or ""


def setClassTerminology(node, entry) -> None:
    node.SetAttribute(TERMINOLOGY_ATTRIBUTE, str(entry) if entry else None)


def definedPointCount(node) -> int:
    return sum(node.GetNthControlPointPositionStatus(i) == node.PositionDefined
               for i in range(node.GetNumberOfControlPoints()))


def pointListData(node):
    """The defined control points of a point list as the engine's ``PointList`` (world RAS, labels)."""
    positions, labels = [], []
    for index in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(index) != node.PositionDefined:
            continue
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(index, position)
        positions.append(position)
        labels.append(node.GetNthControlPointLabel(index))
    return engine.PointList(node.GetName(), np.array(positions, dtype=float).reshape(-1, 3), labels)


def classesFromPointLists(nodes):
    """The engine's classes from the point lists in table order: names, colours, values 0, 1, ..., terminology."""
    classes = engine.classes_from_names([node.GetName() for node in nodes], [pointListColor(node) for node in nodes])
    for info, node in zip(classes, nodes):
        info.terminology = terminology.deserialize(classTerminology(node))
    return classes


def segmentProblems(volumeNode, nodes) -> list:
    """What keeps Segment from running, as sentences for a tooltip (empty when ready)."""
    problems = []
    if volumeNode is None:
        problems.append("Select an input volume.")
    if len(nodes) < 2:
        problems.append("Add classes: the background and at least one organ.")
    empty = [node.GetName() for node in nodes if not definedPointCount(node)]
    if empty:
        problems.append(f"Place points on: {', '.join(empty)}.")
    names = [node.GetName().strip().lower() for node in nodes]
    duplicates = sorted({node.GetName() for node in nodes if names.count(node.GetName().strip().lower()) > 1})
    if duplicates:
        problems.append(f"Two classes are named {', '.join(duplicates)}: rename one.")
    return problems


def pointsToVoxels(volumeNode, node) -> np.ndarray:
    """Voxel indices ``[k, j, i]`` of the defined points of a point list (the numpy array order)."""
    from . import volumes

    data = pointListData(node)
    rasToIjk = np.linalg.inv(volumes.ijkToRasMatrix(volumeNode))
    return engine.world_to_kji(data.world_ras, rasToIjk, volumes.worldToVolumeMatrix(volumeNode))


def loadPointLists(scene, path) -> list:
    """Every markup of a ``.mrk.json`` file as its own point list, named as in the file (as Slicer's Markups
    reader loads it); the storage node is dropped, so saving the scene never writes back into ``path``."""
    path = os.fspath(path)
    probe = slicer.vtkMRMLMarkupsJsonStorageNode()
    types = []
    probe.GetMarkupsTypesInFile(path, types)
    if not types:
        raise ValueError(f"{path}: no markups in the file")
    nodes = []
    for index in range(len(types)):
        storageNode = slicer.vtkMRMLMarkupsJsonStorageNode()
        scene.AddNode(storageNode)
        node = storageNode.AddNewMarkupsNodeFromFile(path, None, index)
        if node is None:
            scene.RemoveNode(storageNode)
            raise ValueError(f"{path}: markup #{index + 1} could not be read")
        node.SetAndObserveStorageNodeID(None)
        scene.RemoveNode(storageNode)
        nodes.append(node)
    return nodes


def startPlacing(scene, node) -> bool:
    """Make ``node`` the active point list and switch the views to placing points, several in a row."""
    selectionNode = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    interactionNode = scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
    if selectionNode is None or interactionNode is None:
        return False
    selectionNode.SetReferenceActivePlaceNodeClassName(node.GetClassName())
    selectionNode.SetActivePlaceNodeID(node.GetID())
    interactionNode.SetPlaceModePersistence(1)
    interactionNode.SetCurrentInteractionMode(interactionNode.Place)
    return True
