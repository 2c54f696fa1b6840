"""The classes to segment: `classes.json` = {"classes": [{"name", "value", "color"?, "terminology"?}]}.

Background has label value 0 and is a class like the others for training (it gets clicks too).
Training uses contiguous class indices 0..C-1 in the file's order sorted by label value.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import PSCVError

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


def parse_classes(data, source: str = "classes") -> list[ClassInfo]:
    """Validate a classes document and return the classes sorted by label value (background first)."""
    if isinstance(data, dict):
        data = data.get("classes")
    if not isinstance(data, list) or not data:
        raise PSCVError(f'{source}: expected {{"classes": [{{"name": ..., "value": ...}}, ...]}}')
    classes = []
    for position, item in enumerate(data):
        where = f"{source}: class #{position + 1}"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise PSCVError(f"{where}: every class needs a non-empty \"name\"")
        value = item.get("value")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
            raise PSCVError(f"{where} ({item['name']!r}): \"value\" must be an integer label 0..65535")
        color = item.get("color")
        if color is None:
            color = DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)] if value else (0, 0, 0)
        elif (
            not isinstance(color, (list, tuple)) or len(color) != 3
            or not all(isinstance(c, (int, float)) and 0 <= c <= 255 for c in color)
        ):
            raise PSCVError(f"{where} ({item['name']!r}): \"color\" must be [r, g, b] with values 0..255")
        classes.append(ClassInfo(item["name"].strip(), value, tuple(int(round(c)) for c in color),
                                 item.get("terminology")))
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
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PSCVError(f"{path}: no such classes file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PSCVError(f"{path}: not valid JSON ({error})") from None
    return parse_classes(data, str(path))


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
