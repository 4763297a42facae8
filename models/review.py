"""Review sentiment classifier (a ``transformers`` sequence classifier); DP unit = review or reviewer.

Labels (``task.labels``): ``polarity`` maps ratings 1-2 -> negative (0), 4-5 -> positive (1)
and drops 3-star reviews; ``three_class`` keeps 3 stars as neutral (negative 0, neutral 1,
positive 2).

Models (``task.encoder``): ``frozen`` (default, :mod:`storefed.models.review_head`): a pretrained
encoder, frozen, whose sentence features each merchant caches; only a linear head is DP-trained
and federated. ``lora``: the same checkpoint with LoRA adapters (token-level, this module).
``scratch``: a small BERT trained from scratch on a hashing tokenizer (this module). The
checkpoint is the bundled all-MiniLM-L6-v2 or ``task.pretrained_dir``; never downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from storefed.config.schema import ReviewConfig
from storefed.data.schema import Catalog, MerchantData
from storefed.models.hashing_tokenizer import HashingTokenizer

LABEL_SCHEMES = ("polarity", "three_class")


def review_labels(ratings: np.ndarray, scheme: str) -> np.ndarray:
    """Class per rating, -1 for dropped reviews."""
    if scheme == "polarity":
        return np.where(ratings <= 2, 0, np.where(ratings >= 4, 1, -1))
    if scheme == "three_class":
        return np.where(ratings <= 2, 0, np.where(ratings == 3, 1, 2))
    raise ValueError(f"task.labels={scheme!r} is unknown: choose one of {LABEL_SCHEMES}")


def split_reviews(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, test) index split of a merchant's reviews."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction)) if n >= 5 else 0
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def classification_metrics(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (classes absent from both gold and pred are left out of the mean)."""
    if len(gold) == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    f1s = []
    for c in range(num_classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float((pred == gold).mean()), "macro_f1": float(np.mean(f1s))}


class MeanPooledBertClassifier(nn.Module):
    """A ``transformers`` BERT encoder with a mean-pooled linear head.

    Mean pooling makes the representation depend on every token from the first step, so
    per-example gradients carry the input's signal instead of mostly the shared bias; under
    DP noise this is what lets the classifier learn (the CLS pooler did not, at small scale).
    """

    def __init__(self, config, encoder: nn.Module | None = None) -> None:
        super().__init__()
        from transformers import BertModel

        self.bert = encoder if encoder is not None else BertModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask, token_type_ids, position_ids) -> torch.Tensor:
        """Logits ``(B, C)`` for reviews ``(B, L)``, or ``(B, k, C)`` for B reviewers' k reviews ``(B, k, L)``.

        A reviewer's reviews are encoded as one sequence whose attention is block-diagonal (each
        review attends only to itself, positions restart per review): the same encoding as one
        review at a time, while every layer keeps the reviewer as its batch dimension, which is
        what lets Opacus clip per reviewer.
        """
        if input_ids.dim() == 3:
            return self._per_reviewer(input_ids, attention_mask, token_type_ids, position_ids)
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.classifier((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))

    def _per_reviewer(self, input_ids, attention_mask, token_type_ids, position_ids) -> torch.Tensor:
        batch, k, length = input_ids.shape
        segment = torch.arange(k, device=input_ids.device).repeat_interleave(length)
        valid = attention_mask.reshape(batch, k * length).bool()
        allowed = (segment[:, None] == segment[None, :])[None] & valid[:, None, :]  # (B, kL, kL)
        allowed |= torch.eye(k * length, dtype=torch.bool, device=input_ids.device)[None]  # padding rows: no NaN
        hidden = self.bert(
            input_ids=input_ids.reshape(batch, k * length),
            attention_mask=allowed[:, None],
            token_type_ids=token_type_ids.reshape(batch, k * length),
            position_ids=position_ids.reshape(batch, k * length),
        ).last_hidden_state.reshape(batch, k, length, -1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.classifier((hidden * mask).sum(2) / mask.sum(2).clamp(min=1.0))


PRIVACY_UNITS = ("review", "user", "reviewer")
ENCODERS = ("frozen", "lora", "scratch")
LABEL_NAMES = {"polarity": ("negative", "positive"), "three_class": ("negative", "neutral", "positive")}


class ReviewTaskBase:
    """What every review model shares: labels, the deterministic split, class weights, the DP unit.

    Reviewer level (``privacy_unit=user``, the default): one DP sample is one reviewer's ``max_reviews_per_user``
    most recent training reviews (older ones are not used), so the clipping norm bounds everything
    one reviewer contributes to an update; the loss is the mean over that reviewer's reviews.
    """

    name = "review"

    def __init__(self, cfg: ReviewConfig, catalog: Catalog, seed: int = 0, privacy_unit: str | None = None) -> None:
        self.cfg = cfg
        # default: one reviewer, so a customer's budget composes without group privacy (lora: per review only)
        unit = privacy_unit or ("review" if cfg.encoder == "lora" else "user")
        if unit not in PRIVACY_UNITS:
            raise ValueError(f"privacy.unit={unit!r} is not available for the review model: choose review or user")
        self.per_reviewer = unit in ("user", "reviewer")
        self.privacy_unit = "reviewer" if self.per_reviewer else "review"
        self.max_reviews_per_user = cfg.max_reviews_per_user
        if self.max_reviews_per_user < 1:
            raise ValueError(f"task.max_reviews_per_user={self.max_reviews_per_user} must be >= 1")
        self.scheme = cfg.labels
        self.num_classes = 2 if self.scheme == "polarity" else 3
        review_labels(np.zeros(0, dtype=np.int64), self.scheme)  # validates the scheme
        self.label_names = LABEL_NAMES[self.scheme]
        self.class_weights = self._class_weights(cfg.class_weights)
        self.test_fraction = cfg.test_fraction
        self.seed = int(seed)
        self.batch_eval = 128

    def _class_weights(self, weights) -> torch.Tensor | None:
        """Fixed, public loss weights per class (e.g. [10, 1] for rare negatives); None = unweighted."""
        if weights is None:
            return None
        values = [float(w) for w in weights]
        if len(values) != self.num_classes or min(values) <= 0:
            raise ValueError(
                f"task.class_weights={values} needs {self.num_classes} positive numbers, one per class "
                f"of task.labels={self.scheme} (negative first)"
            )
        return torch.tensor(values, dtype=torch.float32)

    def _split(self, data: MerchantData, part: str) -> tuple[list[str], np.ndarray]:
        idx = self._split_indices(data, part)
        labels = review_labels(data.reviews.rating, self.scheme)
        return [data.reviews.text[i] for i in idx], labels[idx]

    def _split_indices(self, data: MerchantData, part: str) -> np.ndarray:
        labels = review_labels(data.reviews.rating, self.scheme)
        train_idx, test_idx = split_reviews(len(labels), self.test_fraction, self.seed)
        if self.cfg.holdout == "validation":  # tuning: the test reviews are not touched at all
            fit, held = split_reviews(len(train_idx), self.cfg.validation_fraction, self.seed + 1)
            train_idx, test_idx = train_idx[fit], train_idx[held]
        idx = train_idx if part == "train" else test_idx
        return idx[labels[idx] >= 0]

    def _reviewer_groups(self, data: MerchantData) -> list[np.ndarray]:
        """Per reviewer: indices of their ``max_reviews_per_user`` most recent training reviews."""
        idx = self._split_indices(data, "train")
        users = data.reviews.user[idx]
        groups = []
        for user in np.unique(users):
            mine = idx[users == user]
            groups.append(mine[np.argsort(-data.reviews.timestamp[mine], kind="stable")][: self.max_reviews_per_user])
        return groups

    def _scored(self, pred: np.ndarray, data: MerchantData, gold: np.ndarray) -> dict[str, float]:
        """Metrics of ``pred`` on ``gold``, plus the merchant's own majority-class baseline."""
        _, train_labels = self._split(data, "train")
        metrics = classification_metrics(pred, gold, self.num_classes)
        majority = int(np.bincount(train_labels, minlength=self.num_classes).argmax()) if len(train_labels) else 0
        baseline = classification_metrics(np.full(len(gold), majority), gold, self.num_classes)
        metrics.update({f"local_majority_{k}": v for k, v in baseline.items()})
        metrics["num-examples"] = len(gold)
        return metrics


class ReviewTask(ReviewTaskBase):
    """Token-level review models: ``task.encoder=scratch`` (a small BERT on a hashing tokenizer that
    learns nothing from merchant data, all federated) or ``lora`` (a local checkpoint, frozen, with
    LoRA adapters; only adapters and head are federated)."""

    def __init__(self, cfg: ReviewConfig, catalog: Catalog, seed: int = 0, privacy_unit: str | None = None) -> None:
        super().__init__(cfg, catalog, seed, privacy_unit)
        if cfg.encoder not in ("lora", "scratch"):
            raise ValueError(f"task.encoder={cfg.encoder!r} is not a token-level model: choose lora or scratch")
        self.pretrained_dir = None
        if cfg.encoder == "lora":
            if self.per_reviewer:
                raise ValueError(
                    "privacy.unit=user is implemented for task.encoder=frozen and scratch, not lora: "
                    "use task.encoder=frozen, or privacy.unit=review"
                )
            from transformers import AutoTokenizer

            from storefed.models.text_encoder import resolve_encoder_dir

            self.pretrained_dir = str(resolve_encoder_dir(cfg.pretrained_dir))
            self.hf_tokenizer = AutoTokenizer.from_pretrained(self.pretrained_dir, local_files_only=True)
            self.max_length = cfg.max_length
        else:
            self.tokenizer = HashingTokenizer(cfg.vocab_size, cfg.max_length)

    # -- model ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        if self.pretrained_dir:
            return self._build_lora_model()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=self.tokenizer.vocab_size,
            hidden_size=self.cfg.hidden_size,
            num_hidden_layers=self.cfg.num_layers,
            num_attention_heads=self.cfg.num_heads,
            intermediate_size=self.cfg.intermediate_size,
            max_position_embeddings=self.tokenizer.max_length,
            type_vocab_size=1,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=self.num_classes,
            pad_token_id=0,
            initializer_range=self.cfg.initializer_range,
        )
        pooling = self.cfg.pooling
        if pooling == "mean":
            return MeanPooledBertClassifier(config)
        if pooling == "cls":
            return BertForSequenceClassification(config)
        raise ValueError(f"task.pooling={pooling!r} is unknown: choose mean or cls")

    def _build_lora_model(self) -> nn.Module:
        """Frozen local checkpoint + LoRA adapters + a new head. ``task.pooling``: ``mean`` pools the
        encoder's last hidden states (right for sentence-embedding checkpoints such as MiniLM);
        ``cls`` uses the checkpoint's own sequence-classification model (CLS pooler)."""
        from peft import LoraConfig, get_peft_model
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

        pooling = self.cfg.pooling
        if pooling == "mean":
            config = AutoConfig.from_pretrained(self.pretrained_dir, local_files_only=True)
            config.num_labels = self.num_classes
            base = MeanPooledBertClassifier(config, encoder=AutoModel.from_pretrained(
                self.pretrained_dir, local_files_only=True, add_pooling_layer=False))
        elif pooling == "cls":
            base = AutoModelForSequenceClassification.from_pretrained(
                self.pretrained_dir, num_labels=self.num_classes, local_files_only=True, ignore_mismatched_sizes=True
            )
        else:
            raise ValueError(f"task.pooling={pooling!r} is unknown: choose mean or cls")
        lora = LoraConfig(
            r=self.cfg.lora_r,
            lora_alpha=self.cfg.lora_alpha,
            target_modules=list(self.cfg.lora_targets),
            lora_dropout=0.0,
            modules_to_save=["classifier"],
        )
        return get_peft_model(base, lora)

    def shared_keys(self, model: nn.Module) -> list[str]:
        keys = list(model.state_dict().keys())
        if not self.pretrained_dir:
            return keys
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        return [k for k in keys if k in trainable]

    # -- data ----------------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pretrained_dir:
            enc = self.hf_tokenizer(
                texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        else:
            enc = self.tokenizer(texts)
        return enc["input_ids"], enc["attention_mask"]

    def train_dataset(self, data: MerchantData) -> Dataset:
        if self.per_reviewer:
            return self._reviewer_dataset(data)
        texts, labels = self._split(data, "train")
        ids, mask = self._encode(texts)
        return TensorDataset(ids, mask, torch.as_tensor(labels, dtype=torch.long))

    def _reviewer_dataset(self, data: MerchantData) -> Dataset:
        """One item per reviewer: ids/mask ``(k, L)`` and labels ``(k,)``, padded with label -100."""
        labels = review_labels(data.reviews.rating, self.scheme)
        groups = self._reviewer_groups(data)
        k, length = self.max_reviews_per_user, self._encode([""])[0].shape[1]
        ids = torch.zeros(len(groups), k, length, dtype=torch.long)
        mask = torch.zeros(len(groups), k, length, dtype=torch.long)
        target = torch.full((len(groups), k), -100, dtype=torch.long)
        for row, group in enumerate(groups):
            enc_ids, enc_mask = self._encode([data.reviews.text[i] for i in group])
            ids[row, : len(group)], mask[row, : len(group)] = enc_ids, enc_mask
            target[row, : len(group)] = torch.as_tensor(labels[group], dtype=torch.long)
        return TensorDataset(ids, mask, target)

    def forward(self, model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels): ``(B, C), (B,)`` per review, or ``(B, k, C), (B, k)`` per reviewer."""
        ids, mask, labels = (t.to(device) for t in batch)
        *lead, length = ids.shape
        # Full-batch position/token-type ids: Opacus needs every input to carry the batch dim.
        positions = torch.arange(length, device=device).expand(*lead, length).contiguous()
        out = model(
            input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), position_ids=positions
        )
        return getattr(out, "logits", out), labels

    def evaluate(self, model: nn.Module, data: MerchantData, device: torch.device) -> dict[str, float]:
        texts, gold = self._split(data, "test")
        model.eval()
        preds = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_eval):
                ids, mask = self._encode(texts[start : start + self.batch_eval])
                logits, _ = self.forward(model, (ids, mask, torch.zeros(len(ids), dtype=torch.long)), device)
                preds.append(logits.argmax(-1).cpu().numpy())
        pred = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
        return self._scored(pred, data, gold)
