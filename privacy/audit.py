"""Statistics of the one-run canary audit (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with
One (1) Training Run", NeurIPS 2023): from membership guesses to an empirical lower bound on epsilon.

Setting: ``m`` canaries, each included in the training data independently with probability 1/2.
After one training run the auditor guesses "in" for some canaries, "out" for others and abstains
on the rest; ``r`` guesses are made and ``v`` of them are correct.

Null hypothesis H0(eps, delta): training is (eps, delta)-DP with respect to adding or removing
one canary. The paper's main theorem (Theorem 5.2, with its delta term; the p-value computed as
in the paper's Appendix D) bounds, under H0,

    P[correct >= v] <= P[Binomial(r, q) >= v] + 2 m delta * max_{1<=i<=v} P[v-i <= Binomial(r, q) < v] / i,
    q = e^eps / (e^eps + 1).

The reported lower bound is the largest eps (to ``EPS_TOL``) whose p-value is below the test level
``1 - confidence``: the training run is then *not* (eps, delta)-DP for that eps (nor any smaller
one), with the stated confidence. Validity does not rely on the p-value being monotone in eps:
the returned value is always one whose p-value was checked to be below the level.

Several guess counts may be tried on the same run; each is then tested at level
``(1 - confidence) / (number of counts)`` (Bonferroni), so the best of them keeps the stated
confidence. A bound of 0 means "no leakage shown", never "private".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

EPS_TOL = 1e-4  # bisection resolution of the reported lower bound (nats)
EPS_SEARCH_MAX = 50.0  # beyond this, q = e^eps/(e^eps+1) is 1 in double precision


def _check_counts(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[>= v correct among r guesses] for an (epsilon, delta)-DP run with m canaries."""
    _check_counts(m, r, v)
    if epsilon < 0 or not (0.0 <= delta <= 1.0):
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got epsilon={epsilon}, delta={delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of eps-DP randomized response on one bit
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0.0 or v == 0:
        return min(tail, 1.0)
    # max_i P[v-i <= Binomial < v] / i, from the cumulative pmf below v
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))  # entry i-1: P[v-i <= B < v]
    worst = float(np.max(below / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * worst, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, level: float = 0.05) -> float:
    """Largest eps (to ``EPS_TOL``) with ``p_value(m, r, v, eps, delta) < level``; 0.0 if even eps=0 is not rejected."""
    _check_counts(m, r, v)
    if not (0.0 < level < 1.0):
        raise ValueError(f"test level must be in (0, 1), got {level}")
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, EPS_SEARCH_MAX  # invariant: p_value(low) < level
    if p_value(m, r, v, high, delta) < level:
        return high
    while high - low > EPS_TOL:
        mid = 0.5 * (low + high)
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < level else (low, mid)
    return low


@dataclass(frozen=True)
class Guesses:
    """The auditor's guesses for one (k_in, k_out): top-``k_in`` scores "in", bottom-``k_out`` "out"."""

    k_in: int
    k_out: int
    correct_in: int
    correct_out: int
    threshold_in: float  # lowest score guessed "in" (scores >= this are guessed in); nan if k_in = 0
    threshold_out: float  # highest score guessed "out" (scores <= this are guessed out); nan if k_out = 0

    @property
    def guesses(self) -> int:
        return self.k_in + self.k_out

    @property
    def correct(self) -> int:
        return self.correct_in + self.correct_out


def guess_by_score(scores: np.ndarray, included: np.ndarray, k_in: int, k_out: int) -> Guesses:
    """Guess "in" for the ``k_in`` highest scores, "out" for the ``k_out`` lowest, abstain on the rest.

    Ties are broken by canary index (a stable sort), which is independent of the inclusion bits.
    """
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError("scores and included must be 1-D arrays of the same length")
    if k_in < 0 or k_out < 0 or k_in + k_out > len(scores):
        raise ValueError(f"k_in={k_in} + k_out={k_out} guesses must be >= 0 and at most {len(scores)} canaries")
    order = np.argsort(-scores, kind="stable")  # highest score first
    top, bottom = order[:k_in], order[len(order) - k_out :]
    return Guesses(
        k_in=k_in,
        k_out=k_out,
        correct_in=int(included[top].sum()),
        correct_out=int((~included[bottom]).sum()),
        threshold_in=float(scores[top].min()) if k_in else math.nan,
        threshold_out=float(scores[bottom].max()) if k_out else math.nan,
    )


def split_guesses(r: int) -> tuple[int, int]:
    """``r`` guesses as (k_in, k_out): half "in", half "out" (the extra one, if r is odd, "in")."""
    return r - r // 2, r // 2


@dataclass(frozen=True)
class AuditBound:
    """The reported empirical lower bound and what it was computed from."""

    epsilon_lower: float
    confidence: float
    delta: float
    canaries: int
    best: Guesses
    tested: tuple[tuple[Guesses, float], ...]  # every guess count tried, with its bound
    level_per_test: float  # (1 - confidence) / len(tested): Bonferroni over the guess counts


def audit_bound(
    scores: np.ndarray, included: np.ndarray, guess_counts: list[int], delta: float, confidence: float = 0.95
) -> AuditBound:
    """Best lower bound over ``guess_counts`` (each r split by :func:`split_guesses`), Bonferroni-corrected.

    Guarantee: if training was (eps, delta)-DP per canary, the probability that the returned
    ``epsilon_lower`` exceeds eps is at most ``1 - confidence`` (over the canaries' inclusion bits
    and the training randomness), for every eps at once.
    """
    if not guess_counts:
        raise ValueError("need at least one guess count")
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    m = len(scores)
    level = (1.0 - confidence) / len(guess_counts)
    tested = []
    for r in guess_counts:
        g = guess_by_score(scores, included, *split_guesses(int(r)))
        tested.append((g, epsilon_lower_bound(m, g.guesses, g.correct, delta, level)))
    best_guess, best_eps = max(tested, key=lambda t: t[1])
    return AuditBound(best_eps, confidence, delta, m, best_guess, tuple(tested), level)
