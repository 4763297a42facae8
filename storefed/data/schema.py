"""In-memory form of one merchant's data, shared by loaders, importers and the generator.

Every source of merchant data (files on the merchant's disk, public-format importers,
the virtual-store generator) produces a :class:`MerchantData`. Items are indices into the
shared :class:`Catalog`; users are merchant-local indices ``0..num_users-1`` (the
merchant's own customer ids never leave the merchant).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Catalog:
    """The shared item catalog the coordinator publishes.

    ``item_ids[i]`` is the external id of catalog index ``i``; ``categories[i]`` its category.
    """

    item_ids: tuple[str, ...]
    categories: tuple[str, ...]
    titles: tuple[str, ...] = ()
    index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.categories) != len(self.item_ids):
            raise ValueError("Catalog: categories must have one entry per item")
        if not self.index:
            object.__setattr__(self, "index", {i: n for n, i in enumerate(self.item_ids)})
        if len(self.index) != len(self.item_ids):
            raise ValueError("Catalog: item ids must be unique")

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


@dataclass
class Interactions:
    """Implicit feedback: one row per (user, item, timestamp); rating is optional (0 = none)."""

    user: np.ndarray  # int64, merchant-local user index
    item: np.ndarray  # int64, catalog index
    timestamp: np.ndarray  # int64, unix seconds
    rating: np.ndarray | None = None  # float32 in [1, 5] or None

    def __len__(self) -> int:
        return int(self.user.shape[0])


@dataclass
class Reviews:
    """Written reviews: one row per review, rating 1..5."""

    user: np.ndarray  # int64, merchant-local user index
    item: np.ndarray  # int64, catalog index
    rating: np.ndarray  # int64 in 1..5
    text: list[str]
    timestamp: np.ndarray  # int64, unix seconds

    def __len__(self) -> int:
        return int(self.user.shape[0])


@dataclass
class MerchantData:
    """Everything one merchant trains on. Never leaves the merchant."""

    merchant_id: str
    num_users: int
    interactions: Interactions
    reviews: Reviews
    dropped_unknown_items: int = 0


def empty_interactions() -> Interactions:
    z = np.zeros(0, dtype=np.int64)
    return Interactions(user=z, item=z.copy(), timestamp=z.copy())


def empty_reviews() -> Reviews:
    z = np.zeros(0, dtype=np.int64)
    return Reviews(user=z, item=z.copy(), rating=z.copy(), text=[], timestamp=z.copy())
