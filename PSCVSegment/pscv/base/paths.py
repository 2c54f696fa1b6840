"""Output paths checked before the work starts: never an input, never a folder for a file, a writable place.

`check_output_file` and `check_output_folder` raise a PSCVError naming the option (`what`, e.g. "--out"),
the path and the fix: an output that is an input or would replace one (the same file, a hard link, or a
name inside an output folder), a file name that is a folder (or the reverse), a suffix the writer does not
take, a place under a file or on a read-only disk. `describe_os_error` turns an OSError met while writing
(a full disk, a read-only one) into the same kind of message.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .. import PSCVError


def same_path(a, b) -> bool:
    """Whether two paths name one file or folder (links and hard links included)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_place(path, what: str) -> None:
    """The folder that will hold `path` (its nearest existing parent) is a folder this process can write in."""
    path = Path(path)
    place = _nearest_existing(path.parent)
    if not place.is_dir():
        raise PSCVError(f"{what} {path}: {place} is a file, not a folder; choose another place")
    if not os.access(place, os.W_OK):
        raise PSCVError(f"{what} {path}: cannot write in {place} (a read-only disk, or no permission); choose "
                        "another place")


def _refuse_inputs(path: Path, inputs, what: str, beside: str = "") -> None:
    for source in inputs:
        if source is not None and same_path(path, source):
            raise PSCVError(f"{what} {beside or path}: {'writes ' + str(path) + ', ' if beside else ''}which is the "
                            f"input {source}: it would be replaced; choose another output name")


def check_output_file(path, what: str = "--out", inputs=(), suffixes=()) -> Path:
    """A file to write: ending in one of `suffixes` (when given), not a folder, not one of `inputs`, in a
    writable place."""
    path = Path(path)
    if path.is_dir():
        example = path / ("result" + (tuple(suffixes) or ("",))[0])
        raise PSCVError(f"{what} {path}: is a folder; give a file name, e.g. {example}")
    if suffixes and not path.name.lower().endswith(tuple(suffixes)):
        raise PSCVError(f"{what} {path}: cannot write this format; use a name ending in {', '.join(suffixes)}")
    _refuse_inputs(path, inputs, what)
    check_writable_place(path, what)
    return path


def check_output_folder(path, what: str = "--out", inputs=(), names=()) -> Path:
    """A folder to write the files `names` into: not a file, not one of `inputs`, none of its `names` an
    input, in a writable place."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PSCVError(f"{what} {path}: is a file; give a folder")
    _refuse_inputs(path, inputs, what)
    for name in names:
        _refuse_inputs(path / name, inputs, what, beside=str(path))
    check_writable_place(path / "file", what)
    return path


ADVICE = {
    errno.ENOSPC: "the disk is full: free some space, or write somewhere else",
    getattr(errno, "EDQUOT", -1): "the disk quota is used up: free some space, or write somewhere else",
    errno.EFBIG: "the file is larger than this disk or process may write (a file size limit): write somewhere else",
    errno.EROFS: "the disk is read-only: write somewhere else",
    errno.EACCES: "permission denied: write somewhere you may write, or change the permissions",
    errno.EPERM: "permission denied: write somewhere you may write, or change the permissions",
    errno.ENAMETOOLONG: "the name is too long",
}


def describe_os_error(error: OSError) -> str:
    """`FILE: what went wrong, and what to do` for an OSError (no traceback needed)."""
    where = error.filename if error.filename is not None else "a file"
    advice = ADVICE.get(error.errno) or (error.strerror or str(error))
    return f"{where}: {advice}" + (f" ({error.strerror})" if error.errno in ADVICE and error.strerror else "")


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG)
