"""Standard terminology of a class: Slicer's serialized entry <-> the engine's dict form.

Slicer stores a segment's terminology as one string (the ``TerminologyEntry`` tag):
``context~category~type~typeModifier~regionContext~region~regionModifier``, each code ``scheme^value^meaning``
(``vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry``, the same in Slicer 5.8 and 5.13). The engine
(``pscv.data.classes.ClassInfo.terminology``, classes.json) uses slicerio's dict form: ``{"category": [scheme, value,
meaning], "type": [...], "typeModifier"?, "anatomicRegion"?, "anatomicRegionModifier"?, "contextName"?,
"anatomicContextName"?}``. A class without terminology is coded as the engine does: SCT "Tissue".
"""

from __future__ import annotations

from .engine import DEFAULT_TERMINOLOGY

TAG = "TerminologyEntry"  # vtkSegment::GetTerminologyEntryTagName()
_CODES = ("category", "type", "typeModifier", None, "anatomicRegion", "anatomicRegionModifier")


def serialize(terminology) -> str:
    """Slicer's serialized entry of an engine terminology dict (None: the engine's default, "Tissue")."""
    import slicer

    terminology = dict(terminology or DEFAULT_TERMINOLOGY)

    def code(key):
        value = terminology.get(key) or ["", "", ""]
        scheme, codeValue, meaning = (str(part) for part in value)
        return [codeValue, scheme, meaning]  # the order SerializeTerminologyEntry takes

    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        terminology.get("contextName", DEFAULT_TERMINOLOGY["contextName"]),
        *code("category"), *code("type"), *code("typeModifier"),
        terminology.get("anatomicContextName", DEFAULT_TERMINOLOGY["anatomicContextName"]),
        *code("anatomicRegion"), *code("anatomicRegionModifier"))


def deserialize(entry):
    """The engine's dict of a serialized Slicer entry; None for an empty or malformed one."""
    parts = str(entry or "").split("~")
    if len(parts) != 7:
        return None
    result = {"contextName": parts[0], "anatomicContextName": parts[4]}
    for key, part in zip(_CODES, parts[1:]):
        if key is None:
            continue
        scheme, _, rest = part.partition("^")
        value, _, meaning = rest.partition("^")
        if scheme or value or meaning:
            result[key] = [scheme, value, meaning]
    if "category" not in result or "type" not in result:
        return None
    return result


def segmentTerminology(segment):
    """The serialized terminology entry of a vtkSegment ("" if it has none)."""
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(TAG, value) else ""


def setSegmentTerminology(segment, entry: str) -> None:
    segment.SetTag(TAG, str(entry))


def describe(entry) -> str:
    """A short human-readable form, e.g. "Heart: Left ventricle" (the type's meaning, with its modifier)."""
    terminology = deserialize(entry)
    if terminology is None:
        return ""
    text = terminology["type"][2]
    if terminology.get("typeModifier"):
        text = f"{terminology['typeModifier'][2]} {text}"
    if terminology.get("anatomicRegion"):
        text = f"{text} ({terminology['anatomicRegion'][2]})"
    return text
