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


@pytest.mark.parametrize("sample_rate, steps, rounds, budget, spent", [
    (1.0, 10, 2, 5.32, []), (0.5, 20, 2, 5.32, []), (0.2, 10, 3, 8.0, [(1.2, 0.2, 10)]), (0.05, 40, 1, 1.0, []),
    (0.25, 8, 3, 3.0, [(2.0, 0.25, 8)]), (1 / 3, 30, 2, 0.5, []),
])
def test_planning_through_the_integer_orders_gives_the_same_noise_as_a_search_over_all_orders(
    sample_rate, steps, rounds, budget, spent
):
    from storefed.privacy.accounting import _noise_grid

    def fits(k: int) -> bool:  # the reference: bisection over the grid with all of Opacus' orders
        return epsilon_of(spent + [(_noise_grid(k), sample_rate, steps * rounds)], 1e-5) <= budget

    low, high = 0, 749
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    planned = plan_noise_multiplier(spent, sample_rate, steps, rounds, budget, 1e-5)
    assert planned == _noise_grid(low)
    assert epsilon_of(spent + [(planned, sample_rate, steps * rounds)], 1e-5) <= budget


def _opacus_epsilon(noise: float, q: float, steps: int) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=noise, sample_rate=q)
    return acc.get_epsilon(delta=1e-5)


def test_rdp_curves_are_kept_on_disk_exactly_and_a_damaged_file_is_recomputed(tmp_path, monkeypatch):
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    from storefed.privacy import accounting

    monkeypatch.setenv("STOREFED_CACHE", str(tmp_path))
    accounting._planning_rdp_one_step.cache_clear()
    expected = np.asarray(compute_rdp(q=0.3, noise_multiplier=1.7, steps=1, orders=list(RDPAccountant.DEFAULT_ALPHAS)))
    assert np.array_equal(accounting._planning_rdp_one_step(0.3, 1.7), expected)
    (stored,) = (tmp_path / "rdp").glob("*.npy")
    assert "-0.3-1.7.npy" in stored.name and np.array_equal(np.load(stored), expected)
    stored.write_bytes(b"not an array")  # damaged: recomputed and rewritten
    accounting._planning_rdp_one_step.cache_clear()
    assert np.array_equal(accounting._planning_rdp_one_step(0.3, 1.7), expected)
    assert np.array_equal(np.load(stored), expected)
    np.save(stored, expected / 100)  # a wrong curve can only mis-plan: the ledger's epsilon never reads the disk
    accounting._planning_rdp_one_step.cache_clear()
    accounting._rdp_one_step.cache_clear()
    assert accounting.epsilon_of([(1.7, 0.3, 5)], 1e-5) == pytest.approx(
        _opacus_epsilon(1.7, 0.3, 5), rel=1e-9)
    accounting._planning_rdp_one_step.cache_clear()
