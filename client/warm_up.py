"""A Ray actor's warm-up (simulation only, server/warm_up.py): everything public a round needs, once per process.

Reads no merchant data: the catalog is the one the coordinator publishes (cached per process by
storefed.data.sources) and the model is the task's fresh initialisation. Returns only this process's
id and the seconds spent, so that the coordinator can count distinct actors.
"""

from __future__ import annotations

import os
import time

from storefed.client.device import choose_device
from storefed.client.local_training import local_training_config, make_optimizer
from storefed.data.sources import coordinator_catalog
from storefed.models.task import build_task
from storefed.wire import RoundConfig


def warm_up(config: RoundConfig) -> dict[str, float]:
    """Build the public catalog, the task's model and its optimizer in this process; ``{"pid", "seconds"}``."""
    started = time.perf_counter()
    catalog = coordinator_catalog(config.data, config.seed)
    task = build_task(config.task, catalog, seed=config.seed, privacy_unit=config.privacy.unit,
                      device=choose_device(config.device))
    make_optimizer(task.build_model(), local_training_config(config.task))  # torch imports _dynamo here: ~1 s
    return {"pid": float(os.getpid()), "seconds": time.perf_counter() - started}
