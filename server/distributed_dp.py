"""The coordinator's side of distributed DP (``privacy.mode=distributed``): the public plan and the update.

Per round the coordinator only ever sees the secure-aggregation **sum** of the merchants' integer
messages (client/distributed_round.py): the sum of all sampled units' clipped gradients plus Skellam
noise of variance at least ``(sigma * Delta_2)^2``. It decodes the sum, divides by a **fixed** expected
batch size ``q * N`` (N = the units the contributing merchants hold, from the sizes they report, never
the realized sample count) and takes one server-optimizer step (SGD with momentum or Adam:
post-processing, no privacy cost).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from storefed.config.schema import RunConfig
from storefed.config.validate import noise_multiplier_value
from storefed.privacy.person_budget import task_epsilon
from storefed.privacy.skellam import SkellamPlan, choose_gamma, decode, plan_noise

DEFAULT_SAMPLE_RATE = 0.05


def released_model(settings: RunConfig) -> bool:
    """The item-item recommender: two one-shot releases (popularity, co-occurrence), no DP-SGD."""
    return getattr(settings.task, "model", None) == "item_item"


def sample_rate(settings: RunConfig) -> float:
    """The public per-unit Poisson rate q (1 for the item-item releases: every customer)."""
    return 1.0 if released_model(settings) else float(settings.privacy.sample_rate or DEFAULT_SAMPLE_RATE)


def noise_shares(settings: RunConfig) -> int:
    """Shares the noise is split into: merchants that must survive minus those that may collude."""
    survivors = settings.privacy.min_survivors or settings.federation.stores_per_round
    return survivors - settings.privacy.colluders


def prior_plan(settings: RunConfig, dim: int) -> SkellamPlan | None:
    """The one-shot popularity release (every unit, norm 1, q = 1), when ``task.popularity_prior`` asks for
    it or the model is the item-item recommender (its first release)."""
    task = settings.task
    if not (getattr(task, "popularity_prior", False) or released_model(settings)):
        return None
    gamma = choose_gamma(dim, 1.0, settings.privacy.rounding_overhead)
    if task.prior_noise_multiplier is not None:
        return SkellamPlan(dim, 1.0, task.prior_noise_multiplier, gamma, noise_shares(settings))
    privacy = settings.privacy
    fraction = task.resolved(private=True).prior_budget_fraction
    return plan_noise(fraction * task_epsilon(privacy), privacy.delta, 1.0, 1, dim, 1.0,
                      noise_shares(settings), privacy.rounding_overhead)


def distributed_plan(settings: RunConfig, dim: int, prior: SkellamPlan | None = None) -> SkellamPlan:
    """The public Skellam plan of every round: noise planned so the planned rounds (after the prior
    release, if any) fit the task's budget (``privacy.epsilon`` or its share of ``privacy.person_epsilon``)."""
    privacy = settings.privacy
    noise = noise_multiplier_value(privacy.noise_multiplier)
    if noise is not None:
        gamma = choose_gamma(dim, privacy.max_grad_norm, privacy.rounding_overhead)
        return SkellamPlan(dim, privacy.max_grad_norm, noise, gamma, noise_shares(settings))
    rounds = 1 if released_model(settings) else privacy.planned_rounds or settings.federation.rounds
    spent = [(prior, 1.0, 1)] if prior is not None else []
    return plan_noise(task_epsilon(privacy), privacy.delta, sample_rate(settings), rounds, dim, privacy.max_grad_norm,
                      noise_shares(settings), privacy.rounding_overhead, spent)


class DistributedUpdate:
    """Global model <- server optimizer step on (decoded noisy sum) / (q * N)."""

    def __init__(self, shared: dict[str, torch.Tensor], plan: SkellamPlan, q: float, optimizer: str, lr: float,
                 frozen: tuple[str, ...] = ()) -> None:
        """``frozen``: tensors kept as they are (e.g. an output bias set from a DP prior release)."""
        self.plan, self.q, self.frozen = plan, q, set(frozen)
        self.names = list(shared)
        self.params = [torch.nn.Parameter(shared[n].detach().clone().double()) for n in self.names]
        self.dtypes = {n: shared[n].dtype for n in self.names}
        if optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(self.params, lr=lr)
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=0.9)
        else:
            raise ValueError(f"task.optimizer={optimizer!r} is unknown: choose adam or sgd")

    def step(self, integer_sum: np.ndarray, population: int) -> dict[str, torch.Tensor]:
        """Apply one round's released sum; ``population`` = units held by the contributing merchants."""
        if population < 1:
            raise ValueError("distributed round: the contributing merchants report no units")
        gradient = torch.from_numpy(decode(integer_sum, self.plan) / (self.q * population))
        offset = 0
        for name, p in zip(self.names, self.params):
            grad = gradient[offset: offset + p.numel()].reshape(p.shape).clone()
            p.grad = None if name in self.frozen else grad
            offset += p.numel()
        if offset != gradient.numel():
            raise ValueError(f"distributed round: the sum has {gradient.numel()} values, the model {offset}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.state()

    def reset(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Replace the global model (e.g. after a prior release); the optimizer state starts afresh."""
        with torch.no_grad():
            for name, p in zip(self.names, self.params):
                p.copy_(state[name].double())
        self.optimizer.state.clear()
        return self.state()

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to(self.dtypes[n]).clone() for n, p in zip(self.names, self.params)}


def with_plan(to_clients, plan: SkellamPlan, q: float, prior: SkellamPlan | None = None):
    """The merchants' round config carrying the public plan (and the prior release's, if any)."""
    privacy = dataclasses.replace(
        to_clients.privacy, mode="distributed", sample_rate=q, gamma=plan.gamma, noise_shares=plan.min_survivors,
        noise_multiplier=plan.noise_multiplier, prior_noise_multiplier=prior.noise_multiplier if prior else None,
        prior_gamma=prior.gamma if prior else None,
    )
    return dataclasses.replace(to_clients, privacy=privacy)
