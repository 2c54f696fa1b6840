"""Intensity normalisation, identical at training and inference (its settings travel with the model).

- `percentile` (default, the ACDC recipe): per volume, clip at the `low`/`high` percentiles, scale to [0, 1].
- `window`: clip at fixed values `low`/`high` (e.g. a CT window in HU), scale to [0, 1].
"""

from __future__ import annotations

import numpy as np

from .. import PSCVError

DEFAULT_NORMALIZATION = {"mode": "percentile", "low": 0.5, "high": 99.5}


NORMALIZATION_TAKES = ('{"mode": "percentile", "low": 0.5, "high": 99.5} (percentiles 0..100) or '
                       '{"mode": "window", "low": -160, "high": 240}, with low < high')


def check_normalization(value, where: str = "normalization") -> dict:
    """A normalisation settings dict, checked (`where` names it in the message): mode, and low < high."""
    ok = isinstance(value, dict) and set(value) == {"mode", "low", "high"} and value["mode"] in ("percentile", "window")
    if ok:
        low, high = value["low"], value["high"]
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in (low, high))
        ok = ok and low < high and (value["mode"] == "window" or 0 <= low and high <= 100)
    if not ok:
        raise PSCVError(f"{where}: got {str(value)[:80]}; it takes {NORMALIZATION_TAKES}")
    return {"mode": value["mode"], "low": value["low"], "high": value["high"]}


def parse_normalization(text: str | None) -> dict:
    """`percentile[:LOW:HIGH]` or `window:LOW:HIGH` (command-line form) -> settings dict."""
    if not text:
        return dict(DEFAULT_NORMALIZATION)
    mode, *numbers = text.split(":")
    try:
        values = [float(n) for n in numbers]
    except ValueError:
        raise PSCVError(f"--normalize {text!r}: expected percentile[:LOW:HIGH] or window:LOW:HIGH") from None
    if mode == "percentile" and not values:
        return dict(DEFAULT_NORMALIZATION)
    if mode not in ("percentile", "window") or len(values) != 2 or values[0] >= values[1]:
        raise PSCVError(f"--normalize {text!r}: expected percentile[:LOW:HIGH] or window:LOW:HIGH with LOW < HIGH")
    if mode == "percentile" and not (0 <= values[0] < values[1] <= 100):
        raise PSCVError(f"--normalize {text!r}: percentiles must lie in 0..100")
    return {"mode": mode, "low": values[0], "high": values[1]}


def normalize(array: np.ndarray, settings: dict) -> np.ndarray:
    """Clip and scale an image to [0, 1] as float32: one float32 array the size of the image, besides the
    percentile's own working copy (float64 limits would promote every step to float64 under NumPy 2)."""
    array = np.asarray(array, dtype=np.float32)
    if settings["mode"] == "percentile":
        low, high = (float(v) for v in np.percentile(array, [settings["low"], settings["high"]]))
    else:
        low, high = float(settings["low"]), float(settings["high"])
    if high <= low:  # a constant image
        return np.zeros_like(array)
    out = np.clip(array, np.float32(low), np.float32(high))
    out -= np.float32(low)
    out /= np.float32(high - low)
    return out
