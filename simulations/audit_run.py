"""One audited training run: a merchant's customers plus canary customers, trained once as a
merchant trains (``train_local`` with Opacus DP-SGD, Poisson sampling, noise planned for the
target epsilon), then every canary scored and the one-run bound computed (``privacy/audit.py``).

The audited mechanism is one local training session of the recommender with DP unit = customer.
Its theoretical epsilon is computed exactly as a merchant's ledger computes it: the session's
(noise multiplier, sample rate, steps) composed by the configured accountant at ``delta``.
The sample rate ``1/ceil(n/batch_size)`` depends on n, which includes the included canaries; like
the platform's ledger, the accountant is given the run's actual (q, steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from storefed.client.local_training import DPParams, LocalTrainingConfig, train_local
from storefed.config.schema import RecommenderConfig
from storefed.data.schema import Catalog
from storefed.models.recommender import CustomerDataset, RecommenderTask, customer_histories, split_leave_last_out
from storefed.privacy.accounting import epsilon_of, plan_noise_multiplier
from storefed.privacy.audit import AuditBound, audit_bound
from storefed.privacy.canaries import CanarySet, canary_scores, make_canaries
from storefed.privacy.delta_check import delta_problem
from storefed.privacy.dp_sgd import plan_sampling, unwrap


class AuditConfigError(ValueError):
    """The audit configuration cannot be run; the message says what to change."""


@dataclass(frozen=True)
class AuditPlan:
    """What to audit; validated by ``storefed.simulations.audit_command``."""

    task_cfg: RecommenderConfig
    seed: int
    catalog: Catalog
    real_histories: list[np.ndarray]  # the merchant's own customers (training histories)
    canaries: int
    canary_length: int
    canary_seed: int
    guesses: list[int]
    confidence: float
    audit_delta: float
    local: LocalTrainingConfig
    private: bool
    epsilon_target: float
    delta: float
    accountant: str
    noise_multiplier: float | str  # a number or "auto"
    max_grad_norm: float
    grad_sample_mode: str


@dataclass(frozen=True)
class AuditRun:
    """Everything the report needs: the training that happened and the bound."""

    num_units: int
    real_units: int
    canaries: CanarySet
    sample_rate: float
    steps: int
    noise_multiplier: float | None  # None without DP
    epsilon_theory: float | None  # None without DP (no guarantee)
    train_loss: float
    scores: np.ndarray
    bound: AuditBound


def real_histories_of_stores(stores: list, max_history: int) -> list[np.ndarray]:
    """Training histories (leave-last-out split, as the recommender trains) of every customer of ``stores``."""
    histories: list[np.ndarray] = []
    for data in stores:
        train, _ = split_leave_last_out(customer_histories(data))
        histories.extend(train)
    return histories


def noise_for(plan: AuditPlan, sample_rate: float, steps: int) -> float:
    """The configured noise multiplier, or with ``auto`` the smallest that fits this one session into the target."""
    if plan.noise_multiplier != "auto":
        return float(plan.noise_multiplier)
    return plan_noise_multiplier([], sample_rate, steps, 1, plan.epsilon_target, plan.delta, plan.accountant)


def run_audit(plan: AuditPlan, device: torch.device) -> AuditRun:
    """Insert the canaries, train once, score the canaries, bound epsilon from below."""
    task = RecommenderTask(plan.task_cfg, plan.catalog, seed=plan.seed)
    canaries = make_canaries(plan.catalog.num_items, plan.canaries, plan.canary_length, plan.canary_seed)
    dataset = CustomerDataset(plan.real_histories + canaries.members, task.max_history)
    sampling = plan_sampling(len(dataset), plan.local.batch_size, plan.local.epochs)
    problem = delta_problem(plan.delta, len(dataset), "customer", "the audited merchant") if plan.private else None
    if problem:
        raise AuditConfigError(problem)
    model = task.build_model()
    dp, noise, eps = None, None, None
    if plan.private:
        noise = noise_for(plan, sampling.sample_rate, sampling.steps)
        eps = epsilon_of([(noise, sampling.sample_rate, sampling.steps)], plan.delta, plan.accountant)
        dp = DPParams(noise, plan.max_grad_norm, plan.grad_sample_mode)
    result = train_local(task, model, dataset, plan.local, dp, device)
    scores = canary_scores(unwrap(model), canaries.histories, task.max_history, device)
    bound = audit_bound(scores, canaries.included, plan.guesses, plan.audit_delta, plan.confidence)
    return AuditRun(
        num_units=len(dataset),
        real_units=len(dataset) - int(canaries.included.sum()),
        canaries=canaries,
        sample_rate=sampling.sample_rate,
        steps=result.steps,
        noise_multiplier=noise,
        epsilon_theory=eps,
        train_loss=result.mean_loss,
        scores=scores,
        bound=bound,
    )
