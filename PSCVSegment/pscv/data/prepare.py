"""A folder of labelled cases -> a dataset folder (`pscv.data.dataset`) with simulated clicks.

What a user runs to turn their own labelled volumes into something `pscv train` learns from the way a
clicking user would teach it (and `--val` scores against), and what the benchmark runs on other cohorts.

Layouts found in LABELLED_DIR (image formats: `pscv.data.formats.IMAGE_SUFFIXES`):

- `images/<case>.*` + `labels/<case>.*` (also nnU-Net's `imagesTr/<case>_0000.*` + `labelsTr/<case>.*`);
- one folder of pairs `image_<id>.*` + `label_<id>.*` (the case is named `<id>`);
- one folder of pairs `<case>.*` + `<case>_label.*` (or `_seg`, `_labels`).

Labels are read as label maps of class values (floats are accepted when they hold whole numbers); a value
that no class of classes.json has is an error naming it. The dataset gets `classes.json`, `images/<case>.nrrd`,
`labels/<case>.nrrd` and `points/<case>.mrk.json`: in every n-th slice (along the axis of largest spacing),
`clicks_per_class` random pixels inside each class present, background included, seeded per case
(`clicks.case_seed`), so a case's clicks do not depend on which other cases are prepared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .. import PSCVError
from .classes import ClassInfo, read_classes, write_classes
from .clicks import case_seed, simulate_clicks, write_markups
from .dataset import case_name, find_images
from .segmentations import read_segmentation
from .volumes import read_image, write_image

LABEL_SUFFIXES = ("_label", "_labels", "_seg")
PAIR_PREFIXES = (("image", "label"), ("img", "seg"), ("image", "seg"), ("img", "label"))


@dataclass
class LabelledCase:
    name: str
    image: Path
    labels: Path


def _folder_pairs(images: dict[str, Path], labels: dict[str, Path], strip_channel: bool) -> list[LabelledCase]:
    cases = []
    for name, path in images.items():
        case = name[:-5] if strip_channel and name.endswith("_0000") else name
        if case in labels:
            cases.append(LabelledCase(case, path, labels[case]))
    return cases


def _flat_pairs(files: dict[str, Path]) -> list[LabelledCase]:
    """`image_<id>` + `label_<id>` pairs, else `<case>` + `<case>_label` pairs, in one folder."""
    for image_prefix, label_prefix in PAIR_PREFIXES:
        pattern = re.compile(rf"{image_prefix}[_-](.+)", re.IGNORECASE)
        cases = []
        for name, path in files.items():
            found = pattern.fullmatch(name)
            if found:
                label = next((files[n] for n in (f"{label_prefix}_{found[1]}", f"{label_prefix}-{found[1]}")
                              if n in files), None)
                if label is not None:
                    cases.append(LabelledCase(found[1], path, label))
        if cases:
            return cases
    return [LabelledCase(name, path, files[name + suffix]) for name, path in files.items()
            for suffix in LABEL_SUFFIXES if name + suffix in files]


def find_labelled_cases(folder: str | Path) -> list[LabelledCase]:
    """The (image, labels) pairs of a labelled folder in one of the layouts above, sorted by case name
    (numerically where the names are numbers)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PSCVError(f"{folder}: no such folder of labelled cases")
    cases = []
    for images, labels in (("images", "labels"), ("imagesTr", "labelsTr")):
        if (folder / images).is_dir():
            cases = _folder_pairs(find_images(folder / images), find_images(folder / labels), images == "imagesTr")
            if cases:
                break
    if not cases:
        cases = _flat_pairs(find_images(folder))
    if not cases:
        raise PSCVError(f"{folder}: no labelled cases found; expected images/<case>.* with labels/<case>.*, or "
                        "pairs image_<id>.* and label_<id>.* (or <case>.* and <case>_label.*) in the folder")
    return sorted(cases, key=lambda c: (0, int(c.name), "") if c.name.isdigit() else (1, 0, c.name))


def read_case_list(path: str | Path) -> list[str]:
    """Case names (or ids), one a line; blank lines and `#` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise PSCVError(f"{path}: no such case list (one case name or id a line)")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def select_cases(cases: list[LabelledCase], wanted: list[str], source) -> list[LabelledCase]:
    """The cases named in `wanted` (by case name or image file name without suffix), in the list's order."""
    by_name = {c.name: c for c in cases}
    by_name.update({case_name(c.image): c for c in cases})
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise PSCVError(f"{source}: case(s) {', '.join(missing[:10])} not found among the {len(cases)} labelled "
                        f"cases ({', '.join(c.name for c in cases[:5])}{' ...' if len(cases) > 5 else ''})")
    return [by_name[name] for name in dict.fromkeys(wanted)]


def prepare_dataset(labelled: str | Path, out: str | Path, classes: list[ClassInfo] | None = None,
                    clicks_per_class: int = 1, every_nth_slice: int = 1, seed: int = 0,
                    cases: list[str] | None = None, progress=None) -> list[str]:
    """Write the dataset folder `out` from the labelled folder; returns the case names written.

    `classes`: default `labelled/classes.json`; `cases`: only these case names or ids (default all)."""
    labelled, out = Path(labelled), Path(out)
    if classes is None:
        if not (labelled / "classes.json").is_file():
            raise PSCVError(f"{labelled}: no classes.json there; give --classes (names and label values)")
        classes = read_classes(labelled / "classes.json")
    found = find_labelled_cases(labelled)
    chosen = found if cases is None else select_cases(found, cases, "--cases")
    write_classes(classes, out / "classes.json")
    for number, case in enumerate(chosen):
        volume = read_image(case.image)
        labels = read_segmentation(case.labels, classes, volume)
        clicks = simulate_clicks(labels, case_seed(seed, case.name), slice_axis=volume.slice_axis(),
                                 clicks_per_class=clicks_per_class, every_nth_slice=every_nth_slice)
        write_image(volume, out / "images" / f"{case.name}.nrrd")
        write_image(volume.with_array(labels), out / "labels" / f"{case.name}.nrrd")
        write_markups(clicks, volume, classes, out / "points" / f"{case.name}.mrk.json")
        if progress:
            progress({"event": "progress", "stage": "prepare", "step": number + 1, "total": len(chosen)})
    return [case.name for case in chosen]
