"""Virtual-store generator: a synthetic catalog and merchants with a planted, learnable signal.

Guarantees:
- Deterministic per ``seed``: the catalog depends only on the seed, store ``k`` only on
  ``(seed, k)``. Any store can be generated on its own, when its client needs it, so
  10,000 stores cost no more memory than 100.
- Signal: every customer has a latent taste near one category centroid; the items they
  interact with are drawn by ``softmax(strength * taste . item + log popularity)``, so a
  history-based recommender can beat popularity. Review ratings follow the customer's
  affinity for the item and review wording carries the rating's sentiment, with noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from storefed.config.schema import GeneratorConfig
from storefed.data.schema import Catalog, Interactions, MerchantData, Reviews

POSITIVE_WORDS = (
    "great excellent love perfect amazing awesome fantastic wonderful solid happy "
    "recommend sturdy reliable beautiful impressed best superb works"
).split()
NEGATIVE_WORDS = (
    "terrible awful broke broken cheap disappointed waste poor useless refund "
    "worst flimsy returned defective annoying bad junk fails"
).split()
NEUTRAL_WORDS = (
    "the it this i a and was for with my on arrived package item bought use "
    "product price shipping box size color after week month came using"
).split()


@dataclass(unsafe_hash=True)
class StoreGeneratorConfig(GeneratorConfig):
    """The generator's settings (defaults in storefed.config.schema.GeneratorConfig) plus the world's seed.
    Hashable (stores are cached per config); treat it as read-only."""

    seed: int = 0


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


@dataclass(frozen=True)
class _World:
    catalog: Catalog
    item_category: np.ndarray  # (items,)
    item_vectors: np.ndarray  # (items, dim)
    log_popularity: np.ndarray  # (items,)
    centroids: np.ndarray  # (categories, dim)


@lru_cache(maxsize=4)
def _world(cfg: StoreGeneratorConfig) -> _World:
    rng = _rng(cfg.seed, 0)
    centroids = rng.normal(size=(cfg.num_categories, cfg.latent_dim))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    item_category = rng.integers(0, cfg.num_categories, size=cfg.num_items)
    vectors = centroids[item_category] + 0.5 * rng.normal(size=(cfg.num_items, cfg.latent_dim)) / np.sqrt(
        cfg.latent_dim
    )
    ranks = rng.permutation(cfg.num_items) + 1
    log_pop = -cfg.popularity_exponent * np.log(ranks)
    catalog = Catalog(
        item_ids=tuple(f"item-{i:05d}" for i in range(cfg.num_items)),
        categories=tuple(f"cat-{c:02d}" for c in item_category),
        titles=tuple(f"Product {i}" for i in range(cfg.num_items)),
    )
    return _World(catalog, item_category, vectors, log_pop, centroids)


def generate_catalog(cfg: StoreGeneratorConfig) -> Catalog:
    """The shared catalog of the virtual world (same for every store)."""
    return _world(cfg).catalog


def generate_store(cfg: StoreGeneratorConfig, store_id: int) -> MerchantData:
    """Generate virtual store ``store_id`` (deterministic in ``(cfg.seed, store_id)``)."""
    world = _world(cfg)
    rng = _rng(cfg.seed, 1, store_id)
    num_users = int(
        np.clip(
            rng.lognormal(np.log(cfg.mean_customers), cfg.sigma_customers), cfg.min_customers, cfg.max_customers
        )
    )
    mix = rng.dirichlet(np.full(cfg.num_categories, cfg.category_alpha))
    favourite = rng.choice(cfg.num_categories, size=num_users, p=mix)
    tastes = world.centroids[favourite] + 0.3 * rng.normal(size=(num_users, cfg.latent_dim)) / np.sqrt(
        cfg.latent_dim
    )
    store_bias = np.log(mix[world.item_category] + 1e-3)
    users, items, times = [], [], []
    r_users, r_items, r_ratings, r_texts, r_times = [], [], [], [], []
    t = cfg.start_time
    for u in range(num_users):
        n = min(cfg.num_items, 2 + rng.poisson(max(cfg.mean_interactions - 2, 0.0)))
        affinity = world.item_vectors @ tastes[u]
        logits = cfg.taste_strength * affinity + world.log_popularity + store_bias
        chosen = np.argsort(-(logits + rng.gumbel(size=cfg.num_items)))[:n]
        stamps = t + np.sort(rng.integers(0, 365 * 86400, size=n))
        users.extend([u] * n)
        items.extend(chosen.tolist())
        times.extend(stamps.tolist())
        for item, stamp in zip(chosen, stamps):
            if rng.random() < cfg.review_probability:
                rating = _rating(affinity[item], rng)
                r_users.append(u)
                r_items.append(int(item))
                r_ratings.append(rating)
                r_texts.append(_review_text(rating, int(world.item_category[item]), cfg.review_noise, rng))
                r_times.append(int(stamp) + 3600)
    return MerchantData(
        merchant_id=f"store-{store_id:05d}",
        num_users=num_users,
        interactions=Interactions(
            user=np.asarray(users, dtype=np.int64),
            item=np.asarray(items, dtype=np.int64),
            timestamp=np.asarray(times, dtype=np.int64),
        ),
        reviews=Reviews(
            user=np.asarray(r_users, dtype=np.int64),
            item=np.asarray(r_items, dtype=np.int64),
            rating=np.asarray(r_ratings, dtype=np.int64),
            text=r_texts,
            timestamp=np.asarray(r_times, dtype=np.int64),
        ),
    )


def _rating(affinity: float, rng: np.random.Generator) -> int:
    """Map affinity (mostly 0.3..1.3 for chosen items) plus noise to 1..5: about 70% are 4-5 stars."""
    score = affinity + 0.2 * rng.normal()
    return int(np.digitize(score, [0.6, 0.8, 0.92, 1.1]) + 1)


def _review_text(rating: int, category: int, noise: float, rng: np.random.Generator) -> str:
    positive = rating >= 4 if rating != 3 else rng.random() < 0.5
    if rng.random() < noise:
        positive = not positive
    lexicon = POSITIVE_WORDS if positive else NEGATIVE_WORDS
    n_sentiment = 1 if rating in (2, 3, 4) else 2
    words = list(rng.choice(NEUTRAL_WORDS, size=rng.integers(5, 14)))
    words += [f"cat{category}"] * int(rng.integers(0, 2))
    for _ in range(n_sentiment):
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(lexicon)))
    return " ".join(words)
