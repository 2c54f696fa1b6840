"""Keeping each organ's largest piece, and finding from the training clicks which classes are one piece."""

import numpy as np

from pscv.data.clicks import Clicks
from pscv.learn.pieces import clicks_in_one_piece, keep_largest_pieces, largest_piece, one_piece_classes


def two_blobs() -> np.ndarray:
    """Class 1: a big box and a speck apart from it; class 2: one box."""
    labels = np.zeros((4, 20, 20), dtype=np.uint8)
    labels[:, 2:10, 2:10] = 1
    labels[1, 15:17, 15:17] = 1
    labels[:, 12:14, 2:8] = 2
    return labels


def test_largest_piece_and_keep_largest_pieces():
    labels = two_blobs()
    assert largest_piece(labels == 1).sum() == 4 * 64
    assert not largest_piece(np.zeros((2, 3, 3), bool)).any()
    kept = keep_largest_pieces(labels, [1])
    assert (kept[1, 15:17, 15:17] == 0).all() and (kept[:, 2:10, 2:10] == 1).all()
    assert np.array_equal(kept == 2, labels == 2)
    assert np.array_equal(keep_largest_pieces(labels, []), labels)  # no class named: nothing changes


def test_clicks_decide_which_classes_are_one_piece():
    labels = two_blobs()
    in_one = Clicks(np.array([[0, 3, 3], [3, 8, 8], [0, 12, 3]]), np.array([1, 1, 2]))
    in_two = Clicks(np.array([[0, 3, 3], [1, 15, 15], [0, 12, 3]]), np.array([1, 1, 2]))
    assert clicks_in_one_piece(labels, in_one, 1) and not clicks_in_one_piece(labels, in_two, 1)
    # a click the prediction gives another class says nothing about pieces
    assert clicks_in_one_piece(labels, Clicks(np.array([[0, 3, 3], [0, 0, 0]]), np.array([1, 1])), 1)
    assert one_piece_classes([labels], [in_one], [1, 2]) == [1, 2]
    assert one_piece_classes([labels, labels], [in_one, in_two], [1, 2]) == [2]  # two pieces on one case: out
    assert one_piece_classes([labels], [Clicks(np.array([[0, 3, 3]]), np.array([1]))], [1, 2]) == [1]  # 2 unseen
    # dense labels (clicks None): a class is one piece if its label map is
    assert one_piece_classes([labels], [None], [1, 2]) == [2]
