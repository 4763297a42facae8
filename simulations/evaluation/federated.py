"""Federated training for `storefed evaluate`: the real ClientApp and strategy, in one process.

Per round, each sampled merchant's reply comes from ``storefed.client.client_app.train`` — the very
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
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from storefed.client import client_app
from storefed.client.distributed_round import distributed_share, prior_share
from storefed.config.schema import RunConfig
from storefed.data.sources import coordinator_catalog
from storefed.models.task import build_task
from storefed.privacy.skellam import decode
from storefed.server.distributed_dp import DistributedUpdate
from storefed.server.run_setup import prepare_run
from storefed.server.strategy import build_strategy
from storefed.wire import PROXIMAL_MU, SERVER_ROUND


@dataclass
class FederatedResult:
    """The final global model and what the merchants reported."""

    state: dict  # final global shared tensors (torch), by name
    epsilon_by_merchant: dict[str, float] = field(default_factory=dict)  # ledger totals
    noise_multipliers: list[float] = field(default_factory=list)
    trained: int = 0  # accepted updates over all rounds
    refused: int = 0
    planned_rounds: int = 0
    train_metrics: list[dict] = field(default_factory=list)  # the aggregated train metrics, per round


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


def run_federated(settings: RunConfig, run_dir: Path) -> FederatedResult:
    """Run ``settings['federation']['rounds']`` rounds; ``settings['privacy']`` decides DP.

    ``settings`` is a `storefed simulate` configuration (see ``grid.cell_settings``).
    Raises RuntimeError when a whole round fails.
    """
    setup = prepare_run(settings, run_dir)
    to_clients = setup.to_clients
    arrays, expected = ArrayRecord(setup.shared), setup.expected
    federation = settings.federation
    num_stores, per_round = federation.num_stores, federation.stores_per_round
    result = FederatedResult(state={}, planned_rounds=int(to_clients.privacy.planned_rounds or 0))

    def on_screened(server_round: int, screening) -> None:
        result.trained += len(screening.accepted)
        result.refused += len(screening.refused)
        problems = {**screening.failed, **screening.rejected}
        if problems and not screening.accepted:
            raise RuntimeError(f"round {server_round}: no usable update: {next(iter(problems.values()))}")

    strategy = build_strategy(settings.strategy, federation, expected, on_screened)
    payload = to_clients.to_record()
    mu = float(getattr(settings.strategy, "proximal_mu", 0.0))
    rng = np.random.default_rng(settings.seed)
    with flower_identity():
        for server_round in range(1, federation.rounds + 1):
            sampled = np.arange(num_stores) if per_round >= num_stores else np.sort(
                rng.choice(num_stores, per_round, replace=False)
            )
            replies = []
            for partition in sampled:
                node = int(partition) + 1
                config = ConfigRecord(payload | {SERVER_ROUND: server_round, PROXIMAL_MU: mu})
                msg = Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=node, message_type="train")
                context = Context(run_id=1, node_id=node, node_config={"partition-id": int(partition)}, state=RecordDict(), run_config={})
                try:
                    reply = client_app.train(msg, context)
                except Exception as exc:  # what Flower's ClientApp turns into an error reply
                    replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)),
                                           reply_to=msg))
                    continue
                metrics = reply.content["metrics"]
                if metrics["dp"] and not metrics["refused"]:
                    result.epsilon_by_merchant[f"merchant-{int(partition):03d}"] = float(metrics["epsilon_total"])
                    result.noise_multipliers.append(float(metrics["noise_multiplier"]))
                replies.append(reply)
            strategy.start_round(arrays)  # what Flower's configure_train would have set
            aggregated, metrics = strategy.aggregate_train(server_round, replies)
            result.train_metrics.append(dict(metrics) if metrics else {})
            if aggregated is not None:
                arrays = aggregated
    result.state = arrays.to_torch_state_dict()
    return result


def run_distributed(settings: RunConfig, run_dir: Path) -> FederatedResult:
    """``privacy.mode=distributed`` in one process: every round, every merchant's integer message
    (``client/distributed_round.distributed_share``, the code a merchant runs) is summed and the
    coordinator's ``DistributedUpdate`` takes one step. Only the transport differs from a SecAgg+ run:
    the integer messages are summed directly (SecAgg+ carries them exactly: tests/test_distributed_dp.py)."""
    setup = prepare_run(settings, run_dir)
    plan, to_clients = setup.skellam, setup.to_clients
    federation = settings.federation
    state = {k: v.clone() for k, v in setup.shared.items()}
    if setup.prior is not None:  # one-shot DP popularity release through the same integer path
        shares = [prior_share(to_clients, 0, {"partition-id": p}) for p in range(federation.num_stores)]
        state = setup.task.apply_prior(state, decode(np.sum([s.message for s in shares], axis=0), setup.prior))
    update = DistributedUpdate(state, plan, float(to_clients.privacy.sample_rate), settings.task.optimizer,
                               settings.task.lr)
    result = FederatedResult(state={}, planned_rounds=settings.privacy.planned_rounds or federation.rounds)
    rng = np.random.default_rng(settings.seed)
    quiet = logging.getLogger("flwr")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        released = getattr(setup.task, "released", False)  # item-item: one co-occurrence release after the prior
        for server_round in range(1, 2 if released else federation.rounds + 1):
            sampled = np.arange(federation.num_stores) if federation.stores_per_round >= federation.num_stores else \
                np.sort(rng.choice(federation.num_stores, federation.stores_per_round, replace=False))
            shares = [distributed_share(to_clients, state, server_round, {"partition-id": int(p)}) for p in sampled]
            total = np.sum([s.message for s in shares], axis=0)
            if released:
                state = update.reset(setup.task.apply_release(state, decode(total, plan)))
            else:
                state = update.step(total, int(sum(s.metrics["num-examples"] for s in shares)))
            for p, share in zip(sampled, shares):
                if share.metrics["refused"]:
                    result.refused += 1
                else:
                    result.trained += 1
                    result.epsilon_by_merchant[f"merchant-{int(p):03d}"] = float(share.metrics["epsilon_total"])
    finally:
        quiet.setLevel(level)
    result.noise_multipliers = [plan.noise_multiplier]
    result.state = state
    return result


def global_model(settings: RunConfig, run_dir: Path, state: dict):
    """A fresh model of the task with the federated shared tensors loaded (as merchants load them)."""
    task = build_task(settings.task, coordinator_catalog(settings.data, settings.seed), seed=settings.seed,
                      privacy_unit=settings.privacy.unit)
    model = task.build_model()
    model.load_state_dict(state, strict=False)
    return task, model
