"""The interactive loop in the module: strokes, suggested points, and refining the model of the last run.

What the engine's segment job offers is asked in one place, ``engineFeatures`` (an older engine in the
module folder, or a server running one, may lack them):

- refine: a ``segment`` job that takes a ``model`` input (the model kept from the previous run on the volume);
- strokes: a ``segment`` job that takes a ``strokes`` input (a .seg.nrrd whose segments, named after the
  classes, hold what the user painted), written by ``writeStrokes``;
- suggest: a ``suggest`` setting and a ``suggestions`` output (a .mrk.json), loaded by ``loadSuggestions``
  as a point list of its own.
"""

from __future__ import annotations

from . import engine, pointlists, results

SUGGESTIONS_NAME = "PSCV suggested points"


def engineFeatures() -> dict:
    """Which interactive features the engine's job format offers."""
    optional = set(engine.OPTIONAL_INPUTS.get("segment", ()))
    outputs = set(engine.DEFAULT_OUTPUTS.get("segment", {}))
    return {"refine": "model" in optional, "strokes": "strokes" in optional, "suggest": "suggestions" in outputs}


def submitExtras(features, refineModel=None, strokesFile=None, suggest=0) -> tuple:
    """(extra ``JobClient.submit`` keyword arguments, extra settings) for a segment job; NotImplementedError
    naming the feature the engine lacks."""
    extras, settings = {}, {}
    for name, wanted in (("refine", refineModel), ("strokes", strokesFile), ("suggest", suggest)):
        if wanted and not features.get(name):
            raise NotImplementedError(f"this version of the engine (pscv {engine.__version__}) cannot {name} yet")
    if refineModel:
        extras["model"] = str(refineModel)
        settings["train_model"] = True
    if strokesFile:
        extras["strokes"] = str(strokesFile)
    if suggest:
        settings["suggest"] = int(suggest)
    return extras, settings


def strokesProblems(segmentationNode, classes) -> list:
    """Which painted segments name no class (they would be ignored), as sentences."""
    names = {info.name.lower() for info in classes}
    unknown = [name for name in results.segmentNames(segmentationNode) if name.lower() not in names]
    if unknown:
        return [f"Segment(s) {', '.join(unknown)} name no class; name each painted segment after its class "
                f"({', '.join(info.name for info in classes)})."]
    return []


def writeStrokes(segmentationNode, classes, path) -> str:
    """The painted segments as a .seg.nrrd for the engine's ``strokes`` input (segments matched by name)."""
    from . import export

    problems = strokesProblems(segmentationNode, classes)
    if problems:
        raise ValueError(" ".join(problems))
    return export.exportSegNrrd(segmentationNode, path)


def loadSuggestions(scene, path, name=SUGGESTIONS_NAME):
    """The engine's suggested points (a .mrk.json, each point labelled with the class it guesses) as one point
    list of their own, replacing the previous suggestions."""
    for old in list(_nodesNamed(scene, name)):
        scene.RemoveNode(old)
    nodes = pointlists.loadPointLists(scene, path)
    first = nodes[0]
    for other in nodes[1:]:
        for index in range(other.GetNumberOfControlPoints()):
            position = [0.0, 0.0, 0.0]
            other.GetNthControlPointPositionWorld(index, position)
            added = first.AddControlPointWorld(*position)
            first.SetNthControlPointLabel(added, other.GetNthControlPointLabel(index))
        scene.RemoveNode(other)
    first.SetName(name)
    return first


def _nodesNamed(scene, name):
    collection = scene.GetNodesByClassByName("vtkMRMLMarkupsFiducialNode", name)
    for index in range(collection.GetNumberOfItems()):
        yield collection.GetItemAsObject(index)
