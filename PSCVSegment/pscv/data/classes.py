"""The classes to segment: `classes.json` = {"classes": [{"name", "value", "color"?, "terminology"?}]}.

Background has label value 0 and is a class like the others for training (it gets clicks too).
Training uses contiguous class indices 0..C-1 in the file's order sorted by label value.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import PSCVError
from ..base.jsonfile import read_json

# Distinct, colour-blind-friendly defaults (Okabe-Ito) for classes without a colour.
DEFAULT_COLORS = [
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66),
    (0, 114, 178), (213, 94, 0), (204, 121, 167), (153, 153, 153),
]


@dataclass
class ClassInfo:
    name: str
    value: int
    color: tuple[int, int, int] = (128, 128, 128)
    terminology: dict | None = field(default=None)

    def to_json(self) -> dict:
        data = asdict(self)
        data["color"] = list(self.color)
        if self.terminology is None:
            del data["terminology"]
        return data


# Terminology codes: [coding scheme, code value, code meaning] (slicerio's dict form; see segmentations.py).
TERMINOLOGY_CODES = ("category", "type", "typeModifier", "anatomicRegion", "anatomicRegionModifier")
TERMINOLOGY_NAMES = ("contextName", "anatomicContextName")
TERMINOLOGY_EXAMPLE = '{"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "80891009", "Heart"]}'
_SEPARATORS = "~^|"  # 3D Slicer's TerminologyEntry tag separates its parts with these


def _plain_text(text: str) -> bool:
    return not any(ord(character) < 32 for character in text)


def check_terminology(terminology, where: str) -> dict:
    """A class's terminology, checked: a dict whose codes ("category" and "type" required) are three strings."""
    if not isinstance(terminology, dict):
        raise PSCVError(f"{where}: \"terminology\" must be an object such as {TERMINOLOGY_EXAMPLE}, got "
                        f"{str(terminology)[:60]!r}")
    unknown = sorted(set(terminology) - set(TERMINOLOGY_CODES) - set(TERMINOLOGY_NAMES))
    if unknown:
        raise PSCVError(f"{where}: terminology key(s) {', '.join(unknown)} unknown; it takes "
                        f"{', '.join(TERMINOLOGY_CODES + TERMINOLOGY_NAMES)}")
    for key in TERMINOLOGY_CODES:
        code = terminology.get(key)
        if code is None and key not in ("category", "type"):
            continue
        if not (isinstance(code, (list, tuple)) and len(code) == 3 and all(isinstance(s, str) for s in code)
                and code[0] and code[1] and all(_plain_text(s) and not set(s) & set(_SEPARATORS) for s in code)):
            raise PSCVError(f"{where}: terminology \"{key}\" must be [coding scheme, code value, code meaning] "
                            f"without the characters {_SEPARATORS}, e.g. [\"SCT\", \"80891009\", \"Heart\"]; "
                            f"got {str(code)[:80]}")
    for key in TERMINOLOGY_NAMES:
        name = terminology.get(key)
        if name is not None and not (isinstance(name, str) and _plain_text(name) and not set(name) & set(_SEPARATORS)):
            raise PSCVError(f"{where}: terminology \"{key}\" must be a name without the characters {_SEPARATORS}; "
                            f"got {str(name)[:80]!r}")
    return terminology


def _parse_class(item, where: str) -> ClassInfo:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
        raise PSCVError(f"{where}: every class needs a non-empty \"name\"")
    name = item["name"].strip()
    where = f"{where} ({name[:80]!r})"
    if not _plain_text(name):
        raise PSCVError(f"{where}: a class name cannot hold line breaks or control characters")
    value = item.get("value")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise PSCVError(f"{where}: \"value\" must be an integer label 0..65535, got {str(value)[:40]}")
    color = item.get("color")
    if color is None:
        color = DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)] if value else (0, 0, 0)
    elif (
        not isinstance(color, (list, tuple)) or len(color) != 3
        or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)
    ):
        raise PSCVError(f"{where}: \"color\" must be [r, g, b] with values 0..255, got {str(color)[:40]}")
    terminology = item.get("terminology")
    if terminology is not None:
        check_terminology(terminology, where)
    return ClassInfo(name, value, tuple(int(round(c)) for c in color), terminology)


def parse_classes(data, source: str = "classes") -> list[ClassInfo]:
    """Validate a classes document and return the classes sorted by label value (background first)."""
    if isinstance(data, dict):
        data = data.get("classes")
    if not isinstance(data, list) or not data:
        raise PSCVError(f'{source}: expected {{"classes": [{{"name": ..., "value": ...}}, ...]}}')
    classes = [_parse_class(item, f"{source}: class #{position + 1}") for position, item in enumerate(data)]
    classes.sort(key=lambda c: c.value)
    names = [c.name.lower() for c in classes]
    values = [c.value for c in classes]
    for label, items in (("name", names), ("value", values)):
        duplicates = sorted({str(x) for x in items if items.count(x) > 1})
        if duplicates:
            raise PSCVError(f"{source}: duplicate class {label}(s): {', '.join(duplicates)}")
    if values[0] != 0:
        raise PSCVError(f'{source}: the background class (value 0) is missing; add {{"name": "background", '
                        '"value": 0}')
    if len(classes) < 2:
        raise PSCVError(f"{source}: needs background and at least one organ class")
    return classes


def read_classes(path: str | Path) -> list[ClassInfo]:
    return parse_classes(read_json(path, "classes file"), str(path))


def classes_to_json(classes: list[ClassInfo]) -> dict:
    return {"classes": [c.to_json() for c in classes]}


def write_classes(classes: list[ClassInfo], path: str | Path) -> None:
    from ..base.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(classes_to_json(classes), indent=2) + "\n")


ACDC_CLASSES = [
    ClassInfo("background", 0, (0, 0, 0)),
    ClassInfo("RV", 1, (230, 159, 0)),
    ClassInfo("Myo", 2, (86, 180, 233)),
    ClassInfo("LV", 3, (0, 158, 115)),
]
