"""The public catalog's categories as tables of a history recommender (full-table and hashed alike)."""

from __future__ import annotations

import torch
from torch import nn

PAD = 0  # history index 0 is padding


def add_category_tables(model: nn.Module, item_categories: torch.Tensor | None, dim: int) -> None:
    """Give ``model`` a category embedding and a category score layer when ``item_categories`` (each
    item's category index) is given, and the public item -> category index as a non-persistent buffer
    (never trained, never sent); otherwise both tables are None."""
    model.category_embedding = model.category_output = None
    if item_categories is None:
        return
    count = int(item_categories.max()) + 1
    model.register_buffer("item_category", torch.cat([torch.zeros(1, dtype=torch.long), item_categories + 1]),
                          persistent=False)  # index 0 = padding
    model.category_embedding = nn.Embedding(count + 1, dim, padding_idx=PAD)
    model.category_output = nn.Linear(dim, count, bias=False)
