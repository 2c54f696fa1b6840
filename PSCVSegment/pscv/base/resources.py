"""Memory bounds checked before the work starts: refuse what cannot fit instead of swapping, then dying.

Callers estimate the bytes a step needs from what they know before allocating (an image's header, the
training settings, a model's network shape) and call `check_memory`. The machine's memory is psutil's
`available` (free RAM plus what the system can reclaim) when psutil is installed, else the physical memory
(os.sysconf). Estimates are rough upper bounds: the point is to refuse a 20000 x 20000 image or a
16384-channel network at once, with advice, not to predict the peak to the megabyte.
"""

from __future__ import annotations

import os

from .. import PSCVError


def available_memory() -> int | None:
    """Bytes of memory this process may still take (None when the system does not say)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def describe_bytes(count: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} bytes"


def check_memory(needed: float, what: str, advice: str, available: int | None = None) -> None:
    """PSCVError when `needed` bytes exceed `available` (default: `available_memory()`): "{what} needs about
    N GiB of memory, more than the M GiB this machine has free; {advice}"."""
    available = available_memory() if available is None else available
    if available is not None and needed > available:
        raise PSCVError(f"{what} needs about {describe_bytes(needed)} of memory, more than the "
                        f"{describe_bytes(available)} this machine has free; {advice}")
