"""The sample this module ships for Slicer's SampleData module: one ACDC cardiac MRI volume with its clicks.

The files are resources of the module (``Resources/SampleData``: listed in CMakeLists.txt, so the build copies
them and the extension package installs them beside the module), and are registered with ``file:`` URIs:
SampleData downloads a URI with ``urllib.request.urlretrieve``, which reads ``file:`` URIs, into its cache
and checks the SHA256 there, so the sample works offline, from a build tree, from an installed extension
and from this repository added as an additional module path. No web server is involved.

The volume and the points are byte-identical to ``Testing/Data/acdc`` (checked by the tests); the classes
file adds standard terminology (SNOMED CT codes) to the ACDC classes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CATEGORY = "PSCV Segment"
SAMPLE_NAME = "ACDC heart MRI (PSCV clicks)"
IMAGE, POINTS, CLASSES = "patient002_frame01.nrrd", "patient002_frame01.mrk.json", "patient002_frame01.classes.json"
VOLUME_NODE_NAME = "ACDC patient002 frame01"
THUMBNAIL = "Icons/PSCVSegmentSample.png"
CHECKSUMS = {
    IMAGE: "SHA256:bccbce453fd632b436cffb025fb456fedecbd661409eff5f544128711a1cf79b",
    POINTS: "SHA256:820178a4336e947065c3dad9b12dfa3da22dcc88bcf68d49abea7656cf4fcb2b",
    CLASSES: "SHA256:b5da18137de045e0ebeb5c3a7381be86c03b3293c6276c469f24f7bac39e32f6",
}


def sampleDirectory(moduleDir) -> Path:
    return Path(moduleDir) / "Resources" / "SampleData"


def sampleFiles(moduleDir) -> dict:
    directory = sampleDirectory(moduleDir)
    return {"image": directory / IMAGE, "points": directory / POINTS, "classes": directory / CLASSES}


def checksum(path, algorithm="SHA256") -> str:
    digest = hashlib.new(algorithm.lower())
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(2**20), b""):
            digest.update(block)
    return f"{algorithm}:{digest.hexdigest()}"


def sampleProblems(moduleDir) -> list:
    """What is wrong with the shipped sample files (missing, or not the files registered), as sentences."""
    problems = []
    for path in sampleFiles(moduleDir).values():
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif checksum(path) != CHECKSUMS[path.name]:
            problems.append(f"{path} is not the sample file that was registered (checksum differs)")
    return problems


def registrationArguments(moduleDir, customDownloader=None) -> dict:
    """The keyword arguments of ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` (Slicer 5.8 and
    later): the volume is loaded as a node; the points and classes are only fetched into SampleData's cache
    (no node name, loadFiles False), for ``customDownloader`` (or a script) to turn into class point lists."""
    files = sampleFiles(moduleDir)
    names = [IMAGE, POINTS, CLASSES]
    arguments = {
        "category": CATEGORY,
        "sampleName": SAMPLE_NAME,
        "uris": [files[key].resolve().as_uri() for key in ("image", "points", "classes")],
        "fileNames": names,
        "nodeNames": [VOLUME_NODE_NAME, None, None],
        "checksums": [CHECKSUMS[name] for name in names],
        "loadFiles": [True, False, False],
        "thumbnailFileName": str(Path(moduleDir) / "Resources" / THUMBNAIL),
    }
    if customDownloader is not None:
        arguments["customDownloader"] = customDownloader
    return arguments


def loadSample(scene, volumeNode, pointsPath, classesPath) -> list:
    """The sample's class point lists (background first), coloured and coded from its classes file, in
    ``scene`` beside ``volumeNode`` (already loaded, e.g. by SampleData); returns them in class order."""
    from . import engine, pointlists, terminology

    classes = engine.read_classes(str(classesPath))
    loaded = {node.GetName().lower(): node for node in pointlists.loadPointLists(scene, pointsPath)}
    nodes = []
    for info in classes:
        node = loaded.pop(info.name.lower(), None)
        if node is None:
            node = pointlists.addClassPointList(scene, info.name, info.value)
        node.CreateDefaultDisplayNodes()
        pointlists.setPointListColor(node, tuple(c / 255 for c in info.color))
        if info.terminology:
            pointlists.setClassTerminology(node, terminology.serialize(info.terminology))
        nodes.append(node)
    for node in loaded.values():  # markups that name no class
        scene.RemoveNode(node)
    return nodes
