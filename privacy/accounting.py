"""Epsilon from a DP-SGD history, with Opacus' own accountants, and noise planning across rounds.

A history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, exactly Opacus'
accountant history: each entry is ``steps`` Poisson-subsampled Gaussian mechanism steps with
sampling probability ``sample_rate`` and noise std ``noise_multiplier * max_grad_norm``.
Composition over all entries gives the (epsilon, delta) guarantee for one DP unit.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from functools import lru_cache

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

from storefed.cache_dir import cache_root

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
        return _rdp_epsilon(history, delta, _ORDERS, _rdp_one_step)
    acc = create_accountant(accountant)
    acc.history = _merge_repeats(history)  # same composition, far fewer PRV convolutions
    return float(acc.get_epsilon(delta=delta))


def _rdp_epsilon(history: list[HistoryEntry], delta: float, orders: list[float], one_step) -> float:
    """Same computation as opacus' RDPAccountant.get_epsilon at ``orders``, each (q, sigma) step cached."""
    total = sum(int(n) * one_step(float(q), float(s)) for s, q, n in history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": bound still valid
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)


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
    """RDP at Opacus' default orders of one Poisson-subsampled Gaussian step: what every ledger epsilon
    is computed from (always by Opacus in this process, never read from disk)."""
    return np.asarray(
        rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_ORDERS)
    )


@lru_cache(maxsize=4096)
def _planning_rdp_one_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """The same curve for noise planning only, also kept on disk (``_stored_rdp``): its fractional orders
    cost 0.1-0.5 s per pair. A wrong stored curve could only mis-plan the noise; the ledger then checks
    the planned round with ``_rdp_one_step`` and refuses it if it would exceed the budget."""
    return _stored_rdp(sample_rate, noise_multiplier, lambda: _rdp_one_step(sample_rate, noise_multiplier))


_ORDERS_KEY = hashlib.sha256(repr(_ORDERS).encode()).hexdigest()[:12]


def _stored_rdp(sample_rate: float, noise_multiplier: float, compute) -> np.ndarray:
    """``compute()``, kept in ``$STOREFED_CACHE/rdp/`` keyed by the exact (q, sigma) and the orders, so
    Ray actors, merchant processes and later runs share it. Both inputs are public plan parameters and
    the values recomputable; an unreadable, damaged or unwritable cache is skipped."""
    path = cache_root() / "rdp" / f"{_ORDERS_KEY}-{sample_rate!r}-{noise_multiplier!r}.npy"
    try:
        stored = np.load(path, allow_pickle=False)
        if stored.shape == (len(_ORDERS),) and not np.isnan(stored).any():
            return stored
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
            np.save(handle, value, allow_pickle=False)
        os.replace(handle.name, path)  # whole file or none (concurrent writers write the same values)
    except OSError:
        pass
    return value


# Opacus' integer default orders: their RDP has a closed-form sum, ~30x faster than the fractional orders
_INT_ORDERS = [a for a in _ORDERS if float(a).is_integer()]


@lru_cache(maxsize=4096)
def _rdp_one_step_int(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    return np.asarray(
        rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_INT_ORDERS)
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

    def history(k: int) -> list[HistoryEntry]:
        return spent + [(_noise_grid(k), sample_rate, steps_per_round * rounds_left)]

    def fits(k: int) -> bool:
        if accountant == "rdp":
            return _rdp_epsilon(history(k), delta, _ORDERS, _planning_rdp_one_step) <= epsilon_budget
        return epsilon_of(history(k), delta, accountant) <= epsilon_budget

    # The RDP bound at the integer orders alone is never below the bound at all orders (a minimum over a
    # subset), so the smallest k that fits there fits at all orders too: search there first, then walk
    # down with all orders. Same answer as a search with all orders, with 2-4 evaluations of them, not 10.
    def fits_int(k: int) -> bool:
        return _rdp_epsilon(history(k), delta, _INT_ORDERS, _rdp_one_step_int) <= epsilon_budget

    top = _GRID_SIZE - 1
    rdp = accountant == "rdp"
    if not ((rdp and fits_int(top)) or fits(top)):
        raise ValueError(
            f"no noise multiplier fits {rounds_left} more round(s) into epsilon budget {epsilon_budget}: "
            f"{epsilon_of(spent, delta, accountant):.3f} is already spent"
        )
    if not rdp:
        return _noise_grid(_smallest(fits, 0, top))
    upper = _smallest(fits_int, 0, top) if fits_int(top) else top
    step, lower = 1, 0
    while upper - step >= 0:
        if not fits(upper - step):
            lower = upper - step + 1
            break
        upper, step = upper - step, step * 2
    return _noise_grid(_smallest(fits, lower, upper))


def _smallest(fits, low: int, high: int) -> int:
    """Smallest k in [low, high] with fits(k), given fits(high) and fits monotone (epsilon falls as noise grows)."""
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return low


_GRID_SIZE = 750  # 0.3 * 1.01**749 ~ 520


def _noise_grid(k: int) -> float:
    return round(0.3 * 1.01**k, 6)
