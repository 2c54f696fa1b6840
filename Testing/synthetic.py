"""Small synthetic volumes for fast tests: a dark background with two bright "organs"."""

import numpy as np

from pscv.data.classes import ClassInfo
from pscv.data.volumes import Volume

CLASSES = [ClassInfo("background", 0, (0, 0, 0)), ClassInfo("disk", 1, (230, 159, 0)),
           ClassInfo("box", 2, (86, 180, 233))]


def two_organ_volume(slices=6, size=48, seed=0, spacing=(1.0, 1.0, 4.0)):
    """(Volume, labels): a disk (bright) and a box (medium) in every slice, drifting a little across slices."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    labels = np.zeros((slices, size, size), dtype=np.uint8)
    for k in range(slices):
        centre = size * 0.3 + k * 0.5
        labels[k][(rows - centre) ** 2 + (cols - centre) ** 2 < (size * 0.15) ** 2] = 1
        labels[k, int(size * 0.55):int(size * 0.8), int(size * 0.5):int(size * 0.85)] = 2
    image = np.choose(labels, [0.1, 0.9, 0.5]).astype(np.float32) + rng.normal(0, 0.05, labels.shape).astype(np.float32)
    return Volume(image * 1000, spacing=spacing), labels
