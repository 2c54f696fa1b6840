"""Write files and folders so that a reader never sees half of one: write a temporary name, then rename.

The temporary name is `.NAME.partial-PID` (a file keeps NAME's suffixes, so writers that pick a format by
extension still work). What a failed write leaves is removed on the way out (SIGTERM included, where the
command line turns it into an exception); what a killed process left (kill -9, a power cut) is removed by
the next write of the same name, once no process of that id runs. Clean-up never hides the error that
made the write fail (a full or read-only disk).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
from pathlib import Path

_PARTIAL = re.compile(r"\.partial-(\d+)")


def _temporary_name(path: Path, suffixes: bool = True) -> Path:
    # Keep the full suffix (".seg.nrrd", ".nii.gz") so writers that pick a format by extension still work.
    return path.with_name(f".{path.name}.partial-{os.getpid()}{''.join(path.suffixes) if suffixes else ''}")


def process_alive(pid: int) -> bool:
    """Whether a process of this id runs (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or a system that cannot tell: leave its files alone
    return True


def remove_quietly(path: Path) -> None:
    """Remove a file or folder if it is there; an error doing so (a read-only disk) is not raised."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def remove_stale_partials(path: str | Path) -> list[Path]:
    """Remove the `.NAME.partial-PID*` files and folders beside `path` that processes no longer running left;
    returns them."""
    path = Path(path)
    removed = []
    try:
        candidates = list(path.parent.glob(f".{glob.escape(path.name)}.partial-*"))
    except OSError:
        return removed
    for candidate in candidates:
        match = _PARTIAL.match(candidate.name[len(path.name) + 1:])
        if match and not process_alive(int(match.group(1))):
            remove_quietly(candidate)
            removed.append(candidate)
    return removed


def _make_parents(path: Path) -> list[Path]:
    """Create the missing folders above `path`; returns those it made, deepest first."""
    made = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        made.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return made


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success rename it to `path`, on failure remove it (and the
    folders made for it)."""
    return _atomic(path, folder=False)


def atomic_folder(path: str | Path):
    """Yield a new empty temporary folder beside `path`; on success it replaces `path` (a folder that was there
    is removed), on failure it is removed, with the folders made for it."""
    return _atomic(path, folder=True)


@contextlib.contextmanager
def _atomic(path: str | Path, folder: bool):
    path = Path(path)
    made = _make_parents(path)
    remove_stale_partials(path)
    temporary = _temporary_name(path, suffixes=not folder)
    done = False
    try:
        if folder:
            remove_quietly(temporary)
            temporary.mkdir()
        yield temporary
        if folder and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(temporary, path)
        done = True
    finally:
        if not done:
            remove_quietly(temporary)
            _remove_empty(made)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")
