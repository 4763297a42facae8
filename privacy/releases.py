"""Bounded per-unit statistics for one-shot releases (sums of vectors and of Gram matrices).

A release adds noise calibrated to an L2 sensitivity ``bound``; these functions enforce that bound
per DP unit before summing, whatever the task produced. Hand-written because Opacus clips
per-sample *gradients* only, not arbitrary statistics.
"""

from __future__ import annotations

import numpy as np

from storefed.models.matrix_layout import upper_triangle


def clip_rows(rows: np.ndarray, bound: float) -> np.ndarray:
    """Each row scaled down (never up) to L2 norm at most ``bound``."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * np.minimum(1.0, bound / np.maximum(norms, 1e-300))


def bounded_sum(rows: np.ndarray, bound: float = 1.0) -> np.ndarray:
    """Sum of the units' rows, each clipped to L2 norm ``bound``: one unit moves it by at most ``bound``."""
    return clip_rows(np.asarray(rows, dtype=np.float64), bound).sum(0)


def bounded_gram_sum(rows: np.ndarray, bound: float = 1.0) -> np.ndarray:
    """Upper triangle of ``sum_u x_u x_u^T`` with each ``x_u`` clipped to norm ``sqrt(bound)``.

    One unit's term has Frobenius norm ``||x_u||^2 <= bound``, and its upper triangle at most that,
    so adding or removing one unit moves the released vector by at most ``bound`` in L2."""
    x = clip_rows(np.asarray(rows, dtype=np.float64), float(np.sqrt(bound)))
    return upper_triangle(x.T @ x)
