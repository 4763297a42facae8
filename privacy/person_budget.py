"""One person, one budget: a customer's privacy loss across every task a merchant trains.

A customer who bought and reviewed is in the recommender's data (one customer unit) and in the review
model's (one reviewer unit, or k review units). Their loss is the composition of both tasks' mechanisms:

- **customer-level ledgers** (recommender: customer; review model with ``privacy.unit=user``: reviewer)
  compose exactly in RDP: their RDP curves (local Gaussian steps and distributed Skellam rounds) add up
  per order, then one conversion at ``delta`` (privacy/skellam.epsilon);
- a **review-level** ledger covers a customer with k reviews only through group privacy: its
  (eps_r, delta_r) becomes (k eps_r, k e^((k-1) eps_r) delta_r) for the group (Dwork & Roth, Thm 2.2
  generalised), composed with the customer-level part by adding epsilons and deltas; delta is split
  in half between the two parts. This is conservative; the reviewer unit is the tight choice.

``k`` is the largest number of training reviews of one customer the merchant has used, stored in the
review ledger (``group_size``). The merchant enforces ``privacy.person_epsilon``: a round of either task
whose composed per-customer epsilon would exceed it is refused.

``task_share`` is the default split of that one budget between the tasks that share it (``privacy.epsilon``
when unset): the per-task epsilon whose n-fold RDP composition reaches the person budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from storefed.privacy.ledger import PrivacyLedger, RoundRecord, other_ledgers, records_rdp
from storefed.privacy.skellam import ORDERS, epsilon_of_rdp

CUSTOMER_LEVEL_UNITS = ("customer", "reviewer")


@dataclass(frozen=True)
class PersonView:
    """The per-customer epsilon over a merchant's ledgers (one per task)."""

    epsilon: float
    delta: float
    per_task: dict[str, float]  # each task's own epsilon (its ledger's unit)
    method: str  # how the tasks were composed (printed next to the number)


def _rdp_epsilon(records: list[RoundRecord], delta: float) -> float:
    if not records:
        return 0.0
    curve, orders = records_rdp(records)
    return epsilon_of_rdp(curve, delta, orders)


def person_epsilon(ledgers: list[PrivacyLedger], delta: float, extra: dict[str, RoundRecord] | None = None,
                   group_size: int | None = None) -> PersonView:
    """Composed per-customer epsilon at ``delta`` over ``ledgers`` (+ one candidate round per task in ``extra``).
    ``group_size`` overrides the review ledgers' stored k (reviews of one customer)."""
    extra = extra or {}
    per_task, customer, review = {}, [], []
    for ledger in ledgers:
        records = ledger.rounds + ([extra[ledger.task]] if ledger.task in extra else [])
        per_task[ledger.task] = ledger.epsilon_spent if ledger.task not in extra else _rdp_epsilon(records, ledger.delta)
        (customer if ledger.unit in CUSTOMER_LEVEL_UNITS else review).append((ledger, records))
    customer_records = [r for _, records in customer for r in records]
    if not review:
        return PersonView(_rdp_epsilon(customer_records, delta), delta, per_task,
                          "RDP composition of customer-level ledgers")
    k = max(group_size or 0, max((led.group_size or 1) for led, _ in review))
    review_records = [r for _, records in review for r in records]
    eps_c = _rdp_epsilon(customer_records, delta / 2) if customer_records else 0.0
    eps_r = _group_epsilon(review_records, k, delta / 2)
    return PersonView(eps_c + eps_r, delta, per_task,
                      f"customer-level ledgers by RDP, review-level ledgers by group privacy for k={k} reviews, "
                      "combined by basic composition (delta split in half)")


def _group_epsilon(records: list[RoundRecord], k: int, delta: float) -> float:
    """k * eps_r(delta_r) with k e^((k-1) eps_r) delta_r = delta (bisection on log delta_r)."""
    if not records:
        return 0.0
    if k <= 1:
        return _rdp_epsilon(records, delta)
    curve, orders = records_rdp(records)  # composed once; only the conversion's delta changes below
    low, high = math.log(delta) - 200.0, math.log(delta / k)
    for _ in range(60):
        mid = (low + high) / 2
        eps_r = epsilon_of_rdp(curve, math.exp(mid), orders)
        if math.log(k) + (k - 1) * eps_r + mid <= math.log(delta):
            low = mid
        else:
            high = mid
    return k * epsilon_of_rdp(curve, math.exp(low), orders)


def person_refusal(
    ledger: PrivacyLedger, candidate: RoundRecord, person_budget: float, group_size: int | None = None,
) -> tuple[PersonView, str | None]:
    """The composed view if ``candidate`` (a round of ``ledger``'s task) were taken, and why it must be
    refused (None when it fits ``person_budget``)."""
    view = person_epsilon([ledger, *other_ledgers(ledger)], ledger.delta, {ledger.task: candidate}, group_size)
    if view.epsilon <= person_budget:
        return view, None
    tasks = ", ".join(f"{task} {eps:.3f}" for task, eps in sorted(view.per_task.items()))
    return view, (
        f"per-customer budget across tasks exhausted: this round would bring a customer's composed epsilon to "
        f"{view.epsilon:.3f} > privacy.person_epsilon={person_budget:g} (delta={view.delta:g}; {tasks}; "
        f"{view.method})"
    )


@lru_cache(maxsize=256)
def task_share(person_epsilon: float, num_tasks: int, delta: float) -> float:
    """Each task's epsilon (at ``delta``) when ``num_tasks`` tasks split one per-customer budget.

    Reference mechanism: a Gaussian with RDP curve alpha / (2 sigma^2), sigma chosen so that
    ``num_tasks`` copies composed in RDP and converted at ``delta`` give ``person_epsilon``; the share is one
    copy's epsilon at the same ``delta``. Larger than ``person_epsilon / num_tasks`` (basic composition):
    at 8 split in two, delta 1e-5: 5.4 per task. It only plans; the merchant still enforces the exact
    composition of the tasks' actual ledgers (``person_refusal``), so a task that spends differently
    than the reference can at worst have its last round refused, never exceed the person budget.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks={num_tasks}: at least one task shares the budget")
    if num_tasks == 1 or not math.isfinite(person_epsilon):
        return float(person_epsilon)
    alphas = np.asarray(ORDERS, dtype=float)

    def composed(log_sigma: float, copies: int) -> float:
        return epsilon_of_rdp(copies * alphas / (2.0 * math.exp(2.0 * log_sigma)), delta)

    low, high = -10.0, 10.0  # log sigma: composed epsilon decreases as sigma grows
    for _ in range(80):
        mid = (low + high) / 2
        low, high = (low, mid) if composed(mid, num_tasks) <= person_epsilon else (mid, high)
    return composed(high, 1)


def task_epsilon(privacy: Any) -> float:
    """The task's budget under a ``PrivacyConfig``: ``privacy.epsilon``, or when null its share of
    ``privacy.person_epsilon`` between ``privacy.person_tasks`` (``task_share``); inf without DP."""
    if not privacy.enabled:
        return math.inf
    if privacy.epsilon is not None:
        return float(privacy.epsilon)
    return task_share(float(privacy.person_epsilon), len(privacy.person_tasks), float(privacy.delta))
