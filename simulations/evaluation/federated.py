"""Federated training for `storefed evaluate`: the real ClientApp and strategy, in one process.

Per round, each sampled merchant's reply comes from ``client.client_app.train`` — the very
function Flower calls in `storefed simulate` and in deployment (same data loading, same
``train_local``, same ledger, same noise planning with ``noise_multiplier=auto``, same refusals)
— on a Flower ``Message`` built as the Simulation Engine builds it. The replies go through
the strategy `storefed simulate` uses (``server.strategy.build_strategy``: reply screening,
then Flower's own ``FedAvg``/``FedProx.aggregate_train``, weighted by ``num-examples``).
Only the transport differs: no Ray, no SuperLink; merchants train one after the other.

Privacy accounting is each merchant's ledger (``<run dir>/ledgers``): epsilon over the rounds
that merchant actually took part in; the reported epsilon is the maximum over merchants.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import client_app
from client.data_source import coordinator_catalog
from models.task import build_task
from server.server_app import client_settings, prepare_run
from server.strategy import build_strategy


@dataclass
class FederatedResult:
    """The final global model and what the merchants reported."""

    state: dict  # final global shared tensors (torch), by name
    epsilon_by_merchant: dict[str, float] = field(default_factory=dict)  # ledger totals
    noise_multipliers: list[float] = field(default_factory=list)
    trained: int = 0  # accepted updates over all rounds
    refused: int = 0
    planned_rounds: int = 0


@contextlib.contextmanager
def flower_identity() -> Iterator[None]:
    """Flower messages need a task identity; outside a SuperNode we set one and restore it."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)  # noqa: SLF001
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    quiet = logging.getLogger("flwr")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # per-merchant round lines would flood the console
    try:
        yield
    finally:
        quiet.setLevel(level)
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved  # noqa: SLF001


def run_federated(settings: dict, run_dir: Path) -> FederatedResult:
    """Run ``settings['federation']['rounds']`` rounds; ``settings['privacy']`` decides DP.

    ``settings`` is a `storefed simulate` configuration (see ``grid.cell_settings``).
    Raises RuntimeError when a whole round fails.
    """
    setup = prepare_run(settings, run_dir)
    to_clients = setup.to_clients
    arrays, expected = ArrayRecord(setup.shared), setup.expected
    federation = settings["federation"]
    num_stores, per_round = int(federation["num_stores"]), int(federation["stores_per_round"])
    result = FederatedResult(state={}, planned_rounds=int(to_clients["privacy"]["planned_rounds"] or 0))

    def on_screened(server_round: int, screening) -> None:
        result.trained += len(screening.accepted)
        result.refused += len(screening.refused)
        problems = {**screening.failed, **screening.rejected}
        if problems and not screening.accepted:
            raise RuntimeError(f"round {server_round}: no usable update: {next(iter(problems.values()))}")

    strategy = build_strategy(settings["strategy"], federation, expected, on_screened)
    payload = json.dumps(to_clients)
    mu = float(settings["strategy"].get("proximal_mu", 0.0)) if settings["strategy"].get("name") == "fedprox" else 0.0
    rng = np.random.default_rng(int(settings["seed"]))
    with flower_identity():
        for server_round in range(1, int(federation["rounds"]) + 1):
            sampled = np.arange(num_stores) if per_round >= num_stores else np.sort(
                rng.choice(num_stores, per_round, replace=False)
            )
            replies = []
            for partition in sampled:
                node = int(partition) + 1
                config = ConfigRecord({"storefed": payload, "server-round": server_round, "proximal-mu": mu})
                msg = Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=node, message_type="train")
                context = Context(run_id=1, node_id=node, node_config={"partition-id": int(partition)}, state=RecordDict(), run_config={})
                reply = client_app.train(msg, context)
                metrics = reply.content["metrics"]
                if metrics["dp"] and not metrics["refused"]:
                    result.epsilon_by_merchant[f"merchant-{int(partition):03d}"] = float(metrics["epsilon_total"])
                    result.noise_multipliers.append(float(metrics["noise_multiplier"]))
                replies.append(reply)
            aggregated, _ = strategy.aggregate_train(server_round, replies)
            if aggregated is not None:
                arrays = aggregated
    result.state = arrays.to_torch_state_dict()
    return result


def global_model(settings: dict, run_dir: Path, state: dict):
    """A fresh model of the task with the federated shared tensors loaded (as merchants load them)."""
    to_clients = client_settings(settings, run_dir)
    task = build_task(to_clients["task"], coordinator_catalog(to_clients["data"]))
    model = task.build_model()
    model.load_state_dict(state, strict=False)
    return task, model
