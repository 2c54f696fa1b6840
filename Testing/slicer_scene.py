"""Test helper: a scene built the way 3D Slicer builds its own, from slicer-core's real classes.

3D Slicer itself cannot be installed here; its MRML libraries can (the ``slicer-core`` wheel: vtkMRMLScene,
the markups, segmentation, volume and transform nodes, their storage nodes and the modules' logic classes,
no Qt). What the application adds at start-up is done here with the same classes: the Segmentations
module logic on the scene (it registers the segmentation conversion rules, as in Slicer), the application
logic (the selection and interaction singletons) and the subject hierarchy. Nothing here is a stand-in for
Slicer: where the application's Qt layer would act (the subject-hierarchy plugins that give every new data
node an item), the helper does the same with the MRML call and says so.
"""

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install 'pscv[slicer]'; .ci/run installs it)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package found is not slicer-core", allow_module_level=True)
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[1] / "PSCVSegment"  # on sys.path (pyproject.toml), as in Slicer


class SlicerScene:
    """A scene with the logics the application would attach to it."""

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()
        self.applicationLogic = slicer.vtkMRMLApplicationLogic()
        self.applicationLogic.SetMRMLScene(self.scene)  # selection and interaction singletons
        self.segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
        self.segmentationsLogic.SetMRMLScene(self.scene)  # registers the conversion rules, as in Slicer
        self.subjectHierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)

    def addVolume(self, array, ijkToRas, name="volume", study=None):
        """A scalar volume node holding ``array`` ([k, j, i]) with the IJK-to-RAS matrix ``ijkToRas``; with
        ``study`` (a name) it gets a patient/study item, as loading from DICOM gives it."""
        array = np.ascontiguousarray(array)
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        imageData = vtk.vtkImageData()
        imageData.SetDimensions(array.shape[::-1])
        scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
        imageData.GetPointData().SetScalars(scalars)
        node.SetAndObserveImageData(imageData)
        node.SetIJKToRASMatrix(matrix(ijkToRas))
        node.CreateDefaultDisplayNodes()
        self.shItem(node, study)
        return node

    def shItem(self, node, study=None):
        """The node's subject-hierarchy item (created, as Slicer's subject-hierarchy plugins do for new nodes)."""
        sh = self.subjectHierarchy
        item = sh.GetItemByDataNode(node)
        parent = sh.GetSceneItemID()
        if study:
            patient = sh.CreateSubjectItem(sh.GetSceneItemID(), f"{study} patient")
            parent = sh.CreateStudyItem(patient, study)
        if not item:
            item = sh.CreateItem(parent, node)
        else:
            sh.SetItemParent(item, parent)
        return item

    def addTransform(self, localToParent, parent=None):
        node = self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        node.SetMatrixTransformToParent(matrix(localToParent))
        if parent is not None:
            node.SetAndObserveTransformNodeID(parent.GetID())
        return node

    def addPoints(self, name, worldPositions, transform=None):
        """A point list whose control points lie at ``worldPositions`` (world RAS), optionally under
        ``transform`` (the positions are then stored in its local frame)."""
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.CreateDefaultDisplayNodes()
        if transform is not None:
            node.SetAndObserveTransformNodeID(transform.GetID())
        for position in np.asarray(worldPositions, dtype=float).reshape(-1, 3):
            node.AddControlPointWorld(vtk.vtkVector3d(*position))
        return node


def matrix(array):
    result = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            result.SetElement(row, column, float(array[row][column]))
    return result


def rotation(axis, degrees):
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    if axis == "x":
        return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])
    return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


def affine(rotationMatrix, translation):
    result = np.eye(4)
    result[:3, :3] = rotationMatrix
    result[:3, 3] = translation
    return result
