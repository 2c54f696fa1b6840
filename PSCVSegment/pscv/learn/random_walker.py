"""The random walker (Grady 2006): class probabilities that spread from labelled voxels along intensity edges.

Every unlabelled voxel gets, for each class, the probability that a random walk starting there reaches a
voxel of that class first, stepping to a face neighbour with a weight `exp(-beta (x_a - x_b)^2)` divided by
the squared distance between the voxels (in units of the smallest spacing). The probabilities solve one
sparse linear system per class (the graph Laplacian restricted to the unlabelled voxels); it is solved here
matrix-free with Jacobi-preconditioned conjugate gradients, so memory stays a few copies of the image.
numpy only: no torch, no SciPy sparse matrices.
"""

from __future__ import annotations

import numpy as np

from ..base.progress import Cancelled

UNLABELLED = -1


def _halves(axis: int) -> tuple[tuple, tuple]:
    """Index expressions of each voxel and of its next neighbour along `axis`."""
    lower, upper = [slice(None)] * 3, [slice(None)] * 3
    lower[axis], upper[axis] = slice(0, -1), slice(1, None)
    return tuple(lower), tuple(upper)


def edge_weights(image: np.ndarray, spacing_kji, beta: float) -> list[np.ndarray]:
    """Weights of the edges between face neighbours, one array per axis (one shorter along that axis)."""
    spacing = np.asarray(spacing_kji, dtype=np.float64)
    spacing = spacing / spacing.min()
    weights = []
    for axis in range(3):
        lower, upper = _halves(axis)
        difference = image[upper] - image[lower]
        weights.append(np.exp(-beta * difference * difference) / spacing[axis] ** 2 + 1e-10)
    return weights


def _neighbour_sum(weights: list[np.ndarray], values: np.ndarray) -> np.ndarray:
    """sum over neighbours b of w(a, b) values(b), for every voxel a."""
    total = np.zeros_like(values)
    for axis, weight in enumerate(weights):
        lower, upper = _halves(axis)
        total[lower] += weight * values[upper]
        total[upper] += weight * values[lower]
    return total


def random_walker(image: np.ndarray, seeds: np.ndarray, classes: int, spacing_kji=(1.0, 1.0, 1.0),
                  beta: float = 3000.0, tolerance: float = 1e-3, max_iterations: int = 2000,
                  should_stop=None) -> np.ndarray:
    """Probabilities `(classes, k, j, i)` float32 from `seeds` (`[k, j, i]` class index, `UNLABELLED` elsewhere).

    `image` holds intensities scaled to [0, 1]; `beta` sets how strongly an intensity step stops the walk.
    Seeded voxels keep their class with probability 1. A class without seeds gets probability 0 everywhere.
    `should_stop` is asked every few dozen iterations; it raises `Cancelled` when it says so.
    """
    image = np.asarray(image, dtype=np.float64)
    seeds = np.asarray(seeds)
    weights = edge_weights(image, spacing_kji, beta)
    free = seeds == UNLABELLED
    degree = _neighbour_sum(weights, np.ones_like(image))
    probabilities = np.zeros((classes, *image.shape), dtype=np.float32)
    # Every class is solved, then the sum scaled to 1: with strong edges the system is ill-conditioned, and taking
    # one class as what the others leave piles their solver errors onto it (measured: LV Dice 0.27 against 0.80).
    seeded = [k for k in range(classes) if np.any(seeds == k)]
    for k in seeded:
        probabilities[k] = _solve(weights, degree, free, (seeds == k).astype(np.float64), tolerance, max_iterations,
                                  should_stop)
    total = probabilities.sum(axis=0)
    probabilities /= np.maximum(total, 1e-6)
    unreached = total < 1e-6  # walled off by edges the solver cannot see through: every class equally likely
    for k in seeded:
        probabilities[k][unreached] = 1.0 / len(seeded)
    return probabilities


def _solve(weights, degree, free, fixed, tolerance, max_iterations, should_stop) -> np.ndarray:
    """Harmonic probabilities of one class: L_free p = W fixed on the free voxels, by preconditioned CG."""
    def laplacian(values):
        return np.where(free, degree * values - _neighbour_sum(weights, np.where(free, values, 0.0)), 0.0)

    right = np.where(free, _neighbour_sum(weights, np.where(free, 0.0, fixed)), 0.0)
    solution = np.where(free, right / degree, 0.0)
    residual = right - laplacian(solution)
    preconditioned = np.where(free, residual / degree, 0.0)
    direction = preconditioned.copy()
    product = float((residual * preconditioned).sum())
    scale = float(np.sqrt((right * right).sum())) + 1e-30
    for iteration in range(max_iterations):
        if should_stop is not None and iteration % 50 == 0 and should_stop():
            raise Cancelled("stopped while propagating the clicks")
        step = laplacian(direction)
        alpha = product / (float((direction * step).sum()) + 1e-30)
        solution += alpha * direction
        residual -= alpha * step
        if np.sqrt((residual * residual).sum()) < tolerance * scale:
            break
        preconditioned = np.where(free, residual / degree, 0.0)
        next_product = float((residual * preconditioned).sum())
        direction = preconditioned + (next_product / (product + 1e-30)) * direction
        product = next_product
    return np.clip(np.where(free, solution, fixed), 0.0, 1.0)
