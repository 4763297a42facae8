"""Epsilon of a DP-SGD history with Google's ``dp_accounting``: the independent cross-check.

This is NOT what the platform uses to account privacy: StoreFed's epsilon always comes from
Opacus' accountants (``privacy.accounting.epsilon_of``). This module exists only so tests can
reproduce every epsilon StoreFed reports with a second, independently written implementation
of the same method:

- ``method="rdp"``: ``dp_accounting.rdp.RdpAccountant`` (Rényi DP of the Poisson-subsampled
  Gaussian, converted to (epsilon, delta) with the same Balle et al. 2020 bound Opacus uses),
  evaluated at Opacus' ``RDPAccountant.DEFAULT_ALPHAS`` so both sides optimise over the same
  orders (dp_accounting's default orders differ and would give a slightly different, equally
  valid, epsilon). Caveat: dp_accounting 0.6.0 evaluates *fractional* orders with a series of
  absolute values (an upper bound) and drops orders whose series does not converge in 1000
  terms, so where the optimal order is fractional and near 1 (large epsilon, q >= 0.2, little
  noise) it reports a larger epsilon than Opacus' exact value; at integer orders the two agree
  to ~1e-13 (see tests/test_accounting_crosscheck.py);
- ``method="pld"``: ``dp_accounting.pld.PLDAccountant`` (privacy loss distributions, the
  numerical-composition counterpart of Opacus' PRV accountant). It returns its pessimistic
  estimate, while Opacus' PRV returns its estimate plus ``eps_error`` (0.01 absolute), so the
  two differ by about 0.01.

Each history entry ``(noise_multiplier, sample_rate, steps)`` becomes
``SelfComposedDpEvent(PoissonSampledDpEvent(sample_rate, GaussianDpEvent(noise_multiplier)), steps)``
and the entries are composed with ``ComposedDpEvent``, under add-or-remove-one neighbouring
(Opacus' relation).
"""

from __future__ import annotations

from functools import lru_cache

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant

from storefed.privacy.accounting import HistoryEntry

METHODS = ("rdp", "pld")


def dp_event_of(history: list[HistoryEntry]) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event for a whole Opacus-style history."""
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(float(q), dp_accounting.GaussianDpEvent(float(sigma))),
                int(steps),
            )
            for sigma, q, steps in history
        ]
    )


def dp_accounting_epsilon(
    history: list[HistoryEntry], delta: float, method: str, pld_discretization: float = 1e-4
) -> float:
    """Epsilon of ``history`` at ``delta`` by ``dp_accounting`` (cross-check only; 0.0 if empty)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown: choose one of {METHODS}")
    if not history:
        return 0.0
    key = tuple((float(s), float(q), int(n)) for s, q, n in history)
    return float(_composed(key, method, pld_discretization).get_epsilon(delta))


@lru_cache(maxsize=64)
def _composed(history: tuple[HistoryEntry, ...], method: str, pld_discretization: float):
    """The composed accountant (cached: querying several deltas composes only once)."""
    if method == "rdp":
        accountant = RdpAccountant(orders=list(RDPAccountant.DEFAULT_ALPHAS))
    else:
        accountant = PLDAccountant(value_discretization_interval=pld_discretization)
    accountant.compose(dp_event_of(list(history)))
    return accountant
