"""Hashed item tables: a history recommender whose parameters do not grow with the catalog.

``task.item_buckets=M > 0`` (hash embeddings, the hashing trick with ``task.item_hashes=h`` hash
functions): catalog item ``i`` is represented by the sum of rows ``r_1(i) .. r_h(i)`` of an input
bucket table of ``M`` rows, and scored by ``user . sum_j W[r_j(i)] + sum_j b[r_j(i)]`` with a
*separate* output bucket table ``W`` (an ``nn.Linear(dim, M)``: ghost clipping does not support
tied weights) and bucket bias ``b``. The ``r_j`` are fixed public hash functions of the item index
only (universal hashing ``((a_j i + c_j) mod p) mod M``, ``p = 2^31 - 1``, with ``a_j, c_j`` drawn
once from the fixed seed :data:`HASH_SEED`): the same on every merchant and the coordinator, and
independent of any data. Two items share all their rows with probability about ``1 / M^h``.

Trained and federated tensors: ``(M + 1) x dim`` input rows (row 0 = padding), ``M x dim + M``
output, the user tower and the (catalog-sized only in categories) category tables. The only
catalog-sized tensor is the public item -> category index, a non-persistent buffer (never trained,
never sent).

Scoring goes through the ``(B, M)`` bucket scores ``user @ W.T + b``: an item's score is the sum
of its ``h`` bucket scores (a parameter-free gather after one ``nn.Linear``, so Opacus' per-sample
gradients and ghost norms of that Linear are exact). Any set of items can be scored without
materialising ``B x num_items`` logits: :meth:`HashedHistoryRecommender.score` takes the items to
score, shared by the batch (``(C,)``) or one set per row (``(B, C)``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from storefed.models.category_tables import add_category_tables

PAD = 0  # history index 0 is padding; catalog item i appears in histories as i + 1
HASH_PRIME = 2**31 - 1  # a Mersenne prime: (a * i + c) stays below 2^62 for item indices < 2^31
HASH_SEED = 20240611  # public and fixed: every party derives the same hash functions from it


def hash_coefficients(hashes: int, seed: int = HASH_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(a_j, c_j)`` of the ``hashes`` universal hash functions (``1 <= a_j < p``, ``0 <= c_j < p``)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, HASH_PRIME, size=hashes, dtype=np.int64)
    c = rng.integers(0, HASH_PRIME, size=hashes, dtype=np.int64)
    return torch.from_numpy(a), torch.from_numpy(c)


def hash_rows(items: torch.Tensor, a: torch.Tensor, c: torch.Tensor, buckets: int) -> torch.Tensor:
    """Bucket rows ``(..., h)`` in ``[0, buckets)`` of catalog item indices ``items`` (any shape)."""
    x = items.long().unsqueeze(-1)
    return ((x * a.to(x.device) + c.to(x.device)) % HASH_PRIME) % buckets


class HashedHistoryRecommender(nn.Module):
    """:class:`~storefed.models.recommender.HistoryRecommender` with hashed item tables.

    ``model(history)`` scores every catalog item ``(B, num_items)`` (as the full-table model does);
    ``model(history, items)`` scores only ``items`` (``(C,)`` shared by the batch, or ``(B, C)``);
    ``model(history, negatives, targets)`` returns the sampled-softmax logits ``(B, 1 + N)``: column 0
    is each row's target, then the batch's shared negatives, with accidental hits (a negative equal
    to the row's target) set to ``-inf``."""

    def __init__(
        self, num_items: int, dim: int, buckets: int, hashes: int = 2, item_categories: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if num_items >= HASH_PRIME:
            raise ValueError(f"hashed item tables support catalogs below {HASH_PRIME} items, not {num_items}")
        self.num_items, self.buckets, self.hashes = int(num_items), int(buckets), int(hashes)
        a, c = hash_coefficients(self.hashes)
        self.register_buffer("hash_a", a, persistent=False)
        self.register_buffer("hash_c", c, persistent=False)
        self.bucket_embedding = nn.Embedding(buckets + 1, dim, padding_idx=PAD)
        self.user_tower = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.bucket_output = nn.Linear(dim, buckets)
        with torch.no_grad():  # an item (a sum of h rows) starts with the variance of one full-table row
            self.bucket_embedding.weight.mul_(1.0 / math.sqrt(self.hashes))
            self.bucket_output.weight.mul_(1.0 / math.sqrt(self.hashes))
            self.bucket_output.bias.mul_(1.0 / math.sqrt(self.hashes))
        add_category_tables(self, item_categories, dim)

    def rows(self, items: torch.Tensor) -> torch.Tensor:
        """Bucket rows ``(..., h)`` of catalog item indices (0-based)."""
        return hash_rows(items, self.hash_a, self.hash_c, self.buckets)

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """User vectors ``(B, dim)`` of histories ``(B, L)`` (item indices + 1, PAD = 0)."""
        batch, length = history.shape
        real = history != PAD
        rows = torch.where(real.unsqueeze(-1), 1 + self.rows((history - 1).clamp(min=0)), 0)  # (B, L, h); PAD -> 0
        rows = self.bucket_embedding(rows.reshape(batch, length * self.hashes))  # 2-D input: one row per sample
        items = rows.view(batch, length, self.hashes, -1).sum(2)
        if self.category_embedding is not None:
            items = items + self.category_embedding(self.item_category[history])
        mask = real.unsqueeze(-1).to(items.dtype)
        return self.user_tower((items * mask).sum(1) / mask.sum(1).clamp(min=1.0))

    def score_state(self, user: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``(B, buckets)`` bucket scores (and ``(B, categories)`` category scores) of user vectors:
        every item score is read from them, so they are computed once per batch of users."""
        category = self.category_output(user) if self.category_output is not None else None
        return self.bucket_output(user), category

    def score_from(self, state: tuple[torch.Tensor, torch.Tensor | None], items: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``(B, C)`` of ``items`` (``(C,)`` shared, ``(B, C)`` per row; None: the whole catalog).

        An item's score is the same float whatever the other items scored with it (a gather, then
        additions in a fixed order): chunked full ranking is exact."""
        bucket_scores, category_scores = state
        batch = bucket_scores.shape[0]
        if items is None:
            items = torch.arange(self.num_items, device=bucket_scores.device)
        rows = self.rows(items)
        if items.dim() == 1:
            picked = bucket_scores[:, rows.reshape(-1)].view(batch, -1, self.hashes)
        else:
            picked = bucket_scores.gather(1, rows.reshape(batch, -1)).view(batch, -1, self.hashes)
        scores = picked[..., 0]
        for j in range(1, self.hashes):
            scores = scores + picked[..., j]
        if category_scores is not None:
            category = self.item_category[items + 1] - 1
            scores = scores + (category_scores[:, category] if items.dim() == 1 else category_scores.gather(1, category))
        return scores

    def score(self, user: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``(B, C)`` of ``items`` for user vectors ``(B, dim)`` (see :meth:`score_from`)."""
        return self.score_from(self.score_state(user), items)

    def forward(
        self, history: torch.Tensor, items: torch.Tensor | None = None, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        user = self.encode(history)
        if targets is None:
            return self.score(user, items)
        if items is None:
            raise ValueError("sampled scores need the shared negatives as well as the targets")
        state = self.score_state(user)
        logits = torch.cat([self.score_from(state, targets.view(-1, 1)), self.score_from(state, items)], dim=1)
        hits = torch.cat([torch.zeros_like(targets.view(-1, 1), dtype=torch.bool),
                          items.view(1, -1) == targets.view(-1, 1)], dim=1)
        return logits.masked_fill(hits, -math.inf)


def sampled_negatives(num_items: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` catalog items drawn uniformly with replacement: one draw per batch, shared by all its rows.

    Uniform proposal: the logQ correction ``-log(count * q(i))`` is the same constant for every
    candidate, target included, so it cancels in the softmax and is omitted."""
    return torch.randint(0, num_items, (count,), generator=generator)
