"""The module's Qt-free MRML layer (PSCVSegment/PSCVSegmentLib) on slicer-core's REAL MRML classes.

3D Slicer cannot be installed here, but its MRML libraries can (the ``slicer-core`` wheel, Slicer 5.13.x):
these tests build scenes with vtkMRMLScene, markups, volume, transform, segmentation and storage nodes and
the Segmentations logic, run the layer's functions on them and read the results back with the engine,
slicerio and highdicom. ``.ci/run`` installs slicer-core (the ``slicer`` extra); without it they skip.

What only a run inside Slicer shows is listed in the README ("What is tested where").
"""

import ast
import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from slicer_scene import MODULE_DIR, SlicerScene, affine, matrix, rotation, slicer  # noqa: F401 (skips without it)

from pscv import PSCVError
from pscv.data import geometry
from pscv.data.classes import ClassInfo, read_classes
from pscv.data.clicks import read_clicks
from pscv.data.segmentations import read_segmentation, write_segmentation
from pscv.data.volumes import read_image
from PSCVSegmentLib import (  # the module folder is on sys.path (pyproject.toml), as in Slicer
    cohort,
    engine,
    export,
    interactive,
    pointlists,
    results,
    sampledata,
    terminology,
    volumes,
)

ROOT = Path(__file__).resolve().parents[1]
ACDC = ROOT / "Testing" / "Data" / "acdc"
SOURCES = [MODULE_DIR / "PSCVSegment.py", *sorted((MODULE_DIR / "PSCVSegmentLib").glob("*.py"))]


@pytest.fixture
def app():
    return SlicerScene()


def oblique_ijk_to_ras():
    angle = np.radians(25)
    return np.array([[0.0, -1.2 * np.sin(angle), 1.2 * np.cos(angle), 5.0],
                     [-0.9, 0.0, 0.0, -12.0],
                     [0.0, 1.2 * np.cos(angle), 1.2 * np.sin(angle), 30.0],
                     [0.0, 0.0, 0.0, 1.0]])


def synthetic(shape=(12, 24, 20)):
    """A volume [k, j, i] with a ball (1) and a box (2) on noise, and its label map."""
    k, j, i = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    labels = np.zeros(shape, dtype=np.uint8)
    labels[(k - 6) ** 2 + (j - 8) ** 2 + (i - 7) ** 2 <= 16] = 1
    labels[2:10, 14:21, 11:18] = 2
    image = (np.random.default_rng(0).normal(0, 10, shape) + np.choose(labels, [0, 100, 200])).astype(np.int16)
    return image, labels


CLASSES = [ClassInfo("background", 0, (153, 153, 153)), ClassInfo("ball", 1, (230, 159, 0)),
           ClassInfo("box", 2, (86, 180, 233))]


def write_result(path, labels, ijk_to_ras, classes=CLASSES):
    """A result .seg.nrrd as the worker writes it (the engine's writer) on the volume's own grid."""
    volume = geometry.volume_from_ijk_to_ras(labels, ijk_to_ras)
    write_segmentation(path, labels, volume, classes)
    return path


# --- bug 1: MRML classes come from the ``slicer`` namespace -------------------------------------------------

def mrml_imports(path):
    """(module, name, line) of every ``from X import vtkMRML...`` / ``vtkSlicer...`` in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith(("vtkMRML", "vtkSlicer", "vtkSegment")):
                    found.append((node.module, alias.name, node.lineno))
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_mrml_classes_are_imported_from_the_slicer_namespace_and_exist(path):
    """Issue 11, bug 1: ``from vtkSlicerMarkupsModuleMRMLPython import vtkMRMLMarkupsFiducialNode`` broke the
    module on Slicer >= 5.10 (the class moved into MRMLCore). Slicer's own recommendation, and what works on
    5.8 and later, is ``from slicer import ...``; each such import is executed here against slicer-core."""
    for module, name, line in mrml_imports(path):
        statement = f"from {module} import {name}"
        try:
            exec(statement, {})
        except ImportError as error:
            pytest.fail(f"{path.name}:{line}: `{statement}` fails against Slicer 5.13's MRML ({error})")
        assert module == "slicer", f"{path.name}:{line}: import MRML classes with `from slicer import {name}`"


def test_the_parameter_node_field_types_are_mrml_classes():
    tree = ast.parse((MODULE_DIR / "PSCVSegment.py").read_text())
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and any(
        isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in n.decorator_list))
    types = {ast.unparse(item.annotation) for item in wrapper.body if isinstance(item, ast.AnnAssign)}
    mrml = {t.removeprefix("list[").removesuffix("]") for t in types if "vtkMRML" in t}
    assert "vtkMRMLMarkupsFiducialNode" in mrml
    for name in mrml:
        assert hasattr(slicer, name), name


# --- bug 2: str at the VTK/MRML boundary ---------------------------------------------------------------------

class StrictSegmentationStorageNode(slicer.vtkMRMLSegmentationStorageNode):
    """The real storage node, with the file-name setter as strict as Slicer's own wrappers were reported to be
    (issue 11, bug 2: ``SetFileName`` is a plain ``vtkSetStringMacro`` without the VTK_FILEPATH hint). The
    VTK 9.6 of slicer-core accepts path-like objects for ``Set*FileName`` anyway, so the strictness is
    restored here to catch a ``pathlib.Path`` that reaches MRML through the module's code."""

    def SetFileName(self, fileName):
        if not isinstance(fileName, str):
            raise TypeError(f"SetFileName argument 1: string or None required, got {type(fileName).__name__}")
        return super().SetFileName(fileName)


@pytest.fixture
def strict_storage(monkeypatch):
    monkeypatch.setattr(slicer, "vtkMRMLSegmentationStorageNode", StrictSegmentationStorageNode)


def test_result_import_passes_str_to_set_file_name(app, tmp_path, strict_storage):
    image, labels = synthetic()
    volume = app.addVolume(image, np.diag([1.0, 1.0, 2.0, 1.0]))
    result = write_result(tmp_path / "result.seg.nrrd", labels, volumes.ijkToRasMatrix(volume))
    node = results.importResult(app.scene, Path(result), volume, classes=CLASSES)  # a Path, as job.download returns
    assert results.segmentNames(node) == ["ball", "box"]


def test_seg_nrrd_export_passes_str_to_set_file_name(app, tmp_path, strict_storage):
    image, labels = synthetic()
    volume = app.addVolume(image, np.eye(4))
    node = results.importResult(app.scene, str(write_result(tmp_path / "r.seg.nrrd", labels, np.eye(4))), volume)
    export.exportSegNrrd(node, tmp_path / "out.seg.nrrd")  # a Path, as a file dialog's result may be
    assert (tmp_path / "out.seg.nrrd").is_file()


def test_other_mrml_setters_refuse_paths_even_in_slicer_core(app, tmp_path):
    """Why ``str`` everywhere: beside SetFileName, setters such as AddFileName, SetURI and SetAttribute refuse
    path-like objects even in VTK 9.6 (measured here), so a Path must never reach MRML."""
    storage = slicer.vtkMRMLSegmentationStorageNode()
    with pytest.raises(TypeError):
        storage.AddFileName(tmp_path / "x.seg.nrrd")
    with pytest.raises(TypeError):
        storage.SetURI(tmp_path / "x.seg.nrrd")
    with pytest.raises(TypeError):
        app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode").SetAttribute("a", tmp_path)


# --- point lists to clicks -------------------------------------------------------------------------------------

def test_points_in_several_lists_land_on_their_voxels_under_transforms(app, tmp_path):
    """An oblique volume under a rotation + translation, three class lists, one of them under a transform of
    its own: the clicks the worker reads are the voxels the points were put on."""
    image, labels = synthetic()
    ijk_to_ras = oblique_ijk_to_ras()
    volume = app.addVolume(image, ijk_to_ras)
    volume_to_world = affine(rotation("z", -70) @ rotation("x", 20), (3.0, 4.0, -5.0))
    volume.SetAndObserveTransformNodeID(app.addTransform(volume_to_world).GetID())
    expected = {"background": [[0, 0, 0], [11, 23, 19], [6, 2, 18]], "ball": [[6, 8, 7], [5, 8, 8]],
                "box": [[3, 15, 12], [9, 20, 17]]}
    own_transform = app.addTransform(affine(rotation("y", 33), (-7.0, 2.0, 11.0)))
    nodes = []
    for name, kji in expected.items():
        world = geometry.kji_to_world(kji, ijk_to_ras, volume_to_world)
        nodes.append(app.addPoints(name, world, transform=own_transform if name == "ball" else None))
    for node, kji in zip(nodes, expected.values()):
        np.testing.assert_array_equal(pointlists.pointsToVoxels(volume, node), kji)

    inputs = volumes.writeJobInputs(tmp_path, volume, nodes)
    volume_read = read_image(inputs["image"])
    classes = read_classes(inputs["classes"])
    clicks = read_clicks(inputs["points"], volume_read, classes)
    for info, kji in zip(classes, expected.values()):
        np.testing.assert_array_equal(clicks.kji[clicks.values == info.value], kji)
        assert all(labels[tuple(p)] == info.value for p in kji)
    np.testing.assert_array_equal(volume_read.array, image)
    spacing, origin, direction = geometry.geometry_from_ijk_to_ras(ijk_to_ras)
    np.testing.assert_allclose(volume_read.spacing, spacing)
    np.testing.assert_allclose(volume_read.origin, origin)


def test_undefined_points_are_skipped_and_a_point_outside_is_named(app, tmp_path):
    image, _ = synthetic()
    volume = app.addVolume(image, np.eye(4))
    background = app.addPoints("background", [[1, 1, 1]])
    organ = app.addPoints("ball", [[7, 8, 6], [500, 0, 0]])
    organ.SetNthControlPointLabel(1, "ball-far")
    with pytest.raises(PSCVError, match=r"ball-far"):
        volumes.writeJobInputs(tmp_path, volume, [background, organ])
    organ.UnsetNthControlPointPosition(1)  # an unplaced point, as Slicer keeps it
    assert pointlists.definedPointCount(organ) == 1
    inputs = volumes.writeJobInputs(tmp_path, volume, [background, organ])
    assert json.loads(Path(inputs["points"][0]).read_text())["markups"][1]["controlPoints"][0]["label"]


def test_class_point_lists_carry_name_colour_and_terminology(app):
    entry = terminology.serialize({"category": ["SCT", "123037004", "Anatomical Structure"],
                                   "type": ["SCT", "10200004", "Liver"]})
    nodes = [pointlists.addClassPointList(app.scene, "background", 0),
             pointlists.addClassPointList(app.scene, "liver", 1, terminologyEntry=entry)]
    assert pointlists.pointListColor(nodes[0]) == pytest.approx(pointlists.BACKGROUND_COLOR)
    assert pointlists.pointListColor(nodes[1]) == pytest.approx([c / 255 for c in engine.DEFAULT_COLORS[0]], abs=1e-6)
    classes = pointlists.classesFromPointLists(nodes)
    assert [(c.name, c.value) for c in classes] == [("background", 0), ("liver", 1)]
    assert classes[1].terminology["type"] == ["SCT", "10200004", "Liver"]
    assert pointlists.segmentProblems(None, nodes) == ["Select an input volume.", "Place points on: background, liver."]


def test_the_point_list_events_the_table_observes_fire(app):
    """The class table's counts, names and colour buttons follow the point lists (colour buttons went stale:
    a colour changed in the Markups module fires only DisplayModifiedEvent on the list)."""
    node = pointlists.addClassPointList(app.scene, "liver", 1)
    seen = []
    for event in pointlists.pointListEvents():
        node.AddObserver(event, lambda caller, name, event=event: seen.append(event))
    for change in (lambda: node.GetDisplayNode().SetSelectedColor(1, 0, 0), lambda: node.AddControlPointWorld(1, 2, 3),
                   lambda: node.SetName("spleen"), lambda: node.RemoveNthControlPoint(0)):
        seen.clear()
        change()
        assert seen


def test_start_placing_selects_the_class_list_in_the_singletons(app):
    node = pointlists.addClassPointList(app.scene, "liver", 1)
    assert pointlists.startPlacing(app.scene, node)
    selection = app.scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    interaction = app.scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
    assert selection.GetActivePlaceNodeID() == node.GetID()
    assert interaction.GetCurrentInteractionMode() == interaction.Place and interaction.GetPlaceModePersistence()


# --- terminology ------------------------------------------------------------------------------------------------

def test_terminology_round_trips_through_slicers_serializer():
    term = {"contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
            "category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "87878005", "Left ventricle"],
            "anatomicContextName": "Anatomic codes - DICOM master list"}
    entry = terminology.serialize(term)
    assert entry == ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
                     "Structure~SCT^87878005^Left ventricle~^^~Anatomic codes - DICOM master list~^^~^^")
    assert terminology.deserialize(entry) == term
    assert terminology.deserialize(terminology.serialize(None))["type"] == ["SCT", "85756007", "Tissue"]
    assert terminology.describe(entry) == "Left ventricle"
    assert terminology.deserialize("garbage") is None


# --- results into segmentation nodes ---------------------------------------------------------------------------

def masks_on_volume(app, segmentation, volume):
    return {name: export.segmentMask(app.scene, segmentation, segmentation.GetSegmentation().GetSegmentIdBySegmentName(
        name), volume) for name in results.segmentNames(segmentation)}


def test_result_becomes_a_new_segmentation_in_the_volumes_study(app, tmp_path):
    image, labels = synthetic()
    ijk_to_ras = oblique_ijk_to_ras()
    volume = app.addVolume(image, ijk_to_ras, "CT", study="Study 1")
    transform = app.addTransform(affine(rotation("z", 30), (1.0, 2.0, 3.0)))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    liver = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}
    classes = [CLASSES[0], ClassInfo("ball", 1, (10, 20, 30), liver), CLASSES[2]]
    node = results.importResult(app.scene, str(write_result(tmp_path / "r.seg.nrrd", labels, ijk_to_ras)), volume,
                                classes=classes)
    assert node.GetName() == "CT segmentation"
    assert results.segmentNames(node) == ["ball", "box"]
    segmentation = node.GetSegmentation()
    ball = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("ball"))
    assert ball.GetColor() == pytest.approx((10 / 255, 20 / 255, 30 / 255), abs=1e-6)
    assert terminology.deserialize(terminology.segmentTerminology(ball))["type"] == liver["type"]
    box = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("box"))
    assert terminology.deserialize(terminology.segmentTerminology(box))["type"][2] == "Tissue"
    assert node.GetTransformNodeID() == transform.GetID()
    assert node.GetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole()) == volume.GetID()
    sh = app.subjectHierarchy
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == sh.GetItemParent(sh.GetItemByDataNode(volume))
    assert sh.GetItemLevel(sh.GetItemParent(sh.GetItemByDataNode(node))) == "Study"
    masks = masks_on_volume(app, node, volume)
    np.testing.assert_array_equal(masks["ball"], labels == 1)
    np.testing.assert_array_equal(masks["box"], labels == 2)
    assert app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1  # temporary nodes removed


def test_import_into_an_existing_segmentation_keeps_its_segments_in_place(app, tmp_path):
    """The user's segmentation is not under the volume's transform: its own segments must not move (the old
    code put the whole segmentation under the volume's transform), and the new ones land where they belong."""
    image, labels = synthetic()
    ijk_to_ras = np.diag([1.0, 1.5, 2.0, 1.0])
    volume = app.addVolume(image, ijk_to_ras)
    volume.SetAndObserveTransformNodeID(app.addTransform(affine(rotation("z", 90), (5.0, 0, 0))).GetID())
    user = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    user.CreateDefaultDisplayNodes()
    lesion = write_result(tmp_path / "lesion.seg.nrrd", (labels == 2).astype(np.uint8), ijk_to_ras,
                          [ClassInfo("background", 0), ClassInfo("lesion", 1)])
    user_volume = app.addVolume(image, ijk_to_ras, "untransformed copy")
    results.importResult(app.scene, str(lesion), user_volume, user)  # the user's own segment, untransformed
    before = masks_on_volume(app, user, user_volume)["lesion"]
    assert user.GetTransformNodeID() is None

    results.importResult(app.scene, str(write_result(tmp_path / "r.seg.nrrd", labels, ijk_to_ras)), volume, user,
                         classes=CLASSES)
    assert user.GetTransformNodeID() is None
    assert results.segmentNames(user) == ["lesion", "ball", "box"]
    np.testing.assert_array_equal(masks_on_volume(app, user, user_volume)["lesion"], before)
    on_volume = masks_on_volume(app, user, volume)  # resampled through both transforms
    np.testing.assert_array_equal(on_volume["ball"], labels == 1)
    np.testing.assert_array_equal(on_volume["box"], labels == 2)


def test_replacing_asks_first_and_spares_other_segments(app, tmp_path):
    image, labels = synthetic()
    volume = app.addVolume(image, np.eye(4))
    target = results.importResult(app.scene, str(write_result(tmp_path / "a.seg.nrrd", (labels == 1) * 2, np.eye(4))),
                                  volume, classes=CLASSES)  # "box" where the ball is
    mine = write_result(tmp_path / "m.seg.nrrd", (labels == 2).astype(np.uint8), np.eye(4),
                        [ClassInfo("background", 0), ClassInfo("mine", 1)])
    results.importResult(app.scene, str(mine), volume, target)
    assert results.segmentNames(target) == ["ball", "box", "mine"]  # the worker writes every class, even empty
    snapshot = masks_on_volume(app, target, volume)
    new_result = str(write_result(tmp_path / "b.seg.nrrd", labels, np.eye(4)))
    with pytest.raises(results.SegmentsExistError, match="ball, box"):
        results.importResult(app.scene, new_result, volume, target, classes=CLASSES)
    assert results.segmentNames(target) == ["ball", "box", "mine"]
    np.testing.assert_array_equal(masks_on_volume(app, target, volume)["box"], snapshot["box"])

    results.importResult(app.scene, new_result, volume, target, classes=CLASSES, replace=True)
    assert results.segmentNames(target) == ["mine", "ball", "box"]
    after = masks_on_volume(app, target, volume)
    np.testing.assert_array_equal(after["box"], labels == 2)
    np.testing.assert_array_equal(after["mine"], snapshot["mine"])


@pytest.mark.parametrize("breakage", ["missing", "truncated", "background only"])
def test_a_failed_import_loses_no_segment(app, tmp_path, breakage):
    image, labels = synthetic()
    volume = app.addVolume(image, np.eye(4))
    target = results.importResult(app.scene, str(write_result(tmp_path / "a.seg.nrrd", labels, np.eye(4))), volume,
                                  classes=CLASSES)
    snapshot = masks_on_volume(app, target, volume)
    broken = tmp_path / "broken.seg.nrrd"
    if breakage == "truncated":
        data = (tmp_path / "a.seg.nrrd").read_bytes()
        broken.write_bytes(data[:len(data) // 2])
    elif breakage == "background only":
        write_result(broken, np.zeros_like(labels), np.eye(4), [ClassInfo("background", 0)] + [
            ClassInfo("Background", 1)])
    with pytest.raises((results.ResultImportError, results.SegmentsExistError)):
        results.importResult(app.scene, str(broken), volume, target, classes=CLASSES, replace=True)
    assert results.segmentNames(target) == ["ball", "box"]
    after = masks_on_volume(app, target, volume)
    for name in snapshot:
        np.testing.assert_array_equal(after[name], snapshot[name])
    assert app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_a_volume_removed_from_the_scene_is_not_imported_into(app, tmp_path):
    image, labels = synthetic()
    volume = app.addVolume(image, np.eye(4))
    result = str(write_result(tmp_path / "r.seg.nrrd", labels, np.eye(4)))
    app.scene.Clear(0)
    with pytest.raises(results.ResultImportError, match="not in this scene"):
        results.importResult(app.scene, result, volume)
    assert app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_show_3d_makes_closed_surfaces(app, tmp_path):
    import vtk

    image, labels = synthetic()
    volume = app.addVolume(image, np.eye(4))
    node = results.importResult(app.scene, str(write_result(tmp_path / "r.seg.nrrd", labels, np.eye(4))), volume)
    assert not results.is3DShown(node)
    assert results.show3D(node)
    assert results.is3DShown(node)
    surface = vtk.vtkPolyData()
    node.GetClosedSurfaceRepresentation(node.GetSegmentation().GetSegmentIdBySegmentName("box"), surface)
    assert surface.GetNumberOfPoints() > 0
    results.show3D(node, False)
    assert not results.is3DShown(node)


def test_the_segmentation_events_the_widget_observes_fire(app, tmp_path):
    """The export and Show 3D buttons follow the output segmentation (issue 11: they went stale): the events the
    widget observes fire when segments are added or removed and when surfaces are made."""
    image, labels = synthetic()
    volume = app.addVolume(image, np.eye(4))
    node = results.importResult(app.scene, str(write_result(tmp_path / "r.seg.nrrd", labels, np.eye(4))), volume)
    seen = []
    for event in results.segmentationEvents():
        node.AddObserver(event, lambda caller, name, event=event: seen.append(event))
    segment_id = node.GetSegmentation().AddEmptySegment("", "lesion")
    assert seen, "adding a segment fired none of the observed events"
    seen.clear()
    node.GetSegmentation().RemoveSegment(segment_id)
    assert seen, "removing a segment fired none of the observed events"
    seen.clear()
    results.show3D(node)
    assert seen, "making surfaces fired none of the observed events"


# --- export ---------------------------------------------------------------------------------------------------------

def test_seg_nrrd_export_reads_back_with_slicerio(app, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    image, labels = synthetic()
    ijk_to_ras = oblique_ijk_to_ras()
    volume = app.addVolume(image, ijk_to_ras)
    node = results.importResult(app.scene, str(write_result(tmp_path / "r.seg.nrrd", labels, ijk_to_ras)), volume,
                                classes=CLASSES)
    out = export.exportSegNrrd(node, str(tmp_path / "exported.seg.nrrd"))
    segmentation = slicerio.read_segmentation(out)
    names = [segment["name"] for segment in segmentation["segments"]]
    assert names == ["ball", "box"]
    colors = [segment["color"] for segment in segmentation["segments"]]
    assert np.allclose(colors, [[c / 255 for c in CLASSES[1].color], [c / 255 for c in CLASSES[2].color]], atol=1e-4)
    assert all(segment["terminology"]["category"] for segment in segmentation["segments"])
    # Read back by the engine onto the volume's own grid: the same voxels.
    volume_engine = volumes.engineVolume(volume)
    np.testing.assert_array_equal(read_segmentation(out, CLASSES, volume_engine), labels)
    assert node.GetStorageNode() is None  # export does not rebind the node's own storage


def test_dicom_seg_export_through_the_engine(app, tmp_path):
    hd = pytest.importorskip("highdicom")
    series = ROOT / "Testing" / "Data" / "formats" / "dcmqi" / "ct-3slice"
    ct = read_image(series)
    ijk_to_ras = geometry.ijk_to_ras_matrix(ct.spacing, ct.origin, ct.direction)
    volume = app.addVolume(ct.array, ijk_to_ras, "CT", study="CT study")
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[:, 100:200, 120:260] = 1
    labels[1, 300:360, 200:300] = 2
    segmentation = results.importResult(app.scene, str(write_result(
        tmp_path / "r.seg.nrrd", labels, ijk_to_ras, [ClassInfo("bg", 0), ClassInfo("background", 1),
                                                      ClassInfo("liver", 2, (221, 130, 101))])), volume,
        classes=[ClassInfo("bg", 0), ClassInfo("background", 1), ClassInfo("liver", 2, (221, 130, 101))])
    # A segment named "background" is a segment like any other (the engine's background class is renamed).
    files = sorted(str(p) for p in series.iterdir() if p.is_file())
    warnings = export.exportDicomSeg(app.scene, segmentation, volume, tmp_path / "seg.dcm", files)
    assert warnings == []
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    labels_read = [d.SegmentLabel for d in seg.SegmentSequence]
    assert labels_read == ["background", "liver"]


def test_dicom_seg_export_refuses_duplicate_names_before_writing(app, tmp_path):
    image, labels = synthetic()
    volume = app.addVolume(image, np.eye(4))
    node = results.importResult(app.scene, str(write_result(tmp_path / "r.seg.nrrd", labels, np.eye(4))), volume)
    segmentation = node.GetSegmentation()
    segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("box")).SetName("Ball")
    with pytest.raises(export.ExportError, match="'ball'|'Ball'"):
        export.dicomSegLabelmap(app.scene, node, volume)
    with pytest.raises(export.ExportError, match="not loaded from DICOM"):
        export.exportDicomSeg(app.scene, node, volume, tmp_path / "x.dcm", [])
    assert not (tmp_path / "x.dcm").exists()


def test_dicom_seg_labelmap_says_where_segments_overlap(app, tmp_path):
    image, labels = synthetic()
    volume = app.addVolume(image, np.eye(4))
    node = results.importResult(app.scene, str(write_result(tmp_path / "r.seg.nrrd", labels, np.eye(4))), volume)
    overlapping = write_result(tmp_path / "o.seg.nrrd", (labels > 0).astype(np.uint8), np.eye(4),
                               [ClassInfo("background", 0), ClassInfo("everything", 1)])
    results.importResult(app.scene, str(overlapping), volume, node)
    labelmap, classes, warnings = export.dicomSegLabelmap(app.scene, node, volume)
    assert [c.name for c in classes] == ["background", "ball", "box", "everything"]
    assert np.count_nonzero(labelmap == 3) == np.count_nonzero(labels)
    assert "more than one segment" in warnings[0]


def test_background_name_and_duplicates():
    assert export.backgroundName(["liver"]) == "background"
    assert export.backgroundName(["Background", "background (2)"]) == "background (3)"
    assert export.duplicateNames(["a", "A", "b"]) == ["A", "a"]


# --- cohort ---------------------------------------------------------------------------------------------------------

def test_add_cases_to_a_dataset_folder_the_engine_reads(app, tmp_path):
    from pscv.data.dataset import load_training_cases

    image, labels = synthetic()
    dataset = tmp_path / "dataset"
    for number in range(2):
        volume = app.addVolume(image, np.diag([1.0, 1.0, 2.0, 1.0]), f"CT {number} (arterial)")
        nodes = [app.addPoints("background", geometry.kji_to_world([[0, 0, 0], [11, 23, 0]], volumes.ijkToRasMatrix(
            volume))), app.addPoints("ball", geometry.kji_to_world([[6, 8, 7]], volumes.ijkToRasMatrix(volume))),
            app.addPoints("box", np.zeros((0, 3)))]
        added = cohort.addCase(dataset, volume, nodes)
        assert added["case"] == f"CT_{number}_arterial"
    with pytest.raises(FileExistsError):
        cohort.addCase(dataset, volume, nodes)
    assert cohort.summary(dataset) == {"classes": ["background", "ball", "box"], "cases": 2, "withPoints": 2}
    classes, cases = load_training_cases(dataset, "pce")
    assert len(cases) == 2 and [c.name for c in classes] == ["background", "ball", "box"]
    renamed = [app.addPoints("background", [[0, 0, 0]]), app.addPoints("liver", [[7, 8, 12]])]
    with pytest.raises(PSCVError, match="same classes"):
        cohort.addCase(dataset, volume, renamed, name="other")
    model = cohort.trainedModelDirectory(dataset, now=0)
    assert Path(model).parent == dataset.parent and Path(model).name.startswith("dataset-model-")


# --- sample data ------------------------------------------------------------------------------------------------------

def test_the_shipped_sample_is_the_test_data_and_its_checksums_match():
    assert sampledata.sampleProblems(MODULE_DIR) == []
    files = sampledata.sampleFiles(MODULE_DIR)
    assert files["image"].read_bytes() == (ACDC / "patient002_frame01.nrrd").read_bytes()
    assert files["points"].read_bytes() == (ACDC / "patient002_frame01.mrk.json").read_bytes()
    shipped = read_classes(files["classes"])
    assert [(c.name, c.value) for c in shipped] == [(c.name, c.value) for c in read_classes(ACDC / "classes.json")]
    assert all(c.terminology for c in shipped if c.value)


def test_sample_registration_arguments_work_like_sampledata_does(tmp_path):
    """SampleData fetches every URI with urllib.request.urlretrieve into its cache and checks the SHA256
    (Modules/Scripted/SampleData/SampleData.py, downloadFile); do exactly that with the registered URIs."""
    arguments = sampledata.registrationArguments(MODULE_DIR)
    slicer_parameters = {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader",
                         "thumbnailFileName", "loadFileTypes", "loadFiles", "loadFileProperties", "checksums"}
    assert set(arguments) <= slicer_parameters
    lengths = {len(arguments[key]) for key in ("uris", "fileNames", "nodeNames", "checksums", "loadFiles")}
    assert lengths == {3}
    assert Path(arguments["thumbnailFileName"]).is_file()
    for uri, name, checksum in zip(arguments["uris"], arguments["fileNames"], arguments["checksums"]):
        assert uri.startswith("file:")
        urllib.request.urlretrieve(uri, tmp_path / name)
        assert sampledata.checksum(tmp_path / name) == checksum


def test_sample_loads_as_class_point_lists_ready_to_segment(app, tmp_path):
    files = sampledata.sampleFiles(MODULE_DIR)
    ct = read_image(files["image"])
    volume = app.addVolume(ct.array, geometry.ijk_to_ras_matrix(ct.spacing, ct.origin, ct.direction),
                           sampledata.VOLUME_NODE_NAME)
    nodes = sampledata.loadSample(app.scene, volume, files["points"], files["classes"])
    assert [node.GetName() for node in nodes] == ["background", "RV", "Myo", "LV"]
    assert all(node.GetStorageNode() is None for node in nodes)
    assert pointlists.segmentProblems(volume, nodes) == []
    classes = pointlists.classesFromPointLists(nodes)
    assert classes[3].terminology["type"] == ["SCT", "87878005", "Left ventricle"]
    inputs = volumes.writeJobInputs(tmp_path, volume, nodes)
    clicks = read_clicks(inputs["points"], read_image(inputs["image"]), read_classes(inputs["classes"]))
    assert len(clicks.kji) == sum(pointlists.definedPointCount(node) for node in nodes)


# --- interactive extension points (issue 9) ---------------------------------------------------------------------------

def test_strokes_and_suggestions(app, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    image, labels = synthetic()
    volume = app.addVolume(image, np.eye(4))
    painted = results.importResult(app.scene, str(write_result(tmp_path / "p.seg.nrrd", labels, np.eye(4))), volume)
    assert interactive.strokesProblems(painted, CLASSES) == []
    path = interactive.writeStrokes(painted, CLASSES, str(tmp_path / "strokes.seg.nrrd"))
    assert [s["name"] for s in slicerio.read_segmentation(path)["segments"]] == ["ball", "box"]
    assert interactive.strokesProblems(painted, CLASSES[:2])

    suggestions = interactive.loadSuggestions(app.scene, ACDC / "patient002_frame01.mrk.json")
    assert suggestions.GetName() == interactive.SUGGESTIONS_NAME
    assert suggestions.GetNumberOfControlPoints() == 38
    again = interactive.loadSuggestions(app.scene, ACDC / "patient002_frame01.mrk.json")
    assert app.scene.GetNodesByClassByName("vtkMRMLMarkupsFiducialNode", interactive.SUGGESTIONS_NAME
                                           ).GetNumberOfItems() == 1 and again.GetNumberOfControlPoints() == 38

    features = interactive.engineFeatures()
    assert features == {"refine": True, "strokes": True, "suggest": True}
    assert interactive.submitExtras(features, "model-dir", path, 3) == (
        {"model": "model-dir", "strokes": path}, {"train_model": True, "suggest": 3})
    with pytest.raises(NotImplementedError, match="cannot strokes|strokes"):
        interactive.submitExtras({"refine": True, "strokes": False, "suggest": True}, strokesFile=path)
    assert interactive.submitExtras(features) == ({}, {})


def test_engine_is_the_one_shipped_in_the_module_folder(tmp_path):
    assert engine.ENGINE_DIR == (MODULE_DIR / "pscv").resolve()
    with pytest.raises(engine.EngineClashError, match="another extension|pip install"):
        engine.check_engine_location(tmp_path / "site-packages" / "pscv" / "__init__.py", MODULE_DIR)
    assert os.fspath(engine.check_engine_location(MODULE_DIR / "pscv" / "__init__.py", MODULE_DIR)).endswith("pscv")
