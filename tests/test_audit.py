"""The one-run canary audit: the bound's statistics, an end-to-end DP vs non-private audit, refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import optimize, special, stats

from storefed.cli import main
from storefed.privacy.audit import audit_bound, epsilon_lower_bound, guess_by_score, p_value, split_guesses


# -- the bound ----------------------------------------------------------------------------------
def _all_correct_bound_by_hand(r: int, level: float = 0.05) -> float:
    """delta = 0, v = r: solve P[Binomial(r, q) >= r] = level for q = e^eps/(e^eps+1)."""
    return optimize.brentq(lambda e: stats.binom.sf(r - 1, r, special.expit(e)) - level, 0.0, 30.0, xtol=1e-9)


@pytest.mark.parametrize("r", [10, 50, 100, 400])
def test_all_correct_bound_matches_the_binomial_tail(r):
    by_hand = _all_correct_bound_by_hand(r)
    assert by_hand == pytest.approx(math.log(0.05 ** (1 / r) / (1 - 0.05 ** (1 / r))), abs=1e-6)  # closed form
    assert epsilon_lower_bound(1000, r, r, delta=0.0) == pytest.approx(by_hand, abs=2e-4)


def test_bound_grows_with_the_number_of_all_correct_guesses():
    bounds = [epsilon_lower_bound(1000, r, r, delta=0.0) for r in (5, 10, 20, 50, 100, 200, 1000)]
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert bounds[0] == pytest.approx(math.log(0.05 ** 0.2 / (1 - 0.05 ** 0.2)), abs=2e-4)  # 5/5: ~0.22


def test_chance_level_guessing_shows_nothing():
    for v in (40, 50, 55):  # P[Binomial(100, 1/2) >= 55] = 0.18 > 0.05
        assert epsilon_lower_bound(1000, 100, v, delta=0.0) == 0.0
        assert epsilon_lower_bound(1000, 100, v, delta=1e-5) == 0.0
    assert epsilon_lower_bound(1000, 100, 59, delta=0.0) > 0.0  # P[B(100, 1/2) >= 59] = 0.044 < 0.05


def test_bound_is_monotone_in_correct_guesses_and_delta_lowers_it():
    for delta in (0.0, 1e-5, 1e-3):
        bounds = [epsilon_lower_bound(1000, 100, v, delta) for v in range(40, 101)]
        assert all(a <= b + 1e-9 for a, b in zip(bounds, bounds[1:]))
    for v in (70, 90, 100):
        without = epsilon_lower_bound(1000, 100, v, 0.0)
        assert epsilon_lower_bound(1000, 100, v, 1e-5) < without
        assert epsilon_lower_bound(1000, 100, v, 1e-3) < epsilon_lower_bound(1000, 100, v, 1e-5)


def test_delta_term_matches_the_theorem_computed_independently():
    m, r, v, eps, delta = 500, 80, 60, 0.7, 1e-4
    q = math.exp(eps) / (math.exp(eps) + 1)
    worst = max((stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - i - 1, r, q)) / i for i in range(1, v + 1))
    expected = stats.binom.sf(v - 1, r, q) + 2 * m * delta * worst
    assert p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9)
    assert p_value(m, r, v, eps, 0.0) == pytest.approx(stats.binom.sf(v - 1, r, q), rel=1e-12)


def test_reported_bound_is_rejected_and_tight():
    for m, r, v, delta in [(1000, 100, 82, 1e-5), (1000, 400, 291, 1e-5), (200, 200, 200, 1e-4)]:
        eps = epsilon_lower_bound(m, r, v, delta)
        assert p_value(m, r, v, eps, delta) < 0.05 <= p_value(m, r, v, eps + 2e-3, delta)


def test_bound_is_valid_for_an_eps_dp_mechanism():
    """Randomized response on every canary is exactly eps-DP: the 95% bound exceeds eps in <~5% of runs."""
    rng = np.random.default_rng(1)
    eps, m, trials = 1.0, 200, 300
    exceed = 0
    for _ in range(trials):
        correct = int((rng.random(m) < special.expit(eps)).sum())
        exceed += epsilon_lower_bound(m, m, correct, 0.0) > eps
    assert exceed / trials < 0.1  # expected about 0.05; a bound that ignored the tail would exceed ~50%


def test_guesses_take_the_extremes_of_the_scores():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    g = guess_by_score(scores, included, k_in=2, k_out=2)
    assert (g.correct_in, g.correct_out, g.correct, g.guesses) == (1, 1, 2, 4)
    assert (g.threshold_in, g.threshold_out) == (4.0, 1.0)
    assert split_guesses(7) == (4, 3)
    with pytest.raises(ValueError, match="at most 6 canaries"):
        guess_by_score(scores, included, 4, 3)


def test_several_guess_counts_pay_for_multiple_testing():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    scores = included + rng.normal(scale=0.8, size=1000)  # a leaky run
    one = audit_bound(scores, included, [200], delta=1e-5)
    many = audit_bound(scores, included, [50, 100, 200, 500], delta=1e-5)
    assert many.level_per_test == pytest.approx(0.05 / 4)
    best = many.best
    assert many.epsilon_lower == pytest.approx(epsilon_lower_bound(1000, best.guesses, best.correct, 1e-5, 0.05 / 4))
    assert one.epsilon_lower > epsilon_lower_bound(1000, 200, one.best.correct, 1e-5, 0.05 / 4)
    assert many.epsilon_lower == max(e for _, e in many.tested)


# -- end to end: one DP run and one non-private run ---------------------------------------------
TARGET_EPS = 2.0
SMALL = ["audit.stores=2", "audit.canaries=1000", "task.epochs=10", "device=cpu"]


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    out = {}
    for name, privacy in (("dp", [f"privacy.epsilon={TARGET_EPS}"]), ("none", ["privacy=none"]),
                          ("distributed", [f"privacy.epsilon={TARGET_EPS}", "privacy.mode=distributed"])):
        run_dir = tmp_path_factory.mktemp(f"audit-{name}")
        assert main(["audit", *SMALL, *privacy, f"run_dir={run_dir}"]) == 0
        out[name] = json.loads((run_dir / "audit.json").read_text(encoding="utf-8"))
    return out


def test_dp_run_bound_stays_below_the_theoretical_epsilon(audits):
    dp = audits["dp"]
    theory, emp = dp["theoretical"], dp["empirical"]
    assert theory["private"] is True and dp["unit"] == "customer"
    assert 1.8 < theory["epsilon"] <= TARGET_EPS  # noise planned for the target
    assert (theory["delta"], theory["accountant"], theory["sampling"]) == (1e-5, "rdp", "Poisson")
    assert theory["noise_multiplier"] > 0 and 0 < theory["sample_rate"] <= 1 and theory["steps"] >= 10
    # the test could fail: with these guess counts, perfect guessing would prove more than the target
    m, level = emp["canaries"], 0.05 / len(emp["guess_counts_tried"])
    assert max(epsilon_lower_bound(m, r, r, emp["delta"], level) for r in emp["guess_counts_tried"]) > TARGET_EPS + 1
    assert 0.0 <= emp["epsilon_lower_bound"] < theory["epsilon"]
    assert emp["epsilon_lower_bound"] == pytest.approx(
        epsilon_lower_bound(m, emp["guesses"], emp["correct"], emp["delta"], level)
    )


def test_distributed_mode_audit_stays_below_its_population_level_epsilon(audits):
    """The distributed mechanism (integer Skellam shares of 2 merchants, one step per round) audited the
    same way; without noise (privacy=none) the same canaries leak measurably (next test)."""
    run = audits["distributed"]
    theory, emp = run["theoretical"], run["empirical"]
    assert theory["mode"] == "distributed" and "Skellam RDP" in theory["guarantee"]
    assert "population-level" in theory["guarantee"] and "2 noise shares" in theory["guarantee"]
    assert 1.8 < theory["epsilon"] <= TARGET_EPS and theory["steps"] >= 10
    assert 0.0 <= emp["epsilon_lower_bound"] < theory["epsilon"]
    assert audits["none"]["empirical"]["epsilon_lower_bound"] > emp["epsilon_lower_bound"] + 1.5


def test_non_private_run_leaks_measurably_more(audits):
    dp, none = audits["dp"]["empirical"], audits["none"]["empirical"]
    assert audits["none"]["theoretical"]["epsilon"] is None
    assert "NONE" in audits["none"]["theoretical"]["guarantee"]
    assert none["correct"] >= 0.95 * none["guesses"]  # random canaries are memorised without DP
    assert none["epsilon_lower_bound"] > TARGET_EPS  # would refute the DP run's guarantee
    assert none["epsilon_lower_bound"] > dp["epsilon_lower_bound"] + 1.5


def test_audit_json_reports_what_was_tested(audits):
    for record in audits.values():
        e = record["empirical"]
        assert e["canaries"] == 1000 and 400 < e["canaries_included"] < 600
        assert e["guesses"] == e["guesses_in"] + e["guesses_out"] <= e["canaries"]
        assert e["correct"] == e["correct_in"] + e["correct_out"] <= e["guesses"]
        assert e["threshold_in"] >= e["threshold_out"] and e["confidence"] == 0.95 and e["delta"] == 1e-5
        assert e["loss_threshold_in"] == -e["threshold_in"] <= e["loss_threshold_out"] == -e["threshold_out"]
        assert "never prove privacy" in record["statement"] and "expected" in record["statement"]
        assert record["unit"] == "customer"


def test_report_is_printed(tmp_path, capsys):
    args = ["audit.stores=1", "audit.canaries=100", "audit.guesses=[20,100]", "task.epochs=2", "device=cpu"]
    assert main(["audit", *args, "privacy=none", f"run_dir={tmp_path}"]) == 0
    text = capsys.readouterr().out
    assert "theoretical eps : none: privacy=none carries no guarantee" in text
    assert "empirical eps   : >= " in text and "m=100 " in text and "never prove privacy" in text
    assert (tmp_path / "audit.json").exists() and not list(tmp_path.glob(".*.tmp"))


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["audit.canaries=1"], "audit.canaries=1 is not allowed: must be an integer >= 2"),
        (["audit.canaries=100", "audit.guesses=[50,200]"], "audit.guesses=200 is not allowed: each guess count must lie in 1..audit.canaries=100"),
        (["audit.guesses=[0]"], "audit.guesses=0 is not allowed"),
        (["privacy.epsilon=0"], "privacy.epsilon=0"),
        (["privacy.epsilon=-1"], "must be a finite number > 0"),
        (["privacy.delta=0.5", "audit.stores=0", "audit.canaries=20", "audit.guesses=[10]"], "set privacy.delta below"),
        (["task=review"], "use task=recommender"),
        (["audit.confidence=1.5"], "audit.confidence=1.5 is not allowed: must lie strictly between 0 and 1"),
        (["audit.canary_length=1"], "audit.canary_length=1 is not allowed: must be an integer >= 2"),
        (["audit.no_such_key=1"], "no_such_key"),
        (["audit.delta=abc"], "audit.delta=abc"),
        (["privacy.grad_sample_mode=magic"], "privacy.grad_sample_mode='magic' is not allowed: choose one of"),
    ],
)
def test_bad_configuration_is_refused_with_one_clear_line(overrides, message, tmp_path, capsys):
    assert main(["audit", *overrides, f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("storefed audit: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "audit.json").exists()


def test_storefed_command_dispatches_to_the_audit(tmp_path, capsys):

    assert main(["audit", "audit.canaries=1", f"run_dir={tmp_path}"]) == 2
    assert "audit.canaries=1" in capsys.readouterr().err
