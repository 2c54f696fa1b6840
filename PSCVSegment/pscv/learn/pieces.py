"""Connected pieces of a segmentation: each class's largest piece, and which classes are one piece.

An organ is one piece, so a network's stray specks of it elsewhere are errors: keeping each such class's
largest 3D piece (face-connected) removes them. Whether a class is one piece is read from the training clicks
(`one_piece_classes`), never assumed: a class whose clicks lie in two pieces of the network's own prediction on
some training case (ribs, lesions) keeps every piece. No torch: label maps are numpy arrays `[k, j, i]`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..data.clicks import Clicks


def largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected piece of `mask` (bool); empty where `mask` is."""
    pieces, count = ndimage.label(mask)
    if not count:
        return mask.copy()
    return pieces == 1 + int(np.bincount(pieces.ravel())[1:].argmax())


def keep_largest_pieces(labels: np.ndarray, values) -> np.ndarray:
    """`labels` with each class of `values` reduced to its largest piece (its other pieces become 0)."""
    kept = labels.copy()
    for value in values:
        mask = labels == value
        kept[mask & ~largest_piece(mask)] = 0
    return kept


def clicks_in_one_piece(labels: np.ndarray, clicks: Clicks, value) -> bool:
    """Whether the clicks of class `value` that `labels` gives that class all lie in one piece of it (clicks
    the prediction gives another class say nothing about pieces)."""
    kji = clicks.kji[clicks.values == value]
    pieces, _ = ndimage.label(labels == value)
    found = pieces[tuple(kji.T)] if len(kji) else np.zeros(0, dtype=int)
    return len(np.unique(found[found > 0])) <= 1


def one_piece_classes(predictions, clicks, values) -> list:
    """The class values (of `values`) that are one piece: seen on at least one case, and on every case their
    clicks lie in one piece of the prediction. `predictions` and `clicks` pair up case by case; a case whose
    clicks are None has dense labels for its prediction, where a class is one piece if it is."""
    one_piece, seen = set(values), set()
    for labels, case_clicks in zip(predictions, clicks):
        for value in list(one_piece):
            if case_clicks is None:
                found = (labels == value).any()
                single = not found or ndimage.label(labels == value)[1] == 1
            else:
                found = (case_clicks.values == value).any()
                single = not found or clicks_in_one_piece(labels, case_clicks, value)
            seen.update([value] if found else [])
            if not single:
                one_piece.discard(value)
    return [value for value in values if value in one_piece and value in seen]
