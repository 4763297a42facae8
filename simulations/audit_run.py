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

import secrets
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from storefed.client.distributed_round import clipped_sum
from storefed.client.local_training import DPParams, LocalTrainingConfig, train_local
from storefed.config.schema import RecommenderConfig
from storefed.data.schema import Catalog
from storefed.models.recommender import CustomerDataset, RecommenderTask, customer_histories, split_leave_last_out
from storefed.privacy.accounting import epsilon_of, plan_noise_multiplier
from storefed.privacy.audit import AuditBound, audit_bound
from storefed.privacy.canaries import CanarySet, canary_scores, make_canaries
from storefed.privacy.delta_check import delta_problem
from storefed.privacy.dp_sgd import plan_sampling, unwrap
from storefed.privacy.skellam import SkellamPlan, choose_gamma, encode, plan_noise
from storefed.privacy.skellam import epsilon as skellam_epsilon
from storefed.privacy.skellam import skellam as skellam_noise
from storefed.server.distributed_dp import DistributedUpdate


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
    mode: str = "local"  # local: one merchant's DP-SGD session; distributed: Skellam rounds (privacy/skellam.py)
    noise_shares: int = 1  # distributed: merchants whose noise shares make up each round's noise


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


def distributed_noise(plan: AuditPlan, task: RecommenderTask, model: torch.nn.Module, sampling) -> SkellamPlan:
    """The Skellam plan of the audited distributed training (configured noise, or planned to the target)."""
    dim = sum(v.numel() for k, v in model.state_dict().items() if k in task.shared_keys(model))
    if plan.noise_multiplier != "auto":
        return SkellamPlan(dim, plan.max_grad_norm, float(plan.noise_multiplier),
                           choose_gamma(dim, plan.max_grad_norm), plan.noise_shares)
    return plan_noise(plan.epsilon_target, plan.delta, sampling.sample_rate, sampling.steps, dim, plan.max_grad_norm,
                      plan.noise_shares)


def train_distributed(
    task: RecommenderTask, model: torch.nn.Module, dataset, sampling, skellam: SkellamPlan, plan: AuditPlan,
    device: torch.device,
) -> tuple[int, float]:
    """Distributed-mode training as the federation runs it: per round, the sampled units' clipped sum
    (client/distributed_round.clipped_sum), integer encoding with this merchant's noise share plus the
    other ``noise_shares - 1`` merchants' shares, and the coordinator's DistributedUpdate step."""
    names = task.shared_keys(model)
    state = model.state_dict()
    update = DistributedUpdate({n: state[n] for n in names}, skellam, sampling.sample_rate, plan.local.optimizer,
                               plan.local.lr)
    rng = np.random.default_rng(secrets.randbits(128))
    losses = []
    model.to(device)
    for _ in range(sampling.steps):
        sampled = np.flatnonzero(rng.random(len(dataset)) < sampling.sample_rate)
        signal, loss = clipped_sum(task, model, dataset, sampled, plan.max_grad_norm, device, names)
        total = encode(signal, skellam, rng) + sum(
            skellam_noise(skellam.share_mu, signal.shape, rng) for _ in range(skellam.min_survivors - 1))
        model.load_state_dict({k: v.to(device) for k, v in update.step(total, len(dataset)).items()}, strict=False)
        losses.append(loss)
    return sampling.steps, float(np.mean(losses)) if losses else 0.0


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
    if plan.private and plan.mode == "distributed":
        skellam = distributed_noise(plan, task, model, sampling)
        noise, eps = skellam.noise_multiplier, skellam_epsilon([(skellam, sampling.sample_rate, sampling.steps)],
                                                               plan.delta)
        steps, loss = train_distributed(task, model, dataset, sampling, skellam, plan, device)
        result = SimpleNamespace(steps=steps, mean_loss=loss)
    else:
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
