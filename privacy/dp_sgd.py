"""Opacus DP-SGD wrapping for one local training session.

Guarantee: every optimizer step clips each DP unit's gradient (one dataset item = one unit) to
``max_grad_norm`` in L2 and adds Gaussian noise of std ``noise_multiplier * max_grad_norm``
to the sum; batches are Poisson-sampled with rate ``1 / ceil(n / batch_size)`` (Opacus'
DPDataLoader). Poisson sampling is not optional: without it the accountant's epsilon is invalid.

Randomness: the Gaussian noise comes from a generator seeded with 63 bits from the OS
(``secrets``), and the global torch RNG (which Opacus' Poisson sampler uses) is re-seeded from
OS entropy before wrapping. Model initialisation may be seeded for reproducibility; DP noise
and sampling never are, otherwise anyone who knows the seed could subtract the noise.

``grad_sample_mode="auto"`` (default) is ``"book"`` where it applies, else ``"ghost"``.
``"ghost"`` computes per-sample gradient *norms* without
materialising per-sample gradients (needed for large embedding tables); ``"hooks"`` is
Opacus' standard mode. ``"book"`` is book-keeping (``privacy/book_keeping.py``): the same clipped,
noised update from ONE backward pass, for models whose trainable layers are ``nn.Linear`` and
``nn.Embedding`` only (the recommenders); any other trainable layer is refused here, by name.
Opacus still does the Poisson sampling (``DPDataLoader``, same rate) and the noise is drawn the same
way from the same kind of generator. Under book-keeping the criterion must give the *mean of the
per-unit losses* (``client/local_training.py`` does so).
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

GRAD_SAMPLE_MODES = ("auto", "book", "ghost", "hooks")


def resolve_grad_sample_mode(model: nn.Module, mode: str) -> str:
    """``auto``: book-keeping when it can clip every trainable layer of ``model`` exactly (one backward pass),
    else Opacus ghost clipping; any other known mode unchanged (an unknown one is refused, naming the choices)."""
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"privacy.grad_sample_mode={mode!r} is unknown: choose one of {GRAD_SAMPLE_MODES}")
    if mode != "auto":
        return mode
    from storefed.privacy.book_keeping import UnsupportedModuleError, check_supported

    try:
        check_supported(model)
    except UnsupportedModuleError:
        return "ghost"
    return "book"


@dataclass(frozen=True)
class SamplingPlan:
    """Poisson sampling of one local session: what the accountant is told."""

    num_units: int
    sample_rate: float
    steps: int


def plan_sampling(num_units: int, batch_size: int, epochs: int) -> SamplingPlan:
    """Sample rate and step count Opacus will use for ``epochs`` passes over ``num_units`` units."""
    batches = math.ceil(num_units / batch_size)
    return SamplingPlan(num_units, 1.0 / batches, batches * epochs)


@dataclass
class PrivateTraining:
    model: nn.Module
    optimizer: Optimizer
    criterion: nn.Module
    loader: DataLoader


def make_private(
    model: nn.Module,
    optimizer: Optimizer,
    loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str = "auto",
    criterion: nn.Module | None = None,
) -> PrivateTraining:
    """Wrap model, optimizer and loader with Opacus; use the returned criterion for the loss.

    ``criterion`` (default: plain cross-entropy) may carry fixed class weights; they must not depend
    on the data (a data-dependent weight would change every other unit's gradient)."""
    grad_sample_mode = resolve_grad_sample_mode(model, grad_sample_mode)
    if noise_multiplier <= 0 or max_grad_norm <= 0:
        raise ValueError("noise_multiplier and max_grad_norm must be > 0 under DP")
    if grad_sample_mode == "book":
        from storefed.privacy.book_keeping import check_supported

        check_supported(model)  # before any state changes: a clear error for an unsupported layer
    torch.seed()  # Poisson sampling draws from the global RNG: make it unpredictable
    device = next(model.parameters()).device
    noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    if grad_sample_mode == "book":
        return _make_private_book(model, optimizer, loader, noise_multiplier, max_grad_norm, criterion, noise)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")  # on purpose: noise seeded above
        warnings.filterwarnings("ignore", message=".*Optimal order is the .*")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        wrapped = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=grad_sample_mode,
            noise_generator=noise,
        )
    if grad_sample_mode == "ghost":
        dp_model, dp_optimizer, dp_criterion, dp_loader = wrapped
    else:
        (dp_model, dp_optimizer, dp_loader), dp_criterion = wrapped, criterion
    return PrivateTraining(dp_model, dp_optimizer, dp_criterion, dp_loader)


def _make_private_book(model, optimizer, loader, noise_multiplier, max_grad_norm, criterion, noise) -> PrivateTraining:
    """Book-keeping: the model stays itself (its Linear/Embedding forwards record until
    :func:`close_private`); Opacus' Poisson loader; expected batch size as ``PrivacyEngine`` computes it."""
    from opacus.data_loader import DPDataLoader

    from storefed.privacy.book_keeping import BookKeeping, BookKeepingOptimizer

    model_params = set(model.parameters())
    if any(p not in model_params for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("Module parameters are different than optimizer Parameters")
    dp_loader = DPDataLoader.from_data_loader(loader)
    expected_batch_size = int(len(dp_loader.dataset) * dp_loader.sample_rate)
    book = BookKeeping(model, loss_reduction="mean")
    try:
        dp_optimizer = BookKeepingOptimizer(optimizer, book, noise_multiplier, max_grad_norm, expected_batch_size, noise)
    except Exception:
        book.close()
        raise
    return PrivateTraining(model, dp_optimizer, criterion, dp_loader)


def close_private(private: PrivateTraining) -> None:
    """Undo what wrapping changed on the user's module (book-keeping's recording forwards)."""
    book = getattr(private.optimizer, "book", None)
    if book is not None:
        book.close()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside an Opacus wrapper (weights without the ``_module.`` prefix)."""
    return getattr(model, "_module", model)


def clipped_gradient_sum(
    model: nn.Module,
    loss_of: Callable[[nn.Module], torch.Tensor],
    max_grad_norm: float,
    grad_sample_mode: str = "auto",
) -> list[torch.Tensor]:
    """The sum over a batch of each DP unit's gradient clipped to L2 norm ``max_grad_norm``, no noise.

    For distributed DP (privacy/skellam.py): the merchant adds only its integer noise share after
    this. ``loss_of(module)`` returns the *sum* of the batch's per-unit losses. ``grad_sample_mode``:
    ``auto`` and ``book`` use book-keeping (one backward pass, privacy/book_keeping.py) where every
    trainable layer is supported, else (and for ``hooks`` / ``ghost``, whose Opacus form has no
    noise-free clipped sum) Opacus' per-sample gradients and clipping (``GradSampleModule`` +
    ``DPOptimizer.clip_and_accumulate``). Returns one tensor per trainable parameter, in
    ``model.parameters()`` order; ``model`` is left unwrapped.
    """
    if resolve_grad_sample_mode(model, grad_sample_mode) == "book":
        return _book_clipped_sum(model, loss_of, max_grad_norm)
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    params = [p for p in model.parameters() if p.requires_grad]
    wrapped = GradSampleModule(model, loss_reduction="sum")
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=max_grad_norm,
                            expected_batch_size=1, loss_reduction="sum")
    try:
        optimizer.zero_grad(set_to_none=True)
        loss_of(wrapped).backward()
        optimizer.clip_and_accumulate()
        sums = [p.summed_grad.detach().clone() for p in params]
    finally:
        optimizer.zero_grad(set_to_none=True)
        wrapped._close()
    return sums


def _book_clipped_sum(model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor],
                      max_grad_norm: float) -> list[torch.Tensor]:
    """:func:`clipped_gradient_sum` by book-keeping (raises, naming it, on an unsupported layer)."""
    from storefed.privacy.book_keeping import BookKeeping, refuse_ordinary_gradients

    params = [p for p in model.parameters() if p.requires_grad]
    book = BookKeeping(model, loss_reduction="sum")
    try:
        for p in params:
            p.grad = None
        loss_of(model).backward()
        refuse_ordinary_gradients(params)
        with torch.no_grad():
            sums = book.clipped_sums(max_grad_norm)
        return [sums[p].detach().view_as(p) for p in params]
    finally:
        for p in params:
            p.grad = None
        book.close()
