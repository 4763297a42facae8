"""The non-federated methods of `storefed evaluate`, all scored on the merchants' held-out splits.

Every method is evaluated merchant by merchant with the task's own ``evaluate`` (or, for the
baselines, the task's own metric functions on the same split) and pooled by
:func:`pooled`: a mean weighted by each merchant's number of evaluated cases (customers for the
recommender, reviews for the review model) — the same weighting Flower's federated evaluation
uses, and equal to scoring the union of all merchants' held-out cases at once.

- ``popularity`` / ``majority``: the catalog's most popular items / the majority class, from
  all merchants' training data at one party (no privacy). ``local_popularity`` /
  ``local_majority``: each merchant's own list / class.
- ``tfidf_logreg``: TF-IDF + logistic regression (scikit-learn, class-balanced) on all
  merchants' training reviews at one party (no privacy).
- ``centralized`` / ``centralized_dp``: the same model and training loop
  (``client.local_training.train_local``) at one party holding every merchant's training data,
  for ``rounds x task.epochs`` epochs; the DP variant plans its noise so the whole training
  fits ``(epsilon, delta)`` for the same unit (customer / review) and accountant.
- ``local``: every merchant trains the same model alone, ``rounds x task.epochs`` epochs on its
  own data (no DP: its data never leaves it), and is scored on its own held-out split.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from storefed.client.local_training import DPParams, LocalTrainingConfig, train_local
from storefed.data.schema import MerchantData
from storefed.models.recommender import evaluate_scores, popularity_scorer
from storefed.models.review import classification_metrics
from storefed.models.task import Task
from storefed.privacy.accounting import epsilon_of, plan_noise_multiplier
from storefed.privacy.delta_check import delta_problem
from storefed.privacy.dp_sgd import plan_sampling, unwrap

CPU = torch.device("cpu")


def pooled(per_merchant: list[dict[str, float]]) -> dict[str, float]:
    """Metrics pooled over merchants: means weighted by ``num-examples``; counts summed.

    Merchants with no held-out case carry weight 0. ``num-examples`` is the total number of
    evaluated cases and ``merchants`` the number of merchants with at least one.
    """
    weights = np.array([float(m["num-examples"]) for m in per_merchant])
    total = float(weights.sum())
    keys = [k for k in per_merchant[0] if k != "num-examples"]
    out = {k: float(np.dot(weights, [m[k] for m in per_merchant]) / total) if total else 0.0 for k in keys}
    out["num-examples"] = int(total)
    out["merchants"] = int((weights > 0).sum())
    return out


def evaluate_model(
    task: Task, model: torch.nn.Module, merchants: list[MerchantData], device: torch.device = CPU
) -> dict[str, float]:
    """The task's own evaluation on every merchant's held-out split, pooled."""
    model.to(device)
    return pooled([task.evaluate(model, m, device) for m in merchants])


def strip_local_baselines(metrics: dict[str, float], prefix: str) -> tuple[dict[str, float], dict[str, float]]:
    """Split task.evaluate output into the model's metrics and the ``prefix`` baseline's."""
    model = {k: v for k, v in metrics.items() if not k.startswith(prefix)}
    local = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    local.update({k: metrics[k] for k in ("num-examples", "merchants") if k in metrics})
    return model, local


# ---------------------------------------------------------------- baselines


def popularity(task, merchants: list[MerchantData]) -> tuple[dict[str, float], dict[str, float]]:
    """(global popularity, each merchant's local popularity), both on every merchant's test cases."""
    splits = [task.split(m) for m in merchants]
    all_train = [h for train, _ in splits for h in train]
    scorer = popularity_scorer(all_train, task.num_items)
    global_rows, local_rows = [], []
    for train, test in splits:
        args = (test, task.num_items, task.k, task.num_sampled, task.seed)
        global_rows.append({**evaluate_scores(scorer, *args), "num-examples": len(test)})
        local_rows.append({**evaluate_scores(popularity_scorer(train, task.num_items), *args), "num-examples": len(test)})
    return pooled(global_rows), pooled(local_rows)


def review_split(task, data: MerchantData, part: str) -> tuple[list[str], np.ndarray]:
    """The review task's own (texts, labels) split of one merchant: the split task.evaluate uses."""
    return task._split(data, part)  # noqa: SLF001 - the one definition of the split


def majority(task, merchants: list[MerchantData]) -> tuple[dict[str, float], dict[str, float]]:
    """(global majority class, each merchant's own majority class) on every merchant's test reviews."""
    splits = [(review_split(task, m, "train"), review_split(task, m, "test")) for m in merchants]
    all_labels = np.concatenate([labels for (_, labels), _ in splits])
    top = int(np.bincount(all_labels, minlength=task.num_classes).argmax())
    global_rows, local_rows = [], []
    for (_, train_labels), (_, gold) in splits:
        own = int(np.bincount(train_labels, minlength=task.num_classes).argmax()) if len(train_labels) else top
        global_rows.append({**classification_metrics(np.full(len(gold), top), gold, task.num_classes), "num-examples": len(gold)})
        local_rows.append({**classification_metrics(np.full(len(gold), own), gold, task.num_classes), "num-examples": len(gold)})
    return pooled(global_rows), pooled(local_rows)


def tfidf_logreg(task, merchants: list[MerchantData], max_features: int, seed: int) -> dict[str, float]:
    """TF-IDF (word 1-2 grams) + class-balanced logistic regression on all training reviews."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train = [review_split(task, m, "train") for m in merchants]
    texts = [t for ts, _ in train for t in ts]
    labels = np.concatenate([ls for _, ls in train])
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=max_features, sublinear_tf=True)
    classifier = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    classifier.fit(vectorizer.fit_transform(texts), labels)
    rows = []
    for m in merchants:
        test_texts, gold = review_split(task, m, "test")
        pred = classifier.predict(vectorizer.transform(test_texts)) if test_texts else np.zeros(0, dtype=np.int64)
        rows.append({**classification_metrics(np.asarray(pred), gold, task.num_classes), "num-examples": len(gold)})
    return pooled(rows)


# ---------------------------------------------------------------- trained models


def fresh_copy(task: Task, trained: torch.nn.Module) -> torch.nn.Module:
    """A newly built model holding ``trained``'s weights (free of any Opacus hooks)."""
    model = task.build_model()
    model.load_state_dict({k: v.cpu() for k, v in unwrap(trained).state_dict().items()})
    return model


def centralized(
    task: Task,
    merchants: list[MerchantData],
    local: LocalTrainingConfig,
    rounds: int,
    dp: dict | None,
    device: torch.device = CPU,
) -> tuple[dict[str, float], dict]:
    """Train at one party on every merchant's training data; returns (metrics, privacy info).

    ``dp`` (``epsilon, delta, max_grad_norm, grad_sample_mode, accountant``) plans the noise
    multiplier so that all ``rounds * local.epochs`` epochs fit epsilon at delta.
    """
    dataset = ConcatDataset([task.train_dataset(m) for m in merchants])
    cfg = replace(local, epochs=local.epochs * rounds)
    model = task.build_model()
    info: dict = {"units": len(dataset), "epochs": cfg.epochs}
    params = None
    if dp is not None:
        problem = delta_problem(dp["delta"], len(dataset), task.privacy_unit, "the centralized party")
        if problem:
            raise ValueError(problem)
        plan = plan_sampling(len(dataset), cfg.batch_size, cfg.epochs)
        noise = plan_noise_multiplier([], plan.sample_rate, plan.steps, 1, dp["epsilon"], dp["delta"], dp["accountant"])
        params = DPParams(noise, dp["max_grad_norm"], dp["grad_sample_mode"])
        spent = epsilon_of([(noise, plan.sample_rate, plan.steps)], dp["delta"], dp["accountant"])
        info.update(noise_multiplier=noise, sample_rate=plan.sample_rate, steps=plan.steps, epsilon_spent=spent)
    train_local(task, model, dataset, cfg, params, device)
    return evaluate_model(task, fresh_copy(task, model), merchants, device), info


def local_only(
    task: Task, merchants: list[MerchantData], local: LocalTrainingConfig, rounds: int, device: torch.device = CPU
) -> dict[str, float]:
    """Each merchant trains alone (no DP), ``rounds * local.epochs`` epochs, scored on its own split."""
    cfg = replace(local, epochs=local.epochs * rounds)
    rows = []
    for m in merchants:
        model = task.build_model()
        dataset = task.train_dataset(m)
        if len(dataset):
            train_local(task, model, dataset, cfg, None, device)
        rows.append(task.evaluate(model.to(device), m, device))
    return pooled(rows)
