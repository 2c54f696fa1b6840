"""Intensity normalisation, identical at training and inference (its settings travel with the model).

- `percentile` (default, the ACDC recipe): per volume, clip at the `low`/`high` percentiles, scale to [0, 1].
- `window`: clip at fixed values `low`/`high` (e.g. a CT window in HU), scale to [0, 1].
"""

from __future__ import annotations

import numpy as np

from .. import PSCVError

DEFAULT_NORMALIZATION = {"mode": "percentile", "low": 0.5, "high": 99.5}


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
    """Clip and scale an image to [0, 1] as float32."""
    array = np.asarray(array, dtype=np.float32)
    if settings["mode"] == "percentile":
        low, high = np.percentile(array, [settings["low"], settings["high"]])
    else:
        low, high = settings["low"], settings["high"]
    if high <= low:  # a constant image
        return np.zeros_like(array)
    return ((np.clip(array, low, high) - low) / (high - low)).astype(np.float32)
