"""Shared test fixtures: small virtual worlds and hand-built Flower messages."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")



@pytest.fixture(autouse=True)
def _own_environment():
    """Each test starts from the same environment: an in-process run exports console and Flower settings
    (STOREFED_SIMULATED_MERCHANTS, FLWR_HOME, Ray's token) for its children, which must not leak into the
    next test's subprocesses."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


SMALL_WORLD = {"num_items": 200, "num_categories": 8, "mean_customers": 60, "review_probability": 0.3}


def base_settings(task: str = "recommender", *overrides: str, **privacy):
    """A composed `storefed simulate` config: 4 small virtual stores, 2 per round, 3 rounds."""
    from storefed.config import compose

    world = [f"data.generator.{k}={v}" for k, v in SMALL_WORLD.items()]
    own = [f"privacy.{k}={v}" for k, v in privacy.items()]
    return compose("simulate", [f"task={task}", "federation.num_stores=4", "federation.stores_per_round=2",
                                "federation.rounds=3", *world, *own, *overrides])


def round_config(settings, run_dir: Path, epochs: int | None = None):
    """What merchants receive for ``settings`` (as the ServerApp builds it), optionally with fewer epochs."""
    from storefed.server.run_setup import round_config as build

    config = build(settings, Path(run_dir))
    if epochs is not None:
        config = dataclasses.replace(config, task=dataclasses.replace(config.task, epochs=epochs))
    return config


def with_privacy(config, **changes):
    """``config`` (a RoundConfig) with merchant-side privacy settings changed."""
    return dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, **changes))


@pytest.fixture
def flower_identity():
    """Flower 1.39 messages need a task identity outside a running SuperNode."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def train_message(to_clients, arrays, server_round: int = 1, message_type: str = "train"):
    from flwr.app import ConfigRecord, Message, RecordDict

    config = ConfigRecord(to_clients.to_record() | {"server-round": server_round})
    return Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type=message_type)


def node_context(node_config: dict):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def task_from_dict(cfg: dict, catalog):
    """A task from a plain dict (``name`` picks the config class; ``privacy_unit`` and ``seed`` as build_task takes them)."""
    from storefed.config.schema import RecommenderConfig, ReviewConfig
    from storefed.models.task import build_task

    cfg = dict(cfg)
    unit, seed = cfg.pop("privacy_unit", None), cfg.pop("seed", 0)
    config = {"recommender": RecommenderConfig, "review": ReviewConfig}[cfg.get("name", "recommender")](**cfg)
    return build_task(config, catalog, seed=seed, privacy_unit=unit)
