"""One merchant's local training session: DP-SGD (Opacus) or, when privacy is off, plain SGD.

The loop is task-agnostic: the task turns a batch into (logits, targets) and cross-entropy is
applied through the criterion Opacus returns (ghost clipping needs its own criterion). Under
book-keeping (``grad_sample_mode=book``) the loss is the mean of the per-unit losses (a ``(B, k, C)``
unit's loss is the mean over its valid records, as under ghost clipping).
FedProx's proximal term is applied as a separate deterministic step after each (noisy) update:
``w <- w - lr * mu * (w - w_global)``. It depends only on already-privatised weights and the
public global model, so it is post-processing and costs no privacy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from storefed.config.schema import TaskConfig
from storefed.models.task import Task
from storefed.privacy.dp_sgd import SamplingPlan, close_private, make_private, plan_sampling, resolve_grad_sample_mode


@dataclass(frozen=True)
class LocalTrainingConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "adam"
    proximal_mu: float = 0.0


def local_training_config(task: TaskConfig, proximal_mu: float = 0.0) -> LocalTrainingConfig:
    """The local optimisation settings of a task config (epochs, batch size, lr, optimizer)."""
    return LocalTrainingConfig(task.epochs, task.batch_size, task.lr, task.optimizer, proximal_mu)


@dataclass(frozen=True)
class DPParams:
    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str = "auto"


@dataclass
class LocalTrainingResult:
    steps: int
    mean_loss: float
    num_units: int
    plan: SamplingPlan


def make_optimizer(model: nn.Module, cfg: LocalTrainingConfig) -> torch.optim.Optimizer:
    """The task's optimizer over the trainable parameters (the first one built in a process imports torch._dynamo)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
    raise ValueError(f"task.optimizer={cfg.optimizer!r} is unknown: choose adam or sgd")


def train_local(
    task: Task,
    model: nn.Module,
    dataset: Dataset,
    cfg: LocalTrainingConfig,
    dp: DPParams | None,
    device: torch.device,
) -> LocalTrainingResult:
    """Train ``model`` in place on ``dataset``. With ``dp`` set, every step is DP-SGD.

    A released task (``task.released``: the item-item recommender) is fitted exactly instead, and
    only without DP (its DP path is the distributed release)."""
    plan = plan_sampling(len(dataset), cfg.batch_size, cfg.epochs)
    if getattr(task, "released", False):
        if dp is not None:
            raise ValueError("task.model=item_item is released through secure aggregation, not trained by DP-SGD: "
                             "use privacy.mode=distributed (or privacy=none)")
        task.fit_exact(model, dataset)
        return LocalTrainingResult(0, 0.0, len(dataset), plan)
    model.to(device).train()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(model, cfg)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=dp is None)
    weights = getattr(task, "class_weights", None)  # fixed in config, never from the data
    criterion: nn.Module = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device))
    trained, private = model, None
    if dp is not None:
        dp = dataclasses.replace(dp, grad_sample_mode=resolve_grad_sample_mode(model, dp.grad_sample_mode))
        private = make_private(
            model, optimizer, loader, dp.noise_multiplier, dp.max_grad_norm, dp.grad_sample_mode, criterion
        )
        trained, optimizer, criterion, loader = private.model, private.optimizer, private.criterion, private.loader
        if abs(loader.sample_rate - plan.sample_rate) > 1e-12:
            close_private(private)
            raise RuntimeError(f"Opacus sample rate {loader.sample_rate} differs from the planned {plan.sample_rate}")
    try:
        steps, loss_sum = _train_loop(task, model, trained, optimizer, criterion, loader, anchor, cfg, dp, device)
    finally:
        if private is not None:
            close_private(private)
    if dp is not None and steps != plan.steps:
        raise RuntimeError(f"took {steps} DP steps but the ledger planned {plan.steps}")
    optimizer.zero_grad(set_to_none=True)
    return LocalTrainingResult(steps, loss_sum / max(steps, 1), len(dataset), plan)


def _train_loop(task, model, trained, optimizer, criterion, loader, anchor, cfg, dp, device) -> tuple[int, float]:
    mode = dp.grad_sample_mode if dp is not None else None
    steps, loss_sum = 0, 0.0
    for _ in range(cfg.epochs):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(batch[0]) == 0:  # empty Poisson batch: the step still adds noise to a zero sum
                if mode == "book":
                    optimizer.step()  # book-keeping: nothing recorded, a zero sum plus noise
                elif dp is not None:
                    _noise_only_step(trained, optimizer)
                steps += 1
                continue
            logits, targets = task.forward(trained, batch, device)
            if mode == "book":
                loss = _unit_losses(criterion, logits, targets).mean()
            else:
                loss = _loss(criterion, logits, targets, ghost=mode == "ghost")
            loss.backward()
            optimizer.step()
            if cfg.proximal_mu > 0:
                _proximal_step(model, anchor, cfg.lr * cfg.proximal_mu)
            steps += 1
            loss_sum += float(loss.detach())
    return steps, loss_sum


def _loss(criterion, logits: torch.Tensor, targets: torch.Tensor, ghost: bool) -> torch.Tensor:
    """Cross-entropy; for ``(B, k, C)`` logits (k records per DP unit, label -100 = padding) the
    loss of one unit is the mean over its valid records (Opacus' ghost criterion needs ``shape``)."""
    if logits.dim() == 2:
        return criterion(logits, targets)
    shape = logits.shape
    flat_logits, flat_targets = logits.reshape(-1, shape[-1]), targets.reshape(-1)
    return criterion(flat_logits, flat_targets, shape=shape) if ghost else criterion(flat_logits, flat_targets)


def _unit_losses(criterion: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(B,)`` per-unit cross-entropies with ``criterion``'s class weights, ignore index and label
    smoothing; for ``(B, k, C)`` logits the mean over each unit's valid records (label != ignore index)."""
    if not isinstance(criterion, nn.CrossEntropyLoss):
        raise TypeError(f"grad_sample_mode=book needs a cross-entropy criterion, not {type(criterion).__name__}")
    options = {"weight": criterion.weight, "ignore_index": criterion.ignore_index,
               "label_smoothing": criterion.label_smoothing, "reduction": "none"}
    if logits.dim() == 2:
        return F.cross_entropy(logits, targets, **options)
    batch, records = logits.shape[0], logits.shape[1]
    losses = F.cross_entropy(logits.reshape(batch * records, -1), targets.reshape(-1), **options).view(batch, records)
    valid = (targets.reshape(batch, records) != criterion.ignore_index).sum(1).clamp(min=1)
    return losses.sum(1) / valid


@torch.no_grad()
def _proximal_step(model: nn.Module, anchor: dict[str, torch.Tensor], rate: float) -> None:
    for name, param in model.named_parameters():
        if name in anchor:
            param.sub_(rate * (param - anchor[name]))


def _noise_only_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A DP step on an empty batch: a zero gradient sum, to which Opacus adds the noise as usual."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)  # hooks mode reads these
            p.grad = torch.zeros_like(p)  # ghost mode reads the (already clipped) summed gradient
    optimizer.step()
