"""Reading JSON that people and other programs write: one clear PSCVError for each way it can be wrong.

Every JSON input of pscv (clicks, classes, model descriptions, job files, settings sent to the service)
is read here: a UTF-8 byte-order mark is accepted (Windows editors write one), and a folder, an empty or
oversized file, text that is not UTF-8, broken JSON and JSON nested too deeply for Python's parser each
get a message naming the file (or the item) and what to do, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import PSCVError

MAX_JSON_BYTES = 64 * 2**20  # no JSON input of pscv comes near this (a markups file of 100,000 points: ~30 MB)


def parse_json(text: str | bytes, where: str, fix: str = ""):
    """The JSON value in `text` (bytes are UTF-8, with or without a byte-order mark). `where` names the source
    in messages; `fix` (e.g. "; save the file again") ends the messages about damaged text."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise PSCVError(f"{where}: not UTF-8 text (byte {error.start}); expected a JSON file{fix}") from None
    elif text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise PSCVError(f"{where}: the file is empty{fix}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise PSCVError(f"{where}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                        f"it may be truncated or damaged{fix}") from None
    except RecursionError:
        raise PSCVError(f"{where}: JSON nested too deeply for this reader; no pscv file nests more than a few "
                        "levels") from None


def read_json(path: str | Path, what: str = "JSON file", fix: str = ""):
    """The JSON value in the file `path`; `what` names the kind of file in messages ("no such markups file")."""
    path = Path(path)
    if path.is_dir():
        raise PSCVError(f"{path}: is a folder; expected a {what}")
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise PSCVError(f"{path}: {size / 2**20:.0f} MB is too large for a {what} "
                            f"(at most {MAX_JSON_BYTES // 2**20} MB)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise PSCVError(f"{path}: no such {what}") from None
    except OSError as error:
        raise PSCVError(f"{path}: cannot be read ({error.strerror or error})") from None
    return parse_json(data, str(path), fix)
