"""Epsilon from the ledger equals an independently stepped Opacus accountant; planning fits budgets."""

from __future__ import annotations

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from storefed.privacy.accounting import epsilon_of, plan_noise_multiplier

HISTORIES = [
    [(1.1, 0.5, 4)],
    [(0.9, 0.2, 10), (1.4, 0.05, 40)],
    [(2.0, 1.0, 3), (2.0, 1.0, 3), (0.8, 0.1, 25)],
]


def _stepped(accountant, history):
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_rdp_epsilon_matches_stepped_opacus_accountant(history, delta):
    expected = _stepped(RDPAccountant(), history).get_epsilon(delta=delta)
    assert epsilon_of(history, delta, "rdp") == pytest.approx(expected, rel=1e-9)


def test_prv_epsilon_matches_stepped_opacus_accountant():
    history = HISTORIES[1]
    expected = _stepped(PRVAccountant(), history).get_epsilon(delta=1e-5)
    assert epsilon_of(history, 1e-5, "prv") == pytest.approx(expected, rel=1e-6)


def test_empty_history_is_zero_and_unknown_accountant_is_refused():
    assert epsilon_of([], 1e-5) == 0.0
    with pytest.raises(ValueError, match="privacy.accountant='gdp' is unknown"):
        epsilon_of([(1.0, 0.1, 1)], 1e-5, "gdp")


@pytest.mark.parametrize("spent", [[], [(1.2, 0.25, 8)]])
def test_planned_noise_fits_budget_and_is_the_smallest_on_its_grid(spent):
    sigma = plan_noise_multiplier(spent, sample_rate=0.25, steps_per_round=8, rounds_left=3, epsilon_budget=8.0, delta=1e-5)
    planned = spent + [(sigma, 0.25, 24)]
    assert epsilon_of(planned, 1e-5) <= 8.0
    smaller = spent + [(sigma / 1.01, 0.25, 24)]
    assert epsilon_of(smaller, 1e-5) > 8.0


def test_planning_refuses_when_budget_already_spent():
    with pytest.raises(ValueError, match="already spent"):
        plan_noise_multiplier([(0.5, 1.0, 50)], 0.5, 4, 1, epsilon_budget=1.0, delta=1e-5)
