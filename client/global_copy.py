"""A deployed merchant keeps the latest global model it received, usable on its own machine.

Every evaluate message carries the global model after the round's aggregation (train messages
carry the model a round starts from, so they are not saved); a merchant agent
(node config with ``ledger-dir`` and ``catalog``, written by ``storefed merchant``) saves it to
``<ledger dir>/global_model/<task>/`` (the same files as a run directory: weights, config, and for
the review model the pipeline folder), so ``storefed recommend`` and ``storefed classify`` work on
the merchant's side without asking the coordinator. Simulated merchants keep no copy. The weights
are the released (DP) global model: keeping them reveals nothing beyond what the merchant received.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from storefed.models.saved_model import save_global_model
from storefed.models.task import Task
from storefed.wire import RoundConfig

GLOBAL_DIR = "global_model"


def global_copy_dir(node_config: dict[str, Any], task_name: str) -> Path | None:
    """Where this merchant keeps its copy (None for a simulated merchant)."""
    ledger_dir, catalog = node_config.get("ledger-dir"), node_config.get("catalog")
    if not ledger_dir or not catalog:
        return None
    return Path(str(ledger_dir)) / GLOBAL_DIR / task_name


def keep_latest_global(config: RoundConfig, task: Task, state: dict[str, torch.Tensor],
                       node_config: dict[str, Any], num_items: int) -> Path | None:
    """Save the received global model atomically over the previous copy; returns the folder, or None."""
    target = global_copy_dir(node_config, config.task.name)
    if target is None:
        return None
    target.mkdir(parents=True, exist_ok=True)
    save_global_model(target, state, config.task, num_items, task,
                      catalog_file=str(node_config["catalog"]), seed=config.seed)
    return target
