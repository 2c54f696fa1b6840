"""Write files so that a reader never sees half of one: write a temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _temporary_name(path: Path) -> Path:
    # Keep the full suffix (".seg.nrrd", ".nii.gz") so writers that pick a format by extension still work.
    return path.with_name(f".{path.name}.partial-{os.getpid()}{''.join(path.suffixes)}")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success rename it to `path`, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        Path(temporary).write_text(text)
