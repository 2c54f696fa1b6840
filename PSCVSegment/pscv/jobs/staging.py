"""Putting a job's inputs into its folder under fixed names: decided here once, for every way they travel.

A local client links or copies them into the folder (`stage_inputs`); a remote client sends them
(`upload_files`: folders as zips) and the service stores what it receives (`store_upload`), all under the
names `plan_inputs` gives: `image.<suffix>` for a one-file image, `image/` for a DICOM series folder,
`image.nrrd` for a two-file image (.nhdr + data, .mhd + .raw: converted to one file), `points-<n>.mrk.json`
or `points-<n>/<stem>.fcsv` for clicks, `strokes-<n>.<suffix>` for painted strokes, `classes.json`, and the
folders `model/` and `dataset/`. A
client's file name never becomes a path, except the checked stem of a .fcsv file, which names its point
list and so its class.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .. import PSCVError
from ..data.formats import ONE_FILE_SUFFIXES, SEGMENTATION_SUFFIXES, listing

SAFE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _-]{0,63}")
CONVERTED_IMAGE = "image.nrrd"  # where a two-file image goes, as one file
CLASSES_FILE = "classes.json"
FOLDER_INPUTS = ("model", "dataset")  # inputs that are folders (a model given by one of its files: its folder)
LIST_INPUTS = ("points", "strokes")  # inputs that may be several files


@dataclass
class Input:
    """One input of a job: its role in job.json, its name in the job folder, where it comes from, and how it
    gets there: `file` (as it is), `folder` (a folder, a zip on the way to a service) or `convert`."""

    role: str
    name: str
    source: Path
    how: str


def image_name(filename: str) -> str | None:
    """`image.<suffix>` for a one-file image format (by the name's ending), else None."""
    lower = str(filename).lower()
    for suffix in ONE_FILE_SUFFIXES:
        if lower.endswith(suffix):
            return "image" + suffix
    return None


def points_name(filename: str, number: int) -> str:
    """Where the `number`-th clicks file goes in a job folder."""
    name = PurePosixPath(str(filename).replace("\\", "/")).name
    if name.lower().endswith(".fcsv"):
        stem = name[: -len(".fcsv")]
        return f"points-{number}/{stem if SAFE_STEM.fullmatch(stem) else f'points-{number}'}.fcsv"
    if name.lower().endswith(".json"):
        return f"points-{number}.mrk.json"
    raise PSCVError(f"{filename}: clicks must be a 3D Slicer point list (.mrk.json) or a .fcsv file")


def strokes_name(filename: str, number: int) -> str:
    """Where the `number`-th strokes file (a .seg.nrrd or one-file label map) goes in a job folder."""
    lower = str(filename).lower()
    for suffix in SEGMENTATION_SUFFIXES:
        if lower.endswith(suffix):
            return f"strokes-{number}{suffix}"
    raise PSCVError(f"{filename}: strokes must be a 3D Slicer segmentation or a label map "
                    f"({listing(SEGMENTATION_SUFFIXES)})")


def _as_list(paths) -> list:
    return [] if paths is None else [paths] if isinstance(paths, (str, Path)) else list(paths)


def plan_inputs(image=None, points=None, classes=None, model=None, dataset=None, strokes=None) -> list[Input]:
    """Where each given file or folder goes in a job folder, and how."""
    planned = []
    if image is not None:
        image = Path(image)
        if image.is_dir():  # a DICOM series folder
            planned.append(Input("image", "image", image, "folder"))
        elif image_name(image.name):
            planned.append(Input("image", image_name(image.name), image, "file"))
        else:
            planned.append(Input("image", CONVERTED_IMAGE, image, "convert"))
    for number, path in enumerate(_as_list(points), start=1):
        planned.append(Input("points", points_name(Path(path).name, number), Path(path), "file"))
    for number, path in enumerate(_as_list(strokes), start=1):
        planned.append(Input("strokes", strokes_name(Path(path).name, number), Path(path), "file"))
    if classes is not None:
        planned.append(Input("classes", CLASSES_FILE, Path(classes), "file"))
    for role, source in zip(FOLDER_INPUTS, (model, dataset)):
        if source is not None:
            source = Path(source)
            if source.is_file():  # e.g. model.json or model.safetensors: its folder
                source = source.parent
            planned.append(Input(role, role, source, "folder"))
    return planned


def job_inputs(roles_and_names) -> dict:
    """job.json's "inputs" from (role, name in the job folder) pairs: "points" and "strokes" lists, the others
    one name."""
    inputs = {}
    for role, name in roles_and_names:
        if role in LIST_INPUTS:
            inputs.setdefault(role, []).append(name)
        else:
            inputs[role] = name
    return inputs


def stage_inputs(folder, image=None, points=None, classes=None, model=None, dataset=None, strokes=None) -> dict:
    """Put the given files and folders into the job folder (hard links where possible); returns job.json's
    "inputs"."""
    folder = Path(folder)
    planned = plan_inputs(image, points, classes, model, dataset, strokes)
    for item in planned:
        if item.how == "convert":
            convert_image(item.source, folder / item.name)
        else:
            link_or_copy(item.source, folder / item.name)
    return job_inputs((item.role, item.name) for item in planned)


def upload_files(scratch: Path, image=None, points=None, classes=None, model=None, dataset=None,
                 strokes=None) -> list:
    """What a client sends to a service for these inputs: (form field, file name, path), folders zipped and
    converted images written into the folder `scratch`. The service names them with `store_upload`."""
    scratch = Path(scratch)
    files = []
    for item in plan_inputs(image, points, classes, model, dataset, strokes):
        sent = PurePosixPath(item.name).name  # a .fcsv keeps its stem (its point list's name), nothing else
        if item.how == "folder":
            files.append((item.role, f"{sent}.zip", zip_folder(item.source, scratch / f"{sent}.zip")))
        elif item.how == "convert":
            files.append((item.role, sent, convert_image(item.source, scratch / sent)))
        else:
            files.append((item.role, sent, item.source))
    return files


def store_upload(folder: Path, role: str, number: int, filename: str, stream, max_unpacked: int) -> str:
    """Store one input a service received (the `number`-th of its role) in the job folder under its fixed
    name; returns that name. Folders come as zips (unpacked, at most `max_unpacked` bytes)."""
    if role == "image":
        name = image_name(filename)
        if name is None:
            if not filename.lower().endswith(".zip"):
                raise PSCVError(f"image {filename[:80]!r}: send {listing(ONE_FILE_SUFFIXES)}, or a .zip of a "
                                "DICOM series folder")
            unpacked = extract_zip(stream, folder / "image", max_unpacked, "image (a zip of a DICOM folder)")
            return unpacked.relative_to(folder).as_posix()
    elif role == "points":
        name = points_name(filename, number)
    elif role == "strokes":
        name = strokes_name(filename, number)
    elif role == "classes":
        name = CLASSES_FILE
    elif role in FOLDER_INPUTS:
        unpacked = extract_zip(stream, folder / role, max_unpacked, f"{role} (a zip of the {role} folder)")
        return unpacked.relative_to(folder).as_posix()
    else:
        raise PSCVError(f"unknown input {role!r}")
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "wb") as out:
        shutil.copyfileobj(stream, out, 2**20)
    return name


def convert_image(source: Path, destination: Path) -> Path:
    """A two-file image (.nhdr + data, .mhd + .raw) written as one file."""
    from ..data.volumes import read_image, write_image

    write_image(read_image(source), destination)
    return destination


def link_or_copy(source: Path, destination: Path) -> None:
    """Put `source` (a file or folder) at `destination`: hard links where possible (no copy of a big
    image; safe because pscv replaces files by renaming, never rewrites them), else a copy."""
    source, destination = Path(source), Path(destination)
    if source.is_dir():
        shutil.copytree(source, destination, copy_function=_link_or_copy_file)
    else:
        destination.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy_file(source, destination)


def _link_or_copy_file(source, destination) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def zip_folder(folder, destination) -> Path:
    """Write the files under `folder` (names relative to it) into the zip file `destination`."""
    folder, destination = Path(folder), Path(destination)
    with zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                archive.write(path, path.relative_to(folder).as_posix())
    return destination


MAX_MEMBERS = 100_000  # files in one zip: a DICOM series of 5,000 slices is far below
MAX_MEMBER_NAME = 1024  # characters of a member's path (each part at most 255, as most file systems allow)


def extract_zip(source, destination, max_bytes: int, what: str = "zip file") -> Path:
    """Unpack a zip file into the new folder `destination`, refusing names that leave it, links, names too long
    or clashing (a file and a folder of one name), more than MAX_MEMBERS files and more than `max_bytes`
    unpacked. Returns the folder, or its only subfolder when it holds nothing else."""
    destination = Path(destination)
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as error:
        raise PSCVError(f"{what}: not a zip file ({error})") from None
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        if len(members) > MAX_MEMBERS:
            raise PSCVError(f"{what}: {len(members)} files, more than the {MAX_MEMBERS} a zip may hold")
        if sum(info.file_size for info in members) > max_bytes:
            raise PSCVError(f"{what}: more than {max_bytes // 2**20} MB once unpacked")
        destination.mkdir(parents=True)
        for info in members:
            _extract_member(archive, info, destination, what)
    entries = list(destination.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else destination


def _extract_member(archive, info, destination: Path, what: str) -> None:
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
    if not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in name or is_link:
        raise PSCVError(f"{what}: refusing the member {name[:80]!r} (absolute, '..', drive or link)")
    if len(name) > MAX_MEMBER_NAME or any(len(part.encode()) > 255 for part in parts):
        raise PSCVError(f"{what}: refusing the member {name[:80]!r}... (a name of {len(name)} characters; at most "
                        f"{MAX_MEMBER_NAME}, and 255 bytes a part)")
    target = destination.joinpath(*parts)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as stream, open(target, "xb") as out:
            shutil.copyfileobj(stream, out, 2**20)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
        raise PSCVError(f"{what}: damaged or unsupported member {name[:80]!r} ({error})") from None
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise PSCVError(f"{what}: the member {name[:80]!r} clashes with another of the same name (a file and a "
                        "folder, or twice the same file)") from None
