"""Split customers among simulated merchants (IID or Dirichlet label skew), seeded."""

from __future__ import annotations

import numpy as np

SCHEMES = ("iid", "dirichlet")
MAX_DIRICHLET_DRAWS = 100  # re-draws before giving up on the min_users constraint


def partition_users(
    user_keys: np.ndarray,
    num_merchants: int,
    scheme: str = "iid",
    alpha: float = 0.3,
    user_labels: np.ndarray | None = None,
    seed: int = 0,
    min_users: int = 1,
) -> list[np.ndarray]:
    """Return, for each merchant, the sorted int64 positions (into ``user_keys``) of its customers.

    ``iid`` shuffles the users and deals them into ``num_merchants`` near-equal groups.
    ``dirichlet`` spreads the users of each label class over the merchants with proportions
    drawn from Dirichlet(``alpha``) (small alpha = strong skew), re-drawing until every merchant
    has at least ``min_users`` customers. Every user lands at exactly one merchant.
    """
    num_users = int(np.asarray(user_keys).shape[0])
    _check_args(num_users, num_merchants, scheme, alpha, user_labels, min_users)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        perm = rng.permutation(num_users)
        return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_merchants)]
    labels = np.asarray(user_labels)
    for _ in range(MAX_DIRICHLET_DRAWS):
        owner = _dirichlet_owner(labels, num_merchants, alpha, rng)
        sizes = np.bincount(owner, minlength=num_merchants)
        if sizes.min() >= min_users:
            return _groups(owner, sizes)
    raise ValueError(
        f"partition_users: could not give every one of {num_merchants} merchants at least "
        f"{min_users} users in {MAX_DIRICHLET_DRAWS} Dirichlet draws (alpha={alpha}, "
        f"{num_users} users); use fewer merchants, a larger alpha or a smaller min_users"
    )


def _check_args(
    num_users: int,
    num_merchants: int,
    scheme: str,
    alpha: float,
    user_labels: np.ndarray | None,
    min_users: int,
) -> None:
    """Raise a ValueError describing the first invalid argument."""
    if num_merchants < 1:
        raise ValueError(f"partition_users: num_merchants must be >= 1, got {num_merchants}")
    if num_merchants > num_users:
        raise ValueError(
            f"partition_users: more merchants ({num_merchants}) than users ({num_users})"
        )
    if scheme not in SCHEMES:
        raise ValueError(
            f"partition_users: unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}"
        )
    if min_users < 0:
        raise ValueError(f"partition_users: min_users must be >= 0, got {min_users}")
    if scheme == "iid":
        return
    if not alpha > 0:
        raise ValueError(f"partition_users: alpha must be > 0, got {alpha}")
    if user_labels is None:
        raise ValueError("partition_users: scheme 'dirichlet' needs user_labels (one per user)")
    if len(user_labels) != num_users:
        raise ValueError(
            f"partition_users: user_labels has {len(user_labels)} entries for {num_users} users"
        )
    if min_users * num_merchants > num_users:
        raise ValueError(
            f"partition_users: {num_merchants} merchants x min_users={min_users} exceeds "
            f"{num_users} users"
        )


def _dirichlet_owner(
    labels: np.ndarray, num_merchants: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """One Dirichlet draw: the merchant index of every user."""
    _, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(-1)
    perm = rng.permutation(codes.shape[0])
    by_class = perm[np.argsort(codes[perm], kind="stable")]  # shuffled users, grouped by class
    bounds = np.cumsum(np.bincount(codes))[:-1]
    owner = np.empty(codes.shape[0], dtype=np.int64)
    for members in np.split(by_class, bounds):
        props = rng.dirichlet(np.full(num_merchants, float(alpha)))
        # multinomial counts, not floor(cumsum * n): flooring hands every user of a small
        # class to the last merchant
        counts = rng.multinomial(members.shape[0], props)
        for merchant, chunk in enumerate(np.split(members, np.cumsum(counts)[:-1])):
            owner[chunk] = merchant
    return owner


def _groups(owner: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Sorted user positions per merchant, from the per-user merchant index."""
    order = np.argsort(owner, kind="stable").astype(np.int64)
    return np.split(order, np.cumsum(sizes)[:-1])
