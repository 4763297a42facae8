"""One merchant's part of a distributed-DP round (``privacy.mode=distributed``): one DP-SGD step over
the union of all merchants' units, of which this merchant holds some.

The merchant Poisson-samples each of its units at the public rate ``q``, sums their gradients, each
clipped to ``C`` (Opacus), scales and rounds the sum to integers and adds **only its share** of the
Skellam noise (privacy/skellam.py). Its message is an int64 vector: alone it carries too little noise
(its own-share epsilon is recorded, labelled, in the ledger); summed by secure aggregation with the
other shares it carries the full noise ``sigma * Delta_2``.

Before the message is returned the ledger records the round's **population-level** epsilon. A merchant
whose budget would be exceeded refuses: it still sends its noise share with a zero signal, so the sum
keeps its full noise, and its units are not used.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from storefed.client.training_round import group_size, load_round, log, merchant_privacy, person_budget
from storefed.data.sources import load_for_node
from storefed.models.task import Task, build_task
from storefed.privacy.delta_check import delta_problem
from storefed.privacy.dp_sgd import clipped_gradient_sum
from storefed.privacy.ledger import distributed_record, open_ledger
from storefed.privacy.person_budget import person_refusal
from storefed.privacy.releases import bounded_gram_sum, bounded_sum
from storefed.privacy.skellam import SkellamPlan, encode
from storefed.wire import NUM_EXAMPLES, TRAIN_METRIC_KEYS, RoundConfig


@dataclass
class DistributedShare:
    """What one merchant contributes to one distributed round."""

    message: np.ndarray  # int64, the flattened shared tensors' coordinates (signal + noise share)
    metrics: dict[str, float]
    privacy: dict[str, str]


def skellam_plan(config: RoundConfig, dim: int) -> SkellamPlan:
    """The round's public plan, from the coordinator's round config and the model size."""
    privacy = config.privacy
    if privacy.gamma is None or privacy.noise_multiplier is None or privacy.noise_shares is None:
        raise ValueError("distributed round config lacks gamma / noise_multiplier / noise_shares")
    return SkellamPlan(dim, privacy.max_grad_norm, privacy.noise_multiplier, privacy.gamma, privacy.noise_shares)


def distributed_share(
    config: RoundConfig, global_state: dict[str, torch.Tensor], server_round: int, node_config: dict[str, Any],
    signal_bound: int | None = None,
) -> DistributedShare:
    """This merchant's integer message for the round (signal + noise share, or noise share only);
    ``signal_bound`` clips the integer signal per coordinate (secure aggregation's range minus the noise)."""
    task, model, data, device = load_round(config, global_state, node_config)
    privacy = merchant_privacy(config.privacy, node_config)
    names = task.shared_keys(model)
    shapes = [tuple(model.state_dict()[n].shape) for n in names]
    dim = int(sum(np.prod(s) for s in shapes))
    plan = skellam_plan(config, dim)
    rng = np.random.default_rng(secrets.randbits(128))  # noise and sampling: never from a public seed
    dataset = task.train_dataset(data)
    ledger = open_ledger(privacy.ledger_dir, data.merchant_id, task.name, task.privacy_unit, privacy.delta,
                         privacy.accountant, privacy.epsilon)
    q = float(privacy.sample_rate)
    reason = delta_problem(privacy.delta, len(dataset), task.privacy_unit, "this merchant") if len(dataset) else None
    if not reason and ledger.epsilon_after_distributed(plan, q) > privacy.epsilon:
        reason = (f"privacy budget exhausted: {ledger.epsilon_spent:.3f} of epsilon {privacy.epsilon:g} spent "
                  f"(delta={privacy.delta:g}, per {task.privacy_unit}); this distributed round would exceed it")
    k = group_size(task, data)
    person = None
    if not reason:
        person, reason = person_refusal(ledger, distributed_record(plan, q), person_budget(privacy), k)
    metrics = {key: 0.0 for key in TRAIN_METRIC_KEYS} | {
        NUM_EXAMPLES: len(dataset), "dp": 1, "sample_rate": q, "noise_multiplier": plan.noise_multiplier,
        "epsilon_budget": privacy.epsilon, "delta": privacy.delta,
    }
    if reason or len(dataset) == 0:
        log.warning("StoreFed merchant: distributed round %d: sending the noise share only: %s", server_round,
                    reason or "no units")
        message = encode(np.zeros(dim), plan, rng)
        metrics |= {"refused": 1, "epsilon_total": ledger.epsilon_spent}
        return DistributedShare(message, metrics, {"refusal": reason or f"no {task.privacy_unit} examples"})

    if k is not None:
        ledger.group_size = max(ledger.group_size or 0, k)
    if getattr(task, "released", False):  # the item-item co-occurrence: every unit, bounded by construction
        if q != 1.0:
            raise ValueError(f"the item-item release includes every customer (sample rate 1), the round says {q:g}")
        rows = task.cooccurrence_rows(dataset.histories, model.state_dict()["popularity"])
        signal, loss = task.release_message(bounded_gram_sum(rows, privacy.max_grad_norm)), 0.0
    else:
        sampled = np.flatnonzero(rng.random(len(dataset)) < q)
        model.to(device).train()
        signal, loss = clipped_sum(task, model, dataset, sampled, privacy.max_grad_norm, device, names,
                                   privacy.grad_sample_mode)
    record = ledger.record_distributed_round(config.run_id, server_round, plan, q)
    message = encode(signal, plan, rng, signal_bound)
    log.info(
        "StoreFed merchant %s distributed round %d: population-level epsilon %.3f of %g spent "
        "(delta=%g, per %s, Skellam RDP accountant, Poisson sampling q=%.4g, distributed mode); "
        "own share alone: %.3f", data.merchant_id, server_round, record.epsilon_total, privacy.epsilon,
        privacy.delta, task.privacy_unit, q, record.epsilon_own_share_total,
    )
    metrics |= {"train_loss": loss, "steps": 1, "epsilon_round": record.epsilon_round,
                "epsilon_total": record.epsilon_total, "epsilon_person": person.epsilon}
    guarantee = (
        f"({record.epsilon_total:.3f}, {privacy.delta:g})-DP per {task.privacy_unit} at the population level "
        f"(distributed mode, Skellam RDP accountant, Poisson sampling), assuming secure aggregation; "
        f"own share alone: epsilon {record.epsilon_own_share_total:.3f}"
    )
    return DistributedShare(message, metrics, {"unit": task.privacy_unit, "accountant": "skellam-rdp",
                                               "guarantee": guarantee})


def prior_share(config: RoundConfig, server_round: int, node_config: dict[str, Any]) -> DistributedShare:
    """This merchant's share of the one-shot popularity release: the sum of its units' norm-1 vectors
    (task.prior_vectors), every unit included (q = 1), integer-encoded with its Skellam share."""
    catalog, data = load_for_node(config.data, config.seed, node_config)
    task = build_task(config.task, catalog, seed=config.seed, privacy_unit=config.privacy.unit)
    privacy = merchant_privacy(config.privacy, node_config)
    plan = SkellamPlan(catalog.num_items, 1.0, float(privacy.prior_noise_multiplier), float(privacy.prior_gamma),
                       int(privacy.noise_shares))
    rng = np.random.default_rng(secrets.randbits(128))
    vectors = task.prior_vectors(data)
    ledger = open_ledger(privacy.ledger_dir, data.merchant_id, task.name, task.privacy_unit, privacy.delta,
                         privacy.accountant, privacy.epsilon)
    reason = delta_problem(privacy.delta, len(vectors), task.privacy_unit, "this merchant") if len(vectors) else None
    if not reason and ledger.epsilon_after_distributed(plan, 1.0) > privacy.epsilon:
        reason = f"privacy budget exhausted: {ledger.epsilon_spent:.3f} of epsilon {privacy.epsilon:g} spent"
    metrics = {key: 0.0 for key in TRAIN_METRIC_KEYS} | {NUM_EXAMPLES: len(vectors), "dp": 1, "sample_rate": 1.0,
                                                          "noise_multiplier": plan.noise_multiplier,
                                                          "epsilon_budget": privacy.epsilon, "delta": privacy.delta}
    if reason or len(vectors) == 0:
        metrics |= {"refused": 1, "epsilon_total": ledger.epsilon_spent}
        return DistributedShare(encode(np.zeros(plan.dim), plan, rng), metrics, {"refusal": reason or "no units"})
    record = ledger.record_distributed_round(config.run_id, server_round, plan, 1.0)
    metrics |= {"steps": 1, "epsilon_round": record.epsilon_round, "epsilon_total": record.epsilon_total}
    guarantee = (f"({record.epsilon_total:.3f}, {privacy.delta:g})-DP per {task.privacy_unit} at the population "
                 "level (distributed popularity release, Skellam RDP accountant), assuming secure aggregation")
    return DistributedShare(encode(bounded_sum(vectors, 1.0), plan, rng), metrics,
                            {"unit": task.privacy_unit, "accountant": "skellam-rdp", "guarantee": guarantee})


def clipped_sum(
    task: Task, model: nn.Module, dataset, sampled: np.ndarray, clip: float, device: torch.device, names: list[str],
    grad_sample_mode: str = "auto",
) -> tuple[np.ndarray, float]:
    """Flattened sum of the sampled units' clipped gradients over ``names`` (zeros if none sampled;
    book-keeping where it applies, privacy/dp_sgd.clipped_gradient_sum)."""
    dim = sum(model.state_dict()[n].numel() for n in names)
    if len(sampled) == 0:
        return np.zeros(dim), 0.0
    batch = _collate([dataset[int(i)] for i in sampled])
    weights = getattr(task, "class_weights", None)
    losses: list[float] = []

    def loss_of(module: nn.Module) -> torch.Tensor:
        logits, targets = task.forward(module, batch, device)
        loss = unit_losses(logits, targets, None if weights is None else weights.to(device)).sum()
        losses.append(float(loss.detach()) / len(sampled))
        return loss

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    sums = dict(zip(trainable, clipped_gradient_sum(model, loss_of, clip, grad_sample_mode)))
    state = model.state_dict()
    flat = torch.cat([(sums[n] if n in sums else torch.zeros_like(state[n])).reshape(-1).cpu() for n in names])
    return flat.double().numpy(), losses[0]


def unit_losses(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy per DP unit; ``(B, k, C)`` logits (k records per unit, label -100 = padding): the
    mean over the unit's valid records."""
    ce = nn.functional.cross_entropy
    if logits.dim() == 2:
        return ce(logits, targets, weight=weights, reduction="none")
    per_record = ce(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), weight=weights, reduction="none",
                    ignore_index=-100).reshape(targets.shape)
    valid = (targets != -100).to(per_record.dtype)
    return (per_record * valid).sum(1) / valid.sum(1).clamp(min=1.0)


def _collate(items: list) -> tuple[torch.Tensor, ...]:
    return tuple(torch.stack([item[j] for item in items]) for j in range(len(items[0])))
