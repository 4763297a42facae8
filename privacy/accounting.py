"""Epsilon from a DP-SGD history, with Opacus' own accountants, and noise planning across rounds.

A history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, exactly Opacus'
accountant history: each entry is ``steps`` Poisson-subsampled Gaussian mechanism steps with
sampling probability ``sample_rate`` and noise std ``noise_multiplier * max_grad_norm``.
Composition over all entries gives the (epsilon, delta) guarantee for one DP unit.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

ACCOUNTANTS = ("rdp", "prv")
HistoryEntry = tuple[float, float, int]


def check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant={name!r} is unknown: choose one of {ACCOUNTANTS}")
    return name


def epsilon_of(history: list[HistoryEntry], delta: float, accountant: str = "rdp") -> float:
    """Epsilon after composing every entry of ``history`` at ``delta`` (0.0 for an empty history)."""
    if not history:
        return 0.0
    if check_accountant(accountant) == "rdp":
        # Same computation as opacus' RDPAccountant.get_epsilon, with each (q, sigma) step cached.
        total = sum(int(n) * _rdp_one_step(float(q), float(s)) for s, q, n in history)
        with warnings.catch_warnings():  # "optimal order is the largest alpha": bound still valid
            warnings.simplefilter("ignore", UserWarning)
            eps, _ = rdp_analysis.get_privacy_spent(orders=_ORDERS, rdp=total, delta=delta)
        return float(eps)
    acc = create_accountant(accountant)
    acc.history = _merge_repeats(history)  # same composition, far fewer PRV convolutions
    return float(acc.get_epsilon(delta=delta))


def _merge_repeats(history: list[HistoryEntry]) -> list[HistoryEntry]:
    """Consecutive entries with the same (noise, sample rate) merged by adding their steps."""
    merged: list[HistoryEntry] = []
    for s, q, n in history:
        if merged and merged[-1][:2] == (float(s), float(q)):
            merged[-1] = (float(s), float(q), merged[-1][2] + int(n))
        else:
            merged.append((float(s), float(q), int(n)))
    return merged


_ORDERS = list(RDPAccountant.DEFAULT_ALPHAS)
RDP_ORDERS = tuple(_ORDERS)  # the orders every Gaussian history is accounted at (Opacus' defaults)


def rdp_one_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP at ``RDP_ORDERS`` of one Poisson-subsampled Gaussian step (cached)."""
    return _rdp_one_step(sample_rate, noise_multiplier)


@lru_cache(maxsize=4096)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP at Opacus' default orders of one Poisson-subsampled Gaussian step."""
    return np.asarray(
        rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_ORDERS)
    )


def plan_noise_multiplier(
    spent: list[HistoryEntry],
    sample_rate: float,
    steps_per_round: int,
    rounds_left: int,
    epsilon_budget: float,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Smallest noise multiplier on a 1%-spaced grid such that ``rounds_left`` more rounds fit.

    Planning is across all remaining rounds (not per round): after ``spent`` plus
    ``rounds_left`` rounds of ``steps_per_round`` steps at this noise, epsilon <= budget.
    The grid (``0.3 * 1.01**k``) keeps the answer conservative and lets per-step RDP be
    cached across merchants. Raises ValueError when no noise up to ~500 fits.
    """
    if rounds_left < 1:
        raise ValueError("rounds_left must be >= 1")

    def fits(k: int) -> bool:
        sigma = _noise_grid(k)
        return epsilon_of(spent + [(sigma, sample_rate, steps_per_round * rounds_left)], delta, accountant) <= epsilon_budget

    low, high = 0, _GRID_SIZE - 1
    if not fits(high):
        raise ValueError(
            f"no noise multiplier fits {rounds_left} more round(s) into epsilon budget {epsilon_budget}: "
            f"{epsilon_of(spent, delta, accountant):.3f} is already spent"
        )
    while low < high:  # smallest k that fits (epsilon decreases as noise grows)
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return _noise_grid(low)


_GRID_SIZE = 750  # 0.3 * 1.01**749 ~ 520


def _noise_grid(k: int) -> float:
    return round(0.3 * 1.01**k, 6)
