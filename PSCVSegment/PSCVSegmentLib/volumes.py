"""A scalar volume node as the engine sees it: its voxels ``[k, j, i]``, its IJK-to-RAS matrix and the inverse
of its parent transform (world RAS -> the volume's own RAS), and the job input files made from them.

Paths handed to VTK or MRML are ``str`` (issue 11, bug 2): only some VTK wrappers accept path-like objects.
"""

from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

from . import engine


def arrayFromVolume(volumeNode) -> np.ndarray:
    """The voxels of a scalar volume node as a numpy array ``[k, j, i]`` (a copy)."""
    if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise ValueError("Select a scalar volume (CT or MRI) as input.")
    imageData = volumeNode.GetImageData()
    scalars = imageData.GetPointData().GetScalars() if imageData is not None else None
    if scalars is None:
        raise ValueError(f"Volume '{volumeNode.GetName()}' has no voxels.")
    if scalars.GetNumberOfComponents() != 1:
        raise ValueError(f"Volume '{volumeNode.GetName()}' has {scalars.GetNumberOfComponents()} components per "
                         "voxel; choose a scalar (grey-level) volume.")
    dimensions = imageData.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(dimensions[::-1]).copy()


def arrayFromMatrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def ijkToRasMatrix(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return arrayFromMatrix(matrix)


def worldToVolumeMatrix(volumeNode):
    """Inverse of the volume's parent transform (world RAS -> volume RAS) as a 4x4 array, or None if untransformed."""
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is None:
        return None
    if not transformNode.IsTransformToWorldLinear():
        raise ValueError(f"Volume '{volumeNode.GetName()}' is under a non-linear transform: harden the transform "
                         "(Transforms module) or remove it before segmenting.")
    matrix = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformFromWorld(matrix)
    return arrayFromMatrix(matrix)


def engineVolume(volumeNode):
    """The engine's ``Volume`` (voxels and LPS geometry) of a volume node, ignoring its parent transform."""
    return engine.volume_from_ijk_to_ras(arrayFromVolume(volumeNode), ijkToRasMatrix(volumeNode))


def writeJobInputs(directory, volumeNode, pointListNodes=None, classes=None, requireAll=True) -> dict:
    """Write image.nrrd (the volume's voxels, its own geometry), classes.json and points.mrk.json (each class's
    defined points, from world RAS through the inverse parent transform into the image's LPS) into
    ``directory``; returns the file arguments of ``JobClient.submit``."""
    from . import pointlists

    array = arrayFromVolume(volumeNode)
    if array.ndim != 3:
        raise ValueError(f"Volume '{volumeNode.GetName()}' is not a 3-D scalar image (array shape {array.shape}).")
    if pointListNodes is not None and classes is None:
        classes = pointlists.classesFromPointLists(pointListNodes)
    pointLists = [pointlists.pointListData(node) for node in pointListNodes] if pointListNodes is not None else None
    return engine.write_job_inputs(str(directory), array, ijkToRasMatrix(volumeNode), classes, pointLists,
                                   worldToVolumeMatrix(volumeNode), require_all=requireAll)
