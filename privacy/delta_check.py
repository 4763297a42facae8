"""delta must lie below 1/n, n = the number of DP units at a merchant.

An (epsilon, delta) guarantee with delta >= 1/n is met by a mechanism that publishes one
randomly chosen unit's data outright, so StoreFed refuses such settings:

- at configuration time where n is known before training: every merchant of an imported data
  set in simulation (``storefed.simulations.checks``), and a merchant's own data at agent start-up
  (``check_merchant_delta``, with n bounded from above by its customer and review counts);
- at round time, exactly, by every merchant (client/training_round.py), for virtual stores too.
"""

from __future__ import annotations


def delta_problem(delta: float, num_units: int, unit: str, where: str) -> str | None:
    """Why ``delta`` is unusable for ``num_units`` DP units, or None when it is fine."""
    if not 0 < delta < 1:
        return f"privacy.delta={delta:g} must lie in (0, 1)"
    if num_units and delta >= 1.0 / num_units:
        return (
            f"privacy.delta={delta:g} is not below 1/n = 1/{num_units} {unit}s at {where}: a delta of 1/n or more "
            f"allows publishing one {unit}'s data outright; set privacy.delta below {1.0 / num_units:.2g}"
        )
    return None


def check_merchant_delta(delta: float | None, users: int, reviews: int) -> None:
    """A merchant's own delta against an upper bound on its units (customers; reviews)."""
    if delta is None:
        return
    for count, unit in ((users, "customer"), (reviews, "review")):
        problem = delta_problem(float(delta), count, unit, "this merchant (or fewer, once split for training)")
        if problem:
            raise ValueError(problem)
