"""Canary customers for the recommender audit: construction, inclusion bits and membership scores.

A canary is one extra *customer* (the recommender's DP unit) whose history is ``length`` distinct
catalog items drawn uniformly at random: nothing in the real data predicts it, so a low loss on its
items can only come from having trained on it. Each canary is included independently with
probability 1/2, as the one-run audit's theorem requires.

Randomness: canary histories and inclusion bits come from ``numpy`` generators keyed by the audit
seed (reproducible canary choice); they are drawn before training and never look at the model.
Training noise and Poisson sampling are *not* seeded (see ``privacy/dp_sgd.py``).

Score: the negative mean cross-entropy (nats) of predicting each canary item from the items before
it, over every cut the training loop can draw (``CustomerDataset`` draws a cut uniformly in
``1..len-1``). Higher score = more likely a member.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from storefed.models.recommender import pad_history

_STREAM_HISTORIES, _STREAM_INCLUSION = 0xC0FFEE, 0xBEEF  # independent generator streams per seed


@dataclass(frozen=True)
class CanarySet:
    """``histories[i]``: canary i's items (catalog indices, time order); ``included[i]``: trained on it."""

    histories: tuple[np.ndarray, ...]
    included: np.ndarray  # bool, shape (m,)

    @property
    def members(self) -> list[np.ndarray]:
        return [h for h, inc in zip(self.histories, self.included) if inc]


def make_canaries(num_items: int, count: int, length: int, seed: int) -> CanarySet:
    """``count`` random-history canaries of ``length`` distinct items, each included with probability 1/2."""
    if count < 2:
        raise ValueError(f"audit.canaries={count}: need at least 2 canaries (hundreds for a useful bound)")
    if not (2 <= length <= num_items):
        raise ValueError(f"audit.canary_length={length}: must be between 2 and the catalog size {num_items}")
    items = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_HISTORIES]))
    coins = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_INCLUSION]))
    histories = tuple(items.choice(num_items, size=length, replace=False).astype(np.int64) for _ in range(count))
    included = coins.random(count) < 0.5
    return CanarySet(histories, included)


@torch.no_grad()
def canary_scores(
    model: nn.Module, histories: tuple[np.ndarray, ...], max_history: int, device: torch.device
) -> np.ndarray:
    """Membership score of each canary: minus its mean next-item cross-entropy (nats) over all cuts."""
    model.eval()
    inputs, targets, owner = [], [], []
    for i, h in enumerate(histories):
        h = h[-(max_history + 1) :]  # what CustomerDataset trains on
        for cut in range(1, len(h)):
            inputs.append(pad_history(h[:cut], max_history))
            targets.append(int(h[cut]))
            owner.append(i)
    losses = np.empty(len(targets))
    for start in range(0, len(targets), 4096):  # one forward pass per chunk of (prefix, next item) cases
        x = torch.stack(inputs[start : start + 4096]).to(device)
        y = torch.as_tensor(targets[start : start + 4096], dtype=torch.long, device=device)
        loss = nn.functional.cross_entropy(model(x), y, reduction="none")
        losses[start : start + len(y)] = loss.double().cpu().numpy()
    cases = np.bincount(owner, minlength=len(histories))
    return -np.bincount(owner, weights=losses, minlength=len(histories)) / cases
