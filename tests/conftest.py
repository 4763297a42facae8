"""Shared test fixtures: small virtual worlds and hand-built Flower messages."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

SMALL_WORLD = {"num_items": 200, "num_categories": 8, "mean_customers": 60, "review_probability": 0.3}


def base_settings(task: str = "recommender", **privacy) -> dict:
    """Settings a merchant receives (as ServerApp.client_settings would build them)."""
    from storefed import compose
    from server.server_app import client_settings

    settings = compose([f"task={task}", "federation.num_stores=4", "federation.stores_per_round=2", "federation.rounds=3"])
    settings["data"]["generator"].update(SMALL_WORLD)
    settings["privacy"].update(privacy)
    return settings


@pytest.fixture
def flower_identity():
    """Flower 1.39 messages need a task identity outside a running SuperNode."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def train_message(to_clients: dict, arrays, server_round: int = 1, message_type: str = "train"):
    from flwr.app import ConfigRecord, Message, RecordDict

    config = ConfigRecord({"storefed": json.dumps(to_clients), "server-round": server_round})
    return Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type=message_type)


def node_context(node_config: dict):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
