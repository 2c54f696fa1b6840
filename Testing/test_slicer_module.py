"""The 3D Slicer extension, checked without Slicer (it cannot be installed here).

What is checked: the module file compiles and never imports torch; every `self.ui.<name>` it uses is a
widget of the .ui file with a plausible class; the parameter node's fields and the .ui's
`SlicerParameterName` properties agree, with widget classes Slicer's parameterNodeWrapper can connect;
the CMake lists name exactly the files that exist; the .s4ext, the catalog JSON and the CMake metadata
agree; the icons are 128x128 PNGs; the engine never imports slicer/qt/ctk/vtk; the Qt-free layer
(PSCVSegmentLib) never imports qt/ctk or uses slicer.app/slicer.util/slicer.mrmlScene, and the module
file reaches the engine only through it; every engine or layer name the module uses exists; and the
plain-data part of the job preparation (`pscv.slicer_inputs`), end to end through the engine's own readers.

Elsewhere: the MRML layer on slicer-core's real classes (test_slicer_mrml.py, test_slicer_tasks.py), the
worker's Python and environment (test_slicer_environment.py). Only a run inside Slicer checks the widget
itself: `PSCVSegmentTest` in PSCVSegment.py (Slicer's self-test).
"""

import ast
import importlib
import json
import py_compile
import re
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from pscv import PSCVError, slicer_inputs
from pscv.data import geometry
from pscv.data.classes import ClassInfo, read_classes
from pscv.data.clicks import read_clicks
from pscv.data.volumes import read_image

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "PSCVSegment"
MODULE = MODULE_DIR / "PSCVSegment.py"
UI = MODULE_DIR / "Resources" / "UI" / "PSCVSegment.ui"
ENGINE = MODULE_DIR / "pscv"
RESEARCH = "pscv/research/"  # installed with pscv (`pscv bench`), not shipped in the Slicer extension


@pytest.fixture(scope="module")
def source():
    return MODULE.read_text()


@pytest.fixture(scope="module")
def tree(source):
    return ast.parse(source)


@pytest.fixture(scope="module")
def ui_widgets():
    """name -> (class, {dynamic property: value}) for every widget of the .ui file."""
    root = ET.parse(UI).getroot()
    widgets = {}
    for widget in root.iter("widget"):
        properties = {}
        for prop in widget.findall("property"):
            string = prop.find("string")
            properties[prop.get("name")] = string.text if string is not None else None
        widgets[widget.get("name")] = (widget.get("class"), properties)
    return widgets


def test_module_compiles(tmp_path):
    py_compile.compile(str(MODULE), cfile=str(tmp_path / "PSCVSegment.pyc"), doraise=True)


def test_module_never_imports_torch(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(not alias.name.startswith("torch") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("torch")


def test_module_metadata(tree):
    assignments = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            target = node.targets[0]
            if isinstance(target.value, ast.Attribute) and target.value.attr == "parent":
                assignments[target.attr] = ast.literal_eval(node.value)
    assert assignments["title"] == "PSCV Segment"
    assert assignments["categories"] == ["Segmentation"]
    assert assignments["contributors"]
    assert "Segment" in assignments["helpText"] and "Place" in assignments["helpText"]
    acknowledgement = assignments["acknowledgementText"]
    for needle in ("En and Yuhong Guo", "2212.08774", "BMVC 2024", "Bernard", "Medical Imaging", "2018"):
        assert needle in acknowledgement


def test_module_classes_follow_the_slicer_naming(tree):
    classes = {node.name: [b.id for b in node.bases if isinstance(b, ast.Name)]
               for node in tree.body if isinstance(node, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["PSCVSegment"]
    assert "ScriptedLoadableModuleWidget" in classes["PSCVSegmentWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["PSCVSegmentLogic"]
    assert "ScriptedLoadableModuleTest" in classes["PSCVSegmentTest"]
    test_methods = [f.name for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "PSCVSegmentTest"
                    for f in c.body if isinstance(f, ast.FunctionDef)]
    assert "runTest" in test_methods
    assert "test_segment_two_organs" in test_methods
    assert "test_points_land_on_voxels_under_a_transform" in test_methods
    assert "test_widget_path" in test_methods


# --- the .ui file ------------------------------------------------------------------------------------------

# Plausible widget classes by the ending of the name the module uses.
EXPECTED_CLASSES = [
    ("CollapsibleButton", {"ctkCollapsibleButton"}),
    ("Button", {"QPushButton", "QToolButton"}),
    ("Selector", {"qMRMLNodeComboBox"}),
    ("ComboBox", {"QComboBox"}),
    ("SpinBox", {"QSpinBox"}),
    ("CheckBox", {"QCheckBox"}),
    ("PathLineEdit", {"ctkPathLineEdit"}),
    ("LineEdit", {"QLineEdit"}),
    ("TextEdit", {"QPlainTextEdit", "QTextEdit"}),
    ("Table", {"QTableWidget"}),
    ("ProgressBar", {"QProgressBar"}),
    ("Label", {"QLabel"}),
    ("Widget", {"QWidget"}),
]


def expected_classes(name):
    for ending, classes in EXPECTED_CLASSES:
        if name[0].upper() + name[1:] == ending or name.endswith(ending):
            return classes
    raise AssertionError(f"widget name {name!r} says nothing about its class; name it after its kind")


def test_every_widget_the_module_uses_is_in_the_ui(source, ui_widgets):
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the module uses no widgets?"
    for name in sorted(used):
        assert name in ui_widgets, f"self.ui.{name} is not a widget of {UI.name}"
        assert ui_widgets[name][0] in expected_classes(name), f"{name} is a {ui_widgets[name][0]}"


def test_ui_widget_names_are_unique_and_classes_declared():
    root = ET.parse(UI).getroot()
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names))
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used if not c.startswith("Q")} <= declared
    assert root.find("widget").get("class") == "qMRMLWidget"


def test_mrml_widgets_get_the_scene(ui_widgets):
    root = ET.parse(UI).getroot()
    top = root.find("widget").get("name")
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == top and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml_widgets = {name for name, (cls, _) in ui_widgets.items() if cls.startswith("qMRML") and name != top}
    assert mrml_widgets == receivers
    for connection in root.iter("connection"):
        assert connection.findtext("receiver") in ui_widgets


def parameter_fields(tree):
    """name -> annotation source of the @parameterNodeWrapper class."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list):
            return {item.target.id: ast.unparse(item.annotation) for item in node.body
                    if isinstance(item, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in the module")


def connector_classes(annotation):
    """Widget classes Slicer's parameterNodeWrapper GUI connectors accept for a field type
    (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py)."""
    if annotation.startswith("vtkMRML"):
        return {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"}
    if "Choice(" in annotation:
        return {"QComboBox"}
    base = annotation.removeprefix("Annotated[").split(",")[0].strip("]")
    return {"int": {"QSpinBox", "QSlider", "QComboBox"}, "float": {"QDoubleSpinBox", "ctkSliderWidget"},
            "bool": {"QCheckBox", "QPushButton"}, "str": {"QLineEdit", "QTextEdit"}}[base]


def test_parameter_node_fields_match_the_ui(tree, ui_widgets):
    fields = parameter_fields(tree)
    assert {"inputVolume", "classPointLists", "outputSegmentation", "device", "iterations"} <= set(fields)
    connected = {props["SlicerParameterName"]: (name, cls) for name, (cls, props) in ui_widgets.items()
                 if "SlicerParameterName" in props}
    assert connected, "no widget is connected to the parameter node"
    for parameter, (name, cls) in connected.items():
        assert parameter in fields, f"{name} is connected to {parameter!r}, not a parameter node field"
        assert cls in connector_classes(fields[parameter]), f"{name} ({cls}) cannot show {fields[parameter]}"
    for parameter in ("inputVolume", "outputSegmentation", "device", "iterations"):
        assert parameter in connected


def test_device_choices_match_the_engine(tree):
    choices = re.search(r"Choice\((\[.*?\])\)", parameter_fields(tree)["device"]).group(1)
    assert tuple(ast.literal_eval(choices)) == slicer_inputs.DEVICES


LIB = MODULE_DIR / "PSCVSegmentLib"


def top_level_names(path):
    """Names a Python file defines at its top level (functions, classes, assignments, imports), without
    importing it (the layer's modules need slicer-core)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for element in ast.walk(target):
                    if isinstance(element, ast.Name):
                        names.add(element.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def test_the_module_reaches_the_engine_only_through_its_layer(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(alias.name.split(".")[0] == "pscv" for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "pscv", "use PSCVSegmentLib (engine.py) for engine names"


def test_the_module_uses_existing_layer_and_engine_names(tree, source):
    layer = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "PSCVSegmentLib":
            for alias in node.names:
                assert (LIB / f"{alias.name}.py").is_file(), f"PSCVSegmentLib.{alias.name} does not exist"
                layer[alias.asname or alias.name] = top_level_names(LIB / f"{alias.name}.py")
    assert layer
    for module, name in set(re.findall(r"\b(" + "|".join(layer) + r")\.(\w+)", source)):
        assert name in layer[module], f"PSCVSegmentLib.{module}.{name} does not exist"
    for path in sorted(LIB.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pscv"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{path.name}: {node.module}.{alias.name} does not exist"


def test_the_mrml_layer_is_qt_free_and_takes_the_scene_as_an_argument():
    forbidden_modules = {"qt", "ctk", "PythonQt", "slicer.util", "slicer.ScriptedLoadableModule"}
    application = {"app", "mrmlScene", "util", "modules", "dicomDatabase", "selfTests"}
    for path in sorted(LIB.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not {alias.name for alias in node.names} & forbidden_modules, f"{path.name}:{node.lineno}"
            elif isinstance(node, ast.ImportFrom):
                assert node.module not in forbidden_modules, f"{path.name}:{node.lineno}"
                assert not (node.module == "slicer" and {a.name for a in node.names} & application), path.name
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
                assert node.attr not in application, f"{path.name}:{node.lineno} uses slicer.{node.attr}"


def test_engine_never_imports_slicer_qt_ctk_vtk():
    pattern = re.compile(r"^\s*(import|from)\s+(slicer|qt|ctk|vtk|MRML\w*|vtkSlicer\w*|PythonQt)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in ENGINE.rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders, f"the engine must not import Slicer's modules: {offenders}"


def test_slicer_inputs_and_geometry_do_not_import_torch():
    pattern = re.compile(r"^\s*(import|from)\s+(torch|\.+learn)\b", re.M)  # test_layers.py checks every layer
    for name in ("slicer_inputs.py", "data/geometry.py"):
        assert not pattern.search((ENGINE / name).read_text()), name


# --- CMake lists and extension metadata ---------------------------------------------------------------------

def cmake_list(text, variable):
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set"
    items = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
    return [item for item in items if item]


def cmake_sets(text):
    """Single-valued `set(NAME "value")` / `set(NAME value)` of a CMakeLists.txt."""
    values = {}
    for name, value in re.findall(r'^set\((\w+)\s+("[^"]*"|[^\s)]+)\)', text, re.M):
        values[name] = value.strip('"')
    return values


def module_files():
    """Files of the module folder, relative to it, that belong to the source tree (not git-ignored)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "."],
                                cwd=MODULE_DIR, capture_output=True, check=True).stdout.decode()
        files = {name for name in listed.split("\0") if name and (MODULE_DIR / name).is_file()}
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: skip the usual build products
        files = {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*") if p.is_file()}
    return {f for f in files if "__pycache__" not in f and ".egg-info" not in f and not f.endswith(".pyc")}


def test_module_cmake_lists_every_file_and_nothing_else():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    name = cmake_sets(text)["MODULE_NAME"]
    assert name == "PSCVSegment"
    scripts = [s.replace("${MODULE_NAME}", name) for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    resources = [s.replace("${MODULE_NAME}", name) for s in cmake_list(text, "MODULE_PYTHON_RESOURCES")]
    files = {f for f in module_files() if f != "CMakeLists.txt" and not f.startswith(RESEARCH)}
    assert not [s for s in scripts if s.startswith(RESEARCH)], "research code does not ship in the extension"
    python_files = {f for f in files if f.endswith(".py")}
    assert len(scripts) == len(set(scripts)) and len(resources) == len(set(resources))
    assert sorted(set(scripts) - python_files) == [], "listed but missing"
    assert sorted(python_files - set(scripts)) == [], "Python files missing from MODULE_PYTHON_SCRIPTS"
    assert sorted(set(resources) - (files - python_files)) == [], "listed but missing"
    assert sorted((files - python_files) - set(resources)) == [], "files missing from MODULE_PYTHON_RESOURCES"
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}\s*SCRIPTS \$\{MODULE_PYTHON_SCRIPTS\}"
                     r"\s*RESOURCES \$\{MODULE_PYTHON_RESOURCES\}\s*WITH_GENERIC_TESTS\s*\)", text)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def extension_metadata():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(PSCVSegment\)", text, re.M)
    assert "add_subdirectory(PSCVSegment)" in text
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in text and "include(${Slicer_EXTENSION_CPACK})" in text
    return cmake_sets(text)


def s4ext():
    values = {}
    for line in (ROOT / "PSCVSegment.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            values[key] = value.strip()
    return values


def test_extension_metadata_is_complete():
    meta = extension_metadata()
    assert meta["EXTENSION_CATEGORY"] == "Segmentation"
    assert meta["EXTENSION_DEPENDS"] == "PyTorch"
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL"):
        assert meta[key], key
    assert meta["EXTENSION_ICONURL"].endswith("Resources/Icons/PSCVSegment.png")


def test_s4ext_agrees_with_cmake():
    meta, description = extension_metadata(), s4ext()
    pairs = {"homepage": "EXTENSION_HOMEPAGE", "category": "EXTENSION_CATEGORY",
             "contributors": "EXTENSION_CONTRIBUTORS", "description": "EXTENSION_DESCRIPTION",
             "iconurl": "EXTENSION_ICONURL", "screenshoturls": "EXTENSION_SCREENSHOTURLS",
             "depends": "EXTENSION_DEPENDS", "status": "EXTENSION_STATUS"}
    for key, variable in pairs.items():
        assert description[key] == meta[variable], key
    assert description["scm"] == "git"
    assert description["scmurl"].removesuffix(".git") in meta["EXTENSION_HOMEPAGE"]


def test_catalog_entry_agrees_with_cmake_and_its_schema():
    entry = json.loads((ROOT / "Resources" / "PSCVSegment.json").read_text())
    meta, description = extension_metadata(), s4ext()
    # The rules of Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json
    assert entry["$schema"] == ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                "slicer-extension-catalog-entry-schema-v1.0.1.json#")
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry.get("tier", 5) in (1, 3, 5)
    assert all(isinstance(x, str) for x in entry["build_dependencies"])
    assert entry["category"] == meta["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == meta["EXTENSION_DEPENDS"].split()
    assert entry["scm_url"] == description["scmurl"].removesuffix(".git")
    assert entry["scm_revision"] == description["scmrevision"]
    assert entry["build_subdirectory"] == description["build_subdirectory"]
    assert str(entry["tier"]) == description["tier"]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("path", ["Resources/Icons/PSCVSegment.png", "PSCVSegment/Resources/Icons/PSCVSegment.png"])
def test_icons_are_128_pixel_pngs(path):
    assert png_size(ROOT / path) == (128, 128)


def test_screenshots_and_icon_urls_name_files_of_this_repository():
    """The catalog shows EXTENSION_SCREENSHOTURLS and EXTENSION_ICONURL from the repository's main branch: each
    must be a file that exists here (a PNG), so that it exists there once merged."""
    meta = extension_metadata()
    urls = meta["EXTENSION_SCREENSHOTURLS"].split() + [meta["EXTENSION_ICONURL"]]
    assert len(urls) >= 2, "no screenshot"
    for url in urls:
        prefix = "https://raw.githubusercontent.com/PSCVSegment/PSCVSegment/main/"
        assert url.startswith(prefix), url
        png_size(ROOT / url[len(prefix):])


def test_license_is_apache_2_like_the_package():
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


# --- the plain-data part of the Logic's job preparation ---------------------------------------------------

def rotation_z(degrees):
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


@pytest.fixture
def scene():
    """What the Logic collects from Slicer for an oblique volume under a rigid parent transform."""
    rng = np.random.default_rng(0)
    array = rng.integers(-100, 100, size=(6, 10, 12)).astype(np.int16)  # [k, j, i]
    ijk_to_ras = geometry.ijk_to_ras_matrix((0.8, 1.1, 3.0), (20.0, -5.0, 40.0), rotation_z(20))
    local_to_world = np.eye(4)
    local_to_world[:3, :3] = rotation_z(-70)
    local_to_world[:3, 3] = (3.0, 4.0, -5.0)
    voxels = {"background": [[0, 0, 0], [5, 9, 11]], "liver": [[2, 3, 4], [3, 3, 5]], "kidney": [[4, 8, 1]]}
    point_lists = [slicer_inputs.PointList(name, geometry.kji_to_world(kji, ijk_to_ras, local_to_world))
                   for name, kji in voxels.items()]
    classes = slicer_inputs.classes_from_names(list(voxels), [(0.6, 0.6, 0.6), (1.0, 0.5, 0.0), None])
    return array, ijk_to_ras, np.linalg.inv(local_to_world), point_lists, classes, voxels


def test_job_inputs_round_trip_through_the_engine_readers(tmp_path, scene):
    array, ijk_to_ras, world_to_local, point_lists, classes, voxels = scene
    inputs = slicer_inputs.write_job_inputs(tmp_path, array, ijk_to_ras, classes, point_lists, world_to_local)
    assert inputs == {"image": str(tmp_path / "image.nrrd"), "classes": str(tmp_path / "classes.json"),
                      "points": [str(tmp_path / "points.mrk.json")]}
    volume = read_image(inputs["image"])
    np.testing.assert_array_equal(volume.array, array)
    spacing, origin, direction = geometry.geometry_from_ijk_to_ras(ijk_to_ras)
    np.testing.assert_allclose(volume.spacing, spacing)
    np.testing.assert_allclose(volume.origin, origin)
    np.testing.assert_allclose(volume.direction, direction, atol=1e-9)
    read = read_classes(inputs["classes"])
    assert [(c.name, c.value) for c in read] == [("background", 0), ("liver", 1), ("kidney", 2)]
    assert read[0].color == (153, 153, 153) and read[1].color == (255, 128, 0)
    clicks = read_clicks(inputs["points"], volume, read)
    for info in read:
        np.testing.assert_array_equal(clicks.kji[clicks.values == info.value], voxels[info.name])
    document = json.loads(Path(inputs["points"][0]).read_text())
    assert [m["name"] for m in document["markups"]] == ["background", "liver", "kidney"]
    assert all(m["coordinateSystem"] == "LPS" for m in document["markups"])


def test_without_the_inverse_transform_points_miss(tmp_path, scene):
    array, ijk_to_ras, _, point_lists, classes, _ = scene
    with pytest.raises(PSCVError, match="outside the image"):
        slicer_inputs.write_job_inputs(tmp_path, array, ijk_to_ras, classes, point_lists, world_to_local=None)


def test_image_only_inputs_for_predict(tmp_path, scene):
    array, ijk_to_ras, *_ = scene
    inputs = slicer_inputs.write_job_inputs(tmp_path, array, ijk_to_ras, None)
    assert inputs == {"image": str(tmp_path / "image.nrrd")}
    assert not (tmp_path / "classes.json").exists()


def test_submit_arguments_make_a_valid_job_folder(tmp_path, scene):
    """The files written for the worker pass the engine's own job checks (pscv.jobs.write_job/read_job)."""
    jobs = pytest.importorskip("pscv.jobs.folder")
    array, ijk_to_ras, world_to_local, point_lists, classes, _ = scene
    inputs = slicer_inputs.write_job_inputs(tmp_path, array, ijk_to_ras, classes, point_lists, world_to_local)
    relative = {"image": "image.nrrd", "points": ["points.mrk.json"], "classes": "classes.json"}
    names = {k: (Path(v).name if isinstance(v, str) else [Path(p).name for p in v]) for k, v in inputs.items()}
    assert names == relative
    jobs.write_job(tmp_path, "segment", relative, slicer_inputs.job_settings("cpu", 50))
    job = jobs.read_job(tmp_path)
    assert job.kind == "segment" and job.settings == {"device": "cpu", "iterations": 50}


@pytest.mark.parametrize("change, message", [
    (lambda lists: lists[:2], r"no points on class\(es\) kidney"),
    (lambda lists: lists + [slicer_inputs.PointList("spleen", [[0, 0, 0]])], "names no class"),
    (lambda lists: lists + [slicer_inputs.PointList("Liver", np.zeros((0, 3)))], "has two point lists"),
])
def test_point_list_mistakes_are_named(tmp_path, scene, change, message):
    array, ijk_to_ras, world_to_local, point_lists, classes, _ = scene
    with pytest.raises(PSCVError, match=message):
        slicer_inputs.write_job_inputs(tmp_path, array, ijk_to_ras, classes, change(point_lists), world_to_local)


def test_a_point_outside_names_its_class_and_label(scene):
    array, ijk_to_ras, world_to_local, point_lists, classes, _ = scene
    point_lists[1] = slicer_inputs.PointList("liver", np.vstack([point_lists[1].world_ras, [[999.0, 0, 0]]]),
                                      ["liver-1", "liver-2", "liver-3"])
    with pytest.raises(PSCVError, match=r"class 'liver': 1 point\(s\) lie outside the image \(liver-3"):
        slicer_inputs.clicks_from_point_lists(point_lists, classes, np.linalg.inv(ijk_to_ras), world_to_local,
                                              array.shape)


def test_two_classes_in_one_voxel_are_refused(scene):
    array, ijk_to_ras, world_to_local, point_lists, classes, _ = scene
    point_lists[2] = slicer_inputs.PointList("kidney", point_lists[1].world_ras[:1] + 0.1, ["kidney-1"])
    with pytest.raises(PSCVError, match=r"'kidney-1' \(kidney\) and 'liver point 1' \(liver\) fall in the same voxel"):
        slicer_inputs.clicks_from_point_lists(point_lists, classes, np.linalg.inv(ijk_to_ras), world_to_local,
                                              array.shape)


def test_classes_from_names():
    classes = slicer_inputs.classes_from_names(["Background", " Liver "], [(0, 0, 0), (0.2, 0.4, 1.0)])
    assert classes == [ClassInfo("Background", 0, (0, 0, 0)), ClassInfo("Liver", 1, (51, 102, 255))]
    assert slicer_inputs.classes_from_names(["bg", "a", "b"])[2].color != (128, 128, 128)  # engine default colours
    with pytest.raises(PSCVError, match="duplicate class name"):
        slicer_inputs.classes_from_names(["background", "liver", "LIVER"])
    with pytest.raises(PSCVError, match="non-empty"):
        slicer_inputs.classes_from_names(["background", "  "])
    with pytest.raises(PSCVError, match="at least one organ"):
        slicer_inputs.classes_from_names(["background"])


def test_new_class_names():
    assert slicer_inputs.new_class_names([]) == ["background", "organ 1"]
    assert slicer_inputs.new_class_names(["background", "organ 1"]) == ["organ 2"]
    assert slicer_inputs.new_class_names(["background", "liver", "organ 2"]) == ["organ 3"]


def test_segments_to_replace():
    classes = slicer_inputs.classes_from_names(["background", "Liver", "kidney"])
    assert slicer_inputs.segments_to_replace(["liver", "spleen", "Background"], classes) == ["liver"]
    assert slicer_inputs.segments_to_replace(["Liver", "spleen"], ["LIVER"]) == ["Liver"]
    assert slicer_inputs.segments_to_replace([], classes) == []


def test_job_settings():
    assert slicer_inputs.job_settings() == {"device": "auto"}
    assert slicer_inputs.job_settings("CPU", 300, image_size=64) == {"device": "cpu", "iterations": 300,
                                                                     "image_size": 64}
    assert slicer_inputs.job_settings("cuda:1")["device"] == "cuda:1"
    with pytest.raises(PSCVError, match="device 'tpu'"):
        slicer_inputs.job_settings("tpu")
    assert slicer_inputs.job_settings("auto", 0) == {"device": "auto"}  # 0: the engine's budget for the device
    with pytest.raises(PSCVError, match="at least 1"):
        slicer_inputs.job_settings("auto", -5)


@pytest.mark.parametrize("event, fraction, text", [
    ({"event": "progress", "stage": "train", "step": 150, "total": 600, "loss": 0.4321, "seconds_left": 95,
      "device": "cuda"}, 0.25, "Training 150/600, loss 0.432, 1 min 35 s left (cuda)"),
    ({"event": "progress", "stage": "predict", "step": 3, "total": 3, "loss": None, "seconds_left": None,
      "device": "cpu"}, 1.0, "Segmenting 3/3 (cpu)"),
    ({"event": "progress", "stage": "load", "step": 0, "total": 0}, None, "Loading"),
    ({"event": "queued"}, 0.0, "Queued on the server"),
    ({"event": "started"}, 0.0, "Started"),
    ({"event": "done", "outputs": {}}, 1.0, "Done"),
    ({"event": "error", "message": "CUDA out of memory"}, None, "Failed: CUDA out of memory"),
    ({"event": "cancelled"}, None, "Cancelled"),
    ({"event": "warning", "message": "class 'x' has no points"}, None, "Warning: class 'x' has no points"),
])
def test_describe_event(event, fraction, text):
    assert slicer_inputs.describe_event(event) == (fraction, text)


def test_format_duration():
    assert [slicer_inputs.format_duration(s) for s in (0, 59.4, 61, 3600, 7325)] == [
        "0 s", "59 s", "1 min 01 s", "1 h 00 min", "2 h 02 min"]


@pytest.mark.parametrize("version, requirement", [
    ("2.4.4", "highdicom<0.23"), ("3.0.1", "highdicom"), (None, "highdicom"), ("weird", "highdicom")])
def test_highdicom_requirement(version, requirement):
    assert slicer_inputs.highdicom_requirement(version) == requirement


def test_prepared_inputs_run_as_a_local_job(tmp_path):
    """The path the Logic drives, minus Slicer: write_job_inputs -> JobClient.submit (a `pscv worker`
    process) -> result .seg.nrrd on the image's grid with the table's classes. Tiny and short: it checks the
    plumbing, not the segmentation quality."""
    pytest.importorskip("torch")
    import sys

    from pscv.data.segmentations import read_segmentation, segmentation_classes
    from pscv.jobs.client import JobClient

    k, j, i = np.mgrid[0:4, 0:20, 0:20]
    labels = np.zeros(k.shape, np.uint8)
    labels[:, 3:9, 3:9], labels[:, 11:18, 10:18] = 1, 2
    array = (np.random.default_rng(0).normal(0, 5, k.shape) + np.choose(labels, [0, 100, 200])).astype(np.int16)
    ijk_to_ras = geometry.ijk_to_ras_matrix((1.0, 1.0, 3.0), (5.0, -7.0, 2.0), np.diag([1.0, -1.0, 1.0]))
    clicks = {"background": [[s, 1, 1] for s in range(4)], "liver": [[s, 5, 5] for s in range(4)],
              "kidney": [[s, 14, 14] for s in range(4)]}
    point_lists = [slicer_inputs.PointList(name, geometry.kji_to_world(kji, ijk_to_ras))
                   for name, kji in clicks.items()]
    classes = slicer_inputs.classes_from_names(list(clicks))
    inputs = slicer_inputs.write_job_inputs(tmp_path / "inputs", array, ijk_to_ras, classes, point_lists)
    client = JobClient(python=sys.executable, jobs_dir=tmp_path / "jobs")
    settings = slicer_inputs.job_settings("cpu", 10, image_size=32, batch_size=2, train_model=True)
    job = client.submit("segment", settings=settings, **inputs)
    events = list(job.events(timeout=300))
    assert job.state == "done", job.message
    assert any(e["event"] == "progress" and slicer_inputs.describe_event(e)[0] is not None for e in events)
    result = job.download("segmentation", tmp_path / "result.seg.nrrd")
    assert [c.name for c in segmentation_classes(result)][-2:] == ["liver", "kidney"]
    labelmap = read_segmentation(result, classes, read_image(inputs["image"]))
    assert labelmap.shape == array.shape
    assert any(job.download("model", tmp_path / "model").iterdir())
