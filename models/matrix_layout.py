"""How a symmetric matrix travels as a vector: its upper triangle, diagonal included, row-major."""

from __future__ import annotations

import numpy as np


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
    """The upper triangle (diagonal included) of a square matrix, in ``np.triu_indices`` order."""
    return matrix[np.triu_indices(matrix.shape[0])]


def symmetric_from_upper(values: np.ndarray, size: int) -> np.ndarray:
    """The symmetric ``size x size`` matrix whose upper triangle (row-major) is ``values``."""
    out = np.zeros((size, size))
    out[np.triu_indices(size)] = values
    return out + np.triu(out, 1).T
