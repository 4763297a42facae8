"""One merchant round, shared by plain and SecAgg+ rounds: load, check the budget, train under DP, or refuse.

A round is refused (``refused=1`` with a reason, no tensors) when taking it would push the
merchant's ledger past its epsilon budget, or when delta >= 1/(number of DP units). The ledger
is updated atomically *before* any tensor is returned, i.e. before anything is released.
What is returned: exactly the task's shared tensors, the metrics of ``wire.TRAIN_METRIC_KEYS``
and the unit / accountant / guarantee text.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from storefed.client.device import choose_device
from storefed.client.global_copy import keep_latest_global
from storefed.client.local_training import DPParams, local_training_config, train_local
from storefed.client.reply_cache import input_digest, replay, save_reply
from storefed.data.schema import MerchantData
from storefed.data.sources import load_for_node
from storefed.models.task import Task, build_task
from storefed.privacy.accounting import plan_noise_multiplier
from storefed.privacy.delta_check import delta_problem
from storefed.privacy.dp_sgd import plan_sampling, unwrap
from storefed.privacy.ledger import PrivacyLedger, local_record, open_ledger
from storefed.privacy.person_budget import person_refusal, task_share
from storefed.update_codec import encode_update
from storefed.wire import NUM_EXAMPLES, TRAIN_METRIC_KEYS, MerchantPrivacy, RoundConfig

log = logging.getLogger("storefed.merchant")  # storefed/console.py: shown at a merchant agent, quiet in simulation


@dataclass
class TrainOutcome:
    """What a merchant releases for one train round (tensors are ``None`` for a refusal)."""

    metrics: dict[str, float]
    arrays: ArrayRecord | None
    privacy: dict[str, str]


def load_round(
    config: RoundConfig, global_state: dict[str, torch.Tensor], node_config: dict[str, Any], keep_copy: bool = False
) -> tuple[Task, torch.nn.Module, MerchantData, torch.device]:
    """This node's task, the global model loaded with ``global_state``, its data and device.

    ``keep_copy`` (evaluate messages, which carry the model after aggregation): a deployed merchant
    also saves ``global_state`` as its latest copy (client/global_copy.py)."""
    catalog, data = load_for_node(config.data, config.seed, node_config)
    device = choose_device(config.device)
    task = build_task(config.task, catalog, seed=config.seed, privacy_unit=config.privacy.unit,
                      cache_dir=private_cache_dir(config.privacy, node_config), device=device)
    model = task.build_model()
    model.load_state_dict(global_state, strict=False)
    if keep_copy:
        keep_latest_global(config, task, global_state, node_config, catalog.num_items)  # deployed merchants only
    return task, model, data, device


def private_cache_dir(proposed: MerchantPrivacy, node_config: dict[str, Any]) -> str | None:
    """Where this merchant keeps data derived from its customers (review embeddings): node config
    ``cache-dir``, else ``<ledger dir>/embeddings`` (private: same disk and care as the ledger)."""
    if "cache-dir" in node_config:
        return str(node_config["cache-dir"])
    ledger_dir = merchant_privacy(proposed, node_config).ledger_dir
    return None if ledger_dir is None else str(Path(ledger_dir) / "embeddings")


def merchant_privacy(proposed: MerchantPrivacy, node_config: dict[str, Any]) -> MerchantPrivacy:
    """The coordinator's proposal, overridden by the merchant's own node config (budget, delta, ledger)."""
    pairs = (("epsilon-budget", "epsilon"), ("person-epsilon-budget", "person_epsilon"), ("delta", "delta"),
             ("ledger-dir", "ledger_dir"))
    own = {key: node_config[node_key] for node_key, key in pairs if node_key in node_config}
    for key in ("epsilon", "person_epsilon", "delta"):
        if key in own:
            own[key] = float(own[key])
    if "person_epsilon" in own and "epsilon" not in own and proposed.enabled:  # its own person budget, split
        share = task_share(own["person_epsilon"], proposed.person_tasks, own.get("delta", proposed.delta))
        own["epsilon"] = min(proposed.epsilon, share)
    return dataclasses.replace(proposed, **own)


def person_budget(privacy: MerchantPrivacy) -> float:
    """The per-customer budget across tasks (``privacy.person_epsilon``); unset: reported, not enforced."""
    return math.inf if privacy.person_epsilon is None else float(privacy.person_epsilon)


def group_size(task: Task, data: MerchantData) -> int | None:
    """Review unit: the most reviews one customer has (person budget by group privacy); else None."""
    if task.privacy_unit != "review" or len(data.reviews.user) == 0:
        return None
    return int(np.bincount(data.reviews.user).max())


def refusal(reason: str, ledger: PrivacyLedger | None, budget: float, delta: float) -> TrainOutcome:
    spent = ledger.epsilon_spent if ledger else 0.0
    metrics = {key: 0.0 for key in TRAIN_METRIC_KEYS} | {
        "refused": 1, "dp": 1, "epsilon_total": spent, "epsilon_budget": budget, "delta": delta,
    }
    log.warning("StoreFed merchant: refused round: %s", reason)
    return TrainOutcome(metrics, None, {"refusal": reason})


def train_round(
    config: RoundConfig,
    global_state: dict[str, torch.Tensor],
    server_round: int,
    proximal_mu: float,
    node_config: dict[str, Any],
) -> TrainOutcome:
    """One round of local training under DP, or a refusal (the ledger is written before returning)."""
    task, model, data, device = load_round(config, global_state, node_config)
    privacy = merchant_privacy(config.privacy, node_config)
    local = local_training_config(config.task, proximal_mu)
    dataset = task.train_dataset(data)
    if len(dataset) == 0:
        return refusal(f"no {task.privacy_unit} examples to train on", None, 0.0, 0.0)

    if not privacy.enabled:
        result = train_local(task, model, dataset, local, None, device)
        metrics = {key: 0.0 for key in TRAIN_METRIC_KEYS} | {
            NUM_EXAMPLES: result.num_units, "train_loss": result.mean_loss, "steps": result.steps,
            "epsilon_round": math.inf, "epsilon_total": math.inf,
        }
        guarantee = "NONE: privacy.enabled=false, this update carries no differential-privacy guarantee"
        arrays = shared_arrays(task, model, global_state, config.update_encoding)
        metrics["update_bytes"] = array_bytes(arrays)
        return TrainOutcome(metrics, arrays, {"unit": task.privacy_unit, "guarantee": guarantee})

    budget, delta = privacy.epsilon, privacy.delta
    if privacy.ledger_dir is None:
        raise ValueError("no privacy ledger directory: set node config ledger-dir (storefed merchant ledger_dir=...)")
    ledger = open_ledger(
        privacy.ledger_dir, data.merchant_id, task.name, task.privacy_unit, delta, privacy.accountant, budget
    )
    digest = input_digest(global_state)
    cached, reason = replay(ledger, config.run_id, server_round, digest)  # a resumed coordinator asks again
    if cached is not None:
        log.info("StoreFed merchant %s round %d: already trained; the same reply is sent again (no privacy spent)",
                 data.merchant_id, server_round)
        return TrainOutcome(*cached)
    if reason:
        return refusal(reason, ledger, budget, delta)
    reason = delta_problem(delta, len(dataset), task.privacy_unit, "this merchant")
    if reason:
        return refusal(reason, ledger, budget, delta)
    plan = plan_sampling(len(dataset), local.batch_size, local.epochs)
    noise = _noise_multiplier(privacy, ledger, plan.sample_rate, plan.steps)
    if noise is None or ledger.epsilon_after(noise, plan.sample_rate, plan.steps) > budget:
        reason = (
            f"privacy budget exhausted: {ledger.epsilon_spent:.3f} of epsilon {budget:g} spent "
            f"(delta={delta:g}, per {task.privacy_unit}); this round would exceed it"
        )
        return refusal(reason, ledger, budget, delta)
    k = group_size(task, data)
    person, reason = person_refusal(ledger, local_record(noise, plan.sample_rate, plan.steps), person_budget(privacy), k)
    if reason:
        return refusal(reason, ledger, budget, delta)
    if k is not None:
        ledger.group_size = max(ledger.group_size or 0, k)

    dp = DPParams(noise, privacy.max_grad_norm, privacy.grad_sample_mode)
    result = train_local(task, model, dataset, local, dp, device)
    record = ledger.record_round(config.run_id, server_round, noise, result.plan.sample_rate, result.steps)
    log.info(
        "StoreFed merchant %s round %d: trained %d DP steps, epsilon %.3f this round, %.3f of %g spent "
        "(delta=%g, per %s, %s accountant, Poisson sampling); per customer across tasks %.3f (%s)",
        data.merchant_id, server_round, result.steps, record.epsilon_round, record.epsilon_total, budget, delta,
        task.privacy_unit, ledger.accountant.upper(), person.epsilon,
        "not enforced" if privacy.person_epsilon is None else f"budget {privacy.person_epsilon:g}",
    )
    metrics = {
        NUM_EXAMPLES: result.num_units, "train_loss": result.mean_loss, "steps": result.steps, "refused": 0, "dp": 1,
        "noise_multiplier": noise, "sample_rate": result.plan.sample_rate, "epsilon_round": record.epsilon_round,
        "epsilon_total": record.epsilon_total, "epsilon_budget": budget, "delta": delta,
        "epsilon_person": person.epsilon,
    }
    arrays = shared_arrays(task, unwrap(model), global_state, config.update_encoding)
    metrics["update_bytes"] = array_bytes(arrays)
    outcome = TrainOutcome(
        metrics, arrays,
        {"unit": task.privacy_unit, "accountant": ledger.accountant, "guarantee": ledger.guarantee()},
    )
    save_reply(ledger, config.run_id, server_round, digest, outcome.metrics, outcome.arrays, outcome.privacy)
    return outcome


def _noise_multiplier(privacy: MerchantPrivacy, ledger: PrivacyLedger, sample_rate: float, steps: int) -> float | None:
    """Configured noise, or (``noise_multiplier`` None = auto) the noise planned for the remaining rounds."""
    if privacy.noise_multiplier is not None:
        return float(privacy.noise_multiplier)
    rounds_left = max(int(privacy.planned_rounds) - len(ledger.rounds), 1)
    try:
        return plan_noise_multiplier(
            ledger.history, sample_rate, steps, rounds_left, ledger.epsilon_budget, ledger.delta, ledger.accountant
        )
    except ValueError:
        return None


def array_bytes(arrays: ArrayRecord) -> int:
    """Payload bytes of the update as sent (``federation.update_encoding``), without framing."""
    return int(sum(array.numpy().nbytes for array in arrays.values()))


def shared_arrays(task: Task, model: torch.nn.Module, start: dict[str, torch.Tensor] | None = None,
                  encoding: str = "float32") -> ArrayRecord:
    """The task's shared tensors, encoded for the wire (``federation.update_encoding``; after the DP noise)."""
    state = model.state_dict()
    tensors = {key: state[key].detach().cpu() for key in task.shared_keys(model)}
    return ArrayRecord(encode_update(tensors, start or {}, encoding))
