"""Item-item recommender from two released statistics (EASE on a noisy co-occurrence matrix).

The model is computed, not trained by gradient steps:

1. *popularity*: the sum over customers of their distinct items, each customer's row scaled to L2
   norm 1 (the same release as the history model's popularity prior);
2. *co-occurrence*: the upper triangle of ``sum_u x_u x_u^T`` over the ``candidate_items`` most popular
   items (by the released popularity), where ``x_u`` is the customer's distinct candidate items
   scaled to norm 1, so one customer moves it by at most 1 in L2.

Both go through secure aggregation (privacy.mode=distributed adds the Skellam noise; privacy=none
releases the exact sums). Everything after the releases is post-processing: EASE (Steck 2019)
``B = I - P diag(1/diag P)``, ``P = (G + lambda I)^-1`` with ``lambda = ease_lambda * mean(diag G)``
(scale-free, so the sum and FedAvg's per-customer mean give the same model), and scores
``x_u B + popularity_weight * popularity / max(popularity)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from storefed.config.schema import RecommenderConfig
from storefed.data.schema import Catalog
from storefed.models.matrix_layout import symmetric_from_upper, upper_triangle
from storefed.models.recommender import RecommenderTaskBase, popularity_rows


def item_item_settings(cfg: RecommenderConfig, num_items: int) -> tuple[int, float, float]:
    """(candidate items, EASE lambda, popularity weight); a config not resolved for its privacy
    setting (``RecommenderConfig.resolved``) gets the DP defaults."""
    cfg = cfg.resolved(private=True)
    return min(int(cfg.candidate_items or num_items), num_items), float(cfg.ease_lambda), float(cfg.popularity_weight)


def candidate_items(popularity: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` most popular items (ties by item index): public, as the popularity release is."""
    return torch.argsort(-popularity.double(), stable=True)[:count]


class ItemItemRecommender(nn.Module):
    """Scores every catalog item for histories ``(B, L)`` of item indices + 1 (0 = padding)."""

    def __init__(self, num_items: int, candidates: int, ease_lambda: float, popularity_weight: float) -> None:
        super().__init__()
        self.num_items, self.candidates = num_items, candidates
        self.ease_lambda, self.popularity_weight = ease_lambda, popularity_weight
        self.register_buffer("popularity", torch.zeros(num_items))
        self.register_buffer("cooccurrence", torch.zeros(candidates * (candidates + 1) // 2))
        self._cache: tuple | None = None

    def item_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate item indices, EASE weights ``B`` over them); recomputed when a statistic changes."""
        key = (self.popularity._version, self.cooccurrence._version, self.popularity.data_ptr())
        if self._cache is None or self._cache[0] != key:
            gram = torch.from_numpy(symmetric_from_upper(self.cooccurrence.double().cpu().numpy(), self.candidates))
            lam = self.ease_lambda * max(float(torch.diagonal(gram).mean()), 1e-12)
            inverse = torch.linalg.inv(gram + lam * torch.eye(self.candidates, dtype=gram.dtype))
            weights = -inverse / torch.diagonal(inverse)
            weights.fill_diagonal_(0.0)
            self._cache = (key, candidate_items(self.popularity, self.candidates), weights.float())
        return self._cache[1], self._cache[2]

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        items, weights = self.item_weights()
        items, weights = items.to(history.device), weights.to(history.device)
        position = torch.full((self.num_items + 1,), -1, dtype=torch.long, device=history.device)
        position[items + 1] = torch.arange(len(items), device=history.device)
        x = torch.zeros(len(history), len(items) + 1, device=history.device)
        x.scatter_(1, position[history].clamp(min=-1) + 1, 1.0)  # column 0 collects padding / other items
        x = x[:, 1:]
        x = x / x.sum(1, keepdim=True).clamp(min=1.0).sqrt()
        pop = self.popularity.clamp(min=0.0)
        scores = (self.popularity_weight / max(float(pop.max()), 1e-12)) * pop.expand(len(history), -1).clone()
        scores[:, items] += x @ weights
        return scores


class CustomerHistories(Dataset):
    """The training customers (one per DP unit); the item-item model reads them whole."""

    def __init__(self, histories: list[np.ndarray]) -> None:
        self.histories = [h for h in histories if len(h) >= 2]

    def __len__(self) -> int:
        return len(self.histories)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.histories[index]


class ItemItemTask(RecommenderTaskBase):
    """The item-item recommender: released, not trained (``released = True``); DP unit = customer."""

    released = True

    def __init__(self, cfg: RecommenderConfig, catalog: Catalog, seed: int = 0, privacy_unit: str | None = None) -> None:
        super().__init__(cfg, catalog, seed, privacy_unit)
        self.candidates, self.ease_lambda, self.popularity_weight = item_item_settings(cfg, self.num_items)

    def build_model(self) -> nn.Module:
        return ItemItemRecommender(self.num_items, self.candidates, self.ease_lambda, self.popularity_weight)

    def train_dataset(self, data) -> Dataset:
        return CustomerHistories(self.split(data)[0])

    def cooccurrence_rows(self, histories: list[np.ndarray], popularity: torch.Tensor) -> np.ndarray:
        """One row per customer: their distinct candidate items (of ``popularity``), scaled to norm 1."""
        items = candidate_items(popularity, self.candidates).numpy()
        position = np.full(self.num_items, -1)
        position[items] = np.arange(len(items))
        rows = np.zeros((len(histories), len(items)))
        for row, h in zip(rows, histories):
            mine = position[np.unique(h[-(self.max_history + 1):])]
            mine = mine[mine >= 0]
            if len(mine):
                row[mine] = 1.0 / np.sqrt(len(mine))
        return rows

    def _slot(self) -> tuple[int, int]:
        """Where the co-occurrence sits in the flattened shared tensors (popularity, then co-occurrence)."""
        start = self.num_items
        return start, start + self.candidates * (self.candidates + 1) // 2

    def release_message(self, gram_upper: np.ndarray) -> np.ndarray:
        """The co-occurrence release in shared-tensor order: ``gram_upper`` (the upper triangle of the
        candidates' co-occurrence sum) in its slot, zeros elsewhere."""
        start, end = self._slot()
        message = np.zeros(end)
        message[start:end] = gram_upper
        return message

    def apply_prior(self, state: dict[str, torch.Tensor], noisy_sum: np.ndarray) -> dict[str, torch.Tensor]:
        """The released popularity, kept as released (noise included: post-processing clips it)."""
        return dict(state) | {"popularity": torch.from_numpy(np.asarray(noisy_sum)).float()}

    def apply_release(self, state: dict[str, torch.Tensor], noisy_sum: np.ndarray) -> dict[str, torch.Tensor]:
        """The released co-occurrence (the popularity coordinates of the sum are ignored)."""
        start, end = self._slot()
        return dict(state) | {"cooccurrence": torch.from_numpy(np.asarray(noisy_sum)[start:end]).float()}

    def fit_exact(self, model: ItemItemRecommender, dataset: CustomerHistories) -> None:
        """Without DP: this party's per-customer means of both statistics, set in place. Candidates come
        from the popularity the model holds (the coordinator's), or this party's own when it holds none,
        so FedAvg's weighted mean over merchants is the platform's mean from the second round on."""
        histories = [dataset[i] for i in range(len(dataset))]  # any dataset of histories (ConcatDataset too)
        n = max(len(histories), 1)
        own = torch.from_numpy(popularity_rows(histories, self.num_items, self.max_history).sum(0) / n)
        basis = model.popularity.clone() if bool(model.popularity.abs().sum() > 0) else own.float()
        rows = self.cooccurrence_rows(histories, basis)
        gram = upper_triangle(rows.T @ rows) / n
        with torch.no_grad():
            model.popularity.copy_(basis)
            model.cooccurrence.copy_(torch.from_numpy(gram).float())

    def forward(self, model: nn.Module, batch, device: torch.device):
        raise TypeError("the item-item recommender is released, not trained by gradient steps")


