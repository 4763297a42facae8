"""The default review model: a frozen pretrained encoder's cached sentence features + a DP-trained head.

Only the linear head (``classifier.weight``, ``classifier.bias``: hidden x classes numbers) is
trained under DP and federated; the encoder is public and never changes, so each merchant embeds
its reviews once (:mod:`storefed.models.embedding_cache`) and every later step and round costs
only a matrix product. The features are exactly what the exported ``BertForSequenceClassification``
computes before its classifier (:mod:`storefed.models.text_encoder`), so the exported model makes
the same predictions as the evaluated one.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from storefed.config.schema import ReviewConfig
from storefed.data.schema import Catalog, MerchantData
from storefed.models.embedding_cache import cached_embeddings
from storefed.models.review import ReviewTaskBase, review_labels
from storefed.models.text_encoder import TextEncoder, load_encoder, resolve_encoder_dir


class ReviewHead(nn.Module):
    """A linear classifier on sentence features, plus a learned class prior for the decision.

    ``classifier`` maps features ``(..., H)`` to logits ``(..., C)``; ``prior`` is an input-free
    linear map (applied to a constant 1, so Opacus computes its per-sample gradients like any
    ``nn.Linear``) trained with the same loss on the same labels: it converges to the log class
    prior. Both are trained together in the one DP-SGD step, clipped jointly per DP unit and
    noised together, so the prior costs no extra privacy. The decision is logit adjustment
    (Menon et al. 2021): ``argmax(classifier(x) - tau * prior)``; tau = 1 is the balanced-error
    rule, tau = 0 plain argmax; in between trades the rare class's recall for precision (the default
    0.75 was chosen for macro-F1 on the validation split, see docs/results.md). It keeps a rare class from
    being drowned by the majority under DP noise without reading label counts for free.
    """

    def __init__(self, hidden_size: int, num_classes: int, prior_tau: float = 0.75) -> None:
        super().__init__()
        self.classifier = nn.Linear(hidden_size, num_classes)
        self.prior = nn.Linear(1, num_classes, bias=False)
        self.prior_tau = float(prior_tau)
        for weight in (self.classifier.weight, self.classifier.bias, self.prior.weight):
            nn.init.zeros_(weight)  # uniform predictions at the start; the first DP steps then move them

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Training logits: the classifier's and the prior's, stacked on dim 1 (``(B, 2, C)`` for
        ``(B, H)`` features, ``(B, 2k, C)`` for a reviewer's ``(B, k, H)``); the loss of one DP unit
        is the mean cross-entropy over them (``task.forward`` repeats the labels to match)."""
        logits = self.classifier(features)
        if logits.dim() == 2:
            logits = logits.unsqueeze(1)
        prior = self.prior(torch.ones(*logits.shape[:-1], 1, dtype=features.dtype, device=features.device))
        return torch.cat([logits, prior], dim=1)

    def decision_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits whose argmax is the decision: ``classifier(x) - tau * prior``."""
        return self.classifier(features) - self.prior_tau * self.prior.weight[:, 0]


class FrozenReviewTask(ReviewTaskBase):
    """``task.encoder=frozen``: DP unit one review, or one reviewer (``privacy_unit=user``)."""

    def __init__(
        self,
        cfg: ReviewConfig,
        catalog: Catalog,
        seed: int = 0,
        privacy_unit: str | None = None,
        cache_dir: str | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(cfg, catalog, seed, privacy_unit)
        self.encoder_dir = resolve_encoder_dir(cfg.pretrained_dir)  # clear error now if it is missing
        config = json.loads((self.encoder_dir / "config.json").read_text(encoding="utf-8"))
        self.hidden_size = int(config["hidden_size"])
        self.max_length = cfg.max_length
        self.cache_dir = cache_dir
        self.embedding_device = device or torch.device("cpu")  # the merchant's device (its GPU when it has one)
        self._encoder: TextEncoder | None = None

    @property
    def encoder(self) -> TextEncoder:
        """The frozen encoder, loaded on first use (the coordinator never needs it to aggregate)."""
        if self._encoder is None:
            self._encoder = load_encoder(str(self.encoder_dir), self.max_length, self.embedding_device)
        return self._encoder

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return ReviewHead(self.hidden_size, self.num_classes, self.cfg.prior_tau)

    def shared_keys(self, model: nn.Module) -> list[str]:
        return list(model.state_dict().keys())

    def features(self, data: MerchantData) -> np.ndarray:
        """Every review's sentence feature ``(n, H)``, from this merchant's cache when present."""
        return cached_embeddings(
            self.encoder, list(data.reviews.text), data.merchant_id, self.cache_dir, self.cfg.embed_batch_size
        )

    def train_dataset(self, data: MerchantData) -> Dataset:
        if len(data.reviews.text) == 0:
            return TensorDataset(torch.zeros(0, self.hidden_size), torch.zeros(0, dtype=torch.long))
        features = self.features(data)
        labels = review_labels(data.reviews.rating, self.scheme)
        if not self.per_reviewer:
            idx = self._split_indices(data, "train")
            return TensorDataset(torch.from_numpy(features[idx]), torch.as_tensor(labels[idx], dtype=torch.long))
        groups = self._reviewer_groups(data)
        k = self.max_reviews_per_user
        inputs = torch.zeros(len(groups), k, self.hidden_size)
        target = torch.full((len(groups), k), -100, dtype=torch.long)  # -100: padding, no loss
        for row, group in enumerate(groups):
            inputs[row, : len(group)] = torch.from_numpy(features[group])
            target[row, : len(group)] = torch.as_tensor(labels[group], dtype=torch.long)
        return TensorDataset(inputs, target)

    def forward(self, model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels) ``(B, 2k, C), (B, 2k)``: each unit's k reviews (k = 1 per review), for the
        classifier and for the prior (:class:`ReviewHead`); label -100 marks padding."""
        features, labels = (t.to(device) for t in batch)
        labels = labels.unsqueeze(1) if labels.dim() == 1 else labels
        return model(features), torch.cat([labels, labels], dim=1)

    def evaluate(self, model: nn.Module, data: MerchantData, device: torch.device) -> dict[str, float]:
        idx = self._split_indices(data, "test")
        gold = review_labels(data.reviews.rating, self.scheme)[idx]
        pred = np.zeros(0, dtype=np.int64)
        if len(idx):
            model.eval()
            with torch.no_grad():
                logits = model.decision_logits(torch.from_numpy(self.features(data)[idx]).to(device))
            pred = logits.argmax(-1).cpu().numpy()
        return self._scored(pred, data, gold)
