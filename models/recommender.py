"""History-based next-item recommender.

A customer is represented only by the items in their (capped) history: mean-pooled item
embeddings through a small user tower. There are no per-customer parameters, so one DP
sample (one customer's capped history) is exactly one customer's whole contribution, and
the model serves customers it has never seen. Scoring is a full softmax over the catalog
(an untied output layer, as ghost clipping does not support tied weights).

Split (leave-last-out): a customer with >= 3 interactions is a test customer; their last
interaction is held out. Training uses every other interaction of every customer with >= 2.
``task.holdout=validation`` first drops every test item, then holds out the last remaining one:
hyperparameters are chosen on those validation items, never on test items.

``task.item_buckets > 0``: hashed item tables (``models/hashed_items.py``) whose size does not
depend on the catalog, trained with a sampled softmax when the catalog has more than
``task.sampled_negatives`` items (see :meth:`RecommenderTask.forward`), and evaluated by exact
full ranking in chunks of :data:`ITEM_CHUNK` items.
"""

from __future__ import annotations

import math
import secrets

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from storefed.config.schema import RecommenderConfig
from storefed.data.schema import Catalog, MerchantData
from storefed.models.category_tables import add_category_tables
from storefed.models.hashed_items import HashedHistoryRecommender, sampled_negatives

PAD = 0  # item index 0 is padding; catalog item i is embedded at i + 1


class HistoryRecommender(nn.Module):
    """Scores every catalog item for a batch of histories ``(B, L)`` of item indices + 1.

    With ``item_categories`` (the public catalog's category index per item) an item is represented
    by its own embedding plus its category's, and scored by its own output row plus its category's,
    so items with few interactions borrow strength from their category."""

    def __init__(self, num_items: int, dim: int, item_categories: torch.Tensor | None = None) -> None:
        super().__init__()
        self.item_embedding = nn.Embedding(num_items + 1, dim, padding_idx=PAD)
        self.user_tower = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.output = nn.Linear(dim, num_items)
        add_category_tables(self, item_categories, dim)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        mask = (history != PAD).unsqueeze(-1).to(self.item_embedding.weight.dtype)
        items = self.item_embedding(history)
        if self.category_embedding is not None:
            items = items + self.category_embedding(self.item_category[history])
        user = self.user_tower((items * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        scores = self.output(user)
        if self.category_output is not None:
            scores = scores + self.category_output(user)[:, self.item_category[1:] - 1]
        return scores


def category_index(catalog: Catalog) -> torch.Tensor | None:
    """Each item's category as an index (sorted category names); None when the catalog has one category only."""
    names = sorted(set(catalog.categories))
    if len(names) < 2:
        return None
    position = {name: n for n, name in enumerate(names)}
    return torch.tensor([position[c] for c in catalog.categories], dtype=torch.long)


def customer_histories(data: MerchantData) -> list[np.ndarray]:
    """Each customer's items in time order (stable for equal timestamps)."""
    inter = data.interactions
    order = np.lexsort((inter.timestamp, inter.user))
    users, items = inter.user[order], inter.item[order]
    bounds = np.searchsorted(users, np.arange(data.num_users + 1))
    return [items[bounds[u] : bounds[u + 1]] for u in range(data.num_users)]


def split_leave_last_out(histories: list[np.ndarray]) -> tuple[list[np.ndarray], list[tuple[np.ndarray, int]]]:
    """(training histories, test cases ``(history, held-out item)``)."""
    train, test = [], []
    for h in histories:
        if len(h) >= 3:
            train.append(h[:-1])
            test.append((h[:-1], int(h[-1])))
        elif len(h) == 2:
            train.append(h)
    return train, test


def holdout_split(
    histories: list[np.ndarray], holdout: str
) -> tuple[list[np.ndarray], list[tuple[np.ndarray, int]]]:
    """Leave-last-out on the test items (``holdout=test``) or on validation items carved from the
    training histories only (``holdout=validation``: the test items are never seen)."""
    train, test = split_leave_last_out(histories)
    return split_leave_last_out(train) if holdout == "validation" else (train, test)


def popularity_rows(histories: list[np.ndarray], num_items: int, max_history: int) -> np.ndarray:
    """One row per customer: their distinct capped-history items, scaled to L2 norm 1."""
    rows = np.zeros((len(histories), num_items))
    for row, h in zip(rows, histories):
        items = np.unique(h[-(max_history + 1):])
        row[items] = 1.0 / np.sqrt(len(items))
    return rows


def pad_history(items: np.ndarray, max_len: int) -> torch.Tensor:
    """Most recent ``max_len`` items, shifted by one, left-padded with PAD."""
    recent = items[-max_len:] + 1
    out = torch.zeros(max_len, dtype=torch.long)
    if len(recent):
        out[-len(recent) :] = torch.as_tensor(recent, dtype=torch.long)
    return out


class CustomerDataset(Dataset):
    """One item per customer (the DP unit): a random next-item cut of their capped history."""

    def __init__(self, histories: list[np.ndarray], max_history: int) -> None:
        self.histories = [h for h in histories if len(h) >= 2]
        self.max_history = max_history

    def __len__(self) -> int:
        return len(self.histories)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.histories[index][-(self.max_history + 1) :]
        cut = int(torch.randint(1, len(h), ()).item())
        return pad_history(h[:cut], self.max_history), torch.tensor(int(h[cut]))


class WholeHistoryDataset(Dataset):
    """One item per customer (the DP unit): their whole capped history as one multinomial sample
    (Mult-DAE, Liang et al. 2018). Input: the distinct items, each kept with probability
    ``1 - input_dropout`` (at least one); target: equal probability on every distinct item. The
    customer's whole contribution is one example, clipped once."""

    def __init__(self, histories: list[np.ndarray], max_history: int, num_items: int, input_dropout: float) -> None:
        self.histories = [h for h in histories if len(h) >= 2]
        self.max_history, self.num_items, self.input_dropout = max_history, num_items, input_dropout

    def __len__(self) -> int:
        return len(self.histories)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = np.unique(self.histories[index][-self.max_history:])
        keep = torch.rand(len(items)) >= self.input_dropout
        if not bool(keep.any()):
            keep[int(torch.randint(len(items), ()).item())] = True
        target = torch.zeros(self.num_items)
        target[torch.as_tensor(items, dtype=torch.long)] = 1.0 / len(items)
        return pad_history(items[keep.numpy()], self.max_history), target


def rank_of_targets(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among its row's scores (ties counted against the target)."""
    target_scores = scores.gather(1, targets.unsqueeze(1))
    return (scores >= target_scores).sum(1) - 1


def ranking_metrics(ranks: torch.Tensor, k: int, prefix: str = "") -> dict[str, float]:
    """HR@k and NDCG@k from 0-based ranks (single relevant item)."""
    if ranks.numel() == 0:
        return {f"{prefix}hr@{k}": 0.0, f"{prefix}ndcg@{k}": 0.0}
    hit = (ranks < k).float()
    ndcg = hit / torch.log2(ranks.float() + 2.0)
    return {f"{prefix}hr@{k}": float(hit.mean()), f"{prefix}ndcg@{k}": float(ndcg.mean())}


def evaluate_scores(
    score_fn, test: list[tuple[np.ndarray, int]], num_items: int, k: int, num_sampled: int, seed: int
) -> dict[str, float]:
    """Full-ranking metrics over the whole catalog (history items excluded) and the sampled-N protocol.

    ``score_fn(histories) -> (B, num_items)`` scores. Sampled metrics are labelled ``sampled{N}_``.
    """
    rng = np.random.default_rng(seed)
    full_ranks, sampled_ranks = [], []
    for start in range(0, len(test), 256):
        chunk = test[start : start + 256]
        scores = score_fn([h for h, _ in chunk]).float()
        targets = torch.tensor([t for _, t in chunk])
        for row, (h, t) in enumerate(chunk):
            seen = torch.as_tensor(np.setdiff1d(h, [t]), dtype=torch.long)
            scores[row, seen] = -math.inf
        full_ranks.append(rank_of_targets(scores, targets))
        for row, (h, t) in enumerate(chunk):
            candidates = np.setdiff1d(np.arange(num_items), np.append(h, t))
            negatives = rng.choice(candidates, size=min(num_sampled, len(candidates)), replace=False)
            cand = torch.as_tensor(np.append(t, negatives), dtype=torch.long)
            sampled_ranks.append(rank_of_targets(scores[row, cand].unsqueeze(0), torch.zeros(1, dtype=torch.long)))
    full = torch.cat(full_ranks) if full_ranks else torch.zeros(0)
    sampled = torch.cat(sampled_ranks) if sampled_ranks else torch.zeros(0)
    return {**ranking_metrics(full, k), **ranking_metrics(sampled, k, prefix=f"sampled{num_sampled}_")}


ITEM_CHUNK = 65536  # items scored at once by the chunked full ranking


def chunked_ranks(
    state, score_of, histories: list[np.ndarray], targets: list[int], num_items: int, chunk_items: int = ITEM_CHUNK
) -> torch.Tensor:
    """0-based full-ranking rank of each target among all catalog items not in its history.

    ``state`` is a tuple of per-row tensors (or None) from which ``score_of(state, items)`` scores
    ``items`` (``(C,)`` shared, or ``(B, C)`` per row) as ``(B, C)``. The rank is the count, over all
    chunks of ``chunk_items`` items, of non-history items scoring at least as high as the target
    (ties against the target), minus one: the same as :func:`rank_of_targets` over all items at once
    as long as an item's score does not depend on which other items are scored with it."""
    device = next(s for s in state if s is not None).device
    target_scores = score_of(state, torch.as_tensor(targets, dtype=torch.long, device=device).view(-1, 1))
    target_scores = target_scores.float().cpu()
    seen = [np.setdiff1d(h, [t]) for h, t in zip(histories, targets)]
    counts = torch.zeros(len(targets), dtype=torch.long)
    for lo in range(0, num_items, chunk_items):
        hi = min(lo + chunk_items, num_items)
        scores = score_of(state, torch.arange(lo, hi, device=device)).float().cpu()
        for row, items in enumerate(seen):
            inside = items[(items >= lo) & (items < hi)]
            scores[row, torch.as_tensor(inside - lo, dtype=torch.long)] = -math.inf
        counts += (scores >= target_scores).sum(1)
    return counts - 1


def evaluate_chunked(
    state_of, score_of, test: list[tuple[np.ndarray, int]], num_items: int, k: int, num_sampled: int, seed: int,
    chunk_items: int = ITEM_CHUNK,
) -> dict[str, float]:
    """The metrics of :func:`evaluate_scores` without ever holding more than ``256 x chunk_items`` scores
    (full ranks from :func:`chunked_ranks`; ``state_of(histories)`` gives its ``state``). The sampled-N
    protocol draws the same candidates as :func:`evaluate_scores` (same generator, same order)."""
    rng = np.random.default_rng(seed)
    full_ranks, sampled_ranks = [], []
    for start in range(0, len(test), 256):
        chunk = test[start : start + 256]
        state = state_of([h for h, _ in chunk])
        device = next(s for s in state if s is not None).device
        full_ranks.append(chunked_ranks(state, score_of, [h for h, _ in chunk], [t for _, t in chunk], num_items,
                                        chunk_items))
        for row, (h, t) in enumerate(chunk):
            candidates = np.setdiff1d(np.arange(num_items), np.append(h, t))
            negatives = rng.choice(candidates, size=min(num_sampled, len(candidates)), replace=False)
            cand = torch.as_tensor(np.append(t, negatives), dtype=torch.long, device=device).unsqueeze(0)
            row_state = tuple(None if s is None else s[row : row + 1] for s in state)
            scores = score_of(row_state, cand).float().cpu()
            sampled_ranks.append(rank_of_targets(scores, torch.zeros(1, dtype=torch.long)))
    full = torch.cat(full_ranks) if full_ranks else torch.zeros(0)
    sampled = torch.cat(sampled_ranks) if sampled_ranks else torch.zeros(0)
    return {**ranking_metrics(full, k), **ranking_metrics(sampled, k, prefix=f"sampled{num_sampled}_")}


def popularity_scorer(train_histories: list[np.ndarray], num_items: int):
    """Score function of the popularity baseline: item counts in the training histories."""
    counts = np.bincount(np.concatenate(train_histories), minlength=num_items) if train_histories else np.zeros(num_items)
    pop = torch.as_tensor(counts, dtype=torch.float32)
    return lambda histories: pop.expand(len(histories), -1).clone()


def popularity_lookup(pop: torch.Tensor):
    """``score_of`` of :func:`chunked_ranks` for the popularity baseline (``state``: one empty row per customer)."""

    def score_of(state, items: torch.Tensor) -> torch.Tensor:
        rows = state[0].shape[0]
        return pop[items].expand(rows, -1) if items.dim() == 1 else pop[items]

    return score_of


class RecommenderTaskBase:
    """What every recommender shares: the customer unit, the split, the popularity release rows and
    the evaluation (full ranking over the catalog, history items excluded; local popularity baseline)."""

    name = "recommender"
    privacy_unit = "customer"

    def __init__(self, cfg: RecommenderConfig, catalog: Catalog, seed: int = 0, privacy_unit: str | None = None) -> None:
        if privacy_unit not in (None, "customer", "user"):
            raise ValueError(
                f"privacy.unit={privacy_unit!r} is not available for the recommender: its unit is the customer "
                "(privacy.unit=user means the same)"
            )
        self.cfg = cfg
        self.num_items = catalog.num_items
        self.max_history = cfg.max_history
        self.k = cfg.top_k
        self.num_sampled = cfg.sampled_candidates
        self.seed = int(seed)

    def split(self, data: MerchantData) -> tuple[list[np.ndarray], list[tuple[np.ndarray, int]]]:
        """(training histories, held-out cases) under ``task.holdout``."""
        return holdout_split(customer_histories(data), self.cfg.holdout)

    def shared_keys(self, model: nn.Module) -> list[str]:
        return list(model.state_dict().keys())

    def prior_vectors(self, data: MerchantData) -> np.ndarray:
        """One row per DP unit (the training customers): their distinct items, scaled to L2 norm 1."""
        return popularity_rows(self.train_dataset(data).histories, self.num_items, self.max_history)

    def evaluate(self, model: nn.Module, data: MerchantData, device: torch.device) -> dict[str, float]:
        train, test = self.split(data)
        model.eval()

        @torch.no_grad()
        def model_scores(histories: list[np.ndarray]) -> torch.Tensor:
            batch = torch.stack([pad_history(h, self.max_history) for h in histories]).to(device)
            return model(batch).cpu()

        if isinstance(model, HashedHistoryRecommender):  # exact full ranking, ITEM_CHUNK items at a time
            @torch.no_grad()
            def state_of(histories: list[np.ndarray]):
                batch = torch.stack([pad_history(h, self.max_history) for h in histories]).to(device)
                return model.score_state(model.encode(batch))

            metrics = evaluate_chunked(state_of, torch.no_grad()(model.score_from), test, self.num_items, self.k,
                                       self.num_sampled, self.seed)
            pop = popularity_scorer(train, self.num_items)([np.zeros(0)])[0]
            baseline = evaluate_chunked(lambda histories: (torch.zeros(len(histories), 0),), popularity_lookup(pop),
                                        test, self.num_items, self.k, self.num_sampled, self.seed)
        else:
            metrics = evaluate_scores(model_scores, test, self.num_items, self.k, self.num_sampled, self.seed)
            baseline = evaluate_scores(
                popularity_scorer(train, self.num_items), test, self.num_items, self.k, self.num_sampled, self.seed
            )
        metrics.update({f"local_pop_{key}": value for key, value in baseline.items()})
        metrics["num-examples"] = len(test)
        return metrics


class RecommenderTask(RecommenderTaskBase):
    """Next-item recommendation trained by DP-SGD; DP unit = customer."""

    def __init__(self, cfg: RecommenderConfig, catalog: Catalog, seed: int = 0, privacy_unit: str | None = None) -> None:
        super().__init__(cfg, catalog, seed, privacy_unit)
        self.dim = cfg.embedding_dim
        self.item_categories = category_index(catalog) if cfg.catalog_features else None
        self.item_buckets, self.item_hashes = int(cfg.item_buckets), int(cfg.item_hashes)
        self.num_negatives = int(cfg.sampled_negatives)
        self.sampled = self.item_buckets > 0 and self.num_items > self.num_negatives
        if self.sampled and cfg.objective == "multinomial":
            raise ValueError(
                f"task.objective=multinomial needs the full softmax over the catalog, but the catalog has "
                f"{self.num_items} items > task.sampled_negatives={self.num_negatives}: use objective=next_item, "
                f"or raise task.sampled_negatives to at least {self.num_items} (memory grows with it)"
            )
        # negatives (see forward): fresh randomness that never sees data, seeded from the OS like the DP noise
        self.negatives_rng = torch.Generator().manual_seed(secrets.randbits(63))

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        if self.item_buckets > 0:
            return HashedHistoryRecommender(self.num_items, self.dim, self.item_buckets, self.item_hashes,
                                            self.item_categories)
        return HistoryRecommender(self.num_items, self.dim, self.item_categories)

    def train_dataset(self, data: MerchantData) -> Dataset:
        """``task.objective=next_item``: one random next-item cut per customer; ``multinomial``: the
        customer's whole capped history as one sample."""
        train = self.split(data)[0]
        if self.cfg.objective == "multinomial":
            return WholeHistoryDataset(train, self.max_history, self.num_items, self.cfg.input_dropout)
        return CustomerDataset(train, self.max_history)

    def apply_prior(self, state: dict[str, torch.Tensor], noisy_sum: np.ndarray) -> dict[str, torch.Tensor]:
        """The output bias set to log(1 + released popularity) (negative noisy counts read as 0)."""
        if self.item_buckets > 0:
            raise ValueError("task.popularity_prior=true sets one output bias per item: it needs task.item_buckets=0")
        bias = torch.from_numpy(np.log1p(np.clip(noisy_sum, 0.0, None))).to(state["output.bias"].dtype)
        return dict(state) | {"output.bias": bias}

    def forward(self, model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets). Full softmax over the catalog, except with hashed tables on a catalog of
        more than ``task.sampled_negatives`` items: a sampled softmax over each row's target (column 0,
        so the targets are all 0) and ``N = task.sampled_negatives`` negatives drawn uniformly from the
        catalog once per batch and shared by every row (accidental hits masked to -inf).

        Why per-sample clipping stays a valid per-customer DP bound: the negatives come from a
        generator that never sees data (not the batch, not its size), so for one step they are a
        random choice of the loss function made independently of the data and of every earlier step
        (each step uses fresh draws; the generator is seeded from the OS, so even the number of
        earlier non-empty batches cannot be read from them). Given them, row b's loss is a function of
        row b's history and target only (its own candidates' scores and its own hit mask): changing or
        removing another customer changes nothing in row b's loss or gradient, and each row's gradient
        is clipped to C as usual, so each fixed choice is the usual sampled Gaussian mechanism with
        sensitivity C, and a data-independent mixture over choices is no less private (joint
        convexity of exp((alpha - 1) D_alpha)): the accountant's epsilon is unchanged. Uniform
        sampling needs no logQ correction (it is the same constant for every candidate)."""
        history, target = batch
        if not self.sampled:
            return model(history.to(device)), target.to(device)
        negatives = sampled_negatives(self.num_items, self.num_negatives, self.negatives_rng).to(device)
        logits = model(history.to(device), negatives, target.to(device))
        return logits, torch.zeros(len(target), dtype=torch.long, device=device)
