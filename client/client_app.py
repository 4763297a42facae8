"""The merchant's Flower ClientApp (Message API): train under DP, evaluate, or refuse.

What leaves the merchant in a train reply: exactly the task's shared tensors (names and shapes
of the global model), one MetricRecord of numbers, and one ConfigRecord ``privacy`` with the
unit, accountant and guarantee text. Nothing else: no customer ids, no per-example values.

Under secure aggregation (``privacy.secure_aggregation``) the same round runs through
``client/secure_train.py``: its tensors leave only as a masked SecAgg+ vector.

A round is refused (reply with ``refused=1`` and a reason, no tensors) when taking it would
push the merchant's ledger past its epsilon budget, or when delta >= 1/(number of DP units).
The ledger is updated atomically *before* the update is released.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.data_source import load_for_node
from client.device import choose_device
from client.local_training import DPParams, LocalTrainingConfig, train_local
from client.secure_train import secure_aggregation_router
from models.task import Task, build_task
from privacy.accounting import plan_noise_multiplier
from privacy.delta_check import delta_problem
from privacy.dp_sgd import plan_sampling, unwrap
from privacy.ledger import PrivacyLedger, open_ledger

log = logging.getLogger("flwr")  # Flower configures its handlers: lines reach the merchant console
app = ClientApp()

TRAIN_METRIC_KEYS = (
    "num-examples",
    "train_loss",
    "steps",
    "refused",
    "dp",
    "noise_multiplier",
    "sample_rate",
    "epsilon_round",
    "epsilon_total",
    "epsilon_budget",
    "delta",
)


def _settings(msg: Message) -> dict:
    return json.loads(str(msg.content["config"]["storefed"]))


def _privacy_settings(settings: dict, node_config: dict) -> dict:
    """Server-proposed privacy settings, overridden by the merchant's own node config."""
    privacy = dict(settings["privacy"])
    for node_key, key in (("epsilon-budget", "epsilon"), ("delta", "delta"), ("ledger-dir", "ledger_dir")):
        if node_key in node_config:
            privacy[key] = node_config[node_key]
    return privacy


def _prepare(msg: Message, context: Context) -> tuple[dict, Task, torch.nn.Module, object, torch.device]:
    settings = _settings(msg)
    return (settings, *_load(settings, msg.content["arrays"].to_torch_state_dict(), context))


def _load(
    settings: dict, global_state: dict[str, torch.Tensor], context: Context
) -> tuple[Task, torch.nn.Module, object, torch.device]:
    """This node's task, the global model loaded with ``global_state``, its data and device."""
    catalog, data = load_for_node(settings["data"], dict(context.node_config))
    task = build_task(settings["task"], catalog)
    model = task.build_model()
    model.load_state_dict(global_state, strict=False)
    device = choose_device(str(settings.get("device", "auto")))
    return task, model, data, device


@dataclass
class TrainOutcome:
    """What a merchant releases for one train round (tensors are ``None`` for a refusal)."""

    metrics: dict[str, float]
    arrays: ArrayRecord | None
    privacy: dict[str, str]


def _reply(msg: Message, outcome: TrainOutcome) -> Message:
    content = RecordDict({"metrics": MetricRecord(outcome.metrics), "privacy": ConfigRecord(outcome.privacy)})
    if outcome.arrays is not None:
        content["arrays"] = outcome.arrays
    return Message(content=content, reply_to=msg)


def _refusal(reason: str, ledger: PrivacyLedger | None, budget: float, delta: float) -> TrainOutcome:
    spent = ledger.epsilon_spent if ledger else 0.0
    metrics = {key: 0.0 for key in TRAIN_METRIC_KEYS} | {
        "refused": 1,
        "dp": 1,
        "epsilon_total": spent,
        "epsilon_budget": budget,
        "delta": delta,
    }
    log.warning("StoreFed merchant: refused round: %s", reason)
    return TrainOutcome(metrics, None, {"refusal": reason})


@app.train(mods=[secure_aggregation_router])
def train(msg: Message, context: Context) -> Message:
    """One round of local training under DP (or a refusal)."""
    settings = _settings(msg)
    global_state = msg.content["arrays"].to_torch_state_dict()
    config = msg.content["config"]
    proximal_mu = float(config.get("proximal-mu", 0.0))  # sent by FedProx
    run_id = str(settings.get("run_id", msg.metadata.run_id))
    return _reply(msg, train_round(settings, global_state, int(config["server-round"]), proximal_mu, run_id, context))


def train_round(
    settings: dict,
    global_state: dict[str, torch.Tensor],
    server_round: int,
    proximal_mu: float,
    run_id: str,
    context: Context,
) -> TrainOutcome:
    """One round of local training under DP, or a refusal: the body shared by plain and SecAgg+ rounds.

    The ledger is updated before the outcome is returned, i.e. before any tensor is released.
    """
    task, model, data, device = _load(settings, global_state, context)
    privacy = _privacy_settings(settings, dict(context.node_config))
    local = LocalTrainingConfig(**settings["local"], proximal_mu=proximal_mu)
    dataset = task.train_dataset(data)
    if len(dataset) == 0:
        return _refusal(f"no {task.privacy_unit} examples to train on", None, 0.0, 0.0)

    if not privacy["enabled"]:
        result = train_local(task, model, dataset, local, None, device)
        metrics = {key: 0.0 for key in TRAIN_METRIC_KEYS} | {
            "num-examples": result.num_units,
            "train_loss": result.mean_loss,
            "steps": result.steps,
            "epsilon_round": math.inf,
            "epsilon_total": math.inf,
        }
        guarantee = "NONE: privacy.enabled=false, this update carries no differential-privacy guarantee"
        return TrainOutcome(metrics, _shared_arrays(task, model), {"unit": task.privacy_unit, "guarantee": guarantee})

    budget, delta = float(privacy["epsilon"]), float(privacy["delta"])
    ledger = open_ledger(
        privacy["ledger_dir"], data.merchant_id, task.name, task.privacy_unit, delta, privacy["accountant"], budget
    )
    reason = delta_problem(delta, len(dataset), task.privacy_unit, "this merchant")
    if reason:
        return _refusal(reason, ledger, budget, delta)
    plan = plan_sampling(len(dataset), local.batch_size, local.epochs)
    noise = _noise_multiplier(privacy, ledger, plan.sample_rate, plan.steps)
    if noise is None or ledger.epsilon_after(noise, plan.sample_rate, plan.steps) > budget:
        reason = (
            f"privacy budget exhausted: {ledger.epsilon_spent:.3f} of epsilon {budget:g} spent "
            f"(delta={delta:g}, per {task.privacy_unit}); this round would exceed it"
        )
        return _refusal(reason, ledger, budget, delta)

    dp = DPParams(noise, float(privacy["max_grad_norm"]), str(privacy["grad_sample_mode"]))
    result = train_local(task, model, dataset, local, dp, device)
    record = ledger.record_round(run_id, server_round, noise, result.plan.sample_rate, result.steps)
    log.info(
        "StoreFed merchant %s round %d: trained %d DP steps, epsilon %.3f this round, %.3f of %g spent "
        "(delta=%g, per %s, %s accountant, Poisson sampling)",
        data.merchant_id, server_round, result.steps, record.epsilon_round, record.epsilon_total, budget, delta,
        task.privacy_unit, ledger.accountant.upper(),
    )
    metrics = {
        "num-examples": result.num_units,
        "train_loss": result.mean_loss,
        "steps": result.steps,
        "refused": 0,
        "dp": 1,
        "noise_multiplier": noise,
        "sample_rate": result.plan.sample_rate,
        "epsilon_round": record.epsilon_round,
        "epsilon_total": record.epsilon_total,
        "epsilon_budget": budget,
        "delta": delta,
    }
    return TrainOutcome(
        metrics, _shared_arrays(task, unwrap(model)),
        {"unit": task.privacy_unit, "accountant": ledger.accountant, "guarantee": ledger.guarantee()},
    )


def _noise_multiplier(privacy: dict, ledger: PrivacyLedger, sample_rate: float, steps: int) -> float | None:
    """Configured noise, or with ``noise_multiplier=auto`` the noise planned for the remaining rounds."""
    if privacy["noise_multiplier"] != "auto":
        return float(privacy["noise_multiplier"])
    rounds_left = max(int(privacy["planned_rounds"]) - len(ledger.rounds), 1)
    try:
        return plan_noise_multiplier(
            ledger.history, sample_rate, steps, rounds_left, ledger.epsilon_budget, ledger.delta, ledger.accountant
        )
    except ValueError:
        return None


def _shared_arrays(task: Task, model: torch.nn.Module) -> ArrayRecord:
    state = model.state_dict()
    return ArrayRecord({key: state[key].detach().cpu() for key in task.shared_keys(model)})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this merchant's held-out split (metrics are not DP-protected)."""
    _, task, model, data, device = _prepare(msg, context)
    metrics = task.evaluate(model.to(device), data, device)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
