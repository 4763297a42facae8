"""The distributed Skellam mechanism on integers: encoding, noise shares and its privacy accounting.

Mechanism (Agarwal, Kairouz & Liu, NeurIPS 2021, "The Skellam mechanism for differentially private
federated learning"), for one round = one DP-SGD step over the union of the merchants' units:

1. every merchant sums its Poisson-sampled units' gradients, each clipped to L2 norm ``C`` (Opacus);
2. it scales the sum by ``gamma`` and rounds each coordinate to the nearest integer;
3. it adds its share of Skellam noise, ``Sk(mu / n_min)`` per coordinate (a Skellam(a, a) variable is
   Poisson(a) - Poisson(a), variance 2a), where ``n_min`` merchants must survive the round;
4. secure aggregation sums the integer vectors; the sum of ``n >= n_min`` shares is ``Sk(n mu / n_min)``
   (Skellam is closed under addition), i.e. at least the full ``Sk(mu)`` noise.

Sensitivity of the integer sum to adding or removing one unit (which lives at one merchant): rounding
moves each coordinate by less than 1/2 on either side, so
``Delta_2 <= gamma C + sqrt(d)`` and ``Delta_1 <= sqrt(d) gamma C + d`` (d = number of coordinates).
``mu`` is chosen so that the noise standard deviation is ``sigma * Delta_2``: ``2 mu = (sigma Delta_2)^2``.

Accounting: the Skellam RDP bound (ibid., Theorem 3.5, variance 2 mu),
``eps(a) <= a D2^2 / (4 mu) + min(((2a - 1) D2^2 + 6 D1) / (16 mu^2), 3 D1 / (4 mu))``,
amplified by Poisson subsampling at the per-unit rate ``q`` (Steinke 2022, arXiv:2210.00597: the
binomial expansion over integer orders, valid for any mechanism under add/remove-one neighbours),
converted to (epsilon, delta) with Opacus' RDP conversion.
Hand-written because neither Opacus nor dp-accounting implements the Skellam mechanism.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

ORDERS = tuple(range(2, 257))


@dataclass(frozen=True)
class SkellamPlan:
    """Public parameters of one distributed round (the same at every merchant)."""

    dim: int  # d: coordinates of the flattened update
    clip: float  # C: per-unit L2 clipping norm (model units)
    noise_multiplier: float  # sigma: total noise std is sigma * Delta_2 (integer units)
    gamma: float  # integer units per model unit
    min_survivors: int  # n_min: merchants whose shares must reach the sum

    @property
    def delta2(self) -> float:
        return self.gamma * self.clip + math.sqrt(self.dim)

    @property
    def delta1(self) -> float:
        return math.sqrt(self.dim) * self.gamma * self.clip + self.dim

    @property
    def mu(self) -> float:
        """Total Skellam parameter (per side) of the aggregate with ``min_survivors`` shares."""
        return (self.noise_multiplier * self.delta2) ** 2 / 2

    @property
    def share_mu(self) -> float:
        """Each merchant's share: Sk(share_mu), variance 2 share_mu."""
        return self.mu / self.min_survivors

    def bound(self, units: int, sigmas: float = 12.0) -> int:
        """Max |coordinate| of one merchant's message (``units`` sampled units), except with
        probability below ``tail_probability(sigmas)`` for its noise."""
        return int(math.ceil(self.gamma * self.clip * units + 0.5 + sigmas * math.sqrt(2 * self.share_mu)))


def tail_probability(sigmas: float) -> float:
    """P(|Skellam share| > sigmas * its std) <= 2 exp(-sigmas^2 / 3) for sigmas <= 3 sqrt(mu) (Bernstein)."""
    return 2 * math.exp(-sigmas**2 / 3)


def choose_gamma(dim: int, clip: float, rounding_overhead: float = 0.01) -> float:
    """Scale at which rounding inflates the sensitivity by ``rounding_overhead``: gamma C = sqrt(d) / overhead."""
    return math.sqrt(dim) / (rounding_overhead * clip)


def encode(
    clipped_sum: np.ndarray, plan: SkellamPlan, rng: np.random.Generator, signal_bound: int | None = None
) -> np.ndarray:
    """One merchant's message: round(gamma * sum), clipped to +-``signal_bound`` per coordinate (1-Lipschitz:
    the sensitivities above still hold), plus its Skellam share, as int64."""
    scaled = np.rint(plan.gamma * np.asarray(clipped_sum, dtype=np.float64)).astype(np.int64)
    if signal_bound is not None:
        scaled = np.clip(scaled, -signal_bound, signal_bound)
    return scaled + skellam(plan.share_mu, scaled.shape, rng)


def noise_bound(plan: SkellamPlan, sigmas: float = 12.0) -> int:
    """|share| stays below this except with probability <= tail_probability(sigmas) per coordinate."""
    return int(math.ceil(sigmas * math.sqrt(2 * plan.share_mu)))


def skellam(mu: float, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Skellam(mu, mu) noise (Poisson(mu) - Poisson(mu)), int64, variance 2 mu."""
    return rng.poisson(mu, shape).astype(np.int64) - rng.poisson(mu, shape).astype(np.int64)


def decode(integer_sum: np.ndarray, plan: SkellamPlan) -> np.ndarray:
    """The noisy sum of clipped unit gradients in model units (divide by the expected batch next)."""
    return np.asarray(integer_sum, dtype=np.float64) / plan.gamma


# --- accounting -----------------------------------------------------------------------------------
def skellam_rdp(order: float, mu: float, delta1: float, delta2: float) -> float:
    """RDP of the Skellam mechanism Sk(mu) (variance 2 mu) at ``order`` (Agarwal et al. 2021, Thm 3.5)."""
    a = order
    return a * delta2**2 / (4 * mu) + min(((2 * a - 1) * delta2**2 + 6 * delta1) / (16 * mu**2), 3 * delta1 / (4 * mu))


def subsampled_rdp(order: int, q: float, rdp_of) -> float:
    """RDP at integer ``order`` of a mechanism with RDP ``rdp_of``, each unit Poisson-sampled at rate ``q``
    (add/remove-one neighbours): ``log(sum_k C(a,k) (1-q)^(a-k) q^k exp((k-1) eps(k))) / (a-1)``
    (Steinke 2022, arXiv:2210.00597, amplification by Poisson subsampling; for the Gaussian it is the
    exact value Opacus computes)."""
    a = order
    if q == 1.0:
        return rdp_of(a)
    terms = [(a - 1) * math.log1p(-q) + math.log1p((a - 1) * q)]  # k = 0 and k = 1 together
    for k in range(2, a + 1):
        terms.append(math.log(math.comb(a, k)) + k * math.log(q) + (a - k) * math.log1p(-q) + (k - 1) * rdp_of(k))
    top = max(terms)
    return (top + math.log(sum(math.exp(t - top) for t in terms))) / (a - 1)


@lru_cache(maxsize=1024)
def rdp_curve(plan: SkellamPlan, q: float, orders: tuple[int, ...] = ORDERS) -> np.ndarray:
    """Per-round RDP at each order for the aggregate of ``min_survivors`` shares, units sampled at ``q``."""
    mu, d1, d2 = plan.mu, plan.delta1, plan.delta2
    return np.array([subsampled_rdp(a, q, lambda b: skellam_rdp(b, mu, d1, d2)) for a in orders])


def share_only(plan: SkellamPlan) -> SkellamPlan:
    """The same round seen through one merchant's share alone (secure aggregation broken): Sk(mu / n_min)."""
    return dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier / math.sqrt(plan.min_survivors),
                               min_survivors=1)


def epsilon(
    rounds: list[tuple[SkellamPlan, float, int]],
    delta: float,
    gaussian: list[tuple[float, float, int]] = (),
    orders: tuple[int, ...] = ORDERS,
) -> float:
    """(epsilon, delta) after composing Skellam ``(plan, q, steps)`` rounds and Poisson-subsampled Gaussian
    ``(noise_multiplier, q, steps)`` steps (local DP-SGD), RDP added per order, Opacus' conversion."""
    if not rounds and not gaussian:
        return 0.0
    return epsilon_of_rdp(rdp_total(rounds, gaussian, orders), delta, orders)


def rdp_total(
    rounds: list[tuple[SkellamPlan, float, int]], gaussian: list[tuple[float, float, int]] = (),
    orders: tuple[int, ...] = ORDERS,
) -> np.ndarray:
    """The composed RDP curve (per order) of Skellam rounds and Poisson-subsampled Gaussian steps."""
    total = np.zeros(len(orders))
    for plan, q, steps in rounds:
        total += steps * rdp_curve(plan, float(q), orders)
    for sigma, q, steps in gaussian:
        total += steps * _gaussian_curve(float(q), float(sigma), orders)
    return total


def epsilon_of_rdp(total: np.ndarray, delta: float, orders: tuple[int, ...] = ORDERS) -> float:
    """(epsilon, delta) of a composed RDP curve, Opacus' conversion."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=list(orders), rdp=total, delta=delta)
    return float(eps)


@lru_cache(maxsize=4096)
def _gaussian_curve(q: float, sigma: float, orders: tuple[int, ...]) -> np.ndarray:
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)))


def plan_noise(
    budget: float, delta: float, q: float, rounds: int, dim: int, clip: float, noise_shares: int,
    rounding_overhead: float = 0.01, spent: list[tuple[SkellamPlan, float, int]] = (),
) -> SkellamPlan:
    """The plan with the smallest noise multiplier (1%-spaced grid) such that ``rounds`` more rounds fit."""
    gamma = choose_gamma(dim, clip, rounding_overhead)

    def plan(k: int) -> SkellamPlan:
        return SkellamPlan(dim, clip, round(0.3 * 1.01**k, 6), gamma, noise_shares)

    def fits(k: int) -> bool:
        return epsilon(list(spent) + [(plan(k), q, rounds)], delta) <= budget

    low, high = 0, 749
    if not fits(high):
        raise ValueError(f"no noise multiplier fits {rounds} distributed round(s) into epsilon {budget:g}")
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return plan(low)
