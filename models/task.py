"""The one small interface every learning task implements.

A task says what model is built, which of its tensors are shared with the coordinator, how a
merchant's data becomes a dataset whose items are *DP units* (one item = one unit of privacy),
how a batch becomes (logits, targets), and how the model is evaluated on held-out data.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from storefed.config.schema import RecommenderConfig, ReviewConfig, TaskConfig
from storefed.data.schema import Catalog, MerchantData


class Task(Protocol):
    """A learning task (recommender, review classifier)."""

    name: str
    privacy_unit: str  # what one dataset item is: "customer", "review" or "reviewer"

    def build_model(self) -> nn.Module:
        """A freshly initialised model (deterministic for a given config seed)."""

    def shared_keys(self, model: nn.Module) -> list[str]:
        """Names in ``model.state_dict()`` that are federated; nothing else leaves a merchant."""

    def train_dataset(self, data: MerchantData) -> Dataset:
        """Training examples, one per DP unit."""

    def forward(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and integer targets for one batch (cross-entropy is applied by the caller)."""

    def evaluate(self, model: nn.Module, data: MerchantData, device: torch.device) -> dict[str, float]:
        """Metrics on the merchant's held-out split; includes ``num-examples``."""


def build_task(
    task_cfg: TaskConfig,
    catalog: Catalog,
    seed: int = 0,
    privacy_unit: str | None = None,
    cache_dir: str | None = None,
    device: torch.device | None = None,
) -> Task:
    """The task ``task_cfg`` configures; ``seed`` fixes the model initialisation, ``privacy_unit`` the DP unit.

    ``cache_dir``: where a merchant keeps derived private data (the frozen review encoder's
    features); None keeps them in memory only. ``device``: where that encoder runs (default CPU)."""
    if isinstance(task_cfg, RecommenderConfig) and task_cfg.model == "item_item":
        from storefed.models.item_item import ItemItemTask

        return ItemItemTask(task_cfg, catalog, seed, privacy_unit)
    if isinstance(task_cfg, RecommenderConfig):
        from storefed.models.recommender import RecommenderTask

        return RecommenderTask(task_cfg, catalog, seed, privacy_unit)
    if isinstance(task_cfg, ReviewConfig) and task_cfg.encoder == "frozen":
        from storefed.models.review_head import FrozenReviewTask

        return FrozenReviewTask(task_cfg, catalog, seed, privacy_unit, cache_dir, device)
    if isinstance(task_cfg, ReviewConfig):
        from storefed.models.review import ReviewTask

        return ReviewTask(task_cfg, catalog, seed, privacy_unit)
    raise ValueError(f"task={task_cfg!r} is unknown: choose task=recommender or task=review")
